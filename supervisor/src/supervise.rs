//! The supervisor's life: keep one worker running on the held sockets, save what it reports,
//! answer the control socket, and hand everything to a rerun instance.
//!
//! The worker is restarted whenever it exits, for any reason, with the same sockets and the
//! current routes; a worker that keeps dying is restarted with growing delays. Route changes
//! are group-committed: every change already received is written in one atomic save, then the
//! worker is told which changes are safe (`Saved`), and only then does it answer `ok`.
//!
//! A takeover (a rerun `core-server` asking on the control socket) loses nothing:
//! 1. our worker stops reading UDP commands and reports every change it made; we save them;
//! 2. the taker gets the listening sockets (the control socket too) and the routes, and starts
//!    its worker while ours still serves HTTP; unread commands wait in the kernel's queue;
//! 3. once the taker's worker is ready, ours stops accepting and drains; we exit when it has.
//!    If the taker's worker fails, ours reads commands again and nothing changed.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::ipc::{
    ControlReply, ControlRequest, FromWorker, InstanceStatus, ToWorker, WorkerSettings,
    ROUTES_PER_MESSAGE,
};
use core_server_proto::routes::RouteChange;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::child::{self, Child};
use crate::child_logs::ChildLogs;
use crate::control;
use crate::listeners::Listener;
use crate::privileges::Unprivileged;
use crate::routes_file::SavedRoutes;

/// How long a new worker may take from exec to `Ready`.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose start-up failed gets to exit on its own, so its status is reported.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);
/// How long a worker may overrun its grace period on shutdown before it is killed.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(5);
/// How long a taker may take to start its worker and say so.
const TAKER_TIMEOUT: Duration = Duration::from_secs(20);

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
    channel: Channel<ToWorker, FromWorker>,
    started: Instant,
    /// The last change reported and not yet acknowledged.
    unsaved: Option<u64>,
}

/// Why the main loop ends.
enum Ending {
    /// Stop for good (a signal or `core-server stop`): drain and exit.
    Stop,
    /// A new instance serves now: drain and exit.
    HandedOver,
}

