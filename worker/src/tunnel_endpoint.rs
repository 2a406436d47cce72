//! Where an agent becomes a tunnel: the HTTP/1.1 Upgrade on `TUNNEL_PATH`, its token checked
//! in constant time, failures rate-limited per source, and the connection then handed to
//! `tunnel_connection` (reversed, and added to the registry).
//!
//! | situation                                                        | agent sees             |
//! |------------------------------------------------------------------|------------------------|
//! | Host no tunnel, no `Authorization: Bearer`, or a wrong token     | 401 (one failure more) |
//! | the same, its source failed [`ALLOWED_FAILURES`] times lately (*)| 429, `Retry-After`     |
//! | the domain or the worker has the most tunnels it takes           | 503                    |
//! | the worker is stopping                                           | 503                    |
//! | otherwise                                                        | 101, then HTTP/2       |
//!
//! (*) Per address and tunnel domain (see `failed_attempts`).
//!
//! Refusals close the connection. A good token is never rate-limited: the limit holds back
//! wrong ones (a 256-bit token cannot be guessed anyway), and an agent left running with a
//! revoked token, retrying every few seconds, would otherwise lock its replacement on the same
//! machine out for as long as it runs (an outside tester saw 35 s).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use core_server_proto::domain::Domain;
use core_server_proto::routes::Target;
use core_server_proto::tunnel::{
    Token, AGENT_LABEL_HEADER, MAX_LABEL_LEN, NONCE_HEADER, TUNNEL_PATH, UPGRADE_PROTOCOL,
};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use tracing::{info, warn};

use crate::failed_attempts::{FailedAttempts, Source, ALLOWED_FAILURES};
use crate::forwarding::lists;
use crate::proxy::{error_page, request_host, ClientRequest, ProxyBody};
use crate::tunnel_connection::{self, Agent};
use crate::tunnels::{Refusal, Tunnels};

pub struct TunnelEndpoint {
    tunnels: Arc<Tunnels>,
    failures: FailedAttempts,
}

impl TunnelEndpoint {
    /// The endpoint that adds the agents it accepts to `tunnels`.
    pub fn new(tunnels: Arc<Tunnels>) -> Self {
        TunnelEndpoint {
            tunnels,
            failures: FailedAttempts::default(),
        }
    }

    /// Whether `request` asks to become a tunnel (an HTTP/1.1 `Upgrade:
    /// core-server-tunnel/1` on `TUNNEL_PATH`); other requests to that path go to the app.
    pub fn wants(request: &ClientRequest) -> bool {
        let headers = request.headers();
        request.version() == Version::HTTP_11
            && request.uri().path() == TUNNEL_PATH
            && lists(headers, header::UPGRADE, UPGRADE_PROTOCOL)
            && lists(headers, header::CONNECTION, "upgrade")
    }

    /// Answers a request that [`TunnelEndpoint::wants`]: 101 and a new tunnel, 401, 429 or 503.
    pub async fn handle(
        &self,
        mut request: ClientRequest,
        client: SocketAddr,
    ) -> Response<ProxyBody> {
        let source = client.ip().to_canonical();
        let domain = request_host(&request)
            .ok()
            .and_then(|host| host.to_str().ok().and_then(Domain::from_host));
        let routes = self.tunnels.routes();
        let tunnel = (domain.clone()).filter(|d| routes.target(d) == Some(Target::Tunnel));
        let admitted = match (domain, bearer(request.headers())) {
            // Only what has a token's form is hashed (`Token::parse` is cheap for any input).
            (Some(domain), Some(token)) if Token::parse(token).is_ok() => {
                routes.admits(&domain, token).map(|token| (domain, token))
            }
            _ => None,
        };
        let Some((domain, token)) = admitted else {
            let host = request_host(&request).ok();
            let host = host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("?");
            let attempt = Source::new(source, tunnel);
            if let Err(wait) = self.failures.check(&attempt) {
                if self.failures.first_refusal(&attempt) {
                    info!(
                        "tunnel request from {source} for {host} refused: {ALLOWED_FAILURES} failed lately; until it may try again (in {}s), its failures are refused unlogged",
                        wait.as_secs_f64().ceil()
                    );
                }
                let mut response = refusal(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many failed tunnel requests from this address; retry later",
                );
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
                return response;
            }
            self.failures.charge(attempt);
            info!("tunnel request from {source} for {host} refused: not a tunnel, or a wrong or missing token");
            let mut response = refusal(
                StatusCode::UNAUTHORIZED,
                "this host is no tunnel, or the token is wrong",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        };
        let reservation = match self.tunnels.reserve(&domain, token) {
            Ok(reservation) => reservation,
            Err(e) => {
                info!("{domain}: tunnel request from {source} refused: {e}");
                let mut response = refusal(StatusCode::SERVICE_UNAVAILABLE, &e.to_string());
                if matches!(e, Refusal::Stopping) {
                    // The next worker takes it at once.
                    response
                        .headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(1));
                }
                return response;
            }
        };
        let nonce = match core_server_proto::random::hex_id() {
            Ok(nonce) => nonce,
            Err(e) => {
                warn!("{domain}: tunnel request from {source} refused: no random nonce: {e}");
                return refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the worker has no randomness",
                );
            }
        };
        let agent = Agent {
            label: label(request.headers()),
            // As `status` shows it: 127.0.0.1, not ::ffff:127.0.0.1 (the socket is dual-stack).
            address: SocketAddr::new(source, client.port()),
            nonce,
        };
        let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static(UPGRADE_PROTOCOL));
        headers.insert(
            NONCE_HEADER,
            HeaderValue::from_str(&agent.nonce).expect("hex is a valid header value"),
        );
        let on_upgrade = hyper::upgrade::on(&mut request);
        self.tunnels
            .spawn(tunnel_connection::run(on_upgrade, reservation, agent));
        response
    }
}

/// A refusal that closes the connection: what follows it is no request.
fn refusal(status: StatusCode, why: &str) -> Response<ProxyBody> {
    let mut response = error_page(status, why);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The agent's label, as printable ASCII of at most [`MAX_LABEL_LEN`] characters.
fn label(headers: &HeaderMap) -> String {
    let label: String = headers
        .get(AGENT_LABEL_HEADER)
        .map(|value| value.as_bytes())
        .unwrap_or_default()
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .take(MAX_LABEL_LEN)
        .map(|&b| char::from(b))
        .collect();
    match label.trim() {
        "" => "unnamed".to_owned(),
        label => label.to_owned(),
    }
}
