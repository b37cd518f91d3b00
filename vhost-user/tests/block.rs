//! pvm-vhost-user-blk driven through pvm's vhost-user frontend: reads and writes of several
//! sizes and layouts verified byte for byte against the image file, FLUSH, GET_ID, read-only
//! refusal, hostile chains, a driver reload, and the backend's exit when pvm goes away.

mod support;

use std::os::unix::fs::FileExt;

use pvm_vhost::user::{Kind, VhostUserDevice};
use pvm_virtio::testing::{EventInterrupt, TestQueue, readable, writable};
use pvm_virtio::{Activation, VirtioDevice};
use support::{Backend, scratch, shared_memory};
use virtio_bindings::bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const BLK: &str = env!("CARGO_BIN_EXE_pvm-vhost-user-blk");
const DISK_BYTES: usize = 1 << 20;
const HEADER: u64 = 0x10_0000;
const STATUS: u64 = 0x10_1000;
const DATA: u64 = 0x20_0000;

fn image_bytes() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i * 7 % 251) as u8).collect()
}

/// Publishes one request: header, data buffers (`(len, device_writes)`), status byte.
fn request(ring: &TestQueue, mem: &GuestMemoryMmap, kind: u32, sector: u64, data: &[u32]) -> u16 {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&kind.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let device_writes = kind != VIRTIO_BLK_T_OUT;
    let mut descs = vec![readable(HEADER, 16)];
    let mut at = DATA;
    for &len in data {
        descs.push(if device_writes {
            writable(at, len)
        } else {
            readable(at, len)
        });
        at += u64::from(len) + 0x1000;
    }
    descs.push(writable(STATUS, 1));
    ring.add_chain(&descs)
}

/// Kicks, waits for the interrupt and returns the request's used length and status byte.
fn complete(ring: &TestQueue, irq: &EventInterrupt, mem: &GuestMemoryMmap, head: u16) -> (u32, u8) {
    ring.want_interrupt();
    ring.kick();
    assert!(irq.wait(0), "no interrupt");
    let used = ring.take_used();
    assert_eq!(used.len(), 1, "{used:?}");
    assert_eq!(used[0].0, u32::from(head));
    (used[0].1, mem.read_obj(GuestAddress(STATUS)).unwrap())
}

/// The guest bytes of data buffers laid out as [`request`] does.
fn buffers(mem: &GuestMemoryMmap, data: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = DATA;
    for &len in data {
        let mut chunk = vec![0u8; len as usize];
        mem.read_slice(&mut chunk, GuestAddress(at)).unwrap();
        out.extend(chunk);
        at += u64::from(len) + 0x1000;
    }
    out
}

fn fill_buffers(mem: &GuestMemoryMmap, data: &[u32], seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = DATA;
    for &len in data {
        let chunk: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(13) ^ seed)
            .collect();
        mem.write_slice(&chunk, GuestAddress(at)).unwrap();
        out.extend(chunk);
        at += u64::from(len) + 0x1000;
    }
    out
}

fn connect(socket: &std::path::Path) -> VhostUserDevice {
    let device = VhostUserDevice::connect(Kind::Block, socket, 0).unwrap();
    assert_eq!(device.device_type(), 2);
    device
}

