use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rxtx::{Delivery, deliver_frame, transmit};
use super::*;
use crate::test_utils::{
    RecordingInterrupt, TestQueue, eventually, readable, test_memory, writable,
};

/// A datagram socket standing in for the tap: one frame per message, like a tap fd.
#[derive(Debug)]
struct SocketBackend {
    socket: UnixDatagram,
    supported: u32,
    offloads: Mutex<Vec<u32>>,
}

impl AsRawFd for SocketBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl NetBackend for SocketBackend {
    fn name(&self) -> &str {
        "socket"
    }
    fn supported_offloads(&self) -> u32 {
        self.supported
    }
    fn set_offloads(&self, offloads: u32) -> io::Result<()> {
        self.offloads.lock().unwrap().push(offloads);
        Ok(())
    }
}

/// The backend and the "host network" end of it.
fn backend(supported: u32) -> (Arc<SocketBackend>, UnixDatagram) {
    let (ours, peer) = UnixDatagram::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let backend = SocketBackend {
        socket: ours,
        supported,
        offloads: Mutex::new(Vec::new()),
    };
    (Arc::new(backend), peer)
}

/// A frame with a vnet header whose flags byte is 1 (NEEDS_CSUM) and `len` payload bytes.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f[0] = 1;
    f.extend((0..len).map(|i| (i % 253) as u8));
    f
}

fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
    buf
}

fn transmit_one(
    backend: &SocketBackend,
    mem: &GuestMemoryMmap,
    descs: &[RawDescriptor],
    counters: &NetCounters,
) -> u32 {
    let tq = TestQueue::new(mem, 16);
    tq.add_chain(descs);
    let chain = tq.queue().pop_descriptor_chain(mem).unwrap();
    transmit(backend, mem, chain, counters)
}

#[test]
fn transmit_gathers_header_and_payload_into_one_frame() {
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let counters = NetCounters::default();
    let f = frame(1500);
    mem.write_slice(&f[..VNET_HDR_LEN], GuestAddress(0x10_000))
        .unwrap();
    mem.write_slice(&f[VNET_HDR_LEN..], GuestAddress(0x20_000))
        .unwrap();
    let used = transmit_one(
        &backend,
        &mem,
        &[readable(0x10_000, 12), readable(0x20_000, 1500)],
        &counters,
    );
    assert_eq!(used, 0);
    let mut got = vec![0u8; 4096];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &f[..]);
    assert_eq!(counters.tx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(counters.tx_bytes.load(Ordering::Relaxed), 1500);
}

#[test]
fn transmit_drops_malformed_chains_and_counts_backend_errors() {
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let counters = NetCounters::default();
    // Shorter than the header; only device-writable; outside guest memory; over 64 KiB.
    transmit_one(&backend, &mem, &[readable(0x10_000, 4)], &counters);
    transmit_one(&backend, &mem, &[writable(0x10_000, 64)], &counters);
    transmit_one(&backend, &mem, &[readable(0x4000_0000, 64)], &counters);
    transmit_one(&backend, &mem, &[readable(0x10_000, 0x20_000)], &counters);
    // Zero-length only, and a 4 GiB - 1 descriptor.
    transmit_one(&backend, &mem, &[readable(0x10_000, 0)], &counters);
    transmit_one(&backend, &mem, &[readable(0x10_000, u32::MAX)], &counters);
    assert_eq!(counters.tx_malformed.load(Ordering::Relaxed), 6);
    peer.set_nonblocking(true).unwrap();
    assert!(
        peer.recv(&mut [0u8; 16]).is_err(),
        "nothing may reach the network"
    );

    drop(peer);
    transmit_one(&backend, &mem, &[readable(0x10_000, 64)], &counters);
    assert_eq!(counters.tx_errors.load(Ordering::Relaxed), 1);
    assert_eq!(counters.tx_frames.load(Ordering::Relaxed), 0);
}

#[test]
fn receive_without_mergeable_buffers_needs_one_big_enough_chain() {
    let mem = test_memory();
    let tq = TestQueue::new(&mem, 16);
    let counters = NetCounters::default();
    tq.add_chain(&[writable(0x10_000, 50)]);
    let (mut rx, _) = tq.device_queue(false);

    // Too big for the chain: dropped and counted, the chain stays for the next frame.
    let mut big = frame(100);
    assert_eq!(
        deliver_frame(&mut rx, &mem, &mut big, false, &counters),
        Delivery::Dropped
    );
    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), 1);
    assert!(tq.used(&mem).is_empty());

    let mut small = frame(30);
    assert_eq!(
        deliver_frame(&mut rx, &mem, &mut small, false, &counters),
        Delivery::Delivered
    );
    assert_eq!(tq.used(&mem), vec![(0, 42)]);
    let mut want = small.clone();
    want[10] = 1; // num_buffers
    assert_eq!(guest_bytes(&mem, 0x10_000, 42), want);

    let mut next = frame(10);
    assert_eq!(
        deliver_frame(&mut rx, &mem, &mut next, false, &counters),
        Delivery::NoBuffers
    );
    assert_eq!(counters.rx_frames.load(Ordering::Relaxed), 1);
    assert_eq!(counters.rx_bytes.load(Ordering::Relaxed), 30);
}

