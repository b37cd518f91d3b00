//! virtio-blk data plane without a guest: requests against a real image file, next to plain
//! `pread`/`pwrite` of the same sizes at the same offsets of the same file (the limit).
//!
//! Three cases per direction (read, write) and size (4 KiB, 64 KiB, 1 MiB), each request a
//! chain of header, one data buffer and status byte, as a guest's driver lays it out:
//!
//! - `pvm-worker`: end to end through the public API. A [`Block`] is activated with a queue in
//!   guest memory; per request the benchmark thread (playing the driver) makes the chain
//!   available, writes the kick eventfd and blocks until the device's interrupt eventfd fires.
//!   This includes waking the device's worker thread, its epoll loop, notification suppression
//!   and the interrupt, i.e. two cross-thread wake-ups per request. A guest would add its own
//!   exits on top (ioeventfd kick, irqfd injection), which this does not model.
//! - `pvm-request-fn`: the synchronous request path on the benchmark thread: pop the chain,
//!   parse and validate it and do the `preadv`/`pwritev` into guest memory (through
//!   `Block::bench_serve_request`, a `#[doc(hidden)]` hook that calls the worker's own request
//!   function), and add it to the used ring. No threads, eventfds or interrupts.
//! - `limit`: `pread`/`pwrite` of the same size at the same offsets into a host buffer.
//! - `reference/eventfd-round-trip` (once): two threads passing an eventfd kick and an
//!   eventfd interrupt back and forth with no device work, the floor under `pvm-worker`.
//!
//! Requests walk the 64 MiB image in steps of their size (same offsets for all three cases). The
//! image lives on tmpfs (/dev/shm) by default, so the figures are the data plane's CPU cost, not
//! a disk's; set PVM_BENCH_DIR to put it elsewhere. The summary lines at the end give each
//! case's median time per request over criterion's samples, and pvm / limit.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::Throughput;
use pvm_virtio::block::QUEUE_SIZE;
use pvm_virtio::{Activation, Block, VirtioDevice};
use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use common::{bench, last_used_len, mib_per_s, micros, ratio, submit, wait_used};
use pvm_virtio::testing::{EventInterrupt, TestQueue, readable, writable};

const IMAGE_BYTES: u64 = 64 << 20;
const SIZES: [(u32, &str); 3] = [(4 << 10, "4KiB"), (64 << 10, "64KiB"), (1 << 20, "1MiB")];
/// Guest memory: the worker's queue, the benchmark thread's queue, header, status, data.
const MEM_BYTES: usize = 4 << 20;
const WORKER_RING: u64 = 0;
const SYNC_RING: u64 = 0x8000;
const HEADER: u64 = 0x10_000;
const STATUS: u64 = 0x11_000;
const DATA: u64 = 0x100_000;
const SECTOR: u64 = 512;
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

/// Where the image goes: $PVM_BENCH_DIR, else /dev/shm (tmpfs), else the temp dir.
fn image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PVM_BENCH_DIR") {
        return PathBuf::from(dir);
    }
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        return shm;
    }
    std::env::temp_dir()
}

fn is_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs reads the NUL-terminated path and writes the statfs we own.
    let ret = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    ret == 0 && stat.f_type as libc::c_long == TMPFS_MAGIC
}

/// One direction and size: the request kind and the summary figures.
struct Summary {
    what: String,
    bytes: usize,
    worker: Option<Duration>,
    request_fn: Option<Duration>,
    limit: Option<Duration>,
}

