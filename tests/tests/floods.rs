//! Connection floods and slow clients (issue 7, items 1 and 2): thousands of idle or
//! trickling connections do not keep a normal request from being answered within 1 s, every
//! connection meets a deadline from its accept on, HTTP/2 PINGs do not count as activity, and
//! HTTP/2 streams per connection are capped; out of descriptors, the idle pooled connections
//! to apps are closed first.
//!
//! The tests here hold thousands of sockets and share two cores: they take turns ([`HEAVY`]).

use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::http::get;
use core_server_tests::load::raise_open_file_limit;
use core_server_tests::{Backend, CoreServer};
use futures_util::stream::{self, StreamExt};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One test at a time: their timing bounds assume the machine is not also flooded by another.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Opens `count` TCP connections to `port` that send nothing, 256 connecting at a time, and
/// waits until the kernel has handed them to the worker.
async fn open_idle(port: u16, count: usize) -> Vec<TcpStream> {
    let idle = stream::iter(0..count)
        .map(|_| async move {
            tokio::time::timeout(
                Duration::from_secs(30),
                TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            .expect("connected within 30s (the worker keeps accepting)")
            .expect("connected")
        })
        .buffer_unordered(256)
        .collect()
        .await;
    // The kernel hands a silent connection to the worker only after about 1 s, when it resends
    // its SYN-ACK (TCP_DEFER_ACCEPT): until then the worker does not hold them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    idle
}

/// A request to a routed app, which must be answered (200) within 1 s.
async fn answered_within_a_second(server: &CoreServer, host: &str) {
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(1), get(&server.url("/"), host))
        .await
        .unwrap_or_else(|_| panic!("no answer within 1s:\n{}", tail(&server.log())));
    assert_eq!(reply.status, 200, "{}", reply.body);
    eprintln!("normal request answered in {:?}", started.elapsed());
}

