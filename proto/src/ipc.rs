//! The messages between the supervisor and its children.
//!
//! Small, typed, and few: the supervisor hands over sockets, settings and routes; the worker
//! reports readiness and every route change. Descriptors travel beside a message as
//! `SCM_RIGHTS` (see [`crate::channel`]); the message says what each one is.
//!
//! Postcard encodes an enum variant by its index, and a struct by its fields in order, with no
//! names. The control socket's messages ([`ControlRequest`], [`ControlReply`] and what they
//! carry) pass between versions: a rerun talks to the instance it replaces, `core-server
//! status` to whatever runs. So they only grow at the end: a new variant is appended, never
//! inserted; no variant is removed, reordered or reshaped (an obsolete one stays, documented
//! as such); a struct they carry gets no new field (a new variant carries the new data). A
//! peer then reads every message an older one sends, and fails cleanly, on a variant it does
//! not know, where a newer one sends something new (a takeover is void then, and the running
//! instance keeps serving). `tests` below pins the indices the released versions use.
//!
//! [`ToWorker`] and [`FromWorker`] pass between a supervisor and the worker binary installed
//! next to it, which are of one version, except in one window: once an upgrade has replaced
//! the binaries, and before its rerun, a worker that the old supervisor restarts is the new
//! one, which may not read the old supervisor's messages (it then fails to start, and is
//! retried until the rerun replaces the old instance).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::acme_ipc::{CertificateStatus, HttpsSettings, Secret};
use crate::domain::Domain;
use crate::routes::{Routable, RouteChange};
use crate::tunnel::{TokenHash, TunnelRoute, TunnelStatus};

/// What a listening socket handed to a child is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerKind {
    /// TCP, plain HTTP (port 80).
    Http,
    /// TCP, HTTPS (port 443).
    Https,
    /// UDP, the command port (40608).
    Udp,
}

/// Tunables the supervisor passes on from its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// How long a client may take to send a request's header, counted from the connection's
    /// accept (HTTP/1 and the HTTP/2 preface alike) or the end of the previous HTTP/1 response
    /// (so it also closes idle keep-alive connections).
    pub header_timeout: Duration,
    /// How long a client connection may have no request in flight before it is closed
    /// (gracefully). Mostly for HTTP/2; HTTP/1 idles end at `header_timeout`.
    pub idle_timeout: Duration,
    /// How long a backend may take to connect and answer with a response header (then 504).
    pub backend_timeout: Duration,
    /// The most client connections open at once; `None`: derived from the worker's open-file
    /// limit.
    pub max_connections: Option<u32>,
    pub https: HttpsSettings,
    /// How long a request for a tunnel domain with no agent connected waits for one to
    /// (re)connect before it is answered 503.
    pub tunnel_wait: Duration,
}

/// Supervisor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first message. Descriptor `i` attached to it is a `listeners[i]` socket.
    Start {
        listeners: Vec<ListenerKind>,
        settings: WorkerSettings,
        /// The session-ticket key (see [`crate::acme_ipc::TICKET_KEY_FILE`]), 32 bytes.
        ticket_key: Secret,
    },
    /// Part of the routes table, sent after `Start` and before `Serve`, in chunks of at most
    /// [`ROUTES_PER_MESSAGE`] so each message fits one socket buffer.
    Routes(Vec<(Domain, u16)>),
    /// Every route is sent: start, then answer `Ready`. As the `owner`, serve at once; else (a
    /// taker's worker, before the running instance has handed over) accept no client and read
    /// no UDP command until `Own`: connections and commands wait in the kernel meanwhile.
    Serve { owner: bool },
    /// Every `RouteChanged` up to and including `upto` is saved to disk (or failed to be).
    Saved { upto: u64, error: Option<String> },
    /// Stop accepting; let in-flight requests finish within `grace`; exit.
    Shutdown { grace: Duration },
    /// Stop reading UDP commands (a new instance is taking over); answer `CommandsPaused`
    /// once every change already applied has been reported.
    PauseCommands,
    /// This worker's instance owns the routes (again, after a void takeover, or for the first
    /// time: see `Serve`): accept clients and read UDP commands.
    Own,
    /// Answer `Pong`: a worker that does not, within a deadline, is stopped or stuck and is
    /// replaced.
    Ping,
    /// One descriptor attached: the worker's end of a new channel to the ACME helper
    /// (`Channel<WorkerToAcme, AcmeToWorker>`), replacing any earlier one. Sent after `Start`
    /// and each time the helper is restarted.
    AcmeHelper,
    /// The tunnel routes, sent like `Routes` (chunks of at most [`TUNNELS_PER_MESSAGE`]),
    /// after them and before `Serve`.
    TunnelRoutes(Vec<TunnelRoute>),
    /// `core-server tunnel allow|revoke`: apply `change` (an `AllowTunnel` or `RevokeTunnel`)
    /// like a UDP command; answer `TunnelDone` once it is saved (or failed).
    Tunnel { id: u64, change: RouteChange },
    /// Answer `Tunnels`: the tunnel domains and their agent connections, for `status`.
    ReportTunnels { id: u64 },
}

