//! Accepting client connections and serving HTTP/1.1 and HTTP/2 on them: in plain text (HTTP/2
//! by prior knowledge) on the HTTP port, over TLS (see `tls_acceptor`) on the HTTPS port.
//!
//! Each connection runs in its own task, tracked so a stopping worker can wait for them, and
//! holds a slot under `--max-connections` (see `connection_limit`). On stop, the accept loop
//! ends first (new connections then wait in the kernel's queue for the next worker) and each
//! connection winds down without losing a request (see `serve_connection`).
//!
//! Deadlines, from accept on:
//! - the first request's head must be complete within `--header-timeout`, whatever the
//!   protocol, the TLS handshake included (and with it any wait for a certificate): hyper's
//!   own header timeout only starts once hyper-util has told HTTP/1 from the HTTP/2 preface,
//!   and HTTP/2 has none, so a client sending nothing (or a preface, slowly) would otherwise
//!   live until the idle timeout. Past it, an HTTP/2 connection is told to close (GOAWAY),
//!   as an idle one is, and any other dropped. Later HTTP/1 heads get hyper's header timeout,
//!   counted from the end of the previous response and not reset by each byte that trickles in;
//! - a connection with no request in flight for `--idle-timeout` is closed gracefully;
//! - a connection told to close (idle, evicted, draining HTTP/2) that still has no request in
//!   flight [`CLOSE_GRACE`] later (and `--header-timeout` after its last response) is dropped:
//!   a client that never answers the GOAWAY's PING does not keep it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use core_server_proto::domain::Domain;
use core_server_proto::ipc::WorkerSettings;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::accept_errors::AcceptErrors;
use crate::acme_challenges::{RedirectToHttps, ACME_TLS_ALPN};
use crate::activity::{Activity, CountedBody};
use crate::client_stream::{ClientStream, Listener};
use crate::connection_limit::{ConnectionLimit, Slot, EVICTION_BATCH};
use crate::forwarding::lists;
use crate::http1_fast_path::{self, Answer, Closing, HandedOver, Limits, Served, WaitReadable};
use crate::http1_response::{ClientConnection, WriteError, Written};
use crate::local_tasks::{self, LocalExecutor};
use crate::parked_connections::{ParkedConnections, Parking, PARK_AFTER};
use crate::proxy::{ClientRequest, Proxy, ProxyBody};
use crate::request_head::RequestHead;
use crate::send_deadline::{Deadline, Progress, Watched, WatchedIo};
use crate::tls_acceptor::TlsAcceptor;
use crate::upgrade;

/// Concurrent streams a client may open on one HTTP/2 connection (nginx's
/// `http2_max_concurrent_streams`); more are refused with `REFUSED_STREAM`, which clients retry.
const MAX_CONCURRENT_STREAMS: u32 = 128;

/// The largest header list an HTTP/2 client may send (decoded), as nginx's default
/// `large_client_header_buffers` (4 x 8 KiB) allow for HTTP/1: room for big cookies, not more.
const MAX_HEADER_LIST_SIZE: u32 = 32 * 1024;

/// Streams a client may open and reset before we accept them, before it gets GOAWAY (the
/// "rapid reset" bound; h2's default, stated here so it cannot change under us).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Response bytes queued per HTTP/2 stream for a client that is not reading them. hyper's
/// default (about 400 KiB) let a client that never reads hold 128 x 400 KiB = 50 MiB of one
/// connection's responses; 64 KiB bounds that to 8 MiB, at the same download speed (a 100 MB
/// h2c download through the worker: 1.1-1.5 GB/s either way).
const MAX_SEND_BUF_SIZE: usize = 64 * 1024;

/// How long a connection told to close may go on with no request in flight, at least (a GOAWAY
/// and its PING round trip take far less).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What HTTP/2's connection preface starts with: as much as an HTTP/1 parser reads of it before
/// it fails on the version (RFC 9113 §3.4).
const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2";

/// What a listener speaks.
pub enum Transport {
    /// Plain HTTP; in release mode, with ACME challenges answered and registered hosts
    /// redirected to HTTPS.
    Http(Option<Arc<RedirectToHttps>>),
    Https(TlsAcceptor),
}

pub struct HttpServer {
    proxy: Arc<Proxy>,
    limits: Limits,
    transport: Transport,
    limit: Arc<ConnectionLimit>,
    /// Where idle plain-HTTP/1 connections wait (none for HTTPS).
    parked: Option<ParkedConnections>,
}

