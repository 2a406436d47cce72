//! Hooks for the integration tests, in debug builds only (a release build reads no such
//! variable), so a test can drive a takeover into its timeouts quickly and exactly:
//!
//! - `CORE_SERVER_TAKER_TIMEOUT_MS`: how long the giving side of a takeover waits for the
//!   taker (see `handover.rs`) instead of the default.
//! - `CORE_SERVER_FREEZE_AT=<step>`: the taking side stops itself (`SIGSTOP`) at that step of
//!   the handover (see `takeover.rs`), for the test to resume it later.

use std::time::Duration;

/// `default`, unless a test set `CORE_SERVER_TAKER_TIMEOUT_MS`.
pub fn taker_timeout(default: Duration) -> Duration {
    if !cfg!(debug_assertions) {
        return default;
    }
    std::env::var("CORE_SERVER_TAKER_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(default, Duration::from_millis)
}

/// Stops this process at `step` if a test asked for it with `CORE_SERVER_FREEZE_AT`.
pub fn freeze_point(step: &str) {
    if cfg!(debug_assertions) && std::env::var("CORE_SERVER_FREEZE_AT").is_ok_and(|at| at == step) {
        tracing::info!("frozen at {step} (test hook)");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    }
}
