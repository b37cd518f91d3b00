//! The PCI configuration space of a virtio-pci function: a type-0 header, one 32-bit memory BAR
//! and the capability list (virtio vendor capabilities, spec 4.1.4, and MSI-X).
//!
//! The space is a byte array plus a per-byte write mask, so read-only fields, BAR sizing
//! (writing all-ones reads back the size mask) and the few writable capability fields all fall
//! out of one rule. The transport reacts to the writes that have side effects (MSI-X control,
//! the VIRTIO_PCI_CAP_PCI_CFG window).

use crate::snapshot::RestoreError;

use super::layout::{
    BAR_SIZE, COMMON_CFG_LEN, COMMON_CFG_OFFSET, DEVICE_CFG_LEN, DEVICE_CFG_OFFSET, ISR_LEN,
    ISR_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_OFF_MULTIPLIER, NOTIFY_OFFSET,
};

/// The conventional configuration space; the PCIe extended part reads as zero (no extended
/// capabilities).
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Accesses are accepted up to the extended size so ECAM reads past 256 bytes see zeros.
pub const EXTENDED_CONFIG_SPACE_SIZE: u64 = 4096;

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern (non-transitional) devices are 0x1040 + the virtio device type (spec 4.1.2).
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
const VIRTIO_PCI_REVISION: u8 = 1;

const VENDOR_ID: usize = 0x00;
const DEVICE_ID: usize = 0x02;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const REVISION: usize = 0x08;
const CLASS_CODE: usize = 0x09;
const CACHE_LINE_SIZE: usize = 0x0c;
const LATENCY_TIMER: usize = 0x0d;
pub const BAR0: usize = 0x10;
const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
const SUBSYSTEM_ID: usize = 0x2e;
const CAPABILITIES_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;

/// Command register bits a driver may set: I/O and memory decode, bus master, parity and SERR
/// reporting, INTx disable. The rest are hardwired to zero.
const COMMAND_WRITABLE: u16 = 0x0547;
const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// BAR0's low nibble: 32-bit, non-prefetchable memory. Hardwired.
const BAR_TYPE_BITS: u32 = 0xf;

const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// virtio_pci_cap.cfg_type values (spec 4.1.4).
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// The capability list, in order. Each virtio capability is a virtio_pci_cap (16 bytes);
/// notify and pci_cfg append one dword.
pub const COMMON_CAP: usize = 0x40;
pub const NOTIFY_CAP: usize = 0x50;
pub const ISR_CAP: usize = 0x64;
pub const DEVICE_CAP: usize = 0x74;
pub const PCI_CFG_CAP: usize = 0x84;
pub const MSIX_CAP: usize = 0x98;

/// Offsets inside a virtio_pci_cap.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
/// notify_off_multiplier in the notify capability, pci_cfg_data in the pci_cfg capability.
const CAP_EXTRA_DWORD: usize = 16;

/// The MSI-X Message Control register inside the MSI-X capability.
pub const MSIX_CONTROL: usize = MSIX_CAP + 2;
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;

/// pci_cfg_data: accesses here are forwarded to BAR0 (spec 4.1.4.9).
pub const PCI_CFG_DATA: usize = PCI_CFG_CAP + CAP_EXTRA_DWORD;

/// A BAR access requested through the VIRTIO_PCI_CAP_PCI_CFG window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciCfgWindow {
    pub offset: u64,
    pub len: usize,
}

/// The PCI class code (class, subclass, prog-if) for a virtio device type. Drivers match on
/// vendor/device id; the class only makes `lspci` and firmware menus readable.
fn class_code(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_00_00, // network controller, ethernet
        2 => 0x01_80_00, // mass storage, other
        3 => 0x07_80_00, // communication, other
        _ => 0xff_00_00, // unassigned class
    }
}

#[derive(Debug, Clone)]
pub struct PciConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    writable: [u8; CONFIG_SPACE_SIZE],
}

