//! Snapshots of real devices in the middle of traffic, driven through a transport's registers
//! as a driver would; each scenario runs behind virtio-mmio (mmio/tests.rs) and virtio-pci
//! (pci/tests/snapshot.rs). The device is paused with work queued, saved (through JSON, as a
//! snapshot file carries it), dropped, and restored into a fresh transport around a fresh
//! device: the restored device must stay quiet until its resume, then serve everything that was
//! queued exactly once, in order, replaying nothing, and go on serving new work.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::pause_scenarios::{
    DATA, DriverPort, MakePort, QUIET, STATUS, SavedPort, SocketTap, block_request, frame_number,
    numbered_frame,
};
use crate::device::VirtioDevice;
use crate::net::{Net, VNET_HDR_LEN};
use crate::snapshot::{CoreState, DeviceState};
use crate::testing::{SharedWriter, TestQueue, eventually, readable, test_memory, writable};
use crate::{Block, Console, Rng};

/// The core of either transport's state.
pub(crate) fn core(state: &SavedPort) -> &CoreState {
    match state {
        SavedPort::Mmio(state) => &state.core,
        SavedPort::Pci(state) => &state.core,
    }
}

/// Pauses `port`, saves it, sends the state through JSON, drops the port (and its device: a
/// disk's lock goes with it), builds a fresh port around `device()` and restores there. The
/// restored transport saves to the same state, and refuses a second restore.
pub(crate) fn snapshot_restore(
    mut port: Box<dyn DriverPort>,
    make: MakePort,
    mem: &GuestMemoryMmap,
    device: impl FnOnce() -> Box<dyn VirtioDevice>,
) -> (Box<dyn DriverPort>, SavedPort) {
    port.pause().unwrap();
    let state = port.save().unwrap();
    let json = serde_json::to_string(&state).unwrap();
    drop(port);
    let carried: SavedPort = serde_json::from_str(&json).unwrap();
    assert_eq!(carried, state);
    let mut port = make(device(), mem.clone());
    port.restore(&carried).unwrap();
    assert_eq!(
        port.save().unwrap(),
        state,
        "restored state saves differently"
    );
    assert!(matches!(
        port.restore(&carried),
        Err(crate::snapshot::RestoreError::NotFresh)
    ));
    (port, state)
}

fn check_block_requests(mem: &GuestMemoryMmap, tq: &TestQueue, image: &TempFile, count: u64) {
    let heads: Vec<u32> = tq.used(mem).iter().map(|&(head, _)| head).collect();
    let expected: Vec<u32> = (0..count as u32).map(|n| 3 * n).collect();
    assert_eq!(heads, expected, "every request once, in order");
    for n in 0..count {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + n)).unwrap();
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "request {n}");
    }
    let mut disk = vec![0u8; 512 * count as usize];
    std::os::unix::fs::FileExt::read_exact_at(image.as_file(), &mut disk, 0).unwrap();
    for (n, sector) in disk.chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == n as u8 + 1), "sector {n}");
    }
}

/// Writes to a disk, snapshots with requests queued, restores onto the same image and
/// resumes: each request is written once, the queued ones after the resume.
pub(crate) fn block_continues_after_restore(make: MakePort) {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(512 * 64).unwrap();
    let path = image.as_path().to_owned();
    let open = || Box::new(Block::new(&path, false, None).unwrap()) as Box<dyn VirtioDevice>;
    let device = open();
    let features = device.features();
    let mem = test_memory();
    let tq = TestQueue::at(&mem, GuestAddress(0x1_0000), 256);
    let mut port = make(device, mem.clone());
    port.bring_up(features, &[&tq]);
    for n in 0..6 {
        block_request(&mem, &tq, VIRTIO_BLK_T_OUT, n);
    }
    port.notify(0);
    assert!(eventually(|| tq.used(&mem).len() == 6));
    // Queued and kicked, then paused at once: some may be served before the pause.
    for n in 6..12 {
        block_request(&mem, &tq, VIRTIO_BLK_T_OUT, n);
    }
    port.notify(0);
    port.pause().unwrap();
    let served = tq.used(&mem).len();
    let (mut port, state) = snapshot_restore(port, make, &mem, open);
    let queue = &core(&state).queues[0];
    assert_eq!(
        (queue.next_avail, queue.next_used),
        (served as u16, served as u16)
    );
    assert!(matches!(&core(&state).device, DeviceState::Block(b) if b.sectors == 64));
    std::thread::sleep(QUIET);
    assert_eq!(tq.used(&mem).len(), served, "served before the resume");
    port.resume().unwrap();
    assert!(eventually(|| tq.used(&mem).len() == 12));
    for n in 12..16 {
        block_request(&mem, &tq, VIRTIO_BLK_T_OUT, n);
    }
    port.notify(0);
    assert!(eventually(|| tq.used(&mem).len() == 16));
    std::thread::sleep(QUIET);
    check_block_requests(&mem, &tq, &image, 16);
}

