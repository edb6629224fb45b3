//! Time as an input. Core logic never reads the system clock itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of wall-clock milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to; for tests and simulations.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `millis`.
    pub fn new(millis: u64) -> Self {
        Self(Arc::new(AtomicU64::new(millis)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, millis: u64) {
        self.0.store(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Longest interval or timeout a transport's configuration takes (a day): past it a timer is
/// a misconfiguration, and far past it `Instant + value` overflows and panics the task that
/// arms it. See [`check_config_duration`].
pub const MAX_CONFIG_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// Refuses a configured interval or timeout `value` named `field` unless it is positive and at
/// most [`MAX_CONFIG_DURATION`]; the message names both, for the transport's config error.
pub fn check_config_duration(field: &str, value: std::time::Duration) -> Result<(), String> {
    if value.is_zero() || value > MAX_CONFIG_DURATION {
        return Err(format!(
            "{field} must be positive and at most {} s",
            MAX_CONFIG_DURATION.as_secs()
        ));
    }
    Ok(())
}
