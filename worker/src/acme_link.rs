//! The worker's channel to the ACME helper (`Channel<WorkerToAcme, AcmeToWorker>`).
//!
//! The supervisor hands the worker its end with `ToWorker::AcmeHelper`, at start and again
//! whenever the helper (or the worker) is restarted; a new link replaces the old one, and the
//! certificate requests still unanswered are sent again on it (the helper answers a repeated
//! request like the first). While there is no link, requests wait for one (each handshake at
//! most until its deadline) and certificates already loaded keep being served.
//!
//! What the helper sends is applied here: certificates go to `certificates`, challenges to
//! `acme_challenges` (installed, then confirmed with `ChallengeReady` on the same link). A new
//! link drops the pending challenges: the helper sends again those still in progress.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use core_server_proto::acme_ipc::{AcmeToWorker, WorkerToAcme};
use core_server_proto::channel::Channel;
use tracing::{debug, info, warn};

use crate::acme_challenges::Challenges;
use crate::certificates::Certificates;

pub type HelperChannel = Channel<WorkerToAcme, AcmeToWorker>;

/// Where messages to the helper go: the current link, if there is one.
#[derive(Default)]
pub struct AcmeLink {
    current: Mutex<Option<Arc<HelperChannel>>>,
}

impl AcmeLink {
    fn current(&self) -> Option<Arc<HelperChannel>> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sends `message` on the current link; without one (or if it just broke) it is dropped:
    /// what must reach the helper is sent again on the next link (see the module's doc).
    pub async fn send(&self, message: &WorkerToAcme) {
        match self.current() {
            Some(channel) => {
                if let Err(e) = channel.send(message, &[]).await {
                    debug!("cannot send {message:?} to the ACME helper: {e}");
                }
            }
            None => debug!("no link to the ACME helper yet for {message:?}"),
        }
    }

    /// Makes `fd` the link to the helper, in place of any earlier one, and follows it.
    pub fn connect(
        self: &Arc<Self>,
        fd: OwnedFd,
        certificates: Arc<Certificates>,
        challenges: Arc<Challenges>,
    ) -> std::io::Result<()> {
        let channel = Arc::new(HelperChannel::new(fd)?);
        challenges.clear();
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(channel.clone());
        info!("linked to the ACME helper");
        // Not tracked with the connections: a stopping worker does not wait for the helper.
        tokio::spawn(self.clone().follow(channel, certificates, challenges));
        Ok(())
    }

    /// Asks again for what is unanswered, then applies the helper's messages until the link
    /// breaks or is replaced.
    async fn follow(
        self: Arc<Self>,
        channel: Arc<HelperChannel>,
        certificates: Arc<Certificates>,
        challenges: Arc<Challenges>,
    ) {
        for name in certificates.unanswered() {
            if channel
                .send(&WorkerToAcme::Certificate { name }, &[])
                .await
                .is_err()
            {
                break;
            }
        }
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
                        let _ = channel
                            .send(&WorkerToAcme::ChallengeReady { id }, &[])
                            .await;
                    }
                }
            }
        }
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &channel)) {
            info!("the link to the ACME helper is down until it is restarted");
            *current = None;
        }
    }
}
