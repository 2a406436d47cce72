//! The reverse proxy as a client sees it: routing by Host, forwarded and hop-by-hop headers,
//! every error status, keep-alive and the backend pool, client timeouts, HTTP/2.

use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::http::{get, h2_connect, http1_connect, raw, read_until_closed, send, text};
use core_server_tests::raw_backend::RawBackend;
use core_server_tests::{Backend, CoreServer};
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_host_ignoring_case_port_and_trailing_dot() {
    let server = CoreServer::start();
    let a = Backend::start(|_| async {
        http::Response::new(core_server_tests::backend::full("app a"))
    })
    .await;
    let b = Backend::start(|_| async {
        http::Response::new(core_server_tests::backend::full("app b"))
    })
    .await;
    server.add("a.example", a.port);
    server.add("B.Example.", b.port);

    for host in [
        "a.example",
        "A.EXAMPLE",
        "a.example.",
        "a.example:8080",
        "A.Example.:80",
    ] {
        let reply = get(&server.url("/"), host).await;
        assert_eq!(
            (reply.status.as_u16(), reply.body.as_str()),
            (200, "app a"),
            "Host: {host}"
        );
    }
    for host in ["b.example", "b.example:1"] {
        assert_eq!(
            get(&server.url("/"), host).await.body,
            "app b",
            "Host: {host}"
        );
    }
    // `add` again replaces the port.
    server.add("b.example", a.port);
    assert_eq!(get(&server.url("/"), "b.example").await.body, "app a");
    // `remove` stops routing.
    assert_eq!(server.udp("remove b.example"), "ok");
    assert_eq!(get(&server.url("/"), "b.example").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn backend_sees_host_forwarded_headers_and_no_hop_by_hop() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let request = Request::get(server.url("/path?q=1"))
        .header("host", "App.Example:8080")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic eA==")
        .header("x-custom", "kept")
        .body(Full::default())
        .unwrap();
    let seen = send(request).await.body;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines[0], "GET /path?q=1 HTTP/1.1", "{seen}");
    for want in [
        "host: App.Example:8080",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: App.Example:8080",
        "x-custom: kept",
    ] {
        assert!(
            lines.contains(&want),
            "backend did not see {want:?}:\n{seen}"
        );
    }
    for gone in [
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "6.6.6.6",
        "https",
    ] {
        assert!(!seen.contains(gone), "backend saw {gone:?}:\n{seen}");
    }
    assert_eq!(seen.matches("x-forwarded-for").count(), 1, "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn error_statuses() {
    let server = CoreServer::start_with(&["--backend-timeout", "1s"]);
    let slow = Backend::slow(Duration::from_secs(5)).await;
    server.add("slow.example", slow.port);
    let (_down, refusing_port) = core_server_tests::server::refusing_port();
    server.add("down.example", refusing_port);

    // Unknown host: 404, also for an IP literal, a name that cannot be a domain, and a known
    // name with an empty port.
    for host in [
        "unknown.example",
        "127.0.0.1",
        "[::1]:80",
        "bad_name",
        "slow.example:",
    ] {
        let reply = get(&server.url("/"), host).await;
        assert_eq!(reply.status, 404, "Host: {host}");
    }
    assert!(get(&server.url("/"), "unknown.example")
        .await
        .body
        .contains("unknown.example"));

    // Backend refuses: 502.
    let reply = get(&server.url("/"), "down.example").await;
    assert_eq!(reply.status, 502, "{}", reply.body);

    // Backend too slow: 504, after about the timeout.
    let started = Instant::now();
    let reply = get(&server.url("/"), "slow.example").await;
    assert_eq!(reply.status, 504, "{}", reply.body);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "504 came after {:?}",
        started.elapsed()
    );

    // Malformed requests: 400.
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a.example\r\nBad Header Line\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\x01b\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
    ] {
        let answer = raw(server.http_port, garbage).await;
        let status = answer.split_whitespace().nth(1);
        assert_eq!(
            status,
            Some("400"),
            "{:?} got {answer:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    // Still serving after all that.
    let echo = Backend::echo().await;
    server.add("ok.example", echo.port);
    assert_eq!(get(&server.url("/"), "ok.example").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn keep_alive_to_clients_and_pooled_connections_to_backends() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("pool.example", backend.port);

    // Twenty requests on one client connection.
    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    for i in 0..20 {
        let request = Request::get(format!("/{i}"))
            .header("host", "pool.example")
            .body(Full::<Bytes>::default())
            .unwrap();
        sender
            .ready()
            .await
            .expect("keep-alive connection still open");
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    // Twenty more on new client connections.
    for _ in 0..20 {
        assert_eq!(get(&server.url("/"), "pool.example").await.status, 200);
    }
    assert!(
        backend.connections() <= 2,
        "backend saw {} connections for 40 requests",
        backend.connections()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_idle_clients_are_disconnected() {
    let server = CoreServer::start_with(&["--header-timeout", "1s"]);

    // A header that never completes (slowloris).
    let mut slow = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x.example\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10s");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A keep-alive connection left idle after a request.
    let echo = Backend::echo().await;
    server.add("idle.example", echo.port);
    let mut idle = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: idle.example\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "idle connection still open after 10s");
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_prior_knowledge_clients() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("h2.example", backend.port);

    let (mut sender, _connection) = h2_connect(server.http_port).await;
    let request = Request::get("http://h2.example/over-h2")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("x-custom", "kept")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let seen = text(response.into_body()).await;
    // The backend speaks HTTP/1.1 and gets the Host from :authority, core-server's forwarding
    // headers instead of the client's claims.
    assert!(seen.starts_with("GET /over-h2 HTTP/1.1\n"), "{seen}");
    assert!(seen.contains("host: h2.example\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-custom: kept\n"), "{seen}");
    // Cookies, one field per pair on HTTP/2, reach the app in one (RFC 9113 §8.2.3).
    assert!(seen.contains("cookie: a=1; b=2\n"), "{seen}");
    for gone in ["6.6.6.6", "x-real-ip"] {
        assert!(!seen.contains(gone), "{gone}: {seen}");
    }
}

/// An HTTP/1.0 client that asks to keep its connection (`Connection: keep-alive`, as `ab -k`
/// does) keeps it, told so in each response; one that does not ask has it closed.
#[tokio::test(flavor = "multi_thread")]
async fn http10_clients_keep_their_connection_when_they_ask() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("old.example", backend.port);

    let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    for path in ["/one", "/two", "/three"] {
        let request =
            format!("GET {path} HTTP/1.0\r\nHost: old.example\r\nConnection: Keep-Alive\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let answer = read_answer(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("\r\nconnection: keep-alive\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains(&format!("GET {path} HTTP/1.1\n")),
            "{answer}"
        );
    }
    // Asking for both is asking to close.
    let last = b"GET /last HTTP/1.0\r\nHost: old.example\r\nConnection: keep-alive, close\r\n\r\n";
    stream.write_all(last).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("closed after its answer");
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    assert!(!answer.contains("keep-alive"), "{answer}");
    assert_eq!(backend.connections(), 1, "one pooled connection to the app");
}

/// One HTTP/1.x answer with a `content-length`, read whole from `stream`.
async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .expect("a content-length")
                .parse::<usize>()
                .unwrap();
            if body.len() >= length {
                return text;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer));
        let n = read.await.expect("an answer within 10 s").unwrap();
        assert!(n > 0, "closed mid-answer: {text}");
        answer.extend_from_slice(&buffer[..n]);
    }
}

