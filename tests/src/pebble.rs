//! A real ACME CA for release-mode tests: `pebble`, with `pebble-challtestsrv` as its DNS
//! server (every A query answered 127.0.0.1, so it validates any name against the
//! core-server under test), on free loopback ports, both killed on drop.
//!
//! Debian's pebble ships no listener certificate: one is made here (rcgen) under a root of its
//! own, which core-server trusts through `--acme-ca-root`. The CA's issuing root is another
//! matter: pebble makes a new one at every start, served on its management port.
//!
//! What the CA saw is read from pebble's log, which names every request it handles: a test
//! counts new orders (or any request at all) to prove there was one, or none.
//! [`HeldValidations`] holds the CA's validations until the test lets them through.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::server::{free_tcp_port, free_udp_port};

/// How long pebble and its DNS server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// What pebble logs for each new-order request (RFC 8555 `newOrder`, pebble's `/order-plz`).
const NEW_ORDER: &str = "POST /order-plz ";

/// What pebble logs for each ACME request it handles (the management port logs nothing).
const ANY_REQUEST: &str = "-> calling handler()";

/// How the CA behaves: where it validates, and for how long it issues.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// The port pebble makes HTTP-01 validation requests to (core-server's HTTP port, or a
    /// dead one to make HTTP-01 fail).
    pub http_port: u16,
    /// The port pebble makes TLS-ALPN-01 validation handshakes with (core-server's HTTPS
    /// port, or a dead one to make TLS-ALPN-01 fail).
    pub tls_port: u16,
    /// The lifetime of the certificates it issues (pebble's `certificateValidityPeriod`);
    /// `None`: pebble's default (5 years).
    pub certificate_lifetime: Option<Duration>,
}

impl PebbleOptions {
    /// Validating against a core-server's HTTP and HTTPS ports, issuing long-lived certificates.
    pub fn new(http_port: u16, tls_port: u16) -> Self {
        PebbleOptions {
            http_port,
            tls_port,
            certificate_lifetime: None,
        }
    }
}

/// A port nothing listens on: pointing a challenge type there makes its validation fail at
/// once (connection refused), so the other type is the only one that can succeed.
pub fn dead_port() -> u16 {
    free_tcp_port()
}

/// A port for the CA to validate on that holds every connection until [`Self::release`], then
/// relays it to core-server's port: the order waits meanwhile, and the CA reaches whichever
/// worker accepts at the moment the test chooses (after a rerun, say).
pub struct HeldValidations {
    pub port: u16,
    /// Whether released, and how many connections came.
    state: Arc<(Mutex<(bool, usize)>, Condvar)>,
}

impl HeldValidations {
    /// Holds the connections to its port, to be relayed to `127.0.0.1:target`.
    pub fn new(target: u16) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new((Mutex::new((false, 0)), Condvar::new()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || {
                    let (lock, changed) = &*state;
                    let mut held = lock.lock().unwrap();
                    held.1 += 1;
                    changed.notify_all();
                    drop(
                        changed
                            .wait_while(held, |(released, _)| !*released)
                            .unwrap(),
                    );
                    let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                        return;
                    };
                    relay(client, server);
                });
            }
        });
        HeldValidations { port, state }
    }

    /// Waits until the CA has connected (it validates), at most `within`.
    pub fn wait_for_the_ca(&self, within: Duration) -> bool {
        let (lock, changed) = &*self.state;
        let held = lock.lock().unwrap();
        let (held, _) = changed
            .wait_timeout_while(held, within, |(_, connections)| *connections == 0)
            .unwrap();
        held.1 > 0
    }

    /// Lets the held connections, and those to come, through.
    pub fn release(&self) {
        let (lock, changed) = &*self.state;
        lock.lock().unwrap().0 = true;
        changed.notify_all();
    }
}

/// Copies bytes both ways between `a` and `b` until each side has ended.
fn relay(a: TcpStream, b: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    };
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let back = std::thread::spawn(move || copy(b2, a2));
    copy(a, b);
    let _ = back.join();
}

/// A running pebble and its DNS server.
pub struct Pebble {
    dir: tempfile::TempDir,
    /// The ACME API (`https://127.0.0.1:<acme_port>/dir`).
    pub acme_port: u16,
    /// The management API (`/roots/0`: the issuing root).
    pub management_port: u16,
    dns: Child,
    dns_port: u16,
    pebble: Option<Child>,
}

impl Pebble {
    /// Starts a CA that validates on `http_port` (HTTP-01) and `https_port` (TLS-ALPN-01),
    /// issuing long-lived certificates.
    pub fn start(http_port: u16, https_port: u16) -> Self {
        Self::start_with(PebbleOptions::new(http_port, https_port))
    }

