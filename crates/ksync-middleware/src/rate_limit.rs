//! Rate limiting with a token bucket.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ksync_core::{Clock, Event, Middleware, MiddlewareError, SystemClock};

use crate::error::Error;

/// A token bucket: holds at most `burst` tokens, earns one every `refill_every`, and starts full.
///
/// Pure: time comes in as an argument (milliseconds, as [`Clock`] gives them), so it can be
/// driven by a test or a simulation. A clock that goes backwards earns nothing, and the bucket
/// counts on from the earlier time (the system clock is wall time, which NTP may step back).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    burst: u64,
    refill_every: Duration,
    tokens: u64,
    /// The last time tokens were counted, and the part of a token earned since.
    last_ms: Option<u64>,
    carry_ns: u128,
}

impl TokenBucket {
    /// A full bucket. `burst` must be at least 1 and `refill_every` non-zero.
    pub fn new(burst: u64, refill_every: Duration) -> Result<Self, Error> {
        if burst == 0 || refill_every.is_zero() {
            return Err(Error::InvalidRate {
                burst,
                refill_every,
            });
        }
        Ok(Self {
            burst,
            refill_every,
            tokens: burst,
            last_ms: None,
            carry_ns: 0,
        })
    }

    /// Takes one token at time `now_ms`; `false` when the bucket is empty.
    pub fn try_take(&mut self, now_ms: u64) -> bool {
        self.refill(now_ms);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Tokens available at time `now_ms`.
    pub fn available(&mut self, now_ms: u64) -> u64 {
        self.refill(now_ms);
        self.tokens
    }

    fn refill(&mut self, now_ms: u64) {
        let Some(last) = self.last_ms else {
            self.last_ms = Some(now_ms);
            return;
        };
        if now_ms < last {
            // Counting from the later time would earn nothing until the clock caught up again.
            self.last_ms = Some(now_ms);
            self.carry_ns = 0;
            return;
        }
        if now_ms == last {
            return;
        }
        let elapsed_ns = u128::from(now_ms - last) * 1_000_000 + self.carry_ns;
        let period_ns = self.refill_every.as_nanos();
        let earned = elapsed_ns / period_ns;
        self.carry_ns = elapsed_ns % period_ns;
        self.tokens = u64::try_from(u128::from(self.tokens) + earned)
            .unwrap_or(u64::MAX)
            .min(self.burst);
        if self.tokens == self.burst {
            // A full bucket earns nothing, including part tokens.
            self.carry_ns = 0;
        }
        self.last_ms = Some(now_ms);
    }
}

/// What [`RateLimit`] does with an event when the bucket is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Drop the event: the middleware returns `Ok(None)`, like a filter, and counts it
    /// ([`RateLimit::dropped`]). On the outgoing side the event stays in local storage and is
    /// not sent later either (the client's send position moves past it); on the incoming side
    /// it is not stored (nor received again: the client's cursor moves past it).
    Drop,
    /// Fail: the middleware returns [`Error::RateLimited`] as a
    /// [`MiddlewareError::Failed`], which the client reports as an `error` notification; the
    /// event is then held back as with [`Overflow::Drop`].
    Error,
}

/// Middleware that lets at most `burst` events through at once and one more per
/// `refill_every` after that.
///
/// Clones share the bucket (register one clone, read [`RateLimit::dropped`] on another).
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use ksync_core::{Event, ManualClock, Middleware};
/// use ksync_middleware::{Overflow, RateLimit};
/// let clock = ManualClock::new(0);
/// let limit = RateLimit::new(2, Duration::from_millis(500), Overflow::Drop)?
///     .with_clock(Arc::new(clock.clone()));
/// let ev = || Event::new("1", "t", serde_json::json!({}), 1);
/// assert!(limit.process(ev())?.is_some());
/// assert!(limit.process(ev())?.is_some());
/// assert!(limit.process(ev())?.is_none()); // over the burst: dropped
/// clock.advance(500);
/// assert!(limit.process(ev())?.is_some()); // one token earned
/// assert_eq!(limit.dropped(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct RateLimit {
    bucket: Arc<Mutex<TokenBucket>>,
    clock: Arc<dyn Clock>,
    overflow: Overflow,
    dropped: Arc<AtomicU64>,
    burst: u64,
    refill_every: Duration,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("burst", &self.burst)
            .field("refill_every", &self.refill_every)
            .field("overflow", &self.overflow)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

impl RateLimit {
    /// A limiter on the system clock. `burst` must be at least 1 and `refill_every` non-zero.
    pub fn new(burst: u64, refill_every: Duration, overflow: Overflow) -> Result<Self, Error> {
        Ok(Self {
            bucket: Arc::new(Mutex::new(TokenBucket::new(burst, refill_every)?)),
            clock: Arc::new(SystemClock),
            overflow,
            dropped: Arc::new(AtomicU64::new(0)),
            burst,
            refill_every,
        })
    }

