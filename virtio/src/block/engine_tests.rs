//! The engines, queues and O_DIRECT of a disk: options refused, several queues each served by
//! its own worker (sync and io_uring), a pause that waits for in-flight io_uring requests, and
//! misaligned O_DIRECT requests through the bounce buffer.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;
use crate::testing::{
    RecordingInterrupt, TestQueue, activation, eventually, readable, test_memory, writable,
};

const SECTORS: u64 = 256;

/// A temp image of SECTORS sectors where byte i holds i % 251.
fn image() -> TempFile {
    let tmp = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    tmp.as_file().write_all_at(&bytes, 0).unwrap();
    tmp
}

fn options(engine: IoEngine, queues: u16, queue_size: u16) -> BlockOptions {
    BlockOptions {
        engine,
        direct: false,
        queues,
        queue_size,
    }
}

/// The descriptors of request `n` (its own header, data page and status byte): `kind` on
/// `sector` with `len` data bytes.
fn request(mem: &GuestMemoryMmap, n: u64, kind: u32, sector: u64, len: u32) -> Vec<RawDescriptor> {
    let (header, data, status) = (0x100_000 + n * 16, 0x400_000 + n * 0x1000, 0x300_000 + n);
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(header)).unwrap();
    mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
    let data = if kind == VIRTIO_BLK_T_IN {
        writable(data, len)
    } else {
        readable(data, len)
    };
    vec![readable(header, 16), data, writable(status, 1)]
}

fn status_of(mem: &GuestMemoryMmap, n: u64) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(0x300_000 + n)).unwrap())
}

#[test]
fn queue_counts_and_sizes_out_of_range_are_refused() {
    let tmp = image();
    for (queues, size) in [(0, 256), (MAX_QUEUES + 1, 256), (1, 2), (1, 100), (1, 2048)] {
        let err = Block::with_options(
            tmp.as_path(),
            false,
            None,
            options(IoEngine::Sync, queues, size),
        )
        .unwrap_err();
        assert!(matches!(err, BlockError::Options { .. }), "{err}");
    }
    let block =
        Block::with_options(tmp.as_path(), false, None, options(IoEngine::Sync, 1, 64)).unwrap();
    assert_eq!(block.queue_max_sizes(), &[64]);
    assert_eq!(block.features() & feature(VIRTIO_BLK_F_MQ), 0);
    // seg_max follows a small queue.
    let mut seg_max = [0u8; 4];
    block.read_config(
        std::mem::offset_of!(virtio_blk_config, seg_max) as u64,
        &mut seg_max,
    );
    assert_eq!(u32::from_le_bytes(seg_max), 62);
}

