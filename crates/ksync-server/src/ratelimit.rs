//! Per-client throttling of failed authentication attempts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::RateLimit;

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

/// Counts failures per client in fixed windows.
///
/// Bounded: at most `max_clients` clients are tracked. When the map is full, expired windows
/// are dropped first, then the client whose window started earliest; so memory stays fixed
/// under a flood of addresses, at the price that such a flood can make the limiter forget an
/// older client. IPv6 clients are grouped by their /64 (one host usually owns a whole /64).
/// A policy with `max_failures` 0 is no limit: nothing is tracked and nobody is refused.
#[derive(Debug)]
pub(crate) struct FailureLimiter {
    policy: RateLimit,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

impl FailureLimiter {
    pub(crate) fn new(policy: RateLimit) -> Self {
        Self {
            policy,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The address a client is counted under: one host ([`ksync_core::ClientId::host_key`],
    /// as every per-address limit counts it).
    fn key(ip: IpAddr) -> IpAddr {
        ksync_core::ClientId::host_key(ip)
    }

    /// Whether the policy sets no limit (`max_failures` 0).
    fn unlimited(&self) -> bool {
        self.policy.max_failures == 0
    }

    /// Whether `ip` has used up its failures in its current window.
    pub(crate) fn is_blocked(&self, ip: IpAddr) -> bool {
        self.is_blocked_at(ip, Instant::now())
    }

    pub(crate) fn is_blocked_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.unlimited() {
            return false;
        }
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.get(&Self::key(ip)).is_some_and(|w| {
            now.duration_since(w.started) < self.policy.window
                && w.failures >= self.policy.max_failures
        })
    }

    /// Records one failure of `ip`.
    pub(crate) fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now());
    }

    pub(crate) fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        if self.unlimited() {
            return;
        }
        let key = Self::key(ip);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if !clients.contains_key(&key) && clients.len() >= self.policy.max_clients.max(1) {
            let window = self.policy.window;
            clients.retain(|_, w| now.duration_since(w.started) < window);
            if clients.len() >= self.policy.max_clients.max(1) {
                let oldest = clients
                    .iter()
                    .min_by_key(|(_, w)| w.started)
                    .map(|(ip, _)| *ip);
                if let Some(oldest) = oldest {
                    clients.remove(&oldest);
                }
            }
        }
        let window = clients.entry(key).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now.duration_since(window.started) >= self.policy.window {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(max_failures: u32, max_clients: usize) -> FailureLimiter {
        FailureLimiter::new(RateLimit {
            max_failures,
            window: Duration::from_secs(60),
            max_clients,
        })
    }

    #[test]
    fn blocks_after_max_failures_until_window_ends() {
        let l = limiter(3, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..2 {
            l.record_failure_at(ip, t0);
            assert!(!l.is_blocked_at(ip, t0));
        }
        l.record_failure_at(ip, t0);
        assert!(l.is_blocked_at(ip, t0));
        assert!(!l.is_blocked_at("10.0.0.2".parse().unwrap(), t0));
        let later = t0 + Duration::from_secs(61);
        assert!(!l.is_blocked_at(ip, later));
        l.record_failure_at(ip, later);
        assert!(!l.is_blocked_at(ip, later), "a new window starts from zero");
    }

    #[test]
    fn zero_max_failures_is_no_limit() {
        let l = limiter(0, 100);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for _ in 0..50 {
            l.record_failure(ip);
            assert!(!l.is_blocked(ip));
        }
        assert_eq!(l.tracked(), 0, "nothing is tracked without a limit");
    }

    #[test]
    fn map_stays_bounded_and_forgets_the_oldest() {
        let l = limiter(1, 4);
        let t0 = Instant::now();
        for i in 0..10u8 {
            l.record_failure_at(
                IpAddr::from([10, 0, 0, i]),
                t0 + Duration::from_millis(u64::from(i)),
            );
            assert!(l.tracked() <= 4);
        }
        let now = t0 + Duration::from_secs(1);
        assert!(l.is_blocked_at(IpAddr::from([10, 0, 0, 9]), now));
        assert!(!l.is_blocked_at(IpAddr::from([10, 0, 0, 0]), now));
    }

    #[test]
    fn ipv6_hosts_share_their_64() {
        let l = limiter(2, 10);
        l.record_failure("2001:db8::1".parse().unwrap());
        l.record_failure("2001:db8::2".parse().unwrap());
        assert!(l.is_blocked("2001:db8::ffff".parse().unwrap()));
        assert!(!l.is_blocked("2001:db8:0:1::1".parse().unwrap()));
        l.record_failure("::ffff:10.1.1.1".parse().unwrap());
        l.record_failure("10.1.1.1".parse().unwrap());
        assert!(l.is_blocked("10.1.1.1".parse().unwrap()));
    }
}
