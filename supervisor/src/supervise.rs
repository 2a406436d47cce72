//! The supervisor's life: keep one worker running on the held sockets, save what it reports,
//! answer the control socket, and hand everything to a rerun instance (`handover.rs`).
//!
//! The worker is restarted whenever it exits, for any reason, with the same sockets and the
//! current routes; a worker that keeps dying is restarted with growing delays. Route changes
//! are group-committed: every change already received is written in one atomic save, then the
//! worker is told which changes are safe (`Saved`), and only then does it answer `ok`.
//!
//! Nothing here waits on a peer without a bound: control clients are read in tasks of their
//! own (`control.rs`); every message to the worker must be taken within [`WORKER_TIMEOUT`] and
//! every `Ping` answered within [`HEARTBEAT_TIMEOUT`], or the worker (stopped, stuck) is killed
//! and replaced. What it acknowledged was saved before it was told, so nothing is lost.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::ipc::{
    ControlReply, ControlRequest, FromWorker, InstanceStatus, ToWorker, WorkerSettings,
    ROUTES_PER_MESSAGE,
};
use core_server_proto::routes::{RouteChange, Routes};
use tokio::process::Child;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::child;
use crate::child_logs::ChildLogs;
use crate::control::{self, Incoming, REPLY_TIMEOUT};
use crate::listeners::Listener;
use crate::privileges::Unprivileged;
use crate::routes_file::SavedRoutes;

/// How long a new worker may take from exec to `Ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose start-up failed gets to exit on its own, so its status is reported.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);
/// How long a worker may overrun its grace period on shutdown before it is killed.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(5);
/// How long a worker may take to take in a message, or to confirm a pause.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a worker is asked to prove it runs, and how long it has to answer.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Supervisor {
    pub listeners: Vec<Listener>,
    pub control: control::Listener,
    pub settings: WorkerSettings,
    pub grace: Duration,
    pub routes: SavedRoutes,
    pub privileges: Unprivileged,
    pub worker_binary: PathBuf,
    pub child_logs: ChildLogs,
}

pub struct Worker {
    child: Child,
    pub(crate) channel: Channel<ToWorker, FromWorker>,
    started: Instant,
    /// The last change reported and not yet acknowledged.
    unsaved: Option<u64>,
    /// When to send the next `Ping`, or, while one is unanswered, when it is overdue.
    heartbeat_due: Instant,
    ping_unanswered: bool,
}

impl Worker {
    /// Sends `message`. A worker that does not take it within [`WORKER_TIMEOUT`] is killed
    /// (and one that is gone, killed again): `false`, and its channel closes, so the main
    /// loop replaces it.
    pub(crate) async fn tell(&mut self, message: &ToWorker) -> bool {
        match tokio::time::timeout(WORKER_TIMEOUT, self.channel.send(message, &[])).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => {}
            Err(_) => warn!("the worker took no message for {WORKER_TIMEOUT:?}; killing it"),
        }
        self.kill();
        false
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Why the main loop ends.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Stop for good (a signal or `core-server stop`): drain, saving what the worker reports.
    Stop,
    /// Another instance owns the routes now (or never handed them to us): drain, save nothing.
    NotOwner,
}

