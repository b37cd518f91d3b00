//! pvm-vhost-user-net driven through pvm's vhost-user frontend, its tap in a network namespace
//! the test creates (10.9.0.1/24 on the host side): an ARP request and an ICMP echo request go
//! out through the transmit ring and the kernel's replies come back through the receive ring,
//! the echo reply spread over several mergeable buffers; then a driver reload and the same
//! again. Needs root and `ip netns`; elsewhere it says so and passes.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use pvm_vhost::user::{Kind, VhostUserDevice};
use pvm_virtio::testing::{EventInterrupt, TestQueue, readable, writable};
use pvm_virtio::{Activation, VirtioDevice};
use support::{Backend, scratch, shared_memory};
use virtio_bindings::bindings::virtio_net::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const NET: &str = env!("CARGO_BIN_EXE_pvm-vhost-user-net");
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 9, 0, 2];
const HOST_IP: [u8; 4] = [10, 9, 0, 1];
const RX_BUFFERS: u64 = 0x40_0000;
const RX_BUFFER_LEN: u32 = 256;
const TX_BUFFER: u64 = 0x80_0000;
const HDR: usize = 12;

/// A network namespace with tap0 (10.9.0.1/24, up), removed on drop.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("pvmvu{}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        let n = ns.0.as_str();
        for step in [
            &[
                "netns",
                "exec",
                n,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
            ][..],
            &[
                "netns",
                "exec",
                n,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
            &["-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"],
            &["-n", n, "addr", "add", "10.9.0.1/24", "dev", "tap0"],
            &["-n", n, "link", "set", "tap0", "up"],
        ] {
            assert!(ok(step), "ip {step:?} failed");
        }
        Some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0u8; HDR];
    f.extend([0xff; 6]);
    f.extend(MAC);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(MAC);
    f.extend(GUEST_IP);
    f.extend([0; 6]);
    f.extend(HOST_IP);
    f
}

fn echo_request(dst_mac: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend(payload);
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend(total.to_be_bytes());
    ip.extend([0, 1, 0x40, 0, 64, 1, 0, 0]);
    ip.extend(GUEST_IP);
    ip.extend(HOST_IP);
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut f = vec![0u8; HDR];
    f.extend(dst_mac);
    f.extend(MAC);
    f.extend([0x08, 0x00]);
    f.extend(ip);
    f.extend(icmp);
    f
}

/// The driver's receive side: posted buffers by head, frames reassembled from used entries.
struct Receiver {
    ring: TestQueue,
    buffers: Vec<u64>,
}

impl Receiver {
    fn post(&mut self, count: u64) {
        for _ in 0..count {
            let addr = RX_BUFFERS + self.buffers.len() as u64 * 0x1000;
            let head = self.ring.add_chain(&[writable(addr, RX_BUFFER_LEN)]);
            assert_eq!(usize::from(head), self.buffers.len());
            self.buffers.push(addr);
        }
        self.ring.want_interrupt();
        self.ring.kick();
    }

    /// The next frame (without vnet header) matching `want`, and the buffers it took.
    fn frame(
        &mut self,
        mem: &GuestMemoryMmap,
        irq: &EventInterrupt,
        want: impl Fn(&[u8]) -> bool,
    ) -> (Vec<u8>, u16) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut used = Vec::new();
        loop {
            used.extend(self.ring.take_used());
            while let Some(&(head, len)) = used.first() {
                let addr = self.buffers[head as usize];
                let mut header = [0u8; HDR];
                mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
                let count = u16::from_le_bytes([header[10], header[11]]);
                assert!(count >= 1, "num_buffers 0");
                if used.len() < usize::from(count) {
                    break;
                }
                let mut frame = Vec::new();
                for (i, (head, len)) in used.drain(..usize::from(count)).enumerate() {
                    let mut chunk = vec![0u8; len as usize];
                    mem.read_slice(&mut chunk, GuestAddress(self.buffers[head as usize]))
                        .unwrap();
                    frame.extend(if i == 0 { &chunk[HDR..] } else { &chunk[..] });
                }
                let _ = len;
                if want(&frame) {
                    return (frame, count);
                }
            }
            assert!(Instant::now() < deadline, "no matching frame within 10 s");
            // Like a driver re-enabling callbacks: ask for an interrupt at the next used entry
            // (used_event), then look again before sleeping, as entries may have come meanwhile.
            self.ring.want_interrupt();
            if self.ring.has_used() {
                continue;
            }
            assert!(irq.wait(0), "no interrupt on the receive queue");
        }
    }
}

