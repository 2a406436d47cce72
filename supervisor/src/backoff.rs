//! How long to wait before restarting a child (the worker, the ACME helper) that exited.

use std::time::Duration;

/// Restart delays: short for a child that ran a while, doubling for one that keeps dying.
pub struct Backoff {
    next: Duration,
}

const FIRST_DELAY: Duration = Duration::from_millis(50);
const MAX_DELAY: Duration = Duration::from_secs(10);
/// A worker that lived this long was healthy: its successor starts after the first delay.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: FIRST_DELAY }
    }
}

impl Backoff {
    pub fn after_exit(&mut self, lived: Duration) -> Duration {
        if lived >= HEALTHY_AFTER {
            self.next = FIRST_DELAY;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(MAX_DELAY);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_resets_after_a_healthy_run() {
        let mut b = Backoff::default();
        let quick: Vec<_> = (0..10)
            .map(|_| b.after_exit(Duration::ZERO).as_millis())
            .collect();
        assert_eq!(
            quick,
            [50, 100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]
        );
        assert_eq!(b.after_exit(HEALTHY_AFTER), FIRST_DELAY);
    }
}
