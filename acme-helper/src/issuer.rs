//! Answers the worker's requests for certificates: from the store at once when it holds a
//! current one, else by one attempt per name at a time (mkcert in local mode, an ACME order
//! in release mode) that later requests for the name join; and runs the renewals.
//!
//! An attempt takes the store's lock, then looks again (a rerun's other helper may have just
//! stored one), and does not start while the name backs off: such a request gets
//! `Unavailable` at once, with no traffic to the CA. A new certificate goes to the worker
//! first and to the disk right after, and each change of a name is reported to the
//! supervisor as its `Status`.
//!
//! In a rerun, the old helper finishes the attempts under way and starts none
//! ([`Issuer::finish`]), while the new one has its worker, which the CA now reaches, answer
//! their challenges ([`Issuer::answer_for_the_other_helper`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_server_proto::acme_ipc::{AcmeToWorker, Mkcert, Secret};
use core_server_proto::domain::Domain;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::account::AcmeAccount;
use crate::backoff::Backoff;
use crate::certificate::{self, Certificate};
use crate::clock;
use crate::order::Failure;
use crate::store::{LockGuard, NameState, Store};
use crate::supervisor_link::SupervisorLink;
use crate::worker_link::{Request, WorkerLink};
use crate::{mkcert, order};

/// Where certificates come from.
pub enum Source {
    Mkcert(Mkcert),
    /// Local mode without mkcert: HTTP only.
    NoMkcert,
    Acme(AcmeAccount),
}

impl Source {
    /// The source line of its certificates (see `certificate.rs`).
    fn tag(&self) -> String {
        match self {
            Source::Mkcert(mkcert) => mkcert::source(mkcert),
            Source::NoMkcert => "none".into(),
            Source::Acme(account) => format!("acme {}", account.directory()),
        }
    }
}

/// Why there is no HTTPS in local mode without mkcert.
pub const NO_MKCERT: &str =
    "local mode without mkcert: HTTPS is off (install mkcert and restart core-server to serve HTTPS)";

/// The longest an ACME attempt may take (both orders, every poll): past it the attempt
/// fails like any other, and the name backs off.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(180);

/// Why a helper that is stopping does not start an attempt.
const STOPPING: &str = "the ACME helper is stopping (core-server is stopped or replaced)";

/// How often the store is looked at for the challenges of a rerun's other helper.
const OTHER_CHALLENGES_POLL: Duration = Duration::from_millis(10);

pub struct Issuer {
    pub store: Arc<Store>,
    link: Arc<WorkerLink>,
    supervisor: Arc<SupervisorLink>,
    pub source: Source,
    /// Names with an attempt running, and how many requests of the worker wait for it:
    /// each gets its answer.
    in_flight: Mutex<HashMap<Domain, usize>>,
    /// The names the worker routes, as far as it told us: its set at each new link, then
    /// the names it asks for and forgets.
    routed: Mutex<HashSet<Domain>>,
    /// Wakes the renewals when a certificate or a name's state changed.
    pub changed: Notify,
    /// Told to stop: no attempt starts any more.
    stopping: AtomicBool,
    /// Wakes [`Self::finish`] when the last attempt ends.
    idle: Notify,
}

impl Issuer {
    pub fn new(
        store: Arc<Store>,
        link: Arc<WorkerLink>,
        supervisor: Arc<SupervisorLink>,
        source: Source,
    ) -> Arc<Issuer> {
        Arc::new(Issuer {
            store,
            link,
            supervisor,
            source,
            in_flight: Mutex::new(HashMap::new()),
            routed: Mutex::new(HashSet::new()),
            changed: Notify::new(),
            stopping: AtomicBool::new(false),
            idle: Notify::new(),
        })
    }

    /// Stops starting attempts, and returns once those under way have ended: a rerun's old
    /// worker waits for their certificates, and each name's record gets its real outcome
    /// rather than the failure an unfinished order counts as.
    pub async fn finish(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        loop {
            let idle = self.idle.notified();
            if self.in_flight.lock().unwrap().is_empty() {
                return;
            }
            idle.await;
        }
    }

