//! What core-server's processes share.
//!
//! - [`atomic_file`]: crash-safe file replacement, for every file any process writes.
//! - [`domain`]: which names may be routed, and how a `Host` header maps to one.
//! - [`command`]: the UDP command grammar (`add example.com 5665`) and its one-line replies.
//! - [`routes`]: the routes table itself, as the supervisor persists it and the worker serves it.
//! - Feature `http`, for the worker and the agent: `hop_by_hop`, the headers every proxy hop
//!   removes; `app_exchange`, `http1_body`, `relayed_body` and `idle_connections`, an
//!   HTTP/1.1 exchange with an app as bytes, its response body, and the idle connections kept
//!   for the next.
//! - [`tunnel`]: what the worker and `core-agent` agree on, and the tunnel tokens.
//! - [`ipc`]: the typed messages between supervisor and children.
//! - [`acme_ipc`]: the ACME helper's messages, with the supervisor and with the worker.
//! - [`channel`]: how those messages travel: postcard over a `SOCK_SEQPACKET` socketpair, with
//!   descriptors attached as `SCM_RIGHTS`.
//! - [`dumpable`]: what each child does first, so that no other process of its user reads it.
//! - [`seccomp`]: the syscall deny-list the worker and the ACME helper confine themselves with.
//! - [`logging`]: the one tracing set-up every binary uses.
//! - [`random`]: randomness from the kernel, and the hex form ids and hashes are written in.
//! - `allocator` (feature `allocator`): freed memory given back, for the worker and the agent.

pub mod acme_ipc;
#[cfg(feature = "allocator")]
pub mod allocator;
#[cfg(feature = "http")]
pub mod app_exchange;
pub mod atomic_file;
pub mod channel;
pub mod command;
pub mod domain;
pub mod dumpable;
#[cfg(feature = "http")]
pub mod hop_by_hop;
#[cfg(feature = "http")]
pub mod http1_body;
#[cfg(feature = "http")]
pub mod idle_connections;
pub mod ipc;
pub mod logging;
pub mod random;
#[cfg(feature = "http")]
pub mod relayed_body;
pub mod routes;
pub mod seccomp;
pub mod tunnel;
