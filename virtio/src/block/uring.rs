//! The io_uring engine's data plane: one queue, one ring. A kick pops every available chain,
//! parses it as the sync engine does ([`request::start_request`]) and queues its read, write or
//! flush on the ring; the batch goes to the kernel in one io_uring_enter. The kernel signals
//! completions on an eventfd in the worker's epoll; each completion writes its request's
//! status and returns the chain, and the driver is interrupted once per batch.
//!
//! Requests that are done at once (GET_ID, DISCARD, WRITE_ZEROES, errors, O_DIRECT bounces)
//! complete as on the sync engine. A request whose I/O completed short (the kernel moved part
//! of it) finishes the rest with preadv/pwritev, so the guest sees what the sync engine would
//! report. Pausing or stopping the worker waits for everything in flight ([`Self::quiesce`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use io_uring::{opcode, squeue, types};
use log::{error, warn};
use vm_memory::GuestMemoryMmap;

use super::engine::{SharedRing, lock};
use super::request::{self, DiskImage, IoBackend, RequestError, Started, SyncIo, Ticket, complete};
use crate::chain::{Direction, GuestIovecs, advance_iovecs, transfer_iovecs};
use crate::device::{ActivateError, Activation, Interrupt};
use crate::worker::{
    CHAINS_PER_PASS, DeviceQueue, EventHandler, EventLoop, SharedLimiter, Throttle, WorkerError,
    chain_bytes, device_queues,
};

/// The epoll tokens of a [`UringHandler`].
const QUEUE_KICK: u64 = 0;
const LIMIT_TIMER: u64 = 1;
const COMPLETION: u64 = 2;
/// The most iovecs one READV/WRITEV takes (UIO_MAXIOV); a longer request is served in place.
const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

/// A request whose I/O is on the ring.
struct Slot {
    head: u16,
    ticket: Ticket,
    /// None for a flush.
    direction: Option<Direction>,
    offset: u64,
    len: u64,
    /// What READV/WRITEV reads; kept until the completion, reused by the next request.
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which the handler (and so the slot) may use
// from any thread: GuestMemoryMmap is Send and Sync.
unsafe impl Send for Slot {}

/// One queue served through one ring.
pub(crate) struct UringHandler {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    queue: DeviceQueue,
    pub(crate) disk: Arc<DiskImage>,
    ring: SharedRing,
    slots: Vec<Slot>,
    /// Indexes of the slots not in flight.
    free: Vec<u16>,
    throttle: Option<Throttle>,
}

impl UringHandler {
    /// Where the queue stands, for a snapshot of a paused worker (nothing is in flight then:
    /// a pause waits for every request on the ring).
    pub(crate) fn position(&self) -> crate::snapshot::QueuePosition {
        self.queue.position()
    }

    /// The handler for `activation`, which must hold exactly one queue, on `ring`.
    pub(crate) fn new(
        activation: Activation,
        disk: Arc<DiskImage>,
        ring: SharedRing,
    ) -> Result<Self, ActivateError> {
        let [queue] = device_queues(activation.queues, activation.features)?;
        let entries = lock(&ring).uring.params().sq_entries();
        // A ring holds as many requests as the queue has descriptors, so never runs out.
        let count = u16::try_from(entries).unwrap_or(u16::MAX);
        let slots = (0..count).map(|_| empty_slot()).collect();
        Ok(UringHandler {
            memory: activation.memory,
            interrupt: activation.interrupt,
            queue,
            disk,
            ring,
            slots,
            free: (0..count).rev().collect(),
            throttle: None,
        })
    }

    /// Serves requests only as fast as `limiter` allows.
    pub(crate) fn with_limiter(mut self, limiter: SharedLimiter) -> Result<Self, ActivateError> {
        self.throttle = Some(Throttle::new(limiter).map_err(WorkerError::Timer)?);
        Ok(self)
    }

