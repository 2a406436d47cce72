//! How long a connection slot waits before dialing again: full-jitter exponential backoff
//! (uniform between 0 and `min(10 s, 100 ms * 2^n)`), so that agents cut off together (a proxy
//! rerun, a network outage) do not all come back in the same instant, while the first retry
//! still comes within 100 ms.

use std::time::Duration;

use rand::Rng;

const BASE: Duration = Duration::from_millis(100);
const CAP: Duration = Duration::from_secs(10);
/// A connection that lived this long was a success: the next failure starts the backoff over.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Failures in a row of one connection slot, and the waits they earn.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The wait before the next dial, counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = ceiling(self.failures);
        self.failures = self.failures.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// A connection worked (it lived long enough, or it was replaced on the proxy's request).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `min(CAP, BASE * 2^failures)`.
fn ceiling(failures: u32) -> Duration {
    BASE.saturating_mul(1 << failures.min(16)).min(CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_from_100_ms_up_to_10_s() {
        assert_eq!(ceiling(0), Duration::from_millis(100));
        assert_eq!(ceiling(1), Duration::from_millis(200));
        assert_eq!(ceiling(6), Duration::from_millis(6400));
        assert_eq!(ceiling(7), CAP);
        assert_eq!(ceiling(u32::MAX), CAP);
    }

    #[test]
    fn every_delay_is_within_its_ceiling_and_they_spread() {
        for _ in 0..200 {
            let mut backoff = Backoff::default();
            for n in 0..40 {
                assert!(backoff.next_delay() <= ceiling(n));
            }
            backoff.reset();
            assert!(backoff.next_delay() <= Duration::from_millis(100));
        }
        let mut backoff = Backoff::default();
        for _ in 0..10 {
            backoff.next_delay();
        }
        let delays: std::collections::BTreeSet<_> = (0..20).map(|_| backoff.next_delay()).collect();
        assert!(
            delays.len() > 10,
            "full jitter spreads the waits: {delays:?}"
        );
    }
}
