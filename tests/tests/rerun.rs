//! Rerunning core-server hot-replaces the running instance: no request refused or lost, no
//! command lost, a failed upgrade leaves the old instance serving. Plus `status` and `stop`.

use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use core_server_tests::http::get;
use core_server_tests::load::{Load, Via};
use core_server_tests::mkcert::MkcertCa;
use core_server_tests::server::{alive, binaries, install_copy};
use core_server_tests::tls_client::{Sni, TlsClient};
use core_server_tests::{Backend, CoreServer};
use http::Response;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, UnixCredentials,
};

#[tokio::test(flavor = "multi_thread")]
async fn ten_reruns_under_load_fail_no_request() {
    // Local mode with a real mkcert: HTTPS is served too.
    let ca = MkcertCa::new();
    let env = ca.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let mut server = CoreServer::start_with_env(&env);
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    let tls = TlsClient::new(&[&ca.root_pem()]);
    let first = tls
        .get(
            server.https_port,
            &Sni::name("app.example"),
            "app.example",
            "/",
        )
        .await;
    assert_eq!(first.status, 200, "{}", server.log());

    let https = |http2| Via::Https {
        port: server.https_port,
        client: tls.clone(),
        http2,
    };
    // Keep-alive clients and clients connecting (and handshaking) per request, over HTTP,
    // HTTPS with HTTP/1.1, and HTTP/2 (which reconnects on the drain's GOAWAY).
    let loads = [
        Load::start(server.http_port, "app.example", 4, 2),
        Load::start_via(https(false), "app.example", 2, 2),
        Load::start_via(https(true), "app.example", 2, 1),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut supervisors = vec![server.pid()];
    for round in 0..10 {
        let old_status = tokio::task::block_in_place(|| server.rerun());
        assert!(
            old_status.success(),
            "round {round}: the old instance exited with {old_status}"
        );
        supervisors.push(server.pid());
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    for (load, name) in loads.into_iter().zip(["HTTP", "HTTPS", "HTTP/2"]) {
        let counts = load.finish().await;
        eprintln!("{name}: {counts:?}");
        assert_eq!(counts.failures(), 0, "{name}: {counts:?}\n{}", server.log());
        assert!(counts.ok > 100, "the {name} load ran: {counts:?}");
    }
    supervisors.dedup();
    assert_eq!(supervisors.len(), 11, "each rerun is a new supervisor");
    assert!(!alive(supervisors[0]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_download_started_before_a_rerun_completes_intact() {
    let mut server = CoreServer::start();
    const CHUNKS: u8 = 30;
    let slow = Backend::start(|_| async {
        let chunks = futures_util::stream::unfold(0u8, |i| async move {
            if i == CHUNKS {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((Ok(Frame::data(Bytes::from(vec![i; 10_000]))), i + 1))
        });
        Response::new(BodyExt::boxed(StreamBody::new(chunks)))
    })
    .await;
    server.add("stream.example", slow.port);

    let url = server.url("/");
    let download = tokio::spawn(async move { get(&url, "stream.example").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let old_status = tokio::task::block_in_place(|| server.rerun());
    assert!(old_status.success());
    // The old instance waited for the stream: about 2.5 s were left of it.
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "old instance exited after {:?}",
        started.elapsed()
    );

    let reply = download.await.unwrap();
    assert_eq!(reply.status, 200);
    let body = reply.body.as_bytes();
    assert_eq!(body.len(), CHUNKS as usize * 10_000, "every byte arrived");
    for (i, chunk) in body.chunks(10_000).enumerate() {
        assert!(chunk.iter().all(|b| *b as usize == i), "chunk {i} intact");
    }
    // And the new instance serves.
    assert_eq!(get(&server.url("/"), "stream.example").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_sent_during_reruns_are_all_applied() {
    let mut server = CoreServer::start();
    let udp_port = server.udp_port;
    const SENDERS: usize = 4;
    const EACH: usize = 150;

    // Apps adding routes in tight loops, each waiting for its reply like `core-server add`...
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            std::thread::spawn(move || {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(20)))
                    .unwrap();
                for i in 0..EACH {
                    let command = format!("add s{s}-{i}.example {}", 1000 + i);
                    socket
                        .send_to(command.as_bytes(), ("127.0.0.1", udp_port))
                        .unwrap();
                    let mut reply = [0u8; 256];
                    let len = socket.recv(&mut reply).expect("every command is answered");
                    assert_eq!(&reply[..len], b"ok", "{command}");
                }
            })
        })
        .collect();
    // ... and one written for the original, firing without reading any reply.
    let fire_and_forget = std::thread::spawn(move || {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..150 {
            let command = format!("add fire-{i}.example 2000");
            socket
                .send_to(command.as_bytes(), ("127.0.0.1", udp_port))
                .unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    for _ in 0..3 {
        tokio::task::block_in_place(|| server.rerun());
    }
    for sender in senders {
        sender.join().unwrap();
    }
    fire_and_forget.join().unwrap();

    // Everything is in the table the current instance serves and saves.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let saved = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
        let saved: serde_json::Value = serde_json::from_str(&saved).unwrap();
        let routes = saved["routes"].as_object().unwrap();
        if routes.len() == SENDERS * EACH + 150 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} routes saved",
            routes.len(),
            SENDERS * EACH + 150
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in [
        "s0-0.example",
        "s3-149.example",
        "fire-0.example",
        "fire-149.example",
    ] {
        assert_eq!(
            get(&server.url("/"), name).await.status,
            502,
            "{name} is routed (to nobody)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_upgrade_leaves_the_old_instance_serving() {
    let install = install_copy();
    let server = CoreServer::start_installed(install.path());
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    let old_worker = server.worker_pid();

    // The "new version" has a worker that cannot start.
    let worker = install.path().join("core-server-worker");
    std::fs::remove_file(&worker).unwrap();
    std::fs::write(
        &worker,
        "#!/bin/sh\necho 'new worker: broken' >&2\nexit 7\n",
    )
    .unwrap();
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let load = Load::start(server.http_port, "app.example", 2, 1);
    let output = tokio::task::block_in_place(|| server.command().output().unwrap());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("exited during start-up (exit status: 7)"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "the running core-server (pid {}) keeps serving",
            server.pid()
        )),
        "{stderr}"
    );

    // The old instance never stopped: same worker, requests and commands work.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = load.finish().await;
    assert_eq!(counts.failures(), 0, "{counts:?}");
    assert_eq!(server.worker_pid(), old_worker);
    assert_eq!(
        server.udp("add after.example 9"),
        "ok",
        "UDP commands resumed"
    );
    assert_eq!(get(&server.url("/"), "app.example").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_stop() {
    let mut server = CoreServer::start();
    server.add("b.example", 5001);
    server.add("a.example", 5000);
    let udp_port = server.udp_port.to_string();
    let cli = |args: &[&str]| {
        Command::new(binaries().join("core-server"))
            .arg("--udp-port")
            .arg(&udp_port)
            .args(args)
            .output()
            .unwrap()
    };
    let status = cli(&["status"]);
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    for want in [
        format!("supervisor   pid {}", server.pid()),
        format!("worker       pid {}", server.worker_pid()),
        format!("HTTP         port {}", server.http_port),
        format!("UDP          port {}", server.udp_port),
        "routes (2):\n  a.example -> 127.0.0.1:5000\n  b.example -> 127.0.0.1:5001".to_owned(),
    ] {
        assert!(text.contains(&want), "{want:?} in:\n{text}");
    }
    // `core-server status | head -1`: a reader that goes away early is no error.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = Command::new(binaries().join("core-server"))
        .args(["--udp-port", &udp_port, "status"])
        .stdout(Stdio::from(writer))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.is_empty(), "{stderr}");

    let worker = server.worker_pid();
    let stop = tokio::task::block_in_place(|| cli(&["stop"]));
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(String::from_utf8_lossy(&stop.stdout).ends_with("stopped\n"));
    assert!(server.wait_exit(Duration::from_secs(5)).success());
    assert!(!alive(worker));

    let status = cli(&["status"]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("no core-server is running"));
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_answers_idle_keep_alive_clients_and_sends_goaway_to_http2() {
    use http::Request;
    use http_body_util::Full;

    let mut server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("app.example", backend.port);
    let request = || {
        Request::get("http://app.example/")
            .header("host", "app.example")
            .body(Full::<Bytes>::default())
            .unwrap()
    };

    // An HTTP/1.1 keep-alive connection, used once and left idle.
    let (mut h1, h1_connection) = core_server_tests::http::http1_connect(server.http_port).await;
    let response = h1.send_request(request()).await.unwrap();
    assert!(response.headers().get("connection").is_none());
    response.into_body().collect().await.unwrap();
    // Another, whose request core-server serves itself (origin form; the absolute form above
    // goes to hyper): idle, it is parked (see `parked_connections`) during the drain.
    let (mut parked, parked_connection) =
        core_server_tests::http::http1_connect(server.http_port).await;
    let origin_request = || {
        Request::get("/")
            .header("host", "app.example")
            .body(Full::<Bytes>::default())
            .unwrap()
    };
    let response = parked.send_request(origin_request()).await.unwrap();
    assert!(response.headers().get("connection").is_none());
    response.into_body().collect().await.unwrap();
    // An HTTP/2 connection, used once; another not used yet.
    let (mut h2, h2_connection) = core_server_tests::http::h2_connect(server.http_port).await;
    assert_eq!(h2.send_request(request()).await.unwrap().status(), 200);
    let (mut h2_late, h2_late_connection) =
        core_server_tests::http::h2_connect(server.http_port).await;

    // Rerun in the background: the old instance drains, and waits for the idle HTTP/1 client.
    let old = server.pid();
    let rerun = tokio::task::spawn_blocking(move || {
        let status = server.rerun();
        (server, status)
    });
    // The HTTP/2 client is told to go away and its connection ends.
    tokio::time::timeout(Duration::from_secs(10), h2_connection)
        .await
        .expect("the HTTP/2 connection is closed by the draining instance")
        .unwrap()
        .ok();
    assert!(
        alive(old),
        "the old instance still drains: an HTTP/1 client is connected"
    );
    // The unused HTTP/2 connection's first request is served, then it is told to go away.
    assert_eq!(h2_late.send_request(request()).await.unwrap().status(), 200);
    tokio::time::timeout(Duration::from_secs(10), h2_late_connection)
        .await
        .expect("the late HTTP/2 connection is closed too")
        .unwrap()
        .ok();

    // A request on the idle HTTP/1 connection is answered, as its last; on the parked one too.
    answered_as_last(
        h1,
        request(),
        h1_connection,
        "the idle connection was not cut",
    )
    .await;
    let not_cut = "the parked connection was not cut";
    answered_as_last(parked, origin_request(), parked_connection, not_cut).await;

    // With its last connection gone, the old instance exits at once.
    let (server, status) = tokio::time::timeout(Duration::from_secs(10), rerun)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert_eq!(get(&server.url("/"), "app.example").await.status, 200);
}

/// Sends `request` on `sender`, an idle HTTP/1.1 connection of a draining worker: it is
/// answered as the connection's last (`Connection: close`), and `connection` then ends.
async fn answered_as_last(
    mut sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>,
    request: http::Request<http_body_util::Full<Bytes>>,
    connection: tokio::task::JoinHandle<hyper::Result<()>>,
    not_cut: &str,
) {
    sender.ready().await.expect(not_cut);
    let response = sender
        .send_request(request)
        .await
        .expect("answered during the drain");
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["connection"], "close");
    response.into_body().collect().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("then closed")
        .unwrap()
        .ok();
}

/// What a `Type=notify` unit with `NotifyAccess=main` hears: ready with the main pid; on a
/// reload, the old main process naming the rerun as the new one; stopping. A datagram socket
/// stands in for systemd's notify socket and, as systemd does, reads each sender's pid from the
/// kernel (`SO_PASSCRED`), heeding only the current main process.
#[tokio::test(flavor = "multi_thread")]
async fn systemd_hears_ready_main_pid_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    setsockopt(&notify, sockopt::PassCred, &true).unwrap();
    // The next notification and the pid that sent it.
    let next = || {
        let mut buf = [0u8; 512];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let message = recvmsg::<()>(
            notify.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::empty(),
        )
        .expect("a notification");
        let sender = message
            .cmsgs()
            .unwrap()
            .find_map(|c| match c {
                ControlMessageOwned::ScmCredentials(creds) => Some(creds.pid() as u32),
                _ => None,
            })
            .expect("the sender's credentials");
        let len = message.bytes;
        (sender, String::from_utf8_lossy(&buf[..len]).into_owned())
    };

    let mut server = CoreServer::start_with_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut main_pid = server.pid();
    assert_eq!(next(), (main_pid, format!("MAINPID={main_pid}\nREADY=1\n")));
    tokio::task::block_in_place(|| server.rerun());
    // Both speak: the old main process hands over, the rerun says it is ready (heeded only if
    // it arrives after the hand-over). What systemd ends up believing is what counts.
    for _ in 0..2 {
        let (sender, text) = next();
        if sender != main_pid {
            continue;
        }
        if let Some(pid) = text.lines().find_map(|l| l.strip_prefix("MAINPID=")) {
            main_pid = pid.parse().unwrap();
        }
    }
    assert_eq!(main_pid, server.pid(), "the rerun is the main process now");
    server.stop();
    assert_eq!(next(), (main_pid, "STOPPING=1\n".to_owned()));
}
