//! One receive/transmit queue pair served in-process: [`PairWorker`], the worker every pair of
//! a virtio-net device runs (whether the device has one pair or many), and [`QueuePlan`], which
//! sorts the queues the driver set up into pairs and the control queue.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use log::warn;
use virtio_bindings::bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ};
use vm_memory::GuestMemoryMmap;

use super::multiqueue::PairLink;
use super::receive::{PendingFrame, TapSource};
use super::{NetBackend, NetCounters, VNET_HDR_LEN, transmit};
use crate::device::{ActivateError, ActiveQueue, Interrupt};
use crate::snapshot::QueuePosition;
use crate::worker::{
    DeviceQueue, EventHandler, EventLoop, FillEnd, QueuePositions, SharedLimiter, Throttle,
    WorkerError, chain_bytes, feature,
};

const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const TAP_READY: u64 = 2;
/// The pair was turned on or off (multiqueue).
const PAIR_CHANGED: u64 = 3;
/// The receive rate limiter's timer fired.
const RX_TIMER: u64 = 4;
/// The transmit rate limiter's timer fired.
const TX_TIMER: u64 = 5;

/// The queues of an activation, sorted: complete pairs from pair 0 on, and the control queue.
#[derive(Debug)]
pub(crate) struct QueuePlan {
    /// `[rx, tx]` of each pair the driver set up, in pair order.
    pub(crate) pairs: Vec<[ActiveQueue; 2]>,
    pub(crate) ctrl: Option<ActiveQueue>,
}

impl QueuePlan {
    /// Sorts `queues` of a device with `count` pairs: with MQ (and CTRL_VQ) the control queue is
    /// 2N and every complete pair counts, without MQ only pair 0 and a control queue at 2
    /// (virtio 1.2, 5.1.2). Queues beyond the complete pairs are logged and left unserved; no
    /// complete pair at all is refused.
    pub(crate) fn new(
        queues: Vec<ActiveQueue>,
        count: usize,
        features: u64,
    ) -> Result<Self, ActivateError> {
        let got = queues.len();
        let ctrl_vq = features & feature(VIRTIO_NET_F_CTRL_VQ) != 0;
        let mq = ctrl_vq && features & feature(VIRTIO_NET_F_MQ) != 0;
        let ctrl_index = match (mq, ctrl_vq) {
            (true, _) => Some(2 * count),
            (false, true) => Some(2),
            (false, false) => None,
        };
        let max_pairs = if mq { count } else { 1 };
        let mut slots: Vec<Option<ActiveQueue>> = (0..2 * count + 1).map(|_| None).collect();
        for queue in queues {
            match slots.get_mut(usize::from(queue.index)) {
                Some(slot) => *slot = Some(queue),
                None => warn!("virtio-net: queue {} does not exist, ignored", queue.index),
            }
        }
        let ctrl = ctrl_index.and_then(|index| slots.get_mut(index).and_then(Option::take));
        let mut pairs = Vec::new();
        for pair in 0..max_pairs {
            match (slots[2 * pair].take(), slots[2 * pair + 1].take()) {
                (Some(rx), Some(tx)) => pairs.push([rx, tx]),
                _ => break,
            }
        }
        let unused = slots.iter().filter(|s| s.is_some()).count();
        if unused > 0 {
            warn!(
                "virtio-net: {unused} ready queues beyond the {} complete queue pairs are not served",
                pairs.len()
            );
        }
        if pairs.is_empty() {
            return Err(ActivateError::QueueCount { got, want: 2 });
        }
        Ok(QueuePlan { pairs, ctrl })
    }
}

/// The in-process data plane of one queue pair: frames from the guest's transmit queue go to
/// the pair's tap queue, frames from the tap queue into the receive queue. All of its state
/// (ring positions, the frame waiting for guest buffers) stays in it across a pause.
pub(crate) struct PairWorker {
    memory: GuestMemoryMmap,
    interrupt: Arc<dyn Interrupt>,
    rx: DeviceQueue,
    tx: DeviceQueue,
    tap: Arc<dyn NetBackend>,
    counters: Arc<NetCounters>,
    mergeable: bool,
    pending: PendingFrame,
    tap_watched: bool,
    /// Whether the pair is on (always for pair 0).
    link: Arc<PairLink>,
    /// Pair 0's tap queue, which sends what the guest still queues on this pair while it is
    /// off (its own tap queue is detached then). Pair 0 itself is never off.
    fallback: Arc<dyn NetBackend>,
    /// Rate limiters of each direction, if configured (shared by all pairs of the device).
    rx_throttle: Option<Throttle>,
    tx_throttle: Option<Throttle>,
}

/// What a [`PairWorker`] is made of, besides its queues.
pub(crate) struct PairParts {
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) interrupt: Arc<dyn Interrupt>,
    pub(crate) tap: Arc<dyn NetBackend>,
    pub(crate) counters: Arc<NetCounters>,
    pub(crate) mergeable: bool,
    pub(crate) link: Arc<PairLink>,
    pub(crate) fallback: Arc<dyn NetBackend>,
    pub(crate) rx_limiter: SharedLimiter,
    pub(crate) tx_limiter: SharedLimiter,
}