/// Worker to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// Serving on every listener it was given.
    Ready,
    /// The live table changed; `seq` counts up from 1 for each worker.
    RouteChanged { seq: u64, change: RouteChange },
    /// No longer reading UDP commands; every change made was reported before this.
    CommandsPaused,
    /// The answer to `Ping`.
    Pong,
    /// The answer to `Tunnel`: `None` once the change is applied and saved, else why not.
    TunnelDone { id: u64, error: Option<String> },
    /// The answer to `ReportTunnels`, in chunks of at most [`TUNNEL_STATUSES_PER_MESSAGE`]; `last` on
    /// the final one (which may be empty).
    Tunnels {
        id: u64,
        chunk: Vec<TunnelStatus>,
        last: bool,
    },
}

/// A local client of the running supervisor's control socket: `core-server status|stop`, or a
/// rerun `core-server` taking over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Stop,
    /// Hand over the sockets and routes: answered `Protocol` (since version 2; older instances
    /// answer `Sockets` at once), `Sockets`, `Routes`..., `RoutesEnd`.
    TakeOver,
    /// Protocol 1 (what a taker tells an instance that did not announce a `Protocol`): the
    /// taker's worker serves; the instance drains and exits.
    TookOver,
    /// The taker's worker did not start: keep serving.
    TakeOverFailed {
        reason: String,
    },
    /// Protocol 2: the taker's worker is ready, serving nothing yet: hand over, answered
    /// `HandedOver`, or `Refused` if the takeover is void (it took too long).
    TakerReady,
    /// `core-server tunnel allow`: `name` becomes a tunnel route (if it was not) that `token`
    /// may connect to. Answered `Done` once saved, or `Refused`.
    TunnelAllow {
        name: String,
        token: TokenHash,
    },
    /// `core-server tunnel revoke`: no token may connect to `name`; its agents are closed.
    /// Answered `Done` once saved, or `Refused`.
    TunnelRevoke {
        name: String,
    },
}

