//! Several agents serve one tunnel domain: both get traffic; under load, a SIGKILLed agent
//! fails no GET (those it had in flight go to the other agent); a SIGTERMed agent drains and
//! fails none at all. One agent connection carries more requests at once than
//! hyper's default cap of 200 streams.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use core_server_tests::agent::Agent;
use core_server_tests::backend::full;
use core_server_tests::http::get;
use core_server_tests::load::Load;
use core_server_tests::{Backend, CoreServer};
use http::Response;
use nix::sys::signal::Signal;

const APP: &str = "app.example";
/// Keep-alive and connection-per-request clients of each load: at most this many requests are
/// in flight at once.
const KEEP_ALIVE: usize = 8;
const FRESH: usize = 2;

/// A backend counting the requests it answered, each after `delay` (so that a good number are
/// in flight through the tunnel at any moment).
async fn counting(delay: Duration) -> (Backend, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    let backend = Backend::start(move |_| {
        let counter = counter.clone();
        async move {
            tokio::time::sleep(delay).await;
            counter.fetch_add(1, Ordering::SeqCst);
            Response::new(full("served"))
        }
    })
    .await;
    (backend, count)
}

/// A server with `APP` served by two agents, each to a counting backend of its own.
struct Two {
    server: CoreServer,
    agents: [Agent; 2],
    counts: [Arc<AtomicU64>; 2],
    _backends: [Backend; 2],
}

async fn two_agents(delay: Duration) -> Two {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    let (a, a_count) = counting(delay).await;
    let (b, b_count) = counting(delay).await;
    let agents = [a.port, b.port]
        .map(|port| Agent::start(&server, APP, &token, &format!("127.0.0.1:{port}"), &[]));
    for agent in &agents {
        agent.wait_connected(&server, 2);
    }
    Two {
        server,
        agents,
        counts: [a_count, b_count],
        _backends: [a, b],
    }
}

impl Two {
    fn load(&self) -> Load {
        Load::start(self.server.http_port, APP, KEEP_ALIVE, FRESH)
    }

    fn counts(&self) -> [u64; 2] {
        self.counts.clone().map(|c| c.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_agents_get_traffic() {
    let two = two_agents(Duration::ZERO).await;
    let load = two.load();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let counts = load.finish().await;
    assert_eq!(counts.failures(), 0, "{counts:?}");
    let [a, b] = two.counts();
    eprintln!("{counts:?}; agent a served {a}, agent b {b}");
    assert!(a > 0 && b > 0, "a served {a}, b {b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_agent_fails_no_get_those_in_flight_go_to_the_other() {
    let two = two_agents(Duration::from_millis(20)).await;
    let load = two.load();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(two.counts()[0] > 0, "agent a serves before it is killed");
    two.agents[0].signal(Signal::SIGKILL);
    let detected = two.agents[0].wait_connected(&two.server, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = load.finish().await;
    let [a, b] = two.counts();
    eprintln!("detected after {detected:?}; {counts:?}; agent a served {a}, agent b {b}");
    assert!(counts.ok > 0, "{counts:?}");
    assert_eq!(counts.failures(), 0, "{counts:?}\n{}", two.server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigtermed_agent_drains_and_no_request_fails() {
    let mut two = two_agents(Duration::from_millis(20)).await;
    let load = two.load();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = two.counts()[0];
    assert!(before > 0, "agent a serves before it is stopped");
    two.agents[0].signal(Signal::SIGTERM);
    let status = two.agents[0].wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}\n{}", two.agents[0].log());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let counts = load.finish().await;
    let [a, b] = two.counts();
    eprintln!("{counts:?}; agent a served {a}, agent b {b}");
    assert!(counts.ok > 0, "{counts:?}");
    assert_eq!(counts.failures(), 0, "{counts:?}\n{}", two.server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_agent_connection_carries_more_than_200_requests_at_once() {
    const AT_ONCE: usize = 300;
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    // Every request waits for all the others: either all are in flight at once, or none is
    // answered "together".
    let barrier = Arc::new(tokio::sync::Barrier::new(AT_ONCE));
    let backend = Backend::start(move |_| {
        let barrier = barrier.clone();
        async move {
            match tokio::time::timeout(Duration::from_secs(20), barrier.wait()).await {
                Ok(_) => Response::new(full("together")),
                Err(_) => Response::builder().status(500).body(full("alone")).unwrap(),
            }
        }
    })
    .await;
    let agent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", backend.port),
        &["--connections", "1"],
    );
    agent.wait_connected(&server, 1);
    let url = server.url("/");
    let requests: Vec<_> = (0..AT_ONCE)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url, APP).await })
        })
        .collect();
    for request in requests {
        let reply = request.await.unwrap();
        assert_eq!(
            (reply.status.as_u16(), &*reply.body),
            (200, "together"),
            "not all {AT_ONCE} requests were in flight on the one connection at once"
        );
    }
}
