//! The routes journal (`routes.log`, beside `routes.json` once the table is large), with the
//! real processes:
//! - every acknowledged route survives a kill -9 of the supervisor and the worker at any
//!   instant: while apps add, re-point and remove routes at full speed (their changes saved a
//!   batch at a time: the table written whole while it is small, then journaled and compacted
//!   now and then), the server is killed mid-stream, several times over, and after each
//!   restart every change answered `ok` is in force;
//! - a corrupt journal is reported by name and kept aside, and its changes that are whole are
//!   served;
//! - a stop while the worker waits to be restarted leaves every route in `routes.json`, as any
//!   clean stop does.

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use core_server_tests::http::get;
use core_server_tests::{Backend, CoreServer};

/// Apps sending at once, each waiting for every reply (so their changes are saved in batches).
const APPS: usize = 6;
/// Acknowledged changes (over all apps) after which the server is killed, in each round.
const CHANGES_PER_ROUND: usize = 2000;
const ROUNDS: usize = 3;

/// What the acknowledged changes left: each domain's port, `None` if removed.
type Expected = BTreeMap<String, Option<u16>>;

/// One app's changes in `round`: adds of its own domains, and among them re-pointing and
/// removing some it added before. Returns what was acknowledged, in order, and the domain of
/// the change left unanswered when the server died (it may or may not have been saved).
fn app(
    udp_port: u16,
    round: usize,
    app: usize,
    ports: [u16; 2],
    acknowledged: &AtomicUsize,
    stop: &AtomicBool,
) -> (Vec<(String, Option<u16>)>, Option<String>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let name = |i: usize| format!("r{round}-a{app}-{i}.example");
    let mut done = Vec::new();
    for i in 0..100_000 {
        if stop.load(Ordering::Relaxed) {
            return (done, None);
        }
        let (domain, port) = match i % 10 {
            7 if i > 5 => (name(i - 5), None),
            4 if i > 3 => (name(i - 3), Some(ports[1])),
            _ => (name(i), Some(ports[0])),
        };
        let command = match port {
            Some(port) => format!("add {domain} {port}"),
            None => format!("remove {domain}"),
        };
        socket
            .send_to(command.as_bytes(), ("127.0.0.1", udp_port))
            .unwrap();
        let mut reply = [0u8; 512];
        match socket.recv(&mut reply) {
            Ok(len) => {
                let reply = String::from_utf8_lossy(&reply[..len]);
                assert_eq!(reply, "ok", "{command}");
                done.push((domain, port));
                acknowledged.fetch_add(1, Ordering::Relaxed);
            }
            // The server was killed before it answered.
            Err(_) => return (done, Some(domain)),
        }
    }
    panic!("app {app} of round {round} was never stopped");
}

