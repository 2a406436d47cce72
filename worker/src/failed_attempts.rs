//! The rate limit on failed tunnel handshakes, per source: a token bucket of
//! [`ALLOWED_FAILURES`], refilled at one per [`REFILL`], so guessing tokens is hopeless (and a
//! wrong token in an agent's configuration costs the worker one hash per 6 seconds).
//!
//! Sources are keyed by IP address, IPv6 ones by their /64 (one host usually has a whole
//! one). At most [`MAX_SOURCES`] are remembered: beyond that, full buckets are forgotten first
//! (they hold nothing), then the fullest.
//!
//! A bucket is kept as its debt: each failure adds [`REFILL`], time pays it back, and the
//! bucket is empty while the debt is more than `ALLOWED_FAILURES - 1` refills.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failures a source may have in a row before it must wait.
pub const ALLOWED_FAILURES: u32 = 10;
/// How often a source gets one more try back.
pub const REFILL: Duration = Duration::from_secs(6);
/// The most sources remembered.
pub const MAX_SOURCES: usize = 4096;

/// Past failures by source.
#[derive(Default)]
pub struct FailedAttempts {
    /// When each source's bucket is full again.
    full_at: Mutex<HashMap<IpAddr, Instant>>,
}

impl FailedAttempts {
    /// `Ok` if `source` may try now, else how long until it may.
    pub fn check(&self, source: IpAddr) -> Result<(), Duration> {
        let full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        let Some(full_at) = full_at.get(&key(source)) else {
            return Ok(());
        };
        let debt = full_at.saturating_duration_since(Instant::now());
        match debt.checked_sub(REFILL * (ALLOWED_FAILURES - 1)) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// `source` failed once more.
    pub fn charge(&self, source: IpAddr) {
        let mut full_at = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let key = key(source);
        if !full_at.contains_key(&key) && full_at.len() >= MAX_SOURCES {
            full_at.retain(|_, at| *at > now);
            if full_at.len() >= MAX_SOURCES {
                let fullest = full_at.iter().min_by_key(|(_, at)| **at).map(|(k, _)| *k);
                full_at.remove(&fullest.expect("the map is full, so not empty"));
            }
        }
        let at = full_at.entry(key).or_insert(now);
        *at = (*at).max(now) + REFILL;
    }
}

/// What a source is known by: its address, or its /64 for IPv6.
fn key(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn ten_failures_then_one_per_six_seconds() {
        let failures = FailedAttempts::default();
        let source = ip("192.0.2.7");
        for _ in 0..ALLOWED_FAILURES {
            assert_eq!(failures.check(source), Ok(()));
            failures.charge(source);
        }
        assert_eq!(failures.check(source), Err(REFILL));
        assert_eq!(failures.check(ip("192.0.2.8")), Ok(()));
        tokio::time::advance(REFILL - Duration::from_millis(1)).await;
        assert!(failures.check(source).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(failures.check(source), Ok(()));
        failures.charge(source);
        assert_eq!(failures.check(source), Err(REFILL));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let failures = FailedAttempts::default();
        for i in 0..ALLOWED_FAILURES {
            failures.charge(ip(&format!("2001:db8:1:2::{i:x}")));
        }
        assert!(failures.check(ip("2001:db8:1:2:ffff::1")).is_err());
        assert_eq!(failures.check(ip("2001:db8:1:3::1")), Ok(()));
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(ip("::ffff:198.51.100.1"));
        }
        assert!(failures.check(ip("198.51.100.1")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded_forgetting_the_fullest_buckets_first() {
        let failures = FailedAttempts::default();
        let blocked = ip("192.0.2.1");
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(blocked);
        }
        for i in 0..MAX_SOURCES as u32 + 10 {
            failures.charge(IpAddr::V4((0x0a00_0000 + i).into()));
        }
        assert_eq!(failures.full_at.lock().unwrap().len(), MAX_SOURCES);
        assert!(
            failures.check(blocked).is_err(),
            "the emptiest bucket is kept"
        );
    }
}