/// The running supervisor's answers on its control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlReply {
    /// Followed by the routes, as `Routes`... `RoutesEnd`.
    Status(InstanceStatus),
    /// The instance (this pid) is stopping; the connection closes when it has exited.
    Stopping {
        pid: u32,
    },
    /// Descriptor `i` attached is a `listeners[i]` socket; the one after them is the control
    /// socket itself. Followed by the routes, as `Routes`... `RoutesEnd`.
    Sockets {
        listeners: Vec<ListenerKind>,
        dir: PathBuf,
        pid: u32,
    },
    /// A piece of the routes. Read leniently: an older instance may hold names this version
    /// refuses; those are left out (see [`Routable`]) rather than failing the whole takeover.
    Routes(Routable),
    RoutesEnd,
    /// The request cannot be served now (the reason says why).
    Refused(String),
    /// Protocol 2: the taker owns the instance from now on; this one drains and exits, and acts
    /// no more.
    HandedOver,
    /// The first answer to `TakeOver`: the takeover protocol this instance follows (see
    /// [`TAKEOVER_PROTOCOL`]). An instance that sends none follows protocol 1.
    Protocol(u32),
    /// After `RoutesEnd`, in answer to `Status`: part of the certificate store's list, in
    /// chunks of at most [`CERTIFICATES_PER_MESSAGE`], until the connection closes. (An
    /// older client stops reading at `RoutesEnd`.)
    Certificates(Vec<CertificateStatus>),
    /// Takeover protocol 3: after `RoutesEnd` (whose `Routes` carry the port routes only),
    /// the tunnel routes, in chunks of at most [`TUNNELS_PER_MESSAGE`], until `TunnelsEnd`.
    Tunnels(Vec<TunnelRoute>),
    TunnelsEnd,
    /// In answer to `Status`, after the `Certificates` and only if there are tunnel routes:
    /// the tunnel domains and their agents, in chunks of at most
    /// [`TUNNEL_STATUSES_PER_MESSAGE`].
    TunnelStatus(Vec<TunnelStatus>),
    /// A command was carried out; what to tell the user.
    Done(String),
}

/// What `core-server status` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    pub version: String,
    pub supervisor_pid: u32,
    pub worker_pid: Option<u32>,
    pub acme_pid: Option<u32>,
    /// Each listening socket and its port.
    pub ports: Vec<(ListenerKind, u16)>,
    pub dir: PathBuf,
}

/// The takeover protocol of this version: 3, which is 2 with the tunnel routes (`Tunnels`...
/// `TunnelsEnd`) after `RoutesEnd`. In protocol 2 the running instance decides whether the
/// taker owns (`TakerReady`, answered `HandedOver` or `Refused`). Protocol 1 (no `Protocol`
/// announced): the taker says `TookOver`, and the running instance drains.
pub const TAKEOVER_PROTOCOL: u32 = 3;

/// The descriptor on which a child finds its end of the IPC socketpair.
pub const CHILD_IPC_FD: i32 = 3;

/// At most this many routes in one [`ToWorker::Routes`] message (253-byte names: about 52 KiB).
pub const ROUTES_PER_MESSAGE: usize = 200;

/// At most this many tunnel routes in one message: a 253-byte name and
/// [`crate::tunnel::MAX_TOKENS_PER_DOMAIN`] hashes each, well under 64 KiB together.
pub const TUNNELS_PER_MESSAGE: usize = 20;

/// At most this many [`TunnelStatus`]es in one message (each up to
/// [`MAX_CONNECTIONS_SHOWN`] connections of about 130 bytes).
pub const TUNNEL_STATUSES_PER_MESSAGE: usize = 4;

/// At most this many agent connections of one domain are listed in a [`TunnelStatus`] (the
/// count of the rest is not); a worker takes at most 64 per domain.
pub const MAX_CONNECTIONS_SHOWN: usize = 64;

/// At most this many names in one [`ControlReply::Certificates`] message (a name, an issuer
/// and an error message each: well under 64 KiB together).
pub const CERTIFICATES_PER_MESSAGE: usize = 50;

#[cfg(test)]
mod tests {
    use super::*;

    fn first_byte<T: Serialize>(message: &T) -> u8 {
        postcard::to_stdvec(message).unwrap()[0]
    }

