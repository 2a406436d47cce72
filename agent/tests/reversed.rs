//! The agent against a test worker written with real hyper, on loopback: the worker accepts the
//! agent's connection, answers the tunnel upgrade, becomes the HTTP/2 client of the reversed
//! connection and opens the control stream, as core-server's worker does; requests then go
//! through the agent's `forward_to` to a real local backend. The real worker is tested with the
//! real binaries in `tests/tests/tunnel_*.rs`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use core_agent::{forward_to, serve, AgentConfig, Tls, Token};
use core_server_proto::tunnel::{
    AGENT_LABEL_HEADER, CONTROL_PATH, DRAINING, NONCE_HEADER, RECONNECT, TUNNEL_PATH,
    UPGRADE_PROTOCOL,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const DOMAIN: &str = "app.test";
const NONCE: &str = "00112233445566778899aabbccddeeff";
/// Bounds every test: a hang fails instead of blocking the suite.
const LIMIT: Duration = Duration::from_secs(60);

type TestBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).boxed_unsync()
}

/// The worker's end of one reversed connection.
struct Reversed {
    send: SendRequest<TestBody>,
    /// The control stream's request body (worker to agent).
    to_agent: Sender<Bytes>,
    /// The control stream's response body (agent to worker).
    from_agent: Incoming,
    /// The upgrade request's headers.
    handshake: HeaderMap,
    /// What the agent's SETTINGS said: extended CONNECT, and its most concurrent streams.
    settings: (bool, usize),
}

/// Accepts the agent's next connection on `listener` and does the worker's part: the `101`, the
/// HTTP/2 client, the control stream and its hello.
async fn accept_tunnel(listener: &TcpListener) -> Reversed {
    let (tcp, _) = listener.accept().await.unwrap();
    reverse(tcp).await
}

/// The worker's part on an accepted connection (plain or TLS).
async fn reverse<T>(io: T) -> Reversed
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (upgrade_tx, upgrade_rx) = oneshot::channel();
    let upgrade_tx = Arc::new(Mutex::new(Some(upgrade_tx)));
    let upgrade = service_fn(move |mut request: Request<Incoming>| {
        let upgrade_tx = upgrade_tx.clone();
        async move {
            assert_eq!(request.uri().path(), TUNNEL_PATH);
            let on = hyper::upgrade::on(&mut request);
            let _ = upgrade_tx
                .lock()
                .unwrap()
                .take()
                .unwrap()
                .send((request.headers().clone(), on));
            Ok::<_, Infallible>(
                Response::builder()
                    .status(StatusCode::SWITCHING_PROTOCOLS)
                    .header("connection", "upgrade")
                    .header("upgrade", UPGRADE_PROTOCOL)
                    .header(NONCE_HEADER, NONCE)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), upgrade)
            .with_upgrades(),
    );
    let (handshake, on) = upgrade_rx.await.unwrap();
    let upgraded = on.await.unwrap();
    let (mut send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(upgraded)
        .await
        .unwrap();
    let mut connection = Box::pin(connection);
    let (to_agent, body) = Channel::<Bytes, Infallible>::new(4);
    let control = Request::post(format!("https://{DOMAIN}{CONTROL_PATH}"))
        .header(NONCE_HEADER, NONCE)
        .body(body.boxed_unsync())
        .unwrap();
    // Drives the connection here until the hello, to read the agent's SETTINGS after it.
    let hello = tokio::select! {
        hello = send.send_request(control) => hello.unwrap(),
        _ = &mut connection => panic!("the reversed connection ended before the hello"),
    };
    assert_eq!(hello.status(), StatusCode::OK);
    let settings = (
        connection.is_extended_connect_protocol_enabled(),
        connection.current_max_send_streams(),
    );
    tokio::spawn(connection);
    Reversed {
        settings,
        send,
        to_agent,
        from_agent: hello.into_body(),
        handshake,
    }
}

/// The app behind the agent: `/hello` says what it saw, `/echo` streams the request body back,
/// `/trailers-in` shows the request's trailer, `/slow` answers after a while, `/trailers` ends with a trailer, `/ws` switches protocols and
/// echoes bytes.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(app))
                    .with_upgrades(),
            );
        }
    });
    addr
}

async fn app(mut request: Request<Incoming>) -> Result<Response<TestBody>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Ok(match request.uri().path() {
        "/hello" => Response::new(full(format!(
            "hello {} {} host={} xff={} proto={}",
            request.method(),
            request.uri(),
            header("host"),
            header("x-forwarded-for"),
            header("x-forwarded-proto"),
        ))),
        "/echo" => Response::new(
            request
                .into_body()
                .map_err(|_| unreachable!())
                .boxed_unsync(),
        ),
        "/trailers-in" => {
            let collected = request.into_body().collect().await.unwrap();
            let trailer = collected
                .trailers()
                .and_then(|t| t.get("x-sum"))
                .map(|v| v.to_str().unwrap().to_owned());
            Response::new(full(format!("{:?} {trailer:?}", collected.to_bytes())))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Response::new(full("slow done"))
        }
        "/trailers" => {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", "42".parse().unwrap());
            let frames: [Result<_, Infallible>; 2] = [
                Ok(Frame::data(Bytes::from("body"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .header("trailer", "x-checksum")
                .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
                .unwrap()
        }
        "/ws" => {
            assert_eq!(header("upgrade"), "websocket");
            assert_eq!(header("connection"), "upgrade");
            let key = header("sec-websocket-key");
            let on = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    let n = io.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    io.write_all(&buf[..n]).await.unwrap();
                }
            });
            Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", format!("accept-{key}"))
                .body(full(""))
                .unwrap()
        }
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(full("no such path"))
            .unwrap(),
    })
}

