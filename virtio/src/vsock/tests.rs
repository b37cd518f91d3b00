//! The vsock device driven as a guest driver would, against real Unix sockets.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::packet::*;
use super::*;
use crate::testing::{
    RecordingInterrupt, TestQueue, activation, eventually, readable, test_memory, writable,
};

mod hostile;
mod snapshot;

pub(super) const CID: u64 = 42;
const RX_BUFFERS: u64 = 0x10_0000;
const RX_BUFFER_LEN: u32 = (HEADER_LEN + MAX_PAYLOAD) as u32;
const TX_BUFFERS: u64 = 0x80_0000;
/// The receive buffer the test guest advertises unless a test says otherwise.
pub(super) const GUEST_BUF: u32 = 1 << 20;

/// A guest driver over the device's three queues, and a directory for the host's sockets.
pub(super) struct Guest {
    pub(super) mem: GuestMemoryMmap,
    pub(super) dev: Vsock,
    rx: TestQueue,
    tx: TestQueue,
    _ev: TestQueue,
    dir: TempDir,
    next_tx: Cell<u64>,
    rx_posted: Cell<u64>,
}

impl Guest {
    pub(super) fn start() -> Guest {
        let dir = TempDir::new_with_prefix("/tmp/pvm-vsock-").unwrap();
        let mem = test_memory();
        let mut dev = Vsock::new(CID, &dir.as_path().join("v.sock")).unwrap();
        let rx = TestQueue::at(&mem, GuestAddress(0), 16);
        let tx = TestQueue::at(&mem, GuestAddress(0x4000), 64);
        let ev = TestQueue::at(&mem, GuestAddress(0x8000), 16);
        let queues = vec![rx.active_queue(0), tx.active_queue(1), ev.active_queue(2)];
        let interrupt = Arc::new(RecordingInterrupt::for_queues(3));
        let features = 1 << VIRTIO_F_VERSION_1;
        dev.activate(activation(&mem, &interrupt, queues, features))
            .unwrap();
        let guest = Guest {
            mem,
            dev,
            rx,
            tx,
            _ev: ev,
            dir,
            next_tx: Cell::new(0),
            rx_posted: Cell::new(0),
        };
        guest.post_rx(8);
        guest
    }

    pub(super) fn uds(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    /// A host listener for guest connections to `port`.
    pub(super) fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.dir.as_path().join(format!("v.sock_{port}"))).unwrap()
    }

    /// Posts `count` receive buffers.
    pub(super) fn post_rx(&self, count: u64) {
        for _ in 0..count {
            let slot = self.rx_posted.get() % 16;
            self.rx_posted.set(self.rx_posted.get() + 1);
            let addr = RX_BUFFERS + slot * u64::from(RX_BUFFER_LEN);
            self.rx.add_chain(&[writable(addr, RX_BUFFER_LEN)]);
        }
        self.rx.kick();
    }

    /// Where the next transmitted packet goes (a ring of 16 slots).
    fn tx_slot(&self) -> u64 {
        let slot = self.next_tx.get() % 16;
        self.next_tx.set(self.next_tx.get() + 1);
        TX_BUFFERS + slot * u64::from(RX_BUFFER_LEN)
    }

    /// Whether the transmit queue has room for another chain: at most 16 in flight.
    pub(super) fn tx_room(&self) -> bool {
        self.tx
            .avail_idx(&self.mem)
            .wrapping_sub(self.tx.used_idx())
            < 16
    }

    /// Transmits raw descriptors.
    pub(super) fn send_descs(&self, descs: &[RawDescriptor]) {
        assert!(
            eventually(|| self.tx_room()),
            "the device stopped transmitting"
        );
        self.tx.add_chain(descs);
        self.tx.kick();
    }

    /// Transmits a packet: the header in one descriptor, the payload in another. The header's
    /// length is the payload's unless the test set one.
    pub(super) fn send(&self, mut header: Header, payload: &[u8]) {
        if header.len == 0 {
            header.len = payload.len() as u32;
        }
        // The slot must be free before it is written.
        assert!(
            eventually(|| self.tx_room()),
            "the device stopped transmitting"
        );
        let at = self.tx_slot();
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(at))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(at + HEADER_LEN as u64))
            .unwrap();
        let mut descs = vec![readable(at, HEADER_LEN as u32)];
        if !payload.is_empty() {
            descs.push(readable(at + HEADER_LEN as u64, payload.len() as u32));
        }
        self.send_descs(&descs);
    }

    /// A REQUEST from guest port `port` to host port 1, without waiting for ring room.
    pub(super) fn tx_chain_request(&self, port: u32) {
        let at = self.tx_slot();
        let header = self.header(port, 1, OP_REQUEST);
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(at))
            .unwrap();
        self.tx.add_chain(&[readable(at, HEADER_LEN as u32)]);
        self.tx.kick();
    }

    /// A header from guest port `guest` to host port `host`.
    pub(super) fn header(&self, guest: u32, host: u32, op: u16) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: guest,
            dst_port: host,
            kind: TYPE_STREAM,
            op,
            buf_alloc: GUEST_BUF,
            ..Header::default()
        }
    }

    /// The packets the device delivered since the last call, reposting their buffers.
    pub(super) fn received(&self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.take_used();
        let packets = used
            .iter()
            .map(|&(head, len)| {
                let addr = self.rx.desc(head as u16).addr();
                let mut bytes = vec![0u8; len as usize];
                self.mem.read_slice(&mut bytes, addr).unwrap();
                assert!(bytes.len() >= HEADER_LEN, "a used length of {len}");
                let mut raw = [0u8; HEADER_LEN];
                raw.copy_from_slice(&bytes[..HEADER_LEN]);
                (Header::from_bytes(&raw), bytes[HEADER_LEN..].to_vec())
            })
            .collect::<Vec<_>>();
        if !used.is_empty() {
            self.post_rx(used.len() as u64);
        }
        packets
    }

    /// The next packet, waiting up to two seconds.
    pub(super) fn next(&self) -> (Header, Vec<u8>) {
        let mut got = Vec::new();
        assert!(
            eventually(|| {
                got.extend(self.received());
                !got.is_empty()
            }),
            "no packet from the device"
        );
        assert_eq!(got.len(), 1, "more than one packet: {got:?}");
        got.remove(0)
    }

    /// Nothing more arrives for a while.
    pub(super) fn quiet(&self) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(self.received(), vec![]);
    }

    /// A guest-initiated connection from `guest` to host port `host`, accepted on the host.
    pub(super) fn connect(&self, listener: &UnixListener, guest: u32, host: u32) -> UnixStream {
        self.send(self.header(guest, host, OP_REQUEST), &[]);
        let (reply, _) = self.next();
        assert_eq!(
            (reply.op, reply.src_port, reply.dst_port),
            (OP_RESPONSE, host, guest)
        );
        assert_eq!((reply.src_cid, reply.dst_cid), (HOST_CID, CID));
        assert_eq!(reply.buf_alloc, BUF_ALLOC);
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
    }
}

