//! [`Throttle`]: a worker's side of a rate limiter. The worker asks before it serves a chain;
//! when the limiter says "wait", the chain goes back into the ring, the queue is left alone and
//! a timerfd in the worker's event loop brings it back when the buckets have refilled. So a
//! limited queue loses nothing, and a guest that floods it only ever wakes the worker once per
//! refill.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::timerfd::TimerFd;

use super::EventLoop;
use crate::chain::Chain;
use crate::rate_limiter::{RateLimit, RateLimiter};

/// A rate limiter shared by the workers it governs (every queue pair of a net device shares
/// one per direction) and kept by the device, so its buckets outlive pauses and resets.
#[derive(Debug, Clone)]
pub struct SharedLimiter(Arc<Mutex<RateLimiter>>);

impl SharedLimiter {
    /// A limiter with full buckets, or `None` when `limit` limits nothing.
    pub fn new(limit: RateLimit) -> Option<Self> {
        RateLimiter::new(limit, Instant::now()).map(|l| SharedLimiter(Arc::new(Mutex::new(l))))
    }

    fn lock(&self) -> MutexGuard<'_, RateLimiter> {
        // The limiter holds plain numbers, valid whatever a panicking holder left.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The configured limits.
    pub fn limit(&self) -> RateLimit {
        self.lock().limit()
    }
}

/// One queue's throttle: the shared limiter and the worker's timer.
pub(crate) struct Throttle {
    limiter: SharedLimiter,
    timer: TimerFd,
    /// Set while the timer is armed: the queue waits for it and serves nothing.
    waiting: bool,
}

impl Throttle {
    pub(crate) fn new(limiter: SharedLimiter) -> io::Result<Self> {
        Ok(Throttle {
            limiter,
            timer: TimerFd::new()?,
            waiting: false,
        })
    }

    /// Watches the timer under `token`; called from a handler's `register`.
    pub(crate) fn register(&self, events: &EventLoop, token: u64) -> io::Result<()> {
        events.watch(&self.timer, token)
    }

    /// Whether the queue waits for its timer.
    pub(crate) fn is_waiting(&self) -> bool {
        self.waiting
    }

    /// Takes one operation of `bytes` from the limiter, or arms the timer for when the buckets
    /// allow it and returns false.
    pub(crate) fn admit(&mut self, bytes: u64) -> bool {
        if self.waiting {
            return false;
        }
        let now = Instant::now();
        let ready = match self.limiter.lock().consume(bytes, now) {
            Ok(()) => return true,
            Err(ready) => ready,
        };
        // A zero duration would disarm the timer.
        let delay = ready
            .saturating_duration_since(now)
            .max(Duration::from_nanos(1));
        match self.timer.reset(delay, None) {
            Ok(()) => self.waiting = true,
            Err(e) => {
                // Without a timer the queue would never come back: serve instead of stalling.
                warn!("rate limiter: cannot arm the timer, not limiting this request: {e}");
                return true;
            }
        }
        false
    }

    /// Charges what a request moved beyond the `paid` bytes it was admitted with: the count
    /// from the parse the I/O used, which the guest cannot change under the device.
    pub(crate) fn settle(&mut self, paid: u64, moved: u64) {
        if moved > paid {
            self.limiter
                .lock()
                .charge_bytes(moved - paid, Instant::now());
        }
    }

    /// The timer fired: the queue may be served again.
    pub(crate) fn expired(&mut self) {
        // Consumes the expiration so the level-triggered epoll stops reporting it; the timer
        // is readable, so this does not block.
        if let Err(e) = self.timer.wait() {
            warn!("rate limiter: cannot read the timer: {e}");
        }
        self.waiting = false;
    }
}

/// The total length of `chain`'s descriptors, as a limiter's byte count; an unreadable chain
/// counts what was read of it (serving it fails anyway).
pub(crate) fn chain_bytes(chain: &Chain<'_>) -> u64 {
    chain
        .clone()
        .fold(0u64, |sum, desc| sum.saturating_add(u64::from(desc.len())))
}