    /// From start until the store's lock is ours: a rerun's other helper may be finishing
    /// orders (holding the lock), whose challenges the CA now validates through our worker,
    /// so it answers those that helper keeps in the store. Then, what that helper stored is
    /// reported: our statuses of its names are from before.
    pub async fn answer_for_the_other_helper(self: Arc<Self>) {
        let acquire = self.store.lock();
        tokio::pin!(acquire);
        let mut answering = HashMap::new();
        let mut waited = false;
        let lock = loop {
            tokio::select! {
                biased;
                lock = &mut acquire => break lock,
                // The other helper holds it: a first look at once, then one per interval.
                _ = std::future::ready(()), if !waited => waited = true,
                _ = tokio::time::sleep(OTHER_CHALLENGES_POLL), if waited => {}
            }
            let stored = match self.store.challenges() {
                Ok(stored) => stored,
                Err(e) => {
                    warn!("cannot read the other helper's challenges: {e}");
                    continue;
                }
            };
            // Those it no longer keeps are over.
            answering.retain(|id, _| stored.iter().any(|(kept, _)| kept == id));
            for (id, challenge) in stored {
                if answering.contains_key(&id) {
                    continue;
                }
                if let Some(answered) = self.link.answer_for_other(id, challenge).await {
                    info!("answering challenge {id} of the other helper's order (a rerun's)");
                    answering.insert(id, answered);
                }
            }
        };
        // Over, and their files (left if that helper died) removed; so are those of helpers
        // killed earlier: under the lock, no other helper orders.
        drop(answering);
        let cleaned = lock.and_then(|_lock| {
            for (id, _) in self.store.challenges()? {
                if !self.link.answers(id) {
                    self.store.remove_challenge(id)?;
                }
            }
            Ok(())
        });
        if let Err(e) = cleaned {
            warn!("cannot clean the challenges up: {e}");
        }
        if waited {
            self.report_all().await;
        }
    }

    /// At start, in the background: the ACME account made ready before the first handshake
    /// asks, then what a kill left in the store removed.
    pub async fn prepare(self: Arc<Self>) {
        if let Source::Acme(account) = &self.source {
            if let Err(e) = account.get(&self.store).await {
                warn!("no ACME account yet (tried again at the first order): {e}");
            }
        }
        let removed = async {
            let lock = self.store.lock().await?;
            self.store.remove_leftovers(&lock)
        };
        match removed.await {
            Ok(removed) if !removed.is_empty() => {
                info!(
                    "removed what a kill left in the store: {}",
                    removed.join(", ")
                )
            }
            Ok(_) => {}
            Err(e) => warn!("cannot clean the store up: {e}"),
        }
    }

    /// Takes the worker's requests in their order (the routed set changes here, at once),
    /// and serves them in the background.
    pub fn handle(self: &Arc<Self>, request: Request) {
        let issuer = self.clone();
        let mut routed = self.routed.lock().unwrap();
        match request {
            Request::Certificate(name) => {
                routed.insert(name.clone());
                tokio::spawn(async move { issuer.serve(name).await })
            }
            Request::Forget(name) => {
                routed.remove(&name);
                tokio::spawn(async move { issuer.forget(name).await })
            }
            Request::Routed(names) => {
                *routed = names;
                tokio::spawn(async move { issuer.follow_routes().await })
            }
        };
    }

    /// Renews only the stored names the worker routes: the others are forgotten (their files
    /// stay for a later `add`), the routed ones remembered.
    async fn follow_routes(&self) {
        let names = match self.store.names() {
            Ok(names) => names,
            Err(e) => return warn!("cannot list the store: {e}"),
        };
        for name in names {
            let routed = self.is_routed(&name);
            self.set_forgotten(&name, !routed).await;
        }
    }

    fn is_routed(&self, name: &Domain) -> bool {
        self.routed.lock().unwrap().contains(name)
    }

