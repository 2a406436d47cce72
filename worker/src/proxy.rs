//! The reverse proxy: pick the backend by Host, forward the request, stream the answer back.
//!
//! | situation                                             | client sees                |
//! |-------------------------------------------------------|----------------------------|
//! | no Host (and no `:authority`), or two Host headers    | 400, connection closed     |
//! | a Host not a host and port, or not the `:authority`   | 400, connection closed     |
//! | a target in authority form (`GET a.example`)          | 400, connection closed     |
//! | `CONNECT`                                             | 405, connection closed     |
//! | target `*` (asterisk-form) on a method but `OPTIONS`  | 400, connection closed     |
//! | Host with no route                                    | 404                        |
//! | malformed or cut request body (a bad chunk size)      | 400, connection closed     |
//! | request body stops arriving for the timeout           | 408, connection closed     |
//! | backend refuses or breaks off                         | 502                        |
//! | backend stops reading the request body for the timeout| 504, connection closed     |
//! | no response head within the timeout after the body    | 504                        |
//! | backend stalls mid-body for the timeout               | the response is cut short  |
//! | tunnel domain with no agent connected after the wait  | 503, `Retry-After: 1`      |
//! | tunnel agent without WebSockets (RFC 8441), asked one | 502                        |
//!
//! A domain's app is on a local port (HTTP/1.1 to `127.0.0.1:<port>`), or behind a tunnel: its
//! agents' connections, over which the worker speaks HTTP/2 (see `tunnel_forward`). Both get the
//! same request (hop-by-hop headers removed, `X-Forwarded-*` set), deadlines and error pages;
//! in the table, "backend" is either.
//!
//! Most requests do not come through [`Proxy::handle`]: a bodiless HTTP/1.1 request on the
//! fast path for an app on a local port goes `http1_fast_path` → [`Proxy::relay`] →
//! `http1_relay`, which rewrites it as bytes, with the same rules, deadlines and error pages
//! (a rule added to `handle` that such a request must obey belongs in [`Proxy::relay_target`]
//! or `request_head` as well). A bodiless request that does come through `handle` (HTTP/2,
//! or a connection hyper serves) for an app on a local port is relayed as bytes too, its head
//! written by `http1_relay::request` (see `core_server_proto::relayed_body`); hyper's client
//! carries the rest, prepared by [`Proxy::prepare`]: bodies, upgrades, tunnels. A rule for
//! what the app gets belongs in both `prepare` and `http1_relay::request`.
//!
//! One timeout, `backend_timeout` (60 s by default, as nginx's `proxy_read_timeout`,
//! `proxy_send_timeout` and `client_body_timeout`), bounds every wait of an exchange:
//! connecting, each stall of the upload (whichever side stalls), the response head counted
//! from the end of the request body (so a slow upload to a healthy backend is not a 504), each
//! stall of the response body (see `response_body`), and a quiet WebSocket (see `upgrade`).
//! Errors are logged against whoever caused them: the client's at `info`, the backend's at
//! `warn`.
//!
//! Bodies stream both ways with backpressure: nothing is buffered beyond a read buffer (hyper's,
//! or the relay's, about 512 KiB: see `BodyReads`), so a 1 GiB upload or download costs the
//! worker no more memory than a small one.

use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::domain::{self, Domain};
use core_server_proto::routes::Target;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Full};
use hyper::body::{Body, Incoming};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend_pool::BackendPool;
use crate::forwarding;
use crate::http1_fast_path::Closing;
use crate::http1_relay::{self, Relay};
use crate::http1_response::{self, ClientConnection, WriteError, Written};
use crate::request_body::{self, ClientBodyError, RequestBody, Upload};
use crate::request_head::RequestHead;
use crate::response_body::{BackendBody, Holding, ResponseBody};
use crate::route_table::RouteTable;
use crate::tunnel_endpoint::TunnelEndpoint;
use crate::tunnels::{NoAgent, Tunnels};
use crate::{tunnel_forward, tunnel_upgrade, upgrade};
use core_server_proto::app_exchange::RelayError;
pub use core_server_proto::logging::describe;

