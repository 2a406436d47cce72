//! Tests of the tunnel endpoint, the reversed connection and the registry together, with real
//! hyper on both ends: the worker's HTTP server on a loopback socket, and a test agent that
//! dials it, upgrades, and serves HTTP/2 on the upgraded connection as `core-agent` does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::acme_ipc::{CertificateSource, HttpsSettings};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{FromWorker, ToWorker, WorkerSettings};
use core_server_proto::routes::{Route, RouteChange, Routes};
use core_server_proto::tunnel::{
    Token, CONTROL_PATH, DRAINING, NONCE_HEADER, RECONNECT, TUNNEL_PATH, UPGRADE_PROTOCOL,
};
use http::{Request, Response, StatusCode};
use http_body_util::channel::Sender;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_stream::Listener;
use crate::connection_limit::ConnectionLimit;
use crate::failed_attempts::ALLOWED_FAILURES;
use crate::http_server::{HttpServer, Transport};
use crate::proxy::Proxy;
use crate::route_table::RouteTable;
use crate::tunnel_endpoint::TunnelEndpoint;
use crate::tunnels::{Lease, NoAgent, Tunnels};

const DOMAIN: &str = "app.example";
/// Where the test agent answers with a response that never ends.
const LONG_PATH: &str = "/long";
/// Bounds what must happen "at once" on a noisy machine.
const SOON: Duration = Duration::from_secs(5);

/// A worker's tunnel side, serving HTTP on a loopback port.
struct Worker {
    addr: SocketAddr,
    tunnels: Arc<Tunnels>,
    routes: Arc<RouteTable>,
    token: Token,
    domain: Domain,
    _supervisor: Channel<ToWorker, FromWorker>,
    stop: CancellationToken,
}

impl Worker {
    async fn start(wait: Duration) -> Worker {
        Self::start_with(wait, |tunnels| tunnels).await
    }

