//! virtio-rng (entropy device): fills the guest's buffers from the host's getrandom(2).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};

use log::warn;
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::{Address, Bytes, GuestMemoryMmap};

use crate::chain::Chain;
use crate::device::{ActivateError, Activation, PauseError, VirtioDevice};
use crate::rate_limiter::RateLimit;
use crate::snapshot::{DeviceState, RestoreError, SavedDevice, SnapshotError};
use crate::worker::{ChainServer, SharedLimiter, SingleQueueHandler, WorkerSlot, feature};

pub const QUEUE_SIZE: u16 = 64;
/// The most entropy one chain receives, so a guest offering huge buffers cannot keep the worker
/// busy (the driver simply asks again).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
static NEXT_RNG_INDEX: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("getrandom failed: {0}")]
    GetRandom(io::Error),
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    worker: WorkerSlot<SingleQueueHandler<RandomServer>>,
    /// Kept here so the buckets outlive pauses and resets.
    limiter: SharedLimiter,
}

/// Fills request buffers with random bytes, for the device's worker.
struct RandomServer;

impl ChainServer for RandomServer {
    fn serve(&mut self, memory: &GuestMemoryMmap, chain: Chain<'_>) -> (u32, u64) {
        let written = handle_request(memory, chain);
        (written, u64::from(written))
    }

    fn data_bytes(&self, chain: &Chain<'_>) -> u64 {
        let writable = chain
            .clone()
            .filter(|d| d.is_write_only())
            .fold(0u64, |sum, d| sum.saturating_add(u64::from(d.len())));
        writable.min(MAX_BYTES_PER_REQUEST as u64)
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    pub fn new() -> Self {
        let index = NEXT_RNG_INDEX.fetch_add(1, Ordering::Relaxed);
        Rng {
            worker: WorkerSlot::new(format!("virtio-rng{index}")),
            limiter: SharedLimiter::new(RateLimit::default()),
        }
    }

    /// Hands out entropy no faster than `limit` allows: each request is one operation and the
    /// bytes it asks for (at most [`MAX_BYTES_PER_REQUEST`]).
    pub fn with_rate_limit(mut self, limit: RateLimit) -> Self {
        self.limiter = SharedLimiter::new(limit);
        self
    }

    /// The device's rate limit, if it has one.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.limiter.limit()
    }

    /// The device's rate limiter, whose limits may be changed while it runs.
    pub fn rate_limiter(&self) -> SharedLimiter {
        self.limiter.clone()
    }
}

const OFFERED_FEATURES: u64 = feature(VIRTIO_F_VERSION_1)
    | feature(VIRTIO_RING_F_EVENT_IDX)
    | feature(VIRTIO_RING_F_INDIRECT_DESC);

