//! Pausing real devices in the middle of traffic, driven through a transport's registers as a
//! driver would: the same scenarios run behind virtio-mmio (mmio/tests.rs) and virtio-pci
//! (pci/tests). Each checks that while paused nothing is served, and that across any number of
//! pauses every request or frame is served exactly once, in order.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use crate::Block;
use crate::device::{PauseError, VirtioDevice};
use crate::net::{Net, NetBackend, VNET_HDR_LEN};
use crate::snapshot::{MmioState, PciState, RestoreError, SnapshotError};
use crate::testing::{TestQueue, eventually, readable, writable};

/// A transport as the scenarios drive it: the driver's side of its registers, and the VMM's
/// pause and resume.
pub(crate) trait DriverPort {
    /// Feature negotiation, the queues as the driver laid them out, then DRIVER_OK (virtio
    /// 1.2, 3.1.1).
    fn bring_up(&mut self, features: u64, queues: &[&TestQueue]);
    /// The driver notifies `queue` through the transport's notification register.
    fn notify(&mut self, queue: u16);
    fn status(&mut self) -> u8;
    fn pause(&mut self) -> Result<(), PauseError>;
    fn resume(&mut self) -> Result<(), PauseError>;
    /// The transport's snapshot (`save_state`).
    fn save(&self) -> Result<SavedPort, SnapshotError>;
    /// `restore_state` of a state of this transport's kind.
    fn restore(&mut self, state: &SavedPort) -> Result<(), RestoreError>;
}

/// A transport's saved state, whichever the transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum SavedPort {
    Mmio(MmioState),
    Pci(PciState),
}

/// A test queue's `[desc, avail, used]` guest addresses, as a driver writes them into the
/// transport's registers.
pub(crate) fn addresses(queue: &TestQueue) -> [u64; 3] {
    let rings = queue.rings();
    [rings.desc_table.0, rings.avail_ring.0, rings.used_ring.0]
}

/// Builds a transport around a device on the scenario's guest memory.
pub(crate) type MakePort = fn(Box<dyn VirtioDevice>, GuestMemoryMmap) -> Box<dyn DriverPort>;

/// What a paused device must not do for this long: serve a chain.
pub(crate) const QUIET: Duration = Duration::from_millis(60);

const REQUESTS_PER_ROUND: u64 = 12;
const ROUNDS: u64 = 4;
/// Per request: header, 512 data bytes, status, each in its own area.
const HEADERS: u64 = 0x2_0000;
pub(crate) const DATA: u64 = 0x3_0000;
pub(crate) const STATUS: u64 = 0x4_0000;

pub(crate) fn block_request(mem: &GuestMemoryMmap, tq: &TestQueue, kind: u32, n: u64) {
    let header = HEADERS + 16 * n;
    mem.write_obj(kind, GuestAddress(header)).unwrap();
    mem.write_obj(0u32, GuestAddress(header + 4)).unwrap();
    mem.write_obj(n, GuestAddress(header + 8)).unwrap();
    let data = if kind == VIRTIO_BLK_T_OUT {
        mem.write_slice(&[n as u8 + 1; 512], GuestAddress(DATA + 512 * n))
            .unwrap();
        readable(DATA + 512 * n, 512)
    } else {
        writable(DATA + 512 * n, 512)
    };
    mem.write_obj(0xffu8, GuestAddress(STATUS + n)).unwrap();
    tq.add_chain(&[readable(header, 16), data, writable(STATUS + n, 1)]);
}

/// Writes sector n with byte n + 1, `ROUNDS` times a batch pausing right after the kick
/// (racing the worker), then checks the paused device stays quiet, that it finishes after the
/// resume, and that every request completed once with its data on the disk.
pub(crate) fn block_pauses_mid_traffic(make: MakePort) {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(512 * 64).unwrap();
    let block = Block::new(image.as_path(), false, None).unwrap();
    // Every request of the test in its own descriptors: TestQueue does not reuse them.
    const _: () = assert!(3 * REQUESTS_PER_ROUND * ROUNDS <= 256);
    let features = block.features();
    let mem = crate::testing::test_memory();
    let tq = TestQueue::at(&mem, GuestAddress(0x1_0000), 256);
    let mut port = make(Box::new(block), mem.clone());
    port.bring_up(features, &[&tq]);
    let mut sent = 0;
    for _ in 0..ROUNDS {
        // Half a batch, paused right after the kick (racing the worker).
        for _ in 0..REQUESTS_PER_ROUND / 2 {
            block_request(&mem, &tq, VIRTIO_BLK_T_OUT, sent);
            sent += 1;
        }
        port.notify(0);
        port.pause().unwrap();
        let served = tq.used(&mem).len();
        // Paused: the other half and its kick wait, nothing is served.
        for _ in 0..REQUESTS_PER_ROUND / 2 {
            block_request(&mem, &tq, VIRTIO_BLK_T_OUT, sent);
            sent += 1;
        }
        port.notify(0);
        std::thread::sleep(QUIET);
        assert_eq!(
            tq.used(&mem).len(),
            served,
            "a paused device served a chain"
        );
        // Pausing twice is harmless.
        port.pause().unwrap();
        port.resume().unwrap();
        assert!(
            eventually(|| tq.used(&mem).len() == sent as usize),
            "{} of {sent} requests served after the resume",
            tq.used(&mem).len()
        );
    }
    // Every chain once, in order, with the whole header + data + status written.
    let used = tq.used(&mem);
    let heads: Vec<u32> = used.iter().map(|&(head, _)| head).collect();
    let expected: Vec<u32> = (0..sent as u32).map(|n| 3 * n).collect();
    assert_eq!(heads, expected);
    for n in 0..sent {
        let status: u8 = mem.read_obj(GuestAddress(STATUS + n)).unwrap();
        assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "request {n}");
    }
    let mut disk = vec![0u8; 512 * sent as usize];
    std::os::unix::fs::FileExt::read_exact_at(image.as_file(), &mut disk, 0).unwrap();
    for (n, sector) in disk.chunks(512).enumerate() {
        assert!(sector.iter().all(|&b| b == n as u8 + 1), "sector {n}");
    }
    assert_eq!(port.status() & crate::transport::STATUS_NEEDS_RESET, 0);
}

