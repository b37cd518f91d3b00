//! The guest physical address map. One place, so boot code, ACPI tables and devices agree.
//!
//! ```text
//! 0x0000_0000  real-mode IVT/BDA, then boot structures (GDT, IDT, page tables, zero page)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA .. 0x000f_ffff ISA hole (reserved; ACPI tables at 0xe_0000)
//! 0x0010_0000  kernel, then free RAM; initrd at the top of RAM below the MMIO gap
//! 0xc000_0000  MMIO gap (1 GiB): PCI BARs, virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, then its memory map entries.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Linux/x86 accepts at most 2048 bytes of command line (COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; everything from here to 1 MiB is reserved in e820.
pub const EBDA_START: u64 = 0x9_fc00;
/// ACPI tables live in the BIOS area where the guest also scans for the RSDP.
pub const ACPI_START: u64 = 0xe_0000;
pub const ACPI_END: u64 = 0x10_0000;
/// Where the kernel is loaded and where "high memory" starts for the loaders.
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// 32-bit PCI BAR window inside the gap.
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// virtio-mmio device windows, 4 KiB each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;

/// I/O ports of the legacy and platform devices.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
pub const I8042_PORT: u16 = 0x60;
/// ACPI hardware-reduced sleep control and status registers (FADT), one byte each.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// QEMU-compatible ISA pvpanic port (ACPI device QEMU0001).
pub const PVPANIC_PORT: u16 = 0x505;
/// First GSI handed to virtio devices (legacy ISA IRQs stay below).
pub const VIRTIO_GSI_START: u32 = 5;
/// IOAPIC pins KVM provides.
pub const IOAPIC_PINS: u32 = 24;

/// The guest RAM ranges for `mem_bytes` of memory: below the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(RAM_ABOVE_4G_START), mem_bytes - MMIO_GAP_START),
        ]
    }
}

// The boot stack sits between the zero page and the page tables, and the command line ends
// before the EBDA: checked when pvm is compiled.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            ram_ranges(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (GuestAddress(0), MMIO_GAP_START),
                (GuestAddress(1 << 32), 1 << 30)
            ]
        );
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let spans = [
            (GDT_START, IDT_START),
            (IDT_START, PVH_INFO_START),
            (PVH_INFO_START, ZERO_PAGE_START),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (PML4_START, PDPTE_START),
            (PDPTE_START, PDE_START),
            (PDE_START, PDE_START + 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_END),
        ];
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{pair:x?}");
        }
    }
}
