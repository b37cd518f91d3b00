//! The driver's side of a split virtqueue (virtio 1.2, 2.7): the test lays out and fills the
//! rings in guest memory the way a guest driver does, and reads back what the device returned.
//!
//! The rings are laid out here rather than with virtio-queue's `MockSplitQueue`: its 0.18
//! `create` puts the used ring `size` bytes (not `2 * size`) after the available ring's entries,
//! so with more than a few entries in flight, or with used_event, the two rings overlap; and its
//! `add_desc_chains` neither wraps around the descriptor table nor around the available ring.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{Ordering, fence};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::RecordingInterrupt;
use crate::device::ActiveQueue;
use crate::worker::DeviceQueue;

/// Bytes of one descriptor, of the rings' flags + idx header, and of one ring entry.
const DESC_BYTES: u64 = 16;
const RING_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;
const USED_ENTRY: u64 = 8;

/// Where the three parts of a split queue are in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddresses {
    pub desc_table: GuestAddress,
    pub avail_ring: GuestAddress,
    pub used_ring: GuestAddress,
}

impl RingAddresses {
    /// The parts of a queue of `size` entries packed one after the other from `start` (16-byte
    /// aligned), each at its own alignment: the table (16 bytes an entry), the available ring
    /// (flags, idx, the entries, used_event), the used ring 4-byte aligned after it.
    pub fn packed(start: GuestAddress, size: u16) -> Self {
        let n = u64::from(size);
        let avail_ring = start.unchecked_add(DESC_BYTES * n);
        let avail_end = avail_ring.raw_value() + RING_HEADER + AVAIL_ENTRY * n + 2;
        RingAddresses {
            desc_table: start,
            avail_ring,
            used_ring: GuestAddress(avail_end.next_multiple_of(4)),
        }
    }
}

/// The driver's side of one split queue of `size` entries in the guest memory it was built in.
///
/// Chains go into the descriptor table one after another (wrapping around it) and are
/// published in the available ring; used entries are read back as (head, length). The queue
/// has one kick eventfd, which every [`ActiveQueue`] made from it shares, as a transport hands
/// the device the same ioeventfd on every activation. The methods that take a `mem` argument
/// read or write that memory (the one the queue was built in; the unit tests pass it in).
#[derive(Debug)]
pub struct TestQueue {
    mem: GuestMemoryMmap,
    size: u16,
    /// The maximum size the device offers (what `Queue::new` gets); the size by default.
    max_size: u16,
    rings: RingAddresses,
    /// Where the ring indices (the driver's avail.idx, the device's used.idx) begin.
    start: u16,
    next_desc: Cell<u16>,
    /// The used index up to which the driver has taken entries ([`Self::take_used`]).
    seen_used: Cell<u16>,
    kick: EventFd,
}

