//! The driver's side of a split virtqueue (pvm_virtio::testing's), laid out in guest memory from
//! fuzz bytes, and the invariants the device must keep on it.
//!
//! Guest memory is two 256 KiB regions with a hole between them (buffers may straddle it or
//! point anywhere). Queue `q` keeps its descriptor table, available ring and used ring at fixed
//! addresses in the ring area below [`RING_AREA_END`]; the fuzz input supplies their contents:
//!
//! ```text
//! per queue:
//!   u8   ndesc, then ndesc raw 16-byte descriptors (addr u64, len u32, flags u16, next u16)
//!        stored at table index i % size
//!   u8   avail.flags
//!   u16  avail.idx - start (may be far ahead of the queue size: the driver lies)
//!   u16  used_event (EVENT_IDX)
//!   u8   nring, then nring u16 heads stored at avail.ring[(start + i) % size]
//! ```
//!
//! `start` is where both the device's next_avail and next_used begin (so the u16 ring indices
//! wrap within one run). Everything after the device's own fields is payload, copied to
//! [`DATA_BASE`]: what the descriptors point at.

use std::fs::File;
use std::path::PathBuf;

use pvm_virtio::ActiveQueue;
use pvm_virtio::testing::{RingAddresses, TestQueue};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::{Input, Output};

/// Guest RAM: [0, 256 KiB) and [1 MiB, 1.25 MiB).
pub const LOW_RAM: (u64, usize) = (0, 0x4_0000);
pub const HIGH_RAM: (u64, usize) = (0x10_0000, 0x4_0000);
/// Each queue's rings take 12 KiB: table at +0, avail at +4 KiB, used at +8 KiB.
pub const QUEUE_STRIDE: u64 = 0x3000;
pub const MAX_QUEUES: u64 = 2;
pub const RING_AREA_END: u64 = QUEUE_STRIDE * MAX_QUEUES;
/// Where the payload (request headers, frames, data buffers) goes.
pub const DATA_BASE: u64 = 0x8000;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW_RAM.0), LOW_RAM.1),
        (GuestAddress(HIGH_RAM.0), HIGH_RAM.1),
    ])
    .expect("guest memory")
}

/// Copies `payload` to [`DATA_BASE`], as much as fits in the low region.
pub fn write_payload(mem: &GuestMemoryMmap, payload: &[u8]) {
    let room = (LOW_RAM.0 + LOW_RAM.1 as u64 - DATA_BASE) as usize;
    let n = payload.len().min(room);
    mem.write_slice(&payload[..n], GuestAddress(DATA_BASE))
        .expect("payload fits the low region");
}

/// A queue size from a fuzz byte: a power of two no larger than `max`.
pub fn queue_size(byte: u8, max: u16) -> u16 {
    let max_log2 = max.trailing_zeros() as u8;
    1 << (byte % (max_log2 + 1))
}

/// One split queue as the driver laid it out, and what it published.
#[derive(Debug)]
pub struct DriverQueue {
    pub index: u16,
    pub size: u16,
    pub start: u16,
    /// avail.idx - start as the driver wrote it.
    pub avail_delta: u16,
    /// The heads published at avail positions start, start + 1, ... (as many as the queue size
    /// allows), read back from guest memory before the device ran.
    pub heads: Vec<u16>,
    /// The descriptor table before the device ran: (addr, len, flags).
    pub table: Vec<(u64, u32, u16)>,
    queue: TestQueue,
}

impl DriverQueue {
    /// Where queue `index`'s rings are.
    pub fn rings(index: u16) -> RingAddresses {
        let desc = u64::from(index) * QUEUE_STRIDE;
        RingAddresses {
            desc_table: GuestAddress(desc),
            avail_ring: GuestAddress(desc + 0x1000),
            used_ring: GuestAddress(desc + 0x2000),
        }
    }

    /// Lays out queue `index` of `size` entries (the device offers `max_size`) from `input`.
    pub fn layout(
        mem: &GuestMemoryMmap,
        input: &mut Input<'_>,
        index: u16,
        size: u16,
        max_size: u16,
        start: u16,
    ) -> Self {
        assert!(u64::from(index) < MAX_QUEUES);
        let queue = TestQueue::with_rings(mem, size, Self::rings(index))
            .with_max_size(max_size)
            .starting_at(start);
        for i in 0..input.u8() {
            // The 16 bytes as they are: any flags, any next.
            let desc = Descriptor::new(input.u64(), input.u32(), input.u16(), input.u16());
            queue.store_desc(u16::from(i) % size, RawDescriptor::from(desc));
        }
        queue.set_avail_flags(u16::from(input.u8()));
        let avail_delta = input.u16();
        queue.set_avail_idx(mem, start.wrapping_add(avail_delta));
        queue.set_used_event(mem, input.u16());
        for i in 0..input.u8() {
            queue.set_avail_entry(start.wrapping_add(u16::from(i)), input.u16());
        }

        let published = avail_delta.min(size);
        let heads = (0..published)
            .map(|k| queue.avail_entry(start.wrapping_add(k)))
            .collect();
        let table = (0..size)
            .map(|i| {
                let d = queue.desc(i);
                (d.addr().raw_value(), d.len(), d.flags())
            })
            .collect();
        DriverQueue {
            index,
            size,
            start,
            avail_delta,
            heads,
            table,
            queue,
        }
    }

    /// The queue as a transport hands it to `activate`.
    pub fn active(&self) -> ActiveQueue {
        self.queue.active_queue(self.index)
    }