#[test]
fn receive_with_mergeable_buffers_spreads_a_frame() {
    let mem = test_memory();
    let tq = TestQueue::new(&mem, 16);
    let counters = NetCounters::default();
    tq.add_chain(&[writable(0x10_000, 1024)]);
    tq.add_chain(&[writable(0x20_000, 1024)]);
    let (mut rx, _) = tq.device_queue(true);
    let mut f = frame(3000);

    // Two buffers are not enough: nothing is consumed.
    assert_eq!(
        deliver_frame(&mut rx, &mem, &mut f, true, &counters),
        Delivery::NoBuffers
    );
    assert!(tq.used(&mem).is_empty());
    assert_eq!(rx.queue.next_avail(), 0);
    // The driver must kick when it adds the third buffer (avail_event = 2).
    assert!(!rx.notify_on_more(&mem));

    tq.add_chain(&[writable(0x30_000, 512), writable(0x38_000, 512)]);
    tq.add_chain(&[writable(0x40_000, 1024)]);
    assert_eq!(
        deliver_frame(&mut rx, &mem, &mut f, true, &counters),
        Delivery::Delivered
    );
    assert_eq!(tq.used(&mem), vec![(0, 1024), (1, 1024), (2, 964)]);
    let mut got = guest_bytes(&mem, 0x10_000, 1024);
    got.extend(guest_bytes(&mem, 0x20_000, 1024));
    got.extend(guest_bytes(&mem, 0x30_000, 512));
    got.extend(guest_bytes(&mem, 0x38_000, 452));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
    // The fourth chain is still available for the next frame.
    assert!(rx.has_available(&mem));
}

#[test]
fn malformed_receive_chains_stop_the_queue() {
    let mem = test_memory();
    let counters = NetCounters::default();
    for descs in [
        vec![readable(0x10_000, 100)],
        vec![writable(0x10_000, 8)],
        vec![writable(0x4000_0000, 1024)],
    ] {
        let tq = TestQueue::new(&mem, 16);
        tq.add_chain(&descs);
        tq.add_chain(&[writable(0x20_000, 1024)]);
        let (mut rx, _) = tq.device_queue(false);
        let mut f = frame(64);
        assert_ne!(
            deliver_frame(&mut rx, &mem, &mut f, true, &counters),
            Delivery::Delivered
        );
        assert!(rx.is_stopped(), "{descs:?}");
        assert!(rx.pop(&mem).is_none());
    }
}

#[test]
fn offloads_follow_what_the_guest_accepted() {
    let guest = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | feature(*b));
    assert_eq!(tun_offloads(0), 0);
    assert_eq!(tun_offloads(guest(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
    assert_eq!(
        tun_offloads(guest(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6])),
        libc::TUN_F_CSUM | libc::TUN_F_TSO6
    );

    let (limited, _peer) = backend(libc::TUN_F_CSUM);
    let net = Net::new(limited, None);
    assert_ne!(net.features() & feature(VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_eq!(net.features() & feature(VIRTIO_NET_F_GUEST_TSO4), 0);

    let (full, _peer) = backend(tap::GUEST_OFFLOADS);
    let mut net = Net::new(full.clone(), Some([0x52, 0x54, 0, 1, 2, 3]));
    let offered = net.features();
    assert_ne!(offered & feature(VIRTIO_NET_F_GUEST_ECN), 0);
    // A guest taking everything but GUEST_TSO6.
    net.ack_features(offered & !feature(VIRTIO_NET_F_GUEST_TSO6));
    net.reset();
    assert_eq!(
        *full.offloads.lock().unwrap(),
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO_ECN, 0]
    );

    let mut config = [0u8; 8];
    net.read_config(0, &mut config);
    assert_eq!(
        config,
        [0x52, 0x54, 0, 1, 2, 3, 1, 0],
        "MAC then status LINK_UP"
    );
    let generated = Net::new(backend(0).0, None).mac();
    assert_eq!(generated[0] & 0x03, 0x02, "locally administered unicast");
}

#[test]
fn worker_moves_frames_both_ways_and_reactivates() {
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let mut net = Net::new(backend, None);
    let counters = net.counters();
    for (round, base) in [0u64, 0x8000].into_iter().enumerate() {
        let rxq = TestQueue::at(&mem, GuestAddress(base), 16);
        let txq = TestQueue::at(&mem, GuestAddress(base + 0x2000), 16);
        let (rx_active, tx_active) = (rxq.active_queue(0), txq.active_queue(1));
        let rx_kick = rx_active.kick.try_clone().unwrap();
        let tx_kick = tx_active.kick.try_clone().unwrap();
        let interrupt = Arc::new(RecordingInterrupt::default());
        net.ack_features(net.features());
        net.activate(mem.clone(), interrupt.clone(), vec![rx_active, tx_active])
            .unwrap();

        // Guest to host.
        let f = frame(200);
        mem.write_slice(&f, GuestAddress(0x50_000)).unwrap();
        txq.add_chain(&[readable(0x50_000, f.len() as u32)]);
        tx_kick.write(1).unwrap();
        assert!(interrupt.wait_for(1, 1));
        let mut got = vec![0u8; 1024];
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);

        // Host to guest while the guest has no buffers: the frame waits, nothing is dropped.
        let incoming = frame(100 + round);
        peer.send(&incoming).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(rxq.used(&mem).is_empty());
        rxq.add_chain(&[writable(0x60_000, 2048)]);
        rx_kick.write(1).unwrap();
        assert!(interrupt.wait_for(0, 1));
        assert_eq!(rxq.used(&mem), vec![(0, incoming.len() as u32)]);
        let mut want = incoming.clone();
        want[10] = 1;
        assert_eq!(guest_bytes(&mem, 0x60_000, incoming.len()), want);
        net.reset();
    }
    assert!(eventually(
        || counters.rx_frames.load(Ordering::Relaxed) == 2
    ));
    assert_eq!(counters.tx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(counters.rx_dropped.load(Ordering::Relaxed), 0);
}
