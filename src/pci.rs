//! The PCI root: configuration mechanism #1 (ports 0xcf8-0xcff) on bus 0, a host bridge at
//! 00:00.0 and the virtio-pci transports at 00:01.0 onwards. There is no firmware, so pvm
//! assigns each function its resources itself ([`PciAllocator`]: device number, BAR address,
//! MSI GSIs); the BARs live on the MMIO bus, see `virtio_devices`.

use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_IRQ_ROUTES;
use pvm_virtio::PciTransport;
use pvm_virtio::transport::pci::BAR_SIZE;

use crate::bus::BusDevice;
use crate::irq_routing::DEFAULT_ROUTE_COUNT;
use crate::layout;

/// CONFIG_ADDRESS: enable bit, bus [23:16], device [15:11], function [10:8], register [7:2].
const CONFIG_ENABLE: u32 = 1 << 31;
/// Devices per bus.
pub const MAX_DEVICES: usize = 32;

/// The host bridge's configuration header: Red Hat's "QEMU host bridge" IDs, class 06/00/00.
fn host_bridge_header() -> [u8; 64] {
    let mut header = [0u8; 64];
    header[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
    header[2..4].copy_from_slice(&0x0008u16.to_le_bytes());
    header[0x0a] = 0x00; // subclass: host bridge
    header[0x0b] = 0x06; // class: bridge
    header
}

/// Decoded CONFIG_ADDRESS.
fn decode(address: u32) -> Option<(usize, u64)> {
    let bus = (address >> 16) & 0xff;
    let device = ((address >> 11) & 0x1f) as usize;
    let function = (address >> 8) & 0x7;
    if address & CONFIG_ENABLE == 0 || bus != 0 || function != 0 {
        return None;
    }
    Some((device, u64::from(address & 0xfc)))
}

/// GSIs for MSI-X vectors start above the IOAPIC pins and end where KVM's routing table is
/// full: it holds at most KVM_MAX_IRQ_ROUTES entries, the default irqchip routes included.
const MSI_GSI_START: u32 = layout::IOAPIC_PINS;
const MSI_GSI_END: u32 = KVM_MAX_IRQ_ROUTES as u32 - DEFAULT_ROUTE_COUNT;

/// A device number on bus 0 that a [`PciAllocator`] handed out: 1 to 31 (0 is the host
/// bridge). Neither Clone nor constructible elsewhere, so no two functions get the same one.
#[derive(Debug, PartialEq, Eq)]
pub struct PciSlot(u8);

impl PciSlot {
    pub fn number(&self) -> u8 {
        self.0
    }
}

/// What one virtio-pci function gets.
#[derive(Debug, PartialEq, Eq)]
pub struct PciResources {
    pub slot: PciSlot,
    /// Guest-physical address of its BAR0 ([`BAR_SIZE`] bytes).
    pub bar: u64,
    /// GSI of MSI-X vector 0; vector `v` is `first_gsi + v`.
    pub first_gsi: u32,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("PCI bus 0 is full: it has {} device numbers for virtio devices", MAX_DEVICES - 1)]
    NoSlot,
    #[error("the PCI BAR window ({window:#x} bytes) has no room for another {size:#x}-byte BAR")]
    NoBarSpace { window: u64, size: u64 },
    #[error("no GSIs left for {wanted} MSI-X vectors: {left} of the {total} MSI GSIs are free")]
    NoGsi { wanted: u16, left: u32, total: u32 },
}

/// Hands out bus-0 device numbers, BAR addresses and MSI GSIs, in order, each once. A request
/// that cannot be met takes nothing.
#[derive(Debug)]
pub struct PciAllocator {
    next_slot: u8,
    bar_window: (u64, u64),
    bar_size: u64,
    next_bar: u64,
    gsis: (u32, u32),
    next_gsi: u32,
}

impl Default for PciAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl PciAllocator {
    /// pvm's layout: BARs in the 32-bit PCI window of the MMIO gap, GSIs above the IOAPIC pins.
    pub fn new() -> Self {
        Self::with_limits(
            (layout::PCI_MMIO_START, layout::PCI_MMIO_SIZE),
            BAR_SIZE,
            (MSI_GSI_START, MSI_GSI_END),
        )
    }

