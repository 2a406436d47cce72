//! The `core-agent` binary's service: every request from the tunnel goes to the local app at
//! `--to` over pooled HTTP/1.1 connections, streaming both ways, trailers included: a request
//! without a body relayed as bytes by its own task (see `app_pool`), one with a body through
//! hyper-util's client. The worker already set `X-Forwarded-For`/`-Proto`/`-Host`; they
//! pass through untouched, and `Host` is the tunnel domain (the request's `:authority`).
//!
//! A WebSocket (or any `Upgrade`) arrives as an RFC 8441 extended CONNECT carrying the protocol
//! in `:protocol`: it goes to the app as the HTTP/1.1 `GET` with `Upgrade` it was in the browser,
//! with its `Sec-WebSocket-*` headers, on a connection of its own. The app's `101` goes back as
//! the `200` that RFC 8441 expects (with the app's `Sec-WebSocket-Accept`, passed through as
//! the browser needs it), and the two upgraded streams are spliced.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::ext::Protocol;
use hyper::service::Service;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{debug, warn};

use core_server_proto::app_exchange::AppConnections;
use core_server_proto::hop_by_hop::{frame_request_body, remove_hop_by_hop};
use core_server_proto::logging::describe;
use core_server_proto::relayed_body;
use core_server_proto::tunnel::APP_STATUS_HEADER;

use crate::app_pool::{AppBody, AppPool, IDLE_TIMEOUT};
use crate::connection::BoxError;

/// How long connecting to the app may take (for requests and WebSockets alike).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The body of a response from [`forward_to`]'s service: the app's, or the agent's own text.
pub type ForwardBody = Either<AppBody, Full<Bytes>>;

/// A service that forwards every request to the HTTP/1.1 app at `app` (what `core-agent --to`
/// runs).
pub fn forward_to(app: SocketAddr) -> ForwardService {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let client = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .build(connector);
    let authority = Authority::try_from(app.to_string()).expect("an address is an authority");
    ForwardService {
        client,
        pool: AppPool::new(app, CONNECT_TIMEOUT),
        app,
        authority,
    }
}

/// See [`forward_to`].
#[derive(Clone)]
pub struct ForwardService {
    /// For requests with a body.
    client: Client<HttpConnector, Incoming>,
    /// For requests without one.
    pool: AppPool,
    app: SocketAddr,
    /// `app` as a URI's authority, made once.
    authority: Authority,
}

type ForwardFuture =
    Pin<Box<dyn Future<Output = Result<Response<ForwardBody>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for ForwardService {
    type Response = Response<ForwardBody>;
    type Error = Infallible;
    type Future = ForwardFuture;

    fn call(&self, request: Request<Incoming>) -> ForwardFuture {
        let this = self.clone();
        Box::pin(async move {
            let app = this.app;
            let result = match request.extensions().get::<Protocol>().cloned() {
                Some(protocol) if request.method() == Method::CONNECT => {
                    upgrade(request, protocol, &this.pool, app).await
                }
                _ => this.forward(request).await,
            };
            Ok(result.unwrap_or_else(|e| {
                // The why, with the app's address, is for the agent's log: the client is told
                // what the worker tells of an app on a local port.
                warn!("the app at {app} did not answer: {}", describe(&*e));
                bad_gateway()
            }))
        })
    }
}

