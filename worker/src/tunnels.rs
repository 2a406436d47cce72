//! The tunnel registry: every agent connection, by domain, and the choice of one for a request.
//!
//! An agent connection joins once its control stream's hello has arrived (see
//! `tunnel_connection`), and leaves when it closes, when its agent announces it is draining,
//! or when its domain's tunnel route is revoked, replaced or removed. A request goes to the
//! live connection of its domain with the fewest requests in flight; with none, it waits (up
//! to `--tunnel-wait`) for one to (re)connect.
//!
//! Leaving comes in two strengths. A connection that leaves softly (its agent drains, this
//! worker stops, its domain's tunnel route is replaced by a port or removed, or the new
//! connection its agent was asked for comes, as it nears the end of its HTTP/2 stream ids)
//! takes no new request and closes once the requests it carries are done: the registry drops its
//! `SendRequest`, the leases still out hold the only others, and hyper ends the connection when
//! the last is gone and its streams have finished. When a domain's tokens are revoked, every
//! connection of it is killed at once, whether still waiting for its hello, live, or finishing
//! after leaving softly: each one's kill token is a child of its domain's, which the closure
//! cancels; every task of the connection runs inside the connection's own task (see
//! `local_tasks`), which then drops them all. (A connection still waiting for its hello when
//! its route goes is refused when it would join: see [`Reservation::join`].)

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use core_server_proto::domain::Domain;
use core_server_proto::ipc::MAX_CONNECTIONS_SHOWN;
use core_server_proto::routes::Target;
use core_server_proto::tunnel::{AgentConnection, TokenHash, TunnelStatus, RECONNECT};
use http_body_util::combinators::BoxBody;
use http_body_util::Either;
use hyper::client::conn::http2::SendRequest;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

use crate::request_body::RequestBody;
use crate::route_table::{RouteTable, TunnelClosure};

/// What the worker sends on a reversed connection: a client's request body, or one of its own
/// (the control stream's lines; nothing, for a WebSocket's extended CONNECT).
pub type TunnelBody = Either<RequestBody, BoxBody<Bytes, Infallible>>;

/// The streams after which an agent connection is replaced. HTTP/2 numbers a client's streams
/// with odd ids below 2^31, [`STREAM_IDS`] in all, and h2 fails every request past them while
/// the agent sees nothing wrong: about 60 hours at 10,000 requests/s on two connections. The
/// million to spare is ample time for the agent to dial a replacement, which takes the old
/// connection's place (see [`Reservation::join`]).
const STREAMS_PER_CONNECTION: u64 = STREAM_IDS - (1 << 20);
/// All the streams a connection can open: past them it leaves the balancer, replaced or not.
const STREAM_IDS: u64 = 1 << 30;

/// The most agent connections one domain may have (say 16 machines with 4 each).
pub const MAX_PER_DOMAIN: usize = 64;
/// The most agent connections of all domains together (which bounds the memory they may hold:
/// see `tunnel_connection`'s windows).
pub const MAX_IN_ALL: usize = 256;

/// Every agent connection, by domain.
pub struct Tunnels {
    wait: Duration,
    routes: Arc<RouteTable>,
    state: Mutex<State>,
    /// Notified whenever a connection joins, and when a domain is closed (so that waiting
    /// picks see a revocation at once).
    changed: Notify,
    stopping: CancellationToken,
    /// Every task of every tunnel, so a stopping worker can wait for them.
    tasks: TaskTracker,
    next_id: AtomicU64,
    /// [`STREAMS_PER_CONNECTION`] (fewer in tests).
    streams_per_connection: u64,
}

#[derive(Default)]
struct State {
    domains: HashMap<Domain, DomainTunnels>,
    /// Connections reserved in all domains (being set up, live, or finishing).
    total: usize,
}

#[derive(Default)]
struct DomainTunnels {
    /// The connections that take requests.
    live: Vec<Arc<AgentConn>>,
    /// The parent of the kill token of every connection reserved since the domain was last
    /// closed; replaced by a fresh one at each closure.
    closed: CancellationToken,
    /// Connections reserved (being set up, live, or finishing).
    reserved: usize,
    /// Where the next pick starts looking, so that ties rotate.
    next: usize,
}

