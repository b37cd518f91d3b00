//! The receive queue's side of the vsock worker: control packets first, then host data of the
//! connections with something to read, each read straight into the guest's buffer and only as
//! much as the guest's credit allows.

use std::io::{self, Read};

use log::debug;
use vm_memory::GuestMemoryMmap;

use super::super::conn::Key;
use super::super::packet::*;
use super::{Core, MAX_PAYLOAD, header_to};
use crate::chain::{Chain, split_chain};
use crate::worker::{DeviceQueue, EventLoop, FillSource, FillStep};

impl Core {
    /// Writes the packet in `self.buf[..HEADER_LEN + len]` into `chain`; returns the used length.
    fn deliver(&mut self, memory: &GuestMemoryMmap, chain: Chain<'_>, len: usize) -> Option<u32> {
        let buffers = split_chain(chain, &mut self.segments)
            .inspect_err(|e| debug!("vsock: malformed receive chain: {e}"))
            .ok()?;
        if buffers.writable.len() < (HEADER_LEN + len) as u64 {
            debug!(
                "vsock: a receive buffer of {} bytes",
                buffers.writable.len()
            );
            return None;
        }
        match buffers
            .writable
            .write_from(memory, &self.buf[..HEADER_LEN + len])
        {
            Ok(n) => Some(n as u32),
            Err(e) => {
                debug!("vsock: receive buffer unusable: {e}");
                None
            }
        }
    }

    /// The room for payload in `chain` (0 if it cannot hold a header and a byte).
    fn room(&mut self, chain: &Chain<'_>) -> usize {
        let room = split_chain(chain.clone(), &mut self.segments)
            .map(|b| b.writable.len())
            .unwrap_or(0);
        (room.saturating_sub(HEADER_LEN as u64) as usize).min(MAX_PAYLOAD)
    }

    fn put_header(&mut self, header: &Header) {
        self.buf[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    }

    /// The next control packet into the guest's buffer.
    fn fill_control(&mut self, rx: &mut DeviceQueue, memory: &GuestMemoryMmap) -> FillStep {
        let Some(control) = self.control.front().copied() else {
            return FillStep::SourceEmpty;
        };
        let Some(chain) = rx.pop(memory) else {
            return FillStep::NoBuffers;
        };
        let head = chain.head_index();
        let mut header = self.header(control.key, control.op);
        header.flags = control.flags;
        if let Some(conn) = self.conns.get_mut(&control.key) {
            conn.stamp(&mut header);
            if control.op == OP_CREDIT_UPDATE {
                conn.update_queued = false;
            }
        }
        self.put_header(&header);
        match self.deliver(memory, chain, 0) {
            Some(used) => {
                self.control.pop_front();
                rx.add_used(memory, head, used);
                FillStep::Moved
            }
            None => {
                // The buffer is unusable, the packet waits for the next.
                rx.add_used(memory, head, 0);
                FillStep::Skipped
            }
        }
    }

    /// Host data of the next readable connection into the guest's buffer.
    fn fill_data(
        &mut self,
        events: &EventLoop,
        rx: &mut DeviceQueue,
        memory: &GuestMemoryMmap,
    ) -> FillStep {
        let Some(key) = self.readable.pop_front() else {
            return FillStep::SourceEmpty;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return FillStep::Skipped;
        };
        conn.ready = false;
        let credit = conn.guest_room() as usize;
        if credit == 0 || conn.guest_no_rcv {
            if credit == 0 && !conn.credit_requested {
                conn.credit_requested = true;
                self.queue(key, OP_CREDIT_REQUEST, 0);
            }
            self.refresh(events, key);
            return FillStep::Skipped;
        }
        let Some(chain) = rx.pop(memory) else {
            conn.ready = true;
            self.readable.push_front(key);
            return FillStep::NoBuffers;
        };
        let head = chain.head_index();
        let room = self.room(&chain).min(credit);
        if room == 0 {
            debug!("vsock: a receive buffer too small for a packet");
            rx.add_used(memory, head, 0);
            self.requeue(key);
            return FillStep::Skipped;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return FillStep::Skipped;
        };
        let read = conn
            .stream
            .read(&mut self.buf[HEADER_LEN..HEADER_LEN + room]);
        let (op, flags, len) = match read {
            // EOF only says the host sends no more: it may still read (a half-close).
            Ok(0) => (OP_SHUTDOWN, SHUTDOWN_SEND, 0),
            Ok(n) => (OP_RW, 0, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                rx.unpop(1);
                self.refresh(events, key);
                return FillStep::Skipped;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                rx.unpop(1);
                self.requeue(key);
                return FillStep::Skipped;
            }
            Err(e) => {
                debug!("vsock: host peer of {key:?} is gone: {e}");
                (OP_RST, 0, 0)
            }
        };
        let mut header = header_to(self.cid, key, op);
        header.flags = flags;
        header.len = len as u32;
        conn.stamp(&mut header);
        conn.rx_cnt = conn.rx_cnt.wrapping_add(len as u32);
        match op {
            OP_RW => self.requeue(key),
            OP_RST => self.remove(events, key),
            _ => {
                // EOF: the host sends no more. With the guest done sending too, close.
                conn.host_done = true;
                if conn.guest_no_send {
                    self.remove(events, key);
                    header.op = OP_RST;
                    header.flags = 0;
                } else {
                    self.refresh(events, key);
                }
            }
        }
        self.put_header(&header);
        let used = self.deliver(memory, chain, len).unwrap_or(0);
        rx.add_used(memory, head, used);
        FillStep::Moved
    }

    /// Puts `key` back in turn for more host data.
    fn requeue(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.ready = true;
            self.readable.push_back(key);
        }
    }
}

/// [`Core`] as the receive queue's source, with the event loop it may change watches in.
pub(super) struct Source<'a> {
    pub(super) core: &'a mut Core,
    pub(super) events: &'a EventLoop,
}

impl FillSource for Source<'_> {
    fn fill_one(&mut self, rx: &mut DeviceQueue, memory: &GuestMemoryMmap) -> FillStep {
        if !self.core.control.is_empty() {
            return self.core.fill_control(rx, memory);
        }
        self.core.fill_data(self.events, rx, memory)
    }
}
