//! Requests without a body, relayed to their app as bytes (the worker's `http1_relay`, and
//! `core_server_proto::relayed_body` for HTTP/2 clients), against an app that answers in every
//! way HTTP/1.1 allows: interim answers, chunks with extensions and trailers, a body that ends when the app
//! closes, HTTP/1.0, heads too large or malformed; and that closes its idle keep-alive
//! connections on its own schedule, as apps do.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_tests::http::{get, h2_connect, read_until_closed, send, send_raw};
use core_server_tests::CoreServer;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// What the app does with a request, by its path.
fn answer(path: &str) -> Option<(&'static str, bool)> {
    // (the answer's bytes, whether the app closes the connection after it)
    Some(match path {
        "/interim" => (
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: yes\r\n\r\nok",
            false,
        ),
        "/chunked" => (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n\
             3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-sum: 5\r\n\r\n",
            false,
        ),
        "/until-close" => ("HTTP/1.1 200 OK\r\n\r\nall of it", true),
        "/http10" => ("HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold", true),
        "/head" => ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", false),
        "/not-modified" => ("HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", false),
        "/reason" => (
            "HTTP/1.1 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        "/garbage" => ("SURPRISE\r\n\r\n", true),
        "/two-lengths" => (
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
            true,
        ),
        "/ok" | "/first-only" => ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        "/fields" => (
            "HTTP/1.1 200 OK\r\nX-A: one\r\nSet-Cookie: a=1\r\nContent-Length: 2\r\n\
             Set-Cookie: b=2; Path=/\r\nX-Empty:\r\nX-B: two\r\n\r\nok",
            false,
        ),
        // Part of a body, the rest never comes (see `serve`).
        "/part" => ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", false),
        // A HEAD answered, then a body it must not have (see `serve`).
        "/late-body" => ("HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n", false),
        _ => return None, // never answered
    })
}

/// An app on raw TCP answering as [`answer`] says, each connection closed `linger` after its
/// first answer if given (an app's keep-alive timeout); `/first-only` is answered only as a
/// connection's first request, later ones close it unanswered. It reports each request line it
/// reads, and `"closed"` when the worker closes a connection that still waits for an answer.
struct App {
    port: u16,
    seen: mpsc::UnboundedReceiver<String>,
    accepted: Arc<AtomicUsize>,
}

impl App {
    async fn start(linger: Option<Duration>) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, heard) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let task = serve(stream, linger, seen.clone());
                tokio::spawn(tokio::time::timeout(Duration::from_secs(60), task));
            }
        });
        App {
            port,
            seen: heard,
            accepted,
        }
    }

    /// The request lines it has read so far.
    fn lines(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.seen.try_recv() {
            lines.push(line);
        }
        lines
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve(
    mut stream: TcpStream,
    linger: Option<Duration>,
    seen: mpsc::UnboundedSender<String>,
) {
    let mut buffer = Vec::new();
    let mut closing_at = None;
    let mut served = 0;
    loop {
        let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") else {
            let mut chunk = [0; 4096];
            let read = match closing_at {
                Some(at) => match tokio::time::timeout_at(at, stream.read(&mut chunk)).await {
                    Ok(read) => read,
                    Err(_) => return, // its keep-alive timeout: closed
                },
                None => stream.read(&mut chunk).await,
            };
            match read {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        buffer.drain(..end + 4);
        let line = head.lines().next().unwrap_or_default().to_owned();
        let _ = seen.send(line.clone());
        let path = line.split(' ').nth(1).unwrap_or_default();
        if path == "/first-only" && served > 0 {
            return;
        }
        served += 1;
        let Some((bytes, close)) = answer(path) else {
            // Never answered: wait for the worker to close it.
            let _ = stream.read(&mut [0; 1]).await;
            let _ = seen.send("closed".to_owned());
            return;
        };
        if stream.write_all(bytes.as_bytes()).await.is_err() || close {
            return;
        }
        if path == "/part" {
            // Until the worker closes the connection.
            let _ = stream.read(&mut [0; 1]).await;
            let _ = seen.send("closed".to_owned());
            return;
        }
        if path == "/late-body" {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let forged = "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged";
            let _ = stream.write_all(forged.as_bytes()).await;
        }
        if let Some(linger) = linger {
            closing_at.get_or_insert(tokio::time::Instant::now() + linger);
        }
    }
}

fn request(server: &CoreServer, method: &str, path: &str) -> Request<Full<Bytes>> {
    let request = Request::builder().method(method).uri(server.url(path));
    request
        .header("host", "app.example")
        .body(Full::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn what_an_app_frames_any_way_reaches_the_client_whole_and_framed_anew() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);

    let interim = get(&server.url("/interim"), "app.example").await;
    assert_eq!(
        (interim.status.as_u16(), interim.body.as_str()),
        (200, "ok")
    );
    assert_eq!(interim.headers["x-app"], "yes");
    assert!(!interim.headers.contains_key("link"), "{interim:?}");

    // Decoded and chunked anew, without the trailer the client did not ask for.
    let chunked = get(&server.url("/chunked"), "app.example").await;
    assert_eq!(
        (chunked.status.as_u16(), chunked.body.as_str()),
        (200, "abcde")
    );
    assert_eq!(chunked.headers["transfer-encoding"], "chunked");

    // A body that ends when the app closes is chunked, so the client knows it is whole.
    let until_close = get(&server.url("/until-close"), "app.example").await;
    assert_eq!(until_close.body, "all of it");
    assert_eq!(until_close.headers["transfer-encoding"], "chunked");

    let old = get(&server.url("/http10"), "app.example").await;
    assert_eq!((old.status.as_u16(), old.body.as_str()), (200, "old"));

    // A HEAD's and a 304's Content-Length says what a GET would get; neither has a body.
    let head = send(request(&server, "HEAD", "/head")).await;
    assert_eq!((head.status.as_u16(), head.body.as_str()), (200, ""));
    assert_eq!(head.headers["content-length"], "10");
    let not_modified = get(&server.url("/not-modified"), "app.example").await;
    assert_eq!(not_modified.status.as_u16(), 304);
    assert_eq!(not_modified.headers["etag"], "\"v1\"");

    // The app's words, on a connection the client keeps.
    let mut client = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    client
        .write_all(b"GET /reason HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0; 24];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HTTP/1.1 200 Fine Thanks");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_that_answers_nonsense_is_a_502() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);
    for path in ["/garbage", "/two-lengths"] {
        let reply = get(&server.url(path), "app.example").await;
        assert_eq!(reply.status.as_u16(), 502, "{path}: {reply:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_closing_its_idle_connections_loses_no_request_and_repeats_none() {
    let server = CoreServer::start();
    let mut app = App::start(Some(Duration::from_millis(100))).await;
    server.add("app.example", app.port);
    // Each request after the first finds its pooled connection closed by the app meanwhile,
    // and goes on a new one.
    let mut sent = Vec::new();
    for method in ["GET", "GET", "POST", "DELETE", "GET"] {
        let mut post = request(&server, method, "/ok");
        if method == "POST" {
            post.headers_mut().insert("content-length", 0.into());
        }
        let reply = send(post).await;
        assert_eq!(
            (reply.status.as_u16(), reply.body.as_str()),
            (200, "ok"),
            "{method}"
        );
        sent.push(format!("{method} /ok HTTP/1.1"));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(app.lines(), sent, "each request reaches the app once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_reused_connection_drops_unanswered_goes_again_only_if_idempotent() {
    let server = CoreServer::start();
    let mut app = App::start(None).await;
    server.add("app.example", app.port);
    let first = get(&server.url("/first-only"), "app.example").await;
    assert_eq!((first.status.as_u16(), first.body.as_str()), (200, "ok"));
    assert_eq!(app.connections(), 1);
    // The app closes the reused connection on reading it: nothing came back, so the GET goes
    // again on a new connection.
    let again = get(&server.url("/first-only"), "app.example").await;
    assert_eq!((again.status.as_u16(), again.body.as_str()), (200, "ok"));
    assert_eq!(app.connections(), 2);
    // The app may have acted on a POST it dropped: not sent twice, the client is told.
    let mut post = request(&server, "POST", "/first-only");
    post.headers_mut().insert("content-length", 0.into());
    assert_eq!(send(post).await.status.as_u16(), 502);
    let line = |method| format!("{method} /first-only HTTP/1.1");
    let expected = [line("GET"), line("GET"), line("GET"), line("POST")];
    assert_eq!(app.lines(), expected);
    assert_eq!(
        app.connections(),
        2,
        "the POST went on the pooled connection"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_relayed_in_order_on_one_client_connection() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);
    let requests = ["/ok", "/until-close", "/chunked", "/ok"]
        .map(|path| format!("GET {path} HTTP/1.1\r\nHost: app.example\r\n\r\n"))
        .concat();
    let last = "GET /reason HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";
    let mut client = send_raw(&server, format!("{requests}{last}").as_bytes()).await;
    let answers = read_until_closed(&mut client, Duration::from_secs(10))
        .await
        .expect("closed after the last");
    let bodies = [
        "\r\n\r\nok",
        "\r\n\r\n9\r\nall of it\r\n0\r\n\r\n",
        "\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        "\r\n\r\nok",
        "HTTP/1.1 200 Fine Thanks",
    ];
    let mut from = 0;
    for body in bodies {
        let at = answers[from..].find(body);
        from += at.unwrap_or_else(|| panic!("{body:?} not next in:\n{answers}")) + body.len();
    }
    assert!(
        !answers.contains("x-sum: 5"),
        "no trailer the client did not ask for"
    );
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 5, "{answers}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_while_the_app_thinks_closes_the_apps_connection() {
    let server = CoreServer::start();
    let mut app = App::start(None).await;
    server.add("app.example", app.port);
    let mut client = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    client
        .write_all(b"GET /forever HTTP/1.1\r\nHost: app.example\r\n\r\n")
        .await
        .unwrap();
    let line = tokio::time::timeout(Duration::from_secs(10), app.seen.recv()).await;
    assert_eq!(line.unwrap().unwrap(), "GET /forever HTTP/1.1");
    drop(client);
    let closed = tokio::time::timeout(Duration::from_secs(5), app.seen.recv()).await;
    assert_eq!(closed.expect("closed within 5 s").unwrap(), "closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn bytes_an_app_sends_after_its_answer_never_reach_the_next_client() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);
    // The app sends the bytes 50 ms after its answer; the next request 200 ms after it (the
    // pool peeks at the connection) and 80 ms after it (it goes by what tokio saw come on it).
    for pause in [200, 200, 80, 80] {
        let head = send(request(&server, "HEAD", "/late-body")).await;
        assert_eq!(head.status.as_u16(), 200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        // The connection the stray bytes came on is not used again.
        let next = get(&server.url("/ok"), "app.example").await;
        assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "ok"));
    }
}

/// What an HTTP/2 client gets for `METHOD path` on `sender`: the status, the headers, the body
/// and the trailers.
async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
) -> (u16, HeaderMap, String, Option<HeaderMap>) {
    let request = Request::builder()
        .method(method)
        .uri(format!("http://app.example{path}"))
        .body(Full::default())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
        .await
        .expect("a response within 30 s")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.expect("a whole body");
    let trailers = collected.trailers().cloned();
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    (parts.status.as_u16(), parts.headers, body, trailers)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_gets_what_an_app_frames_any_way_trailers_included() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);
    let (mut sender, _connection) = h2_connect(server.http_port).await;

    let (status, headers, body, _) = h2_send(&mut sender, "GET", "/interim").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(headers["x-app"], "yes");
    assert!(!headers.contains_key("link"), "{headers:?}");

    // Each field its own value, in order, whatever the values share on the way.
    let (_, headers, body, _) = h2_send(&mut sender, "GET", "/fields").await;
    assert_eq!(body, "ok");
    let values = |name| {
        (headers.get_all(name).iter())
            .map(|v| v.to_str().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(values("set-cookie"), ["a=1", "b=2; Path=/"]);
    for (name, value) in [
        ("x-a", "one"),
        ("x-empty", ""),
        ("x-b", "two"),
        ("content-length", "2"),
    ] {
        assert_eq!(values(name), [value], "{name}");
    }

    let (status, _, body, trailers) = h2_send(&mut sender, "GET", "/chunked").await;
    assert_eq!((status, body.as_str()), (200, "abcde"));
    assert_eq!(trailers.expect("the app's trailers")["x-sum"], "5");

    let (_, _, body, _) = h2_send(&mut sender, "GET", "/until-close").await;
    assert_eq!(body, "all of it");
    let (_, _, body, _) = h2_send(&mut sender, "GET", "/http10").await;
    assert_eq!(body, "old");

    let (status, headers, body, _) = h2_send(&mut sender, "HEAD", "/head").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(headers["content-length"], "10");
    let (status, headers, _, _) = h2_send(&mut sender, "GET", "/not-modified").await;
    assert_eq!(status, 304);
    assert_eq!(headers["etag"], "\"v1\"");

    for path in ["/garbage", "/two-lengths"] {
        let (status, ..) = h2_send(&mut sender, "GET", path).await;
        assert_eq!(status, 502, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_clients_requests_reuse_the_apps_connection_only_when_it_is_clean() {
    let server = CoreServer::start();
    let mut app = App::start(None).await;
    server.add("app.example", app.port);
    let (mut sender, _connection) = h2_connect(server.http_port).await;
    for path in ["/ok", "/chunked", "/ok"] {
        assert_eq!(h2_send(&mut sender, "GET", path).await.0, 200, "{path}");
    }
    assert_eq!(
        app.connections(),
        1,
        "one connection, back in the pool after each answer"
    );

    // Bytes after a HEAD's answer (50 ms after it): that connection is not used again, found
    // by a peek (200 ms later) or by tokio's readiness (80 ms later).
    for pause in [200, 80, 80] {
        assert_eq!(h2_send(&mut sender, "HEAD", "/late-body").await.0, 200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (status, _, body, _) = h2_send(&mut sender, "GET", "/ok").await;
        assert_eq!((status, body.as_str()), (200, "ok"));
    }

    // A client that resets its stream mid-body: that connection is closed, not kept.
    app.lines();
    let part = Request::get("http://app.example/part")
        .body(Full::default())
        .unwrap();
    let mut body = sender.send_request(part).await.unwrap().into_body();
    let first = body.frame().await.expect("a frame").expect("data");
    assert_eq!(first.into_data().unwrap(), "abc");
    drop(body);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while app.seen.recv().await.as_deref() != Some("closed") {}
    });
    closed
        .await
        .expect("the app's connection closed within 5 s");

    // Pooled connections the app drops unanswered: a GET goes again, a POST does not.
    assert_eq!(
        h2_send(&mut sender, "GET", "/ok").await.0,
        200,
        "one in the pool"
    );
    app.lines();
    for _ in 0..2 {
        assert_eq!(h2_send(&mut sender, "GET", "/first-only").await.0, 200);
    }
    assert_eq!(h2_send(&mut sender, "POST", "/first-only").await.0, 502);
    let lines = app.lines();
    let sent = |method: &str| lines.iter().filter(|l| l.starts_with(method)).count();
    assert_eq!(sent("GET "), 4, "each GET sent twice: {lines:?}");
    assert_eq!(sent("POST "), 1, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_hyper_serves_gets_relayed_answers_framed_by_hyper() {
    let server = CoreServer::start();
    let app = App::start(None).await;
    server.add("app.example", app.port);
    // The fast path leaves a request with `TE` to hyper, which serves the connection from
    // there on: trailers for the request that asked for them, none for the one that did not.
    let requests = [
        "GET /chunked HTTP/1.1\r\nHost: app.example\r\nTE: trailers\r\n\r\n",
        "HEAD /head HTTP/1.1\r\nHost: app.example\r\n\r\n",
        "GET /chunked HTTP/1.1\r\nHost: app.example\r\n\r\n",
        "GET /reason HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let mut client = send_raw(&server, requests.as_bytes()).await;
    let answers = read_until_closed(&mut client, Duration::from_secs(10))
        .await
        .expect("closed after the last");
    assert_eq!(answers.matches("HTTP/1.1 ").count(), 4, "{answers}");
    assert_eq!(answers.matches("x-sum: 5").count(), 1, "{answers}");
    assert_eq!(answers.matches("3\r\nabc\r\n2\r\nde\r\n0\r\n").count(), 2);
    assert!(answers.contains("content-length: 10\r\n"), "{answers}");
    assert!(answers.contains("HTTP/1.1 200 Fine Thanks"), "{answers}");
}
