//! The rate limit on failed tunnel handshakes, per source: a token bucket of
//! [`ALLOWED_FAILURES`], refilled at one per [`REFILL`]. An agent with a wrong token in its
//! configuration, told to wait (`Retry-After`), then tries once per 6 seconds, and the log
//! stays short. Guessing is no threat to guard against (a token is 256 random bits), so a
//! right token is never rate-limited (see `tunnel_endpoint`).
//!
//! A source is an IP address, IPv6 ones by their /64 (one host usually has a whole one), and
//! the tunnel domain it asked for: an agent left running with a revoked or mistyped token for
//! one domain must not lock out a well configured agent for another domain on the same
//! machine. Requests whose `Host` is no tunnel share one bucket per address, so that rotating
//! `Host` buys no extra guesses (a guess is only ever good for the domain it names).
//!
//! At most [`MAX_SOURCES`] are remembered: beyond that, full buckets are forgotten first (they
//! hold nothing), then the fullest. Buckets are kept ordered by when they are full again, so
//! finding the one to forget is cheap, under the lock every failure takes.
//!
//! A bucket is kept as its debt: each failure adds [`REFILL`], time pays it back, and the
//! bucket is empty while the debt is more than `ALLOWED_FAILURES - 1` refills.
//!
//! A refused source is logged once per lockout ([`FailedAttempts::first_refusal`]): a client
//! repeating its request as fast as it can (3,000 in 0.4 s, an outside tester) would otherwise
//! write a line each time, and push the log's history out of its rotated files.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use core_server_proto::domain::Domain;
use tokio::time::Instant;

/// Failures a source may have in a row before it must wait.
pub const ALLOWED_FAILURES: u32 = 10;
/// How often a source gets one more try back.
pub const REFILL: Duration = Duration::from_secs(6);
/// The most sources remembered.
pub const MAX_SOURCES: usize = 4096;

/// Who failed, as the rate limit counts (see the module's comment).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    address: IpAddr,
    tunnel: Option<Domain>,
}

impl Source {
    /// A request from `address` for `tunnel`: the tunnel domain its `Host` names, or `None`
    /// if it names none.
    pub fn new(address: IpAddr, tunnel: Option<Domain>) -> Self {
        Source {
            address: key(address),
            tunnel,
        }
    }
}

/// Past failures by source.
#[derive(Default)]
pub struct FailedAttempts(Mutex<Buckets>);

#[derive(Default)]
struct Buckets {
    /// When each source's bucket is full again.
    full_at: HashMap<Source, Instant>,
    /// The same, ordered by that time: the first is the first to forget.
    by_time: BTreeSet<(Instant, Source)>,
    /// Sources refused since their last failure (a subset of `full_at`'s).
    refused: HashSet<Source>,
}

impl Buckets {
    fn forget(&mut self, source: &Source) {
        self.full_at.remove(source);
        self.refused.remove(source);
    }
}

impl FailedAttempts {
    fn buckets(&self) -> MutexGuard<'_, Buckets> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok` if `source` may try now, else how long until it may.
    pub fn check(&self, source: &Source) -> Result<(), Duration> {
        let buckets = self.buckets();
        let Some(full_at) = buckets.full_at.get(source) else {
            return Ok(());
        };
        let debt = full_at.saturating_duration_since(Instant::now());
        match debt.checked_sub(REFILL * (ALLOWED_FAILURES - 1)) {
            Some(wait) if !wait.is_zero() => Err(wait),
            _ => Ok(()),
        }
    }

    /// Whether `source`, refused by [`FailedAttempts::check`], is refused for the first time
    /// since its last failure (then it is worth a line in the log).
    pub fn first_refusal(&self, source: &Source) -> bool {
        let mut buckets = self.buckets();
        buckets.full_at.contains_key(source) && buckets.refused.insert(source.clone())
    }