/// Two queues, each with its own worker: writes on one queue read back on the other, each
/// queue interrupted for its own requests; after a reset the device serves again.
fn two_queues(engine: IoEngine) {
    let mem = test_memory();
    let tmp = image();
    let mut block =
        Block::with_options(tmp.as_path(), false, None, options(engine, 2, 64)).unwrap();
    assert_ne!(block.features() & feature(VIRTIO_BLK_F_MQ), 0);
    assert_eq!(block.queue_max_sizes(), &[64, 64]);
    assert_eq!(block.options().engine, engine);
    let mut num_queues = [0u8; 2];
    block.read_config(
        std::mem::offset_of!(virtio_blk_config, num_queues) as u64,
        &mut num_queues,
    );
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    for round in 0..2u64 {
        let (q0, q1) = (
            TestQueue::at(&mem, GuestAddress(0), 64),
            TestQueue::at(&mem, GuestAddress(0x8000), 64),
        );
        let (a0, a1) = (q0.active_queue(0), q1.active_queue(1));
        let (k0, k1) = (a0.kick.try_clone().unwrap(), a1.kick.try_clone().unwrap());
        let interrupt = Arc::new(RecordingInterrupt::default());
        let features = block.features();
        block
            .activate(activation(&mem, &interrupt, vec![a0, a1], features))
            .unwrap();
        // Eight writes of one page each on queue 0, of a pattern that differs per round.
        for n in 0..8 {
            let fill = vec![(n + 10 * round) as u8; 4096];
            mem.write_slice(&fill, GuestAddress(0x400_000 + n * 0x1000))
                .unwrap();
            q0.add_chain(&request(&mem, n, VIRTIO_BLK_T_OUT, n * 8, 4096));
        }
        k0.write(1).unwrap();
        assert!(eventually(|| q0.used(&mem).len() == 8), "{engine:?}");
        assert!(interrupt.count(0) >= 1 && interrupt.count(1) == 0);
        // Read back on queue 1.
        for n in 0..8 {
            q1.add_chain(&request(&mem, 8 + n, VIRTIO_BLK_T_IN, n * 8, 4096));
        }
        k1.write(1).unwrap();
        assert!(eventually(|| q1.used(&mem).len() == 8), "{engine:?}");
        assert!(interrupt.wait_for(1, 1));
        for n in 0..8 {
            assert_eq!(status_of(&mem, n), VIRTIO_BLK_S_OK);
            assert_eq!(status_of(&mem, 8 + n), VIRTIO_BLK_S_OK);
            let mut got = vec![0u8; 4096];
            mem.read_slice(&mut got, GuestAddress(0x400_000 + (8 + n) * 0x1000))
                .unwrap();
            assert!(got.iter().all(|&b| b == (n + 10 * round) as u8), "{n}");
        }
        let mut used = q1.used(&mem);
        used.sort();
        assert!(used.iter().all(|&(_, len)| len == 4097), "{used:?}");
        block.reset();
    }
}

#[test]
fn two_queues_on_the_sync_engine() {
    two_queues(IoEngine::Sync);
}

#[test]
fn two_queues_on_io_uring() {
    two_queues(IoEngine::IoUring);
}

/// An io_uring disk of `queues` queues of `size`, with only queue 0 started: the device, the
/// driver's queue, its kick, the interrupts and the image (kept for the test's length).
fn one_queue_active(
    mem: &GuestMemoryMmap,
    queues: u16,
    size: u16,
) -> (
    Block,
    TestQueue,
    vmm_sys_util::eventfd::EventFd,
    Arc<RecordingInterrupt>,
    TempFile,
) {
    let tmp = image();
    let mut block = Block::with_options(
        tmp.as_path(),
        false,
        None,
        options(IoEngine::IoUring, queues, size),
    )
    .unwrap();
    let q = TestQueue::new(mem, size);
    let active = q.active_queue(0);
    let kick = active.kick.try_clone().unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let features = block.features();
    block
        .activate(activation(mem, &interrupt, vec![active], features))
        .unwrap();
    (block, q, kick, interrupt, tmp)
}

/// A driver may use fewer queues than offered (one per vCPU): the rest stay idle.
#[test]
fn a_driver_may_use_fewer_queues() {
    let mem = test_memory();
    let (mut block, q, kick, interrupt, _tmp) = one_queue_active(&mem, 4, 64);
    q.add_chain(&request(&mem, 0, VIRTIO_BLK_T_IN, 0, 512));
    kick.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1));
    assert_eq!(q.used(&mem), vec![(0, 513)]);
    block.reset();
}

