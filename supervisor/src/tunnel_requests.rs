//! Control requests that wait for the worker: `tunnel allow|revoke` (the worker applies the
//! change like a UDP command and answers `TunnelDone` once it is saved) and `status` with
//! tunnel routes (the worker reports its agents with `Tunnels`).
//!
//! Each request gets an id and waits here with its control connection, never in the main loop:
//! it is answered when the worker's answer arrives, when its deadline passes, or when the
//! worker goes (whichever is first). A `status` is answered in any case, without the agents if
//! need be; a change the worker did not confirm is refused with what to check.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use core_server_proto::domain::Domain;
use core_server_proto::ipc::{
    ControlReply, ControlRequest, ToWorker, MAX_CONNECTIONS_SHOWN, TUNNEL_STATUSES_PER_MESSAGE,
};
use core_server_proto::routes::{Route, RouteChange, Routes};
use core_server_proto::tunnel::TunnelStatus;
use tokio::time::Instant;

use crate::control::{reply, send_replies, ServerEnd};

/// How long the worker has to apply and save a tunnel change.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the worker has to report its agents; `status` then shows none.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

const UNANSWERED: &str = "the worker did not answer in time; the change may still apply: \
                          check `core-server status`";
const WORKER_RESTARTED: &str = "the worker restarted; retry";

/// The requests waiting for the worker.
#[derive(Default)]
pub struct TunnelRequests {
    last_id: u64,
    pending: HashMap<u64, Pending>,
    /// The latest `allow` changes sent to the worker and not yet reported back (even once
    /// their request has been answered "may still apply"): the only tokens the worker may
    /// report as allowed.
    allows: VecDeque<RouteChange>,
}

/// How many sent `allow` changes are remembered for [`TunnelRequests::take_asked`].
const ALLOWS_REMEMBERED: usize = 64;

struct Pending {
    connection: ServerEnd,
    deadline: Instant,
    what: Waiting,
}

enum Waiting {
    /// `allow`: the change asked for, and the port route it replaces, if any, to say so.
    Allow {
        change: RouteChange,
        replaced: Option<u16>,
    },
    Revoke {
        domain: Domain,
    },
    /// `status`: its replies up to `TunnelsEnd`, each tunnel domain with its token count, and
    /// the worker's report so far.
    Status {
        replies: Vec<ControlReply>,
        tunnels: Vec<(String, u32)>,
        report: Vec<TunnelStatus>,
    },
}

impl TunnelRequests {
    /// Takes in `tunnel allow|revoke`: the message for the worker, or `None` if the request
    /// is already answered (refused).
    pub fn change(
        &mut self,
        request: ControlRequest,
        routes: &Routes,
        connection: ServerEnd,
    ) -> Option<ToWorker> {
        let (name, token) = match request {
            ControlRequest::TunnelAllow { name, token } => (name, Some(token)),
            ControlRequest::TunnelRevoke { name } => (name, None),
            other => {
                let why = format!("unexpected request {other:?}");
                send_replies(connection, vec![ControlReply::Refused(why)]);
                return None;
            }
        };
        let domain = match Domain::parse(&name) {
            Ok(domain) => domain,
            Err(why) => {
                let why = format!("'{name}' cannot be a tunnel: {why}");
                send_replies(connection, vec![ControlReply::Refused(why)]);
                return None;
            }
        };
        let (change, what) = match token {
            Some(token) => {
                let replaced = match routes.get(&domain) {
                    Some(Route::Port(port)) => Some(*port),
                    _ => None,
                };
                let change = RouteChange::AllowTunnel { domain, token };
                let what = Waiting::Allow {
                    change: change.clone(),
                    replaced,
                };
                (change, what)
            }
            None => (
                RouteChange::RevokeTunnel {
                    domain: domain.clone(),
                },
                Waiting::Revoke { domain },
            ),
        };
        if let RouteChange::AllowTunnel { .. } = change {
            if self.allows.len() == ALLOWS_REMEMBERED {
                self.allows.pop_front();
            }
            self.allows.push_back(change.clone());
        }
        let id = self.wait(connection, CHANGE_TIMEOUT, what);
        Some(ToWorker::Tunnel { id, change })
    }