fn main() {
    let dir = image_dir();
    let image = TempFile::new_in(&dir).expect("create the image");
    let path = image.as_path().to_owned();
    // Real data in every page, so reads copy pages rather than map holes.
    let fill: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    for chunk in 0..IMAGE_BYTES / (1 << 20) {
        image
            .as_file()
            .write_all_at(&fill, chunk << 20)
            .expect("fill the image");
    }
    println!(
        "block: image {} ({} MiB, {})",
        path.display(),
        IMAGE_BYTES >> 20,
        if is_tmpfs(&dir) { "tmpfs" } else { "not tmpfs" }
    );

    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory");
    let mut block = Block::new(&path, false, None).expect("open the image as a virtio-blk disk");
    // Everything offered, as Linux accepts it (EVENT_IDX included).
    let features = block.features();
    let interrupt = EventInterrupt::new(1);
    let worker_driver = TestQueue::at(&mem, GuestAddress(WORKER_RING), QUEUE_SIZE);
    block
        .activate(Activation {
            memory: mem.clone(),
            interrupt: interrupt.clone(),
            queues: vec![worker_driver.active_queue(0)],
            features,
        })
        .expect("activate the block device");
    let sync_driver = TestQueue::at(&mem, GuestAddress(SYNC_RING), QUEUE_SIZE);
    let mut sync_queue = sync_driver.queue();
    let limit_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("open the image for the limit");
    let mut host_buf = fill.clone();

    let mut c = common::criterion();
    let mut summaries = Vec::new();
    for (kind, direction) in [(VIRTIO_BLK_T_IN, "read"), (VIRTIO_BLK_T_OUT, "write")] {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER))
            .expect("header");
        for (size, label) in SIZES {
            let is_read = kind == VIRTIO_BLK_T_IN;
            let data = if is_read {
                writable(DATA, size)
            } else {
                readable(DATA, size)
            };
            let chain = [readable(HEADER, 16), data, writable(STATUS, 1)];
            worker_driver.store_chain(0, &chain);
            sync_driver.store_chain(0, &chain);
            let want_len = if is_read { size + 1 } else { 1 };
            let slots = IMAGE_BYTES / u64::from(size);
            // The next request's offset, shared by the three cases so they walk the same bytes.
            let mut slot = 0u64;
            let mut next_offset = || {
                let offset = slot * u64::from(size);
                slot = (slot + 1) % slots;
                offset
            };
            // The request's sector, and a status byte the device must overwrite.
            let prepare = |offset: u64| {
                mem.write_obj((offset / SECTOR).to_le(), GuestAddress(HEADER + 8))
                    .expect("sector");
                mem.write_obj(0xffu8, GuestAddress(STATUS)).expect("status");
            };
            let check = || {
                let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
                assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "request failed");
            };

            let mut group = c.benchmark_group(format!("block-{direction}-{label}"));
            group.throughput(Throughput::Bytes(u64::from(size)));
            let worker = bench(&mut group, "pvm-worker", |iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    prepare(next_offset());
                    let want = submit(&worker_driver, &mem, 0);
                    worker_driver.kick();
                    wait_used(&worker_driver, &interrupt, 0, want);
                    check();
                }
                let elapsed = start.elapsed();
                assert_eq!(last_used_len(&worker_driver), want_len);
                elapsed
            });
            let request_fn = bench(&mut group, "pvm-request-fn", |iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    prepare(next_offset());
                    submit(&sync_driver, &mem, 0);
                    let chain = sync_queue.pop_descriptor_chain(&mem).expect("a chain");
                    let head = chain.head_index();
                    let len = block.bench_serve_request(&mem, chain);
                    sync_queue.add_used(&mem, head, len).expect("add used");
                    check();
                }
                let elapsed = start.elapsed();
                assert_eq!(last_used_len(&sync_driver), want_len);
                elapsed
            });
            let data = &mut host_buf[..size as usize];
            let limit = bench(
                &mut group,
                if is_read {
                    "limit-pread"
                } else {
                    "limit-pwrite"
                },
                |iters| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let offset = next_offset();
                        if is_read {
                            limit_file.read_exact_at(data, offset).expect("pread");
                        } else {
                            limit_file.write_all_at(data, offset).expect("pwrite");
                        }
                    }
                    start.elapsed()
                },
            );
            group.finish();
            summaries.push(Summary {
                what: format!("block {direction} {label}"),
                bytes: size as usize,
                worker,
                request_fn,
                limit,
            });
        }
    }
    block.reset();
    let floor = common::wake_up_floor(&mut c);
    c.final_summary();

    println!();
    common::print_summary_header("request", floor);
    for s in &summaries {
        println!(
            "summary {}: pvm worker {} ({}), pvm request fn {}, limit {} ({}); ratio worker {}, request fn {}",
            s.what,
            micros(s.worker),
            mib_per_s(s.bytes, s.worker),
            micros(s.request_fn),
            micros(s.limit),
            mib_per_s(s.bytes, s.limit),
            ratio(s.worker, s.limit),
            ratio(s.request_fn, s.limit),
        );
    }
}
