//! ACPI tables (hardware-reduced, as a VMM without a chipset should be): RSDP, XSDT, FADT,
//! MADT (one LAPIC per vCPU, the IOAPIC) and a DSDT carrying `_S5_` for power-off, the pvpanic
//! device, the UART, the PS/2 keyboard controller, and whatever AML the devices add (virtio-mmio
//! nodes, PCI host bridge). Built with rust-vmm's acpi_tables; written into the BIOS area where
//! guests also scan for the RSDP.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::devices::i8042::KEYBOARD_IRQ;
use crate::layout;

const OEM_ID: [u8; 6] = *b"PVMVMM";
const OEM_TABLE_ID: [u8; 8] = *b"PVMTABLE";
const OEM_REVISION: u32 = 1;
/// `_S5_` sleep type; the guest writes `SLP_TYP << 2 | SLP_EN` to the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// IAPC_BOOT_ARCH: an 8042 (the keyboard controller, crate::devices::i8042; without this bit a
/// guest with ACPI PNP finds no PS/2 device and skips its driver), no VGA, no CMOS RTC (pvm
/// emulates neither).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The i8042 (crate::devices::i8042) as a PS/2 keyboard controller, PNP0303: for the same reason
/// as the UART, Linux's i8042 driver can only use IRQ 1 when ACPI hands it over (probing the
/// ports directly, it finds the controller but cannot request the unmapped ISA IRQ: error -22).
fn write_ps2_controller(dsdt: &mut Sdt) {
    let (data, command) = (layout::I8042_PORT, layout::I8042_PORT + 4);
    let data_io = aml::IO::new(data, data, 1, 1);
    let command_io = aml::IO::new(command, command, 1, 1);
    let irq = aml::Interrupt::new(true, true, false, false, KEYBOARD_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&data_io, &command_io, &irq]);
    aml::Device::new(
        "_SB_.PS2K".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0303")),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(dsdt);
}

/// The DSDT: `_S5_`, the pvpanic device (QEMU0001 at its port) and `device_aml` from devices.
pub fn dsdt(device_aml: &[u8]) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE]);
    aml::Name::new("_S5_".into(), &s5).to_aml_bytes(&mut dsdt);
    let port = layout::PVPANIC_PORT;
    let pvpanic_io = aml::IO::new(port, port, 1, 1);
    let pvpanic_crs = aml::ResourceTemplate::new(vec![&pvpanic_io]);
    aml::Device::new(
        "_SB_.PEVT".into(),
        vec![
            &aml::Name::new("_HID".into(), &"QEMU0001"),
            &aml::Name::new("_CRS".into(), &pvpanic_crs),
        ],
    )
    .to_aml_bytes(&mut dsdt);
    // The UART must be described too: a hardware-reduced platform has no legacy PIC, so Linux
    // maps no ISA IRQs by itself, and without IRQ 4 the 8250 never sends user-space output.
    let com1_io = aml::IO::new(layout::SERIAL_PORT, layout::SERIAL_PORT, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, layout::SERIAL_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut dsdt);
    write_ps2_controller(&mut dsdt);
    dsdt.append_slice(device_aml);
    dsdt.as_slice().to_vec()
}