/// One live agent connection, as the registry and the leases know it.
struct AgentConn {
    id: u64,
    label: String,
    address: SocketAddr,
    since: u64,
    send: SendRequest<TunnelBody>,
    extended_connect: bool,
    in_flight: AtomicU32,
    served: AtomicU64,
    /// Streams picked for it, its control stream included (a lease carries one request).
    opened: AtomicU64,
    /// Its agent was asked for a replacement (near the end of its stream ids): picked last,
    /// and out of the balancer once the replacement joins.
    replacing: AtomicBool,
    /// Handed a request back unsent: it is closing, pick it no more.
    retired: AtomicBool,
    /// The worker's end of the control stream, until the connection leaves the balancer.
    control: Mutex<Option<http_body_util::channel::Sender<Bytes>>>,
    leave: CancellationToken,
}

impl DomainTunnels {
    /// Takes the live connections out of the balancer, each to close once its requests are
    /// done; how many there were.
    fn leave_softly(&mut self) -> usize {
        let live = self.live.len();
        for conn in self.live.drain(..) {
            conn.end_control();
            conn.leave.cancel();
        }
        live
    }
}

impl AgentConn {
    /// Asks the agent to dial another connection now (it goes on serving this one meanwhile).
    fn ask_to_reconnect(&self) {
        if let Some(control) = &mut *self.control.lock().unwrap_or_else(|e| e.into_inner()) {
            // A full channel already holds a line the agent has not read: nothing to add.
            let _ = control.try_send(hyper::body::Frame::data(Bytes::from_static(RECONNECT)));
        }
    }

    /// Ends the control stream's request body: the agent then knows it gets no new request
    /// (the connection may still be finishing some).
    fn end_control(&self) {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("this domain has {MAX_PER_DOMAIN} agent connections already, the most it may have")]
    DomainFull,
    #[error("this worker has {MAX_IN_ALL} agent connections already, the most it takes")]
    Full,
    #[error("this worker is stopping")]
    Stopping,
    #[error("the agent's token was revoked, or its tunnel removed, meanwhile")]
    Closed,
}

impl Tunnels {
    /// `routes` tells which domains are tunnels and which tokens may connect to them.
    pub fn new(wait: Duration, routes: Arc<RouteTable>) -> Self {
        Tunnels {
            wait,
            routes,
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            stopping: CancellationToken::new(),
            tasks: TaskTracker::new(),
            next_id: AtomicU64::new(1),
            streams_per_connection: STREAMS_PER_CONNECTION,
        }
    }

