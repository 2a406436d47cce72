//! The channel to the worker, handed over by the supervisor (again whenever either restarts;
//! a new link replaces the old one). In: `Certificate`, `Forget`, `ChallengeReady`. Out:
//! certificates, `Unavailable`, and the challenges the worker answers for the CA.
//!
//! Challenges in progress are sent again to a new worker, so an order outlives a worker
//! restart; [`Challenge`] says `ChallengeDone` when dropped.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_server_proto::acme_ipc::{AcmeToWorker, WorkerToAcme};
use core_server_proto::channel::Channel;
use core_server_proto::domain::Domain;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

type WorkerChannel = Channel<AcmeToWorker, WorkerToAcme>;

/// What the worker asks, for the issuer.
#[derive(Debug)]
pub enum Request {
    Certificate(Domain),
    Forget(Domain),
}

pub struct WorkerLink {
    current: Mutex<Option<(u64, Arc<WorkerChannel>)>>,
    generation: AtomicU64,
    /// Challenges being answered, by id: sent again to a new worker.
    challenges: Mutex<HashMap<u64, AcmeToWorker>>,
    /// Who waits for a `ChallengeReady`, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_id: AtomicU64,
    requests: mpsc::UnboundedSender<Request>,
}

impl WorkerLink {
    /// A link with no worker yet; the worker's requests go to `requests`.
    pub fn new(requests: mpsc::UnboundedSender<Request>) -> anyhow::Result<Arc<WorkerLink>> {
        // Ids start at random, so a worker that still holds an earlier helper's challenge
        // never mistakes one of ours for it.
        let mut seed = [0u8; 8];
        rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())?;
        Ok(Arc::new(WorkerLink {
            current: Mutex::new(None),
            generation: AtomicU64::new(0),
            challenges: Mutex::new(HashMap::new()),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(u64::from_ne_bytes(seed) >> 1),
            requests,
        }))
    }

    /// Replaces the link with the worker by `fd`, and reads from it until it closes or is
    /// replaced in turn.
    pub fn replace(self: &Arc<Self>, fd: OwnedFd) {
        let channel = match WorkerChannel::new(fd) {
            Ok(channel) => Arc::new(channel),
            Err(e) => {
                warn!("cannot use the new worker link: {e}");
                return;
            }
        };
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        *self.current.lock().unwrap() = Some((generation, channel.clone()));
        let link = self.clone();
        tokio::spawn(async move {
            let pending: Vec<AcmeToWorker> =
                link.challenges.lock().unwrap().values().cloned().collect();
            for challenge in pending {
                let _ = channel.send(&challenge, &[]).await;
            }
            link.read(generation, &channel).await;
        });
    }

    async fn read(&self, generation: u64, channel: &WorkerChannel) {
        loop {
            let message = channel.recv().await;
            if self.generation.load(Ordering::Relaxed) != generation {
                return; // replaced: the new link's reader takes over
            }
            let request = match message {
                Ok(Some((WorkerToAcme::Certificate { name }, _))) => Request::Certificate(name),
                Ok(Some((WorkerToAcme::Forget { name }, _))) => Request::Forget(name),
                Ok(Some((WorkerToAcme::ChallengeReady { id }, _))) => {
                    if let Some(ready) = self.waiting.lock().unwrap().remove(&id) {
                        let _ = ready.send(());
                    }
                    continue;
                }
                Ok(None) => {
                    debug!("the worker closed its link");
                    self.drop_current(generation);
                    return;
                }
                Err(e) => {
                    warn!("cannot read from the worker ({e}); waiting for a new link");
                    self.drop_current(generation);
                    return;
                }
            };
            if self.requests.send(request).is_err() {
                return;
            }
        }
    }

    fn drop_current(&self, generation: u64) {
        let mut current = self.current.lock().unwrap();
        if current.as_ref().is_some_and(|(g, _)| *g == generation) {
            *current = None;
        }
    }

    /// Sends `message` to the worker of now, if there is one (a later one asks again).
    pub async fn send(&self, message: &AcmeToWorker) {
        let channel = self
            .current
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, c)| c.clone());
        match channel {
            Some(channel) => {
                if let Err(e) = channel.send(message, &[]).await {
                    debug!("cannot send to the worker: {e}");
                }
            }
            None => debug!("no worker to tell"),
        }
    }

    /// Has the worker answer a challenge: `make` builds the message from an id. Returns once
    /// the worker said `ChallengeReady`, or an error after `wait`.
    pub async fn challenge(
        self: &Arc<Self>,
        make: impl FnOnce(u64) -> AcmeToWorker,
        wait: Duration,
    ) -> Result<Challenge, String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let message = make(id);
        let (ready, is_ready) = oneshot::channel();
        self.waiting.lock().unwrap().insert(id, ready);
        self.challenges.lock().unwrap().insert(id, message.clone());
        let challenge = Challenge {
            id,
            link: self.clone(),
        };
        self.send(&message).await;
        match tokio::time::timeout(wait, is_ready).await {
            Ok(Ok(())) => Ok(challenge),
            _ => Err(format!(
                "the worker did not set up the challenge within {wait:?}"
            )),
        }
    }
}

/// A challenge the worker answers; over when dropped.
pub struct Challenge {
    id: u64,
    link: Arc<WorkerLink>,
}

impl Drop for Challenge {
    fn drop(&mut self) {
        self.link.waiting.lock().unwrap().remove(&self.id);
        self.link.challenges.lock().unwrap().remove(&self.id);
        let link = self.link.clone();
        let id = self.id;
        tokio::spawn(async move { link.send(&AcmeToWorker::ChallengeDone { id }).await });
    }
}