impl HttpServer {
    pub fn new(
        proxy: Arc<Proxy>,
        settings: &WorkerSettings,
        transport: Transport,
        limit: Arc<ConnectionLimit>,
    ) -> Self {
        let parked = match &transport {
            Transport::Http(_) => ParkedConnections::new()
                .inspect_err(|e| {
                    warn!("idle connections cannot be parked ({e}): each keeps its task")
                })
                .ok(),
            Transport::Https(_) => None,
        };
        HttpServer {
            proxy,
            limits: Limits {
                header_timeout: settings.header_timeout,
                idle_timeout: settings.idle_timeout,
                send_timeout: settings.backend_timeout,
                park_after: parked.as_ref().map(|_| PARK_AFTER),
            },
            transport,
            limit,
            parked,
        }
    }

    /// Accepts until `stop`, serving each connection in a task of `tasks`.
    pub async fn serve(self, listener: Listener, stop: CancellationToken, tasks: TaskTracker) {
        let server = Arc::new(self);
        // Connections inherit TCP_NODELAY from their listener (Linux): one system call here
        // instead of one per connection.
        let nodelay_inherited =
            match socket2::SockRef::from(listener.get_ref()).set_tcp_nodelay(true) {
                Ok(()) => true,
                Err(e) => {
                    warn!(
                    "cannot set TCP_NODELAY on the listener ({e}): setting it on each connection"
                );
                    false
                }
            };
        if let Err(e) = listener.defer_accept() {
            warn!("cannot defer accepting connections until their clients send ({e}): accepting them as they open");
        }
        if server.parked.is_some() {
            tasks.spawn(server.clone().run_parked(stop.clone(), tasks.clone()));
        }
        let mut errors = AcceptErrors::default();
        // `close_idle_backends`' count as of the last failed accept.
        let mut backends_closed = 0;
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, client)) => {
                    errors.accepted();
                    if !nodelay_inherited {
                        let _ = stream.socket().and_then(|s| s.set_tcp_nodelay(true));
                    }
                    // At the cap, idle connections are asked to make room for this client, or
                    // it waits for one to close; the clients after it wait in the kernel's
                    // queue meanwhile. Stopping, it is served anyway, as one already accepted.
                    let (slot, stopping) = tokio::select! {
                        slot = server.limit.admit() => (slot, false),
                        _ = stop.cancelled() => (server.limit.admit_beyond_cap(), true),
                    };
                    server.spawn_connection(&tasks, stream, client, slot, stop.clone());
                    if stopping {
                        return;
                    }
                }
                Err(e) => {
                    if let Some(pause) = errors.failed(&e) {
                        // Out of descriptors: idle connections give theirs back, those to apps
                        // first (only a cache), clients' only when those were few (a client
                        // whose request is not read yet counts as idle). Few counts those
                        // closed since the last failed accept by anyone: a request out of
                        // descriptors to connect with at the same moment may have just closed
                        // them all, and taken for few, they would have cost clients whose
                        // requests were on their way. Out of this process's descriptors (not
                        // the system's, nor memory), the cap comes down to what fits.
                        let closed = server.proxy.close_idle_backends();
                        let freed = closed - std::mem::replace(&mut backends_closed, closed);
                        if freed < EVICTION_BATCH {
                            if e.raw_os_error() == Some(nix::libc::EMFILE) {
                                server.limit.out_of_descriptors();
                            } else {
                                server.limit.evict_idle();
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(pause) => {}
                            _ = stop.cancelled() => return,
                        }
                    }
                }
            }
        }
    }

    /// Serves a connection in a task of `tasks`, one made for its transport, which holds
    /// `slot` until the connection ends: a task is as big as the largest state its future can
    /// be in, and a plain connection's must not carry room for a TLS handshake and a TLS
    /// stream (that doubled the memory of every idle plain-HTTP connection).
    fn spawn_connection(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stream: ClientStream,
        client: SocketAddr,
        mut slot: Slot,
        stop: CancellationToken,
    ) {
        match &self.transport {
            Transport::Http(_) => {
                let activity = slot.connected();
                self.spawn_plain(tasks, stream, client, slot, activity, stop);
            }
            Transport::Https(_) => match stream.into_tokio() {
                Ok(stream) => {
                    tasks.spawn(self.clone().serve_tls(stream, client, slot, stop));
                }
                Err(e) => warn!("cannot serve the connection from {client}: {e}"),
            },
        };
    }

    /// A plain connection's task, new or back from being parked. The slot rides beside
    /// `serve_http`'s future, not in an async fn around it: an async fn keeps its arguments
    /// twice (this task, 1,152 bytes, is what a connection costs until it is parked).
    fn spawn_plain(
        self: &Arc<Self>,
        tasks: &TaskTracker,
        stream: ClientStream,
        client: SocketAddr,
        slot: Slot,
        activity: Arc<Activity>,
        stop: CancellationToken,
    ) {
        let server = self.clone();
        let (again, tasks_again, stop_again) = (self.clone(), tasks.clone(), stop.clone());
        let serve = server.serve_http(stream, client, false, activity, stop);
        tasks.spawn(serve.map(move |idle| {
            let Some((stream, close_at)) = idle else {
                return drop(slot);
            };
            let parked = again.parked.as_ref().expect("only parked if it can be");
            if let Parking::Refused(stream, slot) = parked.park(stream, client, slot, close_at) {
                // The set has ended (stopping: the fast path parks no more): it goes on
                // waiting in a task.
                let activity = slot.activity().expect("connected").clone();
                again.spawn_plain(&tasks_again, stream, client, slot, activity, stop_again);
            }
        }));
    }

    /// Serves parked connections again as their clients send, until `stop` and none is left.
    async fn run_parked(self: Arc<Self>, stop: CancellationToken, tasks: TaskTracker) {
        let parked = self.parked.as_ref().expect("only run if parking");
        parked
            .run(&self.limit, &stop, |stream, client, slot| {
                let activity = slot.activity().expect("connected").clone();
                self.spawn_plain(&tasks, stream, client, slot, activity, stop.clone());
            })
            .await
    }

    /// An HTTPS connection's task; it holds `slot` until the connection ends.
    async fn serve_tls(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        mut slot: Slot,
        stop: CancellationToken,
    ) {
        let Transport::Https(tls) = &self.transport else {
            unreachable!("spawn_connection serves only HTTPS listeners' connections here");
        };
        let activity = slot.connected();
        // Counted in the first request's deadline; a connection evicted to make room
        // before it sent a request is dropped, mid-handshake too.
        let handshake =
            tokio::time::timeout_at(self.first_request_by(&activity), tls.accept(stream));
        let mut stream = tokio::select! {
            handshake = handshake => match handshake {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    debug!("TLS handshake with {client}: {e}");
                    return;
                }
                Err(_) => {
                    debug!("TLS handshake with {client} not done within {:?}: closing", self.limits.header_timeout);
                    return;
                }
            },
            _ = activity.evicted() => {
                debug!("connection from {client} closed to make room");
                return;
            }
        };
        if stream.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
            // A CA validating TLS-ALPN-01 sends nothing after the handshake (RFC 8737
            // §3): close at once (close_notify, within the same deadline).
            debug!("TLS-ALPN-01 validation handshake from {client} done: closing");
            let by = self.first_request_by(&activity);
            let _ = tokio::time::timeout_at(by, stream.shutdown()).await;
            return;
        }
        let http2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        // Never parked: the limits of an HTTPS server have no `park_after`.
        self.serve_http(stream, client, http2, activity, stop).await;
    }

    /// Serves HTTP on `stream` (plain, or TLS after its handshake, `http2` if its ALPN chose
    /// HTTP/2) until it closes: HTTP/1.1 requests without a body on the fast path (see
    /// `http1_fast_path`), everything from the first other request on with hyper. Or until
    /// it idles long enough to be parked: then the stream, and when it is to be closed.
    async fn serve_http<S>(
        self: Arc<Self>,
        stream: S,
        client: SocketAddr,
        http2: bool,
        activity: Arc<Activity>,
        stop: CancellationToken,
    ) -> Option<(S, Instant)>
    where
        S: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
    {
        let (scheme, redirect) = match &self.transport {
            Transport::Http(redirect) => ("http", redirect.clone()),
            Transport::Https(_) => ("https", None),
        };
        let responder = Responder {
            proxy: self.proxy.clone(),
            redirect,
            client,
            scheme,
        };
        let stream = if http2 {
            HandedOver::whole(stream)
        } else {
            // Awaited where it is made: a future bound to a name first can take its room twice
            // in this one, and so in every connection's task.
            match http1_fast_path::serve(stream, &self.limits, &activity, &stop, &responder).await {
                Served::ToHyper(stream) => stream,
                Served::Ended => return None,
                Served::Idle { stream, close_at } => return Some((stream, close_at)),
            }
        };
        // HTTP/2 over TLS only by ALPN (RFC 9113 §3.3), and over plain HTTP only from the
        // connection's first byte (§3.4: its preface), never after HTTP/1.1 requests.
        // hyper-util's server looks for the preface in the first bytes it is handed, mid-way
        // into the connection after the fast path (told to speak HTTP/1 only, it still does,
        // with upgrades): so it is refused here, by closing, as hyper's HTTP/1 server does.
        let http1_only = !http2 && (scheme == "https" || activity.started_a_request());
        let preface = stream.already_read().starts_with(HTTP2_PREFACE_START);
        if http1_only && preface {
            debug!("HTTP/2's preface from {client} on an HTTP/1.1 connection: closed");
            return None;
        }
        // Boxed: hyper's connection is large, and most connections never need it.
        let http2 = http2 || preface;
        Box::pin(self.serve_with_hyper(stream, http2, responder, &activity, stop)).await;
        None
    }

    /// hyper's server for one connection, spawning on `executor`.
    fn builder(&self, executor: LocalExecutor) -> auto::Builder<LocalExecutor> {
        let mut builder = auto::Builder::new(executor);
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_send_buf_size(MAX_SEND_BUF_SIZE);
        builder
    }

    /// Serves HTTP/1 or HTTP/2 on `stream` with hyper until it closes, running what hyper
    /// starts for it (each HTTP/2 stream) in this task (see `local_tasks`); `http2`: it is
    /// known to speak HTTP/2 from its start (by ALPN, or its preface).
    async fn serve_with_hyper<S>(
        &self,
        stream: HandedOver<S>,
        http2: bool,
        responder: Responder,
        activity: &Arc<Activity>,
        stop: CancellationToken,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (executor, tasks) = local_tasks::with_send_timeout(self.limits.send_timeout);
        let connection = self.hyper_connection(stream, http2, responder, activity, stop, executor);
        tasks.run(connection).await
    }

    /// The connection of [`Self::serve_with_hyper`], from its first byte to its end.
    async fn hyper_connection<S>(
        &self,
        stream: HandedOver<S>,
        http2: bool,
        responder: Responder,
        activity: &Arc<Activity>,
        stop: CancellationToken,
        executor: LocalExecutor,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let client = responder.client;
        let service = {
            let (activity, stop, limit) = (activity.clone(), stop.clone(), self.limit.clone());
            service_fn(move |mut request: Request<Incoming>| {
                let in_flight = activity.request_started();
                if upgrade::requested_protocol(&request).is_some() {
                    request.extensions_mut().insert(limit.for_upgrades());
                }
                if request.version() == Version::HTTP_2 {
                    activity.saw_http2();
                }
                let stop = stop.clone();
                let asks = |token| lists(request.headers(), header::CONNECTION, token);
                let http10_keep_alive =
                    request.version() == Version::HTTP_10 && asks("keep-alive") && !asks("close");
                // A combinator, not an `async` block: that would hold the request, or the
                // response's future, twice (as captured, and as awaited).
                responder
                    .respond(request.map(Some))
                    .map(move |mut response| {
                        if stop.is_cancelled() {
                            ask_to_close(&mut response);
                        } else if http10_keep_alive {
                            keep_alive_for_http10(&mut response);
                        }
                        // Here, under the deadline of its stream (HTTP/2).
                        let body = |body| Watched::new(CountedBody::new(body, in_flight));
                        Ok::<_, Infallible>(response.map(body))
                    })
            })
        };
        // What hyper writes waits for the client at most the send timeout (HTTP/2 streams
        // each have their own too, see `local_tasks`).
        let progress = Arc::new(Progress::default());
        let io = TokioIo::new(WatchedIo::new(stream, progress.clone()));
        let builder = self.builder(executor);
        let connection = Deadline::connection(
            builder.serve_connection_with_upgrades(io, service),
            progress,
            self.limits.send_timeout,
        );
        tokio::pin!(connection);

        // Runs the connection. Stopping: HTTP/2 gets GOAWAY (its clients retry elsewhere) as
        // soon as the connection is known to speak it; an HTTP/1 connection stays open, so a
        // request already on its way is answered (with `Connection: close`): closing an idle
        // HTTP/1 connection always races a client that is just sending. Evicted to make room:
        // dropped if it never sent a request, else closed gracefully (HTTP/2: GOAWAY; an idle
        // HTTP/1 keep-alive connection closes once its last response is written). Past a
        // deadline (see the module's comment): closed.
        let mut stopping = false;
        let mut evicted = false;
        // When the connection was told to close gracefully.
        let mut told: Option<Instant> = None;
        let result = loop {
            let wake = self.next_check(activity, told);
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = stop.cancelled(), if !stopping => stopping = true,
                _ = activity.speaks_http2(), if stopping && told.is_none() => {
                    told = Some(Instant::now());
                    connection.as_mut().inner().graceful_shutdown();
                }
                _ = activity.evicted(), if !evicted => {
                    evicted = true;
                    if !activity.started_a_request() {
                        debug!("connection from {client} closed to make room");
                        return;
                    }
                    told.get_or_insert_with(Instant::now);
                    connection.as_mut().inner().graceful_shutdown();
                }
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    if !activity.started_a_request() && told.is_none() && now >= self.first_request_by(activity) {
                        debug!("connection from {client} sent no request within {:?}: closing", self.limits.header_timeout);
                        if !http2 {
                            return;
                        }
                        // GOAWAY first, as for an idle one: a request the client is sending
                        // just now is known not taken, so it may go again on a new connection.
                        told = Some(now);
                        connection.as_mut().inner().graceful_shutdown();
                        continue;
                    }
                    match (activity.idle_since(), told) {
                        (Some(since), Some(told)) if now >= self.drop_at(since, told) => {
                            debug!("connection from {client} did not close when asked: dropping");
                            return;
                        }
                        (Some(since), None) if now >= since + self.limits.idle_timeout => {
                            debug!("connection from {client} idle for {:?}: closing", self.limits.idle_timeout);
                            told = Some(now);
                            connection.as_mut().inner().graceful_shutdown();
                        }
                        _ => {}
                    }
                }
            }
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("connection from {client}: {e}"),
            Err(e) => info!("connection from {client} closed: {e}"),
        }
    }

    /// When the connection loop next has to look at the clock.
    fn next_check(&self, activity: &Activity, told: Option<Instant>) -> Instant {
        let now = Instant::now();
        let mut wake = match (activity.idle_since(), told) {
            // In flight: whenever it ends, nothing is due before this.
            (None, _) => now + self.limits.idle_timeout,
            (Some(since), None) => since + self.limits.idle_timeout,
            (Some(since), Some(told)) => self.drop_at(since, told),
        };
        if !activity.started_a_request() && told.is_none() {
            wake = wake.min(self.first_request_by(activity));
        }
        wake.max(now)
    }

    fn first_request_by(&self, activity: &Activity) -> Instant {
        activity.accepted_at() + self.limits.header_timeout
    }

    /// When a connection told to close, idle since `idle_since`, is dropped if still open:
    /// [`CLOSE_GRACE`] after it was told, but not before the client had `--header-timeout` to
    /// read the end of its last response (which hyper may still be writing).
    fn drop_at(&self, idle_since: Instant, told: Instant) -> Instant {
        (told + CLOSE_GRACE).max(idle_since + self.limits.header_timeout)
    }
}