    /// BARs of `bar_size` bytes in the window `(start, size)`, GSIs in `[gsis.0, gsis.1)`.
    fn with_limits(bar_window: (u64, u64), bar_size: u64, gsis: (u32, u32)) -> Self {
        PciAllocator {
            next_slot: 1,
            bar_window,
            bar_size,
            next_bar: bar_window.0,
            gsis,
            next_gsi: gsis.0,
        }
    }

    /// A device number, a BAR and `vectors` consecutive GSIs for the next function.
    pub fn allocate(&mut self, vectors: u16) -> Result<PciResources, AllocError> {
        if usize::from(self.next_slot) >= MAX_DEVICES {
            return Err(AllocError::NoSlot);
        }
        let (window_start, window_size) = self.bar_window;
        let bar_end = self.next_bar.checked_add(self.bar_size);
        if bar_end.is_none_or(|end| end > window_start.saturating_add(window_size)) {
            return Err(AllocError::NoBarSpace {
                window: window_size,
                size: self.bar_size,
            });
        }
        let left = self.gsis.1 - self.next_gsi;
        if u32::from(vectors) > left {
            return Err(AllocError::NoGsi {
                wanted: vectors,
                left,
                total: self.gsis.1 - self.gsis.0,
            });
        }
        let resources = PciResources {
            slot: PciSlot(self.next_slot),
            bar: self.next_bar,
            first_gsi: self.next_gsi,
        };
        self.next_slot += 1;
        self.next_bar += self.bar_size;
        self.next_gsi += u32::from(vectors);
        Ok(resources)
    }
}

/// Bus 0: the host bridge and the virtio-pci functions.
pub struct PciRoot {
    address: u32,
    /// Indexed by device number; 0 (the host bridge) stays empty.
    devices: Vec<Option<Arc<Mutex<PciTransport>>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        PciRoot {
            address: 0,
            devices: vec![None; MAX_DEVICES],
        }
    }
}

