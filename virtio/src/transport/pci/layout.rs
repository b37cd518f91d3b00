//! Where everything lives in BAR0. Fixed, so the VMM can allocate every virtio-pci BAR the same
//! way: [`BAR_SIZE`] bytes, naturally aligned. Each region starts on its own 4 KiB page so a
//! guest can map them separately.

/// virtio_pci_common_cfg, including the virtio 1.2 queue_notify_data and queue_reset fields.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
pub const COMMON_CFG_LEN: u32 = 0x3c;
/// The ISR status byte (read to clear), padded to a dword.
pub const ISR_OFFSET: u64 = 0x1000;
pub const ISR_LEN: u32 = 4;
/// The device-specific configuration space.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u32 = 0x1000;
/// Queue notifications: queue `n` is notified by a write at NOTIFY_OFFSET + n * 4
/// (queue_notify_off = n, notify_off_multiplier = 4), so each queue has its own address and the
/// VMM's ioeventfds need no datamatch.
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// The notify page holds this many queues.
pub const MAX_QUEUES: usize = 0x1000 / NOTIFY_OFF_MULTIPLIER as usize;
/// The MSI-X table, 16 bytes per vector.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// The largest table MSI-X allows (11-bit table size field).
pub const MAX_MSIX_VECTORS: u16 = 2048;
/// The MSI-X pending bit array, one bit per vector.
pub const MSIX_PBA_OFFSET: u64 =
    MSIX_TABLE_OFFSET + MAX_MSIX_VECTORS as u64 * MSIX_TABLE_ENTRY_SIZE;
/// The whole BAR: a power of two, as BAR sizing requires.
pub const BAR_SIZE: u64 = 0x1_0000;

const _: () = assert!(MSIX_PBA_OFFSET + MAX_MSIX_VECTORS as u64 / 8 <= BAR_SIZE);
const _: () = assert!(BAR_SIZE.is_power_of_two());
