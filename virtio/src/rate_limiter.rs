//! Token buckets that cap what a guest may move through a device: one bucket for bytes, one for
//! operations (requests, frames), each refilling continuously at `size` tokens per
//! `refill_time`, plus a one-time burst spent first and never refilled.
//!
//! The arithmetic is integer only: refill credit is kept as an exact fraction (nanoseconds times
//! size, divided by the refill time), so no token is lost or invented however often the bucket
//! is looked at. A request larger than the bucket can never fit; it goes through once the bucket
//! is full and leaves the bucket in debt, which later requests wait out, so the long-run rate
//! still holds.
//!
//! The buckets know nothing about threads or file descriptors: the device worker asks
//! [`RateLimiter::consume`] and, when told to wait, arms a timer for the instant it got.

use std::time::{Duration, Instant};

/// One bucket's configuration: `size` tokens per `refill_time`, plus `one_time_burst` extra
/// tokens available once at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketConfig {
    pub size: u64,
    pub one_time_burst: u64,
    pub refill_time: Duration,
}

impl BucketConfig {
    /// A limit of `rate` tokens per second with a bucket holding one second's worth.
    pub fn per_second(rate: u64) -> Self {
        BucketConfig {
            size: rate,
            one_time_burst: 0,
            refill_time: Duration::from_secs(1),
        }
    }

    /// Whether this configuration limits anything: a zero size or refill time means no limit.
    pub fn is_enabled(&self) -> bool {
        self.size > 0 && !self.refill_time.is_zero()
    }
}

