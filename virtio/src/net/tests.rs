use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::rxtx::{Delivery, deliver_frame, transmit};
use super::*;
use crate::device::ActiveQueue;
use crate::testing::{
    RecordingInterrupt, TestQueue, activation, eventually, readable, test_memory, writable,
};

/// A datagram socket standing in for the tap: one frame per message, like a tap fd.
#[derive(Debug)]
struct SocketBackend {
    socket: UnixDatagram,
    supported: u32,
    offloads: Mutex<Vec<u32>>,
    /// set_queue_attached calls, in order.
    attached: Mutex<Vec<bool>>,
    /// Whether set_queue_attached(true) fails.
    refuse_attach: bool,
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
    fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        if attached && self.refuse_attach {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        self.attached.lock().unwrap().push(attached);
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
        attached: Mutex::new(Vec::new()),
        refuse_attach: false,
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
    let net = Net::new(limited, None).unwrap();
    assert_ne!(net.features() & feature(VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_eq!(net.features() & feature(VIRTIO_NET_F_GUEST_TSO4), 0);

    let (full, _peer) = backend(tap::GUEST_OFFLOADS);
    let mut net = Net::new(full.clone(), Some([0x52, 0x54, 0, 1, 2, 3])).unwrap();
    let offered = net.features();
    assert_ne!(offered & feature(VIRTIO_NET_F_GUEST_ECN), 0);
    // A guest taking everything but GUEST_TSO6: the tap gets the offloads at activation.
    let mem = test_memory();
    let (rxq, txq) = (
        TestQueue::at(&mem, GuestAddress(0), 16),
        TestQueue::at(&mem, GuestAddress(0x2000), 16),
    );
    let queues = vec![rxq.active_queue(0), txq.active_queue(1)];
    let features = offered & !feature(VIRTIO_NET_F_GUEST_TSO6);
    net.activate(activation(&mem, &Arc::default(), queues, features))
        .unwrap();
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
    let generated = Net::new(backend(0).0, None).unwrap().mac();
    assert_eq!(generated[0] & 0x03, 0x02, "locally administered unicast");
}

#[test]
fn worker_moves_frames_both_ways_and_reactivates() {
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let mut net = Net::new(backend, None).unwrap();
    let counters = net.counters();
    for (round, base) in [0u64, 0x8000].into_iter().enumerate() {
        let rxq = TestQueue::at(&mem, GuestAddress(base), 16);
        let txq = TestQueue::at(&mem, GuestAddress(base + 0x2000), 16);
        let (rx_active, tx_active) = (rxq.active_queue(0), txq.active_queue(1));
        let rx_kick = rx_active.kick.try_clone().unwrap();
        let tx_kick = tx_active.kick.try_clone().unwrap();
        let interrupt = Arc::new(RecordingInterrupt::default());
        let features = net.features();
        net.activate(activation(
            &mem,
            &interrupt,
            vec![rx_active, tx_active],
            features,
        ))
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

// ---- multiqueue ----

use super::multiqueue::{CtrlCounters, Pairs, ctrl_command};
use vmm_sys_util::eventfd::EventFd;

mod limit_tests;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;

/// `count` socket backends (and their peers) as one multi-queue tap's queues.
fn queue_backends(count: usize) -> (Vec<Arc<SocketBackend>>, Vec<UnixDatagram>) {
    (0..count).map(|_| backend(0)).unzip()
}

fn as_backends(sockets: &[Arc<SocketBackend>]) -> Vec<Arc<dyn NetBackend>> {
    sockets
        .iter()
        .map(|s| Arc::clone(s) as Arc<dyn NetBackend>)
        .collect()
}

fn attach_calls(backend: &SocketBackend) -> Vec<bool> {
    backend.attached.lock().unwrap().clone()
}

/// A VQ_PAIRS_SET command for `pairs`: header, data, ack (as Linux lays it out).
fn pairs_set(mem: &GuestMemoryMmap, pairs: u16) -> Vec<RawDescriptor> {
    mem.write_slice(
        &[
            VIRTIO_NET_CTRL_MQ as u8,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
        ],
        GuestAddress(0x10_000),
    )
    .unwrap();
    mem.write_slice(&pairs.to_le_bytes(), GuestAddress(0x10_100))
        .unwrap();
    vec![
        readable(0x10_000, 2),
        readable(0x10_100, 2),
        writable(0x10_200, 1),
    ]
}

/// Runs one control chain; returns the used length and the byte at the ack address (0xee if
/// the device did not write it).
fn ctrl(
    mem: &GuestMemoryMmap,
    pairs: &Pairs,
    mq: bool,
    descs: &[RawDescriptor],
    counters: &CtrlCounters,
) -> (u32, u8) {
    mem.write_obj(0xeeu8, GuestAddress(0x10_200)).unwrap();
    let tq = TestQueue::new(mem, 16);
    tq.add_chain(descs);
    let chain = tq.queue().pop_descriptor_chain(mem).unwrap();
    let used = ctrl_command(mem, chain, pairs, mq, counters);
    (used, mem.read_obj(GuestAddress(0x10_200)).unwrap())
}

#[test]
fn only_a_multiqueue_device_offers_mq_and_the_control_queue() {
    let mq = feature(VIRTIO_NET_F_MQ) | feature(VIRTIO_NET_F_CTRL_VQ);
    let single = Net::new(backend(0).0, Some([0x52, 0x54, 0, 1, 2, 3])).unwrap();
    assert_eq!(single.features() & mq, 0);
    assert_eq!(single.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    let (sockets, _peers) = queue_backends(1);
    let one = Net::with_pairs(as_backends(&sockets), None).unwrap();
    assert_eq!(one.features() & mq, 0);
    assert_eq!(one.queue_max_sizes().len(), 2);
    assert!(attach_calls(&sockets[0]).is_empty());

    let (sockets, _peers) = queue_backends(3);
    let net = Net::with_pairs(as_backends(&sockets), Some([0x52, 0x54, 0, 1, 2, 3])).unwrap();
    assert_eq!(net.features() & mq, mq);
    assert_eq!(net.features() & single.features(), single.features());
    // rx0 tx0 rx1 tx1 rx2 tx2 ctrl.
    assert_eq!(net.queue_max_sizes(), &[QUEUE_SIZE; 7]);
    assert_eq!((net.pair_count(), net.active_pairs()), (3, 1));
    // Only pair 0's tap queue stays attached until the guest asks for more.
    assert!(attach_calls(&sockets[0]).is_empty());
    assert_eq!(attach_calls(&sockets[1]), vec![false]);
    assert_eq!(attach_calls(&sockets[2]), vec![false]);

    let mut config = [0u8; 10];
    net.read_config(0, &mut config);
    assert_eq!(
        config,
        [0x52, 0x54, 0, 1, 2, 3, 1, 0, 3, 0],
        "max_virtqueue_pairs 3"
    );
    let mut pairs = [0u8; 2];
    single.read_config(8, &mut pairs);
    assert_eq!(pairs, [1, 0]);
}

#[test]
fn vq_pairs_set_accepts_only_pairs_the_driver_set_up() {
    let mem = test_memory();
    let (sockets, _peers) = queue_backends(3);
    let pairs = Pairs::new(as_backends(&sockets)).unwrap();
    let counters = CtrlCounters::default();
    // Before activation nothing is usable.
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 2), &counters),
        (1, ERR)
    );
    pairs.activate(3);
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 2), &counters),
        (1, OK)
    );
    assert_eq!(pairs.active(), 2);
    assert_eq!(attach_calls(&sockets[1]), vec![false, true]);
    assert_eq!(attach_calls(&sockets[2]), vec![false]);
    assert!(pairs.link(1).enabled() && !pairs.link(2).enabled());
    for bad in [0, 4, 0x8000, u16::MAX] {
        assert_eq!(
            ctrl(&mem, &pairs, true, &pairs_set(&mem, bad), &counters),
            (1, ERR)
        );
        assert_eq!(pairs.active(), 2, "{bad} pairs");
    }
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 3), &counters),
        (1, OK)
    );
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 1), &counters),
        (1, OK)
    );
    assert_eq!(pairs.active(), 1);
    assert_eq!(attach_calls(&sockets[1]), vec![false, true, false]);
    assert_eq!(attach_calls(&sockets[2]), vec![false, true, false]);
    assert!(!pairs.link(1).enabled() && !pairs.link(2).enabled());
    // Without VIRTIO_NET_F_MQ negotiated the command is refused.
    assert_eq!(
        ctrl(&mem, &pairs, false, &pairs_set(&mem, 2), &counters),
        (1, ERR)
    );
    assert_eq!(pairs.active(), 1);
    assert_eq!(counters.refused.load(Ordering::Relaxed), 6);
    assert_eq!(counters.malformed.load(Ordering::Relaxed), 0);
    // A reset goes back to one pair and nothing usable.
    pairs.reset();
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 2), &counters),
        (1, ERR)
    );
}

