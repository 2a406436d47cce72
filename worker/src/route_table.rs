//! The live routes table, and the path by which every change reaches the supervisor's disk.
//!
//! A change applies at once (the next request sees it) and is reported to the supervisor with a
//! sequence number. The command's sender is answered `ok` only once the supervisor says every
//! change up to that number is saved, so `ok` means the route survives a restart. Otherwise
//! the reply tells which of two cases it is: the change is known not to be saved (the save
//! failed, or the supervisor never got it), or the supervisor went away before saying, so the
//! change may or may not be on disk (it dies between writing the file and answering); then the
//! reply says so, and that resending is safe: `add` and `remove` are idempotent.
//!
//! A route removed is also announced to whoever watches [`RouteTable::removals`] (the
//! certificates, which stop serving the name's), and a tunnel closed (revoked, replaced by a
//! port, or removed) to whoever watches [`RouteTable::tunnel_closures`] (the tunnel registry,
//! which closes its agents' connections: at once if revoked, else once their requests are
//! done).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use core_server_proto::channel::Channel;
use core_server_proto::command::Reply;
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{FromWorker, ToWorker};
use core_server_proto::routes::{Route, RouteChange, RouteError, Routes, Target};
use core_server_proto::tunnel::{matching_token, TokenHash};
use tokio::sync::{mpsc, watch};

pub type SupervisorChannel = Channel<FromWorker, ToWorker>;

/// A tunnel closed, and how its agents' connections go.
#[derive(Clone, Debug, PartialEq)]
pub enum TunnelClosure {
    /// Its tokens were revoked: its connections close at once, requests in flight cut.
    Revoked(Domain),
    /// Its route was replaced by a port, or removed: its connections take no new request and
    /// close once theirs are done, as the requests to a port route in flight when it changes
    /// finish.
    Rerouted(Domain),
}

pub struct RouteTable {
    routes: RwLock<Routes>,
    supervisor: Arc<SupervisorChannel>,
    last_seq: AtomicU64,
    saved: watch::Sender<Saved>,
    removed: Mutex<Option<mpsc::UnboundedSender<Domain>>>,
    tunnels_closed: Mutex<Option<mpsc::UnboundedSender<TunnelClosure>>>,
    /// Held from applying a change to reporting it, so that changes from the UDP port and from
    /// the supervisor (tunnel allow and revoke) reach the supervisor in the order applied.
    one_at_a_time: tokio::sync::Mutex<()>,
}

/// The supervisor's latest word: what became of every change up to `upto`.
#[derive(Debug, Clone, Default)]
struct Saved {
    upto: u64,
    outcome: Outcome,
}

#[derive(Debug, Clone, Default)]
enum Outcome {
    #[default]
    Saved,
    /// Known not saved: why.
    NotSaved(String),
    /// Perhaps saved, perhaps not: why no one can tell.
    Unknown(String),
}

impl Outcome {
    fn reply(&self) -> Reply {
        match self {
            Outcome::Saved => Reply::Ok,
            Outcome::NotSaved(why) => Reply::Error(format!("route applied but not saved: {why}")),
            Outcome::Unknown(why) => Reply::Error(format!(
                "route applied, but whether it was saved is unknown ({why}); resending it is safe"
            )),
        }
    }
}

