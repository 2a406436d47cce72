//! Bodies stream through the proxy in both directions without being buffered: 1 GiB each way,
//! with the reader pausing midway (a buffering proxy would swallow the rest meanwhile), and the
//! worker's peak memory stays small. A client gone from a stream ends the app's request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::backend::{full, watched_stream, Body};
use core_server_tests::big_body::{drain, peak_kib, zeros, GIB, PEAK_LIMIT_KIB};
use core_server_tests::http::{h2_connect, send_raw, text};
use core_server_tests::{Backend, CoreServer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

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

/// An app that streams what the test sends it: for each request, the sender of its body's pieces
/// and what tells when its request has ended (see [`watched_stream`]).
async fn streaming_app() -> (Backend, Streams) {
    let (streams_tx, streams) = mpsc::channel(1);
    let app = Backend::start(move |_| {
        let streams = streams_tx.clone();
        async move {
            let (pieces, ended, body) = watched_stream();
            streams.send((pieces, ended)).await.unwrap();
            Response::new(body)
        }
    })
    .await;
    (app, streams)
}

type Streams = mpsc::Receiver<(mpsc::Sender<Bytes>, oneshot::Receiver<()>)>;

/// The next request at the app, once it has sent its first piece: the sender of the pieces to
/// come (the app has more to send while it is kept), and what tells when the request ended.
async fn first_piece_sent(
    streams: &mut Streams,
    piece: &'static str,
) -> (mpsc::Sender<Bytes>, oneshot::Receiver<()>) {
    let (pieces, ended) = tokio::time::timeout(PATIENCE, streams.recv())
        .await
        .expect("the request reached the app")
        .unwrap();
    pieces.send(Bytes::from(piece)).await.unwrap();
    (pieces, ended)
}

async fn assert_ended(ended: oneshot::Receiver<()>) {
    tokio::time::timeout(PATIENCE, ended)
        .await
        .expect("the app's request outlived its client, waiting for a write that never came")
        .unwrap_err();
}

/// A client that goes away from a stream (server-sent events, a long poll) ends the app's
/// request at once, as it would without a proxy, rather than at the app's next write, which may
/// be minutes away.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_gone_from_a_stream_ends_the_request_at_the_app() {
    let server = CoreServer::start();
    let (app, mut streams) = streaming_app().await;
    server.add("events.example", app.port);

    let mut client = send_raw(
        &server,
        b"GET /events HTTP/1.1\r\nHost: events.example\r\n\r\n",
    )
    .await;
    let (_more, ended) = first_piece_sent(&mut streams, "data: one\n\n").await;
    let mut seen = Vec::new();
    while !seen.ends_with(b"data: one\n\n\r\n") {
        let mut byte = [0];
        let read = tokio::time::timeout(PATIENCE, client.read_exact(&mut byte));
        read.await.expect("the first event in time").unwrap();
        seen.push(byte[0]);
    }
    drop(client);
    assert_ended(ended).await;
}

/// The same over HTTP/2, where each stream runs in its connection's task in the worker: a
/// stream the client cancels ends its request at the app while the others go on, and when the
/// client goes, the requests of all its streams end.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_client_gone_ends_the_requests_of_its_streams_at_the_app() {
    let server = CoreServer::start();
    let (app, mut streams) = streaming_app().await;
    server.add("events.example", app.port);

    let (mut sender, connection) = h2_connect(server.http_port).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let request = Request::get("http://events.example/events")
            .body(Full::default())
            .unwrap();
        let response = tokio::time::timeout(PATIENCE, sender.send_request(request))
            .await
            .expect("a response head in time")
            .unwrap();
        let (pieces, ended) = first_piece_sent(&mut streams, "data: one\n\n").await;
        let mut body = response.into_body();
        let frame = tokio::time::timeout(PATIENCE, body.frame()).await;
        let data = frame.expect("the first event in time").unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), "data: one\n\n");
        open.push((body, pieces, ended));
    }

    // The client cancels the first stream (RST_STREAM): its request ends, the others go on.
    let (cancelled, _still_to_send, ended) = open.remove(0);
    drop(cancelled);
    assert_ended(ended).await;
    for (body, pieces, _) in &mut open {
        pieces.send(Bytes::from("data: two\n\n")).await.unwrap();
        let frame = tokio::time::timeout(PATIENCE, body.frame()).await;
        let data = frame.expect("the second event in time").unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), "data: two\n\n");
    }

    // The client goes: every request still open ends, while the app still has more to send.
    let mut still_to_send = Vec::new();
    let mut ends = Vec::new();
    for (body, pieces, ended) in open {
        drop(body);
        still_to_send.push(pieces);
        ends.push(ended);
    }
    drop(sender);
    connection.abort();
    for ended in ends {
        assert_ended(ended).await;
    }
    drop(still_to_send);
}