#[test]
fn a_pair_whose_tap_queue_cannot_attach_is_refused_and_the_count_stays() {
    let mem = test_memory();
    let (ours, _peer) = UnixDatagram::pair().unwrap();
    let refusing = Arc::new(SocketBackend {
        socket: ours,
        supported: 0,
        offloads: Mutex::new(Vec::new()),
        attached: Mutex::new(Vec::new()),
        refuse_attach: true,
    });
    let (mut sockets, _peers) = queue_backends(2);
    sockets.push(refusing);
    let pairs = Pairs::new(as_backends(&sockets)).unwrap();
    pairs.activate(3);
    let counters = CtrlCounters::default();
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 3), &counters),
        (1, ERR)
    );
    // Pair 1 was turned on on the way and off again.
    assert_eq!(pairs.active(), 1);
    assert_eq!(attach_calls(&sockets[1]), vec![false, true, false]);
    assert!(!pairs.link(1).enabled() && !pairs.link(2).enabled());
    assert_eq!(
        ctrl(&mem, &pairs, true, &pairs_set(&mem, 2), &counters),
        (1, OK)
    );
}

#[test]
fn a_backend_whose_queues_cannot_be_detached_cannot_have_pairs() {
    #[derive(Debug)]
    struct NoQueues(UnixDatagram);
    impl AsRawFd for NoQueues {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }
    impl NetBackend for NoQueues {
        fn name(&self) -> &str {
            "noqueues"
        }
        fn supported_offloads(&self) -> u32 {
            0
        }
        fn set_offloads(&self, _: u32) -> io::Result<()> {
            Ok(())
        }
    }
    let backends: Vec<Arc<dyn NetBackend>> = (0..2)
        .map(|_| Arc::new(NoQueues(UnixDatagram::pair().unwrap().0)) as Arc<dyn NetBackend>)
        .collect();
    let err = Net::with_pairs(backends, None).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot detach queue 1 of tap noqueues"),
        "{err}"
    );
}