impl TestQueue {
    /// A queue whose rings start at guest address 0.
    pub fn new(mem: &GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, GuestAddress(0), size)
    }

    /// A queue whose rings are packed from `start` (see [`RingAddresses::packed`]).
    pub fn at(mem: &GuestMemoryMmap, start: GuestAddress, size: u16) -> Self {
        Self::with_rings(mem, size, RingAddresses::packed(start, size))
    }

    /// A queue with its rings at `rings`, all zeroed first: a driver that reloads reuses memory
    /// the previous rings left their entries in.
    pub fn with_rings(mem: &GuestMemoryMmap, size: u16, rings: RingAddresses) -> Self {
        assert!(size.is_power_of_two(), "queue size {size}");
        let n = u64::from(size);
        for (at, len) in [
            (rings.desc_table, DESC_BYTES * n),
            (rings.avail_ring, RING_HEADER + AVAIL_ENTRY * n + 2),
            (rings.used_ring, RING_HEADER + USED_ENTRY * n + 2),
        ] {
            let zeros = vec![0u8; len as usize];
            mem.write_slice(&zeros, at)
                .expect("the rings lie in guest memory");
        }
        TestQueue {
            mem: mem.clone(),
            size,
            max_size: size,
            rings,
            start: 0,
            next_desc: Cell::new(0),
            seen_used: Cell::new(0),
            kick: EventFd::new(EFD_NONBLOCK).expect("kick eventfd"),
        }
    }

    /// The same queue with both ring indices beginning at `start` (the driver's avail.idx, the
    /// device's next_avail and next_used), to exercise u16 wrap-around.
    pub fn starting_at(mut self, start: u16) -> Self {
        self.set_avail_idx(&self.mem, start);
        self.mem
            .write_obj(start.to_le(), self.rings.used_ring.unchecked_add(2))
            .expect("used idx");
        self.start = start;
        self.seen_used.set(start);
        self
    }

    /// The same queue as a device offering up to `max_size` entries sees it.
    pub fn with_max_size(mut self, max_size: u16) -> Self {
        assert!(
            max_size >= self.size,
            "max size {max_size} under {}",
            self.size
        );
        self.max_size = max_size;
        self
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn rings(&self) -> RingAddresses {
        self.rings
    }

    pub fn used_addr(&self) -> GuestAddress {
        self.rings.used_ring
    }

    /// Publishes one chain made of `descs` (linked in order) in the available ring; returns its
    /// head.
    pub fn add_chain(&self, descs: &[RawDescriptor]) -> u16 {
        let head = self.next_desc.get();
        self.store_chain(head, descs);
        self.next_desc
            .set(((usize::from(head) + descs.len()) % usize::from(self.size)) as u16);
        self.publish(&self.mem, head);
        head
    }

    /// Writes `descs` as one chain from table index `head` on (wrapping around the table),
    /// NEXT flags and links set, without publishing it.
    pub fn store_chain(&self, head: u16, descs: &[RawDescriptor]) {
        let mut index = head % self.size;
        for (i, raw) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*raw);
            let following = (index + 1) % self.size;
            let (flags, next) = if i + 1 == descs.len() {
                (d.flags() & !(VRING_DESC_F_NEXT as u16), 0)
            } else {
                (d.flags() | VRING_DESC_F_NEXT as u16, following)
            };
            let linked = SplitDescriptor::new(d.addr().raw_value(), d.len(), flags, next);
            self.store_desc(index, RawDescriptor::from(linked));
            index = following;
        }
    }

    /// Writes one raw descriptor at table `index` as it is (for malformed chains).
    pub fn store_desc(&self, index: u16, desc: RawDescriptor) {
        assert!(index < self.size, "descriptor {index} of {}", self.size);
        let at = self.desc_addr(index);
        self.mem.write_obj(desc, at).expect("descriptor table");
    }

    /// The descriptor at table `index`, as it is in guest memory now.
    pub fn desc(&self, index: u16) -> SplitDescriptor {
        let raw: RawDescriptor = self
            .mem
            .read_obj(self.desc_addr(index))
            .expect("descriptor");
        SplitDescriptor::from(raw)
    }

    fn desc_addr(&self, index: u16) -> GuestAddress {
        let slot = u64::from(index % self.size);
        self.rings.desc_table.unchecked_add(DESC_BYTES * slot)
    }

    /// Puts `head` in the available ring at avail.idx and advances avail.idx.
    pub fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        write_u16(mem, self.avail_entry_addr(idx), head);
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        read_u16(mem, self.rings.avail_ring.unchecked_add(2))
    }

    /// Sets avail.idx, ordered after everything the driver wrote before (a device thread may be
    /// reading the ring).
    pub fn set_avail_idx(&self, mem: &GuestMemoryMmap, idx: u16) {
        mem.store(
            idx.to_le(),
            self.rings.avail_ring.unchecked_add(2),
            Ordering::Release,
        )
        .expect("avail idx");
    }

    pub fn set_avail_flags(&self, flags: u16) {
        write_u16(&self.mem, self.rings.avail_ring, flags);
    }

    /// The available ring's entry at position `pos` (modulo the size).
    pub fn avail_entry(&self, pos: u16) -> u16 {
        read_u16(&self.mem, self.avail_entry_addr(pos))
    }

    /// Writes the available ring's entry at position `pos` (modulo the size) without touching
    /// avail.idx.
    pub fn set_avail_entry(&self, pos: u16, head: u16) {
        write_u16(&self.mem, self.avail_entry_addr(pos), head);
    }

    fn avail_entry_addr(&self, pos: u16) -> GuestAddress {
        let slot = u64::from(pos % self.size);
        self.rings
            .avail_ring
            .unchecked_add(RING_HEADER + AVAIL_ENTRY * slot)
    }

    /// Sets used_event (the EVENT_IDX interrupt threshold the driver publishes).
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
        let n = u64::from(self.size);
        let at = self
            .rings
            .avail_ring
            .unchecked_add(RING_HEADER + AVAIL_ENTRY * n);
        write_u16(mem, at, value);
    }

    /// Asks for an interrupt once the device adds a used entry the driver has not taken yet
    /// (used_event = that index, as Linux's virtqueue_enable_cb does).
    pub fn want_interrupt(&self) {
        self.set_used_event(&self.mem, self.seen_used.get());
        // The device must see used_event before the driver looks at used.idx again.
        fence(Ordering::SeqCst);
    }

    /// Notifies the device through the queue's kick eventfd.
    pub fn kick(&self) {
        self.kick.write(1).expect("kick eventfd");
    }

    /// The device's used.idx.
    pub fn used_idx(&self) -> u16 {
        let at = self.rings.used_ring.unchecked_add(2);
        let idx: u16 = self.mem.load(at, Ordering::Acquire).expect("used idx");
        u16::from_le(idx)
    }

    /// The used ring's entry at position `pos` (modulo the size): (descriptor head, length
    /// written).
    pub fn used_entry(&self, pos: u16) -> (u32, u32) {
        used_entry(&self.mem, self.rings.used_ring, pos % self.size)
    }

    /// Every used entry the device added, as (descriptor head, length written).
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        let base = self.rings.used_ring;
        let idx = read_u16(mem, base.unchecked_add(2));
        (0..idx.wrapping_sub(self.start))
            .map(|k| used_entry(mem, base, self.start.wrapping_add(k) % self.size))
            .collect()
    }

    /// The used entries added since the last call, as (descriptor head, length written).
    pub fn take_used(&self) -> Vec<(u32, u32)> {
        let idx = self.used_idx();
        let mut taken = Vec::new();
        while self.seen_used.get() != idx {
            taken.push(self.used_entry(self.seen_used.get()));
            self.seen_used.set(self.seen_used.get().wrapping_add(1));
        }
        taken
    }

    /// Whether the device added used entries the driver has not taken yet.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.seen_used.get()
    }

    /// The device's view of the queue, as a transport configures it.
    pub fn queue(&self) -> Queue {
        let mut queue = Queue::new(self.max_size).expect("a power-of-two maximum size");
        queue.try_set_size(self.size).expect("a valid size");
        let set = |q: &mut Queue| -> Result<(), virtio_queue::Error> {
            q.try_set_desc_table_address(self.rings.desc_table)?;
            q.try_set_avail_ring_address(self.rings.avail_ring)?;
            q.try_set_used_ring_address(self.rings.used_ring)
        };
        set(&mut queue).expect("aligned rings");
        queue.set_next_avail(self.start);
        queue.set_next_used(self.start);
        queue.set_ready(true);
        assert!(queue.is_valid(&self.mem), "rings outside guest memory");
        queue
    }

    /// The queue as a transport hands it to `activate`.
    pub fn active_queue(&self, index: u16) -> ActiveQueue {
        ActiveQueue {
            index,
            queue: self.queue(),
            kick: self.kick.try_clone().expect("clone the kick eventfd"),
        }
    }

    /// A worker-side queue (index 0) plus a recording interrupt, for driving request functions
    /// directly.
    pub fn device_queue(&self, event_idx: bool) -> (DeviceQueue, Arc<RecordingInterrupt>) {
        (
            DeviceQueue::new(self.active_queue(0), event_idx),
            Arc::new(RecordingInterrupt::default()),
        )
    }
}

fn read_u16(mem: &GuestMemoryMmap, at: GuestAddress) -> u16 {
    u16::from_le(mem.read_obj(at).expect("ring field"))
}

fn write_u16(mem: &GuestMemoryMmap, at: GuestAddress, value: u16) {
    mem.write_obj(value.to_le(), at).expect("ring field");
}

fn used_entry(mem: &GuestMemoryMmap, used_ring: GuestAddress, slot: u16) -> (u32, u32) {
    let at = used_ring.unchecked_add(RING_HEADER + USED_ENTRY * u64::from(slot));
    let id: u32 = mem.read_obj(at).expect("used entry");
    let len: u32 = mem.read_obj(at.unchecked_add(4)).expect("used entry");
    (u32::from_le(id), u32::from_le(len))
}
