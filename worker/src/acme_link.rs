//! The worker's channel to the ACME helper (`Channel<WorkerToAcme, AcmeToWorker>`).
//!
//! The supervisor hands the worker its end with `ToWorker::AcmeHelper`, at start and again
//! whenever the helper (or the worker) is restarted; a new link replaces the old one. On it go
//! first the routed names (`Routed` chunks, `RoutedEnd`, read from the routes table then: a
//! route removed while there was no link is simply not among them), then the certificate
//! requests still unanswered (the helper answers a repeated request like the first). While
//! there is no link, requests wait for one (each handshake at most until its deadline) and
//! certificates already loaded keep being served.
//!
//! Every message to the helper goes through one writer task per link, fed by an unbounded
//! queue: sending never waits, so a handshake that gives up (its deadline) never cancels a
//! request half sent, and a full socket buffer holds up no handshake and no route removal.
//! The queue holds only what the worker asks (one request per name, one `Forget` per removal).
//!
//! What the helper sends is applied here: certificates go to `certificates`, challenges to
//! `acme_challenges` (installed, then confirmed with `ChallengeReady` on the same link). A new
//! link drops the pending challenges: the helper sends again those still in progress.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use core_server_proto::acme_ipc::{AcmeToWorker, WorkerToAcme};
use core_server_proto::channel::Channel;
use core_server_proto::ipc::ROUTES_PER_MESSAGE;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::acme_challenges::Challenges;
use crate::certificates::Certificates;
use crate::route_table::RouteTable;

pub type HelperChannel = Channel<WorkerToAcme, AcmeToWorker>;

type Queue = mpsc::UnboundedSender<WorkerToAcme>;

/// Where messages to the helper go: the current link's queue, if there is a link.
#[derive(Default)]
pub struct AcmeLink {
    current: Mutex<Option<Queue>>,
}

impl AcmeLink {
    fn current(&self) -> std::sync::MutexGuard<'_, Option<Queue>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `message` for the current link, without waiting; without a link (or if it just
    /// broke) it is dropped: what must reach the helper is sent again on the next link (see
    /// the module's doc).
    pub fn send(&self, message: WorkerToAcme) {
        match &*self.current() {
            Some(queue) => {
                if let Err(e) = queue.send(message) {
                    debug!("the link to the ACME helper is closing: {:?} dropped", e.0);
                }
            }
            None => debug!("no link to the ACME helper yet for {message:?}"),
        }
    }

    /// Makes `fd` the link to the helper, in place of any earlier one, and follows it.
    pub fn connect(
        self: &Arc<Self>,
        fd: OwnedFd,
        routes: &RouteTable,
        certificates: Arc<Certificates>,
        challenges: Arc<Challenges>,
    ) -> std::io::Result<()> {
        let channel = Arc::new(HelperChannel::new(fd)?);
        challenges.relinked();
        let (queue, queued) = mpsc::unbounded_channel();
        // Under the certificates' lock, which requests and `Forget`s are sent under too: each
        // goes either to the old link (and is then reflected in what is read here) or after
        // what is queued here.
        certificates.relink(|unanswered| {
            let routed = routes.names();
            for chunk in routed.chunks(ROUTES_PER_MESSAGE) {
                let _ = queue.send(WorkerToAcme::Routed(chunk.to_vec()));
            }
            let _ = queue.send(WorkerToAcme::RoutedEnd);
            for name in unanswered {
                let _ = queue.send(WorkerToAcme::Certificate { name });
            }
            *self.current() = Some(queue.clone());
        });
        info!("linked to the ACME helper");
        // Not tracked with the connections: a stopping worker does not wait for the helper.
        tokio::spawn(write(channel.clone(), queued));
        tokio::spawn(
            self.clone()
                .follow(channel, queue, certificates, challenges),
        );
        Ok(())
    }

    /// Applies the helper's messages until the link breaks or is replaced.
    async fn follow(
        self: Arc<Self>,
        channel: Arc<HelperChannel>,
        queue: Queue,
        certificates: Arc<Certificates>,
        challenges: Arc<Challenges>,
    ) {
        loop {
            let message = match channel.recv().await {
                Ok(Some((message, _))) => message,
                Ok(None) => break,
                Err(e) => {
                    warn!("the link to the ACME helper failed: {e}");
                    break;
                }
            };
            match message {
                AcmeToWorker::Certificate { name, chain, key } => {
                    certificates.received(name, chain, key.0)
                }
                AcmeToWorker::Unavailable { name, reason } => {
                    certificates.unavailable(name, reason)
                }
                AcmeToWorker::ChallengeDone { id } => challenges.done(id),
                challenge @ (AcmeToWorker::TlsAlpnChallenge { .. }
                | AcmeToWorker::HttpChallenge { .. }) => {
                    if let Some(id) = challenges.install(challenge) {
                        let _ = queue.send(WorkerToAcme::ChallengeReady { id });
                    }
                }
            }
        }
        let mut current = self.current();
        if current.as_ref().is_some_and(|c| c.same_channel(&queue)) {
            info!("the link to the ACME helper is down until it is restarted");
            *current = None;
        }
    }
}

/// Writes the link's queue to the helper, in order, until the link breaks or every sender is
/// gone (the link replaced, or down).
async fn write(channel: Arc<HelperChannel>, mut queued: mpsc::UnboundedReceiver<WorkerToAcme>) {
    while let Some(message) = queued.recv().await {
        if let Err(e) = channel.send(&message, &[]).await {
            debug!("cannot send {message:?} to the ACME helper: {e}");
            return;
        }
    }
}
