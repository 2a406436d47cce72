//! The tunnel registry: every agent connection, by domain, and the choice of one for a request.
//!
//! An agent connection joins once its control stream's hello has arrived (see
//! `tunnel_endpoint`), and leaves when it closes, when its agent announces it is draining, or
//! when its domain's tunnel route is revoked, replaced or removed. A request goes to the live
//! connection of its domain with the fewest requests in flight; with none, it waits (up to
//! `--tunnel-wait`) for one to (re)connect.
//!
//! SKELETON (issue 9, lead): the public API below is the contract between the endpoint
//! (`tunnel_endpoint.rs`, which fills the registry) and the forwarding (`tunnel_forward.rs`,
//! `tunnel_upgrade.rs`, which lease connections). Bodies are filled by the endpoint's author.

use std::convert::Infallible;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::domain::Domain;
use http_body_util::combinators::BoxBody;
use http_body_util::Either;
use hyper::client::conn::http2::SendRequest;

use crate::request_body::RequestBody;
use crate::route_table::RouteTable;

/// What the worker sends on a reversed connection: a client's request body, or one of its own
/// (the control stream's lines; nothing, for a WebSocket's extended CONNECT).
pub type TunnelBody = Either<RequestBody, BoxBody<Bytes, Infallible>>;

/// Every agent connection, by domain.
pub struct Tunnels {
    wait: Duration,
    routes: Arc<RouteTable>,
}

impl Tunnels {
    /// `routes` tells which domains are tunnels and which tokens may connect to them.
    pub fn new(wait: Duration, routes: Arc<RouteTable>) -> Self {
        Tunnels { wait, routes }
    }

    /// A connection of `domain`'s agents to send one request on: the live one with the fewest
    /// requests in flight. With none connected, waits up to `--tunnel-wait` for one (not if the
    /// domain has no token, or the worker is stopping).
    pub async fn pick(&self, domain: &Domain) -> Result<Lease, NoAgent> {
        let _ = (domain, self.wait, &self.routes);
        todo!("issue 9: tunnels registry")
    }
}

/// One request's claim on an agent connection: counted in flight (for the balancing, and in
/// `status`) until dropped, then counted as served. Keep it until the response body has ended.
pub struct Lease {
    sender: SendRequest<TunnelBody>,
}

impl Lease {
    /// The connection's HTTP/2 request handle.
    pub fn sender(&self) -> SendRequest<TunnelBody> {
        self.sender.clone()
    }

    /// Whether the agent enabled RFC 8441's extended CONNECT (for WebSockets) in its SETTINGS.
    pub fn extended_connect(&self) -> bool {
        todo!("issue 9: tunnels registry")
    }

    /// The connection handed a request back unsent (it is closing): pick no more for it.
    pub fn retire(&self) {
        todo!("issue 9: tunnels registry")
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
