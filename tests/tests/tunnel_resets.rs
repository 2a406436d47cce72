//! Clients that open many requests and cancel them at once (HTTP/2 `RST_STREAM`, as in the
//! "rapid reset" attack) break no tunnel: the worker passes each cancel on to the agent, so
//! the agent's connection takes bursts of them from its only peer, the worker, where any one
//! client is already held to the worker's own limits. Other clients' requests on that
//! connection go on.

use std::time::Duration;

use bytes::Bytes;
use core_server_tests::agent::Agent;
use core_server_tests::http::send;
use core_server_tests::{Backend, CoreServer};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use tokio::net::TcpStream;

const APP: &str = "app.example";
/// Attacking connections, each opening this many requests at a time, cancelling them
/// [`CANCEL_AFTER`] later, [`BURSTS`] times. (Found by an outside tester with 40 x 100 x 10:
/// the agent's connection was lost 9 to 12 times.)
const ATTACKERS: usize = 40;
const STREAMS: usize = 100;
const BURSTS: usize = 10;
const CANCEL_AFTER: Duration = Duration::from_millis(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_cancelled_in_bursts_break_no_agent_connection_nor_other_requests() {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    // Slow answers keep the agent's streams open, so the cancels find some in flight there,
    // and requests waiting for a place go out as others are cancelled.
    let app = Backend::slow(Duration::from_millis(300)).await;
    let agent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", app.port),
        &[],
    );
    agent.wait_connected(&server, 2);

    // The other clients: POSTs, which are not sent again if their agent connection fails.
    let url = server.url("/");
    let others: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut failed = Vec::new();
                for _ in 0..10 {
                    let request = Request::builder()
                        .method(Method::POST)
                        .uri(&url)
                        .header("host", APP)
                        .body(Full::new(Bytes::from_static(b"an order")))
                        .unwrap();
                    let reply = send(request).await;
                    if reply.status != StatusCode::OK {
                        failed.push(format!("{}: {}", reply.status, reply.body));
                    }
                }
                failed
            })
        })
        .collect();
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| tokio::spawn(cancel_in_bursts(server.http_port)))
        .collect();
    let mut cancelled = 0;
    for attacker in attackers {
        cancelled += attacker.await.unwrap();
    }
    let mut failed = Vec::new();
    for other in others {
        failed.extend(other.await.unwrap());
    }

    assert!(
        cancelled > ATTACKERS * STREAMS,
        "the attack took place: {cancelled} requests cancelled"
    );
    // No connection ended, lost or closed, on either side.
    let log = agent.log();
    assert!(!log.contains("reconnecting"), "a connection ended:\n{log}");
    let log = server.log();
    assert!(!log.contains(" left: "), "a connection ended:\n{log}");
    assert!(failed.is_empty(), "other clients' POSTs failed: {failed:?}");
    // The agent is still connected and serving.
    assert_eq!(agent.connections(&server), 2, "{}", server.log());
}

/// One attacking HTTP/2 connection (prior knowledge, on the HTTP port): bursts of requests,
/// each burst cancelled after [`CANCEL_AFTER`]; how many requests it cancelled. The worker
/// may refuse or end the connection (it holds each client to its limits): that ends the
/// attack early.
async fn cancel_in_bursts(port: u16) -> usize {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let Ok((mut client, connection)) = h2::client::handshake(stream).await else {
        return 0;
    };
    tokio::spawn(connection);
    let mut cancelled = 0;
    for _ in 0..BURSTS {
        let mut burst = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            let request = Request::get(format!("http://{APP}/")).body(()).unwrap();
            let Ok(sender) = client.ready().await else {
                return cancelled;
            };
            client = sender;
            match client.send_request(request, true) {
                Ok((response, _)) => burst.push(response),
                Err(_) => return cancelled,
            }
        }
        tokio::time::sleep(CANCEL_AFTER).await;
        // Dropping a request's handles resets its stream (`CANCEL`).
        cancelled += burst.len();
        drop(burst);
    }
    cancelled
}
