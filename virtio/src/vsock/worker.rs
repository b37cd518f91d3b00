//! The vsock data plane: the guest's three queues on one side, the host's Unix sockets on the
//! other, in one event loop on the device thread.
//!
//! - Guest packets (transmit queue) are served in order; a connection request connects to
//!   `<uds_path>_<port>`, data goes straight to the host socket, and what the socket does not
//!   take waits in the connection's buffer, which the credit pvm advertises bounds.
//! - Host data is read only when the guest has both credit and a receive buffer for it, and
//!   straight into that buffer's packet: pvm holds no host data for a guest that does not read.
//! - Control packets to the guest (RESPONSE, RST, credit) wait in a bounded queue; when it is
//!   full the transmit queue is not served, so a guest that floods requests without posting
//!   receive buffers stalls only itself.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use log::{debug, warn};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::conn::{Conn, Key, Phase};
use super::packet::*;
use super::sock;
use crate::chain::{Chain, Segment, split_chain};
use crate::device::Interrupt;
use crate::worker::{DeviceQueue, EventHandler, EventLoop};
use receive::Source;

mod receive;

/// The most payload pvm puts in, or accepts in, one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Connections (and accepted host sockets that have not said CONNECT yet) at once; more are
/// refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Control packets waiting for receive buffers before pvm stops reading the transmit queue.
pub const MAX_CONTROL: usize = 256;
/// The longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// Host ports of host-initiated connections count up from here (as Firecracker's do), away
/// from the ports guests listen on.
const FIRST_HOST_PORT: u32 = 1 << 30;

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const EVENT_KICK: u64 = 2;
const LISTENER: u64 = 3;
const FIRST_SOCKET: u64 = 16;

/// A packet without payload for the guest; its credit fields are filled in when it goes.
#[derive(Clone, Copy, Debug)]
struct Control {
    key: Key,
    op: u16,
    flags: u32,
}

/// An accepted host socket that has not finished its `CONNECT <port>\n` line.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Everything but the queues, so the receive queue's fill loop can borrow it as its source.
pub(crate) struct Core {
    cid: u64,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    conns: HashMap<Key, Conn>,
    /// Socket tokens to connections.
    tokens: HashMap<u64, Key>,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    next_host_port: u32,
    control: VecDeque<Control>,
    /// Connections with host data to read, served in turn.
    readable: VecDeque<Key>,
    segments: Vec<Segment>,
    buf: Vec<u8>,
}

pub(crate) struct VsockWorker {
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) rx: DeviceQueue,
    pub(crate) tx: DeviceQueue,
    pub(crate) event: DeviceQueue,
    pub(crate) core: Core,
    /// A restored device owes the guest a transport reset (see snapshot.rs).
    pub(crate) reset_pending: bool,
}

impl Core {
    pub(crate) fn new(cid: u64, uds_path: PathBuf, listener: Arc<UnixListener>) -> Self {
        Core {
            cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            tokens: HashMap::new(),
            pending: HashMap::new(),
            next_token: FIRST_SOCKET,
            next_host_port: FIRST_HOST_PORT,
            control: VecDeque::new(),
            readable: VecDeque::new(),
            segments: Vec::new(),
            buf: vec![0; HEADER_LEN + MAX_PAYLOAD],
        }
    }

    /// The number of open connections (for tests).
    #[cfg(test)]
    pub(crate) fn connections(&self) -> usize {
        self.conns.len()
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    fn is_full(&self) -> bool {
        self.conns.len() + self.pending.len() >= MAX_CONNECTIONS
    }

    fn queue(&mut self, key: Key, op: u16, flags: u32) {
        self.control.push_back(Control { key, op, flags });
    }

    /// A header from the host side of `key` to the guest.
    fn header(&self, key: Key, op: u16) -> Header {
        header_to(self.cid, key, op)
    }

    /// Closes `key` towards the guest (RST) and on the host (the socket closes).
    fn reset(&mut self, events: &EventLoop, key: Key) {
        self.remove(events, key);
        self.queue(key, OP_RST, 0);
    }

    fn remove(&mut self, events: &EventLoop, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            if !conn.watched.is_empty() {
                let _ = events.unwatch(&conn.stream);
            }
            self.tokens.remove(&conn.token);
        }
    }

