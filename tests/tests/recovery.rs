//! The worker dies and comes back without losing what waited for it; signals stop cleanly.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use core_server_tests::http::get;
use core_server_tests::server::{alive, install_copy, wait_gone};
use core_server_tests::{Backend, CoreServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_is_replaced_and_queued_requests_are_served() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    for round in 0..3 {
        let old = server.worker_pid();
        kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
        wait_gone(old, Duration::from_secs(5));

        // While no worker runs: a command and a burst of requests. They wait in the kernel's
        // queues on the supervisor's sockets, and the next worker serves them.
        let command = UdpSocket::bind("127.0.0.1:0").unwrap();
        command
            .send_to(
                format!("add late{round}.example {}", backend.port).as_bytes(),
                ("127.0.0.1", server.udp_port),
            )
            .unwrap();
        let requests: Vec<_> = (0..20)
            .map(|i| {
                let url = server.url(&format!("/round{round}/{i}"));
                tokio::spawn(async move { get(&url, "app.example").await.status })
            })
            .collect();
        for request in requests {
            assert_eq!(
                request.await.unwrap(),
                200,
                "round {round}:\n{}",
                server.log()
            );
        }
        command
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reply = [0u8; 256];
        let len = command
            .recv(&mut reply)
            .expect("the command queued meanwhile is answered");
        assert_eq!(&reply[..len], b"ok");
        assert_eq!(
            get(&server.url("/"), &format!("late{round}.example"))
                .await
                .status,
            200
        );

        let new = server.worker_pid();
        assert_ne!(old, new);
        assert!(alive(server.pid()), "the supervisor lives on");
    }
    assert!(
        server.log().contains("worker exited (signal: 9"),
        "{}",
        server.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_requests_finish_then_stops_everything() {
    let mut server = CoreServer::start();
    let slow = Backend::slow(Duration::from_secs(2)).await;
    server.add("slow.example", slow.port);

    let url = server.url("/");
    let in_flight = tokio::spawn(async move { get(&url, "slow.example").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker = server.worker_pid();
    let started = Instant::now();
    server.signal(Signal::SIGTERM);

    let reply = in_flight.await.unwrap();
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (200, "finally")
    );
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status}");
    wait_gone(worker, Duration::from_secs(5));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "stopped as soon as the request ended"
    );
    // The ports are free again.
    TcpListener::bind(("::", server.http_port)).expect("HTTP port released");
    UdpSocket::bind(("::", server.udp_port)).expect("UDP port released");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_and_sighup_stop_cleanly_too() {
    for signal in [Signal::SIGINT, Signal::SIGHUP] {
        let mut server = CoreServer::start();
        let worker = server.worker_pid();
        server.signal(signal);
        assert!(
            server.wait_exit(Duration::from_secs(20)).success(),
            "{signal}"
        );
        wait_gone(worker, Duration::from_secs(5));
        assert!(
            server.log().contains(&format!("{signal}: stopping")),
            "{}",
            server.log()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_keeps_dying_is_retried_with_growing_delays() {
    let install = install_copy();
    let worker_binary = install.path().join("core-server-worker");
    let server = CoreServer::start_installed(install.path());
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);

    // From now on every new worker fails at once.
    let real = worker_binary.with_extension("real");
    std::fs::rename(&worker_binary, &real).unwrap();
    std::fs::write(
        &worker_binary,
        "#!/bin/sh\necho 'broken worker' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&worker_binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old = server.worker_pid();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();

    // The supervisor keeps trying, each time waiting longer.
    let log = server
        .wait_logged_async("trying again in 400ms", Duration::from_secs(20))
        .await;
    assert!(
        log.contains("exited during start-up (exit status: 3)"),
        "{log}"
    );
    assert!(
        log.contains("trying again in 100ms") && log.contains("trying again in 200ms"),
        "{log}"
    );
    assert!(
        alive(server.pid()),
        "the supervisor keeps its sockets and waits"
    );

    // A request made while no worker can run waits in the queue and is served once one can.
    let url = server.url("/");
    let queued = tokio::spawn(async move { get(&url, "app.example").await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::rename(&real, &worker_binary).unwrap();
    assert_eq!(queued.await.unwrap(), 200, "{}", server.log());
    assert_ne!(server.worker_pid(), old);
}