    /// [`Self::serve`], for tests that drive the handler on their own thread.
    #[cfg(test)]
    pub(crate) fn serve_for_test(&mut self) {
        self.serve();
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Pops and starts the available requests, then submits their I/O in one call.
    fn serve(&mut self) {
        let UringHandler {
            memory,
            interrupt,
            queue,
            disk,
            ring,
            slots,
            free,
            throttle,
        } = self;
        let mut throttle = throttle.as_mut().filter(|t| t.is_limited());
        if throttle.as_ref().is_some_and(|t| t.is_waiting()) {
            return;
        }
        let ring = Arc::clone(ring);
        let mut ring = lock(&ring);
        let mut queued = 0;
        {
            let mut backend = Queue {
                sq: ring.uring.submission(),
                slots,
                free,
                head: 0,
                queued: 0,
            };
            let mut served = 0;
            let mut passes = 0;
            'passes: loop {
                // Bounded as DeviceQueue::process is: a driver that keeps reporting more work
                // must not keep the worker from its kill eventfd.
                passes += 1;
                if passes > CHAINS_PER_PASS {
                    let _ = queue.kick.write(1);
                    break;
                }
                queue.disable_notification(memory);
                while !backend.free.is_empty() {
                    let Some(chain) = queue.pop(memory) else {
                        break;
                    };
                    let head = chain.head_index();
                    let paid = chain_bytes(&chain).saturating_sub(17);
                    if let Some(t) = throttle.as_mut()
                        && !t.admit(paid)
                    {
                        // The limiter's timer brings the worker back; kicks stay off.
                        queue.unpop(1);
                        break 'passes;
                    }
                    backend.head = head;
                    let (used, moved) = request::start_request(disk, memory, chain, &mut backend);
                    if let Some(t) = throttle.as_mut() {
                        t.settle(paid, moved);
                    }
                    if let Some(used) = used {
                        queue.add_used(memory, head, used);
                    }
                    served += 1;
                    if served >= CHAINS_PER_PASS {
                        let _ = queue.kick.write(1);
                        break 'passes;
                    }
                }
                queue.signal_used(memory, interrupt.as_ref());
                if backend.free.is_empty() || !queue.enable_notification(memory) {
                    // Out of slots: the next completion serves the rest.
                    break;
                }
            }
            queue.signal_used(memory, interrupt.as_ref());
            queued += backend.queued;
        }
        if queued > 0 {
            submit(&ring.uring, 0);
        }
    }

    /// Completes every request the kernel finished.
    fn reap(&mut self) {
        let ring = Arc::clone(&self.ring);
        let mut ring = lock(&ring);
        let _ = ring.completion.read();
        for cqe in ring.uring.completion() {
            self.finish(cqe.user_data(), cqe.result());
        }
        drop(ring);
        self.queue
            .signal_used(&self.memory, self.interrupt.as_ref());
    }

    /// Completes the request in slot `index` whose I/O returned `result`.
    fn finish(&mut self, index: u64, result: i32) {
        let Some(slot) = usize::try_from(index)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            error!(
                "disk {}: io_uring completed unknown request {index}",
                self.disk.name()
            );
            return;
        };
        let outcome = outcome(&self.disk, slot, result);
        let used = complete(&self.disk, &self.memory, slot.ticket.status, outcome);
        self.queue.add_used(&self.memory, slot.head, used);
        // `index` named a slot, so it fits.
        self.free.push(index as u16);
    }
}

/// What the request in `slot` comes to once its I/O returned `result`: the bytes written into
/// the guest's buffers, or why it failed. Empties the slot's iovecs.
fn outcome(disk: &DiskImage, slot: &mut Slot, result: i32) -> Result<u64, RequestError> {
    let outcome = match (slot.direction, result) {
        (None, r) if r < 0 => Err(disk.flush_error(os_error(r))),
        (None, _) => Ok(0),
        (Some(_), r) if r < 0 => Err(os_error(r)),
        (Some(direction), done) => {
            let done = done as usize;
            if (done as u64) < slot.len {
                // A short transfer: the rest in place, as the sync engine would.
                let first = advance_iovecs(&mut slot.iovecs, done);
                transfer_iovecs(
                    &mut slot.iovecs[first..],
                    disk.file.as_raw_fd(),
                    slot.offset + done as u64,
                    direction,
                )
                .map(|()| slot.ticket.guest_bytes)
                .map_err(RequestError::Io)
            } else {
                Ok(slot.ticket.guest_bytes)
            }
        }
    };
    slot.iovecs.clear();
    outcome
}

/// Serves one chain through a fresh ring, waiting for its completion: the unit tests' way to
/// run every request test on this engine. Returns the used length.
#[cfg(test)]
pub(crate) fn serve_one(
    disk: &DiskImage,
    mem: &GuestMemoryMmap,
    chain: crate::chain::Chain<'_>,
) -> u32 {
    let mut ring = super::engine::Ring::new(4).unwrap();
    let mut slots = vec![empty_slot()];
    let mut free = vec![0];
    let (used, _) = {
        let mut backend = Queue {
            sq: ring.uring.submission(),
            slots: &mut slots,
            free: &mut free,
            head: chain.head_index(),
            queued: 0,
        };
        request::start_request(disk, mem, chain, &mut backend)
    };
    if let Some(used) = used {
        return used;
    }
    assert!(submit(&ring.uring, 1));
    let cqe = ring.uring.completion().next().unwrap();
    assert_eq!(cqe.user_data(), 0);
    let outcome = outcome(disk, &mut slots[0], cqe.result());
    complete(disk, mem, slots[0].ticket.status, outcome)
}

fn empty_slot() -> Slot {
    Slot {
        head: 0,
        ticket: Ticket {
            status: vm_memory::GuestAddress(0),
            guest_bytes: 0,
        },
        direction: None,
        offset: 0,
        len: 0,
        iovecs: Vec::new(),
    }
}

