//! Starting a child process: its binary sits next to ours, its privileges are gone before it
//! runs a line of its own, its end of the IPC socketpair is its descriptor 3, and it shares
//! nothing with the operator's terminal (own session, stdio on /dev/null and a log pipe, no
//! inherited descriptor).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context;
use core_server_proto::channel::Channel;
use core_server_proto::ipc::CHILD_IPC_FD;
use nix::sys::resource::{getrlimit, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::child_logs::ChildStderr;
use crate::privileges::Unprivileged;

/// Environment variables a child keeps; everything else is cleared.
const KEPT_ENV: &[&str] = &[
    "RUST_LOG",
    "RUST_BACKTRACE",
    "NO_COLOR",
    "TOKIO_WORKER_THREADS",
];

/// Finds `name` next to the running executable.
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        anyhow::bail!(
            "cannot find {}: {name} must be installed next to {}",
            path.display(),
            exe.display()
        );
    }
    Ok(path)
}

/// How long, once a child has exited, [`Child::wait`] waits for its last lines to be logged
/// (longer only if something else still holds its stderr).
const LOG_DRAIN_WAIT: Duration = Duration::from_secs(1);

/// How long a child may take to take in a message before it is taken for stopped or stuck.
pub const TELL_TIMEOUT: Duration = Duration::from_secs(5);

/// A running child: the process, and the task copying its stderr into our log.
pub struct Child {
    process: tokio::process::Child,
    /// `worker`, `acme`: for messages.
    name: String,
    /// `None` once its stderr has been copied to the end.
    log: Option<JoinHandle<()>>,
}

impl Child {
    pub fn id(&self) -> Option<u32> {
        self.process.id()
    }

    /// Kills the child and whatever it started (`mkcert`): its process group, which is its
    /// own (see [`spawn`]) and stays so until it is reaped, so no other group is hit.
    pub fn start_kill(&mut self) {
        if let Some(pid) = self.process.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// Sends `message` with `fds` on `channel`. A child that does not take it within
    /// [`TELL_TIMEOUT`], or whose channel fails, is killed: `false`, and its channel closes,
    /// so it is replaced.
    pub async fn tell<O: Serialize, I: DeserializeOwned>(
        &mut self,
        channel: &Channel<O, I>,
        message: &O,
        fds: &[BorrowedFd<'_>],
    ) -> bool {
        match tokio::time::timeout(TELL_TIMEOUT, channel.send(message, fds)).await {
            Ok(Ok(())) => return true,
            Ok(Err(e)) => warn!("cannot send to the {}: {e}; killing it", self.name),
            Err(_) => warn!(
                "the {} took no message for {TELL_TIMEOUT:?}; killing it",
                self.name
            ),
        }
        self.start_kill();
        false
    }

    /// Waits for the child to exit, then for its last lines to reach the log: what we log
    /// about its exit comes after what it said.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.process.wait().await?;
        if let Some(log) = &mut self.log {
            if tokio::time::timeout(LOG_DRAIN_WAIT, log).await.is_ok() {
                self.log = None;
            }
        }
        Ok(status)
    }
}

/// Starts `binary` as an unprivileged child holding `ipc` as its descriptor 3, writing its
/// logs to `stderr`, with stdin and stdout on /dev/null and no other descriptor. It starts a
/// session of its own: it has no controlling terminal (so it cannot type into the operator's
/// shell with `TIOCSTI`), and a Ctrl-C at the terminal reaches only the supervisor, which then
/// stops it gracefully.
pub fn spawn(
    binary: &Path,
    ipc: OwnedFd,
    privileges: Unprivileged,
    stderr: ChildStderr,
) -> anyhow::Result<Child> {
    let (stderr, log) = stderr.split();
    let mut command = Command::new(binary);
    command
        .env_clear()
        .envs(
            KEPT_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (k, v))),
        )
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(false);
    let ipc_raw = ipc.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and makes only async-signal-safe
    // system calls (setsid, dup2, fcntl, close_range, setgroups/setgid/setuid, capset, prctl);
    // see privileges.rs.
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            move_to_fd(ipc_raw, CHILD_IPC_FD)?;
            close_on_exec_above(CHILD_IPC_FD)?;
            privileges.apply()
        });
    }
    let process = command.spawn().map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            format!(
                " (children run as uid {}: install the binaries where that user can execute \
                 them, e.g. /usr/local/bin)",
                privileges.uid()
            )
        } else {
            String::new()
        };
        anyhow::anyhow!("cannot start {}: {e}{hint}", binary.display())
    })?;
    drop(command); // its copy of the stderr pipe: the child's exit must close the last one
    drop(ipc); // the child has its copy
    let name = short_name(binary);
    let tag = format!("{name}[{}]: ", process.id().unwrap_or(0));
    Ok(Child {
        process,
        name,
        log: Some(log.forward(tag)),
    })
}

/// A child's exit status, for the log.
pub fn describe(status: io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => status.to_string(),
        Err(e) => format!("status unknown: {e}"),
    }
}

/// `worker` for `core-server-worker`: how the child's lines are tagged in the log.
fn short_name(binary: &Path) -> String {
    let name = binary.file_name().unwrap_or_default().to_string_lossy();
    name.strip_prefix("core-server-")
        .unwrap_or(&name)
        .to_owned()
}

/// Marks every descriptor above `fd` close-on-exec: a child gets none but those passed on
/// purpose, whatever its parent inherited (a pipe, a terminal, a file). Marked, not
/// closed: `Command` reports a failed exec through a close-on-exec pipe of its own. (That pipe
/// is never descriptor 3, which `move_to_fd` replaces: `Command` opens /dev/null for stdin
/// first, which takes the lowest free number.) Async-signal-safe.
pub fn close_on_exec_above(fd: RawFd) -> io::Result<()> {
    let first = fd as libc::c_uint + 1;
    // SAFETY: close_range sets a flag on descriptors and touches no memory of ours.
    let result = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if result == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if !matches!(error.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
        return Err(error);
    }
    // Before Linux 5.11 (no CLOSE_RANGE_CLOEXEC): each possible descriptor in turn.
    let (limit, _) = getrlimit(Resource::RLIMIT_NOFILE)?;
    for fd in first..limit.min(libc::c_uint::MAX as u64) as libc::c_uint {
        // SAFETY: as above; a number that is not an open descriptor only fails (EBADF).
        unsafe { libc::fcntl(fd as RawFd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

/// Makes `fd` available as `target` across exec (descriptors we create are close-on-exec).
pub fn move_to_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: plain system calls on descriptor numbers. dup2 replaces whatever `target` was in
    // this about-to-exec child (only close-on-exec descriptors of ours); onto itself, dup2
    // would leave close-on-exec set, so that case clears the flag instead.
    let result = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if result == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