/// A client's request as the proxy takes it: its body is `None` when it came without one (see
/// `http1_fast_path`).
pub type ClientRequest = Request<Option<Incoming>>;

/// What the client gets: the backend's streamed body, or a short error page.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// The methods core-server passes to apps, for the `Allow` header of its 405 to `CONNECT`.
const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE";

/// Why a backend (an app's local port, or a tunnel's agent) gave no response.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect")]
    Connect(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("{0}")]
    NoAgent(NoAgent),
    #[error("the agent does not support WebSockets: its HTTP/2 SETTINGS do not enable RFC 8441's extended CONNECT")]
    NoExtendedConnect,
    #[error("{0} agent connections in a row closed before taking the request")]
    Unsent(usize, #[source] hyper::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// Where a domain's requests go: named in the logs.
pub enum Upstream {
    Port(SocketAddr),
    Tunnel(Domain),
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Upstream::Port(backend) => write!(f, "backend {backend}"),
            Upstream::Tunnel(domain) => write!(f, "the agent of {domain}"),
        }
    }
}

pub struct Proxy {
    routes: Arc<RouteTable>,
    backends: Arc<BackendPool>,
    backend_timeout: Duration,
    /// Upgraded (WebSocket) connections, so a draining worker waits for them.
    tasks: TaskTracker,
    tunnels: Arc<Tunnels>,
    endpoint: TunnelEndpoint,
}

impl Proxy {
    pub fn new(
        routes: Arc<RouteTable>,
        backend_timeout: Duration,
        tasks: TaskTracker,
        tunnels: Arc<Tunnels>,
        endpoint: TunnelEndpoint,
    ) -> Self {
        Proxy {
            routes,
            backends: BackendPool::new(backend_timeout),
            backend_timeout,
            tasks,
            tunnels,
            endpoint,
        }
    }