impl PciConfigSpace {
    /// `device_type` < 0x40 (checked by the transport), `bar_address` aligned to [`BAR_SIZE`]
    /// and below 4 GiB, `num_queues` and `msix_vectors` within the layout's limits.
    pub fn new(device_type: u16, bar_address: u32, num_queues: u16, msix_vectors: u16) -> Self {
        let mut space = PciConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            writable: [0; CONFIG_SPACE_SIZE],
        };
        let device_id = VIRTIO_PCI_DEVICE_ID_BASE + device_type;
        space.set_u16(VENDOR_ID, VIRTIO_PCI_VENDOR_ID);
        space.set_u16(DEVICE_ID, device_id);
        space.set_u16(STATUS, STATUS_CAPABILITIES_LIST);
        space.bytes[REVISION] = VIRTIO_PCI_REVISION;
        let class = class_code(device_type.into()).to_le_bytes();
        space.bytes[CLASS_CODE..CLASS_CODE + 3].copy_from_slice(&class[..3]);
        // Subsystem ids of non-transitional devices should be >= 0x40 (spec 4.1.2.1).
        space.set_u16(SUBSYSTEM_VENDOR_ID, VIRTIO_PCI_VENDOR_ID);
        space.set_u16(SUBSYSTEM_ID, device_id);
        space.set_u32(BAR0, bar_address);
        space.bytes[CAPABILITIES_POINTER] = COMMON_CAP as u8;

        space.allow_writes(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        space.allow_writes(CACHE_LINE_SIZE, &[0xff]);
        space.allow_writes(LATENCY_TIMER, &[0xff]);
        space.allow_writes(INTERRUPT_LINE, &[0xff]);
        // BAR sizing: only the address bits above the size stick, so all-ones reads back as
        // the size mask (PCI local bus spec 6.2.5.1).
        let bar_mask = !(BAR_SIZE as u32 - 1) & !BAR_TYPE_BITS;
        space.allow_writes(BAR0, &bar_mask.to_le_bytes());

        let notify_len = u32::from(num_queues.max(1)) * NOTIFY_OFF_MULTIPLIER;
        space.add_virtio_cap(
            COMMON_CAP,
            NOTIFY_CAP,
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CFG_OFFSET,
            COMMON_CFG_LEN,
        );
        space.add_virtio_cap(
            NOTIFY_CAP,
            ISR_CAP,
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_len,
        );
        space.set_u32(NOTIFY_CAP + CAP_EXTRA_DWORD, NOTIFY_OFF_MULTIPLIER);
        space.add_virtio_cap(
            ISR_CAP,
            DEVICE_CAP,
            VIRTIO_PCI_CAP_ISR_CFG,
            ISR_OFFSET,
            ISR_LEN,
        );
        space.add_virtio_cap(
            DEVICE_CAP,
            PCI_CFG_CAP,
            VIRTIO_PCI_CAP_DEVICE_CFG,
            DEVICE_CFG_OFFSET,
            DEVICE_CFG_LEN,
        );
        // The pci_cfg window's bar/offset/length/data are the driver's to program.
        space.add_virtio_cap(PCI_CFG_CAP, MSIX_CAP, VIRTIO_PCI_CAP_PCI_CFG, 0, 0);
        space.allow_writes(PCI_CFG_CAP + CAP_BAR, &[0xff]);
        space.allow_writes(PCI_CFG_CAP + CAP_OFFSET, &[0xff; 12]);

        space.bytes[MSIX_CAP] = CAP_ID_MSIX;
        space.bytes[MSIX_CAP + 1] = 0; // end of the list
        space.set_u16(MSIX_CONTROL, msix_vectors - 1);
        space.allow_writes(
            MSIX_CONTROL,
            &(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK).to_le_bytes(),
        );
        // Table and PBA both live in BAR0 (BIR 0 in the low three bits).
        space.set_u32(MSIX_CAP + 4, MSIX_TABLE_OFFSET as u32);
        space.set_u32(MSIX_CAP + 8, MSIX_PBA_OFFSET as u32);
        space
    }

    fn add_virtio_cap(&mut self, at: usize, next: usize, cfg_type: u8, offset: u64, length: u32) {
        let cap_len = if matches!(cfg_type, VIRTIO_PCI_CAP_NOTIFY_CFG | VIRTIO_PCI_CAP_PCI_CFG) {
            20
        } else {
            16
        };
        self.bytes[at..at + 4].copy_from_slice(&[CAP_ID_VENDOR, next as u8, cap_len, cfg_type]);
        self.bytes[at + CAP_BAR] = 0;
        self.set_u32(at + CAP_OFFSET, offset as u32);
        self.set_u32(at + CAP_LENGTH, length);
    }

