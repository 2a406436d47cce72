//! Waiting for a process to log a line. The logs are files read whole on each look (see
//! [`crate::CoreServer::log`], [`crate::agent::Agent::log`]), so a wait polls.

use std::time::{Duration, Instant};

/// How long a wait sleeps between two reads of the log.
const POLL: Duration = Duration::from_millis(10);

/// Waits until `log()` contains `text`, at most `within`, and returns that log. Panics naming
/// `text`, the time waited and the whole log otherwise. It blocks the thread: an async test
/// uses [`wait_logged_async`], lest it stall what else runs on that thread (its backends).
#[track_caller]
pub fn wait_logged(log: impl Fn() -> String, text: &str, within: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some(log) = logged(log(), text, started, within) {
            return log;
        }
        std::thread::sleep(POLL);
    }
}

/// [`wait_logged`] for async tests: it sleeps on the runtime, not the thread.
pub async fn wait_logged_async(log: impl Fn() -> String, text: &str, within: Duration) -> String {
    let started = Instant::now();
    loop {
        if let Some(log) = logged(log(), text, started, within) {
            return log;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `log` if it contains `text`; otherwise `None`, or a panic once `within` has passed since
/// `started`.
#[track_caller]
fn logged(log: String, text: &str, started: Instant, within: Duration) -> Option<String> {
    if log.contains(text) {
        return Some(log);
    }
    let waited = started.elapsed();
    assert!(
        waited < within,
        "{text:?} not logged within {within:?} (waited {waited:?}):\n{log}"
    );
    None
}
