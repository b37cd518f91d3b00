//! Test helpers: guest memory, a driver-side queue built on virtio-queue's MockSplitQueue, and an
//! Interrupt that records what the device signalled.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::device::{ActiveQueue, Interrupt};
use crate::worker::DeviceQueue;

/// Guest RAM for tests: 16 MiB at address 0. Queues live at the bottom, buffers above 64 KiB.
pub(crate) fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

/// A device-readable descriptor (the chain links are filled in by [`TestQueue::add_chain`]).
pub(crate) fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// A device-writable descriptor.
pub(crate) fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// `desc` with its NEXT flag set, pointing at `next`: for hand-made (e.g. looping) chains.
pub(crate) fn looped(desc: RawDescriptor, next: u16) -> RawDescriptor {
    let d = SplitDescriptor::from(desc);
    RawDescriptor::from(SplitDescriptor::new(
        d.addr().raw_value(),
        d.len(),
        d.flags() | VRING_DESC_F_NEXT as u16,
        next,
    ))
}

/// Where a driver put one queue, as it tells the transport.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueLayout {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
}

/// The driver's side of one split queue.
pub(crate) struct TestQueue<'m> {
    mock: MockSplitQueue<'m, GuestMemoryMmap>,
    size: u16,
    next_desc: Cell<u16>,
}

impl<'m> TestQueue<'m> {
    pub(crate) fn new(mem: &'m GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, GuestAddress(0), size)
    }

    /// A queue whose rings start at `start`.
    pub(crate) fn at(mem: &'m GuestMemoryMmap, start: GuestAddress, size: u16) -> Self {
        TestQueue {
            mock: MockSplitQueue::create(mem, start, size),
            size,
            next_desc: Cell::new(0),
        }
    }

    /// Publishes one chain made of `descs` (in order) in the available ring.
    pub(crate) fn add_chain(&self, descs: &[RawDescriptor]) {
        let first = self.next_desc.get();
        let mut linked = Vec::with_capacity(descs.len());
        for (i, raw) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*raw);
            let index = first + i as u16;
            let last = i + 1 == descs.len();
            let flags = if last {
                d.flags() & !(VRING_DESC_F_NEXT as u16)
            } else {
                d.flags() | VRING_DESC_F_NEXT as u16
            };
            let next = if last { 0 } else { (index + 1) % self.size };
            linked.push(RawDescriptor::from(SplitDescriptor::new(
                d.addr().raw_value(),
                d.len(),
                flags,
                next,
            )));
        }
        self.mock.add_desc_chains(&linked, first).unwrap();
        self.next_desc.set(first + descs.len() as u16);
    }

    /// Writes raw descriptors at `index` without publishing anything (for malformed chains).
    pub(crate) fn store_desc(&self, index: u16, desc: RawDescriptor) {
        self.mock.desc_table().store(index, desc).unwrap();
    }

    /// Publishes `head` in the available ring.
    pub(crate) fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(idx % self.size));
        mem.write_obj(head, slot).unwrap();
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    pub(crate) fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(self.mock.avail_addr().unchecked_add(2))
            .unwrap()
    }

    pub(crate) fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.write_obj(idx, self.mock.avail_addr().unchecked_add(2))
            .unwrap();
    }

    /// Sets used_event (the EVENT_IDX interrupt threshold the driver publishes).
    pub(crate) fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
        let addr = self
            .mock
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(self.size));
        mem.write_obj(value, addr).unwrap();
    }

    pub(crate) fn used_addr(&self) -> GuestAddress {
        self.mock.used_addr()
    }

    /// The used ring's entries so far, as (descriptor head, length written).
    pub(crate) fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let base = self.mock.used_addr();
        let idx: u16 = mem.read_obj(base.unchecked_add(2)).unwrap();
        (0..idx)
            .map(|i| {
                let elem = base.unchecked_add(4 + 8 * u64::from(i % self.size));
                let id: u32 = mem.read_obj(elem).unwrap();
                let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
                (id, len)
            })
            .collect()
    }

    /// The queue as a transport would hand it to `activate`.
    pub(crate) fn active_queue(&self, index: u16) -> ActiveQueue {
        let queue: Queue = self.mock.create_queue().unwrap();
        ActiveQueue {
            index,
            queue,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        }
    }

    /// A worker-side queue plus a recording interrupt, for driving request functions directly.
    pub(crate) fn device_queue(&self, event_idx: bool) -> (DeviceQueue, Arc<RecordingInterrupt>) {
        (
            DeviceQueue::new(self.active_queue(0), event_idx),
            Arc::new(RecordingInterrupt::default()),
        )
    }

    pub(crate) fn queue(&self) -> Queue {
        let q: Queue = self.mock.create_queue().unwrap();
        assert_eq!(q.size(), self.size);
        q
    }
}

/// An Interrupt that counts notifications per queue.
#[derive(Debug, Default)]
pub(crate) struct RecordingInterrupt {
    queue_counts: Mutex<Vec<u32>>,
    config_count: Mutex<u32>,
}

impl RecordingInterrupt {
    pub(crate) fn count(&self, queue: u16) -> u32 {
        let counts = self.queue_counts.lock().unwrap();
        counts.get(usize::from(queue)).copied().unwrap_or(0)
    }

    /// Waits up to two seconds for the count of `queue` to reach `want`.
    pub(crate) fn wait_for(&self, queue: u16, want: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.count(queue) >= want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

impl Interrupt for RecordingInterrupt {
    fn notify_queue(&self, queue: u16) -> std::io::Result<()> {
        let mut counts = self.queue_counts.lock().unwrap();
        let i = usize::from(queue);
        if counts.len() <= i {
            counts.resize(i + 1, 0);
        }
        counts[i] += 1;
        Ok(())
    }

    fn notify_config(&self) -> std::io::Result<()> {
        *self.config_count.lock().unwrap() += 1;
        Ok(())
    }
}

/// Polls `cond` for up to two seconds.
pub(crate) fn eventually(mut cond: impl FnMut() -> bool) -> bool {
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
pub(crate) fn activation(
    mem: &GuestMemoryMmap,
    interrupt: &Arc<RecordingInterrupt>,
    queues: Vec<ActiveQueue>,
    features: u64,
) -> crate::device::Activation {
    crate::device::Activation {
        memory: mem.clone(),
        interrupt: interrupt.clone(),
        queues,
        features,
    }
}

/// For rate-limit tests: `elapsed` is within 5% of what the limit allows.
pub(crate) fn assert_within_5_percent(elapsed: Duration, expected: Duration) {
    let (e, x) = (elapsed.as_secs_f64(), expected.as_secs_f64());
    assert!(
        (e - x).abs() <= 0.05 * x,
        "took {elapsed:?}, the limit allows {expected:?}"
    );
}
