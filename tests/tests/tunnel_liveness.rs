//! An agent that dies without a word is noticed: SIGSTOPped, or cut off by a pulled cable (a
//! veth link taken down: no FIN, no RST), it is out of the balancer within 10 s, new requests
//! go to the live agent, and so do the GETs it had taken. With no agent at all a request waits
//! `--tunnel-wait` for one and then gets 503; an agent that connects meanwhile serves it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::agent::Agent;
use core_server_tests::backend::{full, saying};
use core_server_tests::http::{get, send};
use core_server_tests::netns::{TestHost, OUTSIDE};
use core_server_tests::{have_root, have_tools, Backend, CoreServer};
use http::{Request, Response};
use http_body_util::Full;
use nix::sys::signal::Signal;

const APP: &str = "app.example";
/// The bound on noticing a silent agent.
const DETECTION: Duration = Duration::from_secs(10);

/// Polls until `agent` has no connection left in `server`'s status; how long after `since`.
fn wait_dropped(server: &CoreServer, agent: &Agent, since: Instant) -> Duration {
    let deadline = since + DETECTION + Duration::from_secs(20);
    while agent.connections(server) > 0 {
        assert!(
            Instant::now() < deadline,
            "{} was never dropped:\n{}",
            agent.label,
            server.status()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    since.elapsed()
}

/// After the silent agent is out, every new request is the live agent's (`"live"`).
async fn all_served_by_the_live_agent(server: &CoreServer) {
    for i in 0..20 {
        let reply = get(&server.url("/"), APP).await;
        assert_eq!(
            (reply.status.as_u16(), &*reply.body),
            (200, "live"),
            "request {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_agent_is_dropped_within_10s_and_new_requests_reach_the_live_one() {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    let silent_backend = saying("silent").await;
    let live_backend = saying("live").await;
    let silent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", silent_backend.port),
        &[],
    );
    let live = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", live_backend.port),
        &[],
    );
    silent.wait_connected(&server, 2);
    live.wait_connected(&server, 2);

    silent.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    // GETs sent meanwhile are all the live agent's: those the stopped agent took go to the live
    // one once it is noticed; none hangs, none fails.
    let port = server.http_port;
    let meanwhile: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { get(&format!("http://127.0.0.1:{port}/"), APP).await }))
        .collect();
    let dropped = tokio::task::block_in_place(|| wait_dropped(&server, &silent, stopped));
    eprintln!("the stopped agent was dropped after {dropped:?}");
    assert!(dropped <= DETECTION, "dropped after {dropped:?}");
    all_served_by_the_live_agent(&server).await;
    for reply in meanwhile {
        let reply = reply.await.unwrap();
        assert_eq!((reply.status.as_u16(), &*reply.body), (200, "live"));
    }
    silent.signal(Signal::SIGCONT);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pulled_cable_is_noticed_within_10s_and_new_requests_reach_the_live_agent() {
    if !have_root("a_pulled_cable_is_noticed_within_10s_and_new_requests_reach_the_live_agent")
        || !have_tools(
            "a_pulled_cable_is_noticed_within_10s_and_new_requests_reach_the_live_agent",
            &["ip"],
        )
    {
        return;
    }
    let host = TestHost::create();
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    // The agent behind the cable reaches core-server and its backend over the veth link.
    let far_backend =
        Backend::start_at(OUTSIDE.into(), |_| async { Response::new(full("far")) }).await;
    let live_backend = saying("live").await;
    let far = Agent::spawn(
        &["ip", "netns", "exec", &host.name],
        APP,
        &token,
        &format!("{OUTSIDE}:{}", far_backend.port),
        &[
            "--connect",
            &format!("{OUTSIDE}:{}", server.http_port),
            "--insecure-plaintext",
        ],
    );
    let live = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", live_backend.port),
        &[],
    );
    far.wait_connected(&server, 2);
    live.wait_connected(&server, 2);

    host.set_link(false);
    let pulled = Instant::now();
    let dropped = tokio::task::block_in_place(|| wait_dropped(&server, &far, pulled));
    eprintln!("the agent behind the pulled cable was dropped after {dropped:?}");
    assert!(dropped <= DETECTION, "dropped after {dropped:?}");
    all_served_by_the_live_agent(&server).await;
    host.set_link(true);
}

/// The wait is not the app's time to answer: a shorter `--backend-timeout` does not cut it.
#[tokio::test(flavor = "multi_thread")]
async fn with_no_agent_a_request_gets_503_after_the_wait() {
    let server = CoreServer::start_with(&["--tunnel-wait", "2s", "--backend-timeout", "1s"]);
    server.tunnel_allow(APP);
    let started = Instant::now();
    let reply = get(&server.url("/"), APP).await;
    let waited = started.elapsed();
    eprintln!("503 after {waited:?}");
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(
        reply.headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "{reply:?}"
    );
    assert!(
        waited >= Duration::from_millis(1900),
        "answered after {waited:?}, without waiting for an agent"
    );
}

/// An upload waiting for an agent is not held to `--backend-timeout` meanwhile: the agent
/// that comes gets the whole of it to take the body.
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_waiting_longer_than_the_backend_timeout_for_an_agent_is_served() {
    let server = CoreServer::start_with(&["--tunnel-wait", "4s", "--backend-timeout", "1s"]);
    let token = server.tunnel_allow(APP);
    let backend = Backend::echo().await;
    let request = Request::post(server.url("/upload"))
        .header("host", APP)
        .body(Full::new(Bytes::from_static(b"the order")))
        .unwrap();
    let waiting = tokio::spawn(send(request));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "the upload waits for an agent");
    let to = format!("127.0.0.1:{}", backend.port);
    let _agent = Agent::start(&server, APP, &token, &to, &[]);
    let reply = waiting.await.unwrap();
    assert_eq!(reply.status, 200, "{reply:?}");
    assert!(reply.body.starts_with("POST /upload "), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_connecting_during_the_wait_serves_the_waiting_request() {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    let backend = saying("from the late agent").await;
    let url = server.url("/");
    let waiting = tokio::spawn(async move { get(&url, APP).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "the request waits for an agent");
    let _agent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", backend.port),
        &[],
    );
    let reply = waiting.await.unwrap();
    assert_eq!(
        (reply.status.as_u16(), &*reply.body),
        (200, "from the late agent")
    );
}
