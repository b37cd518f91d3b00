use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::*;
use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::request::{DiskImage, handle_request};
use super::*;
use crate::testing::{RecordingInterrupt, TestQueue, activation, readable, test_memory, writable};

const HEADER: u64 = 0x10_000;
const DATA: u64 = 0x20_000;
const STATUS: u64 = 0xf0_000;
const DISK_SECTORS: u64 = 64;

/// A temp image of DISK_SECTORS sectors where byte i holds i % 251.
fn image() -> TempFile {
    let tmp = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i % 251) as u8)
        .collect();
    tmp.as_file().write_all_at(&bytes, 0).unwrap();
    tmp
}

fn disk(tmp: &TempFile, read_only: bool) -> DiskImage {
    disk_on(tmp.as_file().try_clone().unwrap(), "test.img", read_only)
}

fn disk_on(file: std::fs::File, name: &str, read_only: bool) -> DiskImage {
    let mut id = [0u8; 20];
    id[..6].copy_from_slice(b"serial");
    DiskImage {
        file,
        sectors: DISK_SECTORS,
        read_only,
        id,
        name: name.to_string(),
        errors: Arc::default(),
        flush_failed: std::sync::atomic::AtomicBool::new(false),
        direct_align: None,
    }
}

/// Serves `chain` on this thread's engine.
fn serve_on_engine(disk: &DiskImage, mem: &GuestMemoryMmap, chain: crate::Chain<'_>) -> u32 {
    match ENGINE.get() {
        IoEngine::Sync => handle_request(disk, mem, chain),
        IoEngine::IoUring => super::uring::serve_one(disk, mem, chain),
    }
}

// The request tests again, each request served through an io_uring.
tests_on_io_uring!(
    read_into_multiple_segments,
    write_from_multiple_segments_with_any_layout,
    flush_and_get_id,
    discard_and_write_zeroes,
    read_only_disk_refuses_writes,
    out_of_range_and_unaligned_requests_fail,
    zero_length_buffers_are_skipped_and_4_gib_ones_refused,
    requests_beyond_the_advertised_seg_max_or_size_max_fail,
    malformed_chains,
    host_errors_are_logged_once_per_cause_and_all_counted,
    a_failed_flush_fails_every_later_flush,
    reads_mark_the_guest_pages_they_fill,
);

fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) -> RawDescriptor {
    let mut raw = [0u8; 16];
    raw[..4].copy_from_slice(&kind.to_le_bytes());
    raw[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(HEADER)).unwrap();
    readable(HEADER, 16)
}

/// The data descriptor of a `kind` request: device-writable for IN, device-readable otherwise.
fn data_for(kind: u32, addr: u64, len: u32) -> RawDescriptor {
    if kind == VIRTIO_BLK_T_IN {
        writable(addr, len)
    } else {
        readable(addr, len)
    }
}

fn status_desc(mem: &GuestMemoryMmap) -> RawDescriptor {
    mem.write_obj(0xaau8, GuestAddress(STATUS)).unwrap();
    writable(STATUS, 1)
}

fn status(mem: &GuestMemoryMmap) -> u32 {
    u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

/// Submits one chain and returns the used length.
fn submit(disk: &DiskImage, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> u32 {
    let tq = TestQueue::new(mem, 16);
    tq.add_chain(descs);
    let mut queue = tq.queue();
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    serve_on_engine(disk, mem, chain)
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn file_bytes(tmp: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    tmp.as_file().read_exact_at(&mut buf, offset).unwrap();
    buf
}

#[test]
fn read_into_multiple_segments() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let h = header(&mem, VIRTIO_BLK_T_IN, 3);
    let s = status_desc(&mem);
    let used = submit(
        &disk,
        &mem,
        &[h, writable(DATA, 512), writable(DATA + 0x1000, 1024), s],
    );
    assert_eq!(used, 1536 + 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let mut got = guest_bytes(&mem, DATA, 512);
    got.extend(guest_bytes(&mem, DATA + 0x1000, 1024));
    assert_eq!(got, file_bytes(&tmp, 3 * 512, 1536));
}

#[test]
fn write_from_multiple_segments_with_any_layout() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let payload: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    // The header and the first data bytes share one descriptor (VERSION_1 allows any framing).
    header(&mem, VIRTIO_BLK_T_OUT, 10);
    mem.write_slice(&payload[..100], GuestAddress(HEADER + 16))
        .unwrap();
    mem.write_slice(&payload[100..], GuestAddress(DATA))
        .unwrap();
    let s = status_desc(&mem);
    let used = submit(
        &disk,
        &mem,
        &[readable(HEADER, 116), readable(DATA, 1948), s],
    );
    assert_eq!(used, 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&tmp, 10 * 512, 2048), payload);
}

#[test]
fn flush_and_get_id() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let h = header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, s]), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);

    let h = header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, writable(DATA, 20), s]), 21);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    assert_eq!(&guest_bytes(&mem, DATA, 20)[..7], b"serial\0");
}

