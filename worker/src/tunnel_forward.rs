//! A request's way through a tunnel: to one of its domain's agent connections, over the HTTP/2
//! the worker speaks as a client on each (see `tunnels`), the response streaming back.
//!
//! The request is addressed as HTTP/2 wants it: `{scheme}://{host}{path}?{query}` fills
//! `:scheme`, `:authority` and `:path`, and `Host` goes (the agent takes it back from
//! `:authority`). The proxy has already replaced hop-by-hop headers and the client's claims with
//! its own `X-Forwarded-*`, as for a local backend; trailers pass both ways (HTTP/2 carries them).
//!
//! An agent connection that is closing (its agent draining, or gone) hands back the requests it
//! has not sent yet: hyper's `try_send_request` returns them, and each goes to a fresh pick, its
//! body untouched. A request without a body that a connection took and then failed before an
//! answer is sent again, to a fresh pick, when that is safe: the agent did not process it (a
//! GOAWAY's last stream came before it, or RST_STREAM with REFUSED_STREAM, RFC 9113 §8.7), or
//! its connection failed (the agent killed, its machine gone silent) and it is idempotent (RFC
//! 9110 §9.2.2; nginx's `proxy_next_upstream error timeout` does so too). A request with a body
//! is not: its body went as it came, not kept. A killed agent's other connections may take a
//! request and fail it too before the worker notices; a request goes out at most [`TRIES`]
//! times in all. Any other error after a request has left is the agent's (the proxy answers
//! 502, and the exchange's deadlines apply, as for a local backend: all tries share them); no
//! agent within the wait is a 503.

use std::future::Future;

use core_server_proto::domain::Domain;
use core_server_proto::logging::describe;
use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{request, Request, Response, Uri, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::ext::Protocol;
use tracing::{debug, info};

use crate::proxy::BackendError;
use crate::tunnels::{Lease, NoAgent, TunnelBody};

/// How many agent connections one request may be offered to: a connection hands a request back
/// only when it is closing or fails it, and the registry picks no such one twice, so a third
/// means the domain's agents are all going away (an agent's two connections, by default, die
/// together).
pub const TRIES: usize = 3;

/// What the forwarding needs of its claim on an agent connection: a [`Lease`] from the registry
/// (tests lease connections of their own).
pub trait Leased: Send + 'static {
    fn sender(&self) -> SendRequest<TunnelBody>;
    fn extended_connect(&self) -> bool;
    fn retire(&self);
    fn answered(&self);
}

impl Leased for Lease {
    fn sender(&self) -> SendRequest<TunnelBody> {
        Lease::sender(self)
    }

    fn extended_connect(&self) -> bool {
        Lease::extended_connect(self)
    }

    fn retire(&self) {
        Lease::retire(self)
    }

    fn answered(&self) {
        Lease::answered(self)
    }
}

/// Addresses `request`, received for `host` (a Host of `domain`) over `scheme`, to an agent:
/// an absolute URI (HTTP/2's `:scheme`, `:authority`, `:path`) and no `Host` header.
pub fn address<B>(
    request: &mut Request<B>,
    scheme: &'static str,
    host: &HeaderValue,
    domain: &Domain,
) {
    // The client's Host (its port included, as a local backend sees it), else the domain.
    let authority = Authority::try_from(host.as_bytes()).unwrap_or_else(|_| {
        Authority::try_from(domain.as_str()).expect("a domain is a valid authority")
    });
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::try_from(scheme).expect("http or https"));
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        request
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    *request.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path make a URI");
    request.headers_mut().remove(header::HOST);
    // h2 encodes a request of an older version as a forwarded HTTP/1 one.
    *request.version_mut() = Version::HTTP_2;
}

