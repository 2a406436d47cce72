//! The reverse proxy: pick the backend by Host, forward the request, stream the answer back.
//!
//! | situation                           | client sees            |
//! |-------------------------------------|------------------------|
//! | no Host (and no `:authority`)       | 400                    |
//! | Host with no route                  | 404                    |
//! | backend refuses or breaks off       | 502                    |
//! | no response header within timeout   | 504                    |
//!
//! Bodies stream both ways with backpressure: nothing is buffered beyond hyper's read buffers,
//! so a 1 GiB upload or download costs the worker no more memory than a small one.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::domain::Domain;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::forwarding;
use crate::route_table::RouteTable;
use crate::upgrade;

/// What the client gets: the backend's streamed body, or a short error page.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How long an unused pooled backend connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a backend gave no response.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Client(#[from] hyper_util::client::legacy::Error),
}

pub struct Proxy {
    routes: Arc<RouteTable>,
    client: Client<HttpConnector, Incoming>,
    backend_timeout: Duration,
    /// Upgraded (WebSocket) connections, so a draining worker waits for them.
    tasks: TaskTracker,
}

impl Proxy {
    pub fn new(routes: Arc<RouteTable>, backend_timeout: Duration, tasks: TaskTracker) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(backend_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Proxy {
            routes,
            client,
            backend_timeout,
            tasks,
        }
    }

    /// Answers one request from `client`, received over `scheme` (`"http"` or `"https"`).
    pub async fn handle(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
        scheme: &'static str,
    ) -> Response<ProxyBody> {
        let client_version = request.version();
        let Some(host) = request_host(&request) else {
            let mut response = error_page(StatusCode::BAD_REQUEST, "the request names no host");
            // A client this confused should not keep the connection (nginx closes too).
            if client_version <= Version::HTTP_11 {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return response;
        };
        let Some(domain) = host.to_str().ok().and_then(Domain::from_host) else {
            return error_page(StatusCode::NOT_FOUND, "no app is registered for this host");
        };
        let Some(port) = self.routes.port(&domain) else {
            return error_page(
                StatusCode::NOT_FOUND,
                &format!("no app is registered for {domain}"),
            );
        };
        let backend = SocketAddr::from((Ipv4Addr::LOCALHOST, port));

        let upgrade_to = upgrade::requested_protocol(&request);
        forwarding::remove_hop_by_hop(request.headers_mut());
        forwarding::set_forwarded(request.headers_mut(), client.ip(), &host, scheme);
        request.headers_mut().insert(header::HOST, host);
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = backend_uri(request.uri(), port);

        let response = tokio::time::timeout(self.backend_timeout, async {
            match upgrade_to {
                // Boxed: the rare upgrade path would otherwise make every request's future
                // several times larger, and futures are moved by copying.
                Some(protocol) => {
                    Box::pin(upgrade::proxy(request, protocol, backend, &self.tasks)).await
                }
                None => self
                    .client
                    .request(request)
                    .await
                    .map_err(BackendError::Client),
            }
        })
        .await;
        match response {
            Ok(Ok(mut response)) => {
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    forwarding::remove_hop_by_hop(response.headers_mut());
                }
                // Our connection with the client, not the backend's, sets the version.
                *response.version_mut() = client_version;
                response.map(Either::Left)
            }
            Ok(Err(e)) => {
                warn!("{domain}: backend {backend} failed: {}", describe(&e));
                error_page(
                    StatusCode::BAD_GATEWAY,
                    &format!("the app for {domain} is not answering"),
                )
            }
            Err(_) => {
                warn!(
                    "{domain}: backend {backend} gave no response within {:?}",
                    self.backend_timeout
                );
                error_page(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("the app for {domain} took too long to answer"),
                )
            }
        }
    }
}

/// The Host a request is for: the URI's authority (HTTP/2, or an absolute-form HTTP/1 request,
/// where RFC 9112 §3.2.2 says it wins), else the Host header.
fn request_host(request: &Request<Incoming>) -> Option<HeaderValue> {
    match request.uri().authority() {
        Some(authority) => HeaderValue::from_str(authority.as_str()).ok(),
        None => request.headers().get(header::HOST).cloned(),
    }
}

/// `http://127.0.0.1:<port>/<path and query>`.
fn backend_uri(uri: &Uri, port: u16) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority =
        Some(Authority::try_from(format!("127.0.0.1:{port}")).expect("valid authority"));
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// `e` and its causes, `: `-separated, as one log line.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A short plain-text page; errors from core-server itself are told apart from the app's.
pub fn error_page(status: StatusCode, why: &str) -> Response<ProxyBody> {
    debug!("{status}: {why}");
    let reason = status.canonical_reason().unwrap_or("");
    let body = format!("{} {reason}: {why}\n", status.as_u16());
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Either::Right(Full::from(body)))
        .expect("a static status and headers make a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_uri_keeps_path_and_query() {
        let uri: Uri = "http://example.com:8080/a/b?c=d".parse().unwrap();
        assert_eq!(
            backend_uri(&uri, 5665).to_string(),
            "http://127.0.0.1:5665/a/b?c=d"
        );
        let uri: Uri = "/x?y".parse().unwrap();
        assert_eq!(backend_uri(&uri, 1).to_string(), "http://127.0.0.1:1/x?y");
    }
}
