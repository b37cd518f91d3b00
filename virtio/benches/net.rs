//! virtio-net transmit data plane without a guest: frames through pvm's transmit path into a real
//! tap, next to raw `write`s of the same bytes (vnet header + frame) to the same tap (the limit).
//!
//! The benchmark moves itself into a new network namespace (`unshare(CLONE_NEWNET)`, as root or
//! with CAP_SYS_ADMIN) and creates the tap there the way pvm does ([`Tap::open`]: IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR, nonblocking), then sets it up. Frames are addressed to a MAC that
//! is not the tap's and carry loopback IP addresses, so the namespace's stack drops each one at
//! the IP layer (PACKET_OTHERHOST) right after the tap took it: nothing leaves the namespace,
//! and both paths pay the same kernel cost. Where the namespace or the tap cannot be made the
//! benchmark prints why and measures nothing.
//!
//! Three cases per frame size (64 B, 1514 B, and a 64 KiB TCPv4 TSO frame that the tap takes
//! as one GSO packet), the frame in one guest buffer:
//!
//! - `pvm-worker`: end to end through the public API. A [`Net`] on the tap is activated with its
//!   two queues in guest memory; per frame the benchmark thread (playing the driver) makes the
//!   transmit chain available, writes the transmit kick eventfd and blocks until the device's
//!   transmit interrupt eventfd fires: the worker's wake-up, epoll loop, the `writev` to the
//!   tap, notification suppression and the interrupt. A guest would add its own exits on top.
//! - `pvm-transmit-fn`: the synchronous transmit path on the benchmark thread: pop the chain,
//!   validate it, `writev` it to the tap (through `Net::bench_transmit`, a `#[doc(hidden)]` hook
//!   that calls the worker's own transmit function) and add it to the used ring.
//! - `limit-write`: one `write` of the same bytes to the tap fd.
//! - `reference/eventfd-round-trip` (once): two threads passing an eventfd kick and an
//!   eventfd interrupt back and forth with no device work, the floor under `pvm-worker`.
//!
//! The summary lines at the end give each case's median time per frame over criterion's samples,
//! and pvm / limit.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::Throughput;
use pvm_virtio::net::{QUEUE_SIZE, VNET_HDR_LEN};
use pvm_virtio::{Activation, Net, NetBackend, Tap, VirtioDevice};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use common::{bench, last_used_len, mib_per_s, micros, ratio, submit, wait_used};
use pvm_virtio::testing::{EventInterrupt, TestQueue, readable};

const TAP_NAME: &str = "pvmbench0";
/// Guest memory: the receive queue, the transmit queue, the benchmark thread's queue, the frame.
const MEM_BYTES: usize = 4 << 20;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const SYNC_RING: u64 = 0x10_000;
const DATA: u64 = 0x100_000;
const TX_QUEUE: u16 = 1;
/// Not the tap's MAC (pvm's generated ones and the kernel's are random, this one is fixed).
const DST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xbe, 0x0c];
const SRC_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0xbe, 0x0a];
const SRC_IP: [u8; 4] = [127, 0, 0, 1];
const DST_IP: [u8; 4] = [127, 0, 0, 2];
/// `virtio_net_hdr` flags and GSO type.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const TSO_MSS: u16 = 1448;

