//! Starting and stopping a real core-server for one test.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a core-server may take to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The binaries an installation has, side by side.
pub const BINARIES: [&str; 4] = [
    "core-server",
    "core-server-worker",
    "core-server-acme",
    "core-agent",
];

/// The ACME helper's command name as /proc shows it (`core-server-acme` cut to 15 bytes).
pub const ACME_HELPER_COMM: &str = "core-server-acm";

/// The directory holding the built binaries (`target/debug`), next to the test executable's
/// `deps/`. When root, the children run as `nobody`, who must be able to execute them: if the
/// checkout is not world-traversable (a clone under /root), they are copied somewhere that is.
pub fn binaries() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        for name in BINARIES {
            assert!(
                dir.join(name).is_file(),
                "{} is missing: build the binaries first (cargo build --workspace)",
                dir.join(name).display()
            );
        }
        if !nix::unistd::Uid::effective().is_root() || world_traversable(&dir) {
            return dir;
        }
        let copy =
            std::env::temp_dir().join(format!("core-server-test-bin-{}", std::process::id()));
        std::fs::create_dir_all(&copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        for name in BINARIES {
            std::fs::copy(dir.join(name), copy.join(name)).unwrap();
        }
        copy
    })
}

fn world_traversable(dir: &Path) -> bool {
    dir.ancestors()
        .all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

/// A private copy of the binaries, in a directory anyone may use (an unprivileged supervisor
/// writes its state there, its worker runs from there); removed on drop.
pub fn install_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    for name in BINARIES {
        std::fs::copy(binaries().join(name), dir.path().join(name)).unwrap();
    }
    dir
}

/// A TCP port free on every address right now.
pub fn free_tcp_port() -> u16 {
    free_port(|port| TcpListener::bind(("::", port)).is_ok())
}

/// A loopback port that refuses connections (an app that is down): bound, never listening, and
/// held by the socket returned, so that no other test's server takes it meanwhile (a port
/// bound and let go can be).
pub fn refusing_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

/// A UDP port free on every address right now.
pub fn free_udp_port() -> u16 {
    free_port(|port| UdpSocket::bind(("::", port)).is_ok())
}

