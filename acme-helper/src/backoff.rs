//! When a name whose last attempts failed may be tried again.
//!
//! Let's Encrypt allows 5 failed validations per name per hour; we never make more than
//! [`MAX_FAILURES_PER_HOUR`]: after the first failure the next try waits a minute, after the
//! second ten, and after the third until the hour since the oldest of the last three is over.
//! A `Retry-After` from the CA pushes the next try later still. The record lives in the
//! store (`names/<name>.json`), so a restart does not reset it; a success clears it.

use serde::{Deserialize, Serialize};

pub const MAX_FAILURES_PER_HOUR: usize = 3;
const HOUR: u64 = 3600;
/// The wait after the first and the second failure within an hour.
const FIRST_WAITS: [u64; MAX_FAILURES_PER_HOUR - 1] = [60, 600];

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// When the failures of the last hour happened (seconds since the epoch), oldest first.
    #[serde(default)]
    pub failures: Vec<u64>,
    /// Why the last attempt failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// The earliest next try.
    #[serde(default)]
    pub next_try: Option<u64>,
}

impl Backoff {
    /// Records a failure at `now`; `retry_after` is the CA's, as a time.
    pub fn fail(&mut self, now: u64, error: String, retry_after: Option<u64>) {
        self.failures.retain(|&t| t + HOUR > now);
        self.failures.push(now);
        let n = self.failures.len();
        let ours = match FIRST_WAITS.get(n - 1) {
            Some(wait) => now + wait,
            // The hour must be over for the oldest of the last three before another try.
            None => self.failures[n - MAX_FAILURES_PER_HOUR] + HOUR,
        };
        self.next_try = Some(ours.max(retry_after.unwrap_or(0)));
        self.last_error = Some(error);
    }

    /// A record that was lost (found corrupt) at `now`: as if the hour's failures had all
    /// just been made, so the CA is not asked again for an hour.
    pub fn assume_worst(now: u64, error: String) -> Backoff {
        Backoff {
            failures: vec![now; MAX_FAILURES_PER_HOUR],
            last_error: Some(error),
            next_try: Some(now + HOUR),
        }
    }

    /// Whether one more validation may be made at `now` without a fourth failure in an hour:
    /// for the HTTP-01 order that follows a failed TLS-ALPN-01 one within the same attempt.
    pub fn allows_another_validation(&self, now: u64) -> bool {
        self.failures.iter().filter(|&&t| t + HOUR > now).count() < MAX_FAILURES_PER_HOUR
    }

    /// `next_try`, while it is still ahead of `now`: no attempt may start before.
    pub fn waiting_until(&self, now: u64) -> Option<u64> {
        self.next_try.filter(|&t| t > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_more_than_three_failures_in_any_hour() {
        let mut backoff = Backoff::default();
        let mut now = 1_000_000;
        let mut tries = Vec::new();
        // Fail at every moment allowed, for a day.
        while now < 1_000_000 + 24 * HOUR {
            if backoff.waiting_until(now).is_none() {
                tries.push(now);
                backoff.fail(now, "invalid".into(), None);
            }
            now += 1;
        }
        for (i, &t) in tries.iter().enumerate() {
            let in_hour = tries[i..].iter().filter(|&&u| u < t + HOUR).count();
            assert!(in_hour <= MAX_FAILURES_PER_HOUR, "{in_hour} tries from {t}");
        }
        assert!(
            tries.len() >= 3 * 23,
            "still tries each hour: {}",
            tries.len()
        );
        assert_eq!(&tries[..3], [1_000_000, 1_000_060, 1_000_660]);
        assert_eq!(tries[3], 1_000_000 + HOUR);
    }

    #[test]
    fn the_waits_grow_then_the_hour_decides() {
        let mut backoff = Backoff::default();
        backoff.fail(100, "a".into(), None);
        assert_eq!(backoff.next_try, Some(160));
        assert_eq!(backoff.waiting_until(159), Some(160));
        assert_eq!(backoff.waiting_until(160), None);
        backoff.fail(200, "b".into(), None);
        assert_eq!(backoff.next_try, Some(800));
        backoff.fail(900, "c".into(), None);
        assert_eq!(backoff.next_try, Some(100 + HOUR));
        assert_eq!(backoff.last_error.as_deref(), Some("c"));
        assert!(!backoff.allows_another_validation(900));
        assert!(backoff.allows_another_validation(100 + HOUR));
        // Failures older than an hour are forgotten.
        backoff.fail(10 * HOUR, "d".into(), None);
        assert_eq!(backoff.failures, [10 * HOUR]);
        assert_eq!(backoff.next_try, Some(10 * HOUR + 60));
    }

    #[test]
    fn a_lost_record_waits_an_hour() {
        let backoff = Backoff::assume_worst(100, "corrupt".into());
        assert_eq!(backoff.waiting_until(100 + HOUR - 1), Some(100 + HOUR));
        assert!(!backoff.allows_another_validation(100 + HOUR - 1));
        assert_eq!(backoff.waiting_until(100 + HOUR), None);
        assert!(backoff.allows_another_validation(100 + HOUR));
    }

    #[test]
    fn retry_after_is_honoured_when_later() {
        let mut backoff = Backoff::default();
        backoff.fail(100, "rate limited".into(), Some(5000));
        assert_eq!(backoff.next_try, Some(5000));
        assert_eq!(backoff.waiting_until(4999), Some(5000));
        assert_eq!(backoff.waiting_until(5000), None);
        let mut backoff = Backoff::default();
        backoff.fail(100, "soon".into(), Some(110));
        assert_eq!(backoff.next_try, Some(160));
    }

    #[test]
    fn survives_a_round_trip_through_json() {
        let mut backoff = Backoff::default();
        backoff.fail(100, "x".into(), None);
        let json = serde_json::to_string(&backoff).unwrap();
        assert_eq!(serde_json::from_str::<Backoff>(&json).unwrap(), backoff);
        assert_eq!(
            serde_json::from_str::<Backoff>("{}").unwrap(),
            Backoff::default()
        );
    }
}