    /// At most `events` per second, with a burst of `events`.
    pub fn per_second(events: u32, overflow: Overflow) -> Result<Self, Error> {
        let refill = if events == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / events
        };
        Self::new(u64::from(events), refill, overflow)
    }

    /// Uses `clock` instead of the system clock (tests, simulations).
    #[must_use]
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Events dropped (policy [`Overflow::Drop`]) or refused (policy [`Overflow::Error`]) so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Middleware for RateLimit {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        let now = self.clock.now_millis();
        let allowed = self
            .bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_take(now);
        if allowed {
            return Ok(Some(event));
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = %event.id, r#type = %event.event_type, policy = ?self.overflow, "rate limited");
        match self.overflow {
            Overflow::Drop => Ok(None),
            Overflow::Error => Err(Error::RateLimited {
                burst: self.burst,
                refill_every: self.refill_every,
            }
            .into_middleware_error(self.name())),
        }
    }

    fn name(&self) -> &str {
        "rate-limit"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_core::ManualClock;
    use serde_json::json;

    #[test]
    fn bucket_refills_with_time_and_caps_at_burst() {
        let mut b = TokenBucket::new(3, Duration::from_millis(100)).expect("valid");
        let taken = (0..5).filter(|_| b.try_take(1_000)).count();
        assert_eq!(taken, 3);
        assert_eq!(b.available(1_050), 0, "half a token is not a token");
        assert_eq!(b.available(1_100), 1, "the half carries over");
        assert_eq!(b.available(10_000), 3, "capped at burst");
        // Going backwards earns nothing and takes nothing.
        assert!(b.try_take(500));
        assert_eq!(b.available(500), 2);
    }

    #[test]
    fn a_clock_stepped_back_keeps_refilling() {
        // The system clock is wall time: NTP may step it back an hour.
        let mut b = TokenBucket::new(1, Duration::from_secs(1)).expect("valid");
        let hour = 3_600_000;
        assert!(b.try_take(10 * hour));
        assert!(!b.try_take(9 * hour), "a step back earns nothing");
        assert!(
            b.try_take(9 * hour + 1_000),
            "one second after the step, a token"
        );

        let clock = ManualClock::new(10 * hour);
        let limit = RateLimit::new(1, Duration::from_secs(1), Overflow::Drop)
            .expect("valid")
            .with_clock(Arc::new(clock.clone()));
        let ev = || Event::new("1", "t", json!(1), 1);
        assert!(limit.process(ev()).expect("ok").is_some());
        clock.set(9 * hour);
        assert!(limit.process(ev()).expect("ok").is_none());
        clock.advance(1_000);
        assert!(limit.process(ev()).expect("ok").is_some());
    }

    #[test]
    fn sub_millisecond_refill() {
        let mut b = TokenBucket::new(10_000, Duration::from_micros(100)).expect("valid");
        for _ in 0..10_000 {
            assert!(b.try_take(0));
        }
        assert!(!b.try_take(0));
        assert_eq!(b.available(1), 10, "ten tokens per millisecond");
    }

    #[test]
    fn invalid_rates_are_typed_errors() {
        assert!(matches!(
            TokenBucket::new(0, Duration::from_secs(1)),
            Err(Error::InvalidRate { burst: 0, .. })
        ));
        assert!(matches!(
            RateLimit::new(1, Duration::ZERO, Overflow::Drop),
            Err(Error::InvalidRate { .. })
        ));
        assert!(RateLimit::per_second(0, Overflow::Drop).is_err());
    }

    #[test]
    fn policies_drop_or_fail_and_clones_share_the_bucket() {
        let clock = ManualClock::new(0);
        let ev = || Event::new("1", "t", json!(1), 1);
        let drop = RateLimit::per_second(2, Overflow::Drop)
            .expect("valid")
            .with_clock(Arc::new(clock.clone()));
        let shared = drop.clone();
        assert!(drop.process(ev()).expect("ok").is_some());
        assert!(shared.process(ev()).expect("ok").is_some());
        assert!(drop.process(ev()).expect("ok").is_none());
        assert_eq!(shared.dropped(), 1);
        clock.advance(500);
        assert!(drop.process(ev()).expect("ok").is_some());

        let fail = RateLimit::new(1, Duration::from_secs(60), Overflow::Error)
            .expect("valid")
            .with_clock(Arc::new(clock.clone()));
        assert!(fail.process(ev()).expect("ok").is_some());
        let err = fail.process(ev()).expect_err("over the limit");
        assert!(
            matches!(&err, MiddlewareError::Failed { name, reason } if name == "rate-limit" && reason.contains("rate limit exceeded")),
            "{err:?}"
        );
        assert_eq!(fail.dropped(), 1);
    }
}
