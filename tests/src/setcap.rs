//! core-server as an operator without root runs it: the supervisor binary `setcap`'d, run as
//! nobody, so its worker has the supervisor's own uid. It runs in a network namespace of its
//! own, where binding port 81 needs the capability whatever the host's sysctl says and nothing
//! touches the host's network. Setting it up needs root.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::server::{children_named, install_copy};

/// The uid (and gid) everything here runs as.
pub const NOBODY: &str = "65534";
/// The UDP port inside the namespace (nothing else uses it there).
pub const UDP_PORT: u16 = 40608;

/// A running setcap'd supervisor and its worker; killed on drop.
pub struct SetcapServer {
    child: Child,
    worker: u32,
    install: tempfile::TempDir,
}

impl SetcapServer {
    /// Starts it on HTTP port 81 and waits for its worker to be ready.
    pub fn start() -> Self {
        let install = install_copy();
        let supervisor = install.path().join("core-server");
        let setcap = Command::new("setcap")
            .arg("cap_net_bind_service=+eip")
            .arg(&supervisor)
            .status();
        assert!(setcap.expect("setcap is installed (libcap2-bin)").success());
        let log = std::fs::File::create(install.path().join("log")).unwrap();
        let mut child = Command::new("unshare")
            .args(["--net", "--"])
            .args(as_nobody())
            .arg(&supervisor)
            .args(["--http-port", "81", "--https-port", "8443", "--udp-port"])
            .arg(UDP_PORT.to_string())
            .arg("--dir")
            .arg(install.path().join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let worker = loop {
            let log = std::fs::read_to_string(install.path().join("log")).unwrap();
            if let Some(worker) = children_named(child.id(), "core-server-wor").first() {
                if log.contains("worker ready") {
                    break *worker;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("exited ({status}): {log}");
            }
            assert!(Instant::now() < deadline, "no worker:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        };
        SetcapServer {
            child,
            worker,
            install,
        }
    }

    /// The supervisor's pid (`unshare` and `setpriv` exec it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn worker_pid(&self) -> u32 {
        self.worker
    }

    /// Where its binaries are: a directory anyone may use, to put other programs in for
    /// [`Self::command_beside`].
    pub fn install_dir(&self) -> &Path {
        self.install.path()
    }

    /// `program`, run as nobody in the server's network namespace, as its worker is.
    pub fn command_beside(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/proc/{}/ns/net", self.pid()))
            .arg("--")
            .args(as_nobody())
            .arg(program);
        command
    }

    /// Stops it with SIGTERM, as an operator would; its exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        self.child.wait().unwrap()
    }

    /// Everything the processes logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.install.path().join("log")).unwrap_or_default()
    }
}

impl Drop for SetcapServer {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = kill(Pid::from_raw(self.worker as i32), Signal::SIGKILL);
    }
}

/// `setpriv` to nobody, with no supplementary groups, then the command.
fn as_nobody() -> [String; 5] {
    [
        "setpriv".into(),
        format!("--reuid={NOBODY}"),
        format!("--regid={NOBODY}"),
        "--clear-groups".into(),
        "--".into(),
    ]
}