fn range(mem: &GuestMemoryMmap, sector: u64, sectors: u32, flags: u32) -> RawDescriptor {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&sector.to_le_bytes());
    raw[8..12].copy_from_slice(&sectors.to_le_bytes());
    raw[12..].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(DATA)).unwrap();
    readable(DATA, 16)
}

#[test]
fn discard_and_write_zeroes() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    for (kind, flags) in [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
    ] {
        let h = header(&mem, kind, 0);
        let r = range(&mem, 8, 8, flags);
        let s = status_desc(&mem);
        assert_eq!(submit(&disk, &mem, &[h, r, s]), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_OK, "type {kind} flags {flags}");
        if kind == VIRTIO_BLK_T_WRITE_ZEROES {
            assert_eq!(file_bytes(&tmp, 8 * 512, 8 * 512), vec![0u8; 8 * 512]);
            // Data around the range is untouched.
            assert_eq!(
                file_bytes(&tmp, 16 * 512, 1),
                vec![((16 * 512) % 251) as u8]
            );
            tmp.as_file().write_all_at(&[1u8; 4096], 8 * 512).unwrap();
        }
    }
    // Flags a discard does not know, and a range past the end.
    let h = header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let r = range(&mem, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, r, s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_UNSUPP);
    let h = header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let r = range(&mem, DISK_SECTORS - 1, 2, 0);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, r, s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    // Two ranges where max_discard_seg is one.
    let h = header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, readable(DATA, 32), s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
}

#[test]
fn read_only_disk_refuses_writes() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, true);
    let before = file_bytes(&tmp, 0, (DISK_SECTORS * SECTOR_SIZE) as usize);
    let h = header(&mem, VIRTIO_BLK_T_OUT, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, readable(DATA, 512), s]), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let h = header(&mem, kind, 0);
        let r = range(&mem, 0, 8, 0);
        let s = status_desc(&mem);
        submit(&disk, &mem, &[h, r, s]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(file_bytes(&tmp, 0, before.len()), before);
    // Reads still work.
    let h = header(&mem, VIRTIO_BLK_T_IN, 0);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, writable(DATA, 512), s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let cases: [(u32, u64, u32); 5] = [
        (VIRTIO_BLK_T_IN, u64::MAX, 512),        // sector * 512 overflows
        (VIRTIO_BLK_T_IN, u64::MAX / 512, 1024), // offset + len overflows
        (VIRTIO_BLK_T_IN, DISK_SECTORS, 512),    // just past the end
        (VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, 1024),
        (VIRTIO_BLK_T_IN, 0, 100), // not a multiple of 512
    ];
    for (kind, sector, len) in cases {
        let h = header(&mem, kind, sector);
        let data = data_for(kind, DATA, len);
        let s = status_desc(&mem);
        assert_eq!(submit(&disk, &mem, &[h, data, s]), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "{kind} {sector} {len}");
    }
    // The last sector itself is fine.
    let h = header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS - 1);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, writable(DATA, 512), s]), 513);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