/// Frames both ways: transmitted ones queued at the snapshot reach the peer once after the
/// resume, received ones waiting in the tap reach the guest once, and both go on.
pub(crate) fn net_continues_after_restore(make: MakePort) {
    let (tap, peer) = UnixDatagram::pair().unwrap();
    tap.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let open = move || {
        let tap = SocketTap(tap.try_clone().unwrap());
        Box::new(Net::new(Arc::new(tap), None).unwrap()) as Box<dyn VirtioDevice>
    };
    let device = open();
    let features = device.features();
    let mem = test_memory();
    let rxq = TestQueue::at(&mem, GuestAddress(0x1_0000), 128);
    let txq = TestQueue::at(&mem, GuestAddress(0x1_8000), 128);
    let mut port = make(device, mem.clone());
    port.bring_up(features, &[&rxq, &txq]);
    let send = |n: u32| {
        let frame = numbered_frame(n);
        let addr = 0x5_0000 + 0x100 * u64::from(n);
        mem.write_slice(&frame, GuestAddress(addr)).unwrap();
        txq.add_chain(&[readable(addr, frame.len() as u32)]);
    };
    let receive = |n: u32| {
        peer.send(&numbered_frame(n)).unwrap();
        rxq.add_chain(&[writable(0x7_0000 + 0x100 * u64::from(n), 0x100)]);
    };
    let mut at_peer = Vec::new();
    let drain = |at_peer: &mut Vec<u32>| {
        let mut buf = [0u8; 256];
        while let Ok(n) = peer.recv(&mut buf) {
            at_peer.push(frame_number(&buf[..n]));
        }
        at_peer.len()
    };
    (0..8).for_each(send);
    port.notify(1);
    assert!(eventually(|| drain(&mut at_peer) == 8));
    port.pause().unwrap();
    // While paused: frames to send, frames to receive and buffers for them.
    (8..16).for_each(send);
    (0..8).for_each(receive);
    port.notify(0);
    port.notify(1);
    let (mut port, state) = snapshot_restore(port, make, &mem, open);
    assert!(matches!(&core(&state).device, DeviceState::Net(n) if n.active_pairs == 1));
    std::thread::sleep(QUIET);
    assert_eq!(drain(&mut at_peer), 8, "transmitted before the resume");
    assert_eq!(rxq.used(&mem).len(), 0, "received before the resume");
    port.resume().unwrap();
    assert!(eventually(
        || drain(&mut at_peer) == 16 && rxq.used(&mem).len() == 8
    ));
    (16..20).for_each(send);
    (8..12).for_each(receive);
    port.notify(0);
    port.notify(1);
    assert!(eventually(
        || drain(&mut at_peer) == 20 && rxq.used(&mem).len() == 12
    ));
    std::thread::sleep(QUIET);
    assert_eq!(drain(&mut at_peer), 20);
    assert_eq!(at_peer, (0..20).collect::<Vec<_>>(), "tx once, in order");
    let used = rxq.used(&mem);
    assert_eq!(used.len(), 12);
    for (n, &(head, len)) in used.iter().enumerate() {
        assert_eq!((head as usize, len as usize), (n, VNET_HDR_LEN + 60));
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        let addr = 0x7_0000 + 0x100 * n as u64;
        mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
        assert_eq!(frame_number(&frame), n as u32, "rx once, in order");
    }
}