#[test]
fn malformed_control_chains_are_refused_or_left_unanswered_never_a_panic() {
    let mem = test_memory();
    let (sockets, _peers) = queue_backends(2);
    let pairs = Pairs::new(as_backends(&sockets)).unwrap();
    pairs.activate(2);
    let counters = CtrlCounters::default();
    let header = |class: u8, command: u8| {
        mem.write_slice(&[class, command], GuestAddress(0x10_000))
            .unwrap();
    };
    // Refused with VIRTIO_NET_ERR: other classes and commands, wrong data lengths, no header.
    header(0, 0); // VIRTIO_NET_CTRL_RX / PROMISC
    let rx_promisc = [
        readable(0x10_000, 2),
        readable(0x10_100, 1),
        writable(0x10_200, 1),
    ];
    assert_eq!(ctrl(&mem, &pairs, true, &rx_promisc, &counters), (1, ERR));
    header(VIRTIO_NET_CTRL_MQ as u8, 1); // RSS_CONFIG, not offered
    let rss = [
        readable(0x10_000, 2),
        readable(0x10_100, 2),
        writable(0x10_200, 1),
    ];
    assert_eq!(ctrl(&mem, &pairs, true, &rss, &counters), (1, ERR));
    header(
        VIRTIO_NET_CTRL_MQ as u8,
        VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8,
    );
    for data in [0u32, 1, 3, 64] {
        let descs = [
            readable(0x10_000, 2),
            readable(0x10_100, data),
            writable(0x10_200, 1),
        ];
        assert_eq!(
            ctrl(&mem, &pairs, true, &descs, &counters),
            (1, ERR),
            "{data}"
        );
    }
    let short = [readable(0x10_000, 1), writable(0x10_200, 1)];
    assert_eq!(ctrl(&mem, &pairs, true, &short, &counters), (1, ERR));
    let no_command = [writable(0x10_200, 1)];
    assert_eq!(ctrl(&mem, &pairs, true, &no_command, &counters), (1, ERR));
    // A huge ack buffer still gets one byte.
    let mut big_ack = pairs_set(&mem, 2);
    big_ack[2] = writable(0x10_200, 4096);
    assert_eq!(ctrl(&mem, &pairs, true, &big_ack, &counters), (1, OK));
    assert_eq!(counters.malformed.load(Ordering::Relaxed), 0);
    assert_eq!(pairs.active(), 2);

    // A command outside guest memory cannot be read: refused.
    let outside = [readable(0x4000_0000, 4), writable(0x10_200, 1)];
    assert_eq!(ctrl(&mem, &pairs, true, &outside, &counters), (1, ERR));

    // Not answerable: no ack byte, the ack outside guest memory.
    let mut no_ack = pairs_set(&mem, 1);
    no_ack.pop();
    assert_eq!(ctrl(&mem, &pairs, true, &no_ack, &counters), (0, 0xee));
    let ack_outside = [
        readable(0x10_000, 2),
        readable(0x10_100, 2),
        writable(0x4000_0000, 1),
    ];
    assert_eq!(ctrl(&mem, &pairs, true, &ack_outside, &counters).0, 0);
    // The ack before the command (device-readable after device-writable).
    let reversed = [writable(0x10_200, 1), readable(0x10_000, 4)];
    assert_eq!(ctrl(&mem, &pairs, true, &reversed, &counters), (0, 0xee));
    assert_eq!(counters.malformed.load(Ordering::Relaxed), 3);
    // None of them changed the pair count.
    assert_eq!(pairs.active(), 2);
}