/// The frame sizes (Ethernet frame without the vnet header) and whether the frame is TSO.
const FRAMES: [(usize, &str, bool); 3] = [
    (64, "64B", false),
    (1514, "1514B", false),
    (64 << 10, "64KiB-TSO", true),
];

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// vnet header + Ethernet + IPv4 + UDP (or TCP with a TSO header), `frame_len` bytes after the
/// vnet header.
fn frame(frame_len: usize, tso: bool) -> Vec<u8> {
    const ETH: usize = 14;
    const IP: usize = 20;
    let l4 = if tso { 20 } else { 8 };
    assert!(frame_len >= ETH + IP + l4 && frame_len - ETH <= 0xffff);
    let mut f = vec![0u8; VNET_HDR_LEN + frame_len];
    if tso {
        let hdr = &mut f[..VNET_HDR_LEN];
        hdr[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        hdr[1] = VIRTIO_NET_HDR_GSO_TCPV4;
        hdr[2..4].copy_from_slice(&((ETH + IP + l4) as u16).to_le_bytes()); // hdr_len
        hdr[4..6].copy_from_slice(&TSO_MSS.to_le_bytes()); // gso_size
        hdr[6..8].copy_from_slice(&((ETH + IP) as u16).to_le_bytes()); // csum_start
        hdr[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset: tcphdr.check
    }
    let eth = &mut f[VNET_HDR_LEN..];
    eth[0..6].copy_from_slice(&DST_MAC);
    eth[6..12].copy_from_slice(&SRC_MAC);
    eth[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = frame_len - ETH;
    let ip = &mut eth[ETH..ETH + IP];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64; // TTL
    ip[9] = if tso { 6 } else { 17 };
    ip[12..16].copy_from_slice(&SRC_IP);
    ip[16..20].copy_from_slice(&DST_IP);
    let checksum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&checksum.to_be_bytes());
    let l4_hdr = &mut eth[ETH + IP..ETH + IP + l4];
    l4_hdr[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4_hdr[2..4].copy_from_slice(&9u16.to_be_bytes()); // discard
    if tso {
        l4_hdr[12] = 0x50; // data offset: 5 words
        l4_hdr[13] = 0x18; // PSH, ACK
        l4_hdr[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    } else {
        l4_hdr[4..6].copy_from_slice(&((ip_len - IP) as u16).to_be_bytes());
    }
    for (i, b) in eth[ETH + IP + l4..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f
}

/// Moves this thread into a new network namespace and opens the tap there, up.
fn tap_in_namespace() -> Result<Tap, String> {
    // SAFETY: unshare takes flags only; it moves the calling thread (the one that runs every
    // benchmark here) into a new network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot create a network namespace (unshare CLONE_NEWNET, needs CAP_SYS_ADMIN): {}",
            std::io::Error::last_os_error()
        ));
    }
    let tap = Tap::open(TAP_NAME).map_err(|e| e.to_string())?;
    set_up(TAP_NAME).map_err(|e| format!("tap {TAP_NAME}: cannot set the link up: {e}"))?;
    Ok(tap)
}

/// `ip link set NAME up`, by ioctl.
fn set_up(name: &str) -> std::io::Result<()> {
    // SAFETY: socket takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the flags of the ifreq we own, for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS set the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own, for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

struct Summary {
    what: &'static str,
    bytes: usize,
    worker: Option<Duration>,
    transmit_fn: Option<Duration>,
    limit: Option<Duration>,
}

fn main() {
    let tap = match tap_in_namespace() {
        Ok(tap) => tap,
        Err(why) => {
            println!("net: NOT MEASURED: no tap to send to: {why}");
            eprintln!("net: NOT MEASURED: no tap to send to: {why}");
            return;
        }
    };
    let mut raw_tap: File = tap.try_clone_file().expect("another fd of the tap");
    println!(
        "net: tap {} in a new network namespace, guest offloads {:#x}",
        tap.name(),
        tap.supported_offloads()
    );

    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES)]).expect("guest memory");
    let mut net = Net::new(Arc::new(tap), Some(SRC_MAC)).expect("the net device");
    // Everything offered, as Linux accepts it (EVENT_IDX, HOST_TSO4, MRG_RXBUF included).
    let features = net.features();
    let counters = net.counters();
    let interrupt = EventInterrupt::new(2);
    // The receive queue gets no buffers: nothing is received here.
    let rx_driver = TestQueue::at(&mem, GuestAddress(RX_RING), QUEUE_SIZE);
    let tx_driver = TestQueue::at(&mem, GuestAddress(TX_RING), QUEUE_SIZE);
    let active = vec![rx_driver.active_queue(0), tx_driver.active_queue(TX_QUEUE)];
    net.activate(Activation {
        memory: mem.clone(),
        interrupt: interrupt.clone(),
        queues: active,
        features,
    })
    .expect("activate the net device");
    let sync_driver = TestQueue::at(&mem, GuestAddress(SYNC_RING), QUEUE_SIZE);
    let mut sync_queue = sync_driver.queue();

    let mut c = common::criterion();
    let mut summaries = Vec::new();
    for (frame_len, label, tso) in FRAMES {
        let bytes = frame(frame_len, tso);
        // The tap must take the frame whole, or the figures would time an error path.
        match raw_tap.write(&bytes) {
            Ok(n) if n == bytes.len() => {}
            other => {
                println!("net {label}: NOT MEASURED: the tap refused the frame: {other:?}");
                continue;
            }
        }
        mem.write_slice(&bytes, GuestAddress(DATA)).expect("frame");
        let chain = [readable(DATA, bytes.len() as u32)];
        tx_driver.store_chain(0, &chain);
        sync_driver.store_chain(0, &chain);
        let errors_before = counters.tx_errors.load(Ordering::Relaxed)
            + counters.tx_malformed.load(Ordering::Relaxed);

        let mut group = c.benchmark_group(format!("net-tx-{label}"));
        group.throughput(Throughput::Bytes(frame_len as u64));
        let worker = bench(&mut group, "pvm-worker", |iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let want = submit(&tx_driver, &mem, 0);
                tx_driver.kick();
                wait_used(&tx_driver, &interrupt, TX_QUEUE, want);
            }
            let elapsed = start.elapsed();
            // The device writes nothing into transmit buffers.
            assert_eq!(last_used_len(&tx_driver), 0);
            elapsed
        });
        let transmit_fn = bench(&mut group, "pvm-transmit-fn", |iters| {
            let start = Instant::now();
            for _ in 0..iters {
                submit(&sync_driver, &mem, 0);
                let chain = sync_queue.pop_descriptor_chain(&mem).expect("a chain");
                let head = chain.head_index();
                let len = net.bench_transmit(&mem, chain);
                sync_queue.add_used(&mem, head, len).expect("add used");
            }
            start.elapsed()
        });
        let limit = bench(&mut group, "limit-write", |iters| {
            let start = Instant::now();
            for _ in 0..iters {
                let n = raw_tap.write(&bytes).expect("write to the tap");
                assert_eq!(n, bytes.len());
            }
            start.elapsed()
        });
        group.finish();
        let errors = counters.tx_errors.load(Ordering::Relaxed)
            + counters.tx_malformed.load(Ordering::Relaxed)
            - errors_before;
        assert_eq!(errors, 0, "pvm dropped frames: {}", counters.summary());
        summaries.push(Summary {
            what: label,
            bytes: frame_len,
            worker,
            transmit_fn,
            limit,
        });
    }
    net.reset();
    let floor = common::wake_up_floor(&mut c);
    c.final_summary();

    println!();
    println!("net device counters: {}", counters.summary());
    // What the tap passed to the namespace's stack (the thread's own namespace's /proc/net/dev).
    if let Ok(dev) = std::fs::read_to_string("/proc/thread-self/net/dev") {
        for line in dev.lines().filter(|l| l.trim_start().starts_with(TAP_NAME)) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, bytes, packets, errors, dropped, ..] = fields[..] {
                println!(
                    "tap {TAP_NAME} (/proc/net/dev): received {packets} frames, {bytes} bytes, {errors} errors, {dropped} dropped"
                );
            }
        }
    }
    common::print_summary_header("frame", floor);
    for s in &summaries {
        println!(
            "summary net tx {}: pvm worker {} ({}), pvm transmit fn {}, limit {} ({}); ratio worker {}, transmit fn {}",
            s.what,
            micros(s.worker),
            mib_per_s(s.bytes, s.worker),
            micros(s.transmit_fn),
            micros(s.limit),
            mib_per_s(s.bytes, s.limit),
            ratio(s.worker, s.limit),
            ratio(s.transmit_fn, s.limit),
        );
    }
}