    /// Answers one request from `client`, received over `scheme` (`"http"` or `"https"`).
    ///
    /// Not an `async fn`: that keeps each argument twice in its future (as passed, and as the
    /// body's local), and an HTTP/2 stream's future is moved by copying, a few times per
    /// request. With `to_port`, `Responder::respond` and hyper's service likewise, the future
    /// hyper keeps per HTTP/2 stream went from 3,712 to 1,768 bytes.
    pub fn handle(
        self: &Arc<Self>,
        request: ClientRequest,
        client: SocketAddr,
        scheme: &'static str,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        let this = self.clone();
        async move {
            let client_version = request.version();
            let host = match request_host(&request) {
                Ok(host) => host,
                Err(why) => {
                    return last_response(error_page(StatusCode::BAD_REQUEST, why), client_version)
                }
            };
            if TunnelEndpoint::wants(&request) {
                // Boxed (rare: agents connecting), not to weigh on every request's future.
                return Box::pin(this.endpoint.handle(request, client)).await;
            }
            if request.method() == Method::CONNECT {
                // A tunnel would bypass every per-request rule; the bytes after the head are the
                // tunnel's, not a next request, so the connection is not reused either.
                let mut response = error_page(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "core-server does not open tunnels (CONNECT)",
                );
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
                return last_response(response, client_version);
            }
            if request.uri().path() == "*" && request.method() != Method::OPTIONS {
                // RFC 9112, section 3.2.4: `*` names the server, for OPTIONS alone; an app
                // would take `GET *` for a path.
                let why = "a request target of * is only for OPTIONS";
                return last_response(error_page(StatusCode::BAD_REQUEST, why), client_version);
            }
            let Some(domain) = host.to_str().ok().and_then(Domain::from_host) else {
                return error_page(StatusCode::NOT_FOUND, "no app is registered for this host");
            };
            let Some(target) = this.routes.target(&domain) else {
                return error_page(
                    StatusCode::NOT_FOUND,
                    &format!("no app is registered for {domain}"),
                );
            };
            let upgrade_to = upgrade::requested_protocol(&request);
            let (response, upstream) = match target {
                Target::Port(port) => {
                    let backend = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    let response = this
                        .to_port(request, upgrade_to, backend, host, client, scheme)
                        .await;
                    (response, Upstream::Port(backend))
                }
                Target::Tunnel => {
                    let (request, upload) = this.prepare(request, client, &host, scheme);
                    // Boxed, as `to_port`'s rarer requests are: its state would otherwise make
                    // every request's future larger.
                    let response = Box::pin(
                        this.to_tunnel(request, upgrade_to, &domain, &host, scheme, upload),
                    );
                    (response.await, Upstream::Tunnel(domain.clone()))
                }
            };
            match response {
                Ok((mut response, holding)) => {
                    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        forwarding::remove_hop_by_hop(response.headers_mut());
                    }
                    // Our connection with the client, not the backend's, sets the version.
                    *response.version_mut() = client_version;
                    let timeout = this.backend_timeout;
                    response.map(|body| {
                        Either::Left(ResponseBody::new(body, timeout, upstream).holding(holding))
                    })
                }
                Err(failure) => {
                    this.failure_page(failure, &domain, &upstream, client, client_version)
                }
            }
        }
    }

    /// Closes the idle pooled connections to apps: the worker is out of file descriptors. How
    /// many were closed so far in all, for anyone (see `BackendPool::close_idle`).
    pub fn close_idle_backends(&self) -> usize {
        self.backends.close_idle()
    }

    /// Where `head` goes when it is relayed as bytes (see `http1_relay`): the domain and the
    /// app's local port, if it has exactly one `Host` and that names a domain on a port.
    pub fn relay_target(&self, head: &RequestHead) -> Option<(Domain, u16)> {
        let domain = Domain::from_host(std::str::from_utf8(head.host()?).ok()?)?;
        match self.routes.target(&domain)? {
            Target::Port(port) => Some((domain, port)),
            Target::Tunnel => None,
        }
    }

    /// Relays `head`, from `client` over `scheme`, to the app on `port` (see `http1_relay`),
    /// writing its answer to `connection`, or the error page if it gave none; `None` if the
    /// client went away before the response. Not an `async fn`: that would hold the head twice
    /// (as passed, and as the body's local) in the future the fast path boxes per request.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` holds its arguments twice"
    )]
    pub fn relay<'a, C: ClientConnection + Send>(
        &'a self,
        (domain, port): (Domain, u16),
        head: RequestHead,
        client: SocketAddr,
        scheme: &'static str,
        connection: &'a mut C,
        closing: &'a Closing<'a>,
    ) -> impl Future<Output = Option<Result<Written, WriteError>>> + Send + 'a {
        async move {
            let to_head = head.method() == Method::HEAD;
            let idempotent = head.method().is_idempotent();
            let host = head.host().unwrap_or_default();
            let target = (head.path().path(), head.path().query());
            let fields = || head.fields();
            let request =
                http1_relay::request(head.method(), target, fields, host, client.ip(), scheme);
            drop(head); // and with it, its share of the bytes the client sent
            let relay = self.relay_to(port);
            let exchange = relay.exchange(request, to_head, idempotent, connection, closing);
            match exchange.await {
                Ok(relayed) => relayed,
                Err(failure) => {
                    let upstream = Upstream::Port(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
                    let page =
                        self.failure_page(failure, &domain, &upstream, client, Version::HTTP_11);
                    // Boxed: rare, and as large as the exchange it would otherwise add to.
                    let write = http1_response::write(connection, page, to_head, closing.now());
                    Some(Box::pin(write).await)
                }
            }
        }
    }

    /// The way to the app on `port` for a request relayed as bytes.
    fn relay_to(&self, port: u16) -> Relay<'_> {
        Relay {
            pool: &self.backends,
            port,
            timeout: self.backend_timeout,
        }
    }

    /// `request` as a backend gets it through hyper's client: its body watched (see
    /// `request_body`), hop-by-hop headers removed, its cookies in one field, and what the client
    /// claims about its origin replaced by what core-server knows (see `forwarding`). The same
    /// rules as `http1_relay::request`, which writes the head of a bodiless request for an app on
    /// a local port as bytes instead.
    fn prepare(
        &self,
        request: ClientRequest,
        client: SocketAddr,
        host: &HeaderValue,
        scheme: &'static str,
    ) -> (Request<RequestBody>, Option<Upload>) {
        let (parts, body) = request.into_parts();
        let (body, upload) = RequestBody::new(body, self.backend_timeout);
        let mut request = Request::from_parts(parts, body);
        forwarding::remove_hop_by_hop(request.headers_mut());
        forwarding::join_cookies(request.headers_mut());
        forwarding::set_forwarded(request.headers_mut(), client.ip(), host, scheme);
        (request, upload)
    }

    /// Sends `request`, from `client` over `scheme`, to the app on `backend`, a local port, over
    /// HTTP/1.1. Not an `async fn`, for the reason `handle` gives.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` holds its arguments twice"
    )]
    fn to_port(
        &self,
        request: ClientRequest,
        upgrade_to: Option<HeaderValue>,
        backend: SocketAddr,
        host: HeaderValue,
        client: SocketAddr,
        scheme: &'static str,
    ) -> impl Future<Output = Result<(Response<BackendBody>, Option<Holding>), Failure>> + Send + '_
    {
        async move {
            if upgrade_to.is_some() || !request_body::is_none(request.body()) {
                // Boxed: these rarer requests' state would otherwise make every request's
                // future larger, and futures are moved by copying.
                let send = self.through_hyper(request, upgrade_to, backend, host, client, scheme);
                return Box::pin(send).await;
            }
            // Relayed as bytes (see `core_server_proto::relayed_body`), its head written
            // straight from the client's, by the rules `prepare` applies.
            let relay = self.relay_to(backend.port());
            let method = request.method();
            let fields = || {
                let fields = request.headers().iter();
                fields.map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
            };
            let head = http1_relay::request(
                method,
                (request.uri().path(), request.uri().query()),
                fields,
                host.as_bytes(),
                client.ip(),
                scheme,
            );
            let (to_head, idempotent) = (method == Method::HEAD, method.is_idempotent());
            drop(request);
            let send = pin!(async {
                let response = relay.fetch(&head, to_head, idempotent).await?;
                Ok((response.map(BackendBody::Relayed), None))
            });
            self.exchange(send, None).await
        }
    }

    /// Sends `request` (with a body, or an upgrade), from `client` over `scheme`, to the app on
    /// `backend` through hyper's client, prepared by [`Proxy::prepare`].
    async fn through_hyper(
        &self,
        request: ClientRequest,
        upgrade_to: Option<HeaderValue>,
        backend: SocketAddr,
        host: HeaderValue,
        client: SocketAddr,
        scheme: &'static str,
    ) -> Result<(Response<BackendBody>, Option<Holding>), Failure> {
        let (mut request, upload) = self.prepare(request, client, &host, scheme);
        let length = request.body().size_hint().exact();
        let method = request.method().clone();
        forwarding::frame_request_body(&method, request.headers_mut(), length);
        request.headers_mut().insert(header::HOST, host);
        *request.version_mut() = Version::HTTP_11;
        *request.uri_mut() = origin_form(request.uri());
        match upgrade_to {
            Some(protocol) => {
                let send = pin!(async {
                    let (tasks, timeout) = (&self.tasks, self.backend_timeout);
                    let response =
                        upgrade::proxy(request, protocol, backend, tasks, timeout).await?;
                    Ok((response.map(BackendBody::Hyper), None))
                });
                self.exchange(send, upload).await
            }
            None => {
                let sending = upload.clone();
                let send = pin!(async {
                    let (response, connection) = self
                        .backends
                        .send(backend.port(), request, sending.as_ref())
                        .await?;
                    Ok((
                        response.map(BackendBody::Hyper),
                        Some(Holding::Connection(connection)),
                    ))
                });
                self.exchange(send, upload).await
            }
        }
    }

    /// Sends `request` to one of `domain`'s agents, over its tunnel's HTTP/2; the lease on the
    /// agent connection comes with the response, to hold until its body ends.
    async fn to_tunnel(
        &self,
        mut request: Request<RequestBody>,
        upgrade_to: Option<HeaderValue>,
        domain: &Domain,
        host: &HeaderValue,
        scheme: &'static str,
        upload: Option<Upload>,
    ) -> Result<(Response<BackendBody>, Option<Holding>), Failure> {
        tunnel_forward::address(&mut request, scheme, host, domain);
        // The wait for an agent (`--tunnel-wait`) comes before the exchange and its deadlines,
        // an upload's included: with none, the request gets 503 after that wait, whatever
        // `--backend-timeout` is (a shorter one made it a 504 blaming an agent that never
        // was). A pick after a failed try counts against them.
        let first = self.tunnels.pick(domain).await;
        let mut first = Some(first.map_err(|e| Failure::Backend(BackendError::NoAgent(e)))?);
        if let Some(upload) = &upload {
            upload.starts_now();
        }
        let pick = move || {
            let first = first.take();
            async move {
                match first {
                    Some(lease) => Ok(lease),
                    None => self.tunnels.pick(domain).await,
                }
            }
        };
        let result = match upgrade_to {
            // Boxed: the rare upgrade path would otherwise make every request's future larger.
            Some(protocol) => {
                let mut send = Box::pin(async {
                    let tasks = &self.tasks;
                    let timeout = self.backend_timeout;
                    let (response, lease) =
                        tunnel_upgrade::proxy(request, protocol, pick, tasks, timeout).await?;
                    Ok((response.map(BackendBody::Hyper), lease.map(Holding::Lease)))
                });
                self.exchange(send.as_mut(), upload).await
            }
            None => {
                let send = pin!(async {
                    let (response, lease) =
                        tunnel_forward::send(request.map(Either::Left), pick).await?;
                    Ok((
                        response.map(BackendBody::Hyper),
                        Some(Holding::Lease(lease)),
                    ))
                });
                self.exchange(send, upload).await
            }
        };
        match result {
            // Its agent's connection was closed under it by a revocation: answered as the
            // requests after it are, not blamed on the agent or the app.
            Err(Failure::Backend(BackendError::Http(_) | BackendError::Unsent(..)))
                if self.tunnels.revoked(domain) =>
            {
                Err(Failure::Backend(BackendError::NoAgent(NoAgent::Revoked)))
            }
            result => result,
        }
    }

    /// Waits for the backend's response head to `send`, while `upload` (the request body, if
    /// any) is sent: the backend's time to answer counts from the end of the body; until then,
    /// the upload may only stall (move no byte) for as long: a client's stall is ended by the
    /// body itself, a backend that stops reading it is ended here.
    async fn exchange<T>(
        &self,
        mut send: Pin<&mut impl Future<Output = Result<T, BackendError>>>,
        upload: Option<Upload>,
    ) -> Result<T, Failure> {
        if let Some(upload) = upload {
            let ended = upload.ended();
            tokio::pin!(ended);
            let timeout = self.backend_timeout;
            loop {
                // While the client is awaited, the body ends the client's stall itself.
                let check_at = upload
                    .backend_stalled_at(timeout)
                    .unwrap_or_else(|| Instant::now() + timeout);
                tokio::select! {
                    // The backend may answer (or fail) before the body ends.
                    result = send.as_mut() => return result.map_err(|e| match upload.client_error() {
                        Some(e) => Failure::Client(e.clone()),
                        None => Failure::Backend(e),
                    }),
                    () = ended.as_mut() => break,
                    () = tokio::time::sleep_until(check_at) => {
                        if upload.backend_stalled_at(timeout).is_some_and(|at| at <= Instant::now()) {
                            return Err(Failure::BackendNotReading);
                        }
                    }
                }
            }
            if let Some(e) = upload.client_error() {
                return Err(Failure::Client(e.clone()));
            }
        }
        match tokio::time::timeout(self.backend_timeout, send).await {
            Ok(result) => result.map_err(Failure::Backend),
            Err(_) => Err(Failure::NoResponse),
        }
    }

    /// The page for `failure`, logged against whoever caused it.
    fn failure_page(
        &self,
        failure: Failure,
        domain: &Domain,
        backend: &Upstream,
        client: SocketAddr,
        client_version: Version,
    ) -> Response<ProxyBody> {
        let timeout = self.backend_timeout;
        let last = |response| last_response(response, client_version);
        match failure {
            Failure::Client(e @ ClientBodyError::Broken(_)) => {
                info!("{domain}: the request body from {client} broke off: {e}");
                last(error_page(
                    StatusCode::BAD_REQUEST,
                    "the request body is malformed or incomplete",
                ))
            }
            Failure::Client(ClientBodyError::Stalled(_)) => {
                info!("{domain}: {client} sent no byte of its request body for {timeout:?}");
                last(error_page(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body stopped arriving",
                ))
            }
            Failure::Backend(BackendError::NoAgent(why)) => {
                warn!("{domain}: no agent to send a request to: {why}");
                let mut page = error_page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &format!("no agent is connected for {domain} ({why})"),
                );
                // Agents reconnect within about a second of a restart on either side.
                page.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                page
            }
            Failure::Backend(e @ BackendError::NoExtendedConnect) => {
                warn!("{domain}: {backend} was asked for a WebSocket: {e}");
                error_page(
                    StatusCode::BAD_GATEWAY,
                    &format!("the agent for {domain} does not support WebSockets"),
                )
            }
            Failure::Backend(e) => {
                warn!("{domain}: {backend} failed: {}", describe(&e));
                let invalid = match &e {
                    BackendError::Relay(e) => e.is_invalid_answer(),
                    BackendError::Http(e) => e.is_parse(),
                    _ => false,
                };
                let what = if invalid {
                    "answered with a response that is not valid HTTP/1.1 (see the proxy's log)"
                } else {
                    "is not answering"
                };
                error_page(
                    StatusCode::BAD_GATEWAY,
                    &format!("the app for {domain} {what}"),
                )
            }
            Failure::BackendNotReading => {
                warn!("{domain}: {backend} took no byte of the request body for {timeout:?}");
                last(error_page(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("the app for {domain} stopped reading the request"),
                ))
            }
            Failure::NoResponse => {
                warn!("{domain}: {backend} gave no response within {timeout:?}");
                error_page(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!("the app for {domain} took too long to answer"),
                )
            }
        }
    }
}