/// Pausing waits for the requests the ring holds: each request is used exactly once, before
/// the pause returns or after the resume, never lost and never twice.
#[test]
fn io_uring_pause_completes_what_is_in_flight() {
    let mem = test_memory();
    let (mut block, q, kick, _interrupt, _tmp) = one_queue_active(&mem, 1, 128);
    for round in 0..4u64 {
        let mut request_of = std::collections::HashMap::new();
        for n in round * 32..(round + 1) * 32 {
            let kind = if n % 2 == 0 {
                VIRTIO_BLK_T_IN
            } else {
                VIRTIO_BLK_T_OUT
            };
            let head = q.add_chain(&request(&mem, n, kind, (n * 8) % SECTORS, 4096));
            request_of.insert(u32::from(head), n);
        }
        kick.write(1).unwrap();
        block.pause().unwrap();
        // Nothing the worker took is still with the kernel: every request used so far has
        // its status, and nothing more completes while paused.
        let before = q.used(&mem).len();
        for &(head, _) in &q.used(&mem)[(round * 32) as usize..] {
            assert_eq!(status_of(&mem, request_of[&head]), VIRTIO_BLK_S_OK);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(q.used(&mem).len(), before);
        block.resume().unwrap();
        let want = ((round + 1) * 32) as usize;
        assert!(eventually(|| q.used(&mem).len() == want), "round {round}");
        let mut heads: Vec<u32> = q.used(&mem)[(round * 32) as usize..]
            .iter()
            .map(|&(head, _)| head)
            .collect();
        heads.sort();
        heads.dedup();
        assert_eq!(heads.len(), 32, "round {round}: a request used twice");
    }
    for n in 0..128 {
        assert_eq!(status_of(&mem, n), VIRTIO_BLK_S_OK, "request {n}");
    }
    block.reset();
}

/// Serves one chain made of `descs` on `engine`; returns the used length.
fn serve(
    engine: IoEngine,
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
) -> u32 {
    use virtio_queue::QueueT;
    let tq = TestQueue::at(mem, GuestAddress(0x10_000), 16);
    tq.add_chain(descs);
    let mut queue = tq.queue();
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    match engine {
        IoEngine::Sync => request::handle_request(disk, mem, chain),
        IoEngine::IoUring => uring::serve_one(disk, mem, chain),
    }
}

/// One request of `kind` on `sector` over the data buffer at `addr` of `len` bytes.
fn one(mem: &GuestMemoryMmap, kind: u32, sector: u64, addr: u64, len: u32) -> Vec<RawDescriptor> {
    let mut descs = request(mem, 0, kind, sector, len);
    descs[1] = if kind == VIRTIO_BLK_T_IN {
        writable(addr, len)
    } else {
        readable(addr, len)
    };
    descs
}

/// direct=on: aligned requests go straight to the file; a misaligned buffer address, a
/// partial block or an odd sector is bounced, reads and read-modify-writes alike, and leaves
/// the bytes around it as they were.
fn direct_requests(engine: IoEngine) {
    let mem = test_memory();
    let tmp = image();
    let mut disk = DiskImage::open_with(tmp.as_path(), false, None, true).unwrap();
    let align = disk.direct_align.unwrap();
    assert!(align >= SECTOR_SIZE && align.is_power_of_two());
    // Stricter than the host asks, so partial blocks of 512-byte sectors are bounced too.
    disk.direct_align = Some(4096);
    let expected = |offset: u64, len: usize| -> Vec<u8> {
        (offset..offset + len as u64)
            .map(|i| (i % 251) as u8)
            .collect()
    };
    let mut file = expected(0, (SECTORS * SECTOR_SIZE) as usize);
    let data = 0x400_000u64;
    // Reads: aligned, odd buffer address, odd sector, several blocks from an odd sector.
    for (sector, addr, len) in [
        (0, data, 4096),
        (0, data + 1, 4096),
        (3, data, 512),
        (7, data + 512, 9000 / 512 * 512),
    ] {
        mem.write_slice(&vec![0xee; len], GuestAddress(addr))
            .unwrap();
        let used = serve(
            engine,
            &disk,
            &mem,
            &one(&mem, VIRTIO_BLK_T_IN, sector, addr, len as u32),
        );
        assert_eq!(used, len as u32 + 1, "read {sector} {addr:#x} {len}");
        assert_eq!(status_of(&mem, 0), VIRTIO_BLK_S_OK);
        let mut got = vec![0u8; len];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        assert!(
            got == expected(sector * 512, len),
            "read {sector} {addr:#x} {len}"
        );
    }
    // Writes: the same shapes.
    for (i, (sector, addr, len)) in [
        (8, data, 4096),
        (16, data + 3, 4096),
        (25, data, 512),
        (33, data + 512, 3072),
    ]
    .into_iter()
    .enumerate()
    {
        let payload: Vec<u8> = (0..len).map(|b| (b * 3 + i) as u8).collect();
        mem.write_slice(&payload, GuestAddress(addr)).unwrap();
        let used = serve(
            engine,
            &disk,
            &mem,
            &one(&mem, VIRTIO_BLK_T_OUT, sector, addr, len as u32),
        );
        assert_eq!(used, 1);
        assert_eq!(
            status_of(&mem, 0),
            VIRTIO_BLK_S_OK,
            "write {sector} {addr:#x} {len}"
        );
        let at = (sector * 512) as usize;
        file[at..at + len].copy_from_slice(&payload);
    }
    let mut on_disk = vec![0u8; file.len()];
    tmp.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk == file, "the image differs from what was written");
}

