//! The virtio_pci_common_cfg registers (spec 4.1.4.3) in BAR0: feature negotiation, status,
//! MSI-X vector mapping and queue configuration.
//!
//! Every field must be accessed with its own width (spec 4.1.3.1); 64-bit fields also as two
//! 32-bit halves, the way Linux writes them. Any other access reads zero and writes nothing.

use log::debug;

use super::msix::{PciInterrupt, VIRTIO_MSI_NO_VECTOR};
use crate::transport::{QueueRegisters, VirtioCore, set_high_half, set_low_half};

const DEVICE_FEATURE_SELECT: u64 = 0x00;
const DEVICE_FEATURE: u64 = 0x04;
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const CONFIG_MSIX_VECTOR: u64 = 0x10;
const NUM_QUEUES: u64 = 0x12;
const DEVICE_STATUS: u64 = 0x14;
const CONFIG_GENERATION: u64 = 0x15;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_MSIX_VECTOR: u64 = 0x1a;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// Only meaningful with VIRTIO_F_NOTIF_CONFIG_DATA / VIRTIO_F_RING_RESET, which this
/// transport does not implement: read as zero, writes ignored.
const QUEUE_NOTIFY_DATA: u64 = 0x38;
const QUEUE_RESET: u64 = 0x3a;

/// Which 64-bit queue address field a register offset falls in.
fn queue_address(queue: &mut QueueRegisters, field: u64) -> Option<&mut u64> {
    match field {
        QUEUE_DESC => Some(&mut queue.desc_table),
        QUEUE_DRIVER => Some(&mut queue.avail_ring),
        QUEUE_DEVICE => Some(&mut queue.used_ring),
        _ => None,
    }
}

/// The whole 64-bit field, its low half or its high half, as the access selects.
fn part_of_u64(value: u64, offset_in_field: u64, len: usize) -> Option<u64> {
    match (offset_in_field, len) {
        (0, 8) => Some(value),
        (0, 4) => Some(value & 0xffff_ffff),
        (4, 4) => Some(value >> 32),
        _ => None,
    }
}

pub fn read(core: &VirtioCore, interrupt: &PciInterrupt, offset: u64, data: &mut [u8]) {
    data.fill(0);
    match read_register(core, interrupt, offset, data.len()) {
        Some(value) => data.copy_from_slice(&value.to_le_bytes()[..data.len()]),
        None => debug!(
            "virtio-pci: {}-byte common config read at {offset:#x} ignored",
            data.len()
        ),
    }
}

fn read_register(
    core: &VirtioCore,
    interrupt: &PciInterrupt,
    offset: u64,
    len: usize,
) -> Option<u64> {
    let queue = core.selected_queue();
    let value = match (offset, len) {
        (DEVICE_FEATURE_SELECT, 4) => core.device_features_select().into(),
        (DEVICE_FEATURE, 4) => core.device_features_half().into(),
        (DRIVER_FEATURE_SELECT, 4) => core.driver_features_select().into(),
        (DRIVER_FEATURE, 4) => core.driver_features_half().into(),
        (CONFIG_MSIX_VECTOR, 2) => interrupt.msix().config_vector().into(),
        // At most MAX_QUEUES, checked at construction.
        (NUM_QUEUES, 2) => core.num_queues() as u64,
        (DEVICE_STATUS, 1) => core.status().into(),
        // The register is 8 bits wide; it only has to change, wrapping is fine.
        (CONFIG_GENERATION, 1) => u64::from(interrupt.config_generation() as u8),
        (QUEUE_SELECT, 2) => core.queue_select().into(),
        // Size 0 tells the driver the selected queue does not exist.
        (QUEUE_SIZE, 2) => queue.map_or(0, |q| q.size.into()),
        (QUEUE_MSIX_VECTOR, 2) => match queue {
            Some(_) => interrupt.msix().queue_vector(core.queue_select()).into(),
            None => VIRTIO_MSI_NO_VECTOR.into(),
        },
        (QUEUE_ENABLE, 2) => queue.map_or(0, |q| q.ready.into()),
        (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| core.queue_select().into()),
        (QUEUE_NOTIFY_DATA | QUEUE_RESET, 2) => 0,
        _ => {
            let field = offset & !7;
            let mut registers = *queue?;
            let value = *queue_address(&mut registers, field)?;
            part_of_u64(value, offset - field, len)?
        }
    };
    Some(value)
}

pub fn write(core: &mut VirtioCore, interrupt: &PciInterrupt, offset: u64, data: &[u8]) {
    let mut bytes = [0u8; 8];
    let Some(prefix) = bytes.get_mut(..data.len()) else {
        debug!(
            "virtio-pci: {}-byte common config write at {offset:#x} ignored",
            data.len()
        );
        return;
    };
    prefix.copy_from_slice(data);
    let value = u64::from_le_bytes(bytes);
    // Each arm matches the field's exact width, so the narrowing casts below are lossless.
    match (offset, data.len()) {
        (DEVICE_FEATURE_SELECT, 4) => core.set_device_features_select(value as u32),
        (DRIVER_FEATURE_SELECT, 4) => core.set_driver_features_select(value as u32),
        (DRIVER_FEATURE, 4) => core.write_driver_features_half(value as u32),
        (CONFIG_MSIX_VECTOR, 2) => interrupt.msix().set_config_vector(value as u16),
        (DEVICE_STATUS, 1) => {
            if core.write_status(value as u8) {
                interrupt.reset();
            }
        }
        (QUEUE_SELECT, 2) => core.set_queue_select(value as u16),
        (QUEUE_SIZE, 2) => {
            if let Some(queue) = core.selected_queue_mut() {
                queue.size = value as u16;
            }
        }
        (QUEUE_MSIX_VECTOR, 2) => interrupt
            .msix()
            .set_queue_vector(core.queue_select(), value as u16),
        (QUEUE_ENABLE, 2) => match (value, core.selected_queue_mut()) {
            (1, Some(queue)) => queue.ready = true,
            // Drivers must not write 0 (spec 4.1.4.3.2); disabling is done by reset.
            _ => debug!("virtio-pci: queue_enable {value:#x} ignored"),
        },
        _ => write_queue_address(core, offset, data.len(), value),
    }
}

fn write_queue_address(core: &mut VirtioCore, offset: u64, len: usize, value: u64) {
    let field = offset & !7;
    let part = (offset - field, len);
    if !matches!(part, (0, 8) | (0, 4) | (4, 4))
        || !matches!(field, QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE)
    {
        debug!("virtio-pci: {len}-byte common config write at {offset:#x} ignored");
        return;
    }
    let Some(register) = core
        .selected_queue_mut()
        .and_then(|queue| queue_address(queue, field))
    else {
        return;
    };
    match part {
        (0, 8) => *register = value,
        (0, _) => set_low_half(register, value as u32),
        _ => set_high_half(register, value as u32),
    }
}