/// Why an exchange with a backend gave no response, and whose fault it is.
pub enum Failure {
    /// The client's request body was malformed, cut short, or stopped arriving.
    Client(ClientBodyError),
    /// The backend refused, broke off or answered nonsense.
    Backend(BackendError),
    /// The backend stopped taking the request body.
    BackendNotReading,
    /// No response head within the timeout after the request was sent.
    NoResponse,
}

/// `response`, marked as the last on its HTTP/1 connection: after a malformed or refused request
/// the client's next bytes cannot be trusted to start a request (nginx closes too). HTTP/2 has no
/// such header, and needs none: its framing is intact.
fn last_response(
    mut response: Response<ProxyBody>,
    client_version: Version,
) -> Response<ProxyBody> {
    if client_version <= Version::HTTP_11 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The Host a request is for: the URI's authority (HTTP/2, or an absolute-form HTTP/1 request,
/// where RFC 9112 §3.2.2 says it wins), else the Host header. Refused (RFC 9112 §3.2, RFC 9113
/// §8.3.1), whatever the URI says: more than one Host header (proxies and apps that pick
/// different ones are how requests get smuggled past rules), none on an HTTP/1.1 request, a
/// Host or authority that is not a host and optional port (see `domain::is_host_field`), and
/// an HTTP/2 request's Host naming another than its `:authority`. A target in authority form
/// (`GET app.example HTTP/1.1`) is `CONNECT`'s alone (RFC 9112 §3.2.3): on another method, it
/// would route by other than Host.
pub fn request_host<B>(request: &Request<B>) -> Result<HeaderValue, &'static str> {
    const NOT_A_HOST: &str = "the host is not a name or address with an optional port";
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header");
    }
    match host {
        Some(host) if !domain::is_host_field(host.as_bytes()) => return Err(NOT_A_HOST),
        None if request.version() == Version::HTTP_11 => {
            return Err("an HTTP/1.1 request must have a Host header")
        }
        _ => {}
    }
    let uri = request.uri();
    let named = match uri.authority() {
        Some(_) if uri.scheme().is_none() && request.method() != Method::CONNECT => {
            return Err("a request target of a host alone is only for CONNECT");
        }
        Some(authority) => {
            let authority = authority.as_str().as_bytes();
            if !domain::is_host_field(authority) {
                return Err(NOT_A_HOST);
            }
            let other = host.is_some_and(|host| !host.as_bytes().eq_ignore_ascii_case(authority));
            if other && request.version() == Version::HTTP_2 {
                return Err("the Host header names another host than :authority");
            }
            HeaderValue::from_bytes(authority).ok()
        }
        // Checked above.
        None => host.cloned(),
    };
    named.ok_or("the request names no host")
}