/// What a connection answers requests with: in release mode's plain HTTP, a challenge's answer
/// or a redirect to HTTPS; else the proxy's answer.
#[derive(Clone)]
struct Responder {
    proxy: Arc<Proxy>,
    redirect: Option<Arc<RedirectToHttps>>,
    client: SocketAddr,
    scheme: &'static str,
}

impl Responder {
    /// The response to `request`: a future of its own (it borrows nothing), holding the
    /// request once (see `Proxy::handle`). A redirect to HTTPS or a challenge's answer is
    /// decided at once, when hyper calls the service, outside the stream's `catch_unwind`: it
    /// builds fixed headers and cannot panic.
    fn respond(
        &self,
        request: ClientRequest,
    ) -> impl Future<Output = Response<ProxyBody>> + Send + 'static {
        match self.redirect.as_ref().and_then(|r| r.answer(&request)) {
            Some(response) => Either::Left(response),
            None => Either::Right(self.proxy.handle(request, self.client, self.scheme)),
        }
    }
}

/// On the fast path, a request for an app on a local port is relayed as bytes (but where
/// plain HTTP redirects to HTTPS); any other is answered as hyper's are.
impl Answer for &Responder {
    type Body = ProxyBody;
    type Target = (Domain, u16);

    fn relay_target(&self, head: &RequestHead) -> Option<(Domain, u16)> {
        match self.redirect {
            Some(_) => None,
            None => self.proxy.relay_target(head),
        }
    }