    fn allow_writes(&mut self, at: usize, mask: &[u8]) {
        self.writable[at..at + mask.len()].copy_from_slice(mask);
    }

    fn set_u16(&mut self, at: usize, value: u16) {
        self.bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
    }

    fn set_u32(&mut self, at: usize, value: u32) {
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.bytes[at], self.bytes[at + 1]])
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
            self.bytes[at + 2],
            self.bytes[at + 3],
        ])
    }

    /// The byte range an access covers inside the conventional space, if it is one the
    /// hardware would issue: 1, 2 or 4 bytes within one dword. `None` for anything else.
    pub fn access_range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::try_from(offset).ok()?;
        let aligned = matches!(len, 1 | 2 | 4) && start % 4 + len <= 4;
        (aligned && start < CONFIG_SPACE_SIZE).then(|| start..start + len)
    }

    pub fn read(&self, range: std::ops::Range<usize>, data: &mut [u8]) {
        data.copy_from_slice(&self.bytes[range]);
    }

    /// Applies a write through the write mask: read-only bits keep their value.
    pub fn write(&mut self, range: std::ops::Range<usize>, data: &[u8]) {
        for (index, &value) in range.zip(data) {
            let mask = self.writable[index];
            self.bytes[index] = (self.bytes[index] & !mask) | (value & mask);
        }
    }

    /// BAR0 as the guest programmed it (during sizing: the size mask).
    pub fn bar_address(&self) -> u64 {
        u64::from(self.u32_at(BAR0) & !BAR_TYPE_BITS)
    }

    pub fn msix_control(&self) -> u16 {
        self.u16_at(MSIX_CONTROL)
    }

    /// The BAR access the pci_cfg capability describes, if it is a valid one (spec 4.1.4.9.1:
    /// BAR0, length 1, 2 or 4, offset aligned to the length).
    pub fn pci_cfg_window(&self) -> Option<PciCfgWindow> {
        let bar = self.bytes[PCI_CFG_CAP + CAP_BAR];
        let offset = u64::from(self.u32_at(PCI_CFG_CAP + CAP_OFFSET));
        let len = self.u32_at(PCI_CFG_CAP + CAP_LENGTH);
        let valid = bar == 0 && matches!(len, 1 | 2 | 4) && offset % u64::from(len) == 0;
        valid.then_some(PciCfgWindow {
            offset,
            len: len as usize,
        })
    }

    pub fn pci_cfg_data(&self) -> [u8; 4] {
        self.u32_at(PCI_CFG_DATA).to_le_bytes()
    }

    /// Stores what a forwarded BAR read returned, for the driver to read from pci_cfg_data.
    pub fn set_pci_cfg_data(&mut self, data: [u8; 4]) {
        self.bytes[PCI_CFG_DATA..PCI_CFG_DATA + 4].copy_from_slice(&data);
    }

    /// The whole conventional space, for a snapshot.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Checks a saved space against this fresh one: the same size, and every bit the guest
    /// cannot write as it is here (ids, capabilities, the MSI-X table size, BAR0's type).
    pub fn check_saved(&self, saved: &[u8]) -> Result<(), RestoreError> {
        if saved.len() != CONFIG_SPACE_SIZE {
            return Err(RestoreError::ConfigSpaceLength {
                len: saved.len(),
                want: CONFIG_SPACE_SIZE,
            });
        }
        let fixed = |offset: usize| !self.writable[offset];
        match (0..CONFIG_SPACE_SIZE).find(|&o| (saved[o] ^ self.bytes[o]) & fixed(o) != 0) {
            Some(offset) => Err(RestoreError::ConfigSpaceByte {
                offset,
                saved: saved[offset],
                here: self.bytes[offset],
            }),
            None => Ok(()),
        }
    }

    /// Takes a space [`Self::check_saved`] accepted.
    pub fn restore(&mut self, saved: &[u8]) {
        self.bytes.copy_from_slice(saved);
    }
}