/// The port routes `core-server status` lists.
fn listed(server: &CoreServer) -> BTreeMap<String, u16> {
    (server.status().lines())
        .filter_map(|line| line.trim().split_once(" -> 127.0.0.1:"))
        .map(|(name, port)| (name.to_owned(), port.parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_change_survives_kill_9_at_any_instant() {
    let mut server = CoreServer::start();
    let backends = [Backend::echo().await, Backend::echo().await];
    let ports = [backends[0].port, backends[1].port];
    let mut expected = Expected::new();
    for round in 0..ROUNDS {
        let acknowledged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let apps: Vec<_> = (0..APPS)
            .map(|n| {
                let (acknowledged, stop) = (acknowledged.clone(), stop.clone());
                let udp_port = server.udp_port;
                std::thread::spawn(move || app(udp_port, round, n, ports, &acknowledged, &stop))
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        while acknowledged.load(Ordering::Relaxed) < CHANGES_PER_ROUND {
            assert!(
                Instant::now() < deadline,
                "round {round}: only {} changes acknowledged in 120 s:\n{}",
                acknowledged.load(Ordering::Relaxed),
                server.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Mid-stream: every app has a change in flight.
        server.crash();
        stop.store(true, Ordering::Relaxed);
        let mut in_doubt = Vec::new();
        for app in apps {
            let (done, unanswered) = app.join().unwrap();
            expected.extend(done);
            in_doubt.extend(unanswered);
        }

        server.launch();
        let mut found = listed(&server);
        for domain in &in_doubt {
            // Saved or not, either is right: it was never acknowledged.
            expected.remove(domain);
            found.remove(domain);
        }
        let wanted: BTreeMap<_, _> = (expected.iter())
            .filter_map(|(domain, port)| Some((domain.clone(), (*port)?)))
            .collect();
        let missing: Vec<_> = (wanted.iter())
            .filter(|(domain, port)| found.get(*domain) != Some(port))
            .take(10)
            .collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged but lost (of {}): {missing:?}\n{}",
            wanted.len(),
            server.log()
        );
        let removed: Vec<_> = (expected.iter())
            .filter(|(domain, port)| port.is_none() && found.contains_key(*domain))
            .take(10)
            .collect();
        assert!(
            removed.is_empty(),
            "round {round}: removed, yet back: {removed:?}"
        );
    }

    // What the listing says is what is served: a few of each kind.
    let url = server.url("/");
    for (domain, port) in expected.iter().step_by(expected.len() / 20) {
        let status = get(&url, domain).await.status;
        assert_eq!(status, if port.is_some() { 200 } else { 404 }, "{domain}");
    }
    // The table outgrew the size written whole: the last rounds went through the journal,
    // which the last start compacted (to its header line).
    let journal = std::fs::metadata(server.dir.join("routes.log")).unwrap();
    let snapshot = std::fs::metadata(server.dir.join("routes.json")).unwrap();
    assert!(
        snapshot.len() > 64 * 1024 && journal.len() < 200,
        "journal {} bytes, snapshot {}",
        journal.len(),
        snapshot.len()
    );
    assert!(
        server.log().contains(" changes over routes.json"),
        "a start replayed a journal:\n{}",
        server.log()
    );
    assert!(server.stop().success());
}

/// Adds `bulk<n>.example` for n in `range`, `window` commands in flight, each answered `ok`.
fn add_many(udp_port: u16, range: std::ops::Range<usize>, port: u16) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let window = 32;
    let (mut sent, mut done) = (range.start, range.start);
    while done < range.end {
        while sent < range.end && sent - done < window {
            let command = format!("add bulk{sent}.example {port}");
            socket
                .send_to(command.as_bytes(), ("127.0.0.1", udp_port))
                .unwrap();
            sent += 1;
        }
        let mut reply = [0u8; 512];
        let len = socket.recv(&mut reply).expect("a reply within 10 s");
        assert_eq!(&reply[..len], b"ok");
        done += 1;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_journal_is_reported_and_kept_aside_and_its_whole_changes_served() {
    let mut server = CoreServer::start();
    let backend = Backend::echo().await;
    // Past the size written whole: what follows goes to the journal.
    add_many(server.udp_port, 0..3000, backend.port);
    for name in ["first", "second", "third"] {
        server.add(&format!("{name}.example"), backend.port);
    }
    server.crash();

    let journal = server.dir.join("routes.log");
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.contains("second.example"), "{text}");
    let damaged = text.replacen("second.example", "secomd.example", 1);
    std::fs::write(&journal, &damaged).unwrap();
    server.launch();

    let log = server.log();
    assert!(
        log.contains(&format!("routes journal {} is corrupt", journal.display())),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(&server.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("routes.log.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(std::fs::read_to_string(&aside[0]).unwrap(), damaged);
    assert!(log.contains(&aside[0].display().to_string()), "{log}");

    let url = server.url("/");
    for (domain, status) in [
        ("bulk0.example", 200),
        ("bulk2999.example", 200),
        ("first.example", 200),
        ("second.example", 404),
        ("third.example", 200),
    ] {
        assert_eq!(get(&url, domain).await.status, status, "{domain}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_while_the_worker_waits_to_be_restarted_leaves_every_route_in_the_snapshot() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let mut server = CoreServer::start();
    let backend = Backend::echo().await;
    // Past the size written whole: what follows goes to the journal.
    add_many(server.udp_port, 0..3000, backend.port);
    for name in ["first", "second", "third"] {
        server.add(&format!("{name}.example"), backend.port);
    }
    // Workers that die at once are restarted after ever longer waits: 50 ms, 100 ms... 3.2 s
    // after the seventh, long enough to stop the server in.
    for kills in 1..=7 {
        let worker = server.worker_pid();
        kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
        if kills == 7 {
            break;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.worker_pid() == worker {
            assert!(
                Instant::now() < deadline,
                "no new worker:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    // "starting a new one in 3.2s", or "trying again in 3.2s" if it died starting.
    server
        .wait_logged_async(" in 3.2s", Duration::from_secs(30))
        .await;
    server.signal(Signal::SIGTERM);
    assert!(server.wait_exit(Duration::from_secs(20)).success());

    let snapshot = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
    for name in ["bulk0", "bulk2999", "first", "second", "third"] {
        assert!(snapshot.contains(&format!("\"{name}.example\"")), "{name}");
    }
    let journal = std::fs::metadata(server.dir.join("routes.log")).unwrap();
    assert!(journal.len() < 200, "compacted: {} bytes", journal.len());
}
