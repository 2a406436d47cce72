//! Where an agent becomes a tunnel: the HTTP/1.1 Upgrade on `TUNNEL_PATH`, its token checked
//! in constant time, failures rate-limited per source, and the connection then reversed (the
//! worker becomes an HTTP/2 client on it) and added to the registry.
//!
//! SKELETON (issue 9, lead): filled by the endpoint's author.

use std::net::SocketAddr;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;

use crate::proxy::ProxyBody;
use crate::tunnels::Tunnels;

pub struct TunnelEndpoint {
    tunnels: Arc<Tunnels>,
}

impl TunnelEndpoint {
    /// The endpoint that adds the agents it accepts to `tunnels`.
    pub fn new(tunnels: Arc<Tunnels>) -> Self {
        TunnelEndpoint { tunnels }
    }

    /// Whether `request` asks to become a tunnel (an HTTP/1.1 `Upgrade:
    /// core-server-tunnel/1` on `TUNNEL_PATH`); other requests to that path go to the app.
    pub fn wants(request: &Request<Incoming>) -> bool {
        let _ = request;
        false
    }

    /// Answers a request that [`TunnelEndpoint::wants`]: 101 and a new tunnel, 401, 429 or 503.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
    ) -> http::Response<ProxyBody> {
        let _ = (request, client, &self.tunnels);
        todo!("issue 9: tunnel endpoint")
    }
}
