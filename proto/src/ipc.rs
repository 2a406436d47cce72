//! The messages between the supervisor and its children.
//!
//! Small, typed, and few: the supervisor hands over sockets, settings and routes; the worker
//! reports readiness and every route change. Descriptors travel beside a message as
//! `SCM_RIGHTS` (see [`crate::channel`]); the message says what each one is.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::Domain;
use crate::routes::RouteChange;

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
}

/// Supervisor to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// The first message. Descriptor `i` attached to it is a `listeners[i]` socket.
    Start {
        listeners: Vec<ListenerKind>,
        settings: WorkerSettings,
    },
    /// Part of the routes table, sent after `Start` and before `Serve`, in chunks of at most
    /// [`ROUTES_PER_MESSAGE`] so each message fits one socket buffer.
    Routes(Vec<(Domain, u16)>),
    /// Every route is sent: start serving, then answer `Ready`. Without `read_commands` (a
    /// taker's worker, before the old instance has handed over) UDP commands stay unread until
    /// `ResumeCommands`.
    Serve { read_commands: bool },
    /// Every `RouteChanged` up to and including `upto` is saved to disk (or failed to be).
    Saved { upto: u64, error: Option<String> },
    /// Stop accepting; let in-flight requests finish within `grace`; exit.
    Shutdown { grace: Duration },
    /// Stop reading UDP commands (a new instance is taking over); answer `CommandsPaused`
    /// once every change already applied has been reported.
    PauseCommands,
    /// Read UDP commands (again, or for the first time: see `Serve`).
    ResumeCommands,
    /// Answer `Pong`: a worker that does not, within a deadline, is stopped or stuck and is
    /// replaced.
    Ping,
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
}

/// A local client of the running supervisor's control socket: `core-server status|stop`, or a
/// rerun `core-server` taking over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlRequest {
    Status,
    Stop,
    /// Hand over the sockets and routes (answered `Sockets`, `Routes`..., `RoutesEnd`).
    TakeOver,
    /// The taker's worker is ready (UDP commands still unread): hand over, answered
    /// `HandedOver`, or `Refused` if the takeover is void (it took too long).
    TakerReady,
    /// The taker's worker did not start: keep serving.
    TakeOverFailed {
        reason: String,
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
    Routes(Vec<(Domain, u16)>),
    RoutesEnd,
    /// The taker owns the instance from now on; this one drains and exits, and acts no more.
    HandedOver,
    /// The request cannot be served now (the reason says why).
    Refused(String),
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

/// The descriptor on which a child finds its end of the IPC socketpair.
pub const CHILD_IPC_FD: i32 = 3;

/// At most this many routes in one [`ToWorker::Routes`] message (253-byte names: about 52 KiB).
pub const ROUTES_PER_MESSAGE: usize = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_routes_chunk_fits_one_message() {
        let longest = Domain::parse(
            &[
                "a".repeat(63),
                "b".repeat(63),
                "c".repeat(63),
                "d".repeat(61),
            ]
            .join("."),
        )
        .unwrap();
        let chunk = ToWorker::Routes(vec![(longest, 65535); ROUTES_PER_MESSAGE]);
        let bytes = postcard::to_stdvec(&chunk).unwrap();
        assert!(
            bytes.len() <= crate::channel::MAX_MESSAGE_LEN,
            "{} bytes",
            bytes.len()
        );
    }
}