impl PairWorker {
    pub(crate) fn new(
        parts: PairParts,
        rx: DeviceQueue,
        tx: DeviceQueue,
    ) -> Result<Self, ActivateError> {
        let PairParts {
            memory,
            interrupt,
            tap,
            counters,
            mergeable,
            link,
            fallback,
            rx_limiter,
            tx_limiter,
        } = parts;
        let throttle =
            |limiter: SharedLimiter| Throttle::new(limiter).map(Some).map_err(WorkerError::Timer);
        Ok(PairWorker {
            memory,
            interrupt,
            rx,
            tx,
            tap,
            counters,
            mergeable,
            pending: PendingFrame::default(),
            tap_watched: false,
            link,
            fallback,
            rx_throttle: throttle(rx_limiter)?,
            tx_throttle: throttle(tx_limiter)?,
        })
    }

    /// The receive and transmit queues, for a look at a paused pair.
    #[cfg(test)]
    pub(crate) fn queues(&self) -> (&DeviceQueue, &DeviceQueue) {
        (&self.rx, &self.tx)
    }

    /// The frame waiting for receive buffers, for a look at a paused pair.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> &PendingFrame {
        &self.pending
    }

    fn transmit_all(&mut self) {
        let tap = if self.link.enabled() {
            &self.tap
        } else {
            &self.fallback
        };
        let (memory, counters) = (&self.memory, &self.counters);
        let Some(throttle) = self.tx_throttle.as_mut().filter(|t| t.is_limited()) else {
            self.tx.process(memory, self.interrupt.as_ref(), |chain| {
                transmit(tap.as_ref(), memory, chain, counters)
            });
            return;
        };
        if throttle.is_waiting() {
            return;
        }
        self.tx
            .process_until(memory, self.interrupt.as_ref(), |chain| {
                let paid = chain_bytes(&chain).saturating_sub(VNET_HDR_LEN as u64);
                if !throttle.admit(paid) {
                    return None;
                }
                // What was sent, from the parse the send used.
                let before = counters.tx_bytes.load(Ordering::Relaxed);
                let used = transmit(tap.as_ref(), memory, chain, counters);
                let moved = counters
                    .tx_bytes
                    .load(Ordering::Relaxed)
                    .saturating_sub(before);
                throttle.settle(paid, moved);
                Some(used)
            });
    }

    fn watch_tap(&mut self, events: &EventLoop, watch: bool) {
        if watch == self.tap_watched {
            return;
        }
        let result = if watch {
            events.watch(self.tap.as_ref(), TAP_READY)
        } else {
            events.unwatch(self.tap.as_ref())
        };
        match result {
            Ok(()) => self.tap_watched = watch,
            Err(e) => warn!("tap {}: cannot update the epoll set: {e}", self.tap.name()),
        }
    }

    /// Moves frames from the tap to the guest. The tap (level-triggered) is watched only while
    /// reading it can make progress: not while the guest has no buffers (its receive kick
    /// brings the worker back), nor after a failed read, nor while the pair is off.
    fn receive(&mut self, events: &EventLoop) {
        if !self.link.enabled() {
            // The tap queue is detached: nothing to read until the pair is on (PAIR_CHANGED).
            self.watch_tap(events, false);
            return;
        }
        let source = TapSource::new(
            self.tap.as_ref(),
            &mut self.pending,
            self.mergeable,
            &self.counters,
        )
        .with_link(&self.link)
        .with_throttle(self.rx_throttle.as_mut().filter(|t| t.is_limited()));
        let mut source = source;
        let end = self
            .rx
            .fill(&self.memory, self.interrupt.as_ref(), &mut source);
        let watch = match end {
            FillEnd::SourceEmpty | FillEnd::Yielded => true,
            FillEnd::SourceFailed | FillEnd::GuestFull | FillEnd::Stopped => false,
        };
        // While the limiter holds a frame back, the tap waits with it (for the timer).
        let throttled = self.rx_throttle.as_ref().is_some_and(Throttle::is_waiting);
        self.watch_tap(events, watch && !throttled && self.link.enabled());
    }
}

impl QueuePositions for PairWorker {
    fn positions(&self) -> Vec<QueuePosition> {
        vec![self.rx.position(), self.tx.position()]
    }
}

impl EventHandler for PairWorker {
    fn register(&mut self, events: &EventLoop) -> io::Result<()> {
        events.watch(&self.rx.kick, RX_KICK)?;
        events.watch(&self.tx.kick, TX_KICK)?;
        events.watch(&self.link.wake, PAIR_CHANGED)?;
        if let Some(throttle) = &self.rx_throttle {
            throttle.register(events, RX_TIMER)?;
        }
        if let Some(throttle) = &self.tx_throttle {
            throttle.register(events, TX_TIMER)?;
        }
        // A fresh event loop (start or resume): the tap is watched again once receive() finds
        // it worth it.
        self.tap_watched = false;
        Ok(())
    }

    fn start(&mut self, events: &EventLoop) {
        self.transmit_all();
        self.receive(events);
    }

    fn handle_event(&mut self, events: &EventLoop, token: u64) {
        match token {
            RX_KICK => {
                self.rx.clear_kick();
                self.receive(events);
            }
            TX_KICK => {
                self.tx.clear_kick();
                self.transmit_all();
            }
            TAP_READY => self.receive(events),
            PAIR_CHANGED => {
                self.link.clear_wake();
                // Turned on: the tap queue is attached again and watched; off: unwatched.
                self.receive(events);
            }
            RX_TIMER => {
                if let Some(throttle) = self.rx_throttle.as_mut() {
                    throttle.expired();
                }
                self.receive(events);
            }
            TX_TIMER => {
                if let Some(throttle) = self.tx_throttle.as_mut() {
                    throttle.expired();
                }
                self.transmit_all();
            }
            _ => {}
        }
    }
}