/// A port that `free` says is free, below the kernel's ephemeral range. A port that
/// `bind(0)` finds free is from that range, from which the kernel also picks the local port
/// of every connection opened: one opened by a test running meanwhile could take it before
/// the server under test binds it ("Address already in use"). Each test process starts at
/// its own place in the range, and takes ports in turn.
fn free_port(free: impl Fn(u16) -> bool) -> u16 {
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIRST);
    assert!(
        span >= 1_000,
        "the ephemeral port range starts at {ephemeral}: no room below it for test ports"
    );
    let start = std::process::id().wrapping_mul(997);
    for _ in 0..span {
        let port = FIRST + start.wrapping_add(TAKEN.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port).expect("below the ephemeral range");
        if free(port) {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {ephemeral}");
}

/// A running core-server (supervisor and worker) with its own ports and state directory.
pub struct CoreServer {
    child: Option<Child>,
    pub http_port: u16,
    pub https_port: u16,
    pub udp_port: u16,
    pub dir: PathBuf,
    _tempdir: Option<tempfile::TempDir>,
    extra_args: Vec<String>,
    /// The network namespace it runs in (`None`: the test's own).
    netns: Option<String>,
    /// Where its binaries are.
    binaries: PathBuf,
    /// Environment variables it gets on top of the test's.
    env: Vec<(String, String)>,
}

impl CoreServer {
    /// Starts core-server on free ports with a fresh state directory.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra command-line arguments (e.g. `--backend-timeout 1s`).
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_in(None, args)
    }

    /// Starts inside network namespace `netns` (made by the test, e.g. with [`crate::netns`]).
    pub fn start_in_netns(netns: &str) -> Self {
        Self::start_in(Some(netns), &[])
    }

    /// Starts the binaries in `dir` (see [`install_copy`]) instead of the built ones.
    pub fn start_installed(dir: &Path) -> Self {
        let mut server = Self::new(None, &[]);
        server.binaries = dir.to_path_buf();
        server.launch();
        server
    }

    fn start_in(netns: Option<&str>, args: &[&str]) -> Self {
        let mut server = Self::new(netns, args);
        server.launch();
        server
    }

    fn new(netns: Option<&str>, args: &[&str]) -> Self {
        let tempdir = tempfile::tempdir().unwrap();
        let dir = tempdir.path().join("state");
        CoreServer {
            child: None,
            http_port: free_tcp_port(),
            https_port: free_tcp_port(),
            udp_port: free_udp_port(),
            dir,
            _tempdir: Some(tempdir),
            extra_args: args.iter().map(|s| s.to_string()).collect(),
            netns: netns.map(str::to_owned),
            binaries: binaries().to_path_buf(),
            env: Vec::new(),
        }
    }

    /// Starts with `env` added to its environment (and that of every rerun).
    pub fn start_with_env(env: &[(&str, &str)]) -> Self {
        let mut server = Self::new(None, &[]);
        server.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        server.launch();
        server
    }

    /// A server with its ports and directory chosen but not started: the test can set up
    /// what needs its ports first (a test CA validating on them), add arguments and
    /// environment, then [`Self::launch`] it.
    pub fn unstarted() -> Self {
        Self::new(None, &[])
    }

    /// Adds command-line arguments (from the next launch or rerun on).
    pub fn add_args<S: AsRef<str>>(&mut self, args: &[S]) {
        self.extra_args
            .extend(args.iter().map(|a| a.as_ref().to_owned()));
    }

    /// Adds environment variables (from the next launch or rerun on).
    pub fn add_env<K: AsRef<str>, V: AsRef<str>>(&mut self, env: &[(K, V)]) {
        self.env.extend(
            env.iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
    }

    /// Runs the binaries in `dir` from the next rerun on (an upgrade to another version).
    pub fn set_binaries(&mut self, dir: &Path) {
        self.binaries = dir.to_path_buf();
    }

    /// The command line this server runs with.
    pub fn command(&self) -> Command {
        self.command_from(&self.binaries)
    }

    /// The command line this server runs with, with the binaries in `dir`.
    pub fn command_from(&self, dir: &Path) -> Command {
        let binary = dir.join("core-server");
        let mut command = match &self.netns {
            None => Command::new(binary),
            Some(netns) => {
                // `ip netns exec` execs the binary: the pid stays core-server's.
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary);
                command
            }
        };
        command
            .arg("--http-port")
            .arg(self.http_port.to_string())
            .arg("--https-port")
            .arg(self.https_port.to_string())
            .arg("--udp-port")
            .arg(self.udp_port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .env("RUST_LOG", "info,core_server_worker=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn log_path(&self) -> PathBuf {
        self.dir.with_file_name("core-server.log")
    }

    /// (Re)starts the processes on the same ports and directory, and waits until they answer.
    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.launch_process();
        self.wait_until_answering();
    }

    fn launch_process(&mut self) {
        self.child = Some(self.spawn_process(&[]));
    }

    /// Starts the command line with `env` added, logging into [`Self::log`].
    fn spawn_process(&self, env: &[(&str, &str)]) -> Child {
        std::fs::create_dir_all(self.dir.parent().unwrap()).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        self.command()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start core-server")
    }

    /// Starts a rerun with `env` added and returns it at once: what becomes of it is the
    /// test's to watch (see [`Self::adopt`]).
    pub fn spawn_rerun(&self, env: &[(&str, &str)]) -> Child {
        self.spawn_process(env)
    }

    /// Makes `rerun` (which took over) the instance this handle runs and stops on drop;
    /// returns the process it replaces.
    pub fn adopt(&mut self, rerun: Child) -> Child {
        self.child.replace(rerun).expect("running")
    }

    /// Runs core-server again with the same command line, as an operator upgrading would. The
    /// new process takes over; this waits until it has, then until the old one has drained and
    /// exited, and returns the old one's exit status.
    pub fn rerun(&mut self) -> ExitStatus {
        let mut old = self.rerun_until_taken_over();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = old.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the old instance did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs core-server again as [`Self::rerun`] does, but returns as soon as the new process
    /// has taken over: the old one, draining (the test waits for it, or not).
    pub fn rerun_until_taken_over(&mut self) -> Child {
        let old = self.child.take().expect("running");
        let old_pid = old.id();
        self.launch_process();
        let took_over = format!("took over from core-server pid {old_pid}");
        // Logged on stderr, or in release mode in the log file.
        let release_log = self.dir.join("logs/core.log");
        let logged = |server: &Self| {
            server.log().contains(&took_over)
                || std::fs::read_to_string(&release_log).is_ok_and(|log| log.contains(&took_over))
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !logged(self) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the rerun exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no takeover within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        old
    }

    /// Waits until the worker answers a harmless command on the UDP port.
    pub fn wait_until_answering(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("core-server exited at start-up ({status}):\n{}", self.log());
            }
            if self
                .try_udp(b"remove not-a-route.invalid", Duration::from_millis(200))
                .is_some()
            {
                return;
            }
        }
        panic!(
            "core-server did not answer within {START_TIMEOUT:?}:\n{}",
            self.log()
        );
    }

    /// Everything the processes logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Waits until the log contains `text`, at most `within`, and returns that log; panics
    /// naming `text`, the time waited and the whole log otherwise. It blocks the thread: an
    /// async test uses [`Self::wait_logged_async`].
    #[track_caller]
    pub fn wait_logged(&self, text: &str, within: Duration) -> String {
        crate::logs::wait_logged(|| self.log(), text, within)
    }

    /// [`Self::wait_logged`] for async tests: it sleeps on the runtime, not the thread.
    pub async fn wait_logged_async(&self, text: &str, within: Duration) -> String {
        crate::logs::wait_logged_async(|| self.log(), text, within).await
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends one datagram from loopback; the reply, if one comes within `timeout`.
    pub fn try_udp(&self, datagram: &[u8], timeout: Duration) -> Option<String> {
        crate::netns::run_in(self.netns.as_deref(), || {
            let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            socket.set_read_timeout(Some(timeout)).unwrap();
            socket
                .send_to(datagram, (Ipv4Addr::LOCALHOST, self.udp_port))
                .unwrap();
            let mut buf = [0u8; 2048];
            let (len, _) = socket.recv_from(&mut buf).ok()?;
            Some(String::from_utf8_lossy(&buf[..len]).into_owned())
        })
    }

    /// Sends one datagram and returns the reply, which must come.
    pub fn udp(&self, datagram: &str) -> String {
        self.try_udp(datagram.as_bytes(), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("no reply to {datagram:?}:\n{}", self.log()))
    }

    /// Routes `domain` to `port`; panics unless the reply is `ok`.
    pub fn add(&self, domain: &str, port: u16) {
        assert_eq!(self.udp(&format!("add {domain} {port}")), "ok");
    }

    /// `http://127.0.0.1:<http port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.http_port)
    }

    /// The pid of the current worker (waits for one to exist).
    pub fn worker_pid(&self) -> u32 {
        self.child_pid("core-server-wor", "worker")
    }

    /// The pid of the current ACME helper (waits for one to exist).
    pub fn acme_helper_pid(&self) -> u32 {
        self.child_pid(ACME_HELPER_COMM, "ACME helper")
    }

    /// The pid of the supervisor's child named `comm` (waits for one to exist).
    fn child_pid(&self, comm: &str, what: &str) -> u32 {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(pid) = children_named(self.pid(), comm).first() {
                return *pid;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} process:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the supervisor.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Waits for the supervisor to exit (after a signal), at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log_path = self.log_path();
        let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_for_exit(&mut self.child, timeout, "core-server", log)
    }

    /// SIGTERM, and the exit status; the worker must be gone too.
    pub fn stop(&mut self) -> ExitStatus {
        let worker = self.worker_pid();
        self.signal(Signal::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(40));
        wait_gone(worker, Duration::from_secs(10));
        status
    }

    /// SIGKILL to the worker and the supervisor (a crash, or the power going): no clean stop
    /// at all. Returns once both are gone.
    pub fn crash(&mut self) {
        let worker = self.worker_pid();
        kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
        self.signal(Signal::SIGKILL);
        self.wait_exit(Duration::from_secs(5));
        wait_gone(worker, Duration::from_secs(5));
    }
}

impl Drop for CoreServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let mut children = children_named(child.id(), "core-server-wor");
        children.extend(children_named(child.id(), ACME_HELPER_COMM));
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
        let _ = child.wait();
        for pid in children {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Pids whose parent is `parent` and whose command name (cut to 15 bytes) is `comm`.
pub fn children_named(parent: u32, comm: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|(_, n)| n).unwrap_or("");
        let ppid = tail
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if name == comm && ppid == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether `/proc/<path>/stat` says stopped (state `T`).
fn is_stopped(path: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{path}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, t)| t.trim_start().starts_with('T'))
    })
}

