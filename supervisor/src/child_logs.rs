//! Where a child's stderr goes: shared with ours in local mode; in release mode read from a
//! pipe, line by line, into the log file (an unprivileged child cannot open the file, and a
//! shared descriptor would keep writing to a rotated-away file).

use std::io::{self, Write};
use std::process::Stdio;

use tokio::io::AsyncBufReadExt;
use tracing_appender::non_blocking::NonBlocking;

use crate::log_file::MAX_LINE;

/// Where children's stderr goes.
#[derive(Clone)]
pub enum ChildLogs {
    /// Shared with ours (local mode).
    Inherit,
    /// Into the log file, line by line, through this writer.
    Forward(NonBlocking),
}

impl ChildLogs {
    /// The stderr to give a new child. When forwarding, a task copies its lines into the log
    /// until the child (and so the pipe) closes.
    pub fn stderr(&self) -> io::Result<Stdio> {
        let ChildLogs::Forward(writer) = self else {
            return Ok(Stdio::inherit());
        };
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read)?;
        let mut writer = writer.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(pipe);
            let mut line = Vec::new();
            while lines
                .read_until(b'\n', &mut line)
                .await
                .is_ok_and(|n| n > 0)
            {
                line.truncate(MAX_LINE as usize - 1);
                if line.last() != Some(&b'\n') {
                    line.push(b'\n');
                }
                let _ = writer.write_all(&line);
                line.clear();
            }
        });
        Ok(Stdio::from(write))
    }
}
