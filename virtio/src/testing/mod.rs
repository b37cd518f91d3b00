//! Test helpers for everything that drives pvm's virtio devices without a guest: this crate's
//! unit tests and benches, pvm-vhost-user's tests and the fuzz targets. Built for this crate's
//! own tests and with the `testing` feature, which only dev-dependencies (and fuzz/) enable, so
//! no shipped binary carries it.
//!
//! - [`TestQueue`]: the driver's side of a split virtqueue in guest memory.
//! - [`RecordingInterrupt`] (counts notifications) and [`EventInterrupt`] (an eventfd per
//!   queue, as KVM irqfds), the two ways a test sees what a device signalled.
//! - [`FakeDevice`] and its register-level helpers, for the transports' tests.
//! - Guest memory, descriptors, [`eventually`].

mod interrupt;
mod queue;
mod transport;

use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

pub use interrupt::{EventInterrupt, RecordingInterrupt, WAIT_TIMEOUT};
pub use queue::{RingAddresses, TestQueue};
pub use transport::{
    DeviceLog, FAKE_CONFIG_LEN, FAKE_DEVICE_TYPE, FAKE_FEATURES, FakeDevice, Lcg, SeenQueue,
    SharedLog, expected_queue, ring_addresses,
};

/// Guest RAM for tests: 16 MiB at address 0. Queues live at the bottom, buffers above 64 KiB.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)])
        .expect("16 MiB of test memory")
}

/// A device-readable descriptor (the chain links are filled in by [`TestQueue::add_chain`]).
pub fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// `desc` with its NEXT flag set, pointing at `next`: for hand-made (e.g. looping) chains.
pub fn looped(desc: RawDescriptor, next: u16) -> RawDescriptor {
    let d = SplitDescriptor::from(desc);
    RawDescriptor::from(SplitDescriptor::new(
        d.addr().raw_value(),
        d.len(),
        d.flags() | VRING_DESC_F_NEXT as u16,
        next,
    ))
}

/// Polls `cond` for up to two seconds.
pub fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// What a transport hands a device at DRIVER_OK, for tests that activate devices directly.
pub fn activation(
    mem: &GuestMemoryMmap,
    interrupt: &std::sync::Arc<RecordingInterrupt>,
    queues: Vec<crate::device::ActiveQueue>,
    features: u64,
) -> crate::device::Activation {
    crate::device::Activation {
        memory: mem.clone(),
        interrupt: interrupt.clone(),
        queues,
        features,
    }
}

/// `queues` (queue 0 first) as a restored device gets them: at the positions a snapshot saved.
pub fn restored_queues<'q>(
    queues: impl IntoIterator<Item = &'q TestQueue>,
    saved: &[crate::snapshot::QueuePosition],
) -> Vec<crate::device::ActiveQueue> {
    use virtio_queue::QueueT;
    (0u16..)
        .zip(queues)
        .map(|(index, tq)| {
            let mut active = tq.active_queue(index);
            let position = saved
                .iter()
                .find(|p| p.index == index)
                .expect("a saved position per queue");
            active.queue.set_next_avail(position.next_avail);
            active
                .queue
                .set_next_used(position.next_used.expect("a used index"));
            active
        })
        .collect()
}

/// A writer the test keeps a handle to (a console's output).
#[derive(Clone, Default)]
pub struct SharedWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedWriter {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().expect("writer lock").clone()
    }
}

impl std::io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("writer lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// For rate-limit tests: `elapsed` is within 5% of what the limit allows.
pub fn assert_within_5_percent(elapsed: Duration, expected: Duration) {
    let (e, x) = (elapsed.as_secs_f64(), expected.as_secs_f64());
    assert!(
        (e - x).abs() <= 0.05 * x,
        "took {elapsed:?}, the limit allows {expected:?}"
    );
}
