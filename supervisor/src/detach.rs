//! Release mode's detaching. The command an operator runs starts the instance in a new session
//! (no controlling terminal, stdio on /dev/null) and waits until the instance reports, on a
//! pipe, that it serves: so the command's exit status says whether the (re)start worked, and
//! on failure it prints why.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};

use anyhow::Context;

use crate::child;

/// The descriptor on which the detached instance finds the report pipe.
const READY_FD: i32 = 3;

/// Starts this same command line detached, and waits for its report.
pub fn launch() -> anyhow::Result<ExitCode> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(std::env::args_os().skip(1))
        .args(["--foreground", "--ready-fd", &READY_FD.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let write_raw = write.as_raw_fd();
    // SAFETY: runs in the forked child before exec; setsid, dup2, fcntl and close_range are
    // async-signal-safe, and this process has no other threads (no runtime yet).
    unsafe {
        command.pre_exec(move || {
            nix::unistd::setsid()?;
            child::move_to_fd(write_raw, READY_FD)?;
            child::close_on_exec_above(READY_FD)
        });
    }
    let instance = command
        .spawn()
        .context("cannot start the detached instance")?;
    drop(write);

    // Until the instance writes its report and closes the pipe (or dies, closing it too).
    let mut report = String::new();
    File::from(read).read_to_string(&mut report)?;
    match report.strip_prefix("ok\n") {
        Some(log) => {
            println!(
                "core-server is running (pid {}); logs in {}",
                instance.id(),
                log.trim_end()
            );
            Ok(ExitCode::SUCCESS)
        }
        None if report.is_empty() => {
            anyhow::bail!("the detached instance exited during start-up without saying why")
        }
        None => {
            eprintln!("core-server: {}", report.trim_end());
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The detached instance's end of the report pipe.
pub struct ReadyReport(File);

impl ReadyReport {
    /// Takes the descriptor `launch` handed down (`--ready-fd`).
    pub fn from_fd(fd: i32) -> anyhow::Result<ReadyReport> {
        nix::fcntl::fcntl(
            // SAFETY: borrowed for one fcntl; an unopened number only makes it fail.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .with_context(|| format!("--ready-fd {fd} is not an open descriptor"))?;
        // SAFETY: the launcher opened this descriptor for us alone, and it is taken once.
        Ok(ReadyReport(unsafe { File::from_raw_fd(fd) }))
    }

    /// The instance serves; logs are in `log`.
    pub fn serving(mut self, log: &Path) {
        let _ = write!(self.0, "ok\n{}\n", log.display());
    }

    pub fn failed(mut self, why: &str) {
        let _ = write!(self.0, "{why}");
    }
}
