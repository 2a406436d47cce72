//! Bodies stream through the proxy in both directions without being buffered: 1 GiB each way,
//! with the reader pausing midway (a buffering proxy would swallow the rest meanwhile), and the
//! worker's peak memory stays small. A client gone from a stream ends the app's request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::backend::{full, watched_stream, Body};
use core_server_tests::big_body::{drain, peak_kib, zeros, GIB, PEAK_LIMIT_KIB};
use core_server_tests::http::{send_raw, text};
use core_server_tests::{Backend, CoreServer};
use http::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;

/// How long a test waits for what should come at once.
const PATIENCE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
async fn one_gib_each_way_with_flat_memory() {
    let server = CoreServer::start();
    let worker = server.worker_pid();

    // Download: the backend writes as fast as it can; the client pauses.
    let download = Backend::start(|_| async { Response::new(zeros(GIB)) }).await;
    server.add("down.example", download.port);
    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let started = Instant::now();
    let request = Request::get(server.url("/big"))
        .header("host", "down.example")
        .body(full(""))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        drain(response.into_body(), Duration::from_secs(2)).await,
        GIB
    );
    eprintln!("1 GiB download in {:?}", started.elapsed());

    // Upload: the client writes as fast as it can; the backend pauses.
    let paused = Arc::new(AtomicBool::new(false));
    let seen_pause = paused.clone();
    let upload = Backend::start(move |request| {
        let paused = seen_pause.clone();
        async move {
            let total = drain(request.into_body(), Duration::from_secs(2)).await;
            paused.store(true, Ordering::SeqCst);
            Response::new(full(total.to_string()))
        }
    })
    .await;
    server.add("up.example", upload.port);
    let started = Instant::now();
    let request = Request::post(server.url("/big"))
        .header("host", "up.example")
        .body(zeros(GIB))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        text(response.into_body()).await,
        GIB.to_string(),
        "the backend got every byte"
    );
    assert!(paused.load(Ordering::SeqCst));
    eprintln!("1 GiB upload in {:?}", started.elapsed());

    let peak = peak_kib(worker);
    eprintln!("worker peak RSS: {peak} KiB");
    assert!(
        peak < PEAK_LIMIT_KIB,
        "worker peaked at {peak} KiB: bodies are being buffered"
    );
}

/// A client that goes away from a stream (server-sent events, a long poll) ends the app's
/// request at once, as it would without a proxy, rather than at the app's next write, which may
/// be minutes away.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_from_a_stream_ends_the_request_at_the_app() {
    let server = CoreServer::start();
    let (streams_tx, mut streams) = tokio::sync::mpsc::channel(1);
    let app = Backend::start(move |_| {
        let streams = streams_tx.clone();
        async move {
            let (pieces, ended, body) = watched_stream();
            streams.send((pieces, ended)).await.unwrap();
            Response::new(body)
        }
    })
    .await;
    server.add("events.example", app.port);

    let mut client = send_raw(
        &server,
        b"GET /events HTTP/1.1\r\nHost: events.example\r\n\r\n",
    )
    .await;
    let (pieces, ended) = tokio::time::timeout(PATIENCE, streams.recv())
        .await
        .expect("the request reached the app")
        .unwrap();
    pieces.send(Bytes::from("data: one\n\n")).await.unwrap();
    let mut seen = Vec::new();
    while !seen.ends_with(b"data: one\n\n\r\n") {
        let mut byte = [0];
        let read = tokio::time::timeout(PATIENCE, client.read_exact(&mut byte));
        read.await.expect("the first event in time").unwrap();
        seen.push(byte[0]);
    }
    drop(client);
    tokio::time::timeout(PATIENCE, ended)
        .await
        .expect("the app's request outlived its client, waiting for a write that never came")
        .unwrap_err();
}