impl PciRoot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Plugs `transport` in at device number `slot`.
    pub fn plug(&mut self, slot: PciSlot, transport: Arc<Mutex<PciTransport>>) {
        // A PciSlot is always below MAX_DEVICES, and handed out once.
        if let Some(entry) = self.devices.get_mut(usize::from(slot.0)) {
            *entry = Some(transport);
        }
    }

    fn config_read(&self, device: usize, register: u64, data: &mut [u8]) {
        match device {
            0 => {
                let header = host_bridge_header();
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = header.get(register as usize + i).copied().unwrap_or(0);
                }
            }
            n => match self.devices.get(n).and_then(Option::as_ref) {
                Some(transport) => transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .config_read(register, data),
                // No device: the read of a vendor ID gives all-ones, which ends the scan.
                None => data.fill(0xff),
            },
        }
    }

    fn config_write(&self, device: usize, register: u64, data: &[u8]) {
        if let Some(transport) = self.devices.get(device).and_then(Option::as_ref) {
            transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config_write(register, data);
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset + data.len() as u64 <= 8 => match decode(self.address) {
                Some((device, register)) => self.config_read(device, register + offset - 4, data),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 if offset + data.len() as u64 <= 8 => {
                if let Some((device, register)) = decode(self.address) {
                    self.config_write(device, register + offset - 4, data);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, device: u32, register: u32) {
        root.write(
            0,
            &(CONFIG_ENABLE | (device << 11) | register).to_le_bytes(),
        );
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        let mut id = [0u8; 4];
        root.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);
        select(&mut root, 0, 8);
        let mut class = [0u8; 4];
        root.read(4, &mut class);
        assert_eq!(class[3], 0x06);
        // Byte access inside the data window picks the right byte.
        let mut byte = [0u8; 1];
        root.read(7, &mut byte);
        assert_eq!(byte[0], 0x06);
        select(&mut root, 5, 0);
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4], "empty slot");
        // Disabled mechanism, other bus, other function: all-ones.
        root.write(0, &0u32.to_le_bytes());
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        root.write(0, &(CONFIG_ENABLE | (1 << 16)).to_le_bytes());
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        let mut address = [0u8; 4];
        root.read(0, &mut address);
        assert_eq!(u32::from_le_bytes(address), CONFIG_ENABLE | (1 << 16));
        // Odd sizes and offsets are ignored, not a panic.
        root.read(6, &mut [0u8; 4]);
        root.write(2, &[1, 2, 3]);
    }

    #[test]
    fn resources_are_handed_out_in_order_and_once() {
        let mut pci = PciAllocator::new();
        let first = pci.allocate(3).unwrap();
        let second = pci.allocate(2).unwrap();
        assert_eq!(
            (first.slot.number(), first.bar, first.first_gsi),
            (1, layout::PCI_MMIO_START, layout::IOAPIC_PINS)
        );
        assert_eq!(
            (second.slot.number(), second.bar, second.first_gsi),
            (
                2,
                layout::PCI_MMIO_START + BAR_SIZE,
                layout::IOAPIC_PINS + 3
            )
        );
        // The last MSI GSI still fits KVM's routing table with the default routes.
        assert_eq!(
            MSI_GSI_END + DEFAULT_ROUTE_COUNT,
            KVM_MAX_IRQ_ROUTES as u32,
            "routing table size"
        );
    }

    #[test]
    fn slots_run_out_with_a_clear_error() {
        let mut pci = PciAllocator::new();
        for slot in 1..MAX_DEVICES {
            assert_eq!(usize::from(pci.allocate(1).unwrap().slot.number()), slot);
        }
        let err = pci.allocate(1).unwrap_err();
        assert_eq!(err, AllocError::NoSlot);
        assert!(err.to_string().contains("31 device numbers"), "{err}");
    }

    #[test]
    fn bar_space_runs_out_with_a_clear_error() {
        let mut pci = PciAllocator::with_limits((0x1000, 0x3000), 0x1000, (24, 100));
        for bar in [0x1000, 0x2000, 0x3000] {
            assert_eq!(pci.allocate(1).unwrap().bar, bar);
        }
        let err = pci.allocate(1).unwrap_err();
        assert_eq!(
            err,
            AllocError::NoBarSpace {
                window: 0x3000,
                size: 0x1000
            }
        );
        assert_eq!(
            err.to_string(),
            "the PCI BAR window (0x3000 bytes) has no room for another 0x1000-byte BAR"
        );
        // A window at the very top of the address space is full, not an overflow.
        let mut top = PciAllocator::with_limits((u64::MAX - 0xfff, 0x1000), 0x2000, (24, 100));
        assert!(matches!(
            top.allocate(1),
            Err(AllocError::NoBarSpace { .. })
        ));
    }

    #[test]
    fn gsis_run_out_with_a_clear_error_and_a_refusal_takes_nothing() {
        let mut pci = PciAllocator::with_limits((0, 1 << 20), 0x1000, (24, 30));
        assert_eq!(pci.allocate(4).unwrap().first_gsi, 24);
        let err = pci.allocate(3).unwrap_err();
        assert_eq!(
            err,
            AllocError::NoGsi {
                wanted: 3,
                left: 2,
                total: 6
            }
        );
        assert_eq!(
            err.to_string(),
            "no GSIs left for 3 MSI-X vectors: 2 of the 6 MSI GSIs are free"
        );
        // The refused request took no slot, BAR or GSI: the next one gets what it would have.
        let next = pci.allocate(2).unwrap();
        assert_eq!(
            (next.slot.number(), next.bar, next.first_gsi),
            (2, 0x1000, 28)
        );
    }

    #[test]
    fn plugged_functions_answer_at_their_device_number() {
        #[derive(Debug)]
        struct NoMsi;
        impl pvm_virtio::MsiSink for NoMsi {
            fn update_vector(
                &self,
                _: u16,
                _: Option<pvm_virtio::MsiMessage>,
            ) -> std::io::Result<()> {
                Ok(())
            }
        }
        let memory =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 16)])
                .unwrap();
        let mut pci = PciAllocator::new();
        let mut root = PciRoot::new();
        let (first, second) = (pci.allocate(2).unwrap(), pci.allocate(2).unwrap());
        let transport = PciTransport::new(
            Box::new(pvm_virtio::Rng::new()),
            memory,
            second.bar,
            2,
            Arc::new(NoMsi),
        )
        .unwrap();
        root.plug(second.slot, Arc::new(Mutex::new(transport)));
        let mut id = [0u8; 4];
        // Device 1 was allocated but nothing plugged in: all-ones, as an empty slot.
        assert_eq!(first.slot.number(), 1);
        select(&mut root, 1, 0);
        root.read(4, &mut id);
        assert_eq!(id, [0xff; 4]);
        // Device 2 is the rng: Red Hat's virtio vendor ID, modern device ID 0x1040 + 4.
        select(&mut root, 2, 0);
        root.read(4, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x1044_1af4);
    }
}