#[test]
fn multiqueue_workers_serve_each_pair_and_the_control_queue_and_reset_to_one_pair() {
    let mem = test_memory();
    let (sockets, peers) = queue_backends(2);
    for peer in &peers {
        peer.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
    }
    let mut net = Net::with_pairs(as_backends(&sockets), None).unwrap();
    let counters = net.pair_counters();
    for round in 0..2u64 {
        let base = round * 0x10_000;
        let queues: Vec<TestQueue> = (0..5)
            .map(|q| TestQueue::at(&mem, GuestAddress(base + q * 0x2000), 16))
            .collect();
        let active: Vec<ActiveQueue> = (0u16..)
            .zip(&queues)
            .map(|(i, q)| q.active_queue(i))
            .collect();
        let kicks: Vec<EventFd> = active.iter().map(|a| a.kick.try_clone().unwrap()).collect();
        let interrupt = Arc::new(RecordingInterrupt::default());
        let features = net.features();
        net.activate(activation(&mem, &interrupt, active, features))
            .unwrap();
        assert_eq!(net.active_pairs(), 1);

        // Pair 1 is off: what the guest still sends on it leaves through pair 0's tap queue,
        // and nothing is read from its own.
        let f = frame(60 + round as usize);
        mem.write_slice(&f, GuestAddress(0x50_000)).unwrap();
        queues[3].add_chain(&[readable(0x50_000, f.len() as u32)]);
        kicks[3].write(1).unwrap();
        assert!(interrupt.wait_for(3, 1));
        let mut got = vec![0u8; 1024];
        let n = peers[0].recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        let incoming = frame(100 + round as usize);
        peers[1].send(&incoming).unwrap();
        queues[2].add_chain(&[writable(0x60_000, 2048)]);
        kicks[2].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert!(queues[2].used(&mem).is_empty(), "pair 1 is off");

        // The driver turns pair 1 on through the control queue (index 4).
        let mut command = pairs_set(&mem, 2);
        command[0] = readable(0x10_000, 2);
        queues[4].add_chain(&command);
        kicks[4].write(1).unwrap();
        assert!(eventually(|| queues[4].used(&mem) == vec![(0, 1)]));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_200)).unwrap(), OK);
        assert_eq!(net.active_pairs(), 2);

        // Now the waiting frame reaches rx1, and tx1 goes out of pair 1's own tap queue.
        assert!(eventually(|| queues[2].used(&mem).len() == 1));
        let mut want = incoming.clone();
        want[10] = 1;
        assert_eq!(guest_bytes(&mem, 0x60_000, incoming.len()), want);
        queues[3].add_chain(&[readable(0x50_000, f.len() as u32)]);
        kicks[3].write(1).unwrap();
        assert!(eventually(|| queues[3].used(&mem).len() == 2));
        let n = peers[1].recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);

        net.reset();
        assert_eq!(net.active_pairs(), 1);
        assert_eq!(attach_calls(&sockets[1]).last(), Some(&false));
    }
    // Pair 1's counters hold what its worker moved: two frames each way, one of them sent
    // while the pair was off (through pair 0's tap queue, but served by pair 1's worker).
    assert_eq!(counters[1].rx_frames.load(Ordering::Relaxed), 2);
    assert_eq!(counters[1].tx_frames.load(Ordering::Relaxed), 4);
    assert_eq!(counters[0].tx_frames.load(Ordering::Relaxed), 0);
    assert_eq!(
        attach_calls(&sockets[1]),
        vec![false, true, false, true, false]
    );
}

