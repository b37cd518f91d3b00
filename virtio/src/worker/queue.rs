//! [`DeviceQueue`]: a virtqueue owned by a worker, and the two loops every data plane runs over
//! it: [`DeviceQueue::process`] serves the chains the driver makes available (requests,
//! transmitted frames), [`DeviceQueue::fill`] moves data from a host source into the buffers the
//! driver posts (received frames, console input). Both suppress notifications while they work,
//! re-check before sleeping, interrupt once per batch and bound a pass, so a driver that never
//! stops submitting (or rewrites its ring under the device) cannot hold the worker.

use std::sync::atomic::{Ordering, fence};

use log::{error, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::chain::Chain;
use crate::device::{ActiveQueue, Interrupt};
use crate::snapshot::QueuePosition;

/// How many chains (or fill steps) one pass of [`DeviceQueue::process`] or [`DeviceQueue::fill`]
/// serves before yielding to the event loop.
pub const CHAINS_PER_PASS: usize = 256;

/// A virtqueue owned by a worker: the queue, its kick eventfd and the used-buffer bookkeeping.
///
/// Public for pvm's vhost-user backends, which serve the same rings from another process.
#[derive(Debug)]
pub struct DeviceQueue {
    pub index: u16,
    pub queue: Queue,
    /// The queue's kick; also what [`Self::process`] signals to come back after a long pass.
    pub kick: EventFd,
    /// Used entries added since the driver was last considered for an interrupt.
    unsignalled: u32,
    /// Set when the driver corrupted the queue; the worker then ignores it until reset.
    stopped: bool,
}

impl DeviceQueue {
    pub fn new(active: ActiveQueue, event_idx: bool) -> Self {
        let mut queue = active.queue;
        queue.set_event_idx(event_idx);
        DeviceQueue {
            index: active.index,
            queue,
            kick: active.kick,
            unsignalled: 0,
            stopped: false,
        }
    }

    /// A queue over `queue` as it is (its event_idx setting included), for a data plane that
    /// configures the queue itself (vhost-user backends); `kick` is what a long pass signals.
    pub fn from_queue(index: u16, queue: Queue, kick: EventFd) -> Self {
        DeviceQueue {
            index,
            queue,
            kick,
            unsignalled: 0,
            stopped: false,
        }
    }

    /// Forgets that the driver broke the queue: for a fresh start of the ring (device reset).
    pub fn restart(&mut self) {
        self.stopped = false;
        self.unsignalled = 0;
    }

    /// Where the device stands in the ring, for a snapshot.
    pub fn position(&self) -> QueuePosition {
        QueuePosition {
            index: self.index,
            next_avail: self.queue.next_avail(),
            next_used: Some(self.queue.next_used()),
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Consumes pending kicks so the level-triggered epoll stops reporting them.
    pub(crate) fn clear_kick(&self) {
        // EAGAIN (no kick pending) is the only expected error and means nothing to do.
        let _ = self.kick.read();
    }

    /// Stops the queue because the driver broke it; logged once.
    pub fn fail(&mut self, reason: &dyn std::fmt::Display) {
        if !self.stopped {
            error!(
                "queue {}: {reason}; the queue is stopped until the device is reset",
                self.index
            );
            self.stopped = true;
        }
    }

    /// The next available chain, or `None` when there is none or the queue is stopped. An avail
    /// index further ahead than the queue size stops the queue.
    pub fn pop<'m>(&mut self, mem: &'m GuestMemoryMmap) -> Option<Chain<'m>> {
        if self.stopped {
            return None;
        }
        match self.queue.iter(mem) {
            Ok(mut chains) => chains.next(),
            Err(e) => {
                self.fail(&format_args!("invalid available ring: {e}"));
                None
            }
        }
    }

    /// Puts the last `count` popped chains back so they are popped again later.
    pub fn unpop(&mut self, count: u16) {
        let next = self.queue.next_avail().wrapping_sub(count);
        self.queue.set_next_avail(next);
    }

    /// Whether the driver has made chains available that were not popped yet.
    pub fn has_available(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.stopped {
            return false;
        }
        match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(idx) => idx.0 != self.queue.next_avail(),
            Err(e) => {
                self.fail(&format_args!("cannot read the available ring: {e}"));
                false
            }
        }
    }

    /// Returns a chain to the driver with `len` bytes written into it.
    pub fn add_used(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if self.stopped {
            return;
        }
        match self.queue.add_used(mem, head, len) {
            Ok(()) => self.unsignalled += 1,
            Err(e) => self.fail(&format_args!("cannot add to the used ring: {e}")),
        }
    }

    /// Interrupts the driver if it has new used entries and (with EVENT_IDX) asked to be told.
    pub fn signal_used(&mut self, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt) {
        if self.unsignalled == 0 {
            return;
        }
        self.unsignalled = 0;
        match self.queue.needs_notification(mem) {
            Ok(true) => {
                if let Err(e) = interrupt.notify_queue(self.index) {
                    warn!("queue {}: cannot interrupt the driver: {e}", self.index);
                }
            }
            Ok(false) => {}
            Err(e) => self.fail(&format_args!("cannot read used_event: {e}")),
        }
    }

    /// Asks the driver to kick on new buffers. Returns true if buffers arrived meanwhile, in
    /// which case the caller must process them as no kick may come.
    pub fn enable_notification(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.stopped {
            return false;
        }
        match self.queue.enable_notification(mem) {
            Ok(more) => more,
            Err(e) => {
                self.fail(&format_args!("cannot enable notifications: {e}"));
                false
            }
        }
    }

    /// Asks the driver to kick when it makes buffers available beyond those already there (which
    /// the device cannot use yet, e.g. too few for a frame). Returns true if some arrived
    /// meanwhile, in which case the caller must look again as no kick may come.
    pub fn notify_on_more(&mut self, mem: &GuestMemoryMmap) -> bool {
        if self.stopped {
            return false;
        }
        let avail_idx = |queue: &Queue| queue.avail_idx(mem, Ordering::Acquire).map(|i| i.0);
        let result = avail_idx(&self.queue).and_then(|before| {
            if self.queue.event_idx_enabled() {
                // avail_event sits after the used ring's elements. virtio-queue's own
                // enable_notification sets it to the device's position, which the driver has
                // already passed when unusable buffers are pending, so it would never kick.
                let offset = 4 + 8 * u64::from(self.queue.size());
                let addr = GuestAddress(self.queue.used_ring()).checked_add(offset);
                let addr = addr.ok_or(virtio_queue::Error::AddressOverflow)?;
                mem.store(before.to_le(), addr, Ordering::Relaxed)
                    .map_err(virtio_queue::Error::GuestMemory)?;
            } else {
                self.queue.enable_notification(mem)?;
            }
            fence(Ordering::SeqCst);
            Ok(avail_idx(&self.queue)? != before)
        });
        match result {
            Ok(more) => more,
            Err(e) => {
                self.fail(&format_args!("cannot enable notifications: {e}"));
                false
            }
        }
    }

    pub fn disable_notification(&mut self, mem: &GuestMemoryMmap) {
        if self.stopped {
            return;
        }
        if let Err(e) = self.queue.disable_notification(mem) {
            self.fail(&format_args!("cannot disable notifications: {e}"));
        }
    }

    /// Serves every available chain with `handle`, which returns the number of bytes it wrote
    /// into the chain. Kicks are suppressed while draining, then re-enabled with a final check so
    /// no buffer is missed; the driver is interrupted once per batch.
    ///
    /// At most [`CHAINS_PER_PASS`] chains are served per call; if more are waiting the queue kicks
    /// itself and returns, so a driver that never stops submitting cannot starve the device's
    /// other queues or delay a reset.
    pub fn process<F>(&mut self, mem: &GuestMemoryMmap, interrupt: &dyn Interrupt, mut handle: F)
    where
        F: FnMut(Chain<'_>) -> u32,
    {
        self.process_until(mem, interrupt, |chain| Some(handle(chain)));
    }

    /// [`Self::process`] for a handler that may refuse a chain (a rate limiter said wait):
    /// `None` puts the chain back into the ring and ends the pass with kicks still suppressed,
    /// as whoever refused brings the worker back. Returns whether a chain was refused.
    pub(crate) fn process_until<F>(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        mut handle: F,
    ) -> bool
    where
        F: FnMut(Chain<'_>) -> Option<u32>,
    {
        let mut served = 0;
        let mut passes = 0;
        loop {
            // A pass that serves nothing still counts: a driver can make enable_notification
            // report more work that pop then does not find (see the overlap check at
            // activation), and the worker must get back to its kill eventfd.
            passes += 1;
            if passes > CHAINS_PER_PASS {
                let _ = self.kick.write(1);
                return false;
            }
            self.disable_notification(mem);
            while let Some(chain) = self.pop(mem) {
                let head = chain.head_index();
                let Some(len) = handle(chain) else {
                    self.unpop(1);
                    self.signal_used(mem, interrupt);
                    return true;
                };
                self.add_used(mem, head, len);
                served += 1;
                if served >= CHAINS_PER_PASS {
                    self.signal_used(mem, interrupt);
                    // Come back through epoll. The eventfd write only fails if the counter would
                    // overflow, i.e. a wake-up is pending anyway.
                    let _ = self.kick.write(1);
                    return false;
                }
            }
            self.signal_used(mem, interrupt);
            if !self.enable_notification(mem) {
                return false;
            }
        }
    }

    /// Delivers host data from `source` into this (receive) queue until the source is empty,
    /// the guest is out of buffers (then kicks are enabled so the guest's next buffer wakes the
    /// worker) or [`CHAINS_PER_PASS`] steps are done (then the queue kicks itself). The driver is
    /// interrupted once, at the end, if it asked to be.
    pub fn fill(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &dyn Interrupt,
        source: &mut impl FillSource,
    ) -> FillEnd {
        let mut steps = 0;
        let end = loop {
            if steps == CHAINS_PER_PASS {
                // Fails only if the counter would overflow, i.e. a wake-up is pending anyway.
                let _ = self.kick.write(1);
                break FillEnd::Yielded;
            }
            if self.stopped {
                break FillEnd::Stopped;
            }
            match source.fill_one(self, mem) {
                FillStep::Moved | FillStep::Skipped => steps += 1,
                FillStep::SourceEmpty => break FillEnd::SourceEmpty,
                FillStep::SourceFailed => break FillEnd::SourceFailed,
                FillStep::NoBuffers => {
                    if !self.notify_on_more(mem) {
                        break if self.stopped {
                            FillEnd::Stopped
                        } else {
                            FillEnd::GuestFull
                        };
                    }
                    // Buffers arrived meanwhile. Counted too: a driver rewriting avail.idx
                    // under us must not keep the worker away from its kill eventfd.
                    steps += 1;
                }
            }
        };
        self.signal_used(mem, interrupt);
        end
    }
}

/// What one step of a [`FillSource`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillStep {
    /// A unit of host data (a frame, a run of input bytes) went into the guest's buffers, or
    /// was dropped because it can never fit (counted by the source).
    Moved,
    /// Work without a delivery (a runt frame read and discarded); counts against the pass.
    Skipped,
    /// The host side has nothing more for now.
    SourceEmpty,
    /// The host side failed (counted and logged by the source); try again on the next event,
    /// not in this pass.
    SourceFailed,
    /// The guest has no buffers, or too few for the data in hand, which stays pending.
    NoBuffers,
}

/// A host source whose data a device delivers into a receive queue (a tap, console input).
pub trait FillSource {
    /// Moves at most one unit of pending or newly read host data into `queue`'s buffers
    /// (adding the used entries itself), keeping what does not fit pending for the next call.
    /// Should not read new host data while the guest has no buffers.
    fn fill_one(&mut self, queue: &mut DeviceQueue, memory: &GuestMemoryMmap) -> FillStep;
}

/// Why [`DeviceQueue::fill`] returned: what the worker should wait for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillEnd {
    /// The source is empty: wait for it to become readable.
    SourceEmpty,
    /// The source failed: wait for the next queue kick rather than spin on it.
    SourceFailed,
    /// The guest is out of buffers and notifications are on: wait for its kick.
    GuestFull,
    /// The pass budget was spent and the queue kicked itself: more comes through epoll.
    Yielded,
    /// The driver broke the queue; it stays stopped until a reset.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestQueue, looped, readable, test_memory, writable};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn process_serves_all_chains_and_interrupts_once() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        tq.add_chain(&[readable(0x10_000, 8)]);
        tq.add_chain(&[writable(0x20_000, 8)]);
        let (mut dq, interrupt) = tq.device_queue(false);
        let mut seen = 0;
        dq.process(&mem, interrupt.as_ref(), |_chain| {
            seen += 1;
            seen
        });
        assert_eq!(seen, 2);
        assert_eq!(tq.used(&mem), vec![(0, 1), (1, 2)]);
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn a_driver_that_toggles_avail_idx_through_used_flags_cannot_trap_the_worker() {
        // fuzz/crashes/*/avail-idx-under-used-flags, past the transport's overlap check: with
        // avail.idx under used.flags every disable/enable of notifications makes a chain appear
        // and vanish, so a loop counting only served chains never ends.
        let mem = test_memory();
        let mut queue = Queue::new(4).unwrap();
        queue.set_desc_table_address(Some(0x0), Some(0));
        queue.set_avail_ring_address(Some(0x1002), Some(0));
        queue.set_used_ring_address(Some(0x1004), Some(0));
        queue.set_ready(true);
        mem.write_obj(readable(0x10_000, 8), GuestAddress(0))
            .unwrap();
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick_seen = kick.try_clone().unwrap();
        let mut dq = DeviceQueue::new(
            ActiveQueue {
                index: 0,
                queue,
                kick,
            },
            false,
        );
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let interrupt = crate::testing::RecordingInterrupt::default();
            dq.process(&mem, &interrupt, |_| 0);
            done.send(()).unwrap();
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("process returned");
        // It comes back through epoll rather than dropping whatever may be pending.
        assert_eq!(kick_seen.read().unwrap(), 1);
    }

    #[test]
    fn avail_index_far_ahead_stops_the_queue() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        tq.set_avail_idx(&mem, 100);
        let (mut dq, interrupt) = tq.device_queue(false);
        let mut calls = 0;
        dq.process(&mem, interrupt.as_ref(), |_| {
            calls += 1;
            0
        });
        assert_eq!(calls, 0);
        assert!(dq.is_stopped());
        assert!(dq.pop(&mem).is_none());
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        let (mut dq, interrupt) = tq.device_queue(true);
        // used_event 0: interrupt once the first entry is used.
        tq.add_chain(&[writable(0x10_000, 8)]);
        dq.process(&mem, interrupt.as_ref(), |_| 0);
        assert_eq!(interrupt.count(0), 1);
        // used_event 5: the next two entries are not worth an interrupt yet.
        tq.set_used_event(&mem, 5);
        tq.add_chain(&[writable(0x10_000, 8)]);
        tq.add_chain(&[writable(0x10_000, 8)]);
        dq.process(&mem, interrupt.as_ref(), |_| 0);
        assert_eq!(interrupt.count(0), 1);
        assert_eq!(tq.used(&mem).len(), 3);
        // process() re-armed kicks: avail_event is where the device stopped.
        let avail_event_addr = tq.used_addr().unchecked_add(4 + 8 * 16);
        assert_eq!(mem.read_obj::<u16>(avail_event_addr).unwrap(), 3);
    }

    #[test]
    fn descriptor_loops_end_at_the_queue_size() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        // Descriptor 0 chains to itself.
        tq.store_desc(0, looped(readable(0x10_000, 16), 0));
        tq.publish(&mem, 0);
        let (mut dq, interrupt) = tq.device_queue(false);
        let mut descriptors = 0;
        dq.process(&mem, interrupt.as_ref(), |chain| {
            descriptors = chain.count();
            0
        });
        assert_eq!(descriptors, 16);
        assert_eq!(tq.used(&mem), vec![(0, 0)]);
    }

    #[test]
    fn a_long_pass_yields_and_kicks_itself() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 256);
        for _ in 0..256 {
            tq.add_chain(&[writable(0x10_000, 8)]);
        }
        let (mut dq, interrupt) = tq.device_queue(false);
        dq.process(&mem, interrupt.as_ref(), |_| 0);
        assert_eq!(tq.used(&mem).len(), CHAINS_PER_PASS);
        assert_eq!(dq.kick.read().unwrap(), 1, "the queue re-kicked itself");
        assert_eq!(interrupt.count(0), 1);
    }

    #[test]
    fn a_refused_chain_stays_in_the_ring_and_nothing_wakes_the_worker() {
        let mem = test_memory();
        let tq = TestQueue::new(&mem, 16);
        for _ in 0..3 {
            tq.add_chain(&[writable(0x10_000, 8)]);
        }
        let (mut dq, interrupt) = tq.device_queue(false);
        let mut offered = Vec::new();
        let refused = dq.process_until(&mem, interrupt.as_ref(), |chain| {
            offered.push(chain.head_index());
            (offered.len() < 2).then_some(4)
        });
        assert!(refused);
        assert_eq!(offered, [0, 1]);
        assert_eq!(tq.used(&mem), vec![(0, 4)]);
        assert_eq!(interrupt.count(0), 1, "what was served is signalled");
        // No self-kick: the refuser's timer brings the worker back, not a busy loop.
        assert!(dq.kick.read().is_err());
        // The refused chain comes first next time.
        dq.process(&mem, interrupt.as_ref(), |_| 0);
        assert_eq!(tq.used(&mem), vec![(0, 4), (1, 0), (2, 0)]);
    }
}