/// HTTP/2 begins with its preface, as a connection's first bytes (RFC 9113 §3.4): sent after an
/// HTTP/1.1 request, it ends the connection instead of switching it to HTTP/2.
#[tokio::test(flavor = "multi_thread")]
async fn http2_only_from_a_connections_first_byte() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("h2.example", backend.port);

    let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: h2.example\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The preface, and an empty SETTINGS frame.
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    stream.write_all(preface).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut rest))
        .await
        .expect("closed within 10 s")
        .unwrap();
    assert_eq!(rest, b"", "no HTTP/2 SETTINGS: the connection closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_sees_the_app() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("curl.example", backend.port);
    let output = std::process::Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-H",
            "Host: curl.example",
            &server.url("/hello"),
        ])
        .output()
        .expect("curl is installed");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("GET /hello HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_close_but_slow_requests_and_streams_do_not() {
    let server = CoreServer::start_with(&["--idle-timeout", "1s"]);
    let echo = Backend::echo().await;
    server.add("idle.example", echo.port);

    // An HTTP/2 connection left idle after one request is closed (hyper's header timeout
    // does not cover HTTP/2).
    let (mut sender, connection) = h2_connect(server.http_port).await;
    let request = Request::get("http://idle.example/")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("idle HTTP/2 connection closed by the server")
        .unwrap()
        .ok();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        started.elapsed()
    );

    // A backend that takes longer than the idle timeout to answer: the request still completes.
    let slow = Backend::slow(Duration::from_millis(2500)).await;
    server.add("slow.example", slow.port);
    let reply = get(&server.url("/"), "slow.example").await;
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (200, "finally")
    );

    // A stream that trickles a byte more often than the idle timeout runs to its end.
    let trickle = Backend::start(|_| async {
        let chunks = futures_util::stream::unfold(0, |i| async move {
            if i == 8 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
            Some((
                Ok(hyper::body::Frame::data(Bytes::from(format!("{i}")))),
                i + 1,
            ))
        });
        http::Response::new(BodyExt::boxed(http_body_util::StreamBody::new(chunks)))
    })
    .await;
    server.add("trickle.example", trickle.port);
    assert_eq!(
        get(&server.url("/"), "trickle.example").await.body,
        "01234567"
    );
}