#[test]
fn zero_length_buffers_are_skipped_and_4_gib_ones_refused() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    // Empty descriptors around the data change nothing.
    let h = header(&mem, VIRTIO_BLK_T_IN, 1);
    let s = status_desc(&mem);
    let descs = [
        h,
        writable(DATA, 0),
        writable(DATA, 512),
        writable(DATA, 0),
        s,
    ];
    assert_eq!(submit(&disk, &mem, &descs), 513);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    assert_eq!(guest_bytes(&mem, DATA, 512), file_bytes(&tmp, 512, 512));
    // A request whose only data is empty reads nothing and succeeds.
    let h = header(&mem, VIRTIO_BLK_T_IN, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, writable(DATA, 0), s]), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    // Nearly 4 GiB in one descriptor, either way: IOERR before any I/O or guest-memory access.
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let len = u32::MAX - 32;
        let h = header(&mem, kind, 0);
        let data = data_for(kind, DATA, len);
        let s = status_desc(&mem);
        assert_eq!(submit(&disk, &mem, &[h, data, s]), 1);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "{kind}");
    }
    // With the header, u32::MAX makes the chain longer than 4 GiB: virtio-queue ends it before
    // the status descriptor, so the request is returned unanswered (used length 0).
    let h = header(&mem, VIRTIO_BLK_T_IN, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[h, writable(DATA, u32::MAX), s]), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xaa);
}

#[test]
fn requests_beyond_the_advertised_seg_max_or_size_max_fail() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    // A buffer over size_max (1 MiB), in either direction: refused before any I/O (the disk is
    // far smaller, but the size check comes first and names the real reason).
    for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
        let h = header(&mem, kind, 0);
        let big = SEGMENT_MAX_BYTES + 512;
        let data = data_for(kind, 0x100_000, big);
        let s = status_desc(&mem);
        submit_big(&disk, &mem, &[h, data, s]);
        assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR, "{kind}");
    }
    // seg_max + 1 one-sector buffers: refused; seg_max of them: served (from a disk with room).
    let big_tmp = TempFile::new().unwrap();
    big_tmp.as_file().set_len(512 * 512).unwrap();
    let disk = DiskImage {
        sectors: 512,
        file: big_tmp.as_file().try_clone().unwrap(),
        ..disk
    };
    for (segments, want) in [
        (usize::from(SEG_MAX) + 1, VIRTIO_BLK_S_IOERR),
        (usize::from(SEG_MAX), VIRTIO_BLK_S_OK),
    ] {
        let mut descs = vec![header(&mem, VIRTIO_BLK_T_IN, 0)];
        descs.extend((0..segments as u64).map(|i| writable(0x100_000 + 512 * (i % 32), 512)));
        descs.push(status_desc(&mem));
        submit_big(&disk, &mem, &descs);
        assert_eq!(status(&mem), want, "{segments} segments");
    }
}

/// Like `submit`, on a queue large enough for long chains.
fn submit_big(disk: &DiskImage, mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> u32 {
    let tq = TestQueue::new(mem, 512);
    tq.add_chain(descs);
    let mut queue = tq.queue();
    let chain = queue.pop_descriptor_chain(mem).unwrap();
    serve_on_engine(disk, mem, chain)
}

#[test]
fn malformed_chains() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    // Last descriptor readable: no status byte, nothing to report.
    let h = header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        submit(&disk, &mem, &[h, writable(DATA, 512), readable(STATUS, 1)]),
        0
    );
    // Zero-length status descriptor.
    let h = header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(submit(&disk, &mem, &[h, writable(STATUS, 0)]), 0);
    // Readable after writable.
    let h = header(&mem, VIRTIO_BLK_T_OUT, 0);
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[writable(DATA, 512), h, s]), 0);
    // Status outside guest memory.
    let h = header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(submit(&disk, &mem, &[h, writable(0x4000_0000, 1)]), 0);
    // Descriptor wrapping the address space.
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[readable(u64::MAX - 4, 16), s]), 0);

    // (request type or None for a short header, data descriptor, expected status)
    let cases: [(Option<u32>, Option<RawDescriptor>, u32); 6] = [
        (None, None, VIRTIO_BLK_S_IOERR),
        (
            Some(VIRTIO_BLK_T_IN),
            Some(readable(DATA, 512)),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            Some(VIRTIO_BLK_T_OUT),
            Some(writable(DATA, 512)),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            Some(VIRTIO_BLK_T_IN),
            Some(writable(0x4000_0000, 512)),
            VIRTIO_BLK_S_IOERR,
        ),
        (
            Some(VIRTIO_BLK_T_OUT),
            Some(readable(0x4000_0000, 512)),
            VIRTIO_BLK_S_IOERR,
        ),
        (Some(0x77), None, VIRTIO_BLK_S_UNSUPP),
    ];
    for (kind, data, want) in cases {
        let h = match kind {
            Some(kind) => header(&mem, kind, 0),
            None => readable(HEADER, 8),
        };
        let mut descs = vec![h];
        descs.extend(data);
        descs.push(status_desc(&mem));
        assert_eq!(submit(&disk, &mem, &descs), 1);
        assert_eq!(status(&mem), want, "{kind:?} {data:?}");
    }
    // A lone status byte: no header at all.
    let s = status_desc(&mem);
    assert_eq!(submit(&disk, &mem, &[s]), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
}

