//! The worker as the supervisor sees it: starting one (sockets, settings and routes, until it
//! says `Ready`), telling it things within a deadline, and the heartbeat that finds a worker
//! that is alive but stopped or stuck. Past any deadline the worker is killed; its channel then
//! closes and the main loop (`supervise.rs`) replaces it.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::ipc::{FromWorker, ToWorker, ROUTES_PER_MESSAGE, TUNNELS_PER_MESSAGE};

use tokio::time::Instant;
use tracing::{info, warn};

use crate::child::{self, describe, Child};
use crate::supervise::Supervisor;

/// How long a new worker may take from exec to `Ready`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose start-up failed gets to exit on its own, so its status is reported.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);
/// How long a worker may take to take in a message, or to confirm a pause.
pub const WORKER_TIMEOUT: Duration = child::TELL_TIMEOUT;
/// How often a worker is asked to prove it runs, and how long it has to answer: a stopped
/// worker is replaced within about 4 s, before `core-server add` (5 s) gives up on its reply.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// A running worker, as its supervisor sees it.
pub struct Worker {
    child: Child,
    pub channel: Channel<ToWorker, FromWorker>,
    started: Instant,
    /// The last change reported and not yet acknowledged.
    pub unsaved: Option<u64>,
    /// When to send the next `Ping`, or, while one is unanswered, when it is overdue.
    heartbeat_due: Instant,
    ping_unanswered: bool,
}

impl Worker {
    /// Sends `message`. A worker that does not take it within [`WORKER_TIMEOUT`] is killed
    /// (and one that is gone, killed again): `false`, and its channel closes, so the main
    /// loop replaces it.
    pub async fn tell(&mut self, message: &ToWorker) -> bool {
        self.tell_with(message, &[]).await
    }

    /// [`Self::tell`], with descriptors attached.
    pub async fn tell_with(&mut self, message: &ToWorker, fds: &[BorrowedFd<'_>]) -> bool {
        self.child.tell(&self.channel, message, fds).await
    }

    pub fn kill(&mut self) {
        self.child.start_kill();
    }

    /// When [`Self::heartbeat`] is due.
    pub fn heartbeat_due(&self) -> Instant {
        self.heartbeat_due
    }

    /// Sends the next `Ping`, or kills a worker that left the last one unanswered (its
    /// channel then closes, and the main loop replaces it).
    pub async fn heartbeat(&mut self) {
        self.heartbeat_due = Instant::now() + HEARTBEAT_TIMEOUT;
        if self.ping_unanswered {
            warn!(
                "the worker (pid {}) did not answer within {HEARTBEAT_TIMEOUT:?} (stopped or stuck); replacing it",
                self.pid().unwrap_or(0)
            );
            self.kill();
        } else {
            self.ping_unanswered = self.tell(&ToWorker::Ping).await;
        }
    }

    /// The worker answered `Pong`.
    pub fn answered(&mut self) {
        self.ping_unanswered = false;
        self.heartbeat_due = Instant::now() + HEARTBEAT_INTERVAL;
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// How long it ran.
    pub fn lived(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits for it to exit; its exit status, described.
    pub async fn wait(&mut self) -> String {
        describe(self.child.wait().await)
    }
}

impl Supervisor {
    /// Starts a worker and hands it the sockets, settings and routes; returns once it is ready.
    /// It serves at once as the `owner`, else (a taker's) from when it is told `Own`.
    pub async fn start_worker(&self, owner: bool) -> anyhow::Result<Worker> {
        let (ours, theirs) = socketpair_fds().context("cannot create the worker's socketpair")?;
        let stderr = self
            .child_logs
            .stderr()
            .context("cannot set up the worker's log")?;
        let mut child = child::spawn(&self.worker_binary, theirs, self.privileges, stderr)?;
        let channel = Channel::new(ours)?;
        let outcome = tokio::time::timeout(START_TIMEOUT, self.hand_to_worker(&channel, owner))
            .await
            .unwrap_or_else(|_| Err(anyhow!("not ready within {START_TIMEOUT:?}")));
        if let Err(e) = outcome {
            // A worker that exits closes its channel, failing the hand-over; its exit status
            // explains more than the broken channel.
            let e = match tokio::time::timeout(EXIT_REPORT_WAIT, child.wait()).await {
                Ok(status) => anyhow!("exited during start-up ({})", describe(status)),
                Err(_) => {
                    child.start_kill();
                    let _ = child.wait().await;
                    e
                }
            };
            return Err(e.context("the worker did not start"));
        }
        info!(
            "worker ready (pid {}, uid {}), serving {} routes",
            child.id().unwrap_or(0),
            self.privileges.uid(),
            self.routes.routes().len()
        );
        Ok(Worker {
            child,
            channel,
            started: Instant::now(),
            unsaved: None,
            heartbeat_due: Instant::now() + HEARTBEAT_INTERVAL,
            ping_unanswered: false,
        })
    }

    async fn hand_to_worker(
        &self,
        channel: &Channel<ToWorker, FromWorker>,
        owner: bool,
    ) -> anyhow::Result<()> {
        let kinds = self.listeners.iter().map(|l| l.kind).collect();
        let fds: Vec<BorrowedFd> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let start = ToWorker::Start {
            listeners: kinds,
            settings: self.settings.clone(),
            ticket_key: self.ticket_key.clone(),
        };
        channel.send(&start, &fds).await?;
        for chunk in self.routes.routes().port_chunks(ROUTES_PER_MESSAGE) {
            channel.send(&ToWorker::Routes(chunk), &[]).await?;
        }
        for chunk in self.routes.routes().tunnel_chunks(TUNNELS_PER_MESSAGE) {
            channel.send(&ToWorker::TunnelRoutes(chunk), &[]).await?;
        }
        channel.send(&ToWorker::Serve { owner }, &[]).await?;
        match channel.recv().await? {
            Some((FromWorker::Ready, _)) => Ok(()),
            Some((other, _)) => bail!("unexpected first message {other:?}"),
            None => bail!("closed its channel during start-up"),
        }
    }
}
