//! Stopping without failing a request: on SIGTERM or SIGINT (or the library's shutdown future)
//! the agent stops dialing, every connection says `draining` on its control stream, waits up to
//! 1 s for the worker to take it out of its balancer, sends GOAWAY and finishes its requests in
//! flight; whatever is still running after the grace period is cut.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// What every task of an agent watches, and tracks them all.
#[derive(Clone, Default)]
pub(crate) struct Shutdown {
    pub tasks: TaskTracker,
    /// Stop dialing, drain the connections.
    pub stop: CancellationToken,
    /// The grace period is over: drop what is left.
    pub force: CancellationToken,
}

/// The drain's first step, the worker's release, may take this long before the grace period.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

impl Shutdown {
    /// Drains every connection and waits for them, at most `grace` (after the worker's release).
    pub async fn drain(&self, grace: Duration) {
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(RELEASE_WAIT + grace, self.tasks.wait())
            .await
            .is_err()
        {
            warn!("requests still in flight after the grace period of {grace:?}: cutting them");
            self.force.cancel();
            self.tasks.wait().await;
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT.
pub async fn sigterm_or_sigint() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        warn!("cannot watch SIGTERM and SIGINT: stopping only when killed");
        return std::future::pending().await;
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    info!("{name}: draining the tunnel connections, then stopping");
}