#[test]
fn constructor_locks_validates_and_fills_config() {
    let tmp = image();
    let path = tmp.as_path().to_owned();
    let block = Block::new(&path, false, Some("disk-1")).unwrap();
    assert_eq!(block.capacity_sectors(), DISK_SECTORS);
    let mut cap = [0u8; 8];
    block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_ne!(block.features() & feature(VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(block.features() & feature(VIRTIO_BLK_F_RO), 0);
    // Flush is offered unless the disk is made without it (cache_type Unsafe), and only it
    // goes.
    let all = block.features();
    assert_ne!(all & feature(VIRTIO_BLK_F_FLUSH), 0);
    let block = block.without_flush();
    assert_eq!(block.features(), all & !feature(VIRTIO_BLK_F_FLUSH));

    // A second user of the same image is refused, naming the path.
    let err = Block::new(&path, false, None).unwrap_err();
    assert!(matches!(err, BlockError::Locked { .. }));
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
    assert!(Block::new(&path, true, None).is_err());
    drop(block);

    // Read-only users share the image.
    let ro1 = Block::new(&path, true, None).unwrap();
    let ro2 = Block::new(&path, true, None).unwrap();
    assert_ne!(ro1.features() & feature(VIRTIO_BLK_F_RO), 0);
    assert_eq!(ro2.features() & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert!(Block::new(&path, false, None).is_err());

    let err = Block::new(&path, true, Some("123456789012345678901")).unwrap_err();
    assert!(matches!(err, BlockError::SerialTooLong { .. }));
    let err = Block::new(std::path::Path::new("/nonexistent/disk.img"), false, None).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/disk.img"), "{err}");
}

/// Sends one IN request through a real worker and waits for its completion.
fn read_via_worker(block: &mut Block, mem: &GuestMemoryMmap, ring: GuestAddress) {
    let tq = TestQueue::at(mem, ring, 16);
    let active = tq.active_queue(0);
    let kick = active.kick.try_clone().unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let features = block.features();
    block
        .activate(activation(mem, &interrupt, vec![active], features))
        .unwrap();
    assert!(matches!(
        block.activate(activation(
            mem,
            &interrupt,
            vec![tq.active_queue(0)],
            features
        )),
        Err(ActivateError::AlreadyActive)
    ));

    let h = header(mem, VIRTIO_BLK_T_IN, 1);
    let s = status_desc(mem);
    tq.add_chain(&[h, writable(DATA, 512), s]);
    kick.write(1).unwrap();
    assert!(interrupt.wait_for(0, 1), "no interrupt from the worker");
    assert_eq!(tq.used(mem), vec![(0, 513)]);
    assert_eq!(status(mem), VIRTIO_BLK_S_OK);
    block.reset();
}

#[test]
fn worker_serves_kicks_and_survives_reset() {
    let mem = test_memory();
    let tmp = image();
    let mut block = Block::new(tmp.as_path(), false, None).unwrap();
    read_via_worker(&mut block, &mem, GuestAddress(0));
    // After reset the device activates again, here with rings elsewhere as a reloaded driver
    // might place them.
    read_via_worker(&mut block, &mem, GuestAddress(0x8000));
    block.reset();
    block.reset();
    assert!(matches!(
        block.activate(activation(&mem, &Arc::default(), vec![], 0)),
        Err(ActivateError::QueueCount { got: 0, want: 1 })
    ));
}

/// Warnings logged in this test process, once [`capture_warnings`] installed the logger.
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn capture_warnings() {
    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Warn
        }
        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                WARNINGS.lock().unwrap().push(record.args().to_string());
            }
        }
        fn flush(&self) {}
    }
    static CAPTURE: Capture = Capture;
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// The captured warnings that mention `name`.
fn warnings_about(name: &str) -> Vec<String> {
    WARNINGS
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(name))
        .cloned()
        .collect()
}

