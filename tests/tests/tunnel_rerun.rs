//! Rerunning core-server while two agents serve a tunnel domain under load: five reruns in a
//! row, every request succeeds, and after each takeover both agents are connected to the new
//! instance within 2 s.

use std::time::{Duration, Instant};

use core_server_tests::agent::Agent;
use core_server_tests::backend::saying;
use core_server_tests::load::Load;
use core_server_tests::CoreServer;

const APP: &str = "app.example";
/// The bound on agents serving again after a rerun.
const BACK_WITHIN: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread")]
async fn five_reruns_under_load_with_two_agents_lose_no_request() {
    let mut server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    let backend = saying("served").await;
    let to = format!("127.0.0.1:{}", backend.port);
    let agents = [
        Agent::start(&server, APP, &token, &to, &[]),
        Agent::start(&server, APP, &token, &to, &[]),
    ];
    for agent in &agents {
        agent.wait_connected(&server, 2);
    }
    let load = Load::start(server.http_port, APP, 8, 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    for rerun in 1..=5 {
        tokio::task::block_in_place(|| {
            let old = server.adopt(server.spawn_rerun(&[]));
            let took_over = format!("took over from core-server pid {}", old.id());
            let deadline = Instant::now() + Duration::from_secs(20);
            while !server.log().contains(&took_over) {
                assert!(
                    Instant::now() < deadline,
                    "rerun {rerun}: no takeover:\n{}",
                    server.log()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            let taken = Instant::now();
            // The new instance's status lists only its own worker's tunnels.
            for agent in &agents {
                agent.wait_connected(&server, 2);
            }
            let back = taken.elapsed();
            eprintln!("rerun {rerun}: both agents back after {back:?}");
            assert!(
                back <= BACK_WITHIN,
                "rerun {rerun}: agents back after {back:?}"
            );
            wait_exit(old, rerun);
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let counts = load.finish().await;
    eprintln!("{counts:?}");
    assert!(counts.ok > 0, "{counts:?}");
    assert_eq!(counts.failures(), 0, "{counts:?}\n{}", server.log());
}

/// Waits (60 s at most) for the instance a rerun replaced to drain and exit, successfully.
fn wait_exit(mut old: std::process::Child, rerun: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = old.try_wait().unwrap() {
            assert!(
                status.success(),
                "rerun {rerun}: the old instance exited {status}"
            );
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rerun {rerun}: the old instance did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