#[test]
fn direct_requests_on_the_sync_engine() {
    direct_requests(IoEngine::Sync);
}

#[test]
fn direct_requests_on_io_uring() {
    direct_requests(IoEngine::IoUring);
}

#[test]
fn direct_is_refused_for_an_image_of_partial_blocks() {
    let tmp = TempFile::new().unwrap();
    tmp.as_file().set_len(4096 + 512).unwrap();
    match DiskImage::open_with(tmp.as_path(), false, None, true) {
        // Hosts whose O_DIRECT block is 512 bytes take it.
        Ok(disk) => assert_eq!(disk.direct_align, Some(512)),
        Err(e) => assert!(matches!(e, BlockError::DirectSize { .. }), "{e}"),
    }
}

/// The io_uring request path (pop, parse, queue, one io_uring_enter, reap, complete) allocates
/// nothing once each of the ring's slots served a request; run on the test's thread.
#[test]
fn io_uring_requests_allocate_nothing_once_warm() {
    use crate::alloc_count::{STEADY_STATE_ALLOCATIONS, allocations};
    use crate::worker::EventHandler;

    let mem = test_memory();
    let tmp = image();
    let disk = Arc::new(DiskImage::open(tmp.as_path(), false, None).unwrap());
    let ring = Arc::new(std::sync::Mutex::new(engine::Ring::new(4).unwrap()));
    let q = TestQueue::new(&mem, 4);
    let interrupt = Arc::new(RecordingInterrupt::default());
    let mut handler = uring::UringHandler::new(
        activation(&mem, &interrupt, vec![q.active_queue(0)], 0),
        disk,
        ring,
    )
    .unwrap();
    for round in 0..6u64 {
        // Four requests at once, so every slot is used each round.
        for n in 0..4 {
            let kind = if n % 2 == 0 {
                VIRTIO_BLK_T_IN
            } else {
                VIRTIO_BLK_T_OUT
            };
            q.add_chain(&request(&mem, n, kind, n * 8, 4096));
        }
        let ((), count) = allocations(|| {
            handler.serve_for_test();
            handler.quiesce();
        });
        assert_eq!(q.used(&mem).len() as u64, (round + 1) * 4);
        if round > 0 {
            assert_eq!(count, STEADY_STATE_ALLOCATIONS, "round {round}");
        }
    }
}

#[test]
fn a_host_refusing_io_uring_is_named_with_the_way_out() {
    let e = BlockError::Ring {
        path: "d.img".into(),
        source: RingError::Setup(std::io::Error::from_raw_os_error(libc::EPERM)),
    };
    let text = e.to_string();
    assert!(
        text.contains("d.img")
            && text.contains("engine=io_uring")
            && text.contains("io_uring_disabled")
            && text.contains("engine=sync"),
        "{text}"
    );
}