fn tail(log: &str) -> &str {
    &log[log.len().saturating_sub(3000)..]
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many sockets process `pid` holds.
fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Whether the server closed `stream` within `limit` (it may keep writing `trickle`, one byte
/// a second, meanwhile); when, counted from `connected`.
async fn closed_within(
    stream: &mut TcpStream,
    connected: Instant,
    trickle: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let mut bytes = trickle.iter();
    let mut buf = [0u8; 1024];
    while connected.elapsed() < limit {
        if let Some(byte) = bytes.next() {
            if stream.write_all(&[*byte]).await.is_err() {
                return Some(connected.elapsed());
            }
        }
        match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(connected.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

/// A copy of the binaries whose `core-server` starts with an open-file limit of 1024, soft and
/// hard (the limit the flood exhausted: a default soft limit, and nothing to raise
/// it), and with `args` added to its command line.
fn install_with_1024_open_files(args: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = core_server_tests::server::install_copy();
    let binary = dir.path().join("core-server");
    std::fs::rename(&binary, dir.path().join("core-server.real")).unwrap();
    std::fs::write(
        &binary,
        format!("#!/bin/sh\nulimit -n 1024 || exit 1\nexec \"$0.real\" {args} \"$@\"\n"),
    )
    .unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_connections_at_a_1024_open_file_limit() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(2_500);
    let install = install_with_1024_open_files("");
    let server = CoreServer::start_installed(install.path());
    let limit = proc_limit(server.worker_pid());
    assert_eq!(limit, 1024, "the worker runs with the limit under test");
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let idle = open_idle(server.http_port, 2_000).await;
    answered_within_a_second(&server, "app.example").await;
    // The default cap leaves descriptors to spare: accept never ran out of them.
    assert!(
        !server.log().contains("accept failed"),
        "{}",
        tail(&server.log())
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_accept_pauses_and_logs_rarely() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(2_500);
    // A cap above what 1024 descriptors allow: accept itself fails with EMFILE.
    let install = install_with_1024_open_files("--max-connections 5000");
    let server = CoreServer::start_installed(install.path());
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let idle = open_idle(server.http_port, 2_000).await;
    // Idle connections are closed to give descriptors back, and the cap comes down to what
    // fits, leaving descriptors for connections to apps: requests still get through.
    for _ in 0..10 {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            get(&server.url("/"), "app.example"),
        )
        .await
        .unwrap_or_else(|_| panic!("no answer within 10s:\n{}", tail(&server.log())));
        assert_eq!(reply.status, 200, "{}", tail(&server.log()));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = server.log();
    assert!(log.contains("from now on, not 5000"), "{}", tail(&log));
    let failures = log.matches("accept failed").count();
    assert!(
        (1..=3).contains(&failures),
        "{failures} accept failures logged:\n{}",
        tail(&log)
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn out_of_descriptors_idle_connections_to_apps_close_first() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(2_500);
    // 1024 descriptors: the default cap is 384 clients, each with a connection to its app.
    let install = install_with_1024_open_files("");
    let server = CoreServer::start_installed(install.path());
    let slow = || {
        Backend::start(|_| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            http::Response::new(core_server_tests::backend::full("ok"))
        })
    };
    let (a, b) = (slow().await, slow().await);
    server.add("a.example", a.port);
    server.add("b.example", b.port);

    // Three HTTP/2 clients with 128 streams each: 384 connections to app A at once, all idle
    // in the pool afterwards.
    let mut streams = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (sender, connection) = core_server_tests::http::h2_connect(server.http_port).await;
        for _ in 0..128 {
            let mut sender = sender.clone();
            let request = Request::get("http://a.example/")
                .body(Full::<Bytes>::default())
                .unwrap();
            streams.push(tokio::spawn(async move {
                sender.send_request(request).await.map(|r| r.status())
            }));
        }
        clients.push(connection);
    }
    for stream in streams {
        assert_eq!(stream.await.unwrap().unwrap(), 200);
    }
    // 340 clients of app B at once, each with a connection to B: more descriptors than A's
    // idle ones leave, fewer clients than the cap (at the cap, idle clients would be asked to
    // make room, a client whose request is not read yet counting as idle). A's idle
    // connections go first; no client is refused or failed.
    let requests = (0..340).map(|_| {
        let url = server.url("/");
        tokio::spawn(async move {
            let reply = get(&url, "b.example");
            tokio::time::timeout(Duration::from_secs(30), reply).await
        })
    });
    let replies = futures_util::future::join_all(requests).await;
    let failed = replies
        .into_iter()
        .filter(|reply| !matches!(reply, Ok(Ok(reply)) if reply.status == 200))
        .count();
    assert_eq!(
        failed,
        0,
        "{failed} of 340 failed:\n{}",
        tail(&server.log())
    );
    drop(clients);
}

/// The worker's open-file soft limit.
fn proc_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_idle_connections_with_max_connections_500() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(2_500);
    let server = CoreServer::start_with(&["--max-connections", "500"]);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let idle = open_idle(server.http_port, 2_000).await;
    answered_within_a_second(&server, "app.example").await;
    // Idle connections were closed to make room: the worker holds no more than its cap (and
    // its listeners, UDP and IPC sockets, and a pooled backend connection). Evicted
    // connections close in their own tasks, a moment later: a count taken before may be over.
    let mut held = open_sockets(server.worker_pid());
    for _ in 0..20 {
        if held <= 500 + 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        held = open_sockets(server.worker_pid());
    }
    assert!(held <= 500 + 8, "the worker holds {held} sockets");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_idle_connections_at_the_default_limit() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(10_500);
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    answered_within_a_second(&server, "app.example").await;
    let worker = server.worker_pid();
    let rss_before = proc_status_kib(worker, "VmRSS:");
    let sockets_before = open_sockets(worker);

    let idle = open_idle(server.http_port, 10_000).await;
    // Let the worker take in the last of them before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let held = open_sockets(worker) - sockets_before;
    let rss = proc_status_kib(worker, "VmRSS:");
    eprintln!(
        "worker: open-file limit {}, {held} idle client connections held, VmRSS {rss_before} KiB \
         -> {rss} KiB: {:.2} KiB per idle connection",
        proc_limit(worker),
        (rss - rss_before) as f64 / held.max(1) as f64
    );
    answered_within_a_second(&server, "app.example").await;
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_without_a_request_close_at_the_header_timeout() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--header-timeout", "2s", "--idle-timeout", "60s"]);
    let mut settings_frame = H2_PREFACE.to_vec();
    settings_frame.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    // The kernel hands a silent connection to the worker only after its 1 s of deferral
    // (TCP_DEFER_ACCEPT), and the header timeout starts then; one that sent at once, at once.
    let cases: [(&str, &[u8], Duration); 3] = [
        ("a silent connection", b"", Duration::from_millis(2900)),
        (
            "a partial HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n",
            Duration::from_secs(1),
        ),
        (
            "an HTTP/2 preface and SETTINGS, no request",
            &settings_frame,
            Duration::from_secs(1),
        ),
    ];
    for (what, bytes, at_least) in cases {
        let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
            .await
            .unwrap();
        let connected = Instant::now();
        stream.write_all(bytes).await.unwrap();
        let closed = closed_within(&mut stream, connected, b"", Duration::from_secs(15)).await;
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 15s"));
        assert!(!server.log().contains("cannot defer"), "{}", server.log());
        assert!(
            closed >= at_least && closed < Duration::from_secs(10),
            "{what}: closed after {closed:?}, the header timeout is 2s (expected at least \
             {at_least:?})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_connection_without_a_request_is_sent_goaway_at_the_header_timeout() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--header-timeout", "2s", "--idle-timeout", "60s"]);
    let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let connected = Instant::now();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    stream.write_all(&hello).await.unwrap();
    // The server's SETTINGS, its acknowledgement of ours and a WINDOW_UPDATE come first.
    let goaway = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let frame = read_frame(&mut stream).await;
            if frame.kind == GOAWAY {
                return frame;
            }
        }
    })
    .await
    .expect("a GOAWAY within 10s");
    let told = connected.elapsed();
    assert!(
        told >= Duration::from_millis(1500),
        "GOAWAY after {told:?}, the header timeout is 2s"
    );
    assert_eq!(
        goaway.payload[4..8],
        [0; 4],
        "GOAWAY's error code: NO_ERROR"
    );
    // Then closed, whether or not the client answers the PING that follows it.
    let closed = closed_within(&mut stream, connected, b"", Duration::from_secs(10)).await;
    assert!(closed.is_some(), "still open 10s after connecting");
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_connections_close_at_the_header_timeout_while_others_are_served() {
    let _turn = HEAVY.lock().await;
    raise_open_file_limit(2_500);
    let server = CoreServer::start_with(&["--header-timeout", "3s", "--idle-timeout", "60s"]);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    // 2,000 connections each sending a byte a second (so a timer that restarted with every
    // byte would never fire): half an HTTP/1 header, half the HTTP/2 preface.
    let http1: &'static [u8] =
        b"GET / HTTP/1.1\r\nHost: app.example\r\nX-Slow: aaaaaaaaaaaaaaaa\r\n";
    let port = server.http_port;
    let slow: Vec<_> = (0..2_000)
        .map(|i| {
            let trickle = if i % 2 == 0 { http1 } else { H2_PREFACE };
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                let connected = Instant::now();
                closed_within(&mut stream, connected, trickle, Duration::from_secs(30)).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    answered_within_a_second(&server, "app.example").await;

    let mut closed_after = Vec::new();
    for (i, task) in slow.into_iter().enumerate() {
        let closed = task.await.unwrap();
        closed_after.push(closed.unwrap_or_else(|| panic!("slow connection {i} open after 30s")));
    }
    closed_after.sort();
    let (first, last) = (closed_after[0], closed_after[closed_after.len() - 1]);
    eprintln!("2,000 slow connections closed after {first:?} to {last:?}");
    assert!(
        first >= Duration::from_secs(2) && last < Duration::from_secs(8),
        "closed after {first:?} to {last:?}, the header timeout is 3s"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_that_only_pings_is_closed_at_the_idle_timeout() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--idle-timeout", "2s"]);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(300))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = Request::get("http://app.example/")
        .body(Full::<Bytes>::default())
        .unwrap();
    assert_eq!(sender.send_request(request).await.unwrap().status(), 200);
    let idle_from = Instant::now();
    tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("a connection carrying only PINGs is closed at the idle timeout")
        .unwrap()
        .ok();
    let closed = idle_from.elapsed();
    assert!(
        closed >= Duration::from_secs(1) && closed < Duration::from_secs(10),
        "closed after {closed:?}, the idle timeout is 2s"
    );
}

/// One HTTP/2 frame as read off the wire.
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

async fn read_frame(stream: &mut TcpStream) -> Frame {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.expect("a frame");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.expect("its payload");
    Frame {
        kind: head[3],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    bytes.extend_from_slice(&[kind, flags]);
    bytes.extend_from_slice(&stream.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const GOAWAY: u8 = 0x7;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

#[tokio::test(flavor = "multi_thread")]
async fn http2_streams_per_connection_are_capped_at_128() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start();
    let backend = Backend::slow(Duration::from_secs(2)).await;
    server.add("streams.example", backend.port);

    // A raw client, which (unlike hyper's) opens streams past the advertised limit.
    let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    stream.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let settings = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut stream))
        .await
        .expect("the server's SETTINGS");
    assert_eq!(settings.kind, SETTINGS);
    let advertised = settings.payload.chunks(6).find_map(|setting| {
        (u16::from_be_bytes([setting[0], setting[1]]) == SETTINGS_MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]))
    });
    assert_eq!(advertised, Some(128), "SETTINGS_MAX_CONCURRENT_STREAMS");
    stream
        .write_all(&frame(SETTINGS, 0x1, 0, &[]))
        .await
        .unwrap();

    // 129 GET requests (HPACK: :method GET, :scheme http, :path /, then :authority as a
    // literal), each ending its stream, all at once.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, b"streams.example".len() as u8];
    block.extend_from_slice(b"streams.example");
    let mut requests = Vec::new();
    for i in 0..129u32 {
        requests.extend(frame(HEADERS, 0x5, 2 * i + 1, &block));
    }
    stream.write_all(&requests).await.unwrap();

    // Until the first response (the app takes 2 s), note every stream the server refuses.
    let mut refused = Vec::new();
    let deadline = Duration::from_secs(20);
    loop {
        let frame = tokio::time::timeout(deadline, read_frame(&mut stream))
            .await
            .expect("responses come");
        match frame.kind {
            HEADERS => break,
            RST_STREAM => {
                let code = u32::from_be_bytes(frame.payload[..4].try_into().unwrap());
                assert_eq!(code, REFUSED_STREAM, "stream {} reset", frame.stream);
                refused.push(frame.stream);
            }
            _ => {}
        }
    }
    assert_eq!(
        refused,
        [257],
        "the 129th stream is refused, the others served"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_cap_with_no_idle_connection_new_clients_wait_instead_of_being_refused() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--max-connections", "2"]);
    let slow = Backend::slow(Duration::from_secs(2)).await;
    server.add("slow.example", slow.port);
    let fast = Backend::echo().await;
    server.add("fast.example", fast.port);

    let url = server.url("/");
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, "slow.example").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both slots hold a request in flight: this client waits in the kernel's queue, and is
    // served once one of them is done.
    let reply = get(&url, "fast.example").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    for request in busy {
        assert_eq!(request.await.unwrap().body, "finally");
    }
    assert!(
        server.log().contains("none idle"),
        "{}",
        tail(&server.log())
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_cap_idle_keep_alive_and_http2_connections_make_room() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--max-connections", "4"]);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    let request = || {
        Request::get("http://app.example/")
            .header("host", "app.example")
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // Four connections, each used once and left idle: two HTTP/1.1 keep-alive, two HTTP/2.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(used_once(&server, "http://app.example/").await);
    }
    for _ in 0..2 {
        let (mut sender, connection) = core_server_tests::http::h2_connect(server.http_port).await;
        let response = sender.send_request(request()).await.unwrap();
        // Read to its end: the stream is over, the connection idle.
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        idle.push((sender_keeper(sender), connection));
    }

    // A fifth client is served at once: idle connections were closed to make room.
    answered_within_a_second(&server, "app.example").await;
    for (i, (_sender, connection)) in idle.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .unwrap_or_else(|_| panic!("idle connection {i} still open:\n{}", server.log()))
            .unwrap()
            .ok();
    }
}

/// The same for HTTP/1.1 keep-alive connections quiet long enough to have been parked (see
/// `parked_connections`): no task of their own hears the eviction, their set does. (Requests
/// in origin form, which core-server serves itself; hyper serves the absolute form.)
#[tokio::test(flavor = "multi_thread")]
async fn at_the_cap_parked_keep_alive_connections_make_room() {
    let _turn = HEAVY.lock().await;
    let server = CoreServer::start_with(&["--max-connections", "4"]);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(used_once(&server, "/").await);
    }
    tokio::time::sleep(Duration::from_millis(700)).await;

    answered_within_a_second(&server, "app.example").await;
    for (i, (_sender, connection)) in idle.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .unwrap_or_else(|_| panic!("parked connection {i} still open:\n{}", server.log()))
            .unwrap()
            .ok();
    }
}

/// An HTTP/1.1 keep-alive connection that has asked for `uri` (Host `app.example`) once and
/// read the answer: what keeps it open, and the task driving it (it ends when the server
/// closes the connection).
async fn used_once(
    server: &CoreServer,
    uri: &str,
) -> (Box<dyn Send>, tokio::task::JoinHandle<hyper::Result<()>>) {
    let (mut sender, connection) = core_server_tests::http::http1_connect(server.http_port).await;
    let request = Request::get(uri)
        .header("host", "app.example")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap();
    (sender_keeper(sender), connection)
}

/// Keeps a request sender alive (a dropped sender would close its connection itself).
fn sender_keeper<T: Send + 'static>(sender: T) -> Box<dyn Send> {
    Box::new(sender)
}