/// `/<path and query>`, the form an origin server expects (RFC 9112 §3.2.1).
fn origin_form(uri: &Uri) -> Uri {
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    Uri::from(path)
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

    use core_server_proto::channel::{socketpair_fds, Channel};
    use http::HeaderMap;
    use http_body_util::BodyExt;
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use crate::tunnel_forward::tests::{http1, trailers, Frames};

    /// An app on a local port answering each request's body, and its `x-sum` trailer as an
    /// `x-echoed-sum` trailer.
    async fn trailer_echo() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(|request: Request<Incoming>| async move {
                let collected = request.into_body().collect().await.unwrap();
                let (frames, body) = mpsc::channel(2);
                let sum = collected.trailers().and_then(|t| t.get("x-sum")).cloned();
                frames.try_send(Frame::data(collected.to_bytes())).unwrap();
                if let Some(sum) = sum {
                    let mut answer = HeaderMap::new();
                    answer.insert("x-echoed-sum", sum);
                    frames.try_send(Frame::trailers(answer)).unwrap();
                }
                let response = Response::builder().header("trailer", "x-echoed-sum");
                Ok::<_, std::convert::Infallible>(response.body(Frames(body)).unwrap())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        port
    }

    #[tokio::test]
    async fn trailers_cross_a_port_route_both_ways() {
        let name = Domain::parse("a.example").unwrap();
        let port = trailer_echo().await;
        let (ours, _supervisor) = socketpair_fds().unwrap();
        let routes = Arc::new(RouteTable::new(
            [(name, port)].into_iter().collect(),
            Arc::new(Channel::new(ours).unwrap()),
        ));
        let tunnels = Arc::new(Tunnels::new(Duration::from_secs(1), routes.clone()));
        let proxy = Arc::new(Proxy::new(
            routes,
            Duration::from_secs(30),
            TaskTracker::new(),
            tunnels.clone(),
            TunnelEndpoint::new(tunnels),
        ));
        let mut client = http1(move |request| {
            let proxy = proxy.clone();
            async move {
                proxy
                    .handle(request.map(Some), "192.0.2.7:4000".parse().unwrap(), "http")
                    .await
            }
        })
        .await;

        let (frames, body) = mpsc::channel(2);
        frames.try_send(Frame::data(Bytes::from("abc"))).unwrap();
        frames
            .try_send(Frame::trailers(trailers("x-sum", "42")))
            .unwrap();
        drop(frames);
        let request = Request::post("/")
            .header("host", "a.example")
            .header("te", "trailers")
            .header("trailer", "x-sum")
            .body(Frames(body).boxed())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer = response.into_body().collect().await.unwrap();
        assert_eq!(answer.trailers(), Some(&trailers("x-echoed-sum", "42")));
        assert_eq!(answer.to_bytes(), "abc");
    }
}