    /// The same, replacing connections after `streams` streams.
    #[cfg(test)]
    pub fn with_streams_per_connection(mut self, streams: u64) -> Self {
        self.streams_per_connection = streams;
        self
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `domain`'s tokens were revoked (`tunnel revoke`: its route is a tunnel with
    /// none), which closed its connections at once. A UDP `add` or `remove` takes its tokens
    /// too, but lets its connections finish.
    pub fn revoked(&self, domain: &Domain) -> bool {
        self.routes.target(domain) == Some(Target::Tunnel) && !self.routes.has_tokens(domain)
    }

    /// A connection of `domain`'s agents to send one request on: the live one with the fewest
    /// requests in flight. With none connected, waits up to `--tunnel-wait` for one (not if the
    /// domain has no token, or the worker is stopping).
    pub async fn pick(&self, domain: &Domain) -> Result<Lease, NoAgent> {
        if let Some(lease) = self.try_pick(domain) {
            return Ok(lease);
        }
        let deadline = Instant::now() + self.wait;
        loop {
            // Registered before looking, so that a connection joining in between wakes us.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(lease) = self.try_pick(domain) {
                return Ok(lease);
            }
            if !self.routes.has_tokens(domain) {
                return Err(NoAgent::Revoked);
            }
            if self.stopping.is_cancelled() {
                return Err(NoAgent::Stopping);
            }
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => return Err(NoAgent::Timeout(self.wait)),
                () = self.stopping.cancelled() => return Err(NoAgent::Stopping),
            }
        }
    }

    fn try_pick(&self, domain: &Domain) -> Option<Lease> {
        let mut state = self.state();
        let tunnels = state.domains.get_mut(domain)?;
        let count = tunnels.live.len();
        let start = tunnels.next;
        tunnels.next = tunnels.next.wrapping_add(1);
        let best = (0..count)
            .map(|i| &tunnels.live[(start + i) % count])
            .filter(|conn| !conn.retired.load(Ordering::Relaxed) && !conn.send.is_closed())
            .min_by_key(|conn| {
                let replacing = conn.replacing.load(Ordering::Relaxed);
                (replacing, conn.in_flight.load(Ordering::Relaxed))
            })?
            .clone();
        // Counted under the lock, so that concurrent picks see it.
        best.in_flight.fetch_add(1, Ordering::Relaxed);
        let opened = best.opened.fetch_add(1, Ordering::Relaxed) + 1;
        if opened >= STREAM_IDS {
            // No replacement came in time: out, before h2 fails its requests.
            tunnels.live.retain(|conn| conn.id != best.id);
            best.end_control();
            best.leave.cancel();
        } else if opened >= self.streams_per_connection
            && !best.replacing.swap(true, Ordering::Relaxed)
        {
            // Replaced as a rerun replaces them all: the agent dials another.
            best.ask_to_reconnect();
            info!(
                "{domain}: agent {:?} at {} was asked for a new connection: this one has opened {opened} streams, near HTTP/2's limit",
                best.label, best.address
            );
        }
        Some(Lease { conn: best })
    }

    /// Holds a place for a new connection of `domain`, admitted with `token`, within the
    /// limits, until the reservation is dropped (when the connection has closed).
    pub fn reserve(
        self: &Arc<Self>,
        domain: &Domain,
        token: TokenHash,
    ) -> Result<Reservation, Refusal> {
        if self.stopping.is_cancelled() {
            return Err(Refusal::Stopping);
        }
        let mut state = self.state();
        if state.total >= MAX_IN_ALL {
            return Err(Refusal::Full);
        }
        let tunnels = state.domains.entry(domain.clone()).or_default();
        if tunnels.reserved >= MAX_PER_DOMAIN {
            return Err(Refusal::DomainFull);
        }
        tunnels.reserved += 1;
        let kill = tunnels.closed.child_token();
        state.total += 1;
        Ok(Reservation {
            tunnels: self.clone(),
            domain: domain.clone(),
            token,
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            kill,
            leave: CancellationToken::new(),
        })
    }

    /// Asks every agent to dial a replacement now (the next worker's), and refuses new
    /// tunnels and waits: this worker is stopping. Its connections keep serving until
    /// [`Tunnels::close_all`].
    pub fn ask_to_reconnect(&self) {
        self.stopping.cancel();
        let state = self.state();
        for conn in state.domains.values().flat_map(|d| &d.live) {
            conn.ask_to_reconnect();
        }
    }

    /// Takes every connection out of the balancer; each closes once its requests are done.
    pub fn close_all(&self) {
        self.stopping.cancel();
        let mut state = self.state();
        for tunnels in state.domains.values_mut() {
            tunnels.leave_softly();
        }
    }

    /// Resolves once every tunnel task has ended (after [`Tunnels::close_all`]).
    pub async fn closed(&self) {
        self.tasks.close();
        self.tasks.wait().await
    }

    /// Runs `tunnel` as a tracked task: a stopping worker waits for it.
    pub fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(tunnel);
    }

    /// How many tunnel tasks are running.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Closes a domain's connections as `closure` says: revoked, at once, whatever their
    /// state; replaced by a port or removed, softly.
    pub fn close_domain(&self, closure: &TunnelClosure) {
        let (domain, at_once) = match closure {
            TunnelClosure::Revoked(domain) => (domain, true),
            TunnelClosure::Rerouted(domain) => (domain, false),
        };
        let closed = match self.state().domains.get_mut(domain) {
            Some(tunnels) if at_once => {
                tunnels.live.clear();
                std::mem::take(&mut tunnels.closed).cancel();
                tunnels.reserved
            }
            Some(tunnels) => tunnels.leave_softly(),
            None => 0,
        };
        if closed > 0 && at_once {
            info!("{domain}: closed its {closed} agent connection(s): the tunnel was revoked");
        } else if closed > 0 {
            info!(
                "{domain}: its {closed} agent connection(s) take no new request and close once \
                 theirs are done: the tunnel was replaced by a port, or removed"
            );
        }
        self.changed.notify_waiters();
    }

    /// Closes the connections of every domain announced on `closures` (see
    /// `RouteTable::tunnel_closures`), until it ends.
    pub async fn follow_closures(
        self: Arc<Self>,
        mut closures: mpsc::UnboundedReceiver<TunnelClosure>,
    ) {
        while let Some(closure) = closures.recv().await {
            self.close_domain(&closure);
        }
    }

    /// The tunnel domains and their connections, for `status`.
    pub fn snapshot(&self) -> Vec<TunnelStatus> {
        let routes = self.routes.tunnels();
        let state = self.state();
        routes
            .into_iter()
            .map(|(domain, tokens)| {
                let live = state.domains.get(&domain).map_or(&[][..], |d| &d.live[..]);
                TunnelStatus {
                    name: domain.to_string(),
                    tokens: tokens as u32,
                    connections: (live.iter().take(MAX_CONNECTIONS_SHOWN))
                        .map(|conn| AgentConnection {
                            label: conn.label.clone(),
                            address: conn.address.to_string(),
                            since: conn.since,
                            in_flight: conn.in_flight.load(Ordering::Relaxed),
                            served: conn.served.load(Ordering::Relaxed),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Takes the connection `id` of `domain` out of the balancer, if it is still in it.
    fn remove(&self, domain: &Domain, id: u64) -> Option<Arc<AgentConn>> {
        let mut state = self.state();
        let live = &mut state.domains.get_mut(domain)?.live;
        let at = live.iter().position(|conn| conn.id == id)?;
        Some(live.swap_remove(at))
    }
}

/// A place held for one agent connection (see [`Tunnels::reserve`]); the connection's life.
pub struct Reservation {
    tunnels: Arc<Tunnels>,
    domain: Domain,
    /// The token the agent was admitted with: it must still be allowed when the agent joins.
    token: TokenHash,
    id: u64,
    kill: CancellationToken,
    leave: CancellationToken,
}

/// What the registry needs to know of a connection to put it in the balancer.
pub struct Joining {
    pub label: String,
    pub address: SocketAddr,
    pub send: SendRequest<TunnelBody>,
    /// Whether the agent's SETTINGS enabled RFC 8441's extended CONNECT.
    pub extended_connect: bool,
    pub control: http_body_util::channel::Sender<Bytes>,
}

impl Reservation {
    pub fn domain(&self) -> &Domain {
        &self.domain
    }

    /// Resolves when the connection must leave softly (see the module's comment).
    pub async fn leave(&self) {
        self.leave.cancelled().await
    }

    /// Resolves when the connection must close at once.
    pub async fn killed(&self) {
        self.kill.cancelled().await
    }

    /// Puts the connection in the balancer. Refused if its token was revoked meanwhile (even
    /// if others were allowed since).
    pub fn join(&self, joining: Joining) -> Result<(), Refusal> {
        let tunnels = &self.tunnels;
        {
            let mut state = tunnels.state();
            // Checked under the registry's lock: a closure applied after this check is
            // announced after it too, and then finds the connection to close.
            if !tunnels.routes.still_admits(&self.domain, &self.token) {
                return Err(Refusal::Closed);
            }
            if tunnels.stopping.is_cancelled() {
                return Err(Refusal::Stopping);
            }
            let since = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let conn = Arc::new(AgentConn {
                id: self.id,
                label: joining.label,
                address: joining.address,
                since,
                send: joining.send,
                extended_connect: joining.extended_connect,
                in_flight: AtomicU32::new(0),
                served: AtomicU64::new(0),
                opened: AtomicU64::new(1),
                replacing: AtomicBool::new(false),
                retired: AtomicBool::new(false),
                control: Mutex::new(Some(joining.control)),
                leave: self.leave.clone(),
            });
            let domain = state.domains.entry(self.domain.clone()).or_default();
            // The replacement its agent was asked for takes a connection's place: the agent
            // has read the line, so the control stream may end.
            let replaced = domain
                .live
                .iter()
                .position(|old| old.replacing.load(Ordering::Relaxed) && old.label == conn.label);
            if let Some(replaced) = replaced {
                let old = domain.live.remove(replaced);
                old.end_control();
                old.leave.cancel();
            }
            domain.live.push(conn);
        }
        tunnels.changed.notify_waiters();
        Ok(())
    }

    /// Takes the connection out of the balancer (if it still is) and ends its control
    /// stream's request body.
    pub fn remove(&self) {
        if let Some(conn) = self.tunnels.remove(&self.domain, self.id) {
            conn.end_control();
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.remove();
        let mut state = self.tunnels.state();
        state.total -= 1;
        if let Some(tunnels) = state.domains.get_mut(&self.domain) {
            tunnels.reserved -= 1;
            if tunnels.reserved == 0 {
                state.domains.remove(&self.domain);
            }
        }
    }
}

/// One request's claim on an agent connection: counted in flight (for the balancing, and in
/// `status`) until dropped; counted as served once the agent answered it ([`Lease::answered`]:
/// a request that timed out, failed or was given up on was not). Keep it until the response
/// body has ended.
pub struct Lease {
    conn: Arc<AgentConn>,
}

impl Lease {
    /// The connection's HTTP/2 request handle.
    pub fn sender(&self) -> SendRequest<TunnelBody> {
        self.conn.send.clone()
    }

    /// Whether the agent enabled RFC 8441's extended CONNECT (for WebSockets) in its SETTINGS.
    pub fn extended_connect(&self) -> bool {
        self.conn.extended_connect
    }

    /// The connection handed a request back unsent (it is closing): pick no more for it.
    pub fn retire(&self) {
        self.conn.retired.store(true, Ordering::Relaxed);
    }

    /// The agent answered the request (its response head came).
    pub fn answered(&self) {
        self.conn.served.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no agent connection could be had.
#[derive(Debug)]
pub enum NoAgent {
    /// The domain's tokens were revoked: no agent may connect.
    Revoked,
    /// None connected within the wait.
    Timeout(Duration),
    /// The worker is stopping (its agents were asked to reconnect to the next one).
    Stopping,
}

impl fmt::Display for NoAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoAgent::Revoked => {
                f.write_str("the tunnel's tokens were revoked; no agent may connect")
            }
            NoAgent::Timeout(wait) => write!(f, "no agent connected within {wait:?}"),
            NoAgent::Stopping => f.write_str("this worker is stopping"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::routes::Routes;

    #[tokio::test]
    async fn tunnels_are_limited_per_domain_and_in_all_and_refused_once_stopping() {
        let (ours, _theirs) = socketpair_fds().unwrap();
        let routes = RouteTable::new(Routes::default(), Arc::new(Channel::new(ours).unwrap()));
        let tunnels = Arc::new(Tunnels::new(Duration::from_secs(1), Arc::new(routes)));
        let domain = |i: usize| Domain::parse(&format!("d{i}.example")).unwrap();
        let token = TokenHash([7; 32]);
        let mut held = Vec::new();
        for _ in 0..MAX_PER_DOMAIN {
            held.push(tunnels.reserve(&domain(0), token).unwrap());
        }
        assert!(matches!(
            tunnels.reserve(&domain(0), token),
            Err(Refusal::DomainFull)
        ));
        held.pop();
        held.push(tunnels.reserve(&domain(0), token).unwrap());
        for i in 1..MAX_IN_ALL / MAX_PER_DOMAIN {
            for _ in 0..MAX_PER_DOMAIN {
                held.push(tunnels.reserve(&domain(i), token).unwrap());
            }
        }
        assert!(matches!(
            tunnels.reserve(&domain(999), token),
            Err(Refusal::Full)
        ));
        held.clear();
        assert!(tunnels.state().domains.is_empty());
        let _one = tunnels.reserve(&domain(999), token).unwrap();
        tunnels.ask_to_reconnect();
        assert!(matches!(
            tunnels.reserve(&domain(1), token),
            Err(Refusal::Stopping)
        ));
    }
}