/// A virtio-mmio device node (LNRO0005) for kernels that find virtio-mmio devices through ACPI.
pub fn virtio_mmio_aml(index: usize, base: u64, size: u64, gsi: u32) -> Vec<u8> {
    let memory = aml::Memory32Fixed::new(true, base as u32, size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, gsi);
    let crs = aml::ResourceTemplate::new(vec![&memory, &irq]);
    let uid = index as u32;
    let mut out = Vec::new();
    aml::Device::new(
        format!("_SB_.V{index:03}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The PCI host bridge (PNP0A03) for bus 0: config ports 0xcf8-0xcff and the BAR window.
/// Without it an ACPI guest never scans the bus.
pub fn pci_host_bridge_aml() -> Vec<u8> {
    let bus = aml::AddressSpace::<u16>::new_bus_number(0, 0);
    let config_io = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let window = aml::AddressSpace::<u32>::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        layout::PCI_MMIO_START as u32,
        (layout::PCI_MMIO_START + layout::PCI_MMIO_SIZE - 1) as u32,
        None,
    );
    let crs = aml::ResourceTemplate::new(vec![&bus, &config_io, &window]);
    let mut out = Vec::new();
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0A03")),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The MADT: LAPIC `i` has APIC ID `i` (matching CPUID), one IOAPIC with GSI base 0.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, layout::IOAPIC_START as u32, 0));
    bytes_of(&madt)
}

/// The FADT of a hardware-reduced platform whose sleep registers are pvm's power device.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    fadt.sleep_control_reg = io_byte(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.iapc_boot_arch = (IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    bytes_of(&fadt.finalize())
}

/// Writes all tables at [`layout::ACPI_START`]; returns the RSDP's address.
pub fn write<M: GuestMemoryBackend>(
    mem: &M,
    cpus: u8,
    device_aml: &[u8],
) -> Result<GuestAddress, Error> {
    let align = |addr: u64| (addr + 15) & !15;
    let rsdp_addr = layout::ACPI_START;
    let dsdt_addr = align(rsdp_addr + Rsdp::len() as u64);
    let dsdt = dsdt(device_aml);
    let fadt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt = fadt(dsdt_addr);
    let madt_addr = align(fadt_addr + fadt.len() as u64);
    let madt = madt(cpus);
    let xsdt_addr = align(madt_addr + madt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > layout::ACPI_END {
        return Err(Error::TooLarge((end - layout::ACPI_START) as usize));
    }
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(Error::Write)?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn checksum_ok(table: &[u8]) -> bool {
        table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn length_of(table: &[u8]) -> usize {
        u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize
    }

    #[test]
    fn madt_lists_every_cpu_and_the_ioapic() {
        let t = madt(3);
        assert_eq!(&t[0..4], b"APIC");
        assert_eq!(length_of(&t), t.len());
        assert!(checksum_ok(&t));
        // Header 44 bytes, then 3 LAPIC entries (type 0, length 8) and one IOAPIC (type 1, 12).
        assert_eq!(t.len(), 44 + 3 * 8 + 12);
        for cpu in 0..3 {
            let e = &t[44 + cpu * 8..44 + cpu * 8 + 8];
            assert_eq!(
                (e[0], e[1], e[2], e[3], e[4]),
                (0, 8, cpu as u8, cpu as u8, 1)
            );
        }
        assert_eq!(t[44 + 24], 1);
        assert_eq!(
            u32::from_le_bytes(t[36..40].try_into().unwrap()),
            layout::LAPIC_START as u32
        );
    }

    #[test]
    fn dsdt_and_fadt_are_valid() {
        let d = dsdt(&[]);
        assert_eq!(&d[0..4], b"DSDT");
        assert_eq!(length_of(&d), d.len());
        assert!(checksum_ok(&d));
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        assert!(find(&d, b"_S5_") && find(&d, b"QEMU0001") && find(&d, b"COM1"));
        assert!(find(&d, b"PS2K"), "the keyboard controller is described");
        let f = fadt(0x1234);
        assert_eq!(&f[0..4], b"FACP");
        assert!(checksum_ok(&f));
        assert_eq!(length_of(&f), f.len());
        // X_DSDT at offset 140; FADT flags at 112 carry HW_REDUCED_ACPI (bit 20).
        assert_eq!(u64::from_le_bytes(f[140..148].try_into().unwrap()), 0x1234);
        assert_ne!(
            u32::from_le_bytes(f[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
        // SLEEP_CONTROL_REG at 244: system I/O, byte access, pvm's port.
        assert_eq!(f[244], 1);
        assert_eq!(u64::from_le_bytes(f[248..256].try_into().unwrap()), 0x3c0);
    }

    #[test]
    fn device_nodes_carry_their_ids() {
        let find = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        let mmio = virtio_mmio_aml(3, 0xd000_3000, 0x1000, 8);
        assert!(find(&mmio, b"V003") && find(&mmio, b"LNRO0005"));
        assert!(
            find(&mmio, &0xd000_3000u32.to_le_bytes()),
            "Memory32Fixed base"
        );
        let pci = pci_host_bridge_aml();
        assert!(find(&pci, b"PCI0") && find(&pci, b"_CRS"));
        let d = dsdt(&pci);
        assert_eq!(length_of(&d), d.len());
        assert!(checksum_ok(&d));
    }

    #[test]
    fn tables_land_in_the_bios_area_with_a_valid_rsdp() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write(&mem, 2, &[]).unwrap();
        assert_eq!(rsdp.0, layout::ACPI_START);
        let mut buf = [0u8; 36];
        mem.read_slice(&mut buf, rsdp).unwrap();
        assert_eq!(&buf[0..8], b"RSD PTR ");
        assert!(checksum_ok(&buf[0..20]) && checksum_ok(&buf));
        let xsdt = u64::from_le_bytes(buf[24..32].try_into().unwrap());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&sig, b"XSDT");
    }
}
