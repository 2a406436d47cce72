//! Telling systemd (a `Type=notify` unit, see contrib/systemd) what the instance is doing.
//! Without `NOTIFY_SOCKET` in the environment these do nothing.
//!
//! Readiness carries our pid as `MAINPID`. After `systemctl reload` reruns core-server, the old
//! supervisor, still the service's main process, names the new one as `MAINPID` the moment it
//! hands over, so it may exit without systemd taking the service for dead. Only the main
//! process speaks for the service: the unit sets `NotifyAccess=main`, and no other process of
//! the service (a compromised worker among them) can tell systemd anything.

use sd_notify::NotifyState;

/// This process serves, and is the service's main process.
pub fn serving() {
    let pid = std::process::id();
    if let Err(e) = sd_notify::notify(&[NotifyState::MainPid(pid), NotifyState::Ready]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The instance at `pid` owns the service now (we handed over to it).
pub fn handed_over_to(pid: u32) {
    if let Err(e) = sd_notify::notify(&[NotifyState::MainPid(pid)]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// This instance is stopping for good (not when handing over to a rerun).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}