    /// Takes in `status` while there are tunnel routes: `replies` up to `TunnelsEnd` (see
    /// `supervise::tunnel_replies`); the agents are asked of the worker with the message
    /// returned.
    pub fn status(
        &mut self,
        replies: Vec<ControlReply>,
        routes: &Routes,
        connection: ServerEnd,
    ) -> ToWorker {
        let tunnels = (routes.iter())
            .filter_map(|(domain, route)| match route {
                Route::Tunnel { tokens } => Some((domain.to_string(), tokens.len() as u32)),
                Route::Port(_) => None,
            })
            .collect();
        let what = Waiting::Status {
            replies,
            tunnels,
            report: Vec::new(),
        };
        ToWorker::ReportTunnels {
            id: self.wait(connection, REPORT_TIMEOUT, what),
        }
    }

    fn wait(&mut self, connection: ServerEnd, timeout: Duration, what: Waiting) -> u64 {
        self.last_id += 1;
        let pending = Pending {
            connection,
            deadline: Instant::now() + timeout,
            what,
        };
        self.pending.insert(self.last_id, pending);
        self.last_id
    }

    /// The worker's `TunnelDone`; `routes` (the supervisor's copy) has the change by now.
    pub fn done(&mut self, id: u64, error: Option<String>, routes: &Routes) {
        let Some(pending) = self.pending.remove(&id) else {
            return; // answered already (its deadline passed)
        };
        let reply = match (error, &pending.what) {
            // Not what it asked for (a confused worker): answered as if with no report.
            (_, Waiting::Status { .. }) => return pending.answer(None),
            (Some(error), _) => ControlReply::Refused(error),
            (None, Waiting::Allow { change, replaced }) => {
                ControlReply::Done(allowed(change.domain(), *replaced, routes))
            }
            (None, Waiting::Revoke { domain }) => ControlReply::Done(format!(
                "revoked every token of {domain}; its agents are disconnected"
            )),
        };
        send_replies(pending.connection, vec![reply]);
    }

    /// Whether `change`, an `AllowTunnel` the worker reports, is one an operator asked for
    /// (even if the answer went out before the report came): a token the worker made up (a
    /// compromised worker planting one) is not. Each is taken once.
    pub fn take_asked(&mut self, change: &RouteChange) -> bool {
        match self.allows.iter().position(|asked| asked == change) {
            Some(i) => self.allows.remove(i).is_some(),
            None => false,
        }
    }

    /// The worker's `Tunnels`: part of its report, the last part if `last`.
    pub fn report(&mut self, id: u64, chunk: Vec<TunnelStatus>, last: bool) {
        let Some(pending) = self.pending.get_mut(&id) else {
            return;
        };
        if let Waiting::Status {
            tunnels, report, ..
        } = &mut pending.what
        {
            // Kept within what `status` shows (each tunnel route once, its first connections),
            // however much a confused worker sends.
            for mut status in chunk {
                let routed = tunnels.iter().any(|(name, _)| *name == status.name);
                if routed && !report.iter().any(|r| r.name == status.name) {
                    status.connections.truncate(MAX_CONNECTIONS_SHOWN);
                    report.push(status);
                }
            }
        }
        if last {
            if let Some(pending) = self.pending.remove(&id) {
                pending.answer(None);
            }
        }
    }

    /// Answers the requests whose deadline has passed.
    pub fn expire(&mut self) {
        let now = Instant::now();
        let due: Vec<u64> = (self.pending.iter())
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(pending) = self.pending.remove(&id) {
                pending.answer(Some(UNANSWERED));
            }
        }
    }

    /// Waits until [`Self::expire`] has something to do (forever if nothing waits).
    pub async fn next_deadline(&self) {
        match self.pending.values().map(|p| p.deadline).min() {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    }

    /// The worker is gone: nothing it was asked will be answered.
    pub fn worker_gone(&mut self) {
        for (_, pending) in self.pending.drain() {
            pending.answer(Some(WORKER_RESTARTED));
        }
    }

    /// Answers everything still waiting (a change is refused with `why`), without spawning:
    /// for when the supervisor exits.
    pub async fn abandon(&mut self, why: &str) {
        for (_, pending) in self.pending.drain() {
            let (connection, replies) = pending.replies(Some(why));
            reply(connection, replies).await;
        }
    }
}