impl Supervisor {
    /// Runs until stopped or replaced, with `worker` (from [`Supervisor::start_worker`]) and
    /// the stop signals caught since start-up.
    pub async fn run(mut self, mut worker: Worker, mut signals: StopSignals) -> anyhow::Result<()> {
        let mut backoff = Backoff::default();
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
                    Ok(Some((FromWorker::RouteChanged { seq, change }, _))) => {
                        self.record(&mut worker, seq, &change)
                    }
                    Ok(Some((other, _))) => warn!("unexpected message from the worker: {other:?}"),
                    Ok(None) | Err(_) => {
                        let _ = worker.child.start_kill();
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
                connection = self.control.accept() => match connection {
                    Ok(connection) => match self.on_control(connection, &mut worker).await {
                        Ok(None) => {}
                        Ok(Some((ending, connection))) => {
                            stop_requester = connection;
                            break ending;
                        }
                        Err(e) => warn!("control connection: {e:#}"),
                    },
                    Err(e) => warn!("control socket: {e}"),
                },
            }
        };
        match ending {
            Ending::HandedOver => info!("handed over; draining for at most {:?}", self.grace),
            Ending::Stop => crate::systemd::stopping(),
        }
        self.stop(worker).await;
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
            match self.start_worker().await {
                Ok(worker) => return Some(worker),
                Err(e) => {
                    delay = backoff.after_exit(Duration::ZERO);
                    error!("{e:#}; trying again in {delay:?}");
                }
            }
        }
    }

    /// Starts a worker and hands it the sockets, settings and routes; returns once it is ready.
    pub async fn start_worker(&self) -> anyhow::Result<Worker> {
        let (ours, theirs) = socketpair_fds().context("cannot create the worker's socketpair")?;
        let stderr = self
            .child_logs
            .stderr()
            .context("cannot set up the worker's log")?;
        let mut child = child::spawn(&self.worker_binary, theirs, self.privileges, stderr)?;
        let channel = Channel::new(ours)?;
        let outcome = tokio::time::timeout(START_TIMEOUT, self.hand_to_worker(&channel))
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
        })
    }

    async fn hand_to_worker(&self, channel: &Channel<ToWorker, FromWorker>) -> anyhow::Result<()> {
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
        channel.send(&ToWorker::Serve, &[]).await?;
        match channel.recv().await? {
            Some((FromWorker::Ready, _)) => Ok(()),
            Some((other, _)) => bail!("unexpected first message {other:?}"),
            None => bail!("closed its channel during start-up"),
        }
    }

    /// Takes in a change the worker reports; it is saved (and acknowledged) by [`Self::save`].
    fn record(&mut self, worker: &mut Worker, seq: u64, change: &RouteChange) {
        self.routes.apply(change);
        worker.unsaved = Some(seq);
    }

    /// Saves the table if it changed and tells the worker which changes are safe.
    async fn save(&mut self, worker: &mut Worker) {
        let Some(upto) = worker.unsaved.take() else {
            return;
        };
        let error = self.routes.save().err();
        let _ = worker
            .channel
            .send(&ToWorker::Saved { upto, error }, &[])
            .await;
    }

    /// Serves one control connection. `Some` when the instance is to end.
    async fn on_control(
        &mut self,
        connection: control::ServerEnd,
        worker: &mut Worker,
    ) -> anyhow::Result<Option<(Ending, Option<control::ServerEnd>)>> {
        let Some((request, _)) = connection.recv().await? else {
            return Ok(None);
        };
        match request {
            ControlRequest::Status => {
                let status = InstanceStatus {
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                    supervisor_pid: std::process::id(),
                    worker_pid: worker.child.id(),
                    acme_pid: None,
                    ports: self.listeners.iter().map(|l| (l.kind, l.port())).collect(),
                    dir: self.routes.dir().to_path_buf(),
                };
                connection.send(&ControlReply::Status(status), &[]).await?;
                self.send_routes(&connection).await?;
                Ok(None)
            }
            ControlRequest::Stop => {
                info!(
                    "stop requested on the control socket; in-flight requests have {:?} to finish",
                    self.grace
                );
                let reply = ControlReply::Stopping {
                    pid: std::process::id(),
                };
                connection.send(&reply, &[]).await?;
                Ok(Some((Ending::Stop, Some(connection))))
            }
            ControlRequest::TakeOver => {
                let handed = self.give_over(&connection, worker).await?;
                Ok(handed.then_some((Ending::HandedOver, None)))
            }
            other => {
                let reply = ControlReply::Refused(format!("unexpected request {other:?}"));
                connection.send(&reply, &[]).await?;
                Ok(None)
            }
        }
    }

    /// Our side of a takeover (see the module comment); whether the taker now serves.
    async fn give_over(
        &mut self,
        taker: &control::ServerEnd,
        worker: &mut Worker,
    ) -> anyhow::Result<bool> {
        info!("a new core-server is taking over; pausing UDP commands");
        worker.channel.send(&ToWorker::PauseCommands, &[]).await?;
        loop {
            match worker.channel.recv().await? {
                Some((FromWorker::RouteChanged { seq, change }, _)) => {
                    self.record(worker, seq, &change)
                }
                Some((FromWorker::CommandsPaused, _)) => break,
                Some((other, _)) => warn!("unexpected message from the worker: {other:?}"),
                None => bail!("the worker exited during the takeover"),
            }
        }
        self.save(worker).await;

        let handed = self.send_sockets(taker).await;
        let verdict = match handed {
            Ok(()) => tokio::time::timeout(TAKER_TIMEOUT, taker.recv()).await,
            Err(e) => Ok(Err(e)),
        };
        match verdict {
            Ok(Ok(Some((ControlRequest::TookOver, _)))) => return Ok(true),
            Ok(Ok(Some((ControlRequest::TakeOverFailed { reason }, _)))) => {
                warn!("the new core-server failed ({reason}); serving on")
            }
            Ok(Ok(other)) => warn!("the new core-server went away ({other:?}); serving on"),
            Ok(Err(e)) => warn!("takeover failed: {e}; serving on"),
            Err(_) => {
                warn!("the new core-server did not start within {TAKER_TIMEOUT:?}; serving on")
            }
        }
        worker.channel.send(&ToWorker::ResumeCommands, &[]).await?;
        Ok(false)
    }

    async fn send_sockets(&self, taker: &control::ServerEnd) -> std::io::Result<()> {
        let mut fds: Vec<BorrowedFd> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        fds.push(self.control.as_fd());
        let sockets = ControlReply::Sockets {
            listeners: self.listeners.iter().map(|l| l.kind).collect(),
            dir: self.routes.dir().to_path_buf(),
            pid: std::process::id(),
        };
        taker.send(&sockets, &fds).await?;
        self.send_routes(taker).await
    }

    async fn send_routes(&self, peer: &control::ServerEnd) -> std::io::Result<()> {
        for chunk in self.routes.routes().chunks(ROUTES_PER_MESSAGE) {
            peer.send(&ControlReply::Routes(chunk), &[]).await?;
        }
        peer.send(&ControlReply::RoutesEnd, &[]).await
    }

    /// Asks the worker to drain and exit, saving what it still reports; kills it if it
    /// overruns the grace period.
    async fn stop(&mut self, mut worker: Worker) {
        if worker
            .channel
            .send(&ToWorker::Shutdown { grace: self.grace }, &[])
            .await
            .is_err()
        {
            let _ = worker.child.start_kill();
        }
        let deadline = tokio::time::sleep(self.grace + KILL_AFTER_GRACE);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                biased;
                message = worker.channel.recv() => match message {
                    Ok(Some((FromWorker::RouteChanged { seq, change }, _))) => {
                        self.record(&mut worker, seq, &change)
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                },
                _ = std::future::ready(()), if worker.unsaved.is_some() => self.save(&mut worker).await,
                _ = &mut deadline => {
                    warn!("worker still running {KILL_AFTER_GRACE:?} after the grace period; killing it");
                    let _ = worker.child.start_kill();
                    break;
                }
            }
        }
        let status = describe(worker.child.wait().await);
        self.save(&mut worker).await;
        info!("worker exited ({status}); stopped");
    }
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