    /// Starts a CA that behaves as `options` say.
    pub fn start_with(options: PebbleOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Readable by anyone: core-server reads the listener root, maybe as another user.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        write_listener_certificate(dir.path());
        let (dns, dns_port) = start_dns(dir.path());
        let acme_port = free_tcp_port();
        let management_port = free_tcp_port();
        let config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("127.0.0.1:{acme_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("listener.pem"),
                "privateKey": dir.path().join("listener-key.pem"),
                "httpPort": options.http_port,
                "tlsPort": options.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
                "certificateValidityPeriod": options.certificate_lifetime.map(|l| l.as_secs()),
            }
        });
        std::fs::write(dir.path().join("pebble.json"), config.to_string()).unwrap();
        let mut pebble = Pebble {
            dir,
            acme_port,
            management_port,
            dns,
            dns_port,
            pebble: None,
        };
        pebble.restart();
        pebble
    }

    /// Starts pebble (again, after [`Self::stop`]) on the same ports, and waits until it
    /// answers. A restarted pebble has a new issuing root and has forgotten every account
    /// and order; its log goes on in the same file, so counts go on too.
    pub fn restart(&mut self) {
        assert!(self.pebble.is_none(), "pebble already runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("pebble")
            .arg("-config")
            .arg(self.dir.path().join("pebble.json"))
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{}", self.dns_port))
            // Validate at once (no random sleeps), never reject a good nonce, never reuse
            // an authorization: each order is validated anew, as the tests count on.
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start pebble (scripts/test.sh installs it)");
        self.pebble = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while !(listening(self.acme_port) && listening(self.management_port)) {
            if let Some(status) = self.pebble.as_mut().unwrap().try_wait().unwrap() {
                self.pebble = None;
                panic!("pebble exited at start-up ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "pebble did not listen within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills pebble (its DNS server stays): the CA is unreachable until [`Self::restart`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.pebble.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// The ACME directory URL.
    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.acme_port)
    }

    /// The root (PEM) of pebble's listener certificate: what core-server must trust
    /// (`--acme-ca-root`) to talk to the CA.
    pub fn listener_root_pem(&self) -> PathBuf {
        self.dir.path().join("listener-root.pem")
    }

    /// core-server's arguments for release mode against this CA, attached to the test. A
    /// first handshake waits up to 30 s for its certificate (the default is 10 s): a loaded
    /// test machine can be slow to issue, and a test about issuance must not fail for that.
    pub fn release_args(&self) -> Vec<String> {
        vec![
            "--mode".to_owned(),
            "release".to_owned(),
            "--foreground".to_owned(),
            "--acme-directory".to_owned(),
            self.directory(),
            "--acme-ca-root".to_owned(),
            self.listener_root_pem().to_string_lossy().into_owned(),
            "--acme-wait".to_owned(),
            "30s".to_owned(),
        ]
    }

    /// Fetches the root (PEM) that the running pebble issues under (new at every start) from
    /// its management port, into a file: what a client trusts to accept its certificates.
    pub fn issuing_root_pem(&self) -> PathBuf {
        let path = self.dir.path().join("issuing-root.pem");
        let output = Command::new("curl")
            .args(["--silent", "--show-error", "--fail", "--max-time", "20"])
            .arg("--cacert")
            .arg(self.listener_root_pem())
            .arg("--output")
            .arg(&path)
            .arg(format!(
                "https://127.0.0.1:{}/roots/0",
                self.management_port
            ))
            .output()
            .expect("run curl");
        assert!(
            output.status.success(),
            "fetching pebble's issuing root: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let pem = std::fs::read_to_string(&path).unwrap();
        assert!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "pebble's /roots/0 is no certificate: {pem}"
        );
        path
    }

    /// How many new-order requests the CA has received (since the first start).
    pub fn orders(&self) -> usize {
        self.log().matches(NEW_ORDER).count()
    }

    /// How many ACME requests of any kind the CA has received (since the first start).
    pub fn requests(&self) -> usize {
        self.log().matches(ANY_REQUEST).count()
    }

    /// Everything pebble logged (all its runs).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("pebble.log")
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = kill(Pid::from_raw(self.dns.id() as i32), Signal::SIGKILL);
        let _ = self.dns.wait();
    }
}

/// Whether something accepts TCP connections on `127.0.0.1:port`.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

/// Starts pebble-challtestsrv as a DNS server only (every A query: 127.0.0.1, no AAAA, no
/// challenge servers of its own): the child and its DNS port, once it runs.
fn start_dns(dir: &Path) -> (Child, u16) {
    // It serves DNS over UDP and TCP on the same port: find one free for both.
    let dns_port = (0..100)
        .map(|_| free_udp_port())
        .find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a port free for both UDP and TCP");
    let management_port = free_tcp_port();
    let log_path = dir.join("challtestsrv.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new("pebble-challtestsrv")
        .args(["-dns01", &format!("127.0.0.1:{dns_port}")])
        .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
        .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
        .args(["-management", &format!("127.0.0.1:{management_port}")])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start pebble-challtestsrv (scripts/test.sh installs it)");
    // It starts the DNS server before its management server: once that listens, both do.
    let deadline = Instant::now() + START_TIMEOUT;
    while !listening(management_port) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut text = String::new();
            let _ = std::fs::File::open(&log_path).and_then(|mut f| f.read_to_string(&mut text));
            panic!("pebble-challtestsrv exited at start-up ({status}):\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "pebble-challtestsrv did not start within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, dns_port)
}

/// Writes pebble's listener certificate (`listener.pem`, `listener-key.pem`), valid for
/// 127.0.0.1 and localhost, and the root it is issued under (`listener-root.pem`).
fn write_listener_certificate(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

    let mut root_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.distinguished_name.push(
        DnType::CommonName,
        "core-server tests: pebble listener root",
    );
    let root_key = KeyPair::generate().unwrap();
    let root = rcgen::CertifiedIssuer::self_signed(root_params, root_key).unwrap();

    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "pebble listener");
    let key = KeyPair::generate().unwrap();
    let certificate = params.signed_by(&key, &root).unwrap();

    std::fs::write(dir.join("listener-root.pem"), root.pem()).unwrap();
    std::fs::write(dir.join("listener.pem"), certificate.pem()).unwrap();
    std::fs::write(dir.join("listener-key.pem"), key.serialize_pem()).unwrap();
}