fn transmit(tx: &TestQueue, mem: &GuestMemoryMmap, irq: &EventInterrupt, frame: &[u8]) {
    mem.write_slice(frame, GuestAddress(TX_BUFFER)).unwrap();
    // Header and frame in separate descriptors, as Linux sends them without ANY_LAYOUT tricks.
    let head = tx.add_chain(&[
        readable(TX_BUFFER, HDR as u32),
        readable(TX_BUFFER + HDR as u64, (frame.len() - HDR) as u32),
    ]);
    tx.want_interrupt();
    tx.kick();
    assert!(irq.wait(1), "no interrupt on the transmit queue");
    assert_eq!(tx.take_used(), vec![(u32::from(head), 0)]);
}

#[test]
fn frames_go_both_ways_through_a_tap_in_a_network_namespace() {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root for a network namespace and a tap");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("skipping: `ip netns add` does not work here");
        return;
    };
    let dir = scratch("net");
    let socket = dir.join("net.sock");
    let backend = Backend::start(
        &["ip", "netns", "exec", &ns.0],
        NET,
        &[
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            "tap0",
            "--mac",
            "52:54:00:12:34:56",
        ],
    );
    let mut device = VhostUserDevice::connect(Kind::Net, &socket, 0).unwrap();
    assert_eq!(device.device_type(), 1);
    let mut config = [0u8; 8];
    device.read_config(0, &mut config);
    assert_eq!(config[..6], MAC);
    assert_eq!(
        u16::from_le_bytes([config[6], config[7]]),
        VIRTIO_NET_S_LINK_UP as u16
    );
    let features = device.features();
    for bit in [
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        29,
        32,
    ] {
        assert_ne!(
            features & (1 << bit),
            0,
            "feature {bit} missing in {features:#x}"
        );
    }

    let mem = shared_memory();
    for round in 0..2u64 {
        // Round 1 follows a driver reload.
        let base = 0x1_0000 * (1 + round);
        let mut rx = Receiver {
            ring: TestQueue::at(&mem, GuestAddress(base), 256),
            buffers: Vec::new(),
        };
        let tx = TestQueue::at(&mem, GuestAddress(base + 0x8000), 256);
        let irq = EventInterrupt::new(2);
        device
            .activate(Activation {
                memory: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![rx.ring.active_queue(0), tx.active_queue(1)],
                features,
            })
            .unwrap();
        rx.post(32);

        // Guest to host: an ARP request; host to guest: the kernel's reply.
        transmit(&tx, &mem, &irq, &arp_request());
        let (reply, _) = rx.frame(&mem, &irq, |f| {
            f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2]
        });
        assert_eq!(reply[..6], MAC, "ARP reply not addressed to the guest");
        assert_eq!(reply[28..32], HOST_IP);
        let host_mac: [u8; 6] = reply[6..12].try_into().unwrap();

        // An echo request with a payload larger than one receive buffer: the reply comes back
        // over several mergeable buffers, payload intact.
        let payload: Vec<u8> = (0..1000u32)
            .map(|i| (i * 31 + round as u32) as u8)
            .collect();
        transmit(&tx, &mem, &irq, &echo_request(host_mac, &payload));
        let (reply, buffers) = rx.frame(&mem, &irq, |f| {
            f.len() > 34 && f[12..14] == [0x08, 0x00] && f[23] == 1 && f[34] == 0
        });
        assert!(
            buffers > 1,
            "a {}-byte frame in {buffers} buffer(s)",
            reply.len()
        );
        assert_eq!(reply[..6], MAC);
        assert_eq!(reply[26..30], HOST_IP);
        assert_eq!(reply[30..34], GUEST_IP);
        assert!(
            reply[42..] == payload[..],
            "the echo reply's payload differs"
        );

        device.reset();
    }
    drop(device);
    assert_eq!(backend.wait(), 0);
    drop(ns);
}

#[test]
fn bad_flags_and_a_missing_tap_are_one_line_and_exit_2() {
    for (args, needle) in [
        (vec!["--tap", "tap0"], "--socket"),
        (vec!["--socket", "s"], "--tap"),
        (
            vec![
                "--socket",
                "s",
                "--tap",
                "tap0",
                "--mac",
                "01:00:00:00:00:00",
            ],
            "multicast",
        ),
        (
            vec!["--socket", "s", "--tap", "tap0", "--mac", "52:54"],
            "--mac",
        ),
        (
            vec!["--socket", "s", "--tap", "a-name-far-too-long"],
            "a-name-far-too-long",
        ),
    ] {
        let out = Command::new(NET).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr:?}");
        assert!(stderr.starts_with("pvm-vhost-user-net: "), "{stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
