//! The supervisor waits on no peer without a bound: a control client that says nothing delays
//! no UDP reply, and a stopped worker is replaced. A takeover whose taker is frozen at any step
//! of the handover, for longer than the giving side waits, ends with exactly one instance
//! serving and every acknowledged route in place; a taker whose takeover is void answers no
//! request, even while it is frozen and cannot stop its worker.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use core_server_tests::adder::Adder;
use core_server_tests::http::get;
use core_server_tests::server::{alive, all_threads_stopped, binaries, wait_gone};
use core_server_tests::{Backend, CoreServer};
use nix::sys::signal::{kill, Signal};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::unistd::Pid;

/// A control client that connects and never sends a byte.
fn silent_control_client(udp_port: u16) -> OwnedFd {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let address = UnixAddr::new_abstract(format!("core-server.{udp_port}").as_bytes()).unwrap();
    connect(fd.as_raw_fd(), &address).unwrap();
    fd
}

/// How long an `add` took to be answered `ok`.
fn timed_add(server: &CoreServer, domain: &str) -> Duration {
    let started = Instant::now();
    let reply = server.try_udp(format!("add {domain} 9").as_bytes(), Duration::from_secs(5));
    assert_eq!(reply.as_deref(), Some("ok"), "{domain}:\n{}", server.log());
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_control_client_does_not_delay_an_add() {
    tokio::task::block_in_place(|| {
        let mut server = CoreServer::start();
        let median = |mut times: Vec<Duration>| {
            times.sort();
            times[times.len() / 2]
        };
        let before = median(
            (0..7)
                .map(|i| timed_add(&server, &format!("before{i}.example")))
                .collect(),
        );
        let clients: Vec<_> = (0..3)
            .map(|_| silent_control_client(server.udp_port))
            .collect();
        std::thread::sleep(Duration::from_millis(200)); // accepted by now
                                                        // Each add is answered (within 5 s: today's code never answers them), and typically
                                                        // no slower than without the clients (medians: one slow disk write is not the point).
        let during = median(
            (0..7)
                .map(|i| timed_add(&server, &format!("during{i}.example")))
                .collect(),
        );
        eprintln!("median add reply: {during:?} with silent control clients, {before:?} without");
        assert!(
            during <= before + Duration::from_millis(100),
            "silent control clients delayed adds: {during:?} with, {before:?} without"
        );
        // `status` is answered meanwhile, and SIGTERM stops the instance.
        let status = Command::new(binaries().join("core-server"))
            .args(["--udp-port", &server.udp_port.to_string(), "status"])
            .output()
            .unwrap();
        assert!(status.status.success(), "{status:?}");
        assert!(String::from_utf8_lossy(&status.stdout).contains("routes (14):"));
        assert!(server.stop().success());
        drop(clients);
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_worker_is_replaced_and_add_still_answers() {
    tokio::task::block_in_place(|| {
        let server = CoreServer::start();
        let stopped = server.worker_pid();
        kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP).unwrap();
        // Every thread, so none can still take the datagram below.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !all_threads_stopped(stopped) {
            assert!(Instant::now() < deadline, "worker {stopped} not stopped");
            std::thread::sleep(Duration::from_millis(10));
        }
        // The command waits in the kernel's queue for the stopped worker's replacement.
        let sent = Instant::now();
        let reply = server.try_udp(b"add after-stop.example 9", Duration::from_secs(30));
        assert_eq!(reply.as_deref(), Some("ok"), "{}", server.log());
        eprintln!("add answered {:?} after the worker stopped", sent.elapsed());
        wait_gone(stopped, Duration::from_secs(10));
        assert_ne!(server.worker_pid(), stopped);
        assert!(server.log().contains("did not answer"), "{}", server.log());
    });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_never_confirms_a_pause_voids_the_takeover_and_is_replaced() {
    tokio::task::block_in_place(|| {
        let server = CoreServer::start();
        server.add("before.example", 9);
        let stopped = server.worker_pid();
        kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP).unwrap();
        let rerun = server.command().output().unwrap();
        let stderr = String::from_utf8_lossy(&rerun.stderr);
        assert!(!rerun.status.success(), "{stderr}");
        assert!(
            stderr.contains("takeover void: the worker did not pause"),
            "{stderr}"
        );
        eprintln!("the rerun said: {stderr}");
        wait_gone(stopped, Duration::from_secs(10));
        assert_eq!(server.udp("add after.example 9"), "ok");
        assert_ne!(server.worker_pid(), stopped);
    });
}

/// How long the giving side of a takeover waits for the taker, in these tests.
const TAKER_TIMEOUT_MS: &str = "3000";
/// Longer than that, and than a control client may take to send its request (5 s).
const FREEZE: Duration = Duration::from_secs(8);

/// Reruns with the taker frozen at `step` for [`FREEZE`], adds running throughout; whether the
/// taker (`true`) or the old instance ends up serving is what the handover protocol decides.
async fn freeze_the_taker_at(step: &str, taker_serves: bool) {
    let mut server =
        CoreServer::start_with_env(&[("CORE_SERVER_TAKER_TIMEOUT_MS", TAKER_TIMEOUT_MS)]);
    let adder = Adder::start(server.udp_port, step, Duration::from_millis(20));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let old = server.pid();
    let old_worker = server.worker_pid();
    let mut rerun = server.spawn_rerun(&[("CORE_SERVER_FREEZE_AT", step)]);
    let taker = rerun.id();

    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_threads_stopped(taker) {
        if let Some(status) = rerun.try_wait().unwrap() {
            panic!(
                "the rerun exited ({status}) before {step}:\n{}",
                server.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "never frozen at {step}:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frozen = Instant::now();
    if !taker_serves {
        only_the_owner_answers(&server, step).await;
    }
    tokio::time::sleep_until((frozen + FREEZE).into()).await;
    kill(Pid::from_raw(taker as i32), Signal::SIGCONT).unwrap();

    // One of the two gives up or drains, and exits.
    let deadline = Instant::now() + Duration::from_secs(60);
    let other: Child = loop {
        if let Some(status) = rerun.try_wait().unwrap() {
            assert!(!status.success(), "a void takeover is a failed rerun");
            break rerun;
        }
        if !alive(old) {
            break server.adopt(rerun);
        }
        assert!(
            Instant::now() < deadline,
            "both still run:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut other = other;
    let status = other.wait().unwrap();
    assert_eq!(
        server.pid() == taker,
        taker_serves,
        "who serves after a freeze at {step} ({status}):\n{}",
        server.log()
    );
    if taker_serves {
        assert!(status.success(), "the old instance drained and exited");
        let took_over = format!("took over from core-server pid {old}");
        server
            .wait_logged_async(&took_over, Duration::from_secs(30))
            .await;
        wait_gone(old_worker, Duration::from_secs(30));
    } else {
        // The taker exits only once its worker has: one worker serves, the old one.
        assert_eq!(server.worker_pid(), old_worker, "the old worker serves on");
        assert!(server.log().contains("keeps serving"), "{}", server.log());
    }

    // The one left reads commands; then every acknowledged route is saved and served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let acknowledged = tokio::task::block_in_place(|| adder.finish());
    assert!(
        acknowledged.len() > 20,
        "adds ran throughout: {acknowledged:?}"
    );
    let saved = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
    let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
    let saved = saved["routes"].as_object().unwrap();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|d| !saved.contains_key(d.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not saved: {missing:?}"
    );
    for domain in [&acknowledged[0], acknowledged.last().unwrap()] {
        assert_eq!(
            get(&server.url("/"), domain).await.status,
            502,
            "{domain} is routed (to nobody)"
        );
    }
    let after = tokio::task::block_in_place(|| server.udp("add after.example 9"));
    assert_eq!(after, "ok");
}

/// With the taker still frozen (and its takeover void, once the owner has the request): a
/// route added now is served on every new connection. A taker's worker, if it answered any,
/// would know only the routes handed over, and answer 404.
async fn only_the_owner_answers(server: &CoreServer, step: &str) {
    if step != "connected" {
        server
            .wait_logged_async("takeover void", Duration::from_secs(30))
            .await;
    }
    let backend = Backend::echo().await;
    let add = format!("add late.example {}", backend.port);
    assert_eq!(tokio::task::block_in_place(|| server.udp(&add)), "ok");
    for i in 0..40 {
        let status = get(&server.url("/"), "late.example").await.status;
        assert_eq!(status, 200, "request {i} after a void at {step}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taker_frozen_before_it_asks_leaves_the_old_instance_serving() {
    freeze_the_taker_at("connected", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taker_frozen_with_the_sockets_is_void() {
    freeze_the_taker_at("sockets-received", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taker_frozen_once_its_worker_is_ready_is_void() {
    freeze_the_taker_at("worker-ready", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taker_frozen_after_saying_ready_is_handed_over() {
    freeze_the_taker_at("ready-sent", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taker_frozen_once_handed_over_serves_when_it_wakes() {
    freeze_the_taker_at("handed-over", true).await;
}
