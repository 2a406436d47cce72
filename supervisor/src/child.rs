//! Starting a child process: its binary sits next to ours, its privileges are gone before it
//! runs a line of its own, and its end of the IPC socketpair is its descriptor 3.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::Context;
use core_server_proto::ipc::CHILD_IPC_FD;
use tokio::process::{Child, Command};

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

/// Starts `binary` as an unprivileged child holding `ipc` as its descriptor 3, writing its
/// logs to `stderr`. It gets a process group of its own, so a Ctrl-C at the terminal reaches
/// only the supervisor, which then stops it gracefully.
pub fn spawn(
    binary: &PathBuf,
    ipc: OwnedFd,
    privileges: Unprivileged,
    stderr: Stdio,
) -> anyhow::Result<Child> {
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
        .stderr(stderr)
        .kill_on_drop(false);
    let ipc_raw = ipc.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and makes only async-signal-safe
    // system calls (setpgid, dup2, fcntl, setgroups/setgid/setuid, capset, prctl); see
    // privileges.rs.
    unsafe {
        command.pre_exec(move || {
            let this = nix::unistd::Pid::from_raw(0);
            nix::unistd::setpgid(this, this)?;
            move_to_fd(ipc_raw, CHILD_IPC_FD)?;
            privileges.apply()
        });
    }
    let child = command.spawn().map_err(|e| {
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
    drop(ipc); // the child has its copy
    Ok(child)
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