/// Whether every thread of `pid` is stopped (`SIGSTOP`).
pub fn all_threads_stopped(pid: u32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .all(|task| {
            is_stopped(&format!(
                "{pid}/task/{}",
                task.file_name().to_string_lossy()
            ))
        })
}

/// Whether `pid` still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, t)| !t.trim_start().starts_with('Z'))
    })
}

/// Waits for `pid` to be gone, at most `timeout`.
pub fn wait_gone(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        assert!(Instant::now() < deadline, "process {pid} still running");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A field of `/proc/<pid>/status`, e.g. `CapEff` or `VmHWM`.
/// Waits at most `timeout` for `child` (`what`, which logs `log`) to exit; its status. It is
/// then no longer `child`.
pub(crate) fn wait_for_exit(
    child: &mut Option<Child>,
    timeout: Duration,
    what: &str,
    log: impl Fn() -> String,
) -> ExitStatus {
    let running = child.as_mut().expect("running");
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = running.try_wait().unwrap() {
            *child = None;
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not exit within {timeout:?}:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn proc_status(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_owned()
}

impl CoreServer {
    /// Starts with the supervisor's command adjusted by `setup` before it is spawned: a test
    /// can give it other standard streams (a terminal), inherited descriptors, limits or a
    /// user. Its streams point at the log file (`setup` gets its path) until `setup` changes
    /// them; what the processes print must still reach that file for [`CoreServer::log`].
    pub fn start_with_command(setup: impl FnOnce(&mut Command, &Path)) -> Self {
        let mut server = Self::new(None, &[]);
        std::fs::create_dir_all(server.dir.parent().unwrap()).unwrap();
        let log_path = server.log_path();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = server.command();
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        setup(&mut command, &log_path);
        server.child = Some(command.spawn().expect("start core-server"));
        drop(command); // its copies of the streams: a terminal must close when the server exits
        server.wait_until_answering();
        server
    }
}

impl CoreServer {
    /// Runs `core-server --udp-port <its port> ARGS` (a subcommand for this instance) to the
    /// end: what it printed and its exit status.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.binaries.join("core-server"))
            .arg("--udp-port")
            .arg(self.udp_port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run core-server")
    }

    /// `core-server status`'s output, which must succeed.
    pub fn status(&self) -> String {
        let output = self.cli(&["status"]);
        assert!(
            output.status.success(),
            "core-server status: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `core-server tunnel allow DOMAIN`: the token it printed, checked to be all it printed
    /// on stdout (`cst1_` and 43 base64url characters, a newline).
    pub fn tunnel_allow(&self, domain: &str) -> String {
        let output = self.cli(&["tunnel", "allow", domain]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "core-server tunnel allow {domain}: {stdout}{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        let token = stdout
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("the token and a newline on stdout, got {stdout:?}"));
        let body = token
            .strip_prefix("cst1_")
            .unwrap_or_else(|| panic!("a token starts with cst1_: {token:?}"));
        assert!(
            body.len() == 43
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "43 base64url characters after cst1_: {token:?}"
        );
        token.to_owned()
    }

    /// `core-server tunnel revoke DOMAIN`, which must succeed.
    pub fn tunnel_revoke(&self, domain: &str) {
        let output = self.cli(&["tunnel", "revoke", domain]);
        assert!(
            output.status.success(),
            "core-server tunnel revoke {domain}: {}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }
}
