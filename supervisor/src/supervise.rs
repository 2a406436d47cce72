//! The supervisor's life: keep one worker running on the held sockets and one ACME helper on
//! the certificate store (`acme_helper.rs`), save what the worker reports, answer the control
//! socket, and hand everything to a rerun instance (`handover.rs`).
//!
//! The worker is restarted whenever it exits, for any reason, with the same sockets and the
//! current routes; a worker that keeps dying is restarted with growing delays. Route changes
//! are group-committed: every change already received is written in one atomic save, then the
//! worker is told which changes are safe (`Saved`), and only then does it answer `ok`.
//!
//! Nothing here waits on a peer without a bound: control clients are read in tasks of their
//! own (`control.rs`); the worker must take every message, confirm a pause and answer every
//! heartbeat within a deadline, or it (stopped, stuck) is killed and replaced (`worker.rs`).
//! What it acknowledged was saved before it was told, so nothing is lost. The helper is never
//! waited for beyond a send's deadline: it only delays certificates not yet issued.
//! Control requests only the worker can answer (`tunnel allow|revoke`, the agents `status`
//! lists) wait beside the loop, in `tunnel_requests.rs`, until it does or their deadline
//! passes.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use core_server_proto::acme_ipc::Secret;
use core_server_proto::ipc::{
    ControlReply, ControlRequest, FromWorker, InstanceStatus, ToWorker, WorkerSettings,
    CERTIFICATES_PER_MESSAGE, ROUTES_PER_MESSAGE, TUNNELS_PER_MESSAGE,
};
use core_server_proto::routes::{RouteChange, Routes};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::acme_helper::{HelperEvent, HelperSetup, HelperSlot};
use crate::backoff::Backoff;
use crate::child_logs::ChildLogs;
use crate::control::{self, send_replies, Incoming, REPLY_TIMEOUT};
use crate::listeners::Listener;
use crate::privileges::Unprivileged;
use crate::routes_file::SavedRoutes;
use crate::stop_signals::StopSignals;
use crate::tunnel_requests::TunnelRequests;
use crate::worker::Worker;

/// How long a worker may overrun its grace period on shutdown before it is killed.
const KILL_AFTER_GRACE: Duration = Duration::from_secs(5);

pub struct Supervisor {
    pub listeners: Vec<Listener>,
    pub control: control::Listener,
    pub settings: WorkerSettings,
    pub ticket_key: Secret,
    pub acme: HelperSetup,
    /// `DIR/acme`, owned by the children's user: each helper gets a copy.
    pub acme_store: OwnedFd,
    pub grace: Duration,
    pub routes: SavedRoutes,
    pub privileges: Unprivileged,
    pub worker_binary: PathBuf,
    pub child_logs: ChildLogs,
    /// Control requests waiting for the worker's answer.
    pub tunnel_requests: TunnelRequests,
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
        let mut helper = self.start_acme_helper(&mut worker).await;
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
                // Before the worker's messages: a worker sending without pause (a compromised
                // one) must not keep a takeover or `stop` from being heard. Control requests
                // come at most a few at a time (see `control::serve`).
                Some(Incoming { request, connection }) = requests.recv() => match request {
                    ControlRequest::TakeOver => {
                        // Connections on the shared socket are the taker's once it owns it.
                        accepting.abort();
                        if self.give_over(&connection, &mut worker).await {
                            info!("handed over; draining for at most {:?}", self.grace);
                            if let Ok(taker) = connection.peer() {
                                crate::systemd::handed_over_to(taker.pid() as u32);
                            }
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
                    request => self.answer(request, connection, &mut worker, &helper).await,
                },
                message = worker.channel.recv() => match message {
                    Ok(Some((message, _))) => self.on_message(&mut worker, message),
                    Ok(None) | Err(_) => {
                        worker.kill();
                        let status = worker.wait().await;
                        self.save(&mut worker).await;
                        self.tunnel_requests.worker_gone();
                        let delay = backoff.after_exit(worker.lived());
                        warn!("worker exited ({status}); starting a new one in {delay:?}");
                        match self.restart(delay, &mut backoff, &mut signals).await {
                            Some(new) => worker = new,
                            None => {
                                // A stop like any other: every route left in the snapshot.
                                self.routes.compact_for_stop();
                                helper.shut_down().await;
                                return Ok(());
                            }
                        }
                        self.link_acme_helper(&mut helper, &mut worker).await;
                    }
                },
                // Every waiting message first (biased): one write for a burst of changes.
                _ = std::future::ready(()), if worker.unsaved.is_some() => {
                    self.save(&mut worker).await;
                }
                _ = tokio::time::sleep_until(worker.heartbeat_due()) => worker.heartbeat().await,
                _ = self.tunnel_requests.next_deadline() => self.tunnel_requests.expire(),
                event = helper.event(self.routes.routes()) => {
                    if let HelperEvent::RestartDue = event {
                        self.restart_acme_helper(&mut helper, &mut worker).await;
                    }
                }
            }
        };
        accepting.abort();
        // Clients still queued are answered now, not left waiting for the drain to end.
        while let Ok(Incoming { connection, .. }) = requests.try_recv() {
            let why = "this core-server is stopping or being replaced; retry in a moment";
            send_replies(connection, vec![ControlReply::Refused(why.to_owned())]);
        }
        drop(requests);
        if ending == Ending::Stop {
            crate::systemd::stopping();
            // The helper stays while the worker drains: a handshake in flight may need it.
            self.stop(worker, ending).await;
            helper.shut_down().await;
        } else {
            // The worker stops accepting first (`stop` tells it at once); the helper finishes
            // its orders meanwhile (handshakes may wait for them) and goes, freeing the
            // store's lock that the taker's helper waits for.
            tokio::join!(self.stop(worker, ending), helper.shut_down());
        }
        let why = "core-server stopped before the worker answered; check `core-server status`";
        self.tunnel_requests.abandon(why).await;
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

