//! The tunnel agent for tests: the real `core-agent` binary serving a domain of a
//! [`CoreServer`] through a reverse tunnel, with a label of its own so that the test can find
//! its connections in `core-server status`, its log in a file, and SIGKILL on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::server::binaries;
use crate::CoreServer;

/// How long an agent may take to connect (or its connections to go) before a test gives up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `core-agent`; SIGKILLed on drop.
pub struct Agent {
    child: Option<Child>,
    /// The `--label` it runs with: its connections' first word in `core-server status`.
    pub label: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// `core-agent DOMAIN --to TO` over plain HTTP to `server`'s HTTP port (local mode), with
    /// the token in `CORE_AGENT_TOKEN` (as a careful user keeps it out of `ps`) and `args`
    /// added (`--connections 1`).
    pub fn start(server: &CoreServer, domain: &str, token: &str, to: &str, args: &[&str]) -> Agent {
        let connect = format!("127.0.0.1:{}", server.http_port);
        let mut all = vec!["--connect", &connect, "--insecure-plaintext"];
        all.extend_from_slice(args);
        Self::spawn(&[], domain, token, to, &all)
    }

    /// `core-agent DOMAIN --to TO` over HTTPS to `server`'s HTTPS port, trusting only the CA
    /// in `ca` (mkcert's `rootCA.pem`).
    pub fn start_https(
        server: &CoreServer,
        ca: &Path,
        domain: &str,
        token: &str,
        to: &str,
        args: &[&str],
    ) -> Agent {
        let connect = format!("127.0.0.1:{}", server.https_port);
        let ca = ca.to_str().expect("a UTF-8 path");
        let mut all = vec!["--connect", &connect, "--ca", ca];
        all.extend_from_slice(args);
        Self::spawn(&[], domain, token, to, &all)
    }

    /// `PREFIX... core-agent DOMAIN --to TO --label <new> ARGS...`: `prefix` runs it
    /// elsewhere (`ip netns exec NAME`, which execs it: the pid stays the agent's).
    pub fn spawn(prefix: &[&str], domain: &str, token: &str, to: &str, args: &[&str]) -> Agent {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let label = format!(
            "test-agent-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("agent.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let agent = binaries().join("core-agent");
        let mut command = match prefix.split_first() {
            None => Command::new(agent),
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(agent);
                command
            }
        };
        command
            .arg(domain)
            .args(["--to", to, "--label", &label])
            .args(args)
            .env("CORE_AGENT_TOKEN", token)
            .env("RUST_LOG", "info,core_agent=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = command.spawn().expect("start core-agent");
        Agent {
            child: Some(child),
            label,
            log_path,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid() as i32), signal).unwrap();
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until its log contains `text`, at most `within`, and returns that log; panics
    /// naming `text`, the time waited and the whole log otherwise. For async tests: it sleeps
    /// on the runtime (see [`crate::logs::wait_logged`] for a blocking wait).
    pub async fn wait_logged_async(&self, text: &str, within: Duration) -> String {
        crate::logs::wait_logged_async(|| self.log(), text, within).await
    }

    /// Its exit status once it exits, at most `timeout` from now.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let log_path = self.log_path.clone();
        let log = move || std::fs::read_to_string(&log_path).unwrap_or_default();
        crate::server::wait_for_exit(&mut self.child, timeout, "core-agent", log)
    }

    /// How many connections `server`'s status shows for this agent now.
    pub fn connections(&self, server: &CoreServer) -> usize {
        connections_labelled(&server.status(), &self.label)
    }

    /// Waits until `server`'s status shows exactly `n` connections of this agent (0: all
    /// gone), polling, at most [`CONNECT_TIMEOUT`]; how long that took.
    pub fn wait_connected(&self, server: &CoreServer, n: usize) -> Duration {
        let started = Instant::now();
        loop {
            let status = server.status();
            if connections_labelled(&status, &self.label) == n {
                return started.elapsed();
            }
            if let (Some(child), true) = (self.child.as_ref(), n > 0) {
                assert!(
                    crate::server::alive(child.id()),
                    "core-agent {} exited:\n{}",
                    self.label,
                    self.log()
                );
            }
            assert!(
                started.elapsed() < CONNECT_TIMEOUT,
                "{} did not have {n} connection(s) within {CONNECT_TIMEOUT:?}:\n{status}\n\
                 --- agent:\n{}\n--- server:\n{}",
                self.label,
                self.log(),
                server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

/// How many agent connections labelled `label` a `core-server status` output lists: the lines
/// `    LABEL  from ADDR  since ...` of its `tunnels (N):` section.
pub fn connections_labelled(status: &str, label: &str) -> usize {
    tunnel_section(status)
        .filter(|line| line.starts_with("    "))
        .filter(|line| line.split_whitespace().next() == Some(label))
        .count()
}

/// How many agent connections a `core-server status` output lists for `domain`: the number in
/// its line `  DOMAIN  N tokens  M agent connections` (0 when it has none).
pub fn connections_of(status: &str, domain: &str) -> usize {
    tunnel_section(status)
        .filter(|line| line.starts_with("  ") && !line.starts_with("    "))
        .find(|line| line.split_whitespace().next() == Some(domain))
        .and_then(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "agent")?;
            words.get(at.checked_sub(1)?)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The lines after `tunnels (N):`, up to the next unindented line.
fn tunnel_section(status: &str) -> impl Iterator<Item = &str> {
    status
        .lines()
        .skip_while(|line| !line.starts_with("tunnels ("))
        .skip(1)
        .take_while(|line| line.starts_with(' '))
}