    /// The status of every name in the store, for the supervisor at start.
    pub async fn report_all(&self) {
        match self.store.names() {
            Ok(names) => {
                for name in names {
                    self.report(&name).await;
                }
            }
            Err(e) => warn!("cannot list the store: {e}"),
        }
    }

    /// The stored certificate of `name`, if it reads and checks.
    pub fn stored(&self, name: &Domain) -> Option<Certificate> {
        match self.store.read_certificate(name) {
            Ok(Some(pem)) => match Certificate::from_pem(name, &pem) {
                Ok(certificate) => Some(certificate),
                Err(e) => {
                    let file = Store::certificate_path(name);
                    warn!("{name}: {file} in the store is unusable ({e}); a new one is made");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                warn!("{e}");
                None
            }
        }
    }

    /// Whether `certificate` may be served now: current, and from this mode's source.
    pub fn servable(&self, certificate: &Certificate) -> bool {
        certificate.is_current(clock::now()) && certificate.is_from(&self.source.tag())
    }

    async fn serve(&self, name: Domain) {
        if let Some(certificate) = self.stored(&name).filter(|c| self.servable(c)) {
            self.send(&name, &certificate).await;
        } else if let Source::NoMkcert = self.source {
            self.unavailable(&name, NO_MKCERT.into()).await;
            return;
        } else {
            self.attempt(&name, None, true).await;
        }
        // Unless the worker forgot it meanwhile.
        if self.is_routed(&name) {
            self.remember(&name).await;
        }
    }

    /// Renews `old` in the background: handshakes go on with it meanwhile.
    pub async fn renew(&self, name: &Domain, old: &Certificate) {
        self.attempt(name, Some(old), false).await;
    }

    /// One attempt for `name` unless one runs (which then answers this request too);
    /// `asked`: a request of the worker waits for it (a renewal is not asked for).
    async fn attempt(&self, name: &Domain, replacing: Option<&Certificate>, asked: bool) {
        let stopping = {
            let mut in_flight = self.in_flight.lock().unwrap();
            if let Some(waiting) = in_flight.get_mut(name) {
                *waiting += usize::from(asked);
                return;
            }
            let stopping = self.stopping.load(Ordering::Relaxed);
            if !stopping {
                in_flight.insert(name.clone(), usize::from(asked));
            }
            stopping
        };
        if stopping {
            if asked {
                self.unavailable(name, STOPPING.into()).await;
            }
            return;
        }
        let result = self.obtain(name, replacing).await;
        let waiting = {
            let mut in_flight = self.in_flight.lock().unwrap();
            let waiting = in_flight.remove(name).unwrap_or(0);
            if in_flight.is_empty() {
                self.idle.notify_waiters();
            }
            waiting
        };
        match result {
            // The first answer went out as soon as the certificate was there.
            Ok(certificate) => {
                for _ in 1..waiting {
                    self.send(name, &certificate).await;
                }
            }
            Err(reason) => {
                if waiting == 0 {
                    warn!("{name}: renewal failed: {reason}");
                }
                for _ in 0..waiting {
                    self.unavailable(name, reason.clone()).await;
                }
            }
        }
    }

    async fn obtain(
        &self,
        name: &Domain,
        replacing: Option<&Certificate>,
    ) -> Result<Certificate, String> {
        let backing_off = |state: &NameState| {
            state.backoff.waiting_until(clock::now()).map(|until| {
                format!(
                    "backing off after failures until {} (last: {})",
                    clock::show(until),
                    state.backoff.last_error.as_deref().unwrap_or("unknown")
                )
            })
        };
        let state = self.store.read_state(name).map_err(|e| e.to_string())?;
        // An unfinished order may be one the other helper of a rerun is finishing: its lock
        // is released when that order ends (or when it dies: then it failed), and the record
        // read under the lock tells.
        let unfinished = state.backoff.last_error.as_deref() == Some(order::UNFINISHED);
        if let Some(why) = backing_off(&state).filter(|_| !unfinished) {
            return Err(why);
        }
        let lock = self.store.lock().await.map_err(|e| e.to_string())?;
        // The other helper of a rerun may have just stored one, or failed.
        if let Some(certificate) = self
            .stored(name)
            .filter(|c| self.servable(c) && replacing.is_none_or(|old| old.chain[0] != c.chain[0]))
        {
            self.send(name, &certificate).await;
            return Ok(certificate);
        }
        // Told to stop while it waited for the lock: no order starts now (the CA would reach
        // the rerun's worker, whose helper answers our challenges only until it holds the
        // lock).
        if self.stopping.load(Ordering::Relaxed) {
            return Err(STOPPING.into());
        }
        let mut state = self.store.read_state(name).map_err(|e| e.to_string())?;
        if let Some(why) = backing_off(&state) {
            return Err(why);
        }
        self.set_aside_if_unusable(&lock, name);
        let source = self.source.tag();
        let result = match &self.source {
            Source::Mkcert(mkcert) => {
                let result = mkcert::issue(mkcert, &self.store, name).await;
                if let Err(e) = &result {
                    state.backoff.fail(clock::now(), e.clone(), None);
                }
                result
            }
            Source::NoMkcert => Err(NO_MKCERT.into()),
            Source::Acme(account) => {
                let mut store = |backoff: &Backoff| self.record(&lock, name, backoff);
                let attempt = self.order(
                    account,
                    &source,
                    name,
                    replacing,
                    &mut state.backoff,
                    &mut store,
                );
                match tokio::time::timeout(ATTEMPT_DEADLINE, attempt).await {
                    Ok(result) => result,
                    Err(_) => {
                        let e = format!(
                            "network error: the CA did not complete the order within {ATTEMPT_DEADLINE:?}"
                        );
                        state.backoff.fail(clock::now(), e.clone(), None);
                        Err(e)
                    }
                }
            }
        };
        let outcome = match result {
            Ok(certificate) => {
                self.send(name, &certificate).await;
                // The worker serves it either way; unstored, it is ordered again after a
                // restart.
                match self
                    .store
                    .write_certificate(&lock, name, &certificate.to_pem())
                {
                    Ok(()) => info!(
                        "{name}: certificate from {} stored, valid until {}",
                        certificate.issuer,
                        clock::show(certificate.not_after)
                    ),
                    Err(e) => warn!("{name}: cannot store the new certificate: {e}"),
                }
                // The failures of the hour stay counted (a failed TLS-ALPN-01 before a
                // successful HTTP-01 is one of the hour's three).
                state.backoff.last_error = None;
                state.backoff.next_try = None;
                Ok(certificate)
            }
            Err(e) => Err(e),
        };
        self.record(&lock, name, &state.backoff);
        drop(lock);
        self.report(name).await;
        self.changed.notify_one();
        outcome
    }

    /// Stores `backoff` as `name`'s, keeping whether it is forgotten as stored now (the
    /// worker may have forgotten it while the attempt ran).
    fn record(&self, lock: &LockGuard, name: &Domain, backoff: &Backoff) {
        let result = self.store.read_state(name).and_then(|stored| {
            let state = NameState {
                backoff: backoff.clone(),
                forgotten: stored.forgotten,
            };
            self.store.write_state(lock, name, &state)
        });
        if let Err(e) = result {
            warn!("cannot record {name}'s state: {e}");
        }
    }

    /// A stored file that does not read as a certificate for `name` is kept, renamed, for
    /// the operator to look at, rather than silently replaced.
    fn set_aside_if_unusable(&self, lock: &LockGuard, name: &Domain) {
        // One that cannot even be read (another owner's, say) too.
        let e = match self.store.read_certificate(name) {
            Ok(None) => return,
            Ok(Some(pem)) => match Certificate::from_pem(name, &pem) {
                Ok(_) => return,
                Err(e) => e,
            },
            Err(e) => e.to_string(),
        };
        let file = Store::certificate_path(name);
        match self.store.set_aside_certificate(lock, name) {
            Ok(aside) => warn!("{name}: {file} was unusable ({e}); set aside as {aside}"),
            Err(err) => warn!("{name}: {file} is unusable ({e}) and stays: {err}"),
        }
    }

    /// An ACME attempt, with a new account if the CA forgot ours.
    async fn order(
        &self,
        account: &AcmeAccount,
        source: &str,
        name: &Domain,
        replacing: Option<&Certificate>,
        backoff: &mut Backoff,
        store: &mut (dyn FnMut(&Backoff) + Send),
    ) -> Result<Certificate, String> {
        // Only a certificate this CA issued may be named as replaced (RFC 9773): not a
        // mkcert one from before the switch to release mode, nor one of unknown source.
        let replaces = replacing.filter(|old| old.source.as_deref() == Some(source));
        let mut current = account.get(&self.store).await;
        for _ in 0..2 {
            let result = match &current {
                Ok(acme) => {
                    order::obtain(acme, source, name, replaces, &self.link, backoff, store).await
                }
                Err(e) => Err(Failure::Other(e.clone())),
            };
            match result {
                Ok(certificate) => return Ok(certificate),
                Err(Failure::NoAccount) => {
                    warn!("the CA no longer knows our ACME account: making a new one");
                    current = account.replace(&self.store).await;
                }
                Err(Failure::Other(e)) => {
                    if current.is_err() {
                        backoff.fail(clock::now(), e.clone(), None);
                    }
                    return Err(e);
                }
            }
        }
        let e = "the CA does not know the ACME account it just made".to_owned();
        backoff.fail(clock::now(), e.clone(), None);
        Err(e)
    }

    /// The worker no longer routes `name`: no renewals (the files stay).
    async fn forget(&self, name: Domain) {
        // A name the store never held, and none being ordered, leaves no trace; one whose
        // first order runs is forgotten too (that order keeps it so).
        let in_flight = self.in_flight.lock().unwrap().contains_key(&name);
        if !in_flight && matches!(self.store.read_certificate(&name), Ok(None)) {
            return;
        }
        self.set_forgotten(&name, true).await;
    }

    /// The worker routes `name` (again): renewed from now on.
    async fn remember(&self, name: &Domain) {
        self.set_forgotten(name, false).await;
    }

    async fn set_forgotten(&self, name: &Domain, forgotten: bool) {
        let unchanged = |issuer: &Issuer| {
            issuer
                .store
                .read_state(name)
                .map(|s| s.forgotten == forgotten)
        };
        if let Ok(true) = unchanged(self) {
            return;
        }
        let result = async {
            let lock = self.store.lock().await?;
            let mut state = self.store.read_state(name)?;
            state.forgotten = forgotten;
            self.store.write_state(&lock, name, &state)
        };
        match result.await {
            Ok(()) => self.changed.notify_one(),
            Err(e) => warn!(
                "cannot record that {name} is {}: {e}",
                if forgotten { "forgotten" } else { "routed" }
            ),
        }
    }

    async fn send(&self, name: &Domain, certificate: &Certificate) {
        self.link
            .send(&AcmeToWorker::Certificate {
                name: name.clone(),
                chain: certificate.chain.clone(),
                key: Secret(certificate.key.clone()),
            })
            .await;
    }

    async fn unavailable(&self, name: &Domain, reason: String) {
        self.link
            .send(&AcmeToWorker::Unavailable {
                name: name.clone(),
                reason,
            })
            .await;
    }

    /// Sends `name`'s status to the supervisor.
    pub async fn report(&self, name: &Domain) {
        let certificate = self.stored(name);
        let state = self.store.read_state(name).unwrap_or_default();
        let now = clock::now();
        let next_try = state.backoff.waiting_until(now);
        self.supervisor
            .status(certificate::status(
                name,
                certificate.as_ref(),
                state.backoff.last_error,
                next_try,
            ))
            .await;
    }
}
