//! The channel to the worker, handed over by the supervisor (again whenever either restarts;
//! a new link replaces the old one). In: `Certificate`, `Forget`, `ChallengeReady`, and on
//! each link first the routed names (`Routed` chunks, `RoutedEnd`). Out:
//! certificates, `Unavailable`, and the challenges the worker answers for the CA.
//!
//! Challenges in progress are sent again to a new worker, so an order outlives a worker
//! restart; [`Challenge`] says `ChallengeDone` when dropped. They are kept in the store too:
//! after a rerun the CA reaches the new worker, and the new helper has it answer the old
//! one's ([`WorkerLink::answer_for_other`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_server_proto::acme_ipc::{AcmeToWorker, WorkerToAcme};
use core_server_proto::channel::Channel;
use core_server_proto::domain::Domain;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::store::Store;

type WorkerChannel = Channel<AcmeToWorker, WorkerToAcme>;

/// What the worker asks, for the issuer.
#[derive(Debug)]
pub enum Request {
    Certificate(Domain),
    Forget(Domain),
    /// Every name the worker routes now (its whole set, sent on each new link).
    Routed(HashSet<Domain>),
}

pub struct WorkerLink {
    state: Mutex<State>,
    generation: AtomicU64,
    /// Who waits for a `ChallengeReady`, by id.
    waiting: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_id: AtomicU64,
    requests: mpsc::UnboundedSender<Request>,
    store: Arc<Store>,
}

