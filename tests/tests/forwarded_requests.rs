//! What a backend receives is what core-server vouches for (issue 7, items 8 and 9): forwarding
//! headers from the client are replaced by the proxy's own, WebSocket upgrades arrive in origin
//! form, and requests that are malformed or ask for what a reverse proxy must not do (two Hosts,
//! `CONNECT`, `Upgrade: h2c`) are refused or neutralised, blaming the right side.

use std::time::Duration;

use core_server_tests::backend::full;
use core_server_tests::http::{h2_connect, raw, read_until_closed, send_raw};
use core_server_tests::raw_backend::RawBackend;
use core_server_tests::{Backend, CoreServer};
use http::Response;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The status code of a raw HTTP/1.1 answer.
fn status(answer: &str) -> Option<&str> {
    answer.split_whitespace().nth(1)
}

/// The echo backend's view of a request sent raw from `from` (an address of this machine).
async fn echoed(server: &CoreServer, from: &str, request: &str) -> String {
    let mut stream = TcpStream::connect((from, server.http_port)).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the answer within 10s");
    assert_eq!(status(&answer), Some("200"), "{answer}");
    answer
}

#[tokio::test(flavor = "multi_thread")]
async fn spoofed_forwarding_headers_are_replaced_by_the_proxys_own() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let spoofed = "GET /who HTTP/1.1\r\n\
        Host: App.Example:8080\r\n\
        Forwarded: for=6.6.6.6;proto=https;host=evil.example\r\n\
        X-Forwarded-For: 6.6.6.6\r\n\
        X-Forwarded-Proto: https\r\n\
        X-Forwarded-Host: evil.example\r\n\
        X-Forwarded-Port: 6666\r\n\
        X-Forwarded-Ssl: on\r\n\
        X-Forwarded-Prefix: /evil\r\n\
        X-Real-IP: 6.6.6.6\r\n\
        True-Client-IP: 6.6.6.6\r\n\
        X-Client-IP: 6.6.6.6\r\n\
        X_Forwarded_For: 6.6.6.6\r\n\
        X-Forwarded_Proto: https\r\n\
        X_Real_IP: 6.6.6.6\r\n\
        Proxy: http://6.6.6.6:8080\r\n\
        X-Custom: kept\r\n\
        Connection: close\r\n\r\n";
    let seen = echoed(&server, "127.0.0.1", spoofed).await;
    for spoof in [
        "6.6.6.6",
        "evil",
        "6666",
        "x-forwarded-ssl",
        "https",
        "x-real-ip",
    ] {
        assert!(!seen.contains(spoof), "backend saw {spoof:?}:\n{seen}");
    }
    for want in [
        "\nx-forwarded-for: 127.0.0.1\n",
        "\nx-forwarded-proto: http\n",
        "\nx-forwarded-host: App.Example:8080\n",
        "\nforwarded: for=127.0.0.1;host=\"App.Example:8080\";proto=http\n",
        "\nx-custom: kept\n",
    ] {
        assert!(seen.contains(want), "backend did not see {want:?}:\n{seen}");
    }
    assert_eq!(seen.matches("forwarded").count(), 4, "{seen}");

    // From an IPv6 client, the node is bracketed and quoted (RFC 7239 §6).
    let from_v6 = "GET / HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n";
    let seen = echoed(&server, "::1", from_v6).await;
    assert!(
        seen.contains("\nforwarded: for=\"[::1]\";host=app.example;proto=http\n"),
        "{seen}"
    );
    assert!(seen.contains("\nx-forwarded-for: ::1\n"), "{seen}");
}

/// A bodiless request that hyper's server takes (here an HTTP/1.1 one the fast path hands over:
/// it has a `TE` field and an absolute-form target) is written for the app as bytes too, by the
/// same rules as every other request.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_hyper_serves_reaches_the_app_by_the_same_rules() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let request = "GET http://app.example?x=1 HTTP/1.1\r\n\
        Host: app.example\r\n\
        TE: trailers\r\n\
        Connection: close, X-Private\r\n\
        X-Private: secret\r\n\
        X-Forwarded-For: 6.6.6.6\r\n\
        X_Forwarded_For: 6.6.6.6\r\n\
        Cookie: a=1\r\n\
        X-Custom: kept\r\n\r\n";
    let seen = echoed(&server, "127.0.0.1", request).await;
    assert!(seen.contains("\nGET /?x=1 HTTP/1.1\n"), "{seen}");
    for gone in ["secret", "6.6.6.6", "x-private"] {
        assert!(!seen.contains(gone), "backend saw {gone:?}:\n{seen}");
    }
    for want in [
        "\nhost: app.example\n",
        "\nte: trailers\n",
        "\ncookie: a=1\n",
        "\nx-custom: kept\n",
        "\nx-forwarded-for: 127.0.0.1\n",
        "\nforwarded: for=127.0.0.1;host=app.example;proto=http\n",
    ] {
        assert!(seen.contains(want), "backend did not see {want:?}:\n{seen}");
    }
}