/// A datagram socket standing in for a tap queue.
#[derive(Debug)]
pub(crate) struct SocketTap(pub(crate) UnixDatagram);

impl AsRawFd for SocketTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for SocketTap {
    fn name(&self) -> &str {
        "sockettap"
    }
    fn supported_offloads(&self) -> u32 {
        0
    }
    fn set_offloads(&self, _offloads: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// A frame (vnet header + payload) that carries its sequence number.
pub(crate) fn numbered_frame(n: u32) -> Vec<u8> {
    let mut frame = vec![0u8; VNET_HDR_LEN + 60];
    frame[VNET_HDR_LEN..VNET_HDR_LEN + 4].copy_from_slice(&n.to_le_bytes());
    frame
}

pub(crate) fn frame_number(frame: &[u8]) -> u32 {
    u32::from_le_bytes(frame[VNET_HDR_LEN..VNET_HDR_LEN + 4].try_into().unwrap())
}

/// Frames both ways through the in-process queue pair, pausing in the middle of each batch:
/// the peer gets every transmitted frame once and in order, the guest every received one, and
/// nothing moves while the device is paused, neither from the guest nor from the tap.
pub(crate) fn net_pauses_mid_traffic(make: MakePort) {
    const FRAMES: u32 = 16;
    let (tap, peer) = UnixDatagram::pair().unwrap();
    tap.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let net = Net::new(Arc::new(SocketTap(tap)), None).unwrap();
    let features = net.features();
    let mem = crate::testing::test_memory();
    let rxq = TestQueue::at(&mem, GuestAddress(0x1_0000), 128);
    let txq = TestQueue::at(&mem, GuestAddress(0x1_8000), 128);
    let mut port = make(Box::new(net), mem.clone());
    port.bring_up(features, &[&rxq, &txq]);

    let mut at_peer = Vec::new();
    let drain_peer = |at_peer: &mut Vec<u32>| {
        let mut buf = [0u8; 256];
        while let Ok(n) = peer.recv(&mut buf) {
            at_peer.push(frame_number(&buf[..n]));
        }
    };
    let mut next_tx = 0u32;
    let mut next_rx = 0u32;
    for _ in 0..ROUNDS {
        // Guest to host: half a batch, paused right after the kick, the rest while paused.
        let send = |txq: &TestQueue, next_tx: &mut u32| {
            let frame = numbered_frame(*next_tx);
            let addr = 0x5_0000 + 0x100 * u64::from(*next_tx % 256);
            mem.write_slice(&frame, GuestAddress(addr)).unwrap();
            txq.add_chain(&[readable(addr, frame.len() as u32)]);
            *next_tx += 1;
        };
        for _ in 0..FRAMES / 2 {
            send(&txq, &mut next_tx);
        }
        port.notify(1);
        port.pause().unwrap();
        for _ in 0..FRAMES / 2 {
            send(&txq, &mut next_tx);
        }
        drain_peer(&mut at_peer);
        let sent = at_peer.len();
        // Host to guest while paused: the frames and the guest's buffers both wait.
        for _ in 0..FRAMES {
            peer.send(&numbered_frame(next_rx)).unwrap();
            let addr = 0x7_0000 + 0x100 * u64::from(next_rx % 256);
            rxq.add_chain(&[writable(addr, 0x100)]);
            next_rx += 1;
        }
        port.notify(0);
        port.notify(1);
        std::thread::sleep(QUIET);
        drain_peer(&mut at_peer);
        assert_eq!(at_peer.len(), sent, "a paused device transmitted");
        let received = rxq.used(&mem).len();
        assert_eq!(
            received,
            (next_rx - FRAMES) as usize,
            "a paused device received"
        );
        port.resume().unwrap();
        assert!(eventually(|| {
            drain_peer(&mut at_peer);
            at_peer.len() == next_tx as usize && rxq.used(&mem).len() == next_rx as usize
        }));
    }
    assert_eq!(
        at_peer,
        (0..next_tx).collect::<Vec<_>>(),
        "tx once, in order"
    );
    let used = rxq.used(&mem);
    for (n, &(head, len)) in used.iter().enumerate() {
        assert_eq!(len as usize, VNET_HDR_LEN + 60, "frame {n}");
        assert_eq!(head as usize, n % 128);
        let addr = 0x7_0000 + 0x100 * (n as u64 % 256);
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
        assert_eq!(frame_number(&frame), n as u32, "rx once, in order");
    }
    assert_eq!(port.status() & crate::transport::STATUS_NEEDS_RESET, 0);
}
