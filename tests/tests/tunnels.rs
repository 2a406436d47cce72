//! Requests through a reverse tunnel, end to end: a real `core-agent` dials core-server and
//! serves its domain from a local backend. A GET (the backend sees the client in
//! X-Forwarded-For/-Proto), an `OPTIONS *`, server-sent events arriving as they are sent (and
//! ending at the app when the client goes), a WebSocket echo and trailers both ways, over plain
//! HTTP in local mode and over HTTPS (mkcert, `--ca`); and 1 GiB each way with the worker's
//! and the agent's peak memory flat.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::agent::Agent;
use core_server_tests::backend::{
    check_websocket_echo, describe, full, third_websocket_waits_for_a_place, watched_stream,
    websocket_echo, Body,
};
use core_server_tests::big_body::{drain, peak_kib, zeros, GIB, PEAK_LIMIT_KIB};
use core_server_tests::http::text;
use core_server_tests::mkcert::MkcertCa;
use core_server_tests::tls_client::{Sni, TlsClient};
use core_server_tests::{have_tools, Backend, CoreServer};
use futures_util::stream;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

const APP: &str = "app.example";
const WS: &str = "ws.example";
/// How long a test waits for something that should come at once (an event, a response).
const PATIENCE: Duration = Duration::from_secs(30);

/// How the test's client reaches core-server.
#[derive(Clone)]
enum Via {
    Http(u16),
    /// HTTPS, HTTP/1.1, trusting only the test's mkcert CA; SNI the request's host.
    Https {
        port: u16,
        client: TlsClient,
    },
}

impl Via {
    fn scheme(&self) -> &'static str {
        match self {
            Via::Http(_) => "http",
            Via::Https { .. } => "https",
        }
    }

    /// Sends `request` (for `host`) over a new HTTP/1.1 connection; the response head.
    async fn send(&self, host: &str, request: Request<Body>) -> Response<Incoming> {
        match self {
            Via::Http(port) => {
                over(
                    TcpStream::connect(("127.0.0.1", *port)).await.unwrap(),
                    request,
                )
                .await
            }
            Via::Https { port, client } => {
                let tls = client.connect(*port, &Sni::name(host)).await.unwrap();
                over(tls, request).await
            }
        }
    }

    /// A WebSocket echo through `host`: 20 text messages and a 1 MiB binary one come back.
    async fn websocket_echo(&self, host: &str) {
        let url = format!(
            "{}://{host}/chat",
            if matches!(self, Via::Http(_)) {
                "ws"
            } else {
                "wss"
            }
        );
        match self {
            Via::Http(port) => {
                let stream = TcpStream::connect(("127.0.0.1", *port)).await.unwrap();
                check_websocket_echo(&url, stream, 20).await
            }
            Via::Https { port, client } => {
                let stream = client.connect(*port, &Sni::name(host)).await.unwrap();
                check_websocket_echo(&url, stream, 20).await
            }
        }
    }
}

async fn over<S>(stream: S, request: Request<Body>) -> Response<Incoming>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    tokio::time::timeout(PATIENCE, sender.send_request(request))
        .await
        .expect("a response head in time")
        .expect("a response")
}

fn request(method: &str, path: &str, host: &str, body: Body) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(body)
        .unwrap()
}

/// The app behind the tunnel: `/events` streams server-sent events the test hands it one by
/// one (through `events`, which also tells when the app's request has ended), `/trailers` answers with what it got (body and the client's
/// trailer) and a trailer of its own, anything else is echoed as [`describe`] tells it.
async fn app(events: mpsc::Sender<(mpsc::Sender<Bytes>, oneshot::Receiver<()>)>) -> Backend {
    Backend::start(move |request| {
        let events = events.clone();
        async move {
            match request.uri().path() {
                "/events" => {
                    let (pieces, ended, body) = watched_stream();
                    events.send((pieces, ended)).await.unwrap();
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(body)
                        .unwrap()
                }
                "/trailers" => {
                    let collected = request.into_body().collect().await.unwrap();
                    let client_said = collected
                        .trailers()
                        .and_then(|t| t.get("x-client"))
                        .map(|v| v.to_str().unwrap().to_owned());
                    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-server", HeaderValue::from_static("done"));
                    let frames = stream::iter([
                        Ok(Frame::data(Bytes::from(format!(
                            "{body} / {client_said:?}"
                        )))),
                        Ok(Frame::trailers(trailers)),
                    ]);
                    Response::builder()
                        .header("trailer", "x-server")
                        .body(BodyExt::boxed(StreamBody::new(frames)))
                        .unwrap()
                }
                // 10 bytes of the 100 promised, then the app's connection breaks.
                "/breaks-off" => {
                    let frames = stream::unfold(0, |step| async move {
                        match step {
                            0 => Some((Ok(Frame::data(Bytes::from("0123456789"))), 1)),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                Some((Err(std::io::Error::other("the app failed")), 2))
                            }
                            _ => None,
                        }
                    });
                    Response::builder()
                        .header("content-length", "100")
                        .body(BodyExt::boxed(StreamBody::new(frames)))
                        .unwrap()
                }
                // A head of 40 KiB (a long Content-Security-Policy, many cookies).
                "/large-head" => Response::builder()
                    .header("x-large", "x".repeat(40 << 10))
                    .body(full("large head"))
                    .unwrap(),
                _ => Response::new(full(describe(&request))),
            }
        }
    })
    .await
}