#[test]
fn a_multiqueue_driver_without_mq_gets_one_pair_and_its_control_queue_at_2() {
    let mem = test_memory();
    let (sockets, _peers) = queue_backends(2);
    let mut net = Net::with_pairs(as_backends(&sockets), None).unwrap();
    let queues: Vec<TestQueue> = (0..3)
        .map(|q| TestQueue::at(&mem, GuestAddress(q * 0x2000), 16))
        .collect();
    let active: Vec<ActiveQueue> = (0u16..)
        .zip(&queues)
        .map(|(i, q)| q.active_queue(i))
        .collect();
    let ctrl_kick = active[2].kick.try_clone().unwrap();
    let features = net.features() & !feature(VIRTIO_NET_F_MQ);
    net.activate(activation(&mem, &Arc::default(), active, features))
        .unwrap();
    queues[2].add_chain(&pairs_set(&mem, 2));
    ctrl_kick.write(1).unwrap();
    assert!(eventually(|| queues[2].used(&mem) == vec![(0, 1)]));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_200)).unwrap(), ERR);
    assert_eq!(net.active_pairs(), 1);
    net.reset();

    // Too few queues for even one pair: refused, nothing left running.
    let only_rx = vec![queues[0].active_queue(0)];
    let features = net.features();
    assert!(matches!(
        net.activate(activation(&mem, &Arc::default(), only_rx, features)),
        Err(ActivateError::QueueCount { got: 1, want: 2 })
    ));
    net.reset();
}

#[test]
fn a_frame_waiting_for_buffers_stays_with_the_paused_pair_and_arrives_once() {
    let mem = test_memory();
    let (backend, peer) = backend(0);
    let mut net = Net::new(backend, None).unwrap();
    let rxq = TestQueue::at(&mem, GuestAddress(0), 16);
    let txq = TestQueue::at(&mem, GuestAddress(0x2000), 16);
    let (rx_active, tx_active) = (rxq.active_queue(0), txq.active_queue(1));
    let rx_kick = rx_active.kick.try_clone().unwrap();
    let interrupt = Arc::new(RecordingInterrupt::default());
    let features = net.features();
    assert_ne!(features & feature(VIRTIO_NET_F_MRG_RXBUF), 0);
    net.activate(activation(
        &mem,
        &interrupt,
        vec![rx_active, tx_active],
        features,
    ))
    .unwrap();
    // One 64-byte buffer for a 300-byte frame: with mergeable buffers the frame waits.
    let incoming = frame(300);
    rxq.add_chain(&[writable(0x60_000, 64)]);
    rx_kick.write(1).unwrap();
    peer.send(&incoming).unwrap();
    assert!(eventually(|| {
        net.pause().unwrap();
        let waiting = net.workers[0]
            .paused()
            .and_then(|pair| pair.pending().waiting());
        if waiting.is_none() {
            net.resume().unwrap();
        }
        waiting == Some(incoming.len())
    }));
    let (rx, _) = net.workers[0].paused().unwrap().queues();
    assert_eq!(rx.queue.next_avail(), 0, "the short buffer was put back");
    // More buffers while paused: nothing moves until the resume, then the frame arrives once.
    for chunk in 0..4u64 {
        rxq.add_chain(&[writable(0x61_000 + 0x100 * chunk, 0x100)]);
    }
    rx_kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert!(rxq.used(&mem).is_empty());
    net.resume().unwrap();
    assert!(eventually(|| rxq.used(&mem).len() == 2));
    assert_eq!(
        rxq.used(&mem),
        vec![(0, 64), (1, incoming.len() as u32 - 64)]
    );
    let mut got = guest_bytes(&mem, 0x60_000, 64);
    got.extend(guest_bytes(&mem, 0x61_000, incoming.len() - 64));
    let mut want = incoming.clone();
    want[10] = 2;
    assert_eq!(got, want);
    assert_eq!(net.counters().rx_frames.load(Ordering::Relaxed), 1);
    net.reset();
}

mod snapshot;
