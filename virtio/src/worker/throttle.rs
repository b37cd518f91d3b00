//! [`Throttle`]: a worker's side of a rate limiter. The worker asks before it serves a chain;
//! when the limiter says "wait", the chain goes back into the ring, the queue is left alone and
//! a timerfd in the worker's event loop brings it back when the buckets have refilled. So a
//! limited queue loses nothing, and a guest that floods it only ever wakes the worker once per
//! refill.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::warn;
use vmm_sys_util::timerfd::TimerFd;

use super::EventLoop;
use crate::chain::Chain;
use crate::rate_limiter::{RateLimit, RateLimiter};

/// A rate limiter shared by the workers it governs (every queue pair of a net device shares
/// one per direction) and kept by the device, so its buckets outlive pauses and resets. Its
/// limits can change while the workers run ([`Self::set`], for the API's PATCH).
#[derive(Debug, Clone)]
pub struct SharedLimiter(Arc<LimiterCell>);

#[derive(Debug)]
struct LimiterCell {
    /// Whether `limiter` holds anything: the workers' cheap check, so an unlimited queue never
    /// takes the lock.
    limited: AtomicBool,
    limiter: Mutex<Option<RateLimiter>>,
}

impl SharedLimiter {
    /// A limiter with full buckets for `limit` (which may limit nothing).
    pub fn new(limit: RateLimit) -> Self {
        let limiter = RateLimiter::new(limit, Instant::now());
        SharedLimiter(Arc::new(LimiterCell {
            limited: AtomicBool::new(limiter.is_some()),
            limiter: Mutex::new(limiter),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Option<RateLimiter>> {
        // The limiter holds plain numbers, valid whatever a panicking holder left.
        self.0.limiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any bucket limits anything.
    pub fn is_limited(&self) -> bool {
        self.0.limited.load(Ordering::Acquire)
    }

    /// The configured limits, if any.
    pub fn limit(&self) -> Option<RateLimit> {
        self.lock().as_ref().map(RateLimiter::limit)
    }

    /// Changes the limits: a bucket whose configuration changes starts full, one that stays
    /// the same keeps its state.
    pub fn set(&self, limit: RateLimit) {
        let mut guard = self.lock();
        let now = Instant::now();
        *guard = match guard.take() {
            Some(old) => old.reconfigure(limit, now),
            None => RateLimiter::new(limit, now),
        };
        self.0.limited.store(guard.is_some(), Ordering::Release);
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

    /// Whether the limiter limits anything right now; if not, the queue is served as if it
    /// had none.
    pub(crate) fn is_limited(&self) -> bool {
        self.limiter.is_limited()
    }

    /// Takes one operation of `bytes` from the limiter, or arms the timer for when the buckets
    /// allow it and returns false.
    pub(crate) fn admit(&mut self, bytes: u64) -> bool {
        if self.waiting {
            return false;
        }
        let now = Instant::now();
        let ready = match self.limiter.lock().as_mut().map(|l| l.consume(bytes, now)) {
            Some(Ok(())) | None => return true,
            Some(Err(ready)) => ready,
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
            if let Some(limiter) = self.limiter.lock().as_mut() {
                limiter.charge_bytes(moved - paid, Instant::now());
            }
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