/// Host I/O errors on /dev/full: writes fail with ENOSPC (a full host disk), fdatasync with
/// EINVAL, reads succeed. Each cause is logged once however often the guest retries, every
/// failure is counted, and the device goes on serving requests.
#[test]
fn host_errors_are_logged_once_per_cause_and_all_counted() {
    capture_warnings();
    let mem = test_memory();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/full")
        .unwrap();
    let name = format!("full-disk-under-test-{:?}", ENGINE.get());
    let name = name.as_str();
    let disk = disk_on(file, name, false);
    let request = |kind: u32, data: Option<RawDescriptor>| {
        let mut descs = vec![header(&mem, kind, 0)];
        descs.extend(data);
        descs.push(status_desc(&mem));
        submit(&disk, &mem, &descs);
        status(&mem)
    };
    for _ in 0..20 {
        assert_eq!(
            request(VIRTIO_BLK_T_OUT, Some(readable(DATA, 4096))),
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            request(VIRTIO_BLK_T_IN, Some(writable(DATA, 4096))),
            VIRTIO_BLK_S_OK
        );
    }
    assert_eq!(disk.errors.count(), 20);
    let lines = warnings_about(name);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("No space left on device"), "{lines:?}");

    // The first flush fails in fdatasync; later ones must fail too (see the next test), each
    // cause logged once.
    for _ in 0..5 {
        assert_eq!(request(VIRTIO_BLK_T_FLUSH, None), VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(disk.errors.count(), 25);
    let lines = warnings_about(name);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(lines[1].contains("Invalid argument"), "{lines:?}");
    assert!(lines[2].contains("an earlier flush failed"), "{lines:?}");
    // Errors the guest causes itself are not host errors: neither counted nor warned about.
    let h = header(&mem, VIRTIO_BLK_T_IN, DISK_SECTORS);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, writable(DATA, 512), s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.errors.count(), 25);
    assert_eq!(warnings_about(name).len(), 3);
}

/// Once fdatasync failed, Linux may have marked unwritten pages clean and the next fdatasync
/// would report success: no later flush may tell the guest its earlier writes are durable, even
/// when the host call itself would now succeed.
#[test]
fn a_failed_flush_fails_every_later_flush() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let flush = || {
        let h = header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let s = status_desc(&mem);
        assert_eq!(submit(&disk, &mem, &[h, s]), 1);
        status(&mem)
    };
    assert_eq!(flush(), VIRTIO_BLK_S_OK);
    // What a failed fdatasync leaves behind (see the previous test for the real failure).
    disk.flush_failed
        .store(true, std::sync::atomic::Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(flush(), VIRTIO_BLK_S_IOERR);
    }
    // Reads and writes still work.
    let h = header(&mem, VIRTIO_BLK_T_OUT, 0);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, readable(DATA, 512), s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
    let h = header(&mem, VIRTIO_BLK_T_IN, 0);
    let s = status_desc(&mem);
    submit(&disk, &mem, &[h, writable(DATA, 512), s]);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK);
}

/// A disk read writes the guest's buffers through raw iovecs (preadv, io_uring) and the status
/// byte through vm-memory: with tracking on, a Diff snapshot sees those pages and not the
/// header's, which the device only reads.
#[test]
fn reads_mark_the_guest_pages_they_fill() {
    let (mem, tmp) = (test_memory(), image());
    let disk = disk(&tmp, false);
    let log = crate::dirty::DirtyLog::track(&mem);
    let h = header(&mem, VIRTIO_BLK_T_IN, 3);
    let s = status_desc(&mem);
    let used = submit(
        &disk,
        &mem,
        &[h, writable(DATA, 512), writable(DATA + 0x3000, 1024), s],
    );
    assert_eq!(used, 1536 + 1);
    let page = |addr: u64| (addr / 4096) as usize;
    let mut want = vec![page(DATA), page(DATA + 0x3000), page(STATUS)];
    want.sort_unstable();
    assert_eq!(crate::dirty::tests::pages(&log, 0), want);
    assert_ne!(page(HEADER), page(DATA));
    assert_ne!(page(HEADER), page(STATUS));
}
