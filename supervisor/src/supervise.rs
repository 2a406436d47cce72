//! The supervisor's life: keep one worker running on the held sockets, save what it reports.
//!
//! The worker is restarted whenever it exits, for any reason, with the same sockets and the
//! current routes; a worker that keeps dying is restarted with growing delays. Route changes
//! are group-committed: every change already received is written in one atomic save, then the
//! worker is told which changes are safe (`Saved`), and only then does it answer `ok`.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::ipc::{FromWorker, ToWorker, WorkerSettings, ROUTES_PER_MESSAGE};
use core_server_proto::routes::Routes;
use tokio::process::Child;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing::{error, info, warn};

use crate::child;
use crate::listeners::Listener;
use crate::privileges::Unprivileged;
use crate::routes_file::RoutesFile;

/// How long a new worker may take from exec to `Ready`.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a worker whose start-up failed gets to exit on its own, so its status is reported.
const EXIT_REPORT_WAIT: Duration = Duration::from_secs(1);
/// How long a worker may overrun its grace period on shutdown before it is killed.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(5);

pub struct Supervisor {
    pub listeners: Vec<Listener>,
    pub settings: WorkerSettings,
    pub grace: Duration,
    pub routes: Routes,
    pub routes_file: RoutesFile,
    pub privileges: Unprivileged,
    pub worker_binary: PathBuf,
}

struct Worker {
    child: Child,
    channel: Channel<ToWorker, FromWorker>,
    started: Instant,
}

impl Supervisor {
    /// Runs until SIGTERM or SIGINT. Fails only if the very first worker cannot start.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut signals = StopSignals::new()?;
        let mut worker = self.start_worker().await?;
        let mut backoff = Backoff::default();
        loop {
            let status = tokio::select! {
                name = signals.recv() => {
                    info!("{name}: stopping; in-flight requests have {:?} to finish", self.grace);
                    self.stop(worker).await;
                    return Ok(());
                }
                status = self.serve(&mut worker) => status,
            };
            let mut delay = backoff.after_exit(worker.started.elapsed());
            warn!("worker exited ({status}); starting a new one in {delay:?}");
            worker = loop {
                tokio::select! {
                    name = signals.recv() => {
                        info!("{name}: stopping");
                        return Ok(());
                    }
                    _ = tokio::time::sleep(delay) => {}
                }
                match self.start_worker().await {
                    Ok(worker) => break worker,
                    Err(e) => {
                        delay = backoff.after_exit(Duration::ZERO);
                        error!("{e:#}; trying again in {delay:?}");
                    }
                }
            };
        }
    }

    /// Starts a worker and hands it the sockets, settings and routes; returns once it is ready.
    async fn start_worker(&self) -> anyhow::Result<Worker> {
        let (ours, theirs) = socketpair_fds().context("cannot create the worker's socketpair")?;
        let mut child = child::spawn(&self.worker_binary, theirs, self.privileges)?;
        let channel = Channel::new(ours)?;
        let outcome = tokio::time::timeout(START_TIMEOUT, self.hand_over(&channel))
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
            self.routes.len()
        );
        Ok(Worker {
            child,
            channel,
            started: Instant::now(),
        })
    }

    async fn hand_over(&self, channel: &Channel<ToWorker, FromWorker>) -> anyhow::Result<()> {
        let kinds = self.listeners.iter().map(|l| l.kind).collect();
        let fds: Vec<BorrowedFd> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        let start = ToWorker::Start {
            listeners: kinds,
            settings: self.settings.clone(),
        };
        channel.send(&start, &fds).await?;
        let routes: Vec<_> = self.routes.iter().map(|(d, p)| (d.clone(), p)).collect();
        for chunk in routes.chunks(ROUTES_PER_MESSAGE) {
            channel.send(&ToWorker::Routes(chunk.to_vec()), &[]).await?;
        }
        channel.send(&ToWorker::Serve, &[]).await?;
        match channel.recv().await? {
            Some((FromWorker::Ready, _)) => Ok(()),
            Some((other, _)) => bail!("unexpected first message {other:?}"),
            None => bail!("closed its channel during start-up"),
        }
    }

    /// Saves what the worker reports until it exits; returns how it exited.
    async fn serve(&mut self, worker: &mut Worker) -> String {
        let mut unsaved = None; // the last change not yet acknowledged
        let mut dirty = false; // whether the table differs from the file
        let status = loop {
            tokio::select! {
                biased; // take every waiting message before saving: one write for a burst
                message = worker.channel.recv() => match message {
                    Ok(Some((FromWorker::RouteChanged { seq, change }, _))) => {
                        match self.routes.apply(&change) {
                            Ok(changed) => dirty |= changed,
                            Err(e) => warn!("worker reported a change that does not apply: {e}"),
                        }
                        unsaved = Some(seq);
                    }
                    Ok(Some((other, _))) => warn!("unexpected message from the worker: {other:?}"),
                    Ok(None) => break describe(worker.child.wait().await),
                    Err(e) => {
                        error!("worker channel failed: {e}; killing the worker");
                        let _ = worker.child.start_kill();
                        break describe(worker.child.wait().await);
                    }
                },
                status = worker.child.wait() => break describe(status),
                _ = std::future::ready(()), if unsaved.is_some() => {
                    let upto = unsaved.take().unwrap_or_default();
                    let error = self.save(&mut dirty);
                    let _ = worker.channel.send(&ToWorker::Saved { upto, error }, &[]).await;
                }
            }
        };
        self.save(&mut dirty);
        status
    }

    /// Writes the table if it changed; the error, if any, for the worker to pass on.
    fn save(&self, dirty: &mut bool) -> Option<String> {
        if !*dirty {
            return None;
        }
        match self.routes_file.save(&self.routes) {
            Ok(()) => {
                *dirty = false;
                None
            }
            Err(e) => {
                let e = format!("cannot save {}: {e}", self.routes_file.path().display());
                error!("{e}");
                Some(e)
            }
        }
    }

    /// Asks the worker to drain and exit; kills it if it overruns the grace period.
    async fn stop(&mut self, mut worker: Worker) {
        let shutdown = ToWorker::Shutdown { grace: self.grace };
        if worker.channel.send(&shutdown, &[]).await.is_err() {
            let _ = worker.child.start_kill();
        }
        match tokio::time::timeout(self.grace + KILL_AFTER_GRACE, self.serve(&mut worker)).await {
            Ok(status) => info!("worker exited ({status}); stopped"),
            Err(_) => {
                warn!(
                    "worker still running {KILL_AFTER_GRACE:?} after the grace period; killing it"
                );
                let _ = worker.child.start_kill();
                let _ = worker.child.wait().await;
            }
        }
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}

/// SIGTERM and SIGINT, the two ways to ask for a clean stop.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn new() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
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