impl RouteTable {
    pub fn new(routes: Routes, supervisor: Arc<SupervisorChannel>) -> Self {
        RouteTable {
            routes: RwLock::new(routes),
            supervisor,
            last_seq: AtomicU64::new(0),
            saved: watch::Sender::new(Saved::default()),
            removed: Mutex::new(None),
            tunnels_closed: Mutex::new(None),
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// Where requests for `domain` go; `None`: it is not routed.
    pub fn target(&self, domain: &Domain) -> Option<Target> {
        self.read().target(domain)
    }

    pub fn is_routed(&self, domain: &Domain) -> bool {
        self.read().is_routed(domain)
    }

    /// Whether `domain` is a tunnel that some token may connect to.
    pub fn has_tokens(&self, domain: &Domain) -> bool {
        !self.read().tokens(domain).is_empty()
    }

    /// Which of the tokens that may connect to `domain`'s tunnel `presented` is (compared in
    /// constant time; `None` if none, or if `domain` is no tunnel).
    pub fn admits(&self, domain: &Domain, presented: &str) -> Option<TokenHash> {
        matching_token(self.read().tokens(domain), presented)
    }

    /// Whether the token `token` (one [`RouteTable::admits`] gave) may still connect to
    /// `domain`'s tunnel.
    pub fn still_admits(&self, domain: &Domain, token: &TokenHash) -> bool {
        self.read().tokens(domain).contains(token)
    }

    /// Every tunnel domain, and how many tokens may connect to it.
    pub fn tunnels(&self) -> Vec<(Domain, usize)> {
        (self.read().iter())
            .filter_map(|(domain, route)| match route {
                Route::Tunnel { tokens } => Some((domain.clone(), tokens.len())),
                Route::Port(_) => None,
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Routes> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Every domain routed now.
    pub fn names(&self) -> Vec<Domain> {
        self.read()
            .iter()
            .map(|(domain, _)| domain.clone())
            .collect()
    }

    /// Every domain removed from now on, in order. There is one watcher (the certificates):
    /// a second call panics rather than silently leave the first without removals.
    pub fn removals(&self) -> mpsc::UnboundedReceiver<Domain> {
        let mut watcher = self.removed.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            watcher.is_none(),
            "RouteTable::removals called twice: the table has one watcher of its removals"
        );
        let (removed, removals) = mpsc::unbounded_channel();
        *watcher = Some(removed);
        removals
    }

    /// Every tunnel closed from now on (its tokens revoked, or its route replaced by a port or
    /// removed), in order. There is one watcher (the tunnel registry): a second call panics.
    pub fn tunnel_closures(&self) -> mpsc::UnboundedReceiver<TunnelClosure> {
        let mut watcher = self
            .tunnels_closed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        assert!(
            watcher.is_none(),
            "RouteTable::tunnel_closures called twice: the table has one watcher of them"
        );
        let (closed, closures) = mpsc::unbounded_channel();
        *watcher = Some(closed);
        closures
    }

    /// Applies `change` and reports it. Resolves to the reply for the command's sender once the
    /// change is saved. Changes are made one at a time, so they reach the supervisor in the
    /// order they were applied.
    pub async fn change(
        &self,
        change: RouteChange,
    ) -> Result<impl Future<Output = Reply>, RouteError> {
        let _one_at_a_time = self.one_at_a_time.lock().await;
        let closure = {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            let was_tunnel = matches!(routes.get(change.domain()), Some(Route::Tunnel { .. }));
            routes.apply(&change)?;
            let domain = change.domain().clone();
            match change {
                RouteChange::RevokeTunnel { .. } => Some(TunnelClosure::Revoked(domain)),
                RouteChange::Set { .. } | RouteChange::Remove { .. } if was_tunnel => {
                    Some(TunnelClosure::Rerouted(domain))
                }
                _ => None,
            }
        };
        if let Some(closure) = closure {
            let watcher = self
                .tunnels_closed
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(closed) = &*watcher {
                let _ = closed.send(closure);
            }
        }
        if let RouteChange::Remove { domain } = &change {
            if let Some(removed) = &*self.removed.lock().unwrap_or_else(|e| e.into_inner()) {
                let _ = removed.send(domain.clone());
            }
        }
        let seq = self.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = self
            .supervisor
            .send(&FromWorker::RouteChanged { seq, change }, &[])
            .await;
        let mut saved = self.saved.subscribe();
        Ok(async move {
            // One message on a SOCK_SEQPACKET socket: an error means it was not delivered.
            if let Err(e) = sent {
                let why = format!("cannot reach the supervisor: {e}");
                return Outcome::NotSaved(why).reply();
            }
            match saved.wait_for(|s| s.upto >= seq).await {
                Ok(s) => s.outcome.reply(),
                Err(_) => {
                    Outcome::Unknown("the worker stopped before the supervisor answered".into())
                        .reply()
                }
            }
        })
    }

    /// The supervisor saved every change up to `upto` (or failed to: `error`).
    pub fn saved(&self, upto: u64, error: Option<String>) {
        let outcome = error.map_or(Outcome::Saved, Outcome::NotSaved);
        self.saved.send_replace(Saved { upto, outcome });
    }

    /// The supervisor is gone: whether it saved what it was sent before it went, no one knows.
    pub fn supervisor_gone(&self) {
        self.saved.send_replace(Saved {
            upto: u64::MAX,
            outcome: Outcome::Unknown("the supervisor stopped before saying".into()),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::channel::socketpair_fds;

    /// A table, and the supervisor's end of its channel.
    fn table() -> (RouteTable, Channel<ToWorker, FromWorker>) {
        let (worker, supervisor) = socketpair_fds().unwrap();
        let channel = Arc::new(Channel::new(worker).unwrap());
        (
            RouteTable::new(Routes::default(), channel),
            Channel::new(supervisor).unwrap(),
        )
    }

    fn add() -> RouteChange {
        RouteChange::Set {
            domain: Domain::parse("a.example").unwrap(),
            port: 8080,
        }
    }

    /// Makes the change, lets the supervisor receive it, then `then`; the reply.
    async fn reply_when(then: impl FnOnce(&RouteTable, Channel<ToWorker, FromWorker>)) -> String {
        let (table, supervisor) = table();
        let reply = table.change(add()).await.unwrap();
        let received = supervisor.recv().await.unwrap().unwrap().0;
        assert!(matches!(received, FromWorker::RouteChanged { seq: 1, .. }));
        then(&table, supervisor);
        reply.await.to_string()
    }

    #[tokio::test]
    async fn ok_once_saved() {
        assert_eq!(reply_when(|t, _| t.saved(1, None)).await, "ok");
    }

    #[tokio::test]
    async fn a_failed_save_is_reported_as_not_saved() {
        let reply =
            reply_when(|t, _| t.saved(1, Some("cannot save routes.json: disk full".into()))).await;
        assert_eq!(
            reply,
            "error: route applied but not saved: cannot save routes.json: disk full"
        );
    }

    /// The supervisor may have died after writing the file, before answering.
    #[tokio::test]
    async fn a_supervisor_gone_before_answering_leaves_the_outcome_unknown() {
        let reply = reply_when(|t, supervisor| {
            drop(supervisor);
            t.supervisor_gone();
        })
        .await;
        assert_eq!(
            reply,
            "error: route applied, but whether it was saved is unknown (the supervisor stopped \
             before saying); resending it is safe"
        );
    }

    #[tokio::test]
    async fn revoking_replacing_or_removing_a_tunnel_closes_it_and_nothing_else_does() {
        let (table, _supervisor) = table();
        let mut closures = table.tunnel_closures();
        let domain = Domain::parse("t.example").unwrap();
        let allow = RouteChange::AllowTunnel {
            domain: domain.clone(),
            token: core_server_proto::tunnel::Token::generate().unwrap().hash(),
        };
        let set = RouteChange::Set {
            domain: domain.clone(),
            port: 8080,
        };
        let revoke = RouteChange::RevokeTunnel {
            domain: domain.clone(),
        };
        let remove = RouteChange::Remove {
            domain: domain.clone(),
        };
        let revoked = Some(TunnelClosure::Revoked(domain.clone()));
        let rerouted = Some(TunnelClosure::Rerouted(domain.clone()));
        // (change, how it closes the domain's tunnel, if it does)
        let changes = [
            (set.clone(), None),
            (allow.clone(), None),
            (allow.clone(), None),
            (revoke, revoked),
            (allow.clone(), None),
            (set.clone(), rerouted.clone()),
            (set, None),
            (allow, None),
            (remove.clone(), rerouted),
            (add(), None),
            (remove, None),
        ];
        for (change, closes) in changes {
            let text = format!("{change:?}");
            drop(table.change(change).await);
            assert_eq!(closures.try_recv().ok(), closes, "{text}");
        }
        assert!(table.tunnels().is_empty());
    }

    #[tokio::test]
    async fn a_change_the_supervisor_never_got_is_not_saved() {
        let (table, supervisor) = table();
        drop(supervisor);
        let reply = table.change(add()).await.unwrap().await.to_string();
        assert!(
            reply.starts_with("error: route applied but not saved: cannot reach the supervisor"),
            "{reply}"
        );
    }
}