    /// The variant indices other versions send and expect: only appending keeps them.
    #[test]
    fn control_messages_keep_their_released_indices() {
        let requests = [
            (ControlRequest::Status, 0),
            (ControlRequest::Stop, 1),
            (ControlRequest::TakeOver, 2),
            (ControlRequest::TookOver, 3),
            (
                ControlRequest::TakeOverFailed {
                    reason: String::new(),
                },
                4,
            ),
            (ControlRequest::TakerReady, 5),
            (
                ControlRequest::TunnelAllow {
                    name: String::new(),
                    token: TokenHash([0; 32]),
                },
                6,
            ),
            (
                ControlRequest::TunnelRevoke {
                    name: String::new(),
                },
                7,
            ),
        ];
        for (request, index) in requests {
            assert_eq!(first_byte(&request), index, "{request:?}");
        }
        let replies = [
            (ControlReply::Stopping { pid: 1 }, 1),
            (
                ControlReply::Sockets {
                    listeners: vec![ListenerKind::Http, ListenerKind::Https, ListenerKind::Udp],
                    dir: PathBuf::new(),
                    pid: 1,
                },
                2,
            ),
            (ControlReply::Routes(Routable::default()), 3),
            (ControlReply::RoutesEnd, 4),
            (ControlReply::Refused(String::new()), 5),
            (ControlReply::HandedOver, 6),
            (ControlReply::Protocol(TAKEOVER_PROTOCOL), 7),
            (ControlReply::Certificates(Vec::new()), 8),
            (ControlReply::Tunnels(Vec::new()), 9),
            (ControlReply::TunnelsEnd, 10),
            (ControlReply::TunnelStatus(Vec::new()), 11),
            (ControlReply::Done(String::new()), 12),
        ];
        for (reply, index) in &replies {
            assert_eq!(first_byte(reply), *index, "{reply:?}");
        }
        // The same bytes as version 1 (9c8f458) wrote for `Sockets` (listener kinds included).
        assert_eq!(
            postcard::to_stdvec(&replies[1].0).unwrap(),
            [2, 3, 0, 1, 2, 0, 1]
        );
    }

    #[test]
    fn a_full_certificates_chunk_fits_one_message() {
        let text = "\u{10ffff}".repeat(crate::acme_ipc::MAX_STATUS_TEXT / 4);
        let status = CertificateStatus {
            name: "a".repeat(253),
            issuer: Some(text.clone()),
            not_after: Some(u64::MAX),
            last_error: Some(text),
            next_try: Some(u64::MAX),
        };
        let chunk = ControlReply::Certificates(vec![status; CERTIFICATES_PER_MESSAGE]);
        let bytes = postcard::to_stdvec(&chunk).unwrap();
        assert!(
            bytes.len() <= crate::channel::MAX_MESSAGE_LEN,
            "{} bytes",
            bytes.len()
        );
    }

    fn longest_name() -> String {
        [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".")
    }

    #[test]
    fn full_tunnel_chunks_fit_one_message() {
        let route = TunnelRoute {
            name: longest_name(),
            tokens: vec![TokenHash([255; 32]); crate::tunnel::MAX_TOKENS_PER_DOMAIN],
        };
        let connection = crate::tunnel::AgentConnection {
            label: "\u{10ffff}".repeat(crate::tunnel::MAX_LABEL_LEN / 4),
            address: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
            since: u64::MAX,
            in_flight: u32::MAX,
            served: u64::MAX,
        };
        let status = TunnelStatus {
            name: longest_name(),
            tokens: u32::MAX,
            connections: vec![connection; MAX_CONNECTIONS_SHOWN],
        };
        for bytes in [
            postcard::to_stdvec(&ControlReply::Tunnels(vec![route; TUNNELS_PER_MESSAGE])),
            postcard::to_stdvec(&ControlReply::TunnelStatus(vec![
                status;
                TUNNEL_STATUSES_PER_MESSAGE
            ])),
        ] {
            let len = bytes.unwrap().len();
            assert!(len <= crate::channel::MAX_MESSAGE_LEN, "{len} bytes");
        }
    }

    #[test]
    fn a_full_routes_chunk_fits_one_message() {
        let longest = Domain::parse(&longest_name()).unwrap();
        let chunk = ToWorker::Routes(vec![(longest, 65535); ROUTES_PER_MESSAGE]);
        let bytes = postcard::to_stdvec(&chunk).unwrap();
        assert!(
            bytes.len() <= crate::channel::MAX_MESSAGE_LEN,
            "{} bytes",
            bytes.len()
        );
    }
}
