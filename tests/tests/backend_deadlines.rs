//! Every wait on the way to and from a backend has a deadline, counted from the right moment
//! (issue 7, item 2, the backend's side): the response head from the end of the request body, so
//! a slow upload to a healthy backend succeeds; a stalled upload, a backend stalling after its
//! response head, and a quiet WebSocket are each ended after the timeout instead of held; and
//! idle pooled connections to one backend are capped.
//!
//! Each test runs with `--backend-timeout 1s` and gives the proxy 10 s to act.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_tests::backend::{full, Body};
use core_server_tests::big_body::zeros;
use core_server_tests::http::{read_until_closed, send_raw, text};
use core_server_tests::load::raise_open_file_limit;
use core_server_tests::raw_backend::RawBackend;
use core_server_tests::{Backend, CoreServer};
use futures_util::stream;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: &[&str] = &["--backend-timeout", "1s"];
/// How long the proxy may take to end what the timeout ends (generous: the machine is noisy).
const WITHIN: Duration = Duration::from_secs(10);

/// A backend that reads the whole request body, then at once answers how many bytes it had.
async fn body_counting_backend() -> Backend {
    Backend::start(|request: Request<hyper::body::Incoming>| async move {
        match request.into_body().collect().await {
            Ok(body) => Response::new(full(format!("got {} bytes", body.to_bytes().len()))),
            Err(e) => Response::new(full(format!("body broke off: {e}"))),
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_slower_than_the_timeout_to_a_healthy_backend_succeeds() {
    let server = CoreServer::start_with(TIMEOUT);
    let backend = body_counting_backend().await;
    server.add("upload.example", backend.port);

    // Six pieces, 400 ms apart: 2.4 s in all, each gap well inside the timeout.
    let pieces = stream::unfold(0, |i| async move {
        if i == 6 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        Some((Ok(Frame::data(Bytes::from_static(b"0123456789"))), i + 1))
    });
    let body: Body = BodyExt::boxed(StreamBody::new(pieces));
    let request = Request::post(server.url("/upload"))
        .header("host", "upload.example")
        .body(body)
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("a response within 30s")
        .unwrap();
    let status = response.status();
    assert_eq!(
        (status.as_u16(), text(response.into_body()).await.as_str()),
        (200, "got 60 bytes")
    );
}

/// Sends 10 bytes of a promised 100-byte upload to upload.example, then nothing; what the
/// client got before its connection was closed.
async fn upload_that_stops(server: &CoreServer) -> String {
    let mut client = send_raw(
        server,
        b"POST / HTTP/1.1\r\nHost: upload.example\r\nContent-Length: 100\r\n\r\nonly ten..",
    )
    .await;
    read_until_closed(&mut client, WITHIN)
        .await
        .unwrap_or_else(|so_far| panic!("still open after {WITHIN:?}, got {so_far:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_stops_arriving_is_ended_with_408() {
    let server = CoreServer::start_with(TIMEOUT);
    let backend = body_counting_backend().await;
    server.add("upload.example", backend.port);

    let answer = upload_that_stops(&server).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_that_stops_after_an_early_answer_is_not_held() {
    let server = CoreServer::start_with(TIMEOUT);
    let port = early_answering_backend().await;
    server.add("upload.example", port);

    let answer = upload_that_stops(&server).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backend_that_stalls_after_its_head_is_cut_off() {
    let server = CoreServer::start_with(TIMEOUT);
    // Promises 100 bytes, sends 5, then nothing.
    let _backend = RawBackend::start(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello").await;
    server.add("stall.example", _backend.port);

    let mut client = send_raw(&server, b"GET / HTTP/1.1\r\nHost: stall.example\r\n\r\n").await;
    let answer = read_until_closed(&mut client, WITHIN)
        .await
        .unwrap_or_else(|so_far| panic!("client held for {WITHIN:?}, got {so_far:?}"));
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello"), "{answer}");
}

/// A client that takes no byte of its download for `--backend-timeout` is cut off (it would
/// hold the app's connection for ever); one that reads slowly but steadily is not.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_cut_off_but_a_slow_reader_is_not() {
    const BODY: u64 = 256 << 20;
    let server = CoreServer::start_with(&["--backend-timeout", "2s"]);
    let backend = Backend::start(|_| async { Response::new(zeros(BODY)) }).await;
    server.add("big.example", backend.port);
    let get = b"GET / HTTP/1.1\r\nHost: big.example\r\n\r\n";
    let stalled = send_raw(&server, get).await;
    let slow = send_raw(&server, get).await;
    only_the_stalled_one_is_cut_off(stalled, slow, BODY).await;
}

/// Reads `slow` a little every 100 ms for 6 s, and never `stalled`, each asking for a `body`
/// of that many bytes: then `slow` is still served, and `stalled` was cut off.
async fn only_the_stalled_one_is_cut_off(mut stalled: TcpStream, mut slow: TcpStream, body: u64) {
    let mut buffer = vec![0u8; 16 << 10];
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = tokio::time::timeout(WITHIN, slow.read(&mut buffer)).await;
        let read = read.expect("the slow reader got more").unwrap();
        assert!(
            read > 0,
            "the slow reader was cut off after {:?}",
            started.elapsed()
        );
    }
    let mut got = 0;
    let drained = tokio::time::timeout(WITHIN, async {
        while let Ok(read @ 1..) = stalled.read(&mut buffer).await {
            got += read as u64;
        }
    });
    drained.await.expect("the stalled client's connection ends");
    assert!(
        got < body,
        "the client that stopped reading got the whole body"
    );
}

/// A backend for the send-timeout tests: a POST gets `ok`, `GET /small` a few bytes, any other
/// GET 256 MiB.
async fn big_and_small_backend() -> Backend {
    Backend::start(|request: Request<hyper::body::Incoming>| async move {
        match (request.method().as_str(), request.uri().path()) {
            ("POST", _) => Response::new(full("ok")),
            (_, "/small") => Response::new(full("small")),
            _ => Response::new(zeros(256 << 20)),
        }
    })
    .await
}

/// An HTTP/2 connection to `server` whose streams' windows start at `window`.
async fn h2_with_window(
    server: &CoreServer,
    window: u32,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .adaptive_window(false)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// The same for an HTTP/2 stream: one whose client takes nothing of its response (its window
/// left at 0, a small response too) is reset, letting go of the app's connection (or a
/// tunnel's stream); a slow but steady reader on the same connection is served on.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_stream_whose_client_stops_reading_is_reset_but_a_slow_one_is_not() {
    let server = CoreServer::start_with(&["--backend-timeout", "2s"]);
    let backend = big_and_small_backend().await;
    server.add("big.example", backend.port);
    let get = |sender: &mut hyper::client::conn::http2::SendRequest<_>, path: &str| {
        let request = Request::get(format!("http://big.example{path}")).body(Full::default());
        sender.send_request(request.unwrap())
    };
    let mut sender = h2_with_window(&server, 65_535).await;
    let stalled = get(&mut sender, "/").await.unwrap().into_body();
    let mut slow = get(&mut sender, "/").await.unwrap().into_body();
    // Its whole response is one piece, which the client never lets come.
    let mut closed = h2_with_window(&server, 0).await;
    let small = get(&mut closed, "/small").await.unwrap().into_body();

    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let frame = tokio::time::timeout(WITHIN, slow.frame()).await;
        let frame = frame.expect("the slow reader got more");
        assert!(
            matches!(frame, Some(Ok(_))),
            "the slow reader was cut off after {:?}: {frame:?}",
            started.elapsed()
        );
    }
    for (which, body) in [("stopped reading", stalled), ("never let it come", small)] {
        let rest = tokio::time::timeout(WITHIN, body.collect()).await;
        let rest = rest.unwrap_or_else(|_| panic!("the stream whose client {which} is not reset"));
        assert!(rest.is_err(), "the client that {which} got the whole body");
    }
}

/// The same for a connection hyper serves (HTTP/1.1 after a request with a body): one that
/// takes no byte of its response is closed, a slow but steady reader is not.
#[tokio::test(flavor = "multi_thread")]
async fn an_http1_client_that_stops_reading_after_an_upload_is_cut_off_but_a_slow_one_is_not() {
    let server = CoreServer::start_with(&["--backend-timeout", "2s"]);
    let backend = big_and_small_backend().await;
    server.add("big.example", backend.port);
    let post = b"POST /up HTTP/1.1\r\nHost: big.example\r\nContent-Length: 1\r\n\r\nx";
    let get = b"GET / HTTP/1.1\r\nHost: big.example\r\n\r\n";
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = send_raw(&server, post).await;
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok") {
            let byte = tokio::time::timeout(WITHIN, client.read_u8()).await;
            answer.push(byte.expect("the POST answered").unwrap());
        }
        client.write_all(get).await.unwrap();
        clients.push(client);
    }
    let (stalled, slow) = (clients.remove(0), clients.remove(0));
    only_the_stalled_one_is_cut_off(stalled, slow, 256 << 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_websocket_is_closed_but_a_talking_one_is_not() {
    let server = CoreServer::start_with(TIMEOUT);
    // Switches protocols, then echoes every byte.
    let backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    server.add("ws.example", backend.port);
    let upgrade = b"GET /ws HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut client = send_raw(&server, upgrade).await;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(WITHIN, client.read_u8())
            .await
            .expect("the 101 within 10s")
            .unwrap();
        head.push(byte);
    }
    assert!(head.starts_with(b"HTTP/1.1 101 "));

    // A byte every 400 ms for 2.4 s, more than twice the timeout: it stays open.
    for i in 0..6u8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(&[b'a' + i]).await.unwrap();
        let echo = tokio::time::timeout(WITHIN, client.read_u8())
            .await
            .expect("the echo within 10s")
            .expect("the splice is still open while bytes move");
        assert_eq!(echo, b'a' + i);
    }
    // Then quiet: closed.
    read_until_closed(&mut client, WITHIN)
        .await
        .unwrap_or_else(|so_far| panic!("quiet WebSocket held for {WITHIN:?}, got {so_far:?}"));
}

/// A backend that answers as soon as it has a request head, then reads and discards the body
/// for the connection's reuse (as Node's http server does), never closing first.
async fn early_answering_backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(tokio::time::timeout(Duration::from_secs(120), async move {
                let mut buf = [0u8; 4096];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }));
        }
    });
    port
}

