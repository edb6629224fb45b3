//! The reconnect delay the transports share: exponential backoff with jitter, computed from
//! an attempt count and a random fraction the caller draws (core has no randomness of its own).

use std::time::Duration;

/// The delay before reconnect attempt `attempt` (1 for the first): `min` doubled for each
/// attempt after the first, capped at `max`, then less a random part of up to half of it
/// (`jitter`, drawn by the caller from `[0, 1)`; values outside are clamped), so peers or
/// clients that lost the same remote at once do not all come back in lockstep. Never
/// overflows, whatever the bounds.
pub fn backoff_delay(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let capped = exp.min(max);
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    // Taking off up to half cannot overflow, whatever `max` is.
    capped.saturating_sub(capped.mul_f64(jitter * 0.5))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_min_up_to_max_less_up_to_half_for_jitter() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(60));
        let full: Vec<u64> = (1..=9)
            .map(|a| backoff_delay(min, max, a, 0.0).as_secs())
            .collect();
        assert_eq!(full, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(min, max, 0, 0.0), min);
        assert_eq!(backoff_delay(min, max, 3, 1.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(min, max, 3, 0.5), Duration::from_secs(3));
        // Out of range or not a number: clamped, never past the bounds.
        assert_eq!(backoff_delay(min, max, 3, 7.0), Duration::from_secs(2));
        assert_eq!(backoff_delay(min, max, 3, -1.0), Duration::from_secs(4));
        assert_eq!(backoff_delay(min, max, 3, f64::NAN), Duration::from_secs(4));
        assert_eq!(
            backoff_delay(Duration::MAX, Duration::MAX, u32::MAX, 0.0),
            Duration::MAX
        );
    }
}
