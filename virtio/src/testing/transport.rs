//! For the mmio and pci transports' tests: a fake device that records what the transport does
//! to it, the ring addresses a test driver configures, and a tiny deterministic random generator.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;

use crate::data_plane::DataPlaneError;
use crate::device::{ActivateError, Activation, ActiveQueue, Interrupt, PauseError, VirtioDevice};

/// The fake device's type: an entropy source, so nothing real matches it by accident.
pub const FAKE_DEVICE_TYPE: u32 = 4;
pub const FAKE_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;
pub const FAKE_CONFIG_LEN: usize = 16;

/// One queue as the device received it at activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenQueue {
    pub index: u16,
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub event_idx: bool,
}

/// Everything the transport did to the device.
#[derive(Debug, Default)]
pub struct DeviceLog {
    pub activations: Vec<Vec<SeenQueue>>,
    pub resets: usize,
    pub pauses: usize,
    pub resumes: usize,
    /// The features of the latest activation.
    pub acked_features: Option<u64>,
    /// The queues of the latest activation, kept so tests can check their kick eventfds.
    pub active_queues: Vec<ActiveQueue>,
    pub interrupt: Option<Arc<dyn Interrupt>>,
}

#[derive(Debug)]
pub struct FakeDevice {
    log: Arc<Mutex<DeviceLog>>,
    max_sizes: Vec<u16>,
    config: [u8; FAKE_CONFIG_LEN],
    refuse_activation: bool,
}

impl FakeDevice {
    pub fn new(max_sizes: &[u16]) -> (Self, SharedLog) {
        let log = Arc::new(Mutex::new(DeviceLog::default()));
        let mut config = [0u8; FAKE_CONFIG_LEN];
        for (byte, value) in config.iter_mut().zip(0xa0u8..) {
            *byte = value;
        }
        let device = FakeDevice {
            log: log.clone(),
            max_sizes: max_sizes.to_vec(),
            config,
            refuse_activation: false,
        };
        (device, SharedLog(log))
    }

    /// A device whose `activate` always fails, as a backend error would.
    pub fn refusing(max_sizes: &[u16]) -> (Self, SharedLog) {
        let (mut device, log) = Self::new(max_sizes);
        device.refuse_activation = true;
        (device, log)
    }
}

/// The test's handle on the device log.
#[derive(Debug, Clone)]
pub struct SharedLog(Arc<Mutex<DeviceLog>>);

impl SharedLog {
    pub fn get(&self) -> MutexGuard<'_, DeviceLog> {
        self.0.lock().unwrap()
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        FAKE_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn features(&self) -> u64 {
        FAKE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let index = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = index.and_then(|i| self.config.get(i)).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let index = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            if let Some(slot) = index.and_then(|i| self.config.get_mut(i)) {
                *slot = *byte;
            }
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        if self.refuse_activation {
            return Err(ActivateError::DataPlane(DataPlaneError::CannotToggle(
                "refused by the test",
            )));
        }
        let Activation {
            interrupt,
            queues,
            features,
            ..
        } = activation;
        let mut log = self.log.lock().unwrap();
        log.acked_features = Some(features);
        let seen = queues
            .iter()
            .map(|q| SeenQueue {
                index: q.index,
                size: q.queue.size(),
                desc_table: q.queue.desc_table(),
                avail_ring: q.queue.avail_ring(),
                used_ring: q.queue.used_ring(),
                event_idx: q.queue.event_idx_enabled(),
            })
            .collect();
        log.activations.push(seen);
        log.active_queues = queues;
        log.interrupt = Some(interrupt);
        Ok(())
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        self.log.lock().unwrap().pauses += 1;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        self.log.lock().unwrap().resumes += 1;
        Ok(())
    }

    fn reset(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.active_queues.clear();
        log.interrupt = None;
    }
}

/// Ring addresses for queue `index` that lie inside [`test_memory`](super::test_memory) and are
/// well aligned.
pub fn ring_addresses(index: u16) -> (u64, u64, u64) {
    let base = 0x1_0000 * (u64::from(index) + 1);
    (base, base + 0x4000, base + 0x8000)
}

/// What the device should see of queue `index` once a driver configured it with `size` at
/// [`ring_addresses`] and acked EVENT_IDX.
pub fn expected_queue(index: u16, size: u16) -> SeenQueue {
    let (desc_table, avail_ring, used_ring) = ring_addresses(index);
    SeenQueue {
        index,
        size,
        desc_table,
        avail_ring,
        used_ring,
        event_idx: true,
    }
}

/// A linear congruential generator: deterministic garbage without another crate.
#[derive(Debug)]
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 16
    }

    /// A value in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}
