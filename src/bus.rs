//! Port I/O and MMIO buses: address ranges mapped to devices. Built before the vCPUs start and
//! then shared read-only, so the exit path takes only the one device's own lock.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// Non-overlapping ranges, each with its device.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, Shared)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, (l, _))| (b, l)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: Shared) -> Result<(), Error> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(Error::BadRange { base, len })?;
        if let Some((&other, _)) = self
            .ranges
            .range(..end)
            .next_back()
            .filter(|(b, (l, _))| **b + *l > base)
        {
            return Err(Error::Overlap { base, len, other });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device covering the whole access `[addr, addr + size)`, and the offset into it.
    fn find(&self, addr: u64, size: usize) -> Option<(&Shared, u64)> {
        let (base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((device, offset))
    }

    /// Reads from the device at `addr`; false (and `data` untouched) if none is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if none is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        assert!(matches!(
            bus.insert(0x3fc, 8, a.clone()),
            Err(Error::Overlap { other: 0x3f8, .. })
        ));
        assert!(matches!(
            bus.insert(0x3f0, 9, a.clone()),
            Err(Error::Overlap { .. })
        ));
        bus.insert(0x3f0, 8, a.clone()).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX, 2, a.clone()),
            Err(Error::BadRange { .. })
        ));
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fa, &mut buf));
        assert_eq!(buf, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert!(!bus.write(0x400, &[9]));
        assert!(
            !bus.read(0x3ff, &mut [0u8; 2]),
            "access running past the device"
        );
        assert_eq!(a.lock().unwrap().writes, vec![(7, vec![9])]);
    }
}
