//! Heap allocations on the request path, counted by a global allocator in the unit-test binary,
//! so a change that brings back a per-request `Vec` fails here rather than in a benchmark.
//!
//! The count is kept per thread: the test harness runs other tests on other threads at the same
//! time, and only what the thread under test allocates is the request's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::os::unix::net::UnixDatagram;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::block::{DiskImage, serve_request};
use crate::net::{Delivery, NetCounters, VNET_HDR_LEN, deliver_frame, transmit};
use crate::testing::{TestQueue, readable, test_memory, writable};

/// The system allocator, counting every allocation and reallocation of the calling thread.
struct Counting;

thread_local! {
    // Const-initialised and without a destructor, so touching it never allocates.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // Fails only while the thread is being torn down, where nothing is measured.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches no heap.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller's contract for `alloc` is passed on as it is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from System, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f` and returns what it returned and how many heap allocations it made on this thread.
pub(crate) fn allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.with(Cell::get);
    let result = f();
    (result, ALLOCATIONS.with(Cell::get) - before)
}

/// Allocations per request once the thread has served one request (scratch buffers are kept per
/// thread and grown on first use).
pub(crate) const STEADY_STATE_ALLOCATIONS: u64 = 0;

const HEADER: u64 = 0x10_000;
const STATUS: u64 = 0x11_000;
const DATA: u64 = 0x20_000;

/// Serves one block request made of `descs` and returns the used length and the allocations
/// the request path made (queue set-up and pop are outside the count).
fn block_request(disk: &DiskImage, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (u32, u64) {
    let tq = TestQueue::new(mem, 16);
    tq.add_chain(descs);
    let mut queue = tq.queue();
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    allocations(|| serve_request(disk, mem, chain))
}

#[test]
fn block_request_allocates_nothing_once_warm() {
    let mem = test_memory();
    let image = TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    let disk = DiskImage::open(image.as_path(), false, None).unwrap();
    for (kind, data) in [
        (VIRTIO_BLK_T_IN, writable(DATA, 4096)),
        (VIRTIO_BLK_T_OUT, readable(DATA, 4096)),
    ] {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&8u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        // Header, data, status: how Linux lays out a one-segment request.
        let descs = [readable(HEADER, 16), data, writable(STATUS, 1)];
        let want_used = if kind == VIRTIO_BLK_T_IN { 4097 } else { 1 };
        // The first request on a thread grows its scratch lists.
        let (used, _) = block_request(&disk, &mem, &descs);
        assert_eq!(used, want_used);
        for _ in 0..4 {
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let (used, count) = block_request(&disk, &mem, &descs);
            assert_eq!(used, want_used);
            assert_eq!(
                u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()),
                VIRTIO_BLK_S_OK
            );
            assert_eq!(
                count, STEADY_STATE_ALLOCATIONS,
                "block request of type {kind}"
            );
        }
    }
}

#[test]
fn net_transmit_and_receive_allocate_nothing_once_warm() {
    let mem = test_memory();
    let (backend, peer) = UnixDatagram::pair().unwrap();
    let counters = NetCounters::default();
    // A vnet header and a full-size Ethernet frame in two buffers.
    let descs = [
        readable(0x10_000, VNET_HDR_LEN as u32),
        readable(0x20_000, 1514),
    ];
    let mut sink = vec![0u8; 4096];
    for round in 0..5 {
        let tq = TestQueue::new(&mem, 16);
        tq.add_chain(&descs);
        let chain = tq.queue().pop_descriptor_chain(&mem).unwrap();
        let (used, count) = allocations(|| transmit(&backend, &mem, chain, &counters));
        assert_eq!(used, 0);
        assert_eq!(peer.recv(&mut sink).unwrap(), VNET_HDR_LEN + 1514);
        if round > 0 {
            assert_eq!(count, STEADY_STATE_ALLOCATIONS, "transmit");
        }
    }

    // Receive with mergeable buffers: a 3000-byte frame over three chains.
    let mut frame = vec![0u8; VNET_HDR_LEN + 3000];
    for round in 0..5 {
        let tq = TestQueue::new(&mem, 16);
        for i in 0..3 {
            tq.add_chain(&[writable(0x40_000 + i * 0x1000, 1500)]);
        }
        let (mut rx, _) = tq.device_queue(true);
        let (delivery, count) =
            allocations(|| deliver_frame(&mut rx, &mem, &mut frame, true, &counters));
        assert_eq!(delivery, Delivery::Delivered);
        if round > 0 {
            assert_eq!(count, STEADY_STATE_ALLOCATIONS, "receive");
        }
    }
}