    /// Takes in what the worker says in the normal course of things.
    pub(crate) fn on_message(&mut self, worker: &mut Worker, message: FromWorker) {
        match message {
            FromWorker::RouteChanged { seq, change } => self.record(worker, seq, &change),
            FromWorker::Pong => worker.answered(),
            FromWorker::TunnelDone { id, error } => {
                (self.tunnel_requests).done(id, error, self.routes.routes())
            }
            FromWorker::Tunnels { id, chunk, last } => self.tunnel_requests.report(id, chunk, last),
            other => warn!("unexpected message from the worker: {other:?}"),
        }
    }

    /// Takes in a change the worker reports; it is saved (and acknowledged) by [`Self::save`].
    fn record(&mut self, worker: &mut Worker, seq: u64, change: &RouteChange) {
        if matches!(change, RouteChange::AllowTunnel { .. })
            && !self.tunnel_requests.take_asked(change)
        {
            error!(
                "the worker reported a tunnel token no one allowed, for {}: not saved",
                change.domain()
            );
            return;
        }
        self.routes.apply(change);
        worker.unsaved = Some(seq);
    }

    /// Saves the changes reported and tells the worker which are safe; then compacts the
    /// journal if it is due, which the senders do not wait for.
    pub(crate) async fn save(&mut self, worker: &mut Worker) {
        let Some(upto) = worker.unsaved.take() else {
            return;
        };
        let error = self.routes.save().err();
        worker.tell(&ToWorker::Saved { upto, error }).await;
        self.routes.compact_if_due();
    }

    /// Answers a request other than a takeover or `stop`: at once from our state (the reply
    /// sent in a task of its own, so a client that reads slowly holds up nothing), or, for what
    /// only the worker knows or does, once it answers (`tunnel_requests.rs`).
    async fn answer(
        &mut self,
        request: ControlRequest,
        connection: control::ServerEnd,
        worker: &mut Worker,
        helper: &HelperSlot,
    ) {
        let to_worker = match request {
            ControlRequest::Status => {
                let replies = self.status_replies(worker, helper);
                let routes = self.routes.routes();
                if !routes.has_tunnels() {
                    return send_replies(connection, replies);
                }
                self.tunnel_requests.status(replies, routes, connection)
            }
            request
            @ (ControlRequest::TunnelAllow { .. } | ControlRequest::TunnelRevoke { .. }) => {
                let routes = self.routes.routes();
                match self.tunnel_requests.change(request, routes, connection) {
                    Some(to_worker) => to_worker,
                    None => return,
                }
            }
            other => {
                let why = format!("unexpected request {other:?}");
                return send_replies(connection, vec![ControlReply::Refused(why)]);
            }
        };
        // A worker that does not take it is replaced, which answers the request.
        worker.tell(&to_worker).await;
    }

    /// `status`'s answer as far as we know it: the instance, its routes (the tunnel routes
    /// after the certificates, only if there are any) and its certificates.
    fn status_replies(&self, worker: &Worker, helper: &HelperSlot) -> Vec<ControlReply> {
        let status = InstanceStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            supervisor_pid: std::process::id(),
            worker_pid: worker.pid(),
            acme_pid: helper.pid(),
            ports: self.listeners.iter().map(|l| (l.kind, l.port())).collect(),
            dir: self.routes.dir().to_path_buf(),
        };
        let routes = self.routes.routes();
        let mut replies = vec![ControlReply::Status(status)];
        replies.extend(routes_replies(routes));
        let certificates: Vec<_> = helper.certificates().cloned().collect();
        replies.extend(
            certificates
                .chunks(CERTIFICATES_PER_MESSAGE)
                .map(|chunk| ControlReply::Certificates(chunk.to_vec())),
        );
        if routes.has_tunnels() {
            replies.extend(tunnel_replies(routes));
        }
        replies
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
                        warn!("the worker changed a route that another instance owns ({change:?}); not saved here")
                    }
                    // A change saved before a handover, or while stopping, is done.
                    Ok(Some((message @ (FromWorker::TunnelDone { .. } | FromWorker::Tunnels { .. }), _))) => {
                        self.on_message(&mut worker, message)
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
        let status = worker.wait().await;
        self.save(&mut worker).await;
        if owner {
            self.routes.compact_for_stop();
        }
        info!("worker exited ({status}); stopped");
    }
}

/// The port routes as control replies: `Routes` chunks, then `RoutesEnd`.
pub(crate) fn routes_replies(routes: &Routes) -> Vec<ControlReply> {
    let mut replies: Vec<_> = routes
        .port_chunks(ROUTES_PER_MESSAGE)
        .into_iter()
        .map(|chunk| ControlReply::Routes(chunk.into()))
        .collect();
    replies.push(ControlReply::RoutesEnd);
    replies
}

/// The tunnel routes as control replies: `Tunnels` chunks, then `TunnelsEnd`.
pub(crate) fn tunnel_replies(routes: &Routes) -> Vec<ControlReply> {
    let mut replies: Vec<_> = routes
        .tunnel_chunks(TUNNELS_PER_MESSAGE)
        .into_iter()
        .map(ControlReply::Tunnels)
        .collect();
    replies.push(ControlReply::TunnelsEnd);
    replies
}