    /// `source` failed once more.
    pub fn charge(&self, source: Source) {
        let mut buckets = self.buckets();
        let now = Instant::now();
        // Full buckets hold nothing: forget them (each is forgotten once, so this is cheap).
        while let Some((at, first)) = buckets.by_time.first().cloned() {
            if at > now {
                break;
            }
            buckets.by_time.pop_first();
            buckets.forget(&first);
        }
        buckets.refused.remove(&source);
        let at = match buckets.full_at.get(&source) {
            Some(&at) => {
                buckets.by_time.remove(&(at, source.clone()));
                at.max(now) + REFILL
            }
            None => {
                if buckets.full_at.len() >= MAX_SOURCES {
                    // The fullest bucket: the one full again soonest.
                    let (_, fullest) =
                        (buckets.by_time.pop_first()).expect("the map is full, so not empty");
                    buckets.forget(&fullest);
                }
                now + REFILL
            }
        };
        buckets.by_time.insert((at, source.clone()));
        buckets.full_at.insert(source, at);
    }
}

/// What an address is known by: itself, or its /64 for IPv6.
fn key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Source {
        Source::new(s.parse().unwrap(), None)
    }

    fn for_tunnel(address: &str, domain: &str) -> Source {
        Source::new(
            address.parse().unwrap(),
            Some(Domain::parse(domain).unwrap()),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn ten_failures_then_one_per_six_seconds() {
        let failures = FailedAttempts::default();
        let source = ip("192.0.2.7");
        for _ in 0..ALLOWED_FAILURES {
            assert_eq!(failures.check(&source), Ok(()));
            failures.charge(source.clone());
        }
        assert_eq!(failures.check(&source), Err(REFILL));
        assert_eq!(failures.check(&ip("192.0.2.8")), Ok(()));
        tokio::time::advance(REFILL - Duration::from_millis(1)).await;
        assert!(failures.check(&source).is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(failures.check(&source), Ok(()));
        failures.charge(source.clone());
        assert_eq!(failures.check(&source), Err(REFILL));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_is_worth_one_line_until_the_next_failure() {
        let failures = FailedAttempts::default();
        let source = ip("192.0.2.7");
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(source.clone());
        }
        assert!(failures.first_refusal(&source));
        assert!(!failures.first_refusal(&source));
        tokio::time::advance(REFILL).await;
        failures.charge(source.clone());
        assert!(failures.first_refusal(&source));
        assert!(!failures.first_refusal(&source));
        // Forgotten once full again: nothing left of it.
        tokio::time::advance(REFILL * ALLOWED_FAILURES).await;
        failures.charge(ip("192.0.2.8"));
        assert!(failures.buckets().refused.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_sources_count_by_their_64_and_mapped_ipv4_as_ipv4() {
        let failures = FailedAttempts::default();
        for i in 0..ALLOWED_FAILURES {
            failures.charge(ip(&format!("2001:db8:1:2::{i:x}")));
        }
        assert!(failures.check(&ip("2001:db8:1:2:ffff::1")).is_err());
        assert_eq!(failures.check(&ip("2001:db8:1:3::1")), Ok(()));
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(ip("::ffff:198.51.100.1"));
        }
        assert!(failures.check(&ip("198.51.100.1")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_for_one_tunnel_domain_leave_the_others_of_the_address_alone() {
        let failures = FailedAttempts::default();
        let revoked = for_tunnel("192.0.2.7", "old.example");
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(revoked.clone());
        }
        assert!(failures.check(&revoked).is_err());
        assert_eq!(
            failures.check(&for_tunnel("192.0.2.7", "app.example")),
            Ok(())
        );
        assert_eq!(failures.check(&ip("192.0.2.7")), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_map_stays_bounded_forgetting_the_fullest_buckets_first() {
        let failures = FailedAttempts::default();
        // A bucket that is full again by the time the map fills: forgotten first.
        let paid_back = ip("192.0.2.2");
        failures.charge(paid_back.clone());
        tokio::time::advance(REFILL).await;
        let blocked = ip("192.0.2.1");
        for _ in 0..ALLOWED_FAILURES {
            failures.charge(blocked.clone());
        }
        for i in 0..MAX_SOURCES as u32 + 10 {
            failures.charge(Source::new(IpAddr::V4((0x0a00_0000 + i).into()), None));
        }
        let buckets = failures.buckets();
        assert_eq!(buckets.full_at.len(), MAX_SOURCES);
        assert_eq!(buckets.by_time.len(), MAX_SOURCES);
        assert!(!buckets.full_at.contains_key(&paid_back));
        drop(buckets);
        assert!(
            failures.check(&blocked).is_err(),
            "the emptiest bucket is kept"
        );
    }
}