/// Sends `request` (addressed by [`address`]) on an agent connection from `pick`, and returns
/// the response head with the lease it came on (to hold until the body ends). A connection
/// that hands the request back unsent, or fails it when it may be sent again, is retired, and
/// the request offered to the next pick.
pub async fn send<L, P, F>(
    mut request: Request<TunnelBody>,
    mut pick: P,
) -> Result<(Response<Incoming>, L), BackendError>
where
    L: Leased,
    P: FnMut() -> F,
    F: Future<Output = Result<L, NoAgent>>,
{
    let extended_connect = request.extensions().get::<Protocol>().is_some();
    // What sends the request again, if it may be and its connection fails.
    let again = if extended_connect || !request.body().is_end_stream() {
        None
    } else {
        let (head, body) = request.into_parts();
        let again = head.clone();
        request = Request::from_parts(head, body);
        Some(again)
    };
    let mut tries = 0;
    loop {
        tries += 1;
        let lease = pick().await.map_err(BackendError::NoAgent)?;
        // h2 sends an extended CONNECT whatever the agent's SETTINGS said.
        if extended_connect && !lease.extended_connect() {
            return Err(BackendError::NoExtendedConnect);
        }
        let mut e = match lease.sender().try_send_request(request).await {
            Ok(response) => {
                lease.answered();
                return Ok((response, lease));
            }
            Err(e) => e,
        };
        let Some(unsent) = e.take_message() else {
            let error = e.into_error();
            let resend = match &again {
                Some(head) if tries < TRIES => resend(head, &error),
                _ => Resend::No,
            };
            let (Resend::Again { retire }, Some(head)) = (resend, again.clone()) else {
                return Err(BackendError::Http(error));
            };
            if retire {
                lease.retire();
            }
            let host = head.uri.authority().map_or("", |a| a.as_str());
            info!(
                "{host}: an agent connection failed a {} before answering ({}): sending it again",
                head.method,
                describe(&error)
            );
            request = Request::from_parts(head, Either::Right(Empty::new().boxed()));
            continue;
        };
        lease.retire();
        if tries == TRIES {
            return Err(BackendError::Unsent(tries, e.into_error()));
        }
        debug!("an agent connection handed a request back unsent (it is closing): retrying");
        request = unsent;
    }
}

/// What may follow a bodiless request's failure before its answer.
enum Resend {
    No,
    /// To another connection; `retire`: this one is failing (the registry picks it no more).
    Again {
        retire: bool,
    },
}

