//! HTTPS in local mode, with a real mkcert: the worker terminates TLS for registered domains
//! only, with the certificates the ACME helper makes, and proxies as on port 80; sessions
//! resume across a worker restart and a rerun; a killed worker is replaced quickly under load.
//! Clients: curl and openssl (real peers, with mkcert's root as the only CA) and the rustls
//! client of `tls_client`.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use core_server_tests::backend::{check_websocket_echo, websocket_echo};
use core_server_tests::http::{get, read_until_closed};
use core_server_tests::mkcert::MkcertCa;
use core_server_tests::server::children_named;
use core_server_tests::tls_client::{HandshakeError, Sni, TlsClient};
use core_server_tests::{have_tools, Backend, CoreServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::AlertDescription;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const APP: &str = "app.example";

/// What the worker logs (at debug) when it asks the helper for a certificate.
const ASKED: &str = "asking the ACME helper for the certificate of";

/// A refusal comes at once; a handshake that waited for a certificate would take the whole
/// `--acme-wait` (10 s by default) first.
const AT_ONCE: Duration = Duration::from_secs(5);

/// A local-mode core-server using a throwaway mkcert CA, with `APP` routed to an echo backend.
struct Local {
    ca: MkcertCa,
    server: CoreServer,
    _backend: Backend,
}

impl Local {
    async fn start() -> Local {
        let ca = MkcertCa::new();
        let env = ca.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
        // Reruns get the same environment.
        let server = CoreServer::start_with_env(&env);
        Self::serving(ca, server).await
    }

    /// With extra command-line arguments (`--header-timeout 2s`); not for reruns, which would
    /// run without the CA's environment.
    async fn start_with(args: &[&str]) -> Local {
        let ca = MkcertCa::new();
        let env = ca.env();
        let server = CoreServer::start_with_command(|command, _| {
            command.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        });
        Self::serving(ca, server).await
    }

    async fn serving(ca: MkcertCa, server: CoreServer) -> Local {
        let backend = Backend::echo().await;
        server.add(APP, backend.port);
        Local {
            ca,
            server,
            _backend: backend,
        }
    }

    fn client(&self) -> TlsClient {
        TlsClient::new(&[&self.ca.root_pem()])
    }

    fn port(&self) -> u16 {
        self.server.https_port
    }
}

fn tools(test: &str) -> bool {
    have_tools(test, &["mkcert", "curl", "openssl"])
}

/// `curl` for `https://APP:<port><path>` for each of `paths` in turn (over one connection
/// while it lasts), trusting `root` only, writing `write_out` after each; its output.
fn curl(port: u16, root: &Path, version: &str, paths: &[&str], write_out: &str) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30", version, "--cacert"])
        .arg(root)
        .arg("--resolve")
        .arg(format!("{APP}:{port}:127.0.0.1"))
        .args(["-w", write_out])
        .args(
            paths
                .iter()
                .map(|path| format!("https://{APP}:{port}{path}")),
        )
        .output()
        .expect("run curl")
}