/// A GET, server-sent events, trailers both ways and a WebSocket echo through the tunnels of
/// `APP` and `WS`, which `agent(domain, token, to)` serves.
async fn check_exchanges(server: &CoreServer, via: Via, agent: impl Fn(&str, &str, &str) -> Agent) {
    let (events_tx, mut events_rx) = mpsc::channel(1);
    let app = app(events_tx).await;
    let ws_port = websocket_echo().await;
    let agents = [
        agent(
            APP,
            &server.tunnel_allow(APP),
            &format!("127.0.0.1:{}", app.port),
        ),
        agent(
            WS,
            &server.tunnel_allow(WS),
            &format!("127.0.0.1:{ws_port}"),
        ),
    ];
    for agent in &agents {
        agent.wait_connected(server, 2);
    }

    // GET: the backend sees the client, and how it came.
    let response = via
        .send(APP, request("GET", "/path?q=1", APP, full("")))
        .await;
    assert_eq!(response.status(), 200);
    let length = response.headers().get("content-length").cloned();
    let body = text(response.into_body()).await;
    assert!(body.starts_with("GET /path?q=1 HTTP/1.1\n"), "{body}");
    // Its length, as the app gave it: not chunked by the way.
    assert_eq!(length, Some(body.len().into()), "{body}");
    assert!(body.contains(&format!("\nhost: {APP}\n")), "{body}");
    assert!(body.contains("\nx-forwarded-for: 127.0.0.1\n"), "{body}");
    assert!(
        body.contains(&format!("\nx-forwarded-proto: {}\n", via.scheme())),
        "{body}"
    );

    // A response head larger than HTTP/2's usual 16 KiB, as an app on a local port may send.
    let response = via
        .send(APP, request("GET", "/large-head", APP, full("")))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-large"].len(), 40 << 10);
    assert_eq!(text(response.into_body()).await, "large head");

    // A request head as large as a client may send to an app on a local port (270 KB, past
    // HTTP/2's usual header list limits) reaches the app whole.
    let mut large = request("GET", "/", APP, full(""));
    let value = HeaderValue::from_str(&"v".repeat(3000)).unwrap();
    for i in 0..90 {
        let name = HeaderName::try_from(format!("x-large-{i}")).unwrap();
        large.headers_mut().insert(name, value.clone());
    }
    let response = via.send(APP, large).await;
    assert_eq!(response.status(), 200);
    let body = text(response.into_body()).await;
    for i in [0, 89] {
        let field = format!("\nx-large-{i}: {}\n", "v".repeat(3000));
        assert!(body.contains(&field), "x-large-{i} did not arrive whole");
    }

    // A response body that breaks off at the app breaks off for the client too (it does not
    // end as if whole), and the worker says so.
    let response = via
        .send(APP, request("GET", "/breaks-off", APP, full("")))
        .await;
    assert_eq!(response.status(), 200);
    let cut = response.into_body().collect().await;
    assert!(cut.is_err(), "a body cut short arrived as if whole");
    let said = format!("the agent of {APP}: the response body broke off");
    server.wait_logged_async(&said, PATIENCE).await;

    // `OPTIONS *`, a question to the server as a whole, reaches the app as it was asked.
    let response = via.send(APP, request("OPTIONS", "*", APP, full(""))).await;
    assert_eq!(response.status(), 200);
    let body = text(response.into_body()).await;
    assert!(body.starts_with("OPTIONS * HTTP/1.1\n"), "{body}");

    // Server-sent events: each one reaches the client before the next is even written.
    let response = via
        .send(APP, request("GET", "/events", APP, full("")))
        .await;
    assert_eq!(response.status(), 200);
    let mut events = response.into_body();
    let (sender, ended) = tokio::time::timeout(PATIENCE, events_rx.recv())
        .await
        .unwrap()
        .unwrap();
    for i in 0..5 {
        let event = format!("data: event {i}\n\n");
        sender.send(Bytes::from(event.clone())).await.unwrap();
        let mut seen = String::new();
        while seen.len() < event.len() {
            let frame = tokio::time::timeout(PATIENCE, events.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!("event {i} did not arrive while the stream stayed open: buffered")
                })
                .expect("the stream goes on")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert_eq!(seen, event);
    }
    // The client goes away: the app's request ends at once, not at its next write.
    drop(events);
    tokio::time::timeout(PATIENCE, ended)
        .await
        .expect("the app's request outlived its client, waiting for a write that never came")
        .unwrap_err();
    drop(sender);

    // Trailers both ways.
    let mut trailers = HeaderMap::new();
    trailers.insert("x-client", HeaderValue::from_static("42"));
    let frames = stream::iter([
        Ok(Frame::data(Bytes::from_static(b"hello "))),
        Ok(Frame::data(Bytes::from_static(b"trailers"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut post = request(
        "POST",
        "/trailers",
        APP,
        BodyExt::boxed(StreamBody::new(frames)),
    );
    post.headers_mut()
        .insert("te", HeaderValue::from_static("trailers"));
    post.headers_mut()
        .insert("trailer", HeaderValue::from_static("x-client"));
    let response = via.send(APP, post).await;
    assert_eq!(response.status(), 200);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    assert_eq!(
        String::from_utf8_lossy(&collected.to_bytes()),
        "hello trailers / Some(\"42\")",
        "the body and the client's trailer reach the backend"
    );
    assert_eq!(
        trailers.as_ref().and_then(|t| t.get("x-server")),
        Some(&HeaderValue::from_static("done")),
        "the backend's trailer reaches the client: {trailers:?}"
    );

    // A GET with a body of unknown length (chunked; Elasticsearch's `_search` sends one): the
    // app gets it whole, though hyper's clients, left to frame it, would send none of it.
    let frames = stream::iter([Ok(Frame::data(Bytes::from_static(b"a query")))]);
    let mut get = request(
        "GET",
        "/trailers",
        APP,
        BodyExt::boxed(StreamBody::new(frames)),
    );
    get.headers_mut()
        .insert("transfer-encoding", HeaderValue::from_static("chunked"));
    let response = via.send(APP, get).await;
    assert_eq!(response.status(), 200);
    assert_eq!(text(response.into_body()).await, "a query / None");

    // An upgrade the app answers with an ordinary response (it serves no WebSocket there):
    // the client gets that response.
    let mut upgrade = request("GET", "/no-socket-here", APP, full(""));
    for (name, value) in [
        ("connection", "upgrade"),
        ("upgrade", "websocket"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ] {
        upgrade
            .headers_mut()
            .insert(name, HeaderValue::from_static(value));
    }
    let response = via.send(APP, upgrade).await;
    assert_eq!(response.status(), 200);
    let body = text(response.into_body()).await;
    assert!(body.starts_with("GET /no-socket-here HTTP/1.1\n"), "{body}");

    via.websocket_echo(WS).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exchanges_over_plaintext_in_local_mode() {
    let server = CoreServer::start();
    let via = Via::Http(server.http_port);
    check_exchanges(&server, via, |domain, token, to| {
        Agent::start(&server, domain, token, to, &[])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exchanges_over_https() {
    if !have_tools("exchanges_over_https", &["mkcert"]) {
        return;
    }
    let ca = MkcertCa::new();
    let mut server = CoreServer::unstarted();
    server.add_env(&ca.env());
    server.launch();
    let client = TlsClient::new(&[&ca.root_pem()]).alpn(&["http/1.1"]);
    let via = Via::Https {
        port: server.https_port,
        client,
    };
    check_exchanges(&server, via, |domain, token, to| {
        Agent::start_https(&server, &ca.root_pem(), domain, token, to, &[])
    })
    .await;
}

/// Clients that stop reading their downloads hold what they were sent (a stream's window), not
/// the agent connection: others' requests on it are answered at once (HTTP/2's connection
/// window, shared by its streams, was filled by four such downloads and stalled every stream).
#[tokio::test(flavor = "multi_thread")]
async fn downloads_nobody_reads_stall_no_other_request() {
    let server = CoreServer::start();
    let backend = Backend::start(|request| async move {
        match request.uri().path() {
            "/big" => Response::new(zeros(256 << 20)),
            _ => Response::new(full("quick")),
        }
    })
    .await;
    let token = server.tunnel_allow(APP);
    let to = format!("127.0.0.1:{}", backend.port);
    let agent = Agent::start(&server, APP, &token, &to, &["--connections", "1"]);
    agent.wait_connected(&server, 1);

    // Sixteen downloads whose clients read nothing, on one agent connection.
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let mut client = TcpStream::connect(("127.0.0.1", server.http_port))
            .await
            .unwrap();
        let get = format!("GET /big HTTP/1.1\r\nHost: {APP}\r\n\r\n");
        client.write_all(get.as_bytes()).await.unwrap();
        stalled.push(client);
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // their windows and sockets fill
    let via = Via::Http(server.http_port);
    for _ in 0..3 {
        let quick = via.send(APP, request("GET", "/quick", APP, full("")));
        let response = tokio::time::timeout(Duration::from_secs(5), quick)
            .await
            .expect("answered while the downloads stall");
        let body = tokio::time::timeout(Duration::from_secs(5), text(response.into_body()));
        assert_eq!(body.await.expect("its body too"), "quick");
    }
    drop(stalled);
}

/// `core-agent --max-streams N` takes N requests at once on a connection: the worker's control
/// stream, open as long as the connection, is not one of them.
#[tokio::test(flavor = "multi_thread")]
async fn max_streams_counts_requests_alone() {
    let server = CoreServer::start();
    // Answers once both requests are in.
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let backend = Backend::start(move |_| {
        let both = both.clone();
        async move {
            both.wait().await;
            Response::new(full("together"))
        }
    })
    .await;
    let token = server.tunnel_allow(APP);
    let to = format!("127.0.0.1:{}", backend.port);
    let options = ["--connections", "1", "--max-streams", "2"];
    let agent = Agent::start(&server, APP, &token, &to, &options);
    agent.wait_connected(&server, 1);

    let via = Via::Http(server.http_port);
    let two = futures_util::future::join(
        via.send(APP, request("GET", "/a", APP, full(""))),
        via.send(APP, request("GET", "/b", APP, full(""))),
    );
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), two)
        .await
        .expect("both requests at the app at once");
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
}

/// A WebSocket through a tunnel holds its client's place under `--max-connections` for as
/// long as it is open, as any client connection does (the agents' connections take none).
#[tokio::test(flavor = "multi_thread")]
async fn websockets_through_a_tunnel_count_against_max_connections() {
    let server = CoreServer::start_with(&["--max-connections", "2"]);
    let token = server.tunnel_allow(APP);
    let to = format!("127.0.0.1:{}", websocket_echo().await);
    let agent = Agent::start(&server, APP, &token, &to, &[]);
    agent.wait_connected(&server, 2);
    third_websocket_waits_for_a_place(server.http_port, &format!("ws://{APP}/")).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_each_way_with_flat_memory_in_worker_and_agent() {
    let server = CoreServer::start();
    let worker = server.worker_pid();
    // One backend: GET downloads 1 GiB, POST counts what it gets (pausing midway).
    let paused = Arc::new(AtomicBool::new(false));
    let seen_pause = paused.clone();
    let backend = Backend::start(move |request| {
        let paused = seen_pause.clone();
        async move {
            if request.method() == http::Method::GET {
                return Response::new(zeros(GIB));
            }
            let total = drain(request.into_body(), Duration::from_secs(2)).await;
            paused.store(true, Ordering::SeqCst);
            Response::new(full(total.to_string()))
        }
    })
    .await;
    let token = server.tunnel_allow(APP);
    let agent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", backend.port),
        &[],
    );
    agent.wait_connected(&server, 2);
    let via = Via::Http(server.http_port);

    let started = Instant::now();
    let response = via.send(APP, request("GET", "/big", APP, full(""))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        drain(response.into_body(), Duration::from_secs(2)).await,
        GIB
    );
    eprintln!(
        "1 GiB download through the tunnel in {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let response = via
        .send(APP, request("POST", "/big", APP, zeros(GIB)))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        text(response.into_body()).await,
        GIB.to_string(),
        "the backend got every byte"
    );
    assert!(paused.load(Ordering::SeqCst));
    eprintln!("1 GiB upload through the tunnel in {:?}", started.elapsed());

    for (who, pid) in [("worker", worker), ("agent", agent.pid())] {
        let peak = peak_kib(pid);
        eprintln!("{who} peak RSS: {peak} KiB");
        assert!(
            peak < PEAK_LIMIT_KIB,
            "the {who} peaked at {peak} KiB: bodies are being buffered"
        );
    }
}
