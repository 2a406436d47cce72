//! Telling systemd (a `Type=notify` unit, see contrib/systemd) what the instance is doing.
//! Without `NOTIFY_SOCKET` in the environment these do nothing.
//!
//! Readiness carries our pid as `MAINPID`: after `systemctl reload` reruns core-server, the new
//! supervisor becomes the service's main process, and the old one may exit without systemd
//! taking the service for dead (the unit sets `NotifyAccess=all` to accept this).

use sd_notify::NotifyState;

/// This process serves, and is the service's main process.
pub fn serving() {
    let pid = std::process::id();
    if let Err(e) = sd_notify::notify(&[NotifyState::MainPid(pid), NotifyState::Ready]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// This instance is stopping for good (not when handing over to a rerun).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