/// `openssl s_client` to the HTTPS port with `servername` as SNI, sending one request and
/// reading the answer (so TLS 1.3 tickets arrive); `extra` adds options (`-sess_out F`).
fn s_client(port: u16, root: &Path, servername: &str, extra: &[&str]) -> Output {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(["-servername", servername, "-CAfile"])
        .arg(root)
        .args(["-verify_return_error", "-ign_eof"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl");
    let request = format!("GET / HTTP/1.1\r\nHost: {APP}\r\nConnection: close\r\n\r\n");
    use std::io::Write;
    let _ = child.stdin.take().unwrap().write_all(request.as_bytes());
    child.wait_with_output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A handshake refused with `alert`, at once.
async fn assert_refused(client: &TlsClient, port: u16, sni: &Sni, alert: AlertDescription) {
    let started = Instant::now();
    match client.handshake(port, sni).await {
        Err(HandshakeError::Tls(rustls::Error::AlertReceived(got))) => {
            assert_eq!(got, alert, "{sni:?}")
        }
        other => panic!("{sni:?}: expected the alert {alert:?}, got {other:?}"),
    }
    assert!(
        started.elapsed() < AT_ONCE,
        "{sni:?}: {:?}",
        started.elapsed()
    );
}

/// SIGKILLs the current worker; returns once the supervisor has started another.
fn kill_worker(server: &CoreServer) -> u32 {
    let old = server.worker_pid();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let new: Vec<u32> = children_named(server.pid(), "core-server-wor")
            .into_iter()
            .filter(|pid| *pid != old && core_server_tests::server::alive(*pid))
            .collect();
        if let Some(new) = new.first() {
            return *new;
        }
        assert!(
            Instant::now() < deadline,
            "no new worker:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_domain_is_served_over_https_with_http1_and_http2() {
    if !tools("a_registered_domain_is_served_over_https_with_http1_and_http2") {
        return;
    }
    let local = Local::start().await;
    let root = local.ca.root_pem();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let output = tokio::task::block_in_place(|| {
            curl(
                local.port(),
                &root,
                flag,
                &["/path?q=1"],
                "\n%{http_version}",
            )
        });
        let said = text(&output);
        assert!(output.status.success(), "{said}\n{}", local.server.log());
        let (body, got) = String::from_utf8_lossy(&output.stdout)
            .rsplit_once('\n')
            .map(|(b, v)| (b.to_owned(), v.to_owned()))
            .unwrap();
        assert_eq!(got, version, "{said}");
        assert!(body.starts_with("GET /path?q=1 HTTP/1.1\n"), "{body}");
        assert!(body.contains("\nx-forwarded-proto: https\n"), "{body}");
        assert!(body.contains(&format!("\nhost: {APP}")), "{body}");
    }
    // The rustls client: both protocols by ALPN, TLS 1.2 and 1.3, the certificate mkcert's.
    for alpn in ["h2", "http/1.1"] {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = local.client().alpn(&[alpn]).versions(&[version]);
            let reply = client
                .get(local.port(), &Sni::name("App.Example"), APP, "/x")
                .await;
            assert_eq!(reply.status, 200, "{alpn} {version:?}");
            assert_eq!(reply.session.alpn.as_deref(), Some(alpn));
            assert_eq!(reply.session.version, version.version);
            assert!(
                reply.body.contains("x-forwarded-proto: https"),
                "{}",
                reply.body
            );
        }
    }
    // Local mode: plain HTTP is still proxied, not redirected.
    let plain = get(&local.server.url("/"), APP).await;
    assert_eq!(plain.status, 200);
    assert!(
        plain.body.contains("x-forwarded-proto: http\n"),
        "{}",
        plain.body
    );
}

/// `http://host:443/`, a common slip: a 400 that says so, not a TLS alert that curl or a
/// browser shows as garbage.
#[tokio::test(flavor = "multi_thread")]
async fn plain_http_on_the_https_port_gets_a_400_that_says_so() {
    if !tools("plain_http_on_the_https_port_gets_a_400_that_says_so") {
        return;
    }
    let local = Local::start().await;
    let url = format!("http://127.0.0.1:{}/", local.port());
    let host = format!("Host: {APP}");
    let output = tokio::task::block_in_place(|| {
        let curl = ["-sS", "-H", &host, "-w", "\n%{http_code}", &url];
        Command::new("curl").args(curl).output().unwrap()
    });
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "This port speaks HTTPS: the request came as plain HTTP.\n\n400"
    );
    // And HTTPS on it as before.
    let reply = local
        .client()
        .get(local.port(), &Sni::name(APP), APP, "/")
        .await;
    assert_eq!(reply.status, 200);
}

/// Over TLS, HTTP/2 is spoken only if ALPN chose it (RFC 9113 §3.3): a client that chose
/// `http/1.1` and sends HTTP/2's preface has its connection closed.
#[tokio::test(flavor = "multi_thread")]
async fn http2_over_tls_only_by_alpn() {
    if !tools("http2_over_tls_only_by_alpn") {
        return;
    }
    let local = Local::start().await;
    let client = local.client().alpn(&["http/1.1"]);
    let mut tls = client.connect(local.port(), &Sni::name(APP)).await.unwrap();
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    tls.write_all(preface).await.unwrap();
    let mut answer = Vec::new();
    // Closed without TLS's close_notify, as hyper's HTTP/1 server does: an error, or the end.
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut answer))
        .await
        .expect("closed within 10 s");
    assert_eq!(answer, b"", "no HTTP/2 SETTINGS: the connection closed");
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_over_tls_reaches_the_backend() {
    if !tools("websocket_over_tls_reaches_the_backend") {
        return;
    }
    let local = Local::start().await;
    local.server.add("ws.example", websocket_echo().await);
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_file_iter(local.ca.root_pem()).unwrap() {
        roots.add(root.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", local.port()))
        .await
        .unwrap();
    let name = ServerName::try_from("ws.example").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake for ws.example");
    check_websocket_echo("wss://ws.example/chat", tls, 20).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unregistered_names_no_sni_and_ip_literals_are_refused_at_once_unasked() {
    if !tools("unregistered_names_no_sni_and_ip_literals_are_refused_at_once_unasked") {
        return;
    }
    let local = Local::start().await;
    let client = local.client();
    let port = local.port();
    use AlertDescription::{HandshakeFailure, UnrecognisedName};
    assert_refused(&client, port, &Sni::name("other.example"), UnrecognisedName).await;
    assert_refused(&client, port, &Sni::name("x.app.example"), UnrecognisedName).await;
    assert_refused(&client, port, &Sni::None, HandshakeFailure).await;
    let ip = Sni::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_refused(&client, port, &ip, HandshakeFailure).await;
    // Names crafted to escape a directory or pass for an option, straight from openssl.
    let root = local.ca.root_pem();
    for name in [
        "../x",
        "/",
        "-x.example",
        "app.example/../../etc",
        "..",
        "a\\b",
    ] {
        let started = Instant::now();
        let output = tokio::task::block_in_place(|| s_client(port, &root, name, &[]));
        let said = text(&output);
        assert!(!output.status.success(), "{name}: {said}");
        assert!(said.contains("alert"), "{name}: {said}");
        assert!(started.elapsed() < AT_ONCE, "{name}");
    }
    let log = local.server.log();
    assert!(!log.contains(ASKED), "{log}");
    // The refusals did not stop the registered name from being served.
    let reply = client.get(port, &Sni::name(APP), APP, "/").await;
    assert_eq!(reply.status, 200);
    assert!(local.server.log().contains(&format!("{ASKED} {APP}")));
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_never_finished_close_at_the_header_timeout_while_others_are_served() {
    if !tools("handshakes_never_finished_close_at_the_header_timeout_while_others_are_served") {
        return;
    }
    let local = Local::start_with(&["--header-timeout", "2s"]).await;
    let port = local.port();
    let mut stalled = Vec::new();
    for _ in 0..50 {
        stalled.push(TcpStream::connect(("127.0.0.1", port)).await.unwrap());
    }
    // A ClientHello's record header promising 512 bytes, and one of them.
    let mut partial = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    partial.write_all(&[0x16, 3, 1, 2, 0, 1]).await.unwrap();
    stalled.push(partial);
    let reply = local.client().get(port, &Sni::name(APP), APP, "/").await;
    assert_eq!(reply.status, 200);
    for stream in &mut stalled {
        // Far above the 2 s: only a connection left open fails this.
        let closed = read_until_closed(stream, Duration::from_secs(30)).await;
        assert!(closed.is_ok(), "still open: {closed:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn remove_stops_serving_the_certificate() {
    if !tools("remove_stops_serving_the_certificate") {
        return;
    }
    let local = Local::start().await;
    let client = local.client();
    assert!(client
        .handshake(local.port(), &Sni::name(APP))
        .await
        .is_ok());
    assert_eq!(local.server.udp(&format!("remove {APP}")), "ok");
    let sni = Sni::name(APP);
    assert_refused(
        &client,
        local.port(),
        &sni,
        AlertDescription::UnrecognisedName,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_resume_across_a_worker_sigkill_and_a_rerun() {
    if !tools("sessions_resume_across_a_worker_sigkill_and_a_rerun") {
        return;
    }
    let mut local = Local::start().await;
    let port = local.port();
    let sni = Sni::name(APP);
    let clients = [
        local.client().versions(&[&rustls::version::TLS13]),
        local.client().versions(&[&rustls::version::TLS12]),
    ];
    for client in &clients {
        let first = client.get(port, &sni, APP, "/").await;
        assert!(!first.session.resumed);
    }
    let root = local.ca.root_pem();
    let sessions = tempfile::tempdir().unwrap();
    let session = sessions.path().join("session.pem");
    let session_arg = session.to_str().unwrap();
    let output =
        tokio::task::block_in_place(|| s_client(port, &root, APP, &["-sess_out", session_arg]));
    assert!(text(&output).contains("New, TLSv1.3"), "{}", text(&output));

    for restart in ["worker SIGKILL", "rerun"] {
        match restart {
            "rerun" => assert!(tokio::task::block_in_place(|| local.server.rerun()).success()),
            _ => drop(tokio::task::block_in_place(|| kill_worker(&local.server))),
        }
        for client in &clients {
            let again = client.get(port, &sni, APP, "/").await;
            assert_eq!(again.status, 200);
            assert!(
                again.session.resumed,
                "{restart}: {:?} not resumed",
                again.session.version
            );
        }
        let output =
            tokio::task::block_in_place(|| s_client(port, &root, APP, &["-sess_in", session_arg]));
        assert!(
            text(&output).contains("Reused, TLSv1.3"),
            "{restart}: {}",
            text(&output)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_worker_sigkill_under_https_load_new_handshakes_are_served_within_a_second() {
    if !tools("after_a_worker_sigkill_under_https_load_new_handshakes_are_served_within_a_second") {
        return;
    }
    let local = Local::start().await;
    let port = local.port();
    let sni = Sni::name(APP);
    // Warm: the certificate is made and the helper holds it.
    let client = local.client();
    assert_eq!(client.get(port, &sni, APP, "/").await.status, 200);

    // Load: new connections (each a full handshake) and requests, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, served) = (stop.clone(), served.clone());
            let client = local.client();
            let sni = sni.clone();
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if client.handshake(port, &sni).await.is_ok() {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(served.load(Ordering::Relaxed) > 0, "{}", local.server.log());

    let old = local.server.worker_pid();
    let killed = Instant::now();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    // A fresh client each time: no session to resume, a full handshake.
    let mut attempts = 0;
    let served_again = loop {
        attempts += 1;
        assert!(attempts < 1000, "{}", local.server.log());
        if local.client().handshake(port, &sni).await.is_ok()
            && children_named(local.server.pid(), "core-server-wor")
                .iter()
                .any(|pid| *pid != old)
        {
            break killed.elapsed();
        }
    };
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    eprintln!("new handshakes served again {served_again:?} after the SIGKILL ({attempts} tries)");
    assert!(
        served_again < Duration::from_secs(1),
        "new handshakes served again {served_again:?} after the SIGKILL"
    );
}

/// curl's outcomes under load: how many requests were answered 200, and what else it saw.
#[derive(Default)]
struct Outcomes {
    ok: u64,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_under_https_load_fails_no_request() {
    if !tools("a_rerun_under_https_load_fails_no_request") {
        return;
    }
    let mut local = Local::start().await;
    let root = local.ca.root_pem();
    let port = local.port();
    assert!(
        local
            .client()
            .get(port, &Sni::name(APP), APP, "/")
            .await
            .status
            == 200
    );

    // HTTP/1.1 keep-alive, HTTP/2 (one connection, many requests), and a new TLS connection
    // per request, until the rerun is over (60 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = [("--http1.1", 20), ("--http2", 20), ("--http1.1", 1)]
        .into_iter()
        .map(|(flag, per_connection)| {
            let (stop, root) = (stop.clone(), root.clone());
            std::thread::spawn(move || {
                let paths = vec!["/"; per_connection];
                let mut outcomes = Outcomes::default();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let output = curl(port, &root, flag, &paths, "%{http_code}\n");
                    let said = String::from_utf8_lossy(&output.stdout).into_owned();
                    let codes: Vec<&str> = said.lines().filter(|l| l.len() == 3).collect();
                    outcomes.ok += codes.iter().filter(|c| **c == "200").count() as u64;
                    if !output.status.success() || codes.iter().any(|c| *c != "200") {
                        outcomes.failures.push(format!("{flag}: {}", text(&output)));
                    }
                }
                outcomes
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(tokio::task::block_in_place(|| local.server.rerun()).success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for load in loads {
        let outcomes = load.join().unwrap();
        eprintln!("{} requests answered through the rerun", outcomes.ok);
        assert!(outcomes.ok > 0);
        assert!(
            outcomes.failures.is_empty(),
            "{} answered, failed: {:?}",
            outcomes.ok,
            outcomes.failures
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_holds_no_descriptor_of_the_certificate_store() {
    if !tools("the_worker_holds_no_descriptor_of_the_certificate_store") {
        return;
    }
    let local = Local::start().await;
    let client = local.client();
    assert!(client
        .handshake(local.port(), &Sni::name(APP))
        .await
        .is_ok());
    let store = std::fs::canonicalize(local.server.dir.join("acme")).unwrap();
    let under_store = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter(|target| target.starts_with(&store))
            .map(|target| target.display().to_string())
            .collect()
    };
    let worker = local.server.worker_pid();
    assert_eq!(under_store(worker), Vec::<String>::new());
    // The helper does hold the store: what the worker is checked for is there to see.
    let helper = children_named(local.server.pid(), "core-server-acm");
    assert_eq!(helper.len(), 1, "{helper:?}");
    assert!(!under_store(helper[0]).is_empty());
}

/// A name DNS allows but too long for a file named after it with a temp suffix (240 bytes, in
/// five labels): its certificate is stored all the same, so after a restart it is served
/// from the store (the same leaf: mkcert was not run again) and `status` lists it.
#[tokio::test(flavor = "multi_thread")]
async fn a_240_byte_name_keeps_its_certificate_across_a_restart() {
    if !tools("a_240_byte_name_keeps_its_certificate_across_a_restart") {
        return;
    }
    let long = format!(
        "{}.{}.{}.{}.example",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(40)
    );
    assert_eq!(long.len(), 240);
    let mut local = Local::start().await;
    let backend = Backend::echo().await;
    local.server.add(&long, backend.port);
    let (port, sni) = (local.port(), Sni::name(&long));
    let first = local.client().get(port, &sni, &long, "/").await;
    assert_eq!(first.status, 200);

    tokio::task::block_in_place(|| {
        assert!(local.server.stop().success());
        local.server.launch();
    });
    let again = local.client().get(port, &sni, &long, "/").await;
    assert_eq!(again.status, 200);
    assert!(
        again.session.chain[0] == first.session.chain[0],
        "a new certificate, not the stored one:\n{}",
        local.server.log()
    );
    let started = Instant::now();
    loop {
        let status = tokio::task::block_in_place(|| local.server.status());
        let listed = status
            .lines()
            .map(str::trim)
            .any(|line| line.starts_with(&format!("{long}  issuer ")));
        if listed {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no certificate for {long} in status:\n{status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A certificate file the helper cannot read (another owner's, a wrong mode) is set aside
/// for the operator, as a damaged one is, not replaced unseen.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_certificate_file_is_set_aside_not_replaced() {
    if !tools("an_unreadable_certificate_file_is_set_aside_not_replaced") {
        return;
    }
    let mut local = Local::start().await;
    let (port, sni) = (local.port(), Sni::name(APP));
    let first = local.client().get(port, &sni, APP, "/").await;
    assert_eq!(first.status, 200);

    let certs = local.server.dir.join("acme/certs");
    let file = certs.join(format!("{APP}.pem"));
    tokio::task::block_in_place(|| {
        assert!(local.server.stop().success());
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
        local.server.launch();
    });
    let again = local.client().get(port, &sni, APP, "/").await;
    assert_eq!(again.status, 200, "{}", local.server.log());
    let aside: Vec<_> = std::fs::read_dir(&certs)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(&format!("{APP}.pem.unusable-")))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}\n{}", local.server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_mkcert_port_443_refuses_handshakes_at_once() {
    if !tools("without_mkcert_port_443_refuses_handshakes_at_once") {
        return;
    }
    // No mkcert on PATH, no CAROOT.
    let server = CoreServer::start_with_env(&[("PATH", "/nonexistent"), ("CAROOT", "")]);
    let backend = Backend::echo().await;
    server.add(APP, backend.port);
    let ca = MkcertCa::new();
    let client = TlsClient::new(&[&ca.root_pem()]);
    let sni = Sni::name(APP);
    let port = server.https_port;
    assert_refused(&client, port, &sni, AlertDescription::HandshakeFailure).await;
    // HTTP is served.
    assert_eq!(get(&server.url("/"), APP).await.status, 200);
}

/// A mkcert CA directory the helper cannot open (none there, or another user's, as root's
/// home is to `nobody`) is said plainly at start: local-mode HTTPS cannot work.
#[tokio::test(flavor = "multi_thread")]
async fn a_mkcert_ca_the_helper_cannot_open_is_said_at_start() {
    if !tools("a_mkcert_ca_the_helper_cannot_open_is_said_at_start") {
        return;
    }
    let caroot = tempfile::tempdir().unwrap();
    let missing = caroot.path().join("not-there");
    let server = CoreServer::start_with_env(&[("CAROOT", missing.to_str().unwrap())]);
    let said = format!(
        "mkcert's CA directory {} cannot be opened",
        missing.display()
    );
    server
        .wait_logged_async(&said, Duration::from_secs(10))
        .await;
}