/// A token bucket (see the module documentation).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    config: BucketConfig,
    /// Nanoseconds of the refill time; at least 1.
    refill_ns: u128,
    /// Tokens in the bucket; negative while a request larger than the bucket is paid back.
    budget: i128,
    /// What is left of the one-time burst.
    burst: u64,
    /// Refill credit not yet worth a whole token, in units of 1/refill_ns tokens.
    credit: u128,
    last_refill: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` when `config` does not limit anything.
    pub fn new(config: BucketConfig, now: Instant) -> Option<Self> {
        if !config.is_enabled() {
            return None;
        }
        Some(TokenBucket {
            config,
            refill_ns: config.refill_time.as_nanos().max(1),
            budget: i128::from(config.size),
            burst: config.one_time_burst,
            credit: 0,
            last_refill: now,
        })
    }

    pub fn config(&self) -> BucketConfig {
        self.config
    }

    /// Adds what the time since the last refill is worth, up to the bucket size.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_refill).as_nanos();
        self.last_refill = self.last_refill.max(now);
        let size = u128::from(self.config.size);
        let full = i128::from(self.config.size);
        if self.budget >= full {
            self.credit = 0;
            return;
        }
        // elapsed is at most ~2^64 ns in practice; saturate rather than trust it.
        let credit = self.credit.saturating_add(elapsed.saturating_mul(size));
        let tokens = credit / self.refill_ns;
        self.credit = credit % self.refill_ns;
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.budget = self.budget.saturating_add(tokens);
        if self.budget >= full {
            self.budget = full;
            self.credit = 0;
        }
    }

    /// Takes `tokens` if the bucket (with the burst) holds them, or if the bucket is full and the
    /// request could never fit; otherwise takes nothing and says when to try again.
    pub fn consume(&mut self, tokens: u64, now: Instant) -> Result<(), Instant> {
        self.refill(now);
        if self.has(tokens) {
            self.take(tokens);
            Ok(())
        } else {
            Err(self.ready_at(tokens, now))
        }
    }

    /// Whether `tokens` may be taken now (after a refill).
    fn has(&self, tokens: u64) -> bool {
        let available = self.budget + i128::from(self.burst);
        i128::from(tokens) <= available || self.budget >= i128::from(self.config.size)
    }

    /// Takes `tokens` whether or not the bucket holds them (what a request turned out to move
    /// beyond what it paid for): the burst first, then the budget, which may go into debt.
    pub fn charge(&mut self, tokens: u64, now: Instant) {
        self.refill(now);
        self.take(tokens);
    }

    /// Takes `tokens`, the burst first; the budget may go negative (debt).
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        self.budget -= i128::from(tokens - from_burst);
    }

    /// The earliest instant at which `tokens` can be taken, the burst being too small.
    fn ready_at(&self, tokens: u64, now: Instant) -> Instant {
        // Needed in the budget: what the burst does not cover, at most a full bucket.
        let want = i128::from(tokens.saturating_sub(self.burst).min(self.config.size));
        let missing = u128::try_from(want - self.budget).unwrap_or(0);
        // Whole tokens need missing * refill_ns credit units; each nanosecond brings `size`.
        let needed = missing
            .saturating_mul(self.refill_ns)
            .saturating_sub(self.credit);
        let ns = needed.div_ceil(u128::from(self.config.size));
        let ns = u64::try_from(ns).unwrap_or(u64::MAX);
        now.checked_add(Duration::from_nanos(ns))
            .unwrap_or(now + Duration::from_secs(86_400))
    }
}

/// A device's limits: a bucket of bytes and a bucket of operations, each optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    pub bandwidth: Option<BucketConfig>,
    pub ops: Option<BucketConfig>,
}

impl RateLimit {
    /// Whether any bucket limits anything.
    pub fn is_enabled(&self) -> bool {
        self.bandwidth.is_some_and(|b| b.is_enabled()) || self.ops.is_some_and(|b| b.is_enabled())
    }
}

/// The buckets of one device queue (or direction).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Full buckets for `limit`, or `None` when it limits nothing (the device then skips every
    /// check).
    pub fn new(limit: RateLimit, now: Instant) -> Option<Self> {
        let bandwidth = limit.bandwidth.and_then(|c| TokenBucket::new(c, now));
        let ops = limit.ops.and_then(|c| TokenBucket::new(c, now));
        (bandwidth.is_some() || ops.is_some()).then_some(RateLimiter { bandwidth, ops })
    }

    /// The limiter for `limit`, keeping the state of each bucket whose configuration stays;
    /// `None` when `limit` limits nothing.
    pub fn reconfigure(self, limit: RateLimit, now: Instant) -> Option<Self> {
        let keep = |old: Option<TokenBucket>, config: Option<BucketConfig>| match (old, config) {
            (Some(old), Some(config)) if old.config() == config => Some(old),
            (_, config) => config.and_then(|c| TokenBucket::new(c, now)),
        };
        let bandwidth = keep(self.bandwidth, limit.bandwidth);
        let ops = keep(self.ops, limit.ops);
        (bandwidth.is_some() || ops.is_some()).then_some(RateLimiter { bandwidth, ops })
    }

    /// What the limiter was made from.
    pub fn limit(&self) -> RateLimit {
        RateLimit {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// Takes one operation of `bytes` bytes if both buckets allow it now; otherwise takes
    /// nothing and returns the instant at which both will.
    pub fn consume(&mut self, bytes: u64, now: Instant) -> Result<(), Instant> {
        let mut ready = now;
        let mut blocked = false;
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                if !bucket.has(tokens) {
                    blocked = true;
                    ready = ready.max(bucket.ready_at(tokens, now));
                }
            }
        }
        if blocked {
            return Err(ready);
        }
        if let Some(bucket) = &mut self.bandwidth {
            bucket.take(bytes);
        }
        if let Some(bucket) = &mut self.ops {
            bucket.take(1);
        }
        Ok(())
    }

    /// Charges `bytes` more to the bandwidth bucket, unconditionally (see
    /// [`TokenBucket::charge`]).
    pub fn charge_bytes(&mut self, bytes: u64, now: Instant) {
        if let Some(bucket) = &mut self.bandwidth {
            bucket.charge(bytes, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn bucket(size: u64, burst: u64, refill_ms: u64, now: Instant) -> TokenBucket {
        let config = BucketConfig {
            size,
            one_time_burst: burst,
            refill_time: Duration::from_millis(refill_ms),
        };
        TokenBucket::new(config, now).unwrap()
    }

    #[test]
    fn zero_size_or_refill_time_limits_nothing() {
        let now = Instant::now();
        assert!(TokenBucket::new(BucketConfig::per_second(0), now).is_none());
        let no_refill = BucketConfig {
            size: 10,
            ..Default::default()
        };
        assert!(TokenBucket::new(no_refill, now).is_none());
        assert!(RateLimiter::new(RateLimit::default(), now).is_none());
    }

    #[test]
    fn a_full_bucket_serves_its_size_then_says_when() {
        let t0 = Instant::now();
        let mut b = bucket(1000, 0, 1000, t0);
        assert_eq!(b.consume(600, t0), Ok(()));
        assert_eq!(b.consume(400, t0), Ok(()));
        // 100 tokens take 100 ms at 1000 tokens/s.
        assert_eq!(b.consume(100, t0), Err(t0 + 100 * MS));
        assert_eq!(b.consume(100, t0 + 99 * MS), Err(t0 + 100 * MS));
        assert_eq!(b.consume(100, t0 + 100 * MS), Ok(()));
    }

    #[test]
    fn partial_refills_lose_no_fraction() {
        // 3 tokens per 1000 ms: one token every 333.33 ms. Looking every millisecond must not
        // round each look's credit away.
        let t0 = Instant::now();
        let mut b = bucket(3, 0, 1000, t0);
        assert_eq!(b.consume(3, t0), Ok(()));
        let mut granted = 0;
        for ms in 1..=3000 {
            if b.consume(1, t0 + ms * MS).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 9);
    }

    #[test]
    fn the_wait_is_exact_to_the_nanosecond() {
        let t0 = Instant::now();
        let mut b = bucket(3, 0, 1000, t0);
        assert_eq!(b.consume(3, t0), Ok(()));
        let ready = b.consume(1, t0).unwrap_err();
        assert_eq!(ready, t0 + Duration::from_nanos(333_333_334));
        assert!(b.consume(1, ready - Duration::from_nanos(1)).is_err());
        assert_eq!(b.consume(1, ready), Ok(()));
    }

    #[test]
    fn the_refill_stops_at_the_size() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 100, t0);
        assert_eq!(b.consume(100, t0), Ok(()));
        // Ten refill times later the bucket holds 100, not 1000.
        let later = t0 + 1000 * MS;
        assert_eq!(b.consume(100, later), Ok(()));
        assert!(b.consume(1, later).is_err());
    }

    #[test]
    fn the_one_time_burst_goes_first_and_never_comes_back() {
        let t0 = Instant::now();
        let mut b = bucket(100, 500, 1000, t0);
        assert_eq!(b.consume(550, t0), Ok(()));
        assert_eq!(b.consume(50, t0), Ok(()));
        assert!(b.consume(1, t0).is_err());
        // A second later only the bucket is back.
        let later = t0 + 10_000 * MS;
        assert_eq!(b.consume(100, later), Ok(()));
        assert!(b.consume(1, later).is_err());
    }

    #[test]
    fn a_failed_consume_takes_nothing() {
        let t0 = Instant::now();
        let mut b = bucket(100, 20, 1000, t0);
        assert!(b.consume(90, t0).is_ok());
        // 30 available (10 + burst 20): 31 fails and must leave the burst alone.
        assert!(b.consume(31, t0).is_err());
        assert_eq!(b.consume(30, t0), Ok(()));
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_once_it_is_full_and_is_paid_back() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.consume(10, t0), Ok(()));
        // Not full: wait until it is (10 tokens = 100 ms).
        assert_eq!(b.consume(250, t0), Err(t0 + 100 * MS));
        assert_eq!(b.consume(250, t0 + 100 * MS), Ok(()));
        // 150 over: the next token comes after 1.5 s + 10 ms.
        assert_eq!(b.consume(1, t0 + 100 * MS), Err(t0 + 1610 * MS));
        // And the next large one only once it is full again: 2.5 s after it went.
        assert_eq!(b.consume(250, t0 + 1610 * MS), Err(t0 + 2600 * MS));
        assert_eq!(b.consume(250, t0 + 2600 * MS), Ok(()));
    }

    #[test]
    fn a_charge_beyond_what_was_paid_is_a_debt() {
        let t0 = Instant::now();
        let mut b = bucket(100, 0, 1000, t0);
        assert_eq!(b.consume(50, t0), Ok(()));
        b.charge(150, t0);
        // 100 tokens in debt: 1 token needs 1.01 s.
        assert_eq!(b.consume(1, t0), Err(t0 + 1010 * MS));
    }

    #[test]
    fn both_buckets_must_agree_and_a_refusal_takes_from_neither() {
        let t0 = Instant::now();
        let limit = RateLimit {
            bandwidth: Some(BucketConfig::per_second(1000)),
            ops: Some(BucketConfig::per_second(2)),
        };
        let mut l = RateLimiter::new(limit, t0).unwrap();
        assert_eq!(l.consume(100, t0), Ok(()));
        assert_eq!(l.consume(100, t0), Ok(()));
        // Out of operations: the next one in 500 ms; the bytes were not taken.
        assert_eq!(l.consume(100, t0), Err(t0 + 500 * MS));
        assert_eq!(l.consume(800, t0 + 500 * MS), Ok(()));
        // Out of bytes now (500 ms gave 500 bytes back, 800 taken: 0 left) and of operations.
        assert_eq!(l.consume(300, t0 + 500 * MS), Err(t0 + 1000 * MS));
        assert_eq!(l.limit(), limit);
    }

    #[test]
    fn reconfiguring_keeps_unchanged_buckets_and_fills_new_ones() {
        let t0 = Instant::now();
        let ops = Some(BucketConfig::per_second(2));
        let limit = RateLimit {
            bandwidth: Some(BucketConfig::per_second(1000)),
            ops,
        };
        let mut l = RateLimiter::new(limit, t0).unwrap();
        assert_eq!(l.consume(1000, t0), Ok(()));
        // A new bandwidth bucket starts full; the ops bucket keeps its one spent token.
        let wider = RateLimit {
            bandwidth: Some(BucketConfig::per_second(5000)),
            ops,
        };
        let mut l = l.reconfigure(wider, t0).unwrap();
        assert_eq!(l.consume(5000, t0), Ok(()));
        assert_eq!(l.consume(0, t0), Err(t0 + 500 * MS));
        assert_eq!(l.limit(), wider);
        assert!(l.reconfigure(RateLimit::default(), t0).is_none());
    }

    #[test]
    fn a_steady_stream_gets_the_configured_rate() {
        // 1 MiB/s, 64 KiB requests served as soon as allowed, for 10 simulated seconds.
        let t0 = Instant::now();
        let limit = RateLimit {
            bandwidth: Some(BucketConfig::per_second(1 << 20)),
            ops: None,
        };
        let mut l = RateLimiter::new(limit, t0).unwrap();
        let (mut now, mut bytes) = (t0, 0u64);
        while now <= t0 + Duration::from_secs(10) {
            match l.consume(64 << 10, now) {
                Ok(()) => bytes += 64 << 10,
                Err(ready) => now = ready,
            }
        }
        // One full bucket up front plus ten seconds of refill, to the request.
        assert_eq!(bytes, 11 << 20);
    }
}