impl ForwardService {
    async fn forward(&self, request: Request<Incoming>) -> Result<Response<ForwardBody>, BoxError> {
        let (mut parts, body) = request.into_parts();
        if let Some(host) = host(&parts.uri)? {
            parts.headers.insert(header::HOST, host);
        } else if !parts.headers.contains_key(header::HOST) {
            // The app's address, as hyper-util's client would send.
            let app = HeaderValue::from_str(self.authority.as_str())?;
            parts.headers.insert(header::HOST, app);
        }
        parts.version = Version::HTTP_11;
        let response = if body.is_end_stream() {
            let to_head = parts.method == Method::HEAD;
            let idempotent = parts.method.is_idempotent();
            let head = relayed_body::request_head(&Request::from_parts(parts, ()));
            let response = relayed_body::fetch(self.pool.clone(), &head, to_head, idempotent);
            response.await?.map(AppBody::relayed)
        } else {
            // hyper-util's client takes the app's address from the URI.
            parts.uri = app_uri(&self.authority, &parts.uri)?;
            // Chunked when its length is unknown or it has trailers (hyper sends those only
            // that `Trailer` declares).
            frame_request_body(&parts.method, &mut parts.headers, body.size_hint().exact());
            let response = self.client.request(Request::from_parts(parts, body));
            response.await?.map(AppBody::hyper)
        };
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Either::Left(body)))
    }
}

/// The `Host` a request is forwarded with: its `:authority`.
fn host(uri: &Uri) -> Result<Option<HeaderValue>, http::Error> {
    Ok(match uri.authority() {
        Some(authority) => Some(HeaderValue::from_str(authority.as_str())?),
        None => None,
    })
}

/// `http://APP/path?query`, for `uri` as it arrived (`https://domain/path?query` on HTTP/2).
fn app_uri(app: &Authority, uri: &Uri) -> Result<Uri, http::Error> {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(app.clone())
        .path_and_query(path(uri))
        .build()
}

fn path(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |p| p.as_str())
}

/// An extended CONNECT for `protocol`, as an HTTP/1.1 upgrade to the app.
async fn upgrade(
    mut request: Request<Incoming>,
    protocol: Protocol,
    pool: &AppPool,
    app: SocketAddr,
) -> Result<Response<ForwardBody>, BoxError> {
    let tunnel_side = hyper::upgrade::on(&mut request);
    let (mut parts, _) = request.into_parts();
    let mut backend_request = Request::get(path(&parts.uri))
        .version(Version::HTTP_11)
        .body(Empty::<Bytes>::new())?;
    let headers = backend_request.headers_mut();
    *headers = std::mem::take(&mut parts.headers);
    remove_hop_by_hop(headers);
    if let Some(host) = host(&parts.uri)? {
        headers.insert(header::HOST, host);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_str(protocol.as_str())?);

    let stream = pool.connect().await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!("upgrade connection to {app}: {e}");
        }
    });
    let mut response = sender.send_request(backend_request).await?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut parts, body) = response.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(APP_STATUS_HEADER);
        if parts.status.is_success() {
            // Not the tunnel a 2xx would open: the worker gives the client this status back.
            let status = HeaderValue::from(parts.status.as_u16());
            parts.headers.insert(APP_STATUS_HEADER, status);
            parts.status = StatusCode::BAD_GATEWAY;
        }
        let body = AppBody::hyper(body);
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    let app_side = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let (Ok(tunnel), Ok(app)) = tokio::join!(tunnel_side, app_side) else {
            return;
        };
        let (mut tunnel, mut app) = (TokioIo::new(tunnel), TokioIo::new(app));
        if let Err(e) = tokio::io::copy_bidirectional(&mut tunnel, &mut app).await {
            debug!("upgraded stream ended: {e}");
        }
    });
    let mut accepted = Response::new(Either::Right(Full::default()));
    *accepted.headers_mut() = std::mem::take(response.headers_mut());
    remove_hop_by_hop(accepted.headers_mut());
    Ok(accepted)
}

/// The agent's answer when its app gave none, as the worker's error pages: plain text, not
/// to be cached.
fn bad_gateway() -> Response<ForwardBody> {
    let body = Bytes::from_static(b"502 Bad Gateway: the app is not answering\n");
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = StatusCode::BAD_GATEWAY;
    let headers = response.headers_mut();
    let plain = HeaderValue::from_static("text/plain; charset=utf-8");
    headers.insert(header::CONTENT_TYPE, plain);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