    /// Brings what epoll watches for `key` in line with its state.
    fn refresh(&mut self, events: &EventLoop, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.wants_update() && conn.phase == Phase::Established {
            conn.update_queued = true;
            self.control.push_back(Control {
                key,
                op: OP_CREDIT_UPDATE,
                flags: 0,
            });
        }
        let want = conn.interest();
        match events.rewatch(&conn.stream, conn.token, conn.watched, want) {
            Ok(()) => conn.watched = want,
            Err(e) => {
                warn!(
                    "vsock: cannot watch connection {}:{}: {e}",
                    key.host, key.guest
                );
                self.reset(events, key);
            }
        }
    }

    /// Serves one transmit-queue chain: a packet from the guest.
    fn transmit(&mut self, events: &EventLoop, memory: &GuestMemoryMmap, chain: Chain<'_>) {
        let buffers = match split_chain(chain, &mut self.segments) {
            Ok(buffers) => buffers,
            Err(e) => {
                debug!("vsock: malformed transmit chain: {e}");
                return;
            }
        };
        let mut readable = buffers.readable;
        let mut raw = [0u8; HEADER_LEN];
        let header = match readable.take_front(HEADER_LEN as u64) {
            Some(front) => front.read_into(memory, &mut raw),
            None => {
                debug!(
                    "vsock: packet of {} bytes, shorter than a header",
                    readable.len()
                );
                return;
            }
        };
        if let Err(e) = header {
            debug!("vsock: packet header unreadable: {e}");
            return;
        }
        let header = Header::from_bytes(&raw);
        if header.src_cid != self.cid || header.dst_cid != HOST_CID {
            // Not from this guest or not for the host: nobody to answer (the spec drops it).
            debug!(
                "vsock: dropping a packet from CID {} to CID {}",
                header.src_cid, header.dst_cid
            );
            return;
        }
        let key = Key {
            host: header.dst_port,
            guest: header.src_port,
        };
        let len = header.len as usize;
        let payload_ok = header.kind == TYPE_STREAM
            && len <= MAX_PAYLOAD
            && len as u64 <= readable.len()
            && (len == 0 || header.op == OP_RW);
        let payload = match readable.take_front(len as u64) {
            Some(payload) if payload_ok => payload,
            _ => {
                debug!("vsock: malformed packet {header:?}; resetting {key:?}");
                if header.op != OP_RST {
                    self.reset(events, key);
                }
                return;
            }
        };
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.guest_credit(&header);
        }
        match header.op {
            OP_REQUEST => self.guest_connects(events, key, &header),
            OP_RESPONSE => self.guest_accepts(events, key),
            OP_RST => self.remove(events, key),
            OP_SHUTDOWN => self.guest_shuts_down(events, key, header.flags),
            OP_RW => {
                let data = &mut self.buf[..len];
                if let Err(e) = payload.read_into(memory, data) {
                    debug!("vsock: payload unreadable: {e}");
                    self.reset(events, key);
                    return;
                }
                self.guest_sends(events, key, len);
            }
            OP_CREDIT_UPDATE | OP_CREDIT_REQUEST if self.conns.contains_key(&key) => {
                if header.op == OP_CREDIT_REQUEST {
                    self.queue(key, OP_CREDIT_UPDATE, 0);
                }
            }
            _ => {
                debug!("vsock: {header:?} for no connection or of an unknown kind");
                self.reset(events, key);
            }
        }
        self.refresh(events, key);
    }

    /// The guest connects to host port `key.host`: the Unix socket `<uds_path>_<port>`.
    fn guest_connects(&mut self, events: &EventLoop, key: Key, header: &Header) {
        if self.conns.contains_key(&key) {
            debug!("vsock: a second request for {key:?}");
            self.reset(events, key);
            return;
        }
        if self.is_full() {
            debug!("vsock: {MAX_CONNECTIONS} connections open, refusing {key:?}");
            self.queue(key, OP_RST, 0);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", key.host));
        match sock::connect(path.as_ref()) {
            Ok(stream) => {
                let token = self.token();
                self.tokens.insert(token, key);
                let conn = Conn::new(stream, token, Phase::Established, header);
                self.conns.insert(key, conn);
                self.queue(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                debug!("vsock: guest port {} to {path:?}: {e}", key.guest);
                self.queue(key, OP_RST, 0);
            }
        }
    }

    /// The guest accepted a host process's connection: the process learns its port.
    fn guest_accepts(&mut self, events: &EventLoop, key: Key) {
        let accepted = self.conns.get_mut(&key).is_some_and(|conn| {
            let line = format!("OK {}\n", key.host);
            // A fresh socket takes a line this short at once, or its peer is gone.
            conn.phase == Phase::Requested
                && conn.stream.write(line.as_bytes()).ok() == Some(line.len())
        });
        match accepted {
            true => {
                if let Some(conn) = self.conns.get_mut(&key) {
                    conn.phase = Phase::Established;
                }
            }
            false => self.reset(events, key),
        }
    }

    fn guest_shuts_down(&mut self, events: &EventLoop, key: Key, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue(key, OP_RST, 0);
            return;
        };
        conn.guest_no_send |= flags & SHUTDOWN_SEND != 0;
        conn.guest_no_rcv |= flags & SHUTDOWN_RCV != 0;
        let flushed = conn.flush();
        let both = conn.guest_no_send && (conn.guest_no_rcv || conn.host_done);
        // Both directions done: the spec's clean close ends with the receiver's RST.
        if flushed.is_err() || both {
            self.reset(events, key);
        }
    }

    /// The guest sent `len` bytes (in `self.buf`) on `key`.
    fn guest_sends(&mut self, events: &EventLoop, key: Key, len: usize) {
        let Some(conn) = self.conns.get_mut(&key) else {
            self.queue(key, OP_RST, 0);
            return;
        };
        if conn.phase != Phase::Established || conn.guest_no_send {
            debug!("vsock: data on {key:?} before it was accepted or after SHUTDOWN");
            self.reset(events, key);
            return;
        }
        if !conn.fits(len) {
            debug!("vsock: the guest sent beyond its credit on {key:?}");
            self.reset(events, key);
            return;
        }
        if let Err(e) = conn.send(&self.buf[..len]) {
            debug!("vsock: host peer of {key:?} is gone: {e}");
            self.reset(events, key);
        }
    }

    /// Accepts the host processes connecting to `uds_path`.
    fn accept(&mut self, events: &EventLoop) {
        for _ in 0..64 {
            let stream = match sock::accept(&self.listener) {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accepting on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.is_full() {
                debug!("vsock: {MAX_CONNECTIONS} connections open, closing a new one");
                continue;
            }
            let token = self.token();
            if let Err(e) = events.watch(&stream, token) {
                warn!("vsock: cannot watch a host connection: {e}");
                continue;
            }
            let line = Vec::with_capacity(MAX_LINE);
            self.pending.insert(token, Pending { stream, line });
        }
    }

    /// Reads a host process's `CONNECT <port>\n`, byte by byte so nothing after it is taken
    /// before the guest accepted; then asks the guest.
    fn read_connect_line(&mut self, events: &EventLoop, token: u64) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8];
            match pending.stream.read(&mut byte) {
                Ok(1) if byte[0] == b'\n' => break parse_connect(&pending.line),
                Ok(1) if pending.line.len() < MAX_LINE => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                _ => break None,
            }
        };
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        let _ = events.unwatch(&pending.stream);
        let Some(port) = port else {
            debug!("vsock: a host process sent no CONNECT line; closing it");
            return;
        };
        let key = self.host_key(port);
        let mut hello = self.header(key, OP_REQUEST);
        hello.buf_alloc = u32::MAX;
        self.tokens.insert(token, key);
        let conn = Conn::new(pending.stream, token, Phase::Requested, &hello);
        self.conns.insert(key, conn);
        self.queue(key, OP_REQUEST, 0);
    }

    /// A free host port for a connection to guest port `guest`.
    fn host_key(&mut self, guest: u32) -> Key {
        loop {
            let key = Key {
                host: self.next_host_port,
                guest,
            };
            self.next_host_port = self.next_host_port.wrapping_add(1).max(FIRST_HOST_PORT);
            if !self.conns.contains_key(&key) {
                return key;
            }
        }
    }

    /// A connection's socket is ready: host input to read, room to write, or the peer gone.
    fn socket_ready(&mut self, events: &EventLoop, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.watched.contains(EventSet::IN) {
            conn.ready = true;
            self.readable.push_back(key);
        }
        if let Err(e) = conn.flush() {
            debug!("vsock: host peer of {key:?} is gone: {e}");
            self.reset(events, key);
            return;
        }
        self.refresh(events, key);
    }
}

