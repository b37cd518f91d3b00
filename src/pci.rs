//! The PCI root: configuration mechanism #1 (ports 0xcf8-0xcff) on bus 0, a host bridge at
//! 00:00.0 and the virtio-pci transports at 00:01.0 onwards. BARs are assigned by pvm (there
//! is no firmware) and live on the MMIO bus; see `virtio_devices`.

use std::sync::{Arc, Mutex};

use pvm_virtio::PciTransport;

use crate::bus::BusDevice;

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

/// Bus 0: the host bridge and the virtio-pci functions.
#[derive(Default)]
pub struct PciRoot {
    address: u32,
    devices: Vec<Arc<Mutex<PciTransport>>>,
}

impl PciRoot {
    pub fn new() -> Self {
        Self::default()
    }

    /// Plugs `transport` in at the next free device number; returns it.
    pub fn add(&mut self, transport: Arc<Mutex<PciTransport>>) -> Option<usize> {
        if self.devices.len() + 1 >= MAX_DEVICES {
            return None;
        }
        self.devices.push(transport);
        Some(self.devices.len())
    }

    fn config_read(&self, device: usize, register: u64, data: &mut [u8]) {
        match device {
            0 => {
                let header = host_bridge_header();
                for (i, byte) in data.iter_mut().enumerate() {
                    *byte = header.get(register as usize + i).copied().unwrap_or(0);
                }
            }
            n => match self.devices.get(n - 1) {
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
        if let Some(transport) = device.checked_sub(1).and_then(|n| self.devices.get(n)) {
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
}
