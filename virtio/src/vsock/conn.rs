//! One connection between a guest socket and a host Unix socket, and its credit accounting
//! (virtio 1.2, 5.10.6.3): each side advertises its receive buffer (`buf_alloc`) and how much
//! of what it received it has consumed (`fwd_cnt`); a sender keeps what it has in flight within
//! the receiver's buffer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::Header;

/// The bytes pvm buffers per connection for a host peer that reads slower than the guest
/// writes: the receive buffer pvm advertises. A guest that sends beyond it is reset.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// pvm tells the guest about consumed bytes once this many went unreported (and whenever it
/// asks), so a guest that used all its credit is never left waiting.
const CREDIT_UPDATE_AFTER: u32 = BUF_ALLOC / 4;

/// A connection's place in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A host process asked for it (`CONNECT <port>`); the REQUEST went to the guest, which has
    /// not answered yet.
    Requested,
    Established,
}

/// The ports of a connection: the host side's and the guest's.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) host: u32,
    pub(crate) guest: u32,
}

pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    pub(crate) token: u64,
    pub(crate) phase: Phase,
    /// The guest's receive buffer and how much of it the guest has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub(crate) rx_cnt: u32,
    /// Bytes of the guest's written to the host socket, and the last count the guest was told.
    pub(crate) fwd_cnt: u32,
    fwd_reported: u32,
    /// Guest bytes the host socket did not take yet; at most [`BUF_ALLOC`].
    pub(crate) pending: VecDeque<u8>,
    /// In the worker's queue of connections to read from: host input is not watched meanwhile.
    pub(crate) ready: bool,
    /// The host sent its last byte (EOF), and the guest was told.
    pub(crate) host_done: bool,
    /// The guest will send no more, or receive no more (SHUTDOWN flags).
    pub(crate) guest_no_send: bool,
    pub(crate) guest_no_rcv: bool,
    /// A CREDIT_REQUEST went to the guest and no credit information came back yet.
    pub(crate) credit_requested: bool,
    /// A CREDIT_UPDATE is queued for the guest.
    pub(crate) update_queued: bool,
    /// What the worker's epoll watches for this connection (empty: not in the set).
    pub(crate) watched: EventSet,
}

impl Conn {
    pub(crate) fn new(stream: UnixStream, token: u64, phase: Phase, guest: &Header) -> Self {
        Conn {
            stream,
            token,
            phase,
            peer_buf_alloc: guest.buf_alloc,
            peer_fwd_cnt: guest.fwd_cnt,
            rx_cnt: 0,
            fwd_cnt: 0,
            fwd_reported: 0,
            pending: VecDeque::new(),
            ready: false,
            host_done: false,
            guest_no_send: false,
            guest_no_rcv: false,
            credit_requested: false,
            update_queued: false,
            watched: EventSet::empty(),
        }
    }

    /// Takes the guest's credit information from a packet it sent.
    pub(crate) fn guest_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        self.credit_requested = false;
    }

    /// How many more bytes the guest can take. A guest claiming to have consumed more than it
    /// received only hurts itself: the difference wraps and leaves no credit.
    pub(crate) fn guest_room(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The credit fields of a packet to the guest; the guest now knows `fwd_cnt`.
    pub(crate) fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt;
        self.fwd_reported = self.fwd_cnt;
    }

    /// Whether the guest should hear about consumed bytes now.
    pub(crate) fn wants_update(&self) -> bool {
        !self.update_queued && self.fwd_cnt.wrapping_sub(self.fwd_reported) >= CREDIT_UPDATE_AFTER
    }

    /// Whether `len` more guest bytes stay within the buffer pvm advertised.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.pending.len().saturating_add(len) <= BUF_ALLOC as usize
    }

    /// Writes `data` to the host socket, keeping what it does not take (the caller checked
    /// [`Self::fits`]). An error means the host peer is gone.
    pub(crate) fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let written = if self.pending.is_empty() {
            write_some(&mut self.stream, data)?
        } else {
            0
        };
        self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        self.pending.extend(&data[written..]);
        Ok(())
    }

    /// Writes pending guest bytes to the host socket until it takes no more.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let written = write_some(&mut self.stream, front)?;
            if written == 0 {
                break;
            }
            self.pending.drain(..written);
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        if self.pending.is_empty() && self.guest_no_send {
            // The host peer reads EOF once the guest's last byte is through.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// What the worker should watch: host input while the guest has room for it and nothing
    /// is being read already, writability while guest bytes wait.
    pub(crate) fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        let reading = self.phase == Phase::Established
            && !self.ready
            && !self.host_done
            && !self.guest_no_rcv
            && self.guest_room() > 0;
        if reading {
            set |= EventSet::IN;
        }
        if !self.pending.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }
}

/// One non-blocking write: the bytes taken, 0 when the socket is full.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match stream.write(data) {
            Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