/// Fills `buf` from getrandom(2), retrying short reads and signals.
pub(crate) fn fill_random(buf: &mut [u8]) -> Result<(), RngError> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the valid, owned `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RngError::GetRandom(err));
        }
        done += n as usize;
    }
    Ok(())
}

/// Fills the device-writable descriptors of one chain (device-readable ones are ignored) with up
/// to [`MAX_BYTES_PER_REQUEST`] random bytes; returns the number of bytes written.
pub(crate) fn handle_request(mem: &GuestMemoryMmap, chain: Chain<'_>) -> u32 {
    let mut random = [0u8; 4096];
    let mut written = 0usize;
    for desc in chain.filter(|d| d.is_write_only()) {
        let mut offset = 0usize;
        let len = desc.len() as usize;
        while offset < len && written < MAX_BYTES_PER_REQUEST {
            let n = (len - offset)
                .min(random.len())
                .min(MAX_BYTES_PER_REQUEST - written);
            if let Err(e) = fill_random(&mut random[..n]) {
                warn!("virtio-rng: {e}");
                return written as u32;
            }
            let Some(addr) = desc.addr().checked_add(offset as u64) else {
                return written as u32;
            };
            crate::dirty::mark_guest(mem, addr, n);
            if mem.write_slice(&random[..n], addr).is_err() {
                // A buffer outside guest RAM: report what was filled so far.
                return written as u32;
            }
            offset += n;
            written += n;
        }
        if written >= MAX_BYTES_PER_REQUEST {
            break;
        }
    }
    written as u32
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        OFFERED_FEATURES
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let limiter = self.limiter.clone();
        self.worker
            .start(|| SingleQueueHandler::new(activation, RandomServer)?.with_limiter(limiter))
    }

    fn reset(&mut self) {
        self.worker.stop();
    }

    fn pause(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.pause()?)
    }

    fn resume(&mut self) -> Result<(), PauseError> {
        Ok(self.worker.resume()?)
    }

    fn save_state(&self) -> Result<SavedDevice, SnapshotError> {
        Ok(SavedDevice {
            state: DeviceState::Rng,
            queues: self.worker.saved_positions(VIRTIO_ID_RNG)?,
        })
    }

    fn restore(
        &mut self,
        activation: Option<Activation>,
        state: &DeviceState,
    ) -> Result<(), RestoreError> {
        if *state != DeviceState::Rng {
            return Err(RestoreError::DeviceKind {
                saved: state.kind(),
                here: "rng",
            });
        }
        if let Some(activation) = activation {
            let limiter = self.limiter.clone();
            self.worker.start_paused(|| {
                SingleQueueHandler::new(activation, RandomServer)?.with_limiter(limiter)
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use std::sync::Arc;

    use crate::testing::{
        RecordingInterrupt, TestQueue, activation, readable, test_memory, writable,
    };

    fn run(mem: &GuestMemoryMmap, descs: &[virtio_queue::desc::RawDescriptor]) -> u32 {
        use virtio_queue::QueueT;
        let tq = TestQueue::new(mem, 16);
        tq.add_chain(descs);
        let chain = tq.queue().pop_descriptor_chain(mem).unwrap();
        handle_request(mem, chain)
    }

    fn bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn fills_writable_descriptors_only() {
        let mem = test_memory();
        let used = run(
            &mem,
            &[
                readable(0x10_000, 64),
                writable(0x20_000, 256),
                writable(0x30_000, 5000),
            ],
        );
        assert_eq!(used, 5256);
        assert_eq!(
            bytes(&mem, 0x10_000, 64),
            vec![0; 64],
            "readable buffer touched"
        );
        // 256 random bytes being all zero has probability 2^-2048.
        assert_ne!(bytes(&mem, 0x20_000, 256), vec![0; 256]);
        assert_ne!(bytes(&mem, 0x30_000 + 4900, 100), vec![0; 100]);
    }

    #[test]
    fn random_bytes_mark_the_pages_they_fill() {
        let mem = test_memory();
        let log = crate::dirty::DirtyLog::track(&mem);
        let used = run(&mem, &[readable(0x10_000, 64), writable(0x20_ff0, 32)]);
        assert_eq!(used, 32);
        assert_eq!(crate::dirty::tests::pages(&log, 0), [0x20, 0x21]);
    }

    #[test]
    fn bounds_each_request() {
        let mem = test_memory();
        let used = run(&mem, &[writable(0x10_000, 0x10_0000)]);
        assert_eq!(used as usize, MAX_BYTES_PER_REQUEST);
        let past = MAX_BYTES_PER_REQUEST as u64 + 0x10_000;
        assert_eq!(bytes(&mem, past, 4096), vec![0; 4096]);
        // A 4 GiB - 1 descriptor gets the same 64 KiB; an empty one gets nothing.
        assert_eq!(
            run(&mem, &[writable(0x10_000, u32::MAX)]) as usize,
            MAX_BYTES_PER_REQUEST
        );
        assert_eq!(run(&mem, &[writable(0x10_000, 0)]), 0);
    }

    #[test]
    fn buffers_outside_memory_are_cut_short() {
        let mem = test_memory();
        assert_eq!(run(&mem, &[writable(0x40_0000_0000, 64)]), 0);
        assert_eq!(run(&mem, &[writable(0xff_fff0, 64)]), 0);
        assert_eq!(run(&mem, &[readable(0x10_000, 16)]), 0);
    }

    #[test]
    fn worker_fills_after_kick_and_reactivates() {
        let mem = test_memory();
        let mut rng = Rng::new();
        for ring in [0u64, 0x8000] {
            let tq = TestQueue::at(&mem, GuestAddress(ring), 16);
            let active = tq.active_queue(0);
            let kick = active.kick.try_clone().unwrap();
            let interrupt = Arc::new(RecordingInterrupt::default());
            let features = rng.features();
            rng.activate(activation(&mem, &interrupt, vec![active], features))
                .unwrap();
            tq.add_chain(&[writable(0x50_000, 32)]);
            kick.write(1).unwrap();
            assert!(interrupt.wait_for(0, 1));
            assert_eq!(tq.used(&mem), vec![(0, 32)]);
            rng.reset();
        }
    }

    #[test]
    fn a_limited_device_hands_out_entropy_at_its_rate() {
        use std::time::{Duration, Instant};

        use crate::rate_limiter::BucketConfig;

        // 30 kB/s with a 3 kB bucket: 60 requests of 1000 bytes need (60 - 3) / 30 s.
        let limit = RateLimit {
            bandwidth: Some(BucketConfig {
                size: 3000,
                one_time_burst: 0,
                refill_time: Duration::from_millis(100),
            }),
            ops: None,
        };
        let mem = test_memory();
        let mut rng = Rng::new().with_rate_limit(limit);
        assert_eq!(rng.rate_limit(), Some(limit));
        // At most 128 entries: MockSplitQueue's used ring overlaps the rest of the avail ring.
        let tq = TestQueue::new(&mem, 256);
        let active = tq.active_queue(0);
        let kick = active.kick.try_clone().unwrap();
        let interrupt = Arc::new(RecordingInterrupt::default());
        rng.activate(activation(&mem, &interrupt, vec![active], OFFERED_FEATURES))
            .unwrap();
        tq.add_chain(&[writable(0x20_000, 1000)]);
        for _ in 1..60 {
            tq.publish(&mem, 0);
        }
        let start = Instant::now();
        kick.write(1).unwrap();
        while tq.used(&mem).len() < 60 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let elapsed = start.elapsed();
        assert_eq!(tq.used(&mem), vec![(0, 1000); 60]);
        crate::testing::assert_within_5_percent(elapsed, Duration::from_millis(1900));
        rng.reset();
    }
}
