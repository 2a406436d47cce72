//! Bodies stream through the proxy in both directions without being buffered: 1 GiB each way,
//! with the reader pausing midway (a buffering proxy would swallow the rest meanwhile), and the
//! worker's peak memory stays small.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use core_server_tests::backend::{full, Body};
use core_server_tests::big_body::{drain, peak_kib, zeros, GIB, PEAK_LIMIT_KIB};
use core_server_tests::http::text;
use core_server_tests::{Backend, CoreServer};
use http::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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