/// The status line reaches the client as the app wrote it: its own reason phrase, or the
/// standard one.
#[tokio::test(flavor = "multi_thread")]
async fn the_apps_reason_phrase_reaches_the_client() {
    let server = CoreServer::start();
    for (answer, status_line) in [
        (
            &b"HTTP/1.1 299 Custom Thing\r\nContent-Length: 2\r\n\r\nok"[..],
            "HTTP/1.1 299 Custom Thing\r\n",
        ),
        (
            b"HTTP/1.1 404 Not Here\r\nContent-Length: 2\r\n\r\nno",
            "HTTP/1.1 404 Not Here\r\n",
        ),
        (
            b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 2\r\n\r\nhi",
            "HTTP/1.1 418 I'm a teapot\r\n",
        ),
    ] {
        let backend = RawBackend::start(answer).await;
        server.add("reason.example", backend.port);
        let request = b"GET / HTTP/1.1\r\nHost: reason.example\r\nConnection: close\r\n\r\n";
        let response = raw(server.http_port, request).await;
        assert!(response.starts_with(status_line), "{response}");
    }
}

/// Keep-alive connections that go quiet between requests (parked by the worker, see
/// `parked_connections`) are served again when their clients send, as the same clients, and
/// still close at the idle timeout. Two hundred of them, all sending at once: more than one
/// batch of the worker's readiness events.
#[tokio::test(flavor = "multi_thread")]
async fn quiet_keep_alive_connections_are_served_again_then_close_when_idle() {
    const CLIENTS: usize = 200;
    let server = CoreServer::start_with(&["--idle-timeout", "2s"]);
    let echo = Backend::echo().await;
    server.add("quiet.example", echo.port);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(http1_connect(server.http_port).await);
    }
    let ask = |sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>, round: usize| {
        let request = Request::get(format!("/round/{round}"))
            .header("host", "quiet.example")
            .body(Full::<Bytes>::default())
            .unwrap();
        let response = sender.send_request(request);
        async move {
            let response = response.await.expect("the connection is still open");
            assert_eq!(response.status(), 200);
            let answer = text(response.into_body()).await;
            (answer, Instant::now())
        }
    };
    let mut answered = Vec::new();
    for round in 0..3 {
        // Quiet for longer than it takes the worker to park them.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let answers = futures_util::future::join_all(
            clients.iter_mut().map(|(sender, _)| ask(sender, round)),
        );
        let answers = tokio::time::timeout(Duration::from_secs(20), answers)
            .await
            .expect("every client answered");
        answered.clear();
        for (answer, at) in answers {
            assert!(
                answer.starts_with(&format!("GET /round/{round} ")),
                "{answer}"
            );
            assert!(answer.contains("x-forwarded-for: 127.0.0.1\n"), "{answer}");
            answered.push(at);
        }
    }
    // Each closed at the idle timeout after its last answer.
    let closed = clients
        .into_iter()
        .zip(answered)
        .map(|((sender, connection), at)| async move {
            let _open = sender; // a dropped sender would close the connection itself
            connection.await.unwrap().ok();
            at.elapsed()
        });
    let closed = tokio::time::timeout(
        Duration::from_secs(12),
        futures_util::future::join_all(closed),
    )
    .await
    .expect("every connection closed by 10 s after the idle timeout");
    let (first, last) = (closed.iter().min().unwrap(), closed.iter().max().unwrap());
    assert!(
        *first >= Duration::from_millis(1900),
        "one closed {first:?} after its last answer, the idle timeout is 2 s"
    );
    assert!(
        *last < Duration::from_secs(4),
        "one closed {last:?} after its last answer, the idle timeout is 2 s"
    );
}

