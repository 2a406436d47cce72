//! What the accept loop does when `accept` fails.
//!
//! An error about the one client that just left (reset or aborted before we took it) changes
//! nothing: accept the next. Anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM) would fail again
//! at once: pause, doubling the pause while it lasts, and log a line at most every
//! [`LOG_EVERY`] with the count of failures in between, so a full descriptor table is neither
//! a busy loop nor a flood of log lines.

use std::io;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error};

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct AcceptErrors {
    pause: Option<Duration>,
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// An accept succeeded: the next failure starts with a short pause again.
    pub fn accepted(&mut self) {
        self.pause = None;
    }

    /// Notes `e`; how long to pause before accepting again (`None`: at once).
    pub fn failed(&mut self, e: &io::Error) -> Option<Duration> {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionRefused
        ) {
            debug!("a client left before its connection was accepted: {e}");
            return None;
        }
        let now = Instant::now();
        if self
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY)
        {
            let more = match self.unlogged {
                0 => String::new(),
                n => format!(" ({n} more failures since the last report)"),
            };
            error!("accept failed: {e}{more}; pausing accepts");
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        let pause = self
            .pause
            .map_or(FIRST_PAUSE, |p| (p * 2).min(LONGEST_PAUSE));
        self.pause = Some(pause);
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_grow_to_a_bound_and_reset_after_a_success() {
        let emfile = io::Error::from_raw_os_error(nix::libc::EMFILE);
        let mut errors = AcceptErrors::default();
        let pauses: Vec<_> = (0..10).map(|_| errors.failed(&emfile).unwrap()).collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(pauses[9], LONGEST_PAUSE);
        assert_eq!(errors.unlogged, 9, "one line logged for ten failures");
        errors.accepted();
        assert_eq!(errors.failed(&emfile), Some(FIRST_PAUSE));
        let reset = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&reset), None);
    }
}