#[test]
fn reads_writes_flushes_and_survives_a_driver_reload() {
    let dir = scratch("blk-rw");
    let image = dir.join("disk.img");
    let mut expected = image_bytes();
    std::fs::write(&image, &expected).unwrap();
    let socket = dir.join("blk.sock");
    let backend = Backend::start(
        &[],
        BLK,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--disk",
            image.to_str().unwrap(),
        ],
    );
    let mut device = connect(&socket);
    assert_eq!(device.capacity_sectors(), Some((DISK_BYTES / 512) as u64));
    let mut capacity = [0u8; 8];
    device.read_config(0, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), (DISK_BYTES / 512) as u64);
    let features = device.features();
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_SEG_MAX,
        32, /* VERSION_1 */
        29, /* EVENT_IDX */
    ] {
        assert_ne!(
            features & (1 << bit),
            0,
            "feature {bit} missing in {features:#x}"
        );
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    // Bit 30 is the vhost-user protocol bit, never the guest's business.
    assert_eq!(features & (1 << 30), 0);
    let file = std::fs::File::open(&image).unwrap();

    let mem = shared_memory();
    for round in 0..2u8 {
        // Round 1 is a driver reload: reset, fresh rings, DRIVER_OK again.
        let ring = TestQueue::at(
            &mem,
            GuestAddress(0x1000 * (1 + u64::from(round)) * 16),
            256,
        );
        let irq = EventInterrupt::new(1);
        device
            .activate(Activation {
                memory: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![ring.active_queue(0)],
                features,
            })
            .unwrap();

        // Reads of several sizes and layouts, compared with the image.
        for (sector, layout) in [
            (0u64, vec![512u32]),
            (8, vec![4096, 512, 3584]),
            (100, vec![65536, 65536, 131072]),
            (2047, vec![512]),
        ] {
            let head = request(&ring, &mem, VIRTIO_BLK_T_IN, sector, &layout);
            let total: u32 = layout.iter().sum();
            assert_eq!(complete(&ring, &irq, &mem, head), (total + 1, 0));
            let at = sector as usize * 512;
            assert!(
                buffers(&mem, &layout) == expected[at..at + total as usize],
                "read of {layout:?} at sector {sector} differs from the image"
            );
        }

        // Writes, then FLUSH: the file holds them byte for byte.
        for (sector, layout) in [(16u64, vec![512u32, 1024]), (300, vec![8192, 4096, 512])] {
            let data = fill_buffers(&mem, &layout, round);
            let head = request(&ring, &mem, VIRTIO_BLK_T_OUT, sector, &layout);
            assert_eq!(complete(&ring, &irq, &mem, head), (1, 0));
            let at = sector as usize * 512;
            expected[at..at + data.len()].copy_from_slice(&data);
        }
        let head = request(&ring, &mem, VIRTIO_BLK_T_FLUSH, 0, &[]);
        assert_eq!(complete(&ring, &irq, &mem, head), (1, 0));
        let mut on_disk = vec![0u8; DISK_BYTES];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(
            on_disk == expected,
            "the image differs after writes and flush"
        );

        // GET_ID: 20 bytes (no serial: zeros).
        let head = request(&ring, &mem, VIRTIO_BLK_T_GET_ID, 0, &[20]);
        assert_eq!(complete(&ring, &irq, &mem, head), (21, 0));

        // Hostile requests get an error status or are dropped, never take the backend down.
        let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 2048, &[512]);
        assert_eq!(
            complete(&ring, &irq, &mem, head).1,
            VIRTIO_BLK_S_IOERR as u8
        );
        let head = request(&ring, &mem, VIRTIO_BLK_T_IN, u64::MAX / 256, &[512]);
        assert_eq!(
            complete(&ring, &irq, &mem, head).1,
            VIRTIO_BLK_S_IOERR as u8
        );
        let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[100]);
        assert_eq!(
            complete(&ring, &irq, &mem, head).1,
            VIRTIO_BLK_S_IOERR as u8
        );
        let head = request(&ring, &mem, 77, 0, &[]);
        assert_eq!(
            complete(&ring, &irq, &mem, head).1,
            VIRTIO_BLK_S_UNSUPP as u8
        );
        // A device-readable buffer after the status byte: no status, used length 0.
        let head = ring.add_chain(&[
            readable(HEADER, 16),
            writable(STATUS, 1),
            readable(DATA, 512),
        ]);
        assert_eq!(complete(&ring, &irq, &mem, head).0, 0);
        // A buffer outside guest memory.
        mem.write_slice(&[0u8; 16], GuestAddress(HEADER)).unwrap();
        let head = ring.add_chain(&[
            readable(HEADER, 16),
            writable(1 << 40, 512),
            writable(STATUS, 1),
        ]);
        assert_eq!(
            complete(&ring, &irq, &mem, head).1,
            VIRTIO_BLK_S_IOERR as u8
        );

        device.reset();
    }
    drop(device);
    assert_eq!(backend.wait(), 0);
}