/// Reads exactly `len` bytes.
pub(super) fn read_n(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn guest_connects_to_the_host_socket_and_bytes_flow_both_ways() {
    let guest = Guest::start();
    let listener = guest.listen(1234);
    let mut host = guest.connect(&listener, 5000, 1234);
    guest.send(guest.header(5000, 1234, OP_RW), b"hello");
    assert_eq!(read_n(&mut host, 5), b"hello");
    host.write_all(b"world!").unwrap();
    let (header, data) = guest.next();
    assert_eq!((header.op, header.len, header.fwd_cnt), (OP_RW, 6, 5));
    assert_eq!(data, b"world!");
    // The guest closes: the host reads EOF.
    guest.send(guest.header(5000, 1234, OP_RST), &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    guest.quiet();
}

#[test]
fn a_guest_connection_to_a_port_nobody_listens_on_is_reset() {
    let guest = Guest::start();
    guest.send(guest.header(5000, 77, OP_REQUEST), &[]);
    let (reply, _) = guest.next();
    assert_eq!(
        (reply.op, reply.src_port, reply.dst_port),
        (OP_RST, 77, 5000)
    );
}

/// A host process connects with `CONNECT <port>`; the guest accepts. Returns the host stream
/// and the host port the device chose.
pub(super) fn host_connects(guest: &Guest, port: u32) -> (UnixStream, u32) {
    let mut host = UnixStream::connect(guest.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let (request, _) = guest.next();
    assert_eq!((request.op, request.dst_port), (OP_REQUEST, port));
    assert!(request.src_port >= 1 << 30, "{request:?}");
    let host_port = request.src_port;
    guest.send(guest.header(port, host_port, OP_RESPONSE), &[]);
    let line = format!("OK {host_port}\n");
    assert_eq!(read_n(&mut host, line.len()), line.as_bytes());
    (host, host_port)
}

#[test]
fn a_host_process_connects_with_a_connect_line() {
    let guest = Guest::start();
    let (mut host, host_port) = host_connects(&guest, 52);
    host.write_all(b"ping").unwrap();
    let (header, data) = guest.next();
    assert_eq!(
        (header.op, header.src_port, header.dst_port),
        (OP_RW, host_port, 52)
    );
    assert_eq!(data, b"ping");
    guest.send(guest.header(52, host_port, OP_RW), b"pong");
    assert_eq!(read_n(&mut host, 4), b"pong");
    // A second process gets another port.
    let (_other, other_port) = host_connects(&guest, 52);
    assert_ne!(other_port, host_port);
}

#[test]
fn a_refused_or_garbled_connect_closes_the_host_socket() {
    let guest = Guest::start();
    let mut host = UnixStream::connect(guest.uds()).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (request, _) = guest.next();
    guest.send(guest.header(52, request.src_port, OP_RST), &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);

    for line in [&b"HELLO 52\n"[..], b"CONNECT x\n", &[b'9'; 100]] {
        let mut host = UnixStream::connect(guest.uds()).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // The device may close before taking every byte of an overlong line.
        let _ = host.write_all(line);
        let mut rest = Vec::new();
        match host.read_to_end(&mut rest) {
            Ok(n) => assert_eq!(n, 0, "{line:?}"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{line:?}"),
        }
    }
    guest.quiet();
}

#[test]
fn a_guest_that_never_reads_gets_only_its_credit() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    let mut small = guest.header(5000, 9, OP_REQUEST);
    small.buf_alloc = 8192;
    guest.send(small, &[]);
    assert_eq!(guest.next().0.op, OP_RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(&vec![7u8; 100_000]).unwrap();
    let mut got = 0;
    let mut credit_requested = false;
    assert!(eventually(|| {
        for (header, data) in guest.received() {
            match header.op {
                OP_RW => got += data.len(),
                OP_CREDIT_REQUEST => credit_requested = true,
                op => panic!("op {op}"),
            }
        }
        credit_requested
    }));
    assert_eq!(got, 8192);
    guest.quiet();
    // The guest read it all: as much again.
    let mut update = guest.header(5000, 9, OP_CREDIT_UPDATE);
    update.buf_alloc = 8192;
    update.fwd_cnt = 8192;
    guest.send(update, &[]);
    got = 0;
    assert!(eventually(|| {
        got += guest.received().iter().map(|(_, d)| d.len()).sum::<usize>();
        got >= 8192
    }));
    std::thread::sleep(Duration::from_millis(50));
    got += guest.received().iter().map(|(_, d)| d.len()).sum::<usize>();
    assert_eq!(got, 8192);
}

#[test]
fn a_host_peer_that_goes_away_ends_the_connection() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    let host = guest.connect(&listener, 5000, 9);
    drop(host);
    let (header, _) = guest.next();
    assert_eq!((header.op, header.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // A guest writing anyway is reset.
    guest.send(guest.header(5000, 9, OP_RW), b"late");
    assert_eq!(guest.next().0.op, OP_RST);
    guest.quiet();
}

#[test]
fn a_host_that_half_closes_still_reads_the_guest() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    let mut host = guest.connect(&listener, 5000, 9);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let mut shutdown = None;
    assert!(eventually(|| {
        for (header, data) in guest.received() {
            match header.op {
                OP_RW => got.extend(data),
                _ => shutdown = Some((header.op, header.flags)),
            }
        }
        shutdown.is_some()
    }));
    assert_eq!(got, b"request");
    assert_eq!(shutdown, Some((OP_SHUTDOWN, SHUTDOWN_SEND)));
    guest.send(guest.header(5000, 9, OP_RW), b"reply");
    assert_eq!(read_n(&mut host, 5), b"reply");
    // The guest is done too: the connection closes.
    let mut done = guest.header(5000, 9, OP_SHUTDOWN);
    done.flags = SHUTDOWN_SEND;
    guest.send(done, &[]);
    assert_eq!(guest.next().0.op, OP_RST);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_reset_closes_every_connection_and_pause_keeps_them() {
    let mut guest = Guest::start();
    let listener = guest.listen(9);
    let mut first = guest.connect(&listener, 5000, 9);
    let mut second = guest.connect(&listener, 5001, 9);
    guest.dev.pause().unwrap();
    assert_eq!(guest.dev.paused_connections(), Some(2));
    second.write_all(b"while paused").unwrap();
    guest.dev.resume().unwrap();
    let (header, data) = guest.next();
    assert_eq!(
        (header.dst_port, data.as_slice()),
        (5001, &b"while paused"[..])
    );
    guest.dev.reset();
    for host in [&mut first, &mut second] {
        let mut rest = Vec::new();
        assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    }
}

#[test]
fn many_connections_at_once_keep_their_bytes_apart() {
    let guest = Guest::start();
    let listener = guest.listen(9);
    let mut hosts: Vec<UnixStream> = (0..32)
        .map(|i| guest.connect(&listener, 6000 + i, 9))
        .collect();
    for (i, host) in hosts.iter_mut().enumerate() {
        host.write_all(format!("conn {i}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    assert!(eventually(|| {
        for (header, data) in guest.received() {
            assert_eq!(header.op, OP_RW);
            seen.entry(header.dst_port)
                .or_insert_with(Vec::new)
                .extend(data);
        }
        seen.len() == 32
    }));
    for i in 0..32u32 {
        assert_eq!(seen[&(6000 + i)], format!("conn {i}").as_bytes());
        guest.send(guest.header(6000 + i, 9, OP_RW), &i.to_le_bytes());
    }
    for (i, host) in hosts.iter_mut().enumerate() {
        assert_eq!(read_n(host, 4), (i as u32).to_le_bytes());
    }
}