impl Pending {
    /// Answers without (more from) the worker: a `status` with what it reported, a change
    /// refused with `why`.
    fn answer(self, why: Option<&str>) {
        let (connection, replies) = self.replies(why);
        send_replies(connection, replies);
    }

    fn replies(self, why: Option<&str>) -> (ServerEnd, Vec<ControlReply>) {
        let replies = match self.what {
            Waiting::Status {
                mut replies,
                tunnels,
                mut report,
            } => {
                let statuses: Vec<TunnelStatus> = (tunnels.into_iter())
                    .map(|(name, tokens)| {
                        let connections = (report.iter_mut())
                            .find(|reported| reported.name == name)
                            .map(|reported| std::mem::take(&mut reported.connections))
                            .unwrap_or_default();
                        TunnelStatus {
                            name,
                            tokens,
                            connections,
                        }
                    })
                    .collect();
                replies.extend(
                    (statuses.chunks(TUNNEL_STATUSES_PER_MESSAGE))
                        .map(|chunk| ControlReply::TunnelStatus(chunk.to_vec())),
                );
                replies
            }
            Waiting::Allow { .. } | Waiting::Revoke { .. } => {
                let why = why.unwrap_or(UNANSWERED).to_owned();
                vec![ControlReply::Refused(why)]
            }
        };
        (self.connection, replies)
    }
}