/// Starts an agent (one plaintext connection, labelled `test-agent`) for `listener`, serving
/// `to`; it stops when `stop` fires, and the returned channel says when `serve` returned.
fn start_agent(
    listener: &TcpListener,
    to: SocketAddr,
    token: &Token,
) -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
    start_agent_with(listener, to, token, Tls::InsecurePlaintext)
}

fn start_agent_with(
    listener: &TcpListener,
    to: SocketAddr,
    token: &Token,
    tls: Tls,
) -> (oneshot::Sender<()>, oneshot::Receiver<()>) {
    let mut config = AgentConfig::new(DOMAIN, token.clone());
    config.connect = Some(listener.local_addr().unwrap().to_string());
    config.tls = tls;
    config.connections = 1;
    config.label = Some("test-agent".into());
    config.grace = Duration::from_secs(20);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        serve(config, forward_to(to), async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
        let _ = done_tx.send(());
    });
    (stop_tx, done_rx)
}

async fn get(send: &mut SendRequest<TestBody>, path: &str) -> Response<Incoming> {
    let request = Request::get(format!("https://{DOMAIN}{path}"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    send.ready().await.unwrap();
    send.send_request(request).await.unwrap()
}

async fn text(response: Response<Incoming>) -> String {
    String::from_utf8(
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(LIMIT, test)
        .await
        .expect("the test took too long")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_streams_trailers_and_websockets_cross_the_reversed_connection() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token::generate().unwrap();
        let (_stop, _done) = start_agent(&listener, backend().await, &token);
        let mut tunnel = accept_tunnel(&listener).await;

        let handshake = &tunnel.handshake;
        assert_eq!(handshake["host"], DOMAIN);
        assert_eq!(handshake["upgrade"], UPGRADE_PROTOCOL);
        assert_eq!(
            handshake["authorization"],
            format!("Bearer {}", token.as_str()).as_str()
        );
        assert_eq!(handshake[AGENT_LABEL_HEADER], "test-agent");
        // 4096 requests at once (`--max-streams`' default), and the worker's control stream.
        assert_eq!(tunnel.settings, (true, 4097));

        // GET: Host is the tunnel domain; the worker's X-Forwarded-* pass through untouched.
        let response = get(&mut tunnel.send, "/hello?x=1").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            text(response).await,
            "hello GET /hello?x=1 host=app.test xff=203.0.113.7 proto=https"
        );

        // A POST streamed both ways: each chunk comes back before the next is sent.
        let (mut chunks, body) = Channel::<Bytes, Infallible>::new(1);
        let request = Request::post(format!("https://{DOMAIN}/echo"))
            .body(body.boxed_unsync())
            .unwrap();
        tunnel.send.ready().await.unwrap();
        let response = tunnel.send.send_request(request);
        chunks.send_data(Bytes::from("first ")).await.unwrap();
        let mut echoed = response.await.unwrap().into_body();
        let frame = echoed.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "first ");
        chunks.send_data(Bytes::from("second")).await.unwrap();
        let frame = echoed.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "second");
        drop(chunks);
        assert_eq!(echoed.collect().await.unwrap().to_bytes(), "");

        // Trailers from the app reach the worker.
        let response = get(&mut tunnel.send, "/trailers").await;
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "42");
        assert_eq!(collected.to_bytes(), "body");

        // Trailers from the worker reach the app (declared in `Trailer`, as HTTP/1.1 needs).
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", "7".parse().unwrap());
        let frames: [Result<_, Infallible>; 2] = [
            Ok(Frame::data(Bytes::from("data"))),
            Ok(Frame::trailers(trailers)),
        ];
        let request = Request::post(format!("https://{DOMAIN}/trailers-in"))
            .header("trailer", "x-sum")
            .header("content-length", "4")
            .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
            .unwrap();
        tunnel.send.ready().await.unwrap();
        let response = tunnel.send.send_request(request).await.unwrap();
        assert_eq!(text(response).await, "b\"data\" Some(\"7\")");

        // A WebSocket as an RFC 8441 extended CONNECT, spliced to the app's HTTP/1.1 upgrade.
        let mut connect = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("https://{DOMAIN}/ws"))
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(full(""))
            .unwrap();
        connect
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        tunnel.send.ready().await.unwrap();
        let mut response = tunnel.send.send_request(connect).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["sec-websocket-accept"],
            "accept-dGhlIHNhbXBsZSBub25jZQ=="
        );
        assert!(response.headers().get("upgrade").is_none());
        let mut ws = TokioIo::new(hyper::upgrade::on(&mut response).await.unwrap());
        for message in ["ping", "pong and more"] {
            ws.write_all(message.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; message.len()];
            ws.read_exact(&mut buf).await.unwrap();
            assert_eq!(buf, message.as_bytes());
        }
    })
    .await
}