/// A client that connects ahead and is quiet before its first request (a pre-connecting
/// pool, a browser's speculative connection) is served when it speaks, HTTP/1.1 or HTTP/2.
#[tokio::test(flavor = "multi_thread")]
async fn clients_quiet_before_their_first_request_are_served_http1_or_http2() {
    let server = CoreServer::start();
    let echo = Backend::echo().await;
    server.add("early.example", echo.port);
    let http1 = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let http2 = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;

    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(http1))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::get("/one")
        .header("host", "early.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert!(text(response.into_body()).await.starts_with("GET /one "));

    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(http2),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = Request::get("http://early.example/two")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert!(text(response.into_body()).await.starts_with("GET /two "));
}

/// A response the app cuts short (10 bytes of the 100 its head promised, then its connection
/// breaks) is cut for the client too, over HTTP/1.1 and HTTP/2, never passed off as whole, and
/// the log says which app did it.
#[tokio::test(flavor = "multi_thread")]
async fn a_response_the_app_cuts_short_is_cut_for_the_client_and_logged() {
    let server = CoreServer::start();
    let app = Backend::start(|_| async {
        let frames = futures_util::stream::unfold(0, |step| async move {
            match step {
                0 => Some((Ok(hyper::body::Frame::data(Bytes::from("0123456789"))), 1)),
                1 => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    Some((Err(std::io::Error::other("the app failed")), 2))
                }
                _ => None,
            }
        });
        http::Response::builder()
            .header("content-length", "100")
            .body(BodyExt::boxed(http_body_util::StreamBody::new(frames)))
            .unwrap()
    })
    .await;
    server.add("cut.example", app.port);
    let (mut http1, _) = http1_connect(server.http_port).await;
    let (mut http2, _) = h2_connect(server.http_port).await;
    let over_http1 = Request::get("/")
        .header("host", "cut.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let over_http2 = Request::get("http://cut.example/")
        .body(Full::<Bytes>::default())
        .unwrap();
    for response in [
        http1.send_request(over_http1).await.unwrap(),
        http2.send_request(over_http2).await.unwrap(),
    ] {
        assert_eq!(response.status(), 200);
        let cut = response.into_body().collect().await;
        assert!(cut.is_err(), "a body cut short arrived as if whole");
    }
    let said = format!(
        "backend 127.0.0.1:{}: the response body ended after 10 of its 100 bytes",
        app.port
    );
    let log = server
        .wait_logged_async(&said, Duration::from_secs(10))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.log().matches(&said).count() < 2 {
        assert!(Instant::now() < deadline, "once per client:\n{log}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