#[test]
fn a_read_only_disk_refuses_writes() {
    let dir = scratch("blk-ro");
    let image = dir.join("disk.img");
    std::fs::write(&image, image_bytes()).unwrap();
    let socket = dir.join("blk.sock");
    let disk = format!("{},ro", image.display());
    let backend = Backend::start(
        &[],
        BLK,
        &["--socket", socket.to_str().unwrap(), "--disk", &disk],
    );
    let mut device = connect(&socket);
    let features = device.features();
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    let mem = shared_memory();
    let ring = TestQueue::at(&mem, GuestAddress(0x1000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    fill_buffers(&mem, &[4096], 9);
    let head = request(&ring, &mem, VIRTIO_BLK_T_OUT, 0, &[4096]);
    assert_eq!(
        complete(&ring, &irq, &mem, head).1,
        VIRTIO_BLK_S_IOERR as u8
    );
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[4096]);
    assert_eq!(complete(&ring, &irq, &mem, head), (4097, 0));
    assert!(
        std::fs::read(&image).unwrap() == image_bytes(),
        "the read-only image changed"
    );
    drop(device);
    assert_eq!(backend.wait(), 0);
}

#[test]
fn bad_flags_are_one_line_and_exit_2() {
    let dir = scratch("blk-flags");
    for (args, needle) in [
        (vec!["--disk", "x.img"], "--socket"),
        (vec!["--socket", "s"], "--disk"),
        (
            vec!["--socket", "s", "--disk", "x.img,rw"],
            "unknown disk option 'rw'",
        ),
        (
            vec!["--socket", "s", "--disk", "/nonexistent.img"],
            "/nonexistent.img",
        ),
        (vec!["--socket", "/", "--disk", "x.img"], "directory"),
        (
            vec!["--socket", "s", "--disk", "x.img", "--bogus"],
            "--bogus",
        ),
    ] {
        let out = std::process::Command::new(BLK)
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("pvm-vhost-user-blk: "), "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn a_broken_ring_is_stopped_until_the_driver_resets() {
    let dir = scratch("blk-broken");
    let image = dir.join("disk.img");
    std::fs::write(&image, image_bytes()).unwrap();
    let socket = dir.join("blk.sock");
    let backend = Backend::start(
        &[],
        BLK,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--disk",
            image.to_str().unwrap(),
        ],
    );
    let mut device = connect(&socket);
    let features = device.features();
    let mem = shared_memory();
    let ring = TestQueue::at(&mem, GuestAddress(0x1000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    // A driver claiming 1000 buffers on a 256-entry ring: the backend stops the ring rather
    // than reading garbage, and answers nothing, not even later valid requests.
    ring.set_avail_idx(&mem, 1000);
    ring.want_interrupt();
    ring.kick();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(ring.take_used().is_empty());
    ring.set_avail_idx(&mem, 0);
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    ring.want_interrupt();
    ring.kick();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        ring.take_used().is_empty(),
        "a stopped ring was served (head {head})"
    );
    // The driver resets the device and starts again: the backend serves the fresh ring.
    device.reset();
    let ring = TestQueue::at(&mem, GuestAddress(0x2_0000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    assert_eq!(complete(&ring, &irq, &mem, head), (513, 0));
    assert!(buffers(&mem, &[512]) == image_bytes()[..512]);
    drop(device);
    assert_eq!(backend.wait(), 0);
}

#[test]
fn garbage_from_a_frontend_ends_the_backend_with_an_error_not_a_panic() {
    use std::io::{Read, Write};
    let dir = scratch("blk-garbage");
    let image = dir.join("disk.img");
    std::fs::write(&image, image_bytes()).unwrap();
    let socket = dir.join("blk.sock");
    let mut child = std::process::Command::new(BLK)
        .args([
            "--socket",
            socket.to_str().unwrap(),
            "--disk",
            image.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("serving") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "the backend ended before listening");
        seen.extend_from_slice(&buf[..n]);
    }
    // A header claiming request 0xffff with a 4 GiB body, then noise.
    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let mut junk = vec![0xffu8; 12];
    junk.extend((0..500u32).map(|i| (i * 37) as u8));
    let _ = stream.write_all(&junk);
    let status = child.wait().unwrap();
    stderr.read_to_end(&mut seen).unwrap();
    let text = String::from_utf8_lossy(&seen);
    assert_eq!(status.code(), Some(1), "{text}");
    assert!(!text.contains("panicked"), "{text}");
    drop(stream);
}

/// The seccomp mode /proc reports for each of `pid`'s threads (2: filter).
fn seccomp_modes(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|task| {
            let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn the_backend_confines_every_thread_once_connected_and_a_forbidden_call_ends_it() {
    let dir = scratch("blk-seccomp");
    let image = dir.join("disk.img");
    std::fs::write(&image, image_bytes()).unwrap();
    let socket = dir.join("blk.sock");
    let args = [
        "--socket",
        socket.to_str().unwrap(),
        "--disk",
        image.to_str().unwrap(),
    ];
    let backend = Backend::start(&[], BLK, &args);
    let device = connect(&socket);
    let pid = backend.child.id();
    let start = std::time::Instant::now();
    let modes = loop {
        let modes = seccomp_modes(pid);
        if modes.len() >= 3 && modes.iter().all(|m| m == "2") {
            break modes;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "backend threads' seccomp modes: {modes:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // Main, the connection thread and the vring worker.
    assert_eq!(modes.len(), 3, "{modes:?}");
    drop(device);
    assert_eq!(backend.wait(), 0);

    // The probe: a forbidden call right after confining ends the backend with exit 6 and one
    // line naming the call (getppid is 110).
    let mut child = std::process::Command::new(BLK)
        .args(args)
        .env(pvm_vhost_user::sandbox::PROBE_ENV, "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    for _ in 0..100 {
        if socket.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(6), "{text}");
    assert!(
        text.contains("pvm-vhost-user-blk: seccomp: forbidden system call 110"),
        "{text}"
    );
}

#[test]
fn a_paused_frontend_stops_the_backend_ring_and_resumes_where_it_stopped() {
    let dir = scratch("blk-pause");
    let image = dir.join("disk.img");
    let expected = image_bytes();
    std::fs::write(&image, &expected).unwrap();
    let socket = dir.join("blk.sock");
    let backend = Backend::start(
        &[],
        BLK,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--disk",
            image.to_str().unwrap(),
        ],
    );
    let mut device = connect(&socket);
    let features = device.features();
    let mem = shared_memory();
    let ring = TestQueue::at(&mem, GuestAddress(0x1000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    assert_eq!(complete(&ring, &irq, &mem, head), (513, 0));

    // Paused: the backend gave the ring back at the position after the one request, and a
    // request made now is not served, kick or not.
    device.pause().unwrap();
    device.pause().unwrap();
    assert_eq!(device.ring_bases(), vec![(0, 1)]);
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 8, &[1024]);
    ring.want_interrupt();
    ring.kick();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(ring.take_used().is_empty(), "a paused ring was served");

    // Resumed from there: the kick that waited brings the request in, served once, with the
    // right sectors.
    device.resume().unwrap();
    assert!(irq.wait(0), "no interrupt after the resume");
    assert_eq!(ring.take_used(), vec![(u32::from(head), 1025)]);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
    assert!(buffers(&mem, &[1024]) == expected[8 * 512..8 * 512 + 1024]);
    assert!(ring.take_used().is_empty());

    // A reset while paused, then a fresh activation, still works.
    device.pause().unwrap();
    device.reset();
    let ring = TestQueue::at(&mem, GuestAddress(0x2_0000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    assert_eq!(complete(&ring, &irq, &mem, head), (513, 0));
    drop(device);
    assert_eq!(backend.wait(), 0);
}

/// A snapshot of a paused vhost-user disk restored onto a new backend (the old one exits with
/// its frontend, as it does when a VM process ends): the fresh frontend stays paused, then
/// serves from the position GET_VRING_BASE took at the pause, each request once.
#[test]
fn a_snapshot_of_a_paused_disk_continues_on_a_new_backend() {
    use pvm_virtio::snapshot::{DeviceState, RestoreError};
    use virtio_queue::QueueT;

    let dir = scratch("blk-snapshot");
    let image = dir.join("disk.img");
    let expected = image_bytes();
    std::fs::write(&image, &expected).unwrap();
    let start = |name: &str| {
        let socket = dir.join(name);
        let args = ["--socket", socket.to_str().unwrap()];
        let backend = Backend::start(
            &[],
            BLK,
            &[args[0], args[1], "--disk", image.to_str().unwrap()],
        );
        (backend, connect(&socket))
    };
    let (backend, mut device) = start("blk1.sock");
    let features = device.features();
    let mem = shared_memory();
    let ring = TestQueue::at(&mem, GuestAddress(0x1000), 256);
    let irq = EventInterrupt::new(1);
    device
        .activate(Activation {
            memory: mem.clone(),
            interrupt: irq.clone(),
            queues: vec![ring.active_queue(0)],
            features,
        })
        .unwrap();
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    assert_eq!(complete(&ring, &irq, &mem, head), (513, 0));
    assert!(
        device.save_state().is_err(),
        "saved while the backend serves"
    );
    device.pause().unwrap();
    let saved = device.save_state().unwrap();
    assert_eq!(saved.queues.len(), 1);
    assert_eq!((saved.queues[0].index, saved.queues[0].next_avail), (0, 1));
    // The backend's used index is in the ring, where the transport reads it.
    assert_eq!(saved.queues[0].next_used, None);
    // Queued at the snapshot, served by nobody yet.
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 8, &[1024]);
    drop(device);
    assert_eq!(backend.wait(), 0);

    let (backend, mut device) = start("blk2.sock");
    let mut queue = ring.active_queue(0);
    queue.queue.set_next_avail(1);
    queue.queue.set_next_used(1);
    let activation = |queue| Activation {
        memory: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![queue],
        features,
    };
    let wrong = DeviceState::Rng;
    assert!(matches!(
        device.restore(None, &wrong),
        Err(RestoreError::DeviceKind { saved: "rng", .. })
    ));
    device
        .restore(Some(activation(queue)), &saved.state)
        .unwrap();
    ring.want_interrupt();
    ring.kick();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(ring.take_used().is_empty(), "served before the resume");
    device.resume().unwrap();
    assert!(irq.wait(0), "no interrupt after the resume");
    assert_eq!(ring.take_used(), vec![(u32::from(head), 1025)]);
    assert!(buffers(&mem, &[1024]) == expected[8 * 512..8 * 512 + 1024]);
    let head = request(&ring, &mem, VIRTIO_BLK_T_IN, 0, &[512]);
    assert_eq!(complete(&ring, &irq, &mem, head), (513, 0));
    drop(device);
    assert_eq!(backend.wait(), 0);
}