/// What `allow` tells the user once `domain`'s token is saved.
fn allowed(domain: &Domain, replaced: Option<u16>, routes: &Routes) -> String {
    let mut text = match routes.get(domain) {
        Some(Route::Tunnel { tokens }) => {
            let s = if tokens.len() == 1 { "" } else { "s" };
            format!("{domain} is now a tunnel with {} token{s}", tokens.len())
        }
        // A UDP `add` or `remove` came right after.
        _ => format!("{domain} was made a tunnel, but its route has changed since: check `core-server status`"),
    };
    if let Some(port) = replaced {
        text += &format!(" (it replaced the route to 127.0.0.1:{port})");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::tunnel::{AgentConnection, TokenHash};

    /// A control connection: our end, the client's.
    fn connection() -> (ServerEnd, crate::control::ClientEnd) {
        let (ours, theirs) = socketpair_fds().unwrap();
        (Channel::new(ours).unwrap(), Channel::new(theirs).unwrap())
    }

    fn domain() -> Domain {
        Domain::parse("app.example").unwrap()
    }

    async fn answer(client: &crate::control::ClientEnd) -> ControlReply {
        client.recv().await.unwrap().unwrap().0
    }

    #[tokio::test]
    async fn allow_is_answered_from_the_routes_after_the_change() {
        let mut requests = TunnelRequests::default();
        let mut routes: Routes = [(domain(), 5665)].into_iter().collect();
        let (server, client) = connection();
        let token = TokenHash([7; 32]);
        let request = ControlRequest::TunnelAllow {
            name: "App.Example".into(),
            token,
        };
        let Some(ToWorker::Tunnel { id, change }) = requests.change(request, &routes, server)
        else {
            panic!("no message for the worker");
        };
        let expected = RouteChange::AllowTunnel {
            domain: domain(),
            token,
        };
        assert_eq!(change, expected);
        // The worker reports what was asked for, and nothing it made up.
        let made_up = RouteChange::AllowTunnel {
            domain: domain(),
            token: TokenHash([8; 32]),
        };
        assert!(!requests.take_asked(&made_up));
        assert!(requests.take_asked(&change));
        assert!(!requests.take_asked(&change), "taken once");
        routes.apply(&change).unwrap();
        requests.done(id, None, &routes);
        assert_eq!(
            answer(&client).await,
            ControlReply::Done(
                "app.example is now a tunnel with 1 token (it replaced the route to 127.0.0.1:5665)"
                    .into()
            )
        );
        // An answer after the request was answered is dropped.
        requests.done(id, None, &routes);
    }

    #[tokio::test]
    async fn the_workers_error_and_bad_names_are_refusals() {
        let mut requests = TunnelRequests::default();
        let (server, client) = connection();
        let revoke = ControlRequest::TunnelRevoke {
            name: "app.example".into(),
        };
        let Some(ToWorker::Tunnel { id, .. }) = requests.change(revoke, &Routes::default(), server)
        else {
            panic!("no message for the worker");
        };
        requests.done(
            id,
            Some("no route for app.example".into()),
            &Routes::default(),
        );
        assert_eq!(
            answer(&client).await,
            ControlReply::Refused("no route for app.example".into())
        );

        let (server, client) = connection();
        let bad = ControlRequest::TunnelRevoke {
            name: "127.0.0.1".into(),
        };
        assert_eq!(requests.change(bad, &Routes::default(), server), None);
        let ControlReply::Refused(why) = answer(&client).await else {
            panic!("not refused");
        };
        assert!(why.contains("'127.0.0.1' cannot be a tunnel"), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn unanswered_changes_are_refused_after_the_deadline_or_when_the_worker_goes() {
        let mut requests = TunnelRequests::default();
        let (server, client) = connection();
        let revoke = || ControlRequest::TunnelRevoke {
            name: "app.example".into(),
        };
        requests.change(revoke(), &Routes::default(), server);
        requests.expire();
        let early = tokio::time::timeout(Duration::from_millis(1), client.recv());
        assert!(early.await.is_err(), "answered before the deadline");
        requests.next_deadline().await;
        requests.expire();
        assert_eq!(
            answer(&client).await,
            ControlReply::Refused(UNANSWERED.into())
        );

        let (server, client) = connection();
        requests.change(revoke(), &Routes::default(), server);
        requests.worker_gone();
        assert_eq!(
            answer(&client).await,
            ControlReply::Refused(WORKER_RESTARTED.into())
        );
        assert!(requests.pending.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn status_shows_every_tunnel_with_the_agents_the_worker_reports_or_none() {
        let mut routes = Routes::default();
        for name in ["a.example", "b.example"] {
            let domain = Domain::parse(name).unwrap();
            let tokens = vec![TokenHash([1; 32]), TokenHash([2; 32])];
            routes.insert(domain, Route::Tunnel { tokens });
        }
        let agent = AgentConnection {
            label: "laptop/1".into(),
            address: "127.0.0.1:4000".into(),
            since: 1,
            in_flight: 2,
            served: 3,
        };
        let mut requests = TunnelRequests::default();
        let (server, client) = connection();
        let ToWorker::ReportTunnels { id } =
            requests.status(vec![ControlReply::TunnelsEnd], &routes, server)
        else {
            panic!("not a report request");
        };
        let reported = TunnelStatus {
            name: "b.example".into(),
            tokens: 2,
            connections: vec![agent.clone()],
        };
        requests.report(id, vec![reported.clone()], false);
        // What the report may hold is bounded by what status shows, however much is sent: a
        // name reported twice, or not a tunnel route, or too many connections, is dropped.
        let flood = TunnelStatus {
            name: "b.example".into(),
            tokens: 2,
            connections: vec![agent.clone(); MAX_CONNECTIONS_SHOWN + 1],
        };
        let stranger = TunnelStatus {
            name: "c.example".into(),
            ..flood.clone()
        };
        requests.report(id, vec![flood, stranger], false);
        requests.report(id, Vec::new(), true);
        assert_eq!(answer(&client).await, ControlReply::TunnelsEnd);
        let a = TunnelStatus {
            name: "a.example".into(),
            tokens: 2,
            connections: Vec::new(),
        };
        assert_eq!(
            answer(&client).await,
            ControlReply::TunnelStatus(vec![a.clone(), reported])
        );

        // A worker that does not answer: the routes, with no agents.
        let (server, client) = connection();
        requests.status(Vec::new(), &routes, server);
        requests.next_deadline().await;
        requests.expire();
        let b = TunnelStatus {
            name: "b.example".into(),
            ..a.clone()
        };
        assert_eq!(
            answer(&client).await,
            ControlReply::TunnelStatus(vec![a, b])
        );
    }
}