    /// Whether the device can only have written guest memory outside every ring: no indirect
    /// tables (which could hold anything) and no device-writable buffer overlapping the rings.
    /// Only then do the rings still say what the driver and the device wrote.
    pub fn rings_untouchable(&self) -> bool {
        self.table.iter().all(|&(addr, len, flags)| {
            let indirect = flags & VRING_DESC_F_INDIRECT as u16 != 0;
            let writable = flags & VRING_DESC_F_WRITE as u16 != 0;
            let overlaps_rings = u128::from(addr) < u128::from(RING_AREA_END) && len > 0;
            !(indirect || (writable && overlaps_rings))
        })
    }

    /// Whether every published head names a descriptor of the table. A head past the table is a
    /// driver error the device answers by stopping the queue (virtio-queue refuses to add it to
    /// the used ring), so the chain is served but never returned.
    pub fn heads_valid(&self) -> bool {
        self.heads.iter().all(|&h| h < self.size)
    }

    /// The chains the device may consume: all published ones, or none if the driver claimed more
    /// than the queue holds (an invalid ring stops the queue).
    pub fn consumable(&self) -> u16 {
        if self.avail_delta <= self.size {
            self.avail_delta
        } else {
            0
        }
    }

    /// The used entries the device added, as (id, len).
    pub fn used(&self, mem: &GuestMemoryMmap) -> Vec<(u32, u32)> {
        self.queue.used(mem)
    }

    /// Checks what every device must do with a queue and returns the used entries: it uses at
    /// most the chains the driver made available, in order (every device here serves chains in
    /// order), and interrupts at most once per batch of used entries.
    pub fn check(&self, mem: &GuestMemoryMmap, interrupts: u32) -> Vec<(u32, u32)> {
        self.check_order(mem, interrupts, true)
    }

    /// [`Self::check`] for a device that completes requests in any order (virtio-blk on
    /// io_uring): the used entries are chains made available, each once, in any order.
    pub fn check_any_order(&self, mem: &GuestMemoryMmap, interrupts: u32) -> Vec<(u32, u32)> {
        self.check_order(mem, interrupts, false)
    }

    fn check_order(
        &self,
        mem: &GuestMemoryMmap,
        interrupts: u32,
        in_order: bool,
    ) -> Vec<(u32, u32)> {
        let used = self.used(mem);
        assert!(
            used.len() <= usize::from(self.consumable()),
            "queue {}: {} used entries for {} available chains (size {})",
            self.index,
            used.len(),
            self.avail_delta,
            self.size
        );
        if !in_order {
            // Each used entry takes one published chain of its head; none is used twice. Not
            // all need be used: requests in flight when the driver broke the queue (which stops
            // it until a reset) complete into a queue that no longer takes used entries.
            let mut unused: Vec<u32> = self.heads.iter().map(|&h| u32::from(h)).collect();
            for &(id, _) in &used {
                let taken = unused
                    .iter()
                    .position(|&h| h == id)
                    .map(|i| unused.swap_remove(i));
                assert!(
                    taken.is_some(),
                    "queue {}: used entry {id} is not a chain made available (or used twice)",
                    self.index
                );
            }
        }
        for (k, (&(id, _), &head)) in used
            .iter()
            .zip(&self.heads)
            .enumerate()
            .filter(|_| in_order)
        {
            assert_eq!(
                id,
                u32::from(head),
                "queue {}: used entry {k} is not the chain published at that position",
                self.index
            );
        }
        assert!(
            interrupts as usize <= used.len(),
            "queue {}: {interrupts} interrupts for {} used entries",
            self.index,
            used.len()
        );
        used
    }
}

/// The driver's side of a queue for a seed: descriptors, then the published heads.
#[derive(Debug, Clone, Default)]
pub struct SeedQueue {
    pub descs: Vec<(u64, u32, u16, u16)>,
    pub avail_flags: u8,
    /// None: as many as `heads`.
    pub avail_delta: Option<u16>,
    pub used_event: u16,
    pub heads: Vec<u16>,
}

impl SeedQueue {
    /// A queue holding `chains`, each a list of (addr, len, writable) descriptors, linked in
    /// order and published one after another.
    pub fn chains(chains: &[&[(u64, u32, bool)]]) -> Self {
        let mut q = SeedQueue::default();
        for chain in chains {
            let head = q.descs.len() as u16;
            for (i, &(addr, len, writable)) in chain.iter().enumerate() {
                let last = i + 1 == chain.len();
                let mut flags = if writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                let next = if last { 0 } else { q.descs.len() as u16 + 1 };
                if !last {
                    flags |= virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
                }
                q.descs.push((addr, len, flags, next));
            }
            q.heads.push(head);
        }
        q
    }

    pub fn encode(&self, out: &mut Output) {
        out.u8(self.descs.len() as u8);
        for &(addr, len, flags, next) in &self.descs {
            out.u64(addr).u32(len).u16(flags).u16(next);
        }
        out.u8(self.avail_flags);
        out.u16(self.avail_delta.unwrap_or(self.heads.len() as u16));
        out.u16(self.used_event);
        out.u8(self.heads.len() as u8);
        for &h in &self.heads {
            out.u16(h);
        }
    }
}

/// A file for one iteration, on tmpfs when there is one (fsync and fallocate then cost
/// nothing). Removed on drop; the name is per process so parallel fuzzers do not collide.
#[derive(Debug)]
pub struct ScratchFile {
    pub path: PathBuf,
}

impl ScratchFile {
    pub fn new(tag: &str, contents: &[u8]) -> (Self, File) {
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!("pvm-fuzz-{}-{tag}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("scratch file");
        std::os::unix::fs::FileExt::write_all_at(&file, contents, 0).expect("scratch write");
        (ScratchFile { path }, file)
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