    fn relay<'a, C: ClientConnection + Send>(
        &'a self,
        target: (Domain, u16),
        head: RequestHead,
        connection: &'a mut C,
        closing: &'a Closing<'a>,
    ) -> impl Future<Output = Option<Result<Written, WriteError>>> + Send + 'a {
        let (client, scheme) = (self.client, self.scheme);
        (self.proxy).relay(target, head, client, scheme, connection, closing)
    }

    fn respond(&self, request: ClientRequest) -> impl Future<Output = Response<ProxyBody>> {
        Responder::respond(self, request)
    }
}

/// Marks an HTTP/1 response as the connection's last (HTTP/2 has no such header; a switch of
/// protocols keeps its `Connection: upgrade`).
fn ask_to_close(response: &mut Response<ProxyBody>) {
    if response.version() < Version::HTTP_2 && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}

/// Keeps an HTTP/1.0 client's connection open, as it asked (`Connection: keep-alive`), when the
/// response's length is known (else its end is the connection's): hyper keeps such a connection
/// only if the response says `keep-alive` itself, and the app's say, hop-by-hop, was removed.
fn keep_alive_for_http10(response: &mut Response<ProxyBody>) {
    let known_length = response.body().size_hint().exact().is_some();
    if known_length && !lists(response.headers(), header::CONNECTION, "close") {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use core_server_proto::acme_ipc::{
        AcmeToWorker, CertificateSource, HttpsSettings, Secret, WorkerToAcme,
    };
    use core_server_proto::channel::{socketpair_fds, Channel};
    use rcgen::{CertificateParams, KeyPair};
    use rustls::pki_types::ServerName;
    use tokio::io::AsyncReadExt;
    use tokio_rustls::TlsConnector;

    use crate::connection_limit::ConnectionLimit;
    use crate::https::Https;
    use crate::route_table::RouteTable;
    use crate::tls_acceptor::tests::validating_ca;
    use crate::tunnel_endpoint::TunnelEndpoint;
    use crate::tunnels::Tunnels;

    #[tokio::test]
    async fn a_tls_alpn_validation_connection_is_closed_after_its_handshake_not_served() {
        let name = Domain::parse("a.example").unwrap();
        let (ours, _supervisor) = socketpair_fds().unwrap();
        let routes = Arc::new(RouteTable::new(
            [(name.clone(), 8080)].into_iter().collect(),
            Arc::new(Channel::new(ours).unwrap()),
        ));
        let settings = WorkerSettings {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            backend_timeout: Duration::from_secs(2),
            max_connections: None,
            https: HttpsSettings {
                source: CertificateSource::Acme,
                certificate_wait: Duration::from_secs(1),
            },
            tunnel_wait: Duration::from_secs(1),
        };
        let https = Https::new(routes.clone());
        let transport = https.https(&settings, &Secret(vec![3; 32])).unwrap();
        let tasks = TaskTracker::new();
        let tunnels = Arc::new(Tunnels::new(settings.tunnel_wait, routes.clone()));
        let proxy = Arc::new(Proxy::new(
            routes,
            settings.backend_timeout,
            tasks.clone(),
            tunnels.clone(),
            TunnelEndpoint::new(tunnels),
        ));
        let server = HttpServer::new(proxy, &settings, transport, ConnectionLimit::new(16));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(listener, stop.clone(), tasks));

        // The helper hands over a TLS-ALPN-01 challenge for the name.
        let (ours, theirs) = socketpair_fds().unwrap();
        https.connect_helper(ours).unwrap();
        let helper: Channel<AcmeToWorker, WorkerToAcme> = Channel::new(theirs).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[9; 32])];
        let challenge = AcmeToWorker::TlsAlpnChallenge {
            id: 1,
            name,
            certificate: params.self_signed(&key).unwrap().der().to_vec(),
            key: Secret(key.serialize_der()),
        };
        helper.send(&challenge, &[]).await.unwrap();
        for _ in 0..10 {
            let heard = tokio::time::timeout(Duration::from_secs(5), helper.recv()).await;
            if heard.unwrap().unwrap().unwrap().0 == (WorkerToAcme::ChallengeReady { id: 1 }) {
                break;
            }
        }

        // As a CA validating, then (against RFC 8737) sending a request: no answer, closed.
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(Arc::new(validating_ca()))
            .connect(ServerName::try_from("a.example").unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ACME_TLS_ALPN));
        let _ = tls
            .write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            .await;
        let mut said = Vec::new();
        let _ = tls.read_to_end(&mut said).await;
        assert!(said.is_empty(), "{}", String::from_utf8_lossy(&said));
        stop.cancel();
    }
}