fn os_error(result: i32) -> RequestError {
    RequestError::Io(io::Error::from_raw_os_error(result.saturating_neg()))
}

/// Submits what is queued, waiting for `want` completions; retried when interrupted.
fn submit(uring: &io_uring::IoUring, want: usize) -> bool {
    loop {
        match uring.submit_and_wait(want) {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("io_uring: cannot submit: {e}");
                return false;
            }
        }
    }
}

/// The ring's submission side as an [`IoBackend`], for one batch.
struct Queue<'a> {
    sq: io_uring::SubmissionQueue<'a>,
    slots: &'a mut [Slot],
    free: &'a mut Vec<u16>,
    /// The chain being started.
    head: u16,
    /// Entries pushed in this batch.
    queued: usize,
}

impl Queue<'_> {
    /// Puts `entry` (for a request taking the next free slot) on the ring; false if it cannot
    /// go there, and the caller serves the request in place.
    fn push(&mut self, slot: Slot, entry: impl FnOnce(&Slot) -> squeue::Entry) -> bool {
        let Some(&index) = self.free.last() else {
            return false;
        };
        let target = &mut self.slots[usize::from(index)];
        // Keeps the slot's iovec storage, which the new request's iovecs were copied into.
        let iovecs = std::mem::take(&mut target.iovecs);
        *target = Slot { iovecs, ..slot };
        let entry = entry(target).user_data(u64::from(index));
        // SAFETY: what the entry points to (the slot's iovec array, the guest buffers it
        // names, the disk's fd) stays valid until its completion is reaped: the slot is not
        // reused before then, the handler keeps guest memory and the disk, and pause and reset
        // wait for every completion (UringHandler::quiesce).
        if unsafe { self.sq.push(&entry) }.is_err() {
            return false;
        }
        self.free.pop();
        self.queued += 1;
        true
    }
}

impl IoBackend for Queue<'_> {
    fn transfer(
        &mut self,
        disk: &DiskImage,
        iovecs: GuestIovecs<'_>,
        offset: u64,
        direction: Direction,
        ticket: Ticket,
    ) -> Result<Started, RequestError> {
        let host = iovecs.as_slice();
        let len = host.iter().map(|iov| iov.iov_len as u64).sum();
        if host.len() <= MAX_IOVECS
            && let Some(&index) = self.free.last()
        {
            let storage = &mut self.slots[usize::from(index)].iovecs;
            storage.clear();
            storage.extend_from_slice(host);
            let fd = types::Fd(disk.file.as_raw_fd());
            let slot = Slot {
                head: self.head,
                ticket,
                direction: Some(direction),
                offset,
                len,
                iovecs: Vec::new(),
            };
            let pushed = self.push(slot, |slot| {
                let (ptr, count) = (slot.iovecs.as_ptr(), slot.iovecs.len() as u32);
                match direction {
                    Direction::FromFile => {
                        opcode::Readv::new(fd, ptr, count).offset(offset).build()
                    }
                    Direction::ToFile => opcode::Writev::new(fd, ptr, count).offset(offset).build(),
                }
            });
            if pushed {
                return Ok(Started::Queued);
            }
        }
        SyncIo.transfer(disk, iovecs, offset, direction, ticket)
    }

    fn flush(&mut self, disk: &DiskImage, ticket: Ticket) -> Result<Started, RequestError> {
        let fd = types::Fd(disk.file.as_raw_fd());
        let slot = Slot {
            head: self.head,
            ticket,
            direction: None,
            offset: 0,
            len: 0,
            iovecs: Vec::new(),
        };
        let pushed = self.push(slot, |_| {
            opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
        });
        if pushed {
            Ok(Started::Queued)
        } else {
            SyncIo.flush(disk, ticket)
        }
    }
}

impl EventHandler for UringHandler {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.queue.kick, QUEUE_KICK)?;
        events.watch(&lock(&self.ring).completion, COMPLETION)?;
        if let Some(throttle) = &self.throttle {
            throttle.register(events, LIMIT_TIMER)?;
        }
        Ok(())
    }

    fn start(&mut self, _events: &EventLoop) {
        self.serve();
    }

    fn handle_event(&mut self, _events: &EventLoop, token: u64) {
        match (token, self.throttle.as_mut()) {
            (COMPLETION, _) => self.reap(),
            (LIMIT_TIMER, Some(throttle)) => throttle.expired(),
            _ => self.queue.clear_kick(),
        }
        self.serve();
    }

    fn quiesce(&mut self) {
        while self.in_flight() > 0 {
            let submitted = submit(&lock(&self.ring).uring, 1);
            self.reap();
            if !submitted {
                error!(
                    "disk {}: io_uring failed with {} requests in flight; they are abandoned",
                    self.disk.name(),
                    self.in_flight()
                );
                return;
            }
        }
    }
}