/// The client learns that the app did not answer, not where it is nor why (that is for the
/// agent's log), as from the worker about an app on a local port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_app_is_a_502_that_keeps_the_apps_address_private() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        // A port nobody listens on: bound, then closed.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let token = Token::generate().unwrap();
        let (_stop, _done) = start_agent(&listener, closed, &token);
        let mut tunnel = accept_tunnel(&listener).await;
        let response = get(&mut tunnel.send, "/hello").await;
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()["cache-control"], "no-store");
        let said = text(response).await;
        assert_eq!(said, "502 Bad Gateway: the app is not answering\n");
        assert!(!said.contains(&closed.port().to_string()), "{said}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_line_brings_a_replacement_while_the_old_connection_serves_on() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token::generate().unwrap();
        let (_stop, _done) = start_agent(&listener, backend().await, &token);
        let mut old = accept_tunnel(&listener).await;
        let slow = tokio::spawn({
            let mut send = old.send.clone();
            async move { text(get(&mut send, "/slow").await).await }
        });
        old.to_agent
            .send_data(Bytes::from_static(RECONNECT))
            .await
            .unwrap();
        let mut new = accept_tunnel(&listener).await;
        assert!(text(get(&mut new.send, "/hello").await)
            .await
            .starts_with("hello GET"));
        assert!(text(get(&mut old.send, "/hello").await)
            .await
            .starts_with("hello GET"));
        assert_eq!(slow.await.unwrap(), "slow done");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_says_draining_then_finishes_the_requests_in_flight() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token::generate().unwrap();
        let (stop, done) = start_agent(&listener, backend().await, &token);
        let mut tunnel = accept_tunnel(&listener).await;
        let slow = tokio::spawn({
            let mut send = tunnel.send.clone();
            async move {
                let response = get(&mut send, "/slow").await;
                (response.status(), text(response).await)
            }
        });
        // Let the slow request reach the app before the agent stops.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(()).unwrap();

        let line = tunnel.from_agent.frame().await.unwrap().unwrap();
        assert_eq!(line.into_data().unwrap(), DRAINING);
        // The worker takes the connection out of its balancer and ends its control body.
        drop(tunnel.to_agent);
        assert_eq!(
            slow.await.unwrap(),
            (StatusCode::OK, "slow done".to_owned())
        );
        done.await
            .expect("serve returns once the connection has drained");
        // No new dial: the agent stopped.
        let accepted = tokio::time::timeout(Duration::from_millis(500), listener.accept()).await;
        assert!(accepted.is_err(), "a stopped agent dials no more");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_agent_sends_the_domain_as_sni_offers_only_http1_and_checks_the_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    bounded(async {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![DOMAIN.to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der().to_vec())],
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token::generate().unwrap();
        let ca_pem = Tls::CaPem(ca.pem().into_bytes());
        let (_stop, _done) = start_agent_with(&listener, backend().await, &token, ca_pem);
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let (_, session) = tls.get_ref();
        assert_eq!(session.server_name(), Some(DOMAIN));
        assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
        let mut tunnel = reverse(tls).await;
        assert_eq!(
            text(get(&mut tunnel.send, "/hello").await).await,
            "hello GET /hello host=app.test xff=203.0.113.7 proto=https"
        );

        // An agent trusting another CA refuses this certificate, and keeps retrying.
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_pem = Tls::CaPem(other.pem().into_bytes());
        let (_stop, _done) = start_agent_with(&listener, backend().await, &token, other_pem);
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            assert!(
                acceptor.accept(tcp).await.is_err(),
                "the agent refused the certificate"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_rate_limited_agent_keeps_dialing_and_connects_once_let_in() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let token = Token::generate().unwrap();
        let (_stop, _done) = start_agent(&listener, backend().await, &token);
        for status in [StatusCode::UNAUTHORIZED, StatusCode::TOO_MANY_REQUESTS] {
            let (tcp, _) = listener.accept().await.unwrap();
            let refuse = service_fn(move |_: Request<Incoming>| async move {
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(status)
                        .header("connection", "close")
                        .header("retry-after", "1")
                        .body(full(""))
                        .unwrap(),
                )
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), refuse)
                .await
                .unwrap();
        }
        let mut tunnel = accept_tunnel(&listener).await;
        assert!(text(get(&mut tunnel.send, "/hello").await)
            .await
            .starts_with("hello GET"));
    })
    .await
}