/// Host input typed while paused travels in the snapshot and reaches the guest once after the
/// resume; guest output queued at the snapshot is written once, by the restored device.
pub(crate) fn console_continues_after_restore(make: MakePort) {
    let (before, after) = (SharedWriter::default(), SharedWriter::default());
    let console = Console::new(Box::new(before.clone())).unwrap();
    let input = console.input();
    let features = console.features();
    let mem = test_memory();
    let rxq = TestQueue::at(&mem, GuestAddress(0x1_0000), 64);
    let txq = TestQueue::at(&mem, GuestAddress(0x1_8000), 64);
    let mut port = make(Box::new(console), mem.clone());
    port.bring_up(features, &[&rxq, &txq]);
    let output = |text: &[u8], addr: u64| {
        mem.write_slice(text, GuestAddress(addr)).unwrap();
        txq.add_chain(&[readable(addr, text.len() as u32)]);
    };
    output(b"before ", DATA);
    port.notify(1);
    assert!(eventually(|| before.contents() == b"before "));
    port.pause().unwrap();
    assert_eq!(input.push(b"typed while paused"), 18);
    output(b"queued", DATA + 0x100);
    port.notify(1);
    let restored = Console::new(Box::new(after.clone())).unwrap();
    let (mut port, state) = snapshot_restore(port, make, &mem, || Box::new(restored));
    assert!(matches!(&core(&state).device,
        DeviceState::Console(c) if c.pending_input == b"typed while paused"));
    std::thread::sleep(QUIET);
    assert!(after.contents().is_empty(), "written before the resume");
    port.resume().unwrap();
    assert!(eventually(|| after.contents() == b"queued"));
    rxq.add_chain(&[writable(DATA + 0x1000, 64)]);
    port.notify(0);
    assert!(eventually(|| rxq.used(&mem).len() == 1));
    std::thread::sleep(QUIET);
    assert_eq!(rxq.used(&mem), vec![(0, 18)], "input delivered once");
    let mut typed = [0u8; 18];
    mem.read_slice(&mut typed, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert_eq!(&typed, b"typed while paused");
    assert_eq!(
        before.contents(),
        b"before ",
        "the old device wrote after the snapshot"
    );
    assert_eq!(after.contents(), b"queued");
}

/// Entropy requests queued at the snapshot are served once after the resume.
pub(crate) fn rng_continues_after_restore(make: MakePort) {
    let open = || Box::new(Rng::new()) as Box<dyn VirtioDevice>;
    let device = open();
    let features = device.features();
    let mem = test_memory();
    let tq = TestQueue::at(&mem, GuestAddress(0x1_0000), 64);
    let mut port = make(device, mem.clone());
    port.bring_up(features, &[&tq]);
    let request = |n: u64| {
        tq.add_chain(&[writable(DATA + 0x100 * n, 16)]);
    };
    (0..4).for_each(request);
    port.notify(0);
    assert!(eventually(|| tq.used(&mem).len() == 4));
    port.pause().unwrap();
    (4..8).for_each(request);
    port.notify(0);
    let (mut port, state) = snapshot_restore(port, make, &mem, open);
    assert_eq!(core(&state).queues[0].next_avail, 4);
    std::thread::sleep(QUIET);
    assert_eq!(tq.used(&mem).len(), 4, "served before the resume");
    port.resume().unwrap();
    assert!(eventually(|| tq.used(&mem).len() == 8));
    (8..10).for_each(request);
    port.notify(0);
    assert!(eventually(|| tq.used(&mem).len() == 10));
    std::thread::sleep(QUIET);
    let expected: Vec<(u32, u32)> = (0..10).map(|n| (n, 16)).collect();
    assert_eq!(tq.used(&mem), expected, "every request once, in order");
}