/// An HTTP/1.1 backend answering after `delay`; it counts its open connections.
async fn counting_backend(delay: Duration) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |_| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(full("ok")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, open)
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_pooled_connections_to_a_backend_are_capped() {
    /// The cap core-server documents (backend_pool.rs, `MAX_IDLE_PER_BACKEND`).
    const CAP: usize = 512;
    const REQUESTS: usize = CAP + 72;
    // A client socket, and the proxy's and the backend's ends of a backend connection each.
    raise_open_file_limit(3 * REQUESTS as u64 + 100);
    let server = CoreServer::start();
    let (port, open) = counting_backend(Duration::from_millis(500)).await;
    server.add("busy.example", port);

    // All at once, each on a client connection of its own: the proxy opens one backend
    // connection per request in flight.
    let requests = (0..REQUESTS).map(|_| {
        let url = server.url("/");
        tokio::spawn(async move { core_server_tests::http::get(&url, "busy.example").await })
    });
    for request in futures_util::future::join_all(requests).await {
        assert_eq!(request.unwrap().status, 200);
    }
    let peak = open.load(Ordering::SeqCst);
    // The connections beyond the cap close once their request is done.
    let mut still_open = peak;
    for _ in 0..100 {
        still_open = open.load(Ordering::SeqCst);
        if still_open <= CAP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        still_open <= CAP,
        "{still_open} idle connections to the backend kept (peak {peak})"
    );
}