impl WorkerLink {
    /// A link with no worker yet; the worker's requests go to `requests`.
    pub fn new(
        requests: mpsc::UnboundedSender<Request>,
        store: Arc<Store>,
    ) -> anyhow::Result<Arc<WorkerLink>> {
        // Ids start at random, so a worker that still holds an earlier helper's challenge
        // never mistakes one of ours for it.
        let mut seed = [0u8; 8];
        rustix::rand::getrandom(&mut seed, rustix::rand::GetRandomFlags::empty())?;
        Ok(Arc::new(WorkerLink {
            state: Mutex::new(State::default()),
            generation: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(u64::from_ne_bytes(seed) >> 1),
            requests,
            store,
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
        let pending: Vec<AcmeToWorker> = {
            let mut state = self.state.lock().unwrap();
            state.current = Some((generation, channel.clone()));
            state.challenges.values().cloned().collect()
        };
        let link = self.clone();
        tokio::spawn(async move {
            for challenge in pending {
                let _ = channel.send(&challenge, &[]).await;
            }
            link.read(generation, &channel).await;
        });
    }

    async fn read(&self, generation: u64, channel: &WorkerChannel) {
        // The routed set being received from this worker.
        let mut routed = HashSet::new();
        loop {
            let message = channel.recv().await;
            if self.generation.load(Ordering::Relaxed) != generation {
                return; // replaced: the new link's reader takes over
            }
            let request = match message {
                Ok(Some((WorkerToAcme::Certificate { name }, _))) => Request::Certificate(name),
                Ok(Some((WorkerToAcme::Forget { name }, _))) => Request::Forget(name),
                Ok(Some((WorkerToAcme::Routed(names), _))) => {
                    routed.extend(names);
                    continue;
                }
                Ok(Some((WorkerToAcme::RoutedEnd, _))) => {
                    Request::Routed(std::mem::take(&mut routed))
                }
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
        let mut state = self.state.lock().unwrap();
        if state
            .current
            .as_ref()
            .is_some_and(|(g, _)| *g == generation)
        {
            state.current = None;
        }
    }

    /// Whether a worker is linked (it is gone once its end of the channel closes).
    pub fn has_worker(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<Arc<WorkerChannel>> {
        let state = self.state.lock().unwrap();
        state.current.as_ref().map(|(_, channel)| channel.clone())
    }

    /// Sends `message` to the worker of now, if there is one (a later one asks again).
    pub async fn send(&self, message: &AcmeToWorker) {
        send_on(self.current(), message).await;
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
        // Recorded and sent to the worker of that moment at once: a new worker gets it from
        // `replace`, and only from there.
        let channel = {
            let mut state = self.state.lock().unwrap();
            state.challenges.insert(id, message.clone());
            state.current.as_ref().map(|(_, channel)| channel.clone())
        };
        let challenge = Challenge {
            id,
            link: self.clone(),
        };
        if let Err(e) = self.store.write_challenge(id, &message) {
            warn!("cannot keep challenge {id} for a rerun's helper: {e}");
        }
        send_on(channel, &message).await;
        match tokio::time::timeout(wait, is_ready).await {
            Ok(Ok(())) => Ok(challenge),
            _ => Err(format!(
                "the worker did not set up the challenge within {wait:?}"
            )),
        }
    }

    /// Has the worker answer challenge `id` of the other helper of a rerun (kept in the
    /// store), unless it already does: that helper's worker no longer takes connections.
    pub async fn answer_for_other(
        self: &Arc<Self>,
        id: u64,
        message: AcmeToWorker,
    ) -> Option<Challenge> {
        let channel = {
            let mut state = self.state.lock().unwrap();
            if state.challenges.contains_key(&id) {
                return None;
            }
            state.challenges.insert(id, message.clone());
            state.current.as_ref().map(|(_, channel)| channel.clone())
        };
        send_on(channel, &message).await;
        Some(Challenge {
            id,
            link: self.clone(),
        })
    }

    /// Whether challenge `id` is being answered (ours, or the other helper's).
    pub fn answers(&self, id: u64) -> bool {
        self.state.lock().unwrap().challenges.contains_key(&id)
    }
}

/// The worker of now, and the challenges it is to answer.
#[derive(Default)]
struct State {
    current: Option<(u64, Arc<WorkerChannel>)>,
    /// Challenges being answered, by id: sent again to a new worker.
    challenges: HashMap<u64, AcmeToWorker>,
}

async fn send_on(channel: Option<Arc<WorkerChannel>>, message: &AcmeToWorker) {
    match channel {
        Some(channel) => {
            if let Err(e) = channel.send(message, &[]).await {
                debug!("cannot send to the worker: {e}");
            }
        }
        None => debug!("no worker to tell"),
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
        self.link.state.lock().unwrap().challenges.remove(&self.id);
        if let Err(e) = self.link.store.remove_challenge(self.id) {
            warn!("{e}");
        }
        let link = self.link.clone();
        let id = self.id;
        tokio::spawn(async move { link.send(&AcmeToWorker::ChallengeDone { id }).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::channel::socketpair_fds;

    type Worker = Channel<WorkerToAcme, AcmeToWorker>;

    /// A link keeping its challenges in a store in `dir`.
    fn link(requests: mpsc::UnboundedSender<Request>, dir: &tempfile::TempDir) -> Arc<WorkerLink> {
        let store = Store::open(std::fs::File::open(dir.path()).unwrap().into()).unwrap();
        WorkerLink::new(requests, Arc::new(store)).unwrap()
    }

    fn worker(link: &Arc<WorkerLink>) -> Worker {
        let (ours, theirs) = socketpair_fds().unwrap();
        link.replace(ours);
        Worker::new(theirs).unwrap()
    }

    async fn next(worker: &Worker) -> AcmeToWorker {
        let message = tokio::time::timeout(Duration::from_secs(5), worker.recv());
        message.await.unwrap().unwrap().unwrap().0
    }

    fn http(id: u64) -> AcmeToWorker {
        AcmeToWorker::HttpChallenge {
            id,
            name: Domain::parse("c.example").unwrap(),
            token: "t".into(),
            key_authorization: "t.k".into(),
        }
    }

    #[tokio::test]
    async fn requests_come_in_and_challenges_follow_a_new_worker_until_done() {
        let (requests, mut incoming) = mpsc::unbounded_channel();
        let dir = tempfile::tempdir().unwrap();
        let link = link(requests, &dir);
        let first = worker(&link);
        let name = Domain::parse("c.example").unwrap();
        first
            .send(&WorkerToAcme::Certificate { name: name.clone() }, &[])
            .await
            .unwrap();
        assert!(matches!(incoming.recv().await, Some(Request::Certificate(n)) if n == name));
        // The routed set, in chunks: one request when it ends.
        let other = Domain::parse("d.example").unwrap();
        for chunk in [vec![name.clone()], vec![other.clone()]] {
            first.send(&WorkerToAcme::Routed(chunk), &[]).await.unwrap();
        }
        first.send(&WorkerToAcme::RoutedEnd, &[]).await.unwrap();
        let expected = HashSet::from([name.clone(), other]);
        assert!(matches!(incoming.recv().await, Some(Request::Routed(set)) if set == expected));

        let pending = tokio::spawn({
            let link = link.clone();
            async move { link.challenge(http, Duration::from_secs(5)).await }
        });
        let AcmeToWorker::HttpChallenge { id, .. } = next(&first).await else {
            panic!("not the challenge");
        };
        first
            .send(&WorkerToAcme::ChallengeReady { id }, &[])
            .await
            .unwrap();
        let challenge = pending.await.unwrap().unwrap();
        // Kept in the store while answered, for a rerun's other helper.
        assert_eq!(link.store.challenges().unwrap(), [(id, http(id))]);

        // A restarted worker is told the challenge again, and when it is over.
        let second = worker(&link);
        assert_eq!(next(&second).await, http(id));
        drop(challenge);
        assert_eq!(next(&second).await, AcmeToWorker::ChallengeDone { id });
        assert_eq!(link.store.challenges().unwrap(), []);
    }

    #[tokio::test]
    async fn the_other_helpers_challenge_is_answered_once_until_dropped() {
        let (requests, _incoming) = mpsc::unbounded_channel();
        let dir = tempfile::tempdir().unwrap();
        let link = link(requests, &dir);
        let worker = worker(&link);
        let theirs = link.answer_for_other(7, http(7)).await.unwrap();
        assert_eq!(next(&worker).await, http(7));
        assert!(link.answers(7));
        assert!(link.answer_for_other(7, http(7)).await.is_none());
        drop(theirs);
        assert_eq!(next(&worker).await, AcmeToWorker::ChallengeDone { id: 7 });
        assert!(!link.answers(7));
    }

    #[tokio::test]
    async fn a_challenge_not_set_up_in_time_is_an_error_and_over() {
        let (requests, _incoming) = mpsc::unbounded_channel();
        let dir = tempfile::tempdir().unwrap();
        let link = link(requests, &dir);
        let worker = worker(&link);
        let result = link.challenge(http, Duration::from_millis(50)).await;
        assert!(result.is_err());
        let AcmeToWorker::HttpChallenge { id, .. } = next(&worker).await else {
            panic!("not the challenge");
        };
        assert_eq!(next(&worker).await, AcmeToWorker::ChallengeDone { id });
        assert!(link.state.lock().unwrap().challenges.is_empty());
        assert_eq!(link.store.challenges().unwrap(), []);
    }
}