impl Supervisor {
    /// Runs until stopped or replaced, with `worker` (from [`Supervisor::start_worker`]) and
    /// the stop signals caught since start-up.
    pub async fn run(mut self, mut worker: Worker, mut signals: StopSignals) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
        let (requests_in, mut requests) = mpsc::channel(8);
        let mut accepting = control::serve(self.control.clone(), requests_in.clone());
        // Kept open until we exit: `core-server stop` waits for it to close.
        let mut stop_requester = None;
        let ending = loop {
            tokio::select! {
                biased;
                name = signals.recv() => {
                    info!("{name}: stopping; in-flight requests have {:?} to finish", self.grace);
                    break Ending::Stop;
                }
                message = worker.channel.recv() => match message {
                    Ok(Some((message, _))) => self.on_message(&mut worker, message),
                    Ok(None) | Err(_) => {
                        worker.kill();
                        let status = describe(worker.child.wait().await);
                        self.save(&mut worker).await;
                        let delay = backoff.after_exit(worker.started.elapsed());
                        warn!("worker exited ({status}); starting a new one in {delay:?}");
                        match self.restart(delay, &mut backoff, &mut signals).await {
                            Some(new) => worker = new,
                            None => return Ok(()),
                        }
                    }
                },
                // Every waiting message first (biased): one write for a burst of changes.
                _ = std::future::ready(()), if worker.unsaved.is_some() => {
                    self.save(&mut worker).await;
                }
                _ = tokio::time::sleep_until(worker.heartbeat_due) => self.heartbeat(&mut worker).await,
                Some(Incoming { request, connection }) = requests.recv() => match request {
                    ControlRequest::TakeOver => {
                        // Connections on the shared socket are the taker's once it owns it.
                        accepting.abort();
                        if self.give_over(&connection, &mut worker).await {
                            info!("handed over; draining for at most {:?}", self.grace);
                            break Ending::NotOwner;
                        }
                        accepting = control::serve(self.control.clone(), requests_in.clone());
                    }
                    ControlRequest::Stop => {
                        info!(
                            "stop requested on the control socket; in-flight requests have {:?} to finish",
                            self.grace
                        );
                        let reply = ControlReply::Stopping { pid: std::process::id() };
                        let _ = tokio::time::timeout(REPLY_TIMEOUT, connection.send(&reply, &[])).await;
                        stop_requester = Some(connection);
                        break Ending::Stop;
                    }
                    request => self.answer(request, connection, &worker),
                },
            }
        };
        accepting.abort();
        if ending == Ending::Stop {
            crate::systemd::stopping();
        }
        self.stop(worker, ending).await;
        drop(stop_requester);
        Ok(())
    }

    /// Waits `delay`, then starts workers until one runs; `None` if a stop signal came first.
    async fn restart(
        &self,
        mut delay: Duration,
        backoff: &mut Backoff,
        signals: &mut StopSignals,
    ) -> Option<Worker> {
        loop {
            tokio::select! {
                name = signals.recv() => {
                    info!("{name}: stopping");
                    return None;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            match self.start_worker(true).await {
                Ok(worker) => return Some(worker),
                Err(e) => {
                    delay = backoff.after_exit(Duration::ZERO);
                    error!("{e:#}; trying again in {delay:?}");
                }
            }
        }
    }

    /// Starts a worker and hands it the sockets, settings and routes; returns once it is ready.
    /// It reads UDP commands at once if `read_commands`, else once told `ResumeCommands`.
    pub async fn start_worker(&self, read_commands: bool) -> anyhow::Result<Worker> {
        let (ours, theirs) = socketpair_fds().context("cannot create the worker's socketpair")?;
        let stderr = self
            .child_logs
            .stderr()
            .context("cannot set up the worker's log")?;
        let mut child = child::spawn(&self.worker_binary, theirs, self.privileges, stderr)?;
        let channel = Channel::new(ours)?;
        let outcome =
            tokio::time::timeout(START_TIMEOUT, self.hand_to_worker(&channel, read_commands))
                .await
                .unwrap_or_else(|_| Err(anyhow!("not ready within {START_TIMEOUT:?}")));
        if let Err(e) = outcome {
            // A worker that exits closes its channel, failing the hand-over; its exit status
            // explains more than the broken channel.
            let e = match tokio::time::timeout(EXIT_REPORT_WAIT, child.wait()).await {
                Ok(status) => anyhow!("exited during start-up ({})", describe(status)),
                Err(_) => {
                    let _ = child.start_kill();
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
        read_commands: bool,
    ) -> anyhow::Result<()> {
        let kinds = self.listeners.iter().map(|l| l.kind).collect();
        let fds: Vec<BorrowedFd> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let start = ToWorker::Start {
            listeners: kinds,
            settings: self.settings.clone(),
        };
        channel.send(&start, &fds).await?;
        for chunk in self.routes.routes().chunks(ROUTES_PER_MESSAGE) {
            channel.send(&ToWorker::Routes(chunk), &[]).await?;
        }
        channel
            .send(&ToWorker::Serve { read_commands }, &[])
            .await?;
        match channel.recv().await? {
            Some((FromWorker::Ready, _)) => Ok(()),
            Some((other, _)) => bail!("unexpected first message {other:?}"),
            None => bail!("closed its channel during start-up"),
        }
    }

    /// Takes in what the worker says in the normal course of things.
    pub(crate) fn on_message(&mut self, worker: &mut Worker, message: FromWorker) {
        match message {
            FromWorker::RouteChanged { seq, change } => self.record(worker, seq, &change),
            FromWorker::Pong => {
                worker.ping_unanswered = false;
                worker.heartbeat_due = Instant::now() + HEARTBEAT_INTERVAL;
            }
            other => warn!("unexpected message from the worker: {other:?}"),
        }
    }

    /// Sends the next `Ping`, or replaces a worker that left the last one unanswered.
    async fn heartbeat(&mut self, worker: &mut Worker) {
        worker.heartbeat_due = Instant::now() + HEARTBEAT_TIMEOUT;
        if worker.ping_unanswered {
            warn!(
                "the worker (pid {}) did not answer within {HEARTBEAT_TIMEOUT:?} (stopped or stuck); replacing it",
                worker.child.id().unwrap_or(0)
            );
            worker.kill();
        } else {
            worker.ping_unanswered = worker.tell(&ToWorker::Ping).await;
        }
    }

    /// Takes in a change the worker reports; it is saved (and acknowledged) by [`Self::save`].
    fn record(&mut self, worker: &mut Worker, seq: u64, change: &RouteChange) {
        self.routes.apply(change);
        worker.unsaved = Some(seq);
    }

    /// Saves the table if it changed and tells the worker which changes are safe.
    pub(crate) async fn save(&mut self, worker: &mut Worker) {
        let Some(upto) = worker.unsaved.take() else {
            return;
        };
        let error = self.routes.save().err();
        worker.tell(&ToWorker::Saved { upto, error }).await;
    }

    /// Answers a request that needs no more than a snapshot of our state, in a task of its own
    /// (a client that reads slowly holds up nothing).
    fn answer(&self, request: ControlRequest, connection: control::ServerEnd, worker: &Worker) {
        let replies = match request {
            ControlRequest::Status => {
                let status = InstanceStatus {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    supervisor_pid: std::process::id(),
                    worker_pid: worker.child.id(),
                    acme_pid: None,
                    ports: self.listeners.iter().map(|l| (l.kind, l.port())).collect(),
                    dir: self.routes.dir().to_path_buf(),
                };
                let mut replies = vec![ControlReply::Status(status)];
                replies.extend(routes_replies(self.routes.routes()));
                replies
            }
            other => vec![ControlReply::Refused(format!(
                "unexpected request {other:?}"
            ))],
        };
        tokio::spawn(async move {
            let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
                for reply in &replies {
                    connection.send(reply, &[]).await?;
                }
                std::io::Result::Ok(())
            });
            match sent.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!("control connection: {e}"),
                Err(_) => warn!("a control client read no answer within {REPLY_TIMEOUT:?}; closed"),
            }
        });
    }

    /// Asks the worker to drain and exit, saving what it still reports if we own the routes;
    /// kills it if it overruns the grace period.
    pub async fn stop(&mut self, mut worker: Worker, ending: Ending) {
        // A worker that does not take this is killed: the wait below then ends at once.
        worker.tell(&ToWorker::Shutdown { grace: self.grace }).await;
        let owner = ending == Ending::Stop;
        let deadline = tokio::time::sleep(self.grace + KILL_AFTER_GRACE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                message = worker.channel.recv() => match message {
                    Ok(Some((FromWorker::RouteChanged { seq, change }, _))) if owner => {
                        self.record(&mut worker, seq, &change)
                    }
                    Ok(Some((FromWorker::RouteChanged { change, .. }, _))) => {
                        warn!("the worker changed a route after the handover ({change:?}); not saved here")
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
                _ = std::future::ready(()), if worker.unsaved.is_some() => self.save(&mut worker).await,
                _ = &mut deadline => {
                    warn!("worker still running {KILL_AFTER_GRACE:?} after the grace period; killing it");
                    worker.kill();
                    break;
                }
            }
        }
        let status = describe(worker.child.wait().await);
        self.save(&mut worker).await;
        info!("worker exited ({status}); stopped");
    }
}

/// The routes as control replies: `Routes` chunks, then `RoutesEnd`.
pub(crate) fn routes_replies(routes: &Routes) -> Vec<ControlReply> {
    let mut replies: Vec<_> = routes
        .chunks(ROUTES_PER_MESSAGE)
        .into_iter()
        .map(ControlReply::Routes)
        .collect();
    replies.push(ControlReply::RoutesEnd);
    replies
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}

/// The signals that ask for a clean stop: SIGTERM, SIGINT (Ctrl-C), and SIGHUP (the terminal
/// of a foreground instance went away), whose default action would skip the drain. Caught
/// from the start, so one arriving while the instance starts is a clean stop too.
pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}

/// Restart delays: short for a worker that ran a while, doubling for one that keeps dying.
struct Backoff {
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
    fn after_exit(&mut self, lived: Duration) -> Duration {
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