    /// The same, with its registry as `adjust` makes it.
    async fn start_with(wait: Duration, adjust: impl FnOnce(Tunnels) -> Tunnels) -> Worker {
        let domain = Domain::parse(DOMAIN).unwrap();
        let token = Token::generate().unwrap();
        let tokens = vec![token.hash()];
        let routes: Routes = [(domain.clone(), Route::Tunnel { tokens })]
            .into_iter()
            .collect();
        let (ours, theirs) = socketpair_fds().unwrap();
        let routes = Arc::new(RouteTable::new(
            routes,
            Arc::new(Channel::new(ours).unwrap()),
        ));
        let tunnels = Arc::new(adjust(Tunnels::new(wait, routes.clone())));
        tokio::spawn(tunnels.clone().follow_closures(routes.tunnel_closures()));
        let settings = WorkerSettings {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(2),
            backend_timeout: Duration::from_secs(5),
            max_connections: None,
            https: HttpsSettings {
                source: CertificateSource::Acme,
                certificate_wait: Duration::from_secs(1),
            },
            tunnel_wait: wait,
        };
        let tasks = TaskTracker::new();
        let proxy = Arc::new(Proxy::new(
            routes.clone(),
            settings.backend_timeout,
            tasks.clone(),
            tunnels.clone(),
            TunnelEndpoint::new(tunnels.clone()),
        ));
        // Room for 2 client connections: tunnels must not count.
        let server = HttpServer::new(
            proxy,
            &settings,
            Transport::Http(None),
            ConnectionLimit::new(2),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = Listener::new(listener).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(server.serve(listener, stop.clone(), tasks));
        Worker {
            addr,
            tunnels,
            routes,
            token,
            domain,
            _supervisor: Channel::new(theirs).unwrap(),
            stop,
        }
    }

    async fn dial(&self, label: &str) -> TestAgent {
        TestAgent::dial(self.addr, DOMAIN, self.token.as_str(), label)
            .await
            .unwrap_or_else(|response| panic!("the agent was refused: {response:?}"))
    }

    /// Waits for `count` connections of the domain to be live.
    async fn wait_for(&self, count: usize) {
        let deadline = Instant::now() + SOON;
        while self.live() != count {
            assert!(
                Instant::now() < deadline,
                "{} live connections, not {count}",
                self.live()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn live(&self) -> usize {
        let snapshot = self.tunnels.snapshot();
        snapshot.iter().map(|s| s.connections.len()).sum()
    }

    /// Which agent a lease's connection leads to.
    async fn who(&self, lease: &Lease) -> String {
        let request = Request::get(format!("http://{DOMAIN}/who"))
            .body(http_body_util::Either::Right(Empty::new().boxed()))
            .unwrap();
        let response = lease.sender().send_request(request).await.unwrap();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A test agent: the HTTP/1.1 upgrade, then an HTTP/2 server answering its label, on a
/// connection that can be frozen (a pulled cable: no byte moves, nothing closes).
struct TestAgent {
    /// The agent's end of the control stream's response body.
    control: Sender<Bytes>,
    /// What the worker wrote on the control stream; `None` once its request body ended.
    heard: mpsc::UnboundedReceiver<Option<Bytes>>,
    frozen: Arc<AtomicBool>,
    /// The HTTP/2 server; ends when the connection does.
    served: JoinHandle<()>,
}

/// A refusal, as the agent saw it.
#[derive(Debug)]
struct Refused {
    status: StatusCode,
    headers: http::HeaderMap,
}

impl TestAgent {
    async fn dial(
        addr: SocketAddr,
        host: &str,
        token: &str,
        label: &str,
    ) -> Result<TestAgent, Refused> {
        Self::dial_with(addr, host, token, label, None).await
    }

    /// Dials; with `hello`, the agent sends its hello (the control stream's response head)
    /// only once `hello` resolves.
    async fn dial_with(
        addr: SocketAddr,
        host: &str,
        token: &str,
        label: &str,
        hello: Option<oneshot::Receiver<()>>,
    ) -> Result<TestAgent, Refused> {
        let frozen = Arc::new(AtomicBool::new(false));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = Freezable {
            io: tcp,
            frozen: frozen.clone(),
        };
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        let request = Request::get(TUNNEL_PATH)
            .header("host", host)
            .header("connection", "Upgrade")
            .header("upgrade", UPGRADE_PROTOCOL.to_uppercase())
            .header("authorization", format!("Bearer {token}"))
            .header("core-agent", label)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = send.send_request(request).await.unwrap();
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(Refused {
                status: response.status(),
                headers: response.headers().clone(),
            });
        }
        let nonce = response.headers()[NONCE_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(nonce.len(), 32);
        let upgraded = hyper::upgrade::on(response).await.unwrap();

        let (control_tx, control_rx) = oneshot::channel();
        let control_tx = Arc::new(std::sync::Mutex::new(Some(control_tx)));
        let hello = Arc::new(std::sync::Mutex::new(hello));
        let (heard_tx, heard) = mpsc::unbounded_channel();
        let label = label.to_owned();
        let service = service_fn(move |request: Request<Incoming>| {
            let (nonce, label) = (nonce.clone(), label.clone());
            let (control_tx, heard_tx) = (control_tx.clone(), heard_tx.clone());
            let hello = hello.clone();
            async move {
                let is_control = request.uri().path() == CONTROL_PATH
                    && request.headers().get(NONCE_HEADER).map(|v| v.as_bytes())
                        == Some(nonce.as_bytes());
                if request.uri().path() == LONG_PATH {
                    // One chunk, then nothing, for ever: a download, or server-sent events.
                    let (mut sender, body) = http_body_util::channel::Channel::new(1);
                    tokio::spawn(async move {
                        let _ = sender.send_data(Bytes::from_static(b"first")).await;
                        std::future::pending::<()>().await
                    });
                    return Ok(Response::new(body.boxed()));
                }
                if !is_control {
                    let body = Full::new(Bytes::from(label)).boxed();
                    return Ok::<_, hyper::Error>(Response::new(body));
                }
                let mut lines = request.into_body();
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = lines.frame().await {
                        // An empty frame (hyper may end a body with one) says nothing.
                        match frame.into_data() {
                            Ok(data) if !data.is_empty() => {
                                let _ = heard_tx.send(Some(data));
                            }
                            _ => {}
                        }
                    }
                    let _ = heard_tx.send(None);
                });
                let (sender, body) = http_body_util::channel::Channel::new(4);
                if let Some(control_tx) = control_tx.lock().unwrap().take() {
                    let _ = control_tx.send(sender);
                }
                let hello = hello.lock().unwrap().take();
                if let Some(hello) = hello {
                    let _ = hello.await;
                }
                Ok(Response::new(body.boxed()))
            }
        });
        let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .serve_connection(upgraded, service);
        let served = tokio::spawn(async move {
            let _ = connection.await;
        });
        let control = timeout(SOON, control_rx)
            .await
            .expect("the worker opens the control stream at once")
            .unwrap();
        Ok(TestAgent {
            control,
            heard,
            frozen,
            served,
        })
    }

    async fn say(&mut self, line: &'static [u8]) {
        self.control
            .send_data(Bytes::from_static(line))
            .await
            .unwrap();
    }

    /// Waits for the next thing the worker says on the control stream.
    async fn next_heard(&mut self) -> Option<Bytes> {
        timeout(SOON, self.heard.recv())
            .await
            .expect("the worker says something on the control stream")
            .expect("the control stream's reader reports its end")
    }

    /// Waits for the worker to close the connection.
    async fn closed_within(self, within: Duration) {
        timeout(within, self.served)
            .await
            .expect("the worker closes the connection")
            .unwrap();
    }
}

pin_project_lite::pin_project! {
    /// A stream that, once frozen, neither reads nor writes, and never wakes its reader.
    struct Freezable {
        #[pin]
        io: TcpStream,
        frozen: Arc<AtomicBool>,
    }
}

impl AsyncRead for Freezable {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        this.io.poll_read(cx, buf)
    }
}

impl AsyncWrite for Freezable {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        this.io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        if this.frozen.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        this.io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[tokio::test]
async fn the_right_token_gets_a_tunnel_that_requests_are_sent_on() {
    let worker = Worker::start(SOON).await;
    let _agent = worker.dial("laptop/1").await;
    let lease = timeout(SOON, worker.tunnels.pick(&worker.domain))
        .await
        .unwrap()
        .unwrap();
    assert!(lease.extended_connect());
    assert_eq!(worker.who(&lease).await, "laptop/1");
    let snapshot = worker.tunnels.snapshot();
    assert_eq!(snapshot.len(), 1);
    assert_eq!((snapshot[0].name.as_str(), snapshot[0].tokens), (DOMAIN, 1));
    let conn = &snapshot[0].connections[0];
    assert_eq!(
        (conn.label.as_str(), conn.in_flight, conn.served),
        ("laptop/1", 1, 0)
    );
    assert!(conn.address.starts_with("127.0.0.1:"), "{}", conn.address);
    drop(lease);
    // (What `served` counts: see `served_counts_the_requests_an_agent_answered`.)
    assert_eq!(worker.tunnels.snapshot()[0].connections[0].in_flight, 0);
}

#[tokio::test]
async fn tunnels_take_no_client_connection_slot() {
    // The worker takes 2 client connections: 3 tunnels and a client still get in.
    let worker = Worker::start(SOON).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(worker.dial(&format!("agent {i}")).await);
    }
    worker.wait_for(3).await;
    let stream = TcpStream::connect(worker.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get("/").header("host", "unknown.example");
    let response = timeout(
        SOON,
        send.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("a client is served while tunnels are connected")
    .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_wrong_token_or_host_gets_401_and_no_tunnel() {
    let worker = Worker::start(SOON).await;
    let wrong = Token::generate().unwrap();
    for (host, token) in [
        (DOMAIN, wrong.as_str()),
        ("other.example", worker.token.as_str()),
        (DOMAIN, ""),
    ] {
        let refused = TestAgent::dial(worker.addr, host, token, "x")
            .await
            .err()
            .unwrap();
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
        assert_eq!(refused.headers["www-authenticate"], "Bearer");
        assert_eq!(refused.headers["connection"], "close");
    }
    assert_eq!(worker.live(), 0);
}

#[tokio::test]
async fn after_ten_failures_wrong_tokens_get_429_and_the_right_one_gets_in() {
    let worker = Worker::start(SOON).await;
    let wrong = Token::generate().unwrap();
    for _ in 0..ALLOWED_FAILURES {
        let refused = TestAgent::dial(worker.addr, DOMAIN, wrong.as_str(), "x").await;
        assert_eq!(refused.err().unwrap().status, StatusCode::UNAUTHORIZED);
    }
    let refused = TestAgent::dial(worker.addr, DOMAIN, wrong.as_str(), "x")
        .await
        .err()
        .unwrap();
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers["retry-after"], "6");
    assert_eq!(refused.headers["connection"], "close");
    let _agent = TestAgent::dial(worker.addr, DOMAIN, worker.token.as_str(), "right")
        .await
        .expect("the right token is let in");
}

#[tokio::test]
async fn a_revoked_agent_retrying_for_one_domain_locks_out_no_agent_of_another() {
    let worker = Worker::start(SOON).await;
    let other = Domain::parse("other.example").unwrap();
    let token = Token::generate().unwrap();
    let allow = RouteChange::AllowTunnel {
        domain: other.clone(),
        token: token.hash(),
    };
    drop(worker.routes.change(allow).await.unwrap());
    let revoke = RouteChange::RevokeTunnel {
        domain: worker.domain.clone(),
    };
    drop(worker.routes.change(revoke).await.unwrap());
    // The revoked agent, on the same address, retries with its old token.
    let old = worker.token.as_str();
    for _ in 0..ALLOWED_FAILURES {
        let refused = TestAgent::dial(worker.addr, DOMAIN, old, "old").await;
        assert_eq!(refused.err().unwrap().status, StatusCode::UNAUTHORIZED);
    }
    let refused = TestAgent::dial(worker.addr, DOMAIN, old, "old").await;
    assert_eq!(refused.err().unwrap().status, StatusCode::TOO_MANY_REQUESTS);
    let _agent = TestAgent::dial(worker.addr, other.as_str(), token.as_str(), "good")
        .await
        .expect("the other domain's agent is let in");
}

#[tokio::test]
async fn hosts_that_are_no_tunnel_share_one_bucket_per_address() {
    let worker = Worker::start(SOON).await;
    let token = worker.token.as_str();
    for i in 0..ALLOWED_FAILURES {
        let host = format!("guess{i}.example");
        let refused = TestAgent::dial(worker.addr, &host, token, "x").await;
        assert_eq!(refused.err().unwrap().status, StatusCode::UNAUTHORIZED);
    }
    let refused = TestAgent::dial(worker.addr, "one-more.example", token, "x").await;
    assert_eq!(refused.err().unwrap().status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn revoking_closes_the_connections_at_once_and_picks_fail_without_waiting() {
    let worker = Worker::start(Duration::from_secs(60)).await;
    let agent = worker.dial("a").await;
    worker.wait_for(1).await;
    let revoke = RouteChange::RevokeTunnel {
        domain: worker.domain.clone(),
    };
    drop(worker.routes.change(revoke).await.unwrap());
    agent.closed_within(SOON).await;
    assert!(matches!(
        timeout(SOON, worker.tunnels.pick(&worker.domain))
            .await
            .unwrap(),
        Err(NoAgent::Revoked)
    ));
    let refused = TestAgent::dial(worker.addr, DOMAIN, worker.token.as_str(), "b").await;
    assert_eq!(refused.err().unwrap().status, StatusCode::UNAUTHORIZED);
}

impl Worker {
    /// Revokes the domain's tokens, then allows a fresh one (a rotation).
    async fn rotate_tokens(&self) {
        let revoke = RouteChange::RevokeTunnel {
            domain: self.domain.clone(),
        };
        drop(self.routes.change(revoke).await.unwrap());
        let allow = RouteChange::AllowTunnel {
            domain: self.domain.clone(),
            token: Token::generate().unwrap().hash(),
        };
        drop(self.routes.change(allow).await.unwrap());
    }
}

#[tokio::test]
async fn an_agent_whose_token_is_revoked_before_its_hello_never_joins_even_after_a_new_allow() {
    let worker = Worker::start(SOON).await;
    let (send_hello, hello) = oneshot::channel();
    let token = worker.token.as_str();
    let agent = TestAgent::dial_with(worker.addr, DOMAIN, token, "old", Some(hello))
        .await
        .unwrap();
    worker.rotate_tokens().await;
    send_hello.send(()).unwrap();
    agent.closed_within(SOON).await;
    assert_eq!(worker.live(), 0);
    assert!(matches!(
        timeout(SOON, worker.tunnels.pick(&worker.domain))
            .await
            .unwrap(),
        Err(NoAgent::Timeout(_))
    ));
}

#[tokio::test]
async fn revoking_closes_a_connection_still_waiting_for_its_hello() {
    let worker = Worker::start(SOON).await;
    let (_send_hello, hello) = oneshot::channel();
    let token = worker.token.as_str();
    let agent = TestAgent::dial_with(worker.addr, DOMAIN, token, "slow", Some(hello))
        .await
        .unwrap();
    let revoke = RouteChange::RevokeTunnel {
        domain: worker.domain.clone(),
    };
    drop(worker.routes.change(revoke).await.unwrap());
    agent.closed_within(SOON).await;
}

/// The body of a response that never ends (`LONG_PATH`), on `lease`'s connection, its first
/// chunk taken.
async fn long_response(lease: &Lease) -> Incoming {
    let request = Request::get(format!("http://{DOMAIN}{LONG_PATH}"))
        .body(http_body_util::Either::Right(Empty::new().boxed()))
        .unwrap();
    let response = lease.sender().send_request(request).await.unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "first");
    body
}

#[tokio::test]
async fn revoking_cuts_the_streams_of_connections_that_already_left_the_balancer() {
    for draining in [true, false] {
        let worker = Worker::start(SOON).await;
        let mut agent = worker.dial("leaving").await;
        worker.wait_for(1).await;
        let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
        let mut body = long_response(&lease).await;
        // The agent leaves the balancer softly, its long response still streaming.
        if draining {
            agent.say(DRAINING).await;
        } else {
            let (ended, _) = http_body_util::channel::Channel::new(1);
            drop(std::mem::replace(&mut agent.control, ended));
        }
        assert_eq!(agent.next_heard().await, None, "the worker ends its side");
        worker.wait_for(0).await;
        let revoke = RouteChange::RevokeTunnel {
            domain: worker.domain.clone(),
        };
        drop(worker.routes.change(revoke).await.unwrap());
        let next = timeout(SOON, body.frame())
            .await
            .expect("the revoked agent's stream is cut at once");
        assert!(
            !matches!(next, Some(Ok(_))),
            "no more of the response passes"
        );
        agent.closed_within(SOON).await;
    }
}

/// A tunnel replaced by a port route, or removed, goes as a port route does: the requests in
/// flight on its connections finish, and the connections take no new one, then close.
#[tokio::test]
async fn a_port_route_replacing_the_tunnel_or_its_removal_lets_its_requests_finish() {
    for port in [Some(8080), None] {
        let worker = Worker::start(SOON).await;
        let mut agent = worker.dial("a").await;
        worker.wait_for(1).await;
        let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
        let mut body = long_response(&lease).await;

        let domain = worker.domain.clone();
        let change = match port {
            Some(port) => RouteChange::Set { domain, port },
            None => RouteChange::Remove { domain },
        };
        drop(worker.routes.change(change).await.unwrap());
        assert_eq!(
            agent.next_heard().await,
            None,
            "the agent is told: no new request"
        );
        worker.wait_for(0).await;
        let next = timeout(Duration::from_millis(500), body.frame()).await;
        assert!(next.is_err(), "the response in flight was cut: {next:?}");
        drop((body, lease));
        agent.closed_within(SOON).await;
        assert!(worker.tunnels.snapshot().is_empty());
    }
}

#[tokio::test]
async fn a_pick_waits_for_a_late_agent_and_times_out_without_one() {
    let worker = Worker::start(Duration::from_secs(1)).await;
    let started = Instant::now();
    assert!(matches!(
        worker.tunnels.pick(&worker.domain).await,
        Err(NoAgent::Timeout(_))
    ));
    assert!(started.elapsed() >= Duration::from_secs(1));

    let worker = Worker::start(SOON * 2).await;
    let tunnels = worker.tunnels.clone();
    let domain = worker.domain.clone();
    let pick = tokio::spawn(async move { tunnels.pick(&domain).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pick.is_finished());
    let _agent = worker.dial("late").await;
    timeout(SOON, pick).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn requests_go_to_the_connection_with_the_fewest_in_flight() {
    let worker = Worker::start(SOON).await;
    let _a = worker.dial("a").await;
    let _b = worker.dial("b").await;
    worker.wait_for(2).await;
    let pick = || async { worker.tunnels.pick(&worker.domain).await.unwrap() };
    let first = pick().await;
    let second = pick().await;
    let (x, y) = (worker.who(&first).await, worker.who(&second).await);
    assert_ne!(x, y, "with one request on {x}, the next goes to the other");
    let third = pick().await;
    let fourth = pick().await;
    assert_ne!(worker.who(&third).await, worker.who(&fourth).await);
    // Two in flight on each; once one on y is done, the next goes to y.
    drop(second);
    let fifth = pick().await;
    assert_eq!(worker.who(&fifth).await, y);
    // Ties rotate: with none in flight, picks alternate.
    drop((first, third, fourth, fifth));
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let lease = pick().await;
        seen.insert(worker.who(&lease).await);
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn a_draining_agent_gets_no_new_request_and_its_control_stream_ends() {
    let worker = Worker::start(SOON).await;
    let mut draining = worker.dial("draining").await;
    let _live = worker.dial("live").await;
    worker.wait_for(2).await;
    let held = worker.tunnels.pick(&worker.domain).await.unwrap();
    draining.say(DRAINING).await;
    assert_eq!(
        draining.next_heard().await,
        None,
        "the worker ends its side"
    );
    worker.wait_for(1).await;
    for _ in 0..6 {
        let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
        assert_eq!(worker.who(&lease).await, "live");
    }
    // A request leased before still completes on the draining connection.
    assert!(["draining", "live"].contains(&worker.who(&held).await.as_str()));
}

#[tokio::test]
async fn a_silent_agent_is_dropped_within_10_seconds() {
    let worker = Worker::start(SOON).await;
    let silent = worker.dial("silent").await;
    let _live = worker.dial("live").await;
    worker.wait_for(2).await;
    silent.frozen.store(true, Ordering::Relaxed);
    let frozen_at = Instant::now();
    timeout(Duration::from_secs(10), worker.wait_for_silent_gone())
        .await
        .expect("a silent agent is dropped within 10 s");
    tracing::info!("dropped after {:?}", frozen_at.elapsed());
    for _ in 0..4 {
        let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
        assert_eq!(worker.who(&lease).await, "live");
    }
}

impl Worker {
    async fn wait_for_silent_gone(&self) {
        while self.live() != 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A connection that has opened nearly all the stream ids HTTP/2 gives a client asks its agent
/// for another (here after 4 streams, its control stream counting), serves on until that one
/// comes, then takes no new request and closes once its requests are done.
#[tokio::test]
async fn a_connection_near_the_end_of_its_stream_ids_is_replaced_by_its_agent() {
    let worker = Worker::start_with(SOON, |t| t.with_streams_per_connection(4)).await;
    let mut old = worker.dial("a").await;
    worker.wait_for(1).await;
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(worker.tunnels.pick(&worker.domain).await.unwrap());
    }
    assert_eq!(old.next_heard().await.as_deref(), Some(RECONNECT));
    // The domain is never without a connection: the old one serves until the new one comes.
    assert_eq!(worker.live(), 1);
    leases.push(worker.tunnels.pick(&worker.domain).await.unwrap());
    let _new = worker.dial("a").await;
    assert_eq!(
        old.next_heard().await,
        None,
        "no new request for the old one"
    );
    worker.wait_for(1).await;
    let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
    assert_eq!(worker.who(&lease).await, "a");
    for lease in &leases {
        assert_eq!(worker.who(lease).await, "a");
    }
    drop(leases);
    old.closed_within(SOON).await;
}

#[tokio::test]
async fn stopping_asks_agents_to_reconnect_then_closes_once_requests_are_done() {
    let worker = Worker::start(SOON).await;
    let mut agent = worker.dial("a").await;
    worker.wait_for(1).await;
    let lease = worker.tunnels.pick(&worker.domain).await.unwrap();
    worker.tunnels.ask_to_reconnect();
    assert_eq!(agent.next_heard().await.as_deref(), Some(RECONNECT));
    // Still serving this worker's requests; no new agent is taken, no pick waits.
    assert_eq!(worker.who(&lease).await, "a");
    let refused = TestAgent::dial(worker.addr, DOMAIN, worker.token.as_str(), "b").await;
    assert_eq!(
        refused.err().unwrap().status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    worker.tunnels.close_all();
    assert_eq!(agent.next_heard().await, None);
    assert!(matches!(
        worker.tunnels.pick(&worker.domain).await,
        Err(NoAgent::Stopping)
    ));
    // The leased request's connection stays open until the lease is gone.
    let closed = timeout(Duration::from_millis(300), worker.tunnels.closed()).await;
    assert!(closed.is_err(), "closed with a request in flight");
    drop(lease);
    timeout(SOON, worker.tunnels.closed()).await.unwrap();
    agent.closed_within(SOON).await;
}

/// `status` counts a request as served once its agent answered it, not one given up on before
/// (a timeout, a client gone).
#[tokio::test]
async fn served_counts_the_requests_an_agent_answered() {
    let worker = Worker::start(SOON).await;
    let _agent = worker.dial("a").await;
    worker.wait_for(1).await;
    let served = || worker.tunnels.snapshot()[0].connections[0].served;

    drop(worker.tunnels.pick(&worker.domain).await.unwrap());
    assert_eq!(served(), 0, "a request given up on before its answer");

    let mut lease = Some(worker.tunnels.pick(&worker.domain).await.unwrap());
    let request = Request::get(format!("http://{DOMAIN}/"))
        .body(http_body_util::Either::Right(Empty::new().boxed()))
        .unwrap();
    let pick = || std::future::ready(lease.take().ok_or(NoAgent::Revoked));
    let (response, lease) = crate::tunnel_forward::send(request, pick).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    drop(lease);
    assert_eq!(served(), 1);
}