/// A `GET` with a body of unknown length (chunked; Elasticsearch's `_search` sends one): the app
/// gets it whole, chunked, on a connection that then closes. hyper's client, left to frame it,
/// would send none of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_with_a_chunked_body_reaches_the_app_whole() {
    let server = CoreServer::start();
    let backend = Backend::start(|request| async move {
        let framing = request.headers().get("transfer-encoding").cloned();
        let connection = request.headers().get("connection").cloned();
        let body = request.into_body().collect().await.unwrap().to_bytes();
        let body = String::from_utf8_lossy(&body);
        Response::new(full(format!("{framing:?} {connection:?} {body}")))
    })
    .await;
    server.add("app.example", backend.port);

    let request = "GET /_search HTTP/1.1\r\n\
        Host: app.example\r\n\
        Transfer-Encoding: chunked\r\n\
        Connection: close\r\n\r\n\
        7\r\na query\r\n0\r\n\r\n";
    let answer = echoed(&server, "127.0.0.1", request).await;
    // On a connection of its own: an app that reads no body there would take the chunks for
    // the next request's start.
    let seen = "Some(\"chunked\") Some(\"close\") a query";
    assert!(answer.ends_with(seen), "{answer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrade_reaches_the_backend_in_origin_form() {
    let server = CoreServer::start();
    let mut backend = RawBackend::start(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    server.add("ws.example", backend.port);

    let mut client = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    client
        .write_all(
            b"GET /ws/chat?room=1 HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\n\
              Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let head = backend.next_head().await;
    assert_eq!(
        head.lines().next(),
        Some("GET /ws/chat?room=1 HTTP/1.1"),
        "{head}"
    );
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
}

/// Both get 502, but the page says which: an app that answered what may not be passed on (a
/// switch of protocols nobody asked for), or one that did not answer at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_502_tells_an_invalid_answer_from_none() {
    let server = CoreServer::start();
    let odd = RawBackend::start(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n").await;
    server.add("odd.example", odd.port);
    let (_gone, gone) = core_server_tests::server::refusing_port();
    server.add("gone.example", gone);

    for (host, said) in [
        ("odd.example", "is not valid HTTP/1.1"),
        ("gone.example", "is not answering"),
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let answer = raw(server.http_port, request.as_bytes()).await;
        assert_eq!(status(&answer), Some("502"), "{answer}");
        assert!(answer.contains(said), "{host}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_request_body_is_400_and_the_clients_fault() {
    let server = CoreServer::start();
    // One that reads the body before it answers, as an app taking an upload does: an echo of
    // the head alone could answer before the worker reads the bad chunk.
    let backend = Backend::start(|request| async move {
        let read = request.into_body().collect().await.is_ok();
        Response::new(full(format!("body read: {read}")))
    })
    .await;
    server.add("app.example", backend.port);

    let answer = raw(
        server.http_port,
        b"POST /upload HTTP/1.1\r\nHost: app.example\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\nzz\r\nnot a chunk\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), Some("400"), "{answer}");

    // Logged against the client, not as a failing backend.
    let log = server
        .wait_logged_async("request body from", Duration::from_secs(10))
        .await;
    let backend_blamed = format!("backend 127.0.0.1:{}", backend.port);
    assert!(!log.contains(&backend_blamed), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_host_headers_are_400() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    server.add("other.example", backend.port);

    let answer = raw(
        server.http_port,
        b"GET / HTTP/1.1\r\nHost: app.example\r\nHost: other.example\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), Some("400"), "{answer}");
    assert_eq!(backend.connections(), 0);
}

/// A Host that is not a host and optional port (RFC 9112 §3.2: "a server MUST respond with a 400
/// to ... a Host header field with an invalid field value"), a target in authority form on a
/// method but `CONNECT`, and an HTTP/2 `Host` that names another than the `:authority`: 400,
/// and the app never hears of them, though each names a routed domain somewhere in it.
#[tokio::test(flavor = "multi_thread")]
async fn a_host_that_is_not_one_is_400() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    server.add("other.example", backend.port);

    for host in [
        "app.example, other.example",
        "evil@app.example",
        "app.example/x",
        "app .example",
        "app.example:abc",
        "app.example:65536",
    ] {
        let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
        let answer = raw(server.http_port, request.as_bytes()).await;
        assert_eq!(status(&answer), Some("400"), "{host}: {answer}");
        assert!(answer.contains("not a name or address"), "{host}: {answer}");
    }
    // An absolute target's authority names the host, but the Host header must still be one,
    // and be there.
    for absolute in [
        "GET http://u:p@app.example/ HTTP/1.1\r\nHost: app.example\r\n\r\n",
        "GET http://app.example/ HTTP/1.1\r\nHost: app.example, other.example\r\n\r\n",
        "GET http://app.example/ HTTP/1.1\r\n\r\n",
    ] {
        let answer = raw(server.http_port, absolute.as_bytes()).await;
        assert_eq!(status(&answer), Some("400"), "{absolute:?}: {answer}");
    }

    let authority_form = b"GET app.example HTTP/1.1\r\nHost: other.example\r\n\r\n";
    let answer = raw(server.http_port, authority_form).await;
    assert_eq!(status(&answer), Some("400"), "{answer}");
    assert!(answer.contains("only for CONNECT"), "{answer}");

    let (mut h2, _connection) = h2_connect(server.http_port).await;
    let mismatched = http::Request::get("http://app.example/")
        .header("host", "other.example")
        .body(Full::default())
        .unwrap();
    let response = h2.send_request(mismatched).await.unwrap();
    assert_eq!(response.status(), 400);
    let matching = http::Request::get("http://app.example/")
        .header("host", "App.Example")
        .body(Full::default())
        .unwrap();
    let response = h2.send_request(matching).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(backend.connections(), 1, "only the last reached the app");
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_is_405() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let answer = raw(
        server.http_port,
        b"CONNECT app.example:443 HTTP/1.1\r\nHost: app.example:443\r\n\r\n",
    )
    .await;
    assert_eq!(status(&answer), Some("405"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("\r\nallow: "),
        "{answer}"
    );
    assert_eq!(backend.connections(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_asterisk_form_is_for_options_alone() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    // `GET *` over HTTP/1.1: refused, saying why, and the connection closed; no app sees it.
    let mut stream = send_raw(&server, b"GET * HTTP/1.1\r\nHost: app.example\r\n\r\n").await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("the connection closed after the answer");
    assert_eq!(status(&answer), Some("400"), "{answer}");
    assert!(answer.contains("only for OPTIONS"), "{answer}");

    // Over HTTP/2 (curl, prior knowledge): `GET *` refused, `OPTIONS *` passed on.
    let curl = |method: &str| {
        let output = std::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_version} %{http_code}", "-X", method])
            .args(["--http2-prior-knowledge", "--request-target", "*"])
            .args(["-H", "Host: app.example", &server.url("/")])
            .output()
            .expect("curl is installed");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        (String::from_utf8_lossy(&output.stdout).into_owned(), stderr)
    };
    let (answer, stderr) = curl("GET");
    assert!(answer.ends_with("\n2 400"), "{answer} {stderr}");
    assert_eq!(backend.connections(), 0);
    let (answer, stderr) = curl("OPTIONS");
    assert!(answer.ends_with("\n2 200"), "{answer} {stderr}");
    assert!(answer.starts_with("OPTIONS * HTTP/1.1\n"), "{answer}");

    // And over HTTP/1.1, `OPTIONS *` reaches the app as it was asked.
    let seen = echoed(
        &server,
        "127.0.0.1",
        "OPTIONS * HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(seen.contains("\r\n\r\nOPTIONS * HTTP/1.1\n"), "{seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_h2c_upgrade_is_never_forwarded() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let seen = echoed(
        &server,
        "127.0.0.1",
        "GET /plain HTTP/1.1\r\nHost: app.example\r\n\
         Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert!(seen.contains("\r\n\r\nGET /plain HTTP/1.1\n"), "{seen}");
    let lower = seen.to_ascii_lowercase();
    for gone in ["h2c", "http2-settings", "\nupgrade:"] {
        assert!(!lower.contains(gone), "backend saw {gone:?}:\n{seen}");
    }
}