/// A header from the host side of `key` to guest `cid`.
pub(super) fn header_to(cid: u64, key: Key, op: u16) -> Header {
    Header {
        src_cid: HOST_CID,
        dst_cid: cid,
        src_port: key.host,
        dst_port: key.guest,
        kind: TYPE_STREAM,
        op,
        ..Header::default()
    }
}

/// `CONNECT <port>` (the newline already taken off), as Firecracker's hybrid vsock reads it.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VsockWorker {
    /// Serves the transmit queue (unless control packets already wait) and fills the receive
    /// queue, until neither moves.
    fn serve(&mut self, events: &EventLoop) {
        for _ in 0..4 {
            let (memory, core) = (&self.memory, &mut self.core);
            let refused = self
                .tx
                .process_until(memory, self.interrupt.as_ref(), |chain| {
                    if core.control.len() >= MAX_CONTROL {
                        return None;
                    }
                    core.transmit(events, memory, chain);
                    Some(0)
                });
            let mut source = Source {
                core: &mut self.core,
                events,
            };
            let _ = self
                .rx
                .fill(&self.memory, self.interrupt.as_ref(), &mut source);
            if !refused || self.core.control.len() >= MAX_CONTROL {
                return;
            }
        }
    }
}

impl EventHandler for VsockWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.rx.kick, RX_KICK)?;
        events.watch(&self.tx.kick, TX_KICK)?;
        events.watch(&self.event.kick, EVENT_KICK)?;
        events.watch(&*self.core.listener, LISTENER)?;
        for (token, pending) in &self.core.pending {
            events.watch(&pending.stream, *token)?;
        }
        // A fresh event loop watches nothing yet.
        let keys: Vec<Key> = self.core.conns.keys().copied().collect();
        for key in keys {
            if let Some(conn) = self.core.conns.get_mut(&key) {
                conn.watched = EventSet::empty();
            }
            self.core.refresh(events, key);
        }
        Ok(())
    }

    fn start(&mut self, events: &EventLoop) {
        self.send_pending_reset();
        self.core.accept(events);
        self.serve(events);
    }

    fn handle_event(&mut self, events: &EventLoop, token: u64) {
        match token {
            RX_KICK => self.rx.clear_kick(),
            TX_KICK => self.tx.clear_kick(),
            // The event queue's buffers wait for a transport reset.
            EVENT_KICK => {
                self.event.clear_kick();
                self.send_pending_reset();
                return;
            }
            LISTENER => self.core.accept(events),
            token => {
                if self.core.pending.contains_key(&token) {
                    self.core.read_connect_line(events, token);
                } else if let Some(&key) = self.core.tokens.get(&token) {
                    self.core.socket_ready(events, key);
                }
            }
        }
        self.serve(events);
    }
}
