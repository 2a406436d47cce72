//! Release mode against a real ACME CA (pebble): certificates on demand for registered names,
//! as a user sees them. Requests trust pebble's issuing root only; what the CA saw is counted
//! in its log (orders, requests). Each test has its own pebble and core-server on free ports.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use core_server_tests::backend::{describe, full};
use core_server_tests::http::get;
use core_server_tests::pebble::{dead_port, HeldValidations, Pebble, PebbleOptions};
use core_server_tests::server::{
    alive, all_threads_stopped, binaries, children_named, proc_status, ACME_HELPER_COMM,
};
use core_server_tests::tls_client::{HandshakeError, Sni, TlsClient};
use core_server_tests::{have_root, have_tools, Backend, CoreServer};
use http::{Response, StatusCode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const NAME: &str = "app.example.com";

/// A core-server in release mode, the CA it gets certificates from, and an app routed at
/// [`NAME`] that echoes each request.
struct Release {
    server: CoreServer,
    pebble: Pebble,
    backend: Backend,
}

impl Release {
    /// Starts the CA (validating on the server's ports, as `options` adjusts), then the server.
    async fn start(options: impl FnOnce(PebbleOptions) -> PebbleOptions) -> Option<Release> {
        if !have_tools(
            "acme",
            &["pebble", "pebble-challtestsrv", "curl", "openssl"],
        ) {
            return None;
        }
        let backend =
            Backend::start(|request| async move { Response::new(full(describe(&request))) }).await;
        let release = blocking(|| {
            let mut server = CoreServer::unstarted();
            let pebble = Pebble::start_with(options(PebbleOptions::new(
                server.http_port,
                server.https_port,
            )));
            server.add_args(&pebble.release_args());
            server.launch();
            server.add(NAME, backend.port);
            Release {
                server,
                pebble,
                backend,
            }
        });
        Some(release)
    }

    /// A client trusting only the CA's current issuing root.
    fn client(&self) -> TlsClient {
        TlsClient::new(&[&self.pebble.issuing_root_pem()])
    }

    /// `GET /` for `name` over HTTPS through a new connection of `client`.
    async fn get(&self, client: &TlsClient, name: &str) -> core_server_tests::tls_client::TlsReply {
        client
            .try_get(self.server.https_port, &Sni::name(name), name, "/")
            .await
            .unwrap_or_else(|e| panic!("TLS handshake for {name}: {e:?}\n{}", self.logs()))
    }

    /// What everything logged: the server's output, its log file, and the CA's log.
    fn logs(&self) -> String {
        let core_log =
            std::fs::read_to_string(self.server.dir.join("logs/core.log")).unwrap_or_default();
        format!(
            "--- core-server output:\n{}\n--- core.log:\n{core_log}\n--- pebble:\n{}",
            self.server.log(),
            self.pebble.log()
        )
    }

    /// `core-server status`'s output.
    fn status(&self) -> String {
        let output = Command::new(binaries().join("core-server"))
            .arg("--udp-port")
            .arg(self.server.udp_port.to_string())
            .arg("status")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "core-server status: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The status line of the certificate for `name`.
    fn status_line(&self, name: &str) -> Option<String> {
        let status = self.status();
        let certificates = status.split_once("certificates (")?.1;
        certificates
            .lines()
            .map(str::trim)
            .find(|line| line.split_whitespace().next() == Some(name))
            .map(str::to_owned)
    }

    /// Stops the server and starts it again on the same ports and directory.
    fn restart_server(&mut self) {
        blocking(|| {
            self.server.stop();
            self.server.launch();
        });
    }
}

/// Runs blocking work (processes, waits) without holding up the runtime's other tasks.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(work)
}

/// Retries `attempt` every 100 ms until it returns `Some`, at most `within`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// curl, as a user runs it: `https://<name>:<port>/` resolved to loopback, trusting `root`
/// only, over `--http1.1` or `--http2`; the HTTP version it used and the body.
fn curl(port: u16, name: &str, root: &Path, version_flag: &str) -> (String, String) {
    let output = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--max-time", "60"])
        .arg(version_flag)
        .arg("--cacert")
        .arg(root)
        .arg("--resolve")
        .arg(format!("{name}:{port}:127.0.0.1"))
        .args(["--write-out", "\nversion %{http_version}"])
        .arg(format!("https://{name}:{port}/"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "curl {version_flag}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let (body, version) = stdout.rsplit_once("\nversion ").unwrap();
    (version.to_owned(), body.to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_name_gets_a_certificate_and_serves_http2_and_http1() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    let client = release.client();
    let reply = release.get(&client, NAME).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());
    assert_eq!(reply.session.alpn.as_deref(), Some("h2"));
    assert!(
        reply.body.contains("x-forwarded-proto: https"),
        "{}",
        reply.body
    );

    let reply = release.get(&client.clone().alpn(&["http/1.1"]), NAME).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.session.alpn.as_deref(), Some("http/1.1"));
    assert!(reply.body.starts_with("GET / HTTP/1.1"), "{}", reply.body);

    let root = release.pebble.issuing_root_pem();
    let port = release.server.https_port;
    let (version, body) = blocking(|| curl(port, NAME, &root, "--http2"));
    assert_eq!(version, "2");
    assert!(body.contains(&format!("host: {NAME}")), "{body}");
    let (version, body) = blocking(|| curl(port, NAME, &root, "--http1.1"));
    assert_eq!(version, "1.1");
    assert!(body.contains("x-forwarded-proto: https"), "{body}");

    // One order got the certificate; every later request used it.
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn http01_alone_gets_a_certificate_when_tls_alpn01_cannot_validate() {
    let Some(release) = Release::start(|o| PebbleOptions {
        tls_port: dead_port(),
        ..o
    })
    .await
    else {
        return;
    };
    let reply = release.get(&release.client(), NAME).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_alpn01_alone_gets_a_certificate_when_http01_cannot_validate() {
    let Some(release) = Release::start(|o| PebbleOptions {
        http_port: dead_port(),
        ..o
    })
    .await
    else {
        return;
    };
    let reply = release.get(&release.client(), NAME).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn port_80_redirects_registered_hosts_to_https_and_404s_unknown_ones() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    let reply = get(&release.server.url("/some/page?x=1"), NAME).await;
    assert_eq!(reply.status, StatusCode::PERMANENT_REDIRECT);
    let location = reply.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with(&format!("https://{NAME}")) && location.ends_with("/some/page?x=1"),
        "{location}"
    );

    let reply = get(&release.server.url("/some/page"), "unknown.example.com").await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);

    // A challenge path is never redirected: the CA must reach it over plain HTTP.
    let reply = get(
        &release
            .server
            .url("/.well-known/acme-challenge/no-such-token"),
        NAME,
    )
    .await;
    assert_ne!(reply.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(release.pebble.orders(), 0, "{}", release.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_first_handshakes_all_succeed_with_one_order() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    let root = release.pebble.issuing_root_pem();
    let port = release.server.https_port;
    let requests: Vec<_> = (0..50)
        .map(|_| {
            // A client each: 50 first handshakes, none resuming another's session.
            let client = TlsClient::new(&[&root]);
            tokio::spawn(async move { client.handshake(port, &Sni::name(NAME)).await.map(|_| ()) })
        })
        .collect();
    let mut failures = Vec::new();
    for request in requests {
        if let Err(error) = request.await.unwrap() {
            failures.push(error);
        }
    }
    assert!(failures.is_empty(), "{failures:?}\n{}", release.logs());
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn unregistered_sni_no_sni_and_ip_literals_fail_fast_without_reaching_the_ca() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    // First a certificate for the registered name: the account exists and the CA is quiet.
    let client = release.client();
    assert_eq!(release.get(&client, NAME).await.status, StatusCode::OK);
    let requests = release.pebble.requests();

    let port = release.server.https_port;
    for sni in [
        Sni::name("unregistered.example.com"),
        Sni::None,
        Sni::Ip("127.0.0.1".parse().unwrap()),
    ] {
        let started = Instant::now();
        let outcome = client.handshake(port, &sni).await;
        let took = started.elapsed();
        assert!(
            matches!(
                outcome,
                Err(HandshakeError::Tls(rustls::Error::AlertReceived(_)))
            ),
            "{sni:?}: {outcome:?}"
        );
        // "At once": well before a handshake waiting for a certificate would give up.
        assert!(took < Duration::from_secs(5), "{sni:?} took {took:?}");
    }
    assert_eq!(release.pebble.requests(), requests, "{}", release.logs());
    assert_eq!(release.pebble.orders(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_on_disk_serve_after_a_restart_while_the_ca_is_down() {
    let Some(mut release) = Release::start(|o| o).await else {
        return;
    };
    // The CA's root changes when it restarts: keep the one this certificate chains to.
    let client = release.client();
    assert_eq!(release.get(&client, NAME).await.status, StatusCode::OK);
    release.pebble.stop();
    release.restart_server();
    let reply = release.get(&client, NAME).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());
    assert_eq!(release.pebble.orders(), 1);
}

/// The `next try` time in a status line, if any.
fn next_try(line: &str) -> Option<SystemTime> {
    let at = line.split_once("next try ")?.1.split_whitespace().next()?;
    Some(humantime::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at:?}: {e}")))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_that_fails_validation_backs_off_and_the_backoff_survives_a_restart() {
    let Some(mut release) = Release::start(|o| PebbleOptions {
        http_port: dead_port(),
        tls_port: dead_port(),
        ..o
    })
    .await
    else {
        return;
    };
    let client = release.client();
    let port = release.server.https_port;
    let first = client.handshake(port, &Sni::name(NAME)).await;
    assert!(first.is_err(), "no certificate can be had: {first:?}");
    let line = eventually(Duration::from_secs(60), "status shows the failure", || {
        let line = release.status_line(NAME);
        async move { line.filter(|l| l.contains("last error: ") && l.contains("next try ")) }
    })
    .await;
    let until = next_try(&line).unwrap();
    assert!(until > SystemTime::now(), "{line}");
    let orders = release.pebble.orders();
    // However the helper falls back between challenge types, it stays within 3 a name an hour.
    assert!(
        (1..=3).contains(&orders),
        "{orders} orders\n{}",
        release.logs()
    );

    let backing_off = || SystemTime::now() < until;
    for _ in 0..5 {
        let outcome = client.handshake(port, &Sni::name(NAME)).await;
        assert!(outcome.is_err(), "{outcome:?}");
    }
    if backing_off() {
        assert_eq!(release.pebble.orders(), orders, "{}", release.logs());
    }

    release.restart_server();
    let line = eventually(
        Duration::from_secs(20),
        "the failure in status after a restart",
        || {
            let line = release.status_line(NAME);
            async move { line.filter(|l| l.contains("last error: ")) }
        },
    )
    .await;
    if backing_off() {
        assert_eq!(next_try(&line), Some(until), "{line}");
    }
    let outcome = client.handshake(port, &Sni::name(NAME)).await;
    assert!(outcome.is_err(), "{outcome:?}");
    if backing_off() {
        assert_eq!(release.pebble.orders(), orders, "{}", release.logs());
    }
}

/// The certificate's notAfter as `status` prints it (RFC 3339, seconds, UTC), from openssl.
fn not_after(leaf_der: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leaf.der");
    std::fs::write(&path, leaf_der).unwrap();
    let output = Command::new("openssl")
        .args([
            "x509", "-inform", "DER", "-noout", "-enddate", "-dateopt", "iso_8601", "-in",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    // "notAfter=2031-11-25 20:40:00Z"
    let text = String::from_utf8(output.stdout).unwrap();
    text.trim()
        .trim_start_matches("notAfter=")
        .replacen(' ', "T", 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_the_certificate_with_its_issuer_and_expiry() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    let reply = release.get(&release.client(), NAME).await;
    assert_eq!(reply.status, StatusCode::OK);
    let expires = not_after(&reply.session.chain[0]);
    let line = eventually(
        Duration::from_secs(10),
        "status lists the certificate",
        || {
            let line = release.status_line(NAME);
            async move { line.filter(|l| l.contains("expires")) }
        },
    )
    .await;
    assert!(line.contains("issuer Pebble Intermediate CA"), "{line}");
    assert!(line.contains(&format!("expires {expires}")), "{line}");
    assert!(!line.contains("last error"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_certificate_near_expiry_is_renewed_in_the_background_while_serving() {
    // Short-lived: renewed when half its lifetime remains, 20 s in.
    const LIFETIME: Duration = Duration::from_secs(40);
    let Some(release) = Release::start(|o| PebbleOptions {
        certificate_lifetime: Some(LIFETIME),
        ..o
    })
    .await
    else {
        return;
    };
    let root = release.pebble.issuing_root_pem();
    let first = release.get(&TlsClient::new(&[&root]), NAME).await;
    assert_eq!(first.status, StatusCode::OK, "{}", release.logs());
    let old = first.session.chain[0].clone();

    // Fresh clients (no resumption: each sees the certificate served now), every 200 ms,
    // until a new one is served; the old one expires meanwhile if renewal never comes.
    let deadline = Instant::now() + LIFETIME + Duration::from_secs(20);
    let mut served = 0;
    loop {
        let reply = release.get(&TlsClient::new(&[&root]), NAME).await;
        assert_eq!(reply.status, StatusCode::OK);
        served += 1;
        if reply.session.chain[0] != old {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not renewed within {:?} ({served} requests served)\n{}",
            LIFETIME + Duration::from_secs(20),
            release.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(served > 1, "the old certificate was served meanwhile");
    assert_eq!(release.pebble.orders(), 2, "{}", release.logs());
}

/// The paths `pid`'s open descriptors point at.
fn open_paths(pid: u32) -> Vec<PathBuf> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.unwrap().path()).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_helper_runs_apart_unprivileged_and_the_worker_holds_nothing_of_the_store() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    // A certificate issued: the account key and the certificate are in the store now.
    assert_eq!(
        release.get(&release.client(), NAME).await.status,
        StatusCode::OK,
        "{}",
        release.logs()
    );
    let server = &release.server;
    let helper = server.acme_helper_pid();
    let worker = server.worker_pid();
    assert_ne!(helper, worker);
    assert_ne!(helper, server.pid());
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(proc_status(helper, set), "0000000000000000", "{set}");
    }
    assert_eq!(proc_status(helper, "NoNewPrivs"), "1");
    if have_root("the helper runs as nobody") {
        let uid = proc_status(helper, "Uid");
        assert!(uid.split_whitespace().all(|id| id != "0"), "Uid {uid}");
    }

    let store = server.dir.canonicalize().unwrap().join("acme");
    assert!(
        open_paths(helper).iter().any(|p| p.starts_with(&store)),
        "the helper holds the store {}: {:?}",
        store.display(),
        open_paths(helper)
    );
    let worker_paths = open_paths(worker);
    assert!(
        !worker_paths.iter().any(|p| p.starts_with(&store)),
        "the worker holds a descriptor of the store: {worker_paths:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_helper_is_restarted_while_loaded_names_keep_serving() {
    let Some(release) = Release::start(|o| o).await else {
        return;
    };
    let root = release.pebble.issuing_root_pem();
    let reply = release.get(&TlsClient::new(&[&root]), NAME).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());

    let helper = release.server.acme_helper_pid();
    kill(Pid::from_raw(helper as i32), Signal::SIGKILL).unwrap();
    // A new client (no session to resume): the worker still holds the certificate.
    let reply = release.get(&TlsClient::new(&[&root]), NAME).await;
    assert_eq!(reply.status, StatusCode::OK);

    let server = &release.server;
    eventually(Duration::from_secs(30), "a new helper", || {
        let restarted = children_named(server.pid(), ACME_HELPER_COMM)
            .into_iter()
            .any(|pid| pid != helper && alive(pid));
        async move { restarted.then_some(()) }
    })
    .await;
    // The new helper is linked to the worker: a name registered now gets its certificate.
    const OTHER: &str = "other.example.com";
    blocking(|| server.add(OTHER, release.backend.port));
    let reply = release.get(&TlsClient::new(&[&root]), OTHER).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", release.logs());
    assert_eq!(release.pebble.orders(), 2, "{}", release.logs());
}

/// The `[pid]: ` of one of the server's children has logged a line containing `text`.
fn child_logged(logs: &str, pid: u32, text: &str) -> bool {
    let tag = format!("[{pid}]: ");
    logs.lines()
        .any(|line| line.contains(&tag) && line.contains(text))
}

/// A [`Release`] whose CA validates (TLS-ALPN-01 only) when the test lets it, and a first
/// handshake for [`NAME`] (HTTP/1.1), in the background, waiting for the certificate of the
/// order that is under way: the CA has connected to validate.
async fn ordering() -> Option<(Release, HeldValidations, OrderWaiter)> {
    let mut held = None;
    let release = Release::start(|o| {
        let validations = HeldValidations::new(o.tls_port);
        let options = PebbleOptions {
            tls_port: validations.port,
            http_port: dead_port(),
            ..o
        };
        held = Some(validations);
        options
    })
    .await?;
    let held = held.unwrap();
    // HTTP/1.1: what a draining worker does with a new HTTP/2 connection is rerun.rs's matter.
    let client = release.client().alpn(&["http/1.1"]);
    let waiting = release.request(client);
    let validating = blocking(|| held.wait_for_the_ca(Duration::from_secs(30)));
    assert!(validating, "the CA validates\n{}", release.logs());
    Some((release, held, waiting))
}

type OrderWaiter =
    tokio::task::JoinHandle<Result<core_server_tests::tls_client::TlsReply, HandshakeError>>;

impl Release {
    /// `GET /` for [`NAME`] over a new connection of `client`, in the background.
    fn request(&self, client: TlsClient) -> OrderWaiter {
        let port = self.server.https_port;
        tokio::spawn(async move { client.try_get(port, &Sni::name(NAME), NAME, "/").await })
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rerun_while_a_certificate_is_ordered_loses_no_request_and_counts_no_failure() {
    let Some((mut release, held, before)) = ordering().await else {
        return;
    };
    // The old helper finishes the order; the CA now reaches the new worker, which the new
    // helper has answer the old one's challenge.
    let mut old = blocking(|| release.server.rerun_until_taken_over());
    let (helper, worker) = (
        release.server.acme_helper_pid(),
        release.server.worker_pid(),
    );
    let logged = |pid, text| child_logged(&release.logs(), pid, text);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !logged(helper, "of the other helper's order") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A handshake on the new worker waits for that order too: it has not failed.
    let after = release.request(release.client());
    eventually(Duration::from_secs(20), "the new worker asks", || {
        let asked = logged(worker, "asking the ACME helper");
        async move { asked.then_some(()) }
    })
    .await;
    held.release();
    let outcomes = [
        ("waiting since before the rerun", before),
        ("made after it", after),
    ];
    let mut failed = Vec::new();
    for (which, outcome) in outcomes {
        match outcome.await.unwrap() {
            Ok(reply) if reply.status == StatusCode::OK => {}
            other => failed.push(format!("the request {which}: {other:?}")),
        }
    }
    assert!(failed.is_empty(), "{failed:#?}\n{}", release.logs());
    let exited = blocking(|| old.wait()).unwrap();
    assert!(exited.success(), "the old instance: {exited}");
    let reply = release.get(&release.client(), NAME).await;
    assert_eq!(reply.status, StatusCode::OK);

    // One order, which succeeded: no failure counted, none shown.
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
    let record = release.server.dir.join(format!("acme/names/{NAME}.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(
        record["backoff"]["failures"],
        serde_json::json!([]),
        "{record}"
    );
    assert!(record["backoff"]["last_error"].is_null(), "{record}");
    let line = eventually(Duration::from_secs(10), "the certificate in status", || {
        let line = release.status_line(NAME);
        async move { line.filter(|l| l.contains("expires")) }
    })
    .await;
    assert!(!line.contains("last error"), "{line}");
}

/// A rerun's new worker serves before its helper is up and has sent it the old helper's
/// challenges: a validation reaching it then waits for its challenge instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn a_validation_reaching_a_rerun_before_its_helper_waits_for_the_challenge() {
    let Some((mut release, held, before)) = ordering().await else {
        return;
    };
    // The taker stops itself once its worker owns the sockets, before starting its helper.
    let mut taker = release
        .server
        .spawn_rerun(&[("CORE_SERVER_FREEZE_AT", "owning")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !all_threads_stopped(taker.id()) {
        if let Some(status) = taker.try_wait().unwrap() {
            panic!("the rerun exited ({status}):\n{}", release.logs());
        }
        assert!(
            Instant::now() < deadline,
            "never frozen\n{}",
            release.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Only the new worker accepts now: the CA's validation reaches it, with no helper.
    held.release();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill(Pid::from_raw(taker.id() as i32), Signal::SIGCONT).unwrap();
    let mut old = release.server.adopt(taker);

    let outcome = before.await.unwrap();
    assert!(
        matches!(&outcome, Ok(reply) if reply.status == StatusCode::OK),
        "{outcome:?}\n{}",
        release.logs()
    );
    assert!(blocking(move || old.wait()).unwrap().success());
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
    // It was answered by the waiting, not by a second try of the CA's.
    assert!(
        release.logs().contains("waited") && release.logs().contains("for its challenge to come"),
        "{}",
        release.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_order_cut_short_by_a_killed_helper_counts_as_failed() {
    let Some((release, _held, waiting)) = ordering().await else {
        return;
    };
    let helper = release.server.acme_helper_pid();
    kill(Pid::from_raw(helper as i32), Signal::SIGKILL).unwrap();
    // The next helper backs off: an order that kills the helper is not placed over and over.
    let outcome = waiting.await.unwrap();
    assert!(outcome.is_err(), "{outcome:?}");
    let line = eventually(Duration::from_secs(20), "the failure in status", || {
        let line = release.status_line(NAME);
        async move { line.filter(|l| l.contains("last error: ") && l.contains("next try ")) }
    })
    .await;
    assert!(
        line.contains("an order was under way when the helper stopped"),
        "{line}"
    );
    let port = release.server.https_port;
    let outcome = release.client().handshake(port, &Sni::name(NAME)).await;
    assert!(outcome.is_err(), "{outcome:?}");
    assert_eq!(release.pebble.orders(), 1, "{}", release.logs());
    // What it left for a rerun's helper is removed.
    let challenges = release.server.dir.join("acme/challenges");
    eventually(Duration::from_secs(10), "its challenge removed", || {
        let empty = std::fs::read_dir(&challenges).unwrap().next().is_none();
        async move { empty.then_some(()) }
    })
    .await;
}