/// Whether a bodiless request that failed with `error` before its answer may be sent again:
/// the agent did not process it, or its connection failed (not this one exchange) and it is
/// idempotent.
fn resend(head: &request::Parts, error: &hyper::Error) -> Resend {
    let source = std::error::Error::source(error);
    if let Some(e) = source.and_then(|e| e.downcast_ref::<h2::Error>()) {
        return if e.is_go_away() && e.is_remote() {
            // It came after the last stream the agent's GOAWAY says it processed.
            Resend::Again { retire: true }
        } else if e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM) {
            // Refused unprocessed (RFC 9113 §8.7); the connection goes on.
            Resend::Again { retire: false }
        } else {
            // This stream reset, a malformed answer, a local limit: about this exchange (the
            // agent may have answered), not the connection.
            Resend::No
        };
    }
    // hyper turns h2's IO errors into its own: the connection broke, closed, or went silent.
    let connection_failed = source.is_some_and(|e| e.is::<std::io::Error>())
        || error.is_timeout()
        || error.is_closed()
        || error.is_canceled();
    if connection_failed && head.method.is_idempotent() {
        Resend::Again { retire: true }
    } else {
        Resend::No
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! A tunnel in one process: an "agent" (hyper's HTTP/2 server, as the agent runs it) on one
    //! end of an in-memory pipe and the worker's HTTP/2 client on the other; in front, a client
    //! speaking HTTP/1.1 to a server whose service forwards as the proxy does.

    use super::*;

    use std::convert::Infallible;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};
    use http_body_util::combinators::BoxBody;
    use http_body_util::{BodyExt, Either, Empty, Full};
    use hyper::body::{Body, Frame};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio::sync::{mpsc, oneshot};
    use tokio::task::JoinHandle;
    use tokio_util::task::TaskTracker;

    use crate::forwarding;
    use crate::request_body::RequestBody;
    use crate::upgrade;

    const TIMEOUT: Duration = Duration::from_secs(30);

    pub type AgentBody = BoxBody<Bytes, hyper::Error>;
    pub type ClientBody = BoxBody<Bytes, Infallible>;

    /// A lease on a test agent's connection; counts its retirements.
    #[derive(Clone)]
    pub struct TestLease {
        sender: SendRequest<TunnelBody>,
        extended_connect: bool,
        pub retired: Arc<AtomicUsize>,
    }

    impl Leased for TestLease {
        fn sender(&self) -> SendRequest<TunnelBody> {
            self.sender.clone()
        }
        fn extended_connect(&self) -> bool {
            self.extended_connect
        }
        fn retire(&self) {
            self.retired.fetch_add(1, Ordering::Relaxed);
        }
        fn answered(&self) {}
    }

    /// An agent serving `service` over a reversed connection.
    pub struct TestAgent {
        pub lease: TestLease,
        /// Its server: aborting it drops the connection, as an agent that dies.
        pub server: JoinHandle<()>,
        /// Starts a graceful shutdown (GOAWAY, in-flight streams finish).
        goaway: Option<oneshot::Sender<()>>,
    }

    impl TestAgent {
        /// Starts a graceful shutdown: GOAWAY, the streams in flight finish.
        pub fn go_away(&mut self) {
            let _ = self.goaway.take().unwrap().send(());
        }

        /// Waits until the worker's side of the connection has closed.
        pub async fn closed(&self) {
            for _ in 0..1000 {
                if self.lease.sender.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the worker's side of the connection did not close within 10 s");
        }
    }

    /// An agent answering with `service`; `extended_connect`: whether its SETTINGS enable
    /// RFC 8441 (the real agent's do).
    pub async fn agent<S, Fut>(service: S, extended_connect: bool) -> TestAgent
    where
        S: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<AgentBody>> + Send + 'static,
    {
        let (worker_io, agent_io) = tokio::io::duplex(1 << 20);
        let service = Arc::new(service);
        let (goaway, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            if extended_connect {
                builder.enable_connect_protocol();
            }
            let service = service_fn(move |request| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service(request).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(agent_io), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop => connection.as_mut().graceful_shutdown(),
            }
            let _ = connection.await;
        });
        TestAgent {
            lease: lease_on(worker_io, extended_connect).await,
            server,
            goaway: Some(goaway),
        }
    }

    /// The worker's HTTP/2 client on its end of a test agent's pipe.
    async fn lease_on(worker_io: tokio::io::DuplexStream, extended_connect: bool) -> TestLease {
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, TunnelBody>(TokioIo::new(worker_io))
            .await
            .expect("HTTP/2 handshake with the test agent");
        tokio::spawn(connection);
        TestLease {
            sender,
            extended_connect,
            retired: Arc::default(),
        }
    }

    /// An agent resetting every stream with `reason` (RST_STREAM), which hyper's server never
    /// does on purpose: h2's own server.
    async fn resetting_agent(reason: h2::Reason) -> TestLease {
        let (worker_io, agent_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut connection = h2::server::handshake(agent_io).await.unwrap();
            while let Some(Ok((_, mut respond))) = connection.accept().await {
                respond.send_reset(reason);
            }
        });
        lease_on(worker_io, false).await
    }

    pub fn full(body: impl Into<Bytes>) -> AgentBody {
        Full::new(body.into())
            .map_err(|e: Infallible| match e {})
            .boxed()
    }

    pub fn empty() -> ClientBody {
        Empty::new().boxed()
    }

    /// What the agent saw of a request, as one text: method, URI, version, sorted headers,
    /// then body and trailers.
    pub async fn describe(request: Request<Incoming>) -> String {
        let (parts, body) = request.into_parts();
        let mut lines = vec![format!(
            "{} {} {:?}",
            parts.method, parts.uri, parts.version
        )];
        lines.extend(sorted(&parts.headers));
        let collected = body.collect().await.expect("request body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        lines.push(format!("body {:?}", collected.to_bytes()));
        lines.extend(
            sorted(&trailers)
                .into_iter()
                .map(|t| format!("trailer {t}")),
        );
        lines.join("\n")
    }

    pub fn sorted(headers: &HeaderMap) -> Vec<String> {
        let mut lines: Vec<_> = headers
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        lines.sort();
        lines
    }

    pub async fn text<B: Body<Data = Bytes>>(body: B) -> String
    where
        B::Error: std::fmt::Debug,
    {
        String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// The proxy's tunnel path without its deadlines (`Proxy::exchange`), as a service: each
    /// pick takes the next of `picks`, the last one for good.
    async fn forward<L: Leased + Clone>(
        request: Request<Incoming>,
        picks: Arc<Mutex<Vec<L>>>,
        tasks: TaskTracker,
    ) -> Response<Either<Incoming, Full<Bytes>>> {
        let upgrade_to = upgrade::requested_protocol(&request);
        let host = request.headers()[header::HOST].clone();
        let domain = Domain::from_host(host.to_str().unwrap()).unwrap();
        let (parts, body) = request.into_parts();
        let (body, _upload) = RequestBody::new(Some(body), TIMEOUT);
        let mut request = Request::from_parts(parts, body);
        forwarding::remove_hop_by_hop(request.headers_mut());
        let client = "192.0.2.7".parse().unwrap();
        forwarding::set_forwarded(request.headers_mut(), client, &host, "https");
        address(&mut request, "https", &host, &domain);
        let pick = || {
            let mut picks = picks.lock().unwrap();
            let lease = match picks.len() {
                1 => picks[0].clone(),
                _ => picks.remove(0),
            };
            std::future::ready(Ok::<_, NoAgent>(lease))
        };
        let result = match upgrade_to {
            Some(protocol) => {
                crate::tunnel_upgrade::proxy(request, protocol, pick, &tasks, TIMEOUT).await
            }
            None => send(request.map(Either::Left), pick)
                .await
                .map(|(response, lease)| (response, Some(lease))),
        };
        match result {
            Ok((mut response, _lease)) => {
                if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                    forwarding::remove_hop_by_hop(response.headers_mut());
                }
                *response.version_mut() = Version::HTTP_11;
                response.map(Either::Left)
            }
            Err(e) => Response::builder()
                .status(StatusCode::BAD_GATEWAY)
                .body(Either::Right(Full::from(crate::proxy::describe(&e))))
                .unwrap(),
        }
    }

    /// A client's HTTP/1.1 connection to a front server that forwards to `picks`.
    pub async fn front<L: Leased + Clone>(picks: Vec<L>) -> Client {
        let picks = Arc::new(Mutex::new(picks));
        let tasks = TaskTracker::new();
        http1(move |request| forward(request, picks.clone(), tasks.clone())).await
    }

    pub type Client = hyper::client::conn::http1::SendRequest<ClientBody>;

    /// A client's HTTP/1.1 connection (upgrades allowed) to a server answering with `service`.
    pub async fn http1<S, Fut, B>(service: S) -> Client
    where
        S: Fn(Request<Incoming>) -> Fut + Send + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = service(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server_io), service)
                .with_upgrades()
                .await;
        });
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client_io))
            .await
            .expect("HTTP/1.1 handshake with the front");
        tokio::spawn(connection.with_upgrades());
        sender
    }

    /// A body whose frames the test sends one at a time.
    pub struct Frames(pub mpsc::Receiver<Frame<Bytes>>);

    impl Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            self.0.poll_recv(cx).map(|frame| frame.map(Ok))
        }
    }

    pub fn trailers(name: &'static str, value: &'static str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(name, HeaderValue::from_static(value));
        map
    }

    /// An agent answering "from {name}"; `arrived` counts its requests.
    async fn named_agent(name: &'static str, arrived: Arc<AtomicUsize>) -> TestAgent {
        agent(
            move |_| {
                arrived.fetch_add(1, Ordering::Relaxed);
                async move { Response::new(full(format!("from {name}"))) }
            },
            true,
        )
        .await
    }

    fn get(path: &str) -> Request<ClientBody> {
        Request::get(path)
            .header("host", "app.example.com")
            .body(empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_get_reaches_the_agent_addressed_for_http2_with_forwarding_headers() {
        let agent = agent(
            |request| async move { Response::new(full(describe(request).await)) },
            true,
        )
        .await;
        let mut client = front(vec![agent.lease]).await;
        let request = Request::get("/a/b?c=d")
            .header("host", "App.Example.com:8443")
            .header("x-forwarded-for", "6.6.6.6")
            .header(
                "core-server-tunnel-nonce",
                "0123456789abcdef0123456789abcdef",
            )
            .header("connection", "keep-alive, x-hop")
            .header("x-hop", "1")
            .header("x-kept", "yes")
            .body(empty())
            .unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            text(response.into_body()).await,
            "GET https://App.Example.com:8443/a/b?c=d HTTP/2.0\n\
             forwarded: for=192.0.2.7;host=\"App.Example.com:8443\";proto=https\n\
             x-forwarded-for: 192.0.2.7\n\
             x-forwarded-host: App.Example.com:8443\n\
             x-forwarded-proto: https\n\
             x-kept: yes\n\
             body b\"\""
        );
    }

    /// The agent echoes each piece of the upload as it arrives, then answers the request's
    /// trailer with trailers of its own: both ways stream, and trailers cross both ways.
    #[tokio::test]
    async fn a_streamed_post_flows_both_ways_as_sent_with_trailers_both_ways() {
        let agent = agent(
            |request| async move {
                let echo = request
                    .into_body()
                    .map_frame(|frame| match frame.into_data() {
                        Ok(data) => Frame::data(data),
                        Err(frame) => {
                            let sum = frame.into_trailers().unwrap()["x-sum"].clone();
                            let mut answer = HeaderMap::new();
                            answer.insert("x-echoed-sum", sum);
                            Frame::trailers(answer)
                        }
                    });
                Response::builder()
                    .header("trailer", "x-echoed-sum")
                    .body(echo.boxed())
                    .unwrap()
            },
            true,
        )
        .await;
        let mut client = front(vec![agent.lease]).await;
        let (pieces, body) = mpsc::channel(1);
        let request = Request::post("/upload")
            .header("host", "app.example.com")
            .header("te", "trailers")
            .header("trailer", "x-sum")
            .body(Frames(body).boxed())
            .unwrap();
        pieces.send(Frame::data(Bytes::from("one,"))).await.unwrap();
        let response = client.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            first, "one,",
            "the first piece came back before the second was sent"
        );
        pieces.send(Frame::data(Bytes::from("two"))).await.unwrap();
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(second, "two");
        pieces
            .send(Frame::trailers(trailers("x-sum", "42")))
            .await
            .unwrap();
        drop(pieces);
        let last = body.collect().await.unwrap();
        assert_eq!(last.trailers(), Some(&trailers("x-echoed-sum", "42")));
    }

    #[tokio::test]
    async fn a_request_handed_back_by_a_closing_connection_goes_to_the_next() {
        let arrived = Arc::new(AtomicUsize::new(0));
        // A request in flight on the first connection when its agent starts draining.
        let (slow_arrived, mut arrived_slow) = mpsc::channel::<()>(1);
        let (release, released) = oneshot::channel::<()>();
        let released = Arc::new(Mutex::new(Some(released)));
        let mut draining = agent(
            move |request| {
                let released = match request.uri().path() {
                    "/slow" => released.lock().unwrap().take(),
                    _ => None,
                };
                let slow_arrived = slow_arrived.clone();
                async move {
                    if let Some(released) = released {
                        let _ = slow_arrived.send(()).await;
                        let _ = released.await;
                    }
                    Response::new(full("from the draining agent"))
                }
            },
            true,
        )
        .await;
        let live = named_agent("the live agent", arrived.clone()).await;
        let retired = draining.lease.retired.clone();

        let mut first = front(vec![draining.lease.clone()]).await;
        let in_flight = tokio::spawn(first.send_request(get("/slow")));
        arrived_slow.recv().await.unwrap();
        draining.go_away();

        // Until the worker's side has seen the GOAWAY, requests still go to the draining agent,
        // which serves them; after, each is handed back and goes to the live one. None fails.
        let mut handed_back = false;
        for _ in 0..1000 {
            let mut client = front(vec![draining.lease.clone(), live.lease.clone()]).await;
            let response = client.send_request(get("/")).await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            if text(response.into_body()).await == "from the live agent" {
                handed_back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            handed_back,
            "no request was handed back within 10 s of the GOAWAY"
        );
        assert_eq!(retired.load(Ordering::Relaxed), 1);
        assert_eq!(arrived.load(Ordering::Relaxed), 1);

        let _ = release.send(());
        let response = in_flight.await.unwrap().unwrap();
        assert_eq!(text(response.into_body()).await, "from the draining agent");
    }

    #[tokio::test]
    async fn a_request_is_offered_to_three_closing_connections_at_most() {
        let mut closed = named_agent("nobody", Arc::default()).await;
        closed.go_away();
        closed.closed().await;
        let retired = closed.lease.retired.clone();
        let mut client = front(vec![closed.lease.clone()]).await;
        let response = client.send_request(get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(retired.load(Ordering::Relaxed), TRIES);
        let page = text(response.into_body()).await;
        assert!(page.contains("closed before taking the request"), "{page}");
    }

    /// An agent that never answers; `arrived` has a message once a request reached it.
    async fn silent_agent() -> (TestAgent, mpsc::Receiver<()>) {
        let (arrived_tx, arrived) = mpsc::channel::<()>(1);
        let agent = agent(
            move |_| {
                let arrived = arrived_tx.clone();
                async move {
                    let _ = arrived.send(()).await;
                    std::future::pending().await
                }
            },
            true,
        )
        .await;
        (agent, arrived)
    }

    #[tokio::test]
    async fn a_get_whose_agent_dies_before_answering_goes_to_the_next_a_post_is_a_bad_gateway() {
        let arrived_live = Arc::new(AtomicUsize::new(0));
        let live = named_agent("the live agent", arrived_live.clone()).await;
        let post = Request::post("/")
            .header("host", "app.example.com")
            .body(Full::new(Bytes::from("an order")).boxed())
            .unwrap();
        for (request, status, served) in [
            (get("/"), StatusCode::OK, 1),
            (post, StatusCode::BAD_GATEWAY, 1),
        ] {
            let (dying, mut arrived) = silent_agent().await;
            let mut client = front(vec![dying.lease.clone(), live.lease.clone()]).await;
            let method = request.method().clone();
            let response = tokio::spawn(client.send_request(request));
            arrived.recv().await.unwrap();
            dying.server.abort();
            let response = response.await.unwrap().unwrap();
            assert_eq!(response.status(), status, "{method}");
            assert_eq!(arrived_live.load(Ordering::Relaxed), served, "{method}");
            if status == StatusCode::OK {
                assert_eq!(text(response.into_body()).await, "from the live agent");
            }
        }
    }

    #[tokio::test]
    async fn a_request_an_agent_refused_unprocessed_goes_to_the_next_one_it_reset_does_not() {
        let arrived = Arc::new(AtomicUsize::new(0));
        let live = named_agent("the live agent", arrived.clone()).await;
        // REFUSED_STREAM: not processed, so even a POST goes on; the connection stays.
        let refusing = resetting_agent(h2::Reason::REFUSED_STREAM).await;
        let mut client = front(vec![refusing.clone(), live.lease.clone()]).await;
        let post = Request::post("/")
            .header("host", "app.example.com")
            .body(empty())
            .unwrap();
        let response = client.send_request(post).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(text(response.into_body()).await, "from the live agent");
        assert_eq!(refusing.retired.load(Ordering::Relaxed), 0);
        // Any other reset is about the exchange, which the agent may have acted on: not even a
        // GET goes again, and the connection stays.
        let cancelling = resetting_agent(h2::Reason::CANCEL).await;
        let mut client = front(vec![cancelling.clone(), live.lease.clone()]).await;
        let response = client.send_request(get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(arrived.load(Ordering::Relaxed), 1);
        assert_eq!(cancelling.retired.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_agent_dying_mid_body_cuts_the_response() {
        let (piece_tx, piece) = mpsc::channel::<Frame<Bytes>>(1);
        let piece = Arc::new(Mutex::new(Some(piece)));
        let agent = agent(
            move |_| {
                let body = Frames(piece.lock().unwrap().take().unwrap());
                async move {
                    let body = body.map_err(|e: Infallible| match e {}).boxed();
                    Response::new(body)
                }
            },
            true,
        )
        .await;
        let mut client = front(vec![agent.lease.clone()]).await;
        piece_tx
            .send(Frame::data(Bytes::from("start")))
            .await
            .unwrap();
        let response = client.send_request(get("/")).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "start");
        agent.server.abort();
        assert!(
            body.collect().await.is_err(),
            "the response ends cut, not whole"
        );
    }
}
