//! The one tracing set-up every core-server binary uses: human-readable lines, filtered by
//! `RUST_LOG` (default [`DEFAULT_FILTER`]). Children write to stderr, a pipe that the supervisor
//! reads and writes, each line tagged with the child's name and pid, to its own stderr (local
//! mode) or its log file (release mode), so one terminal or one file shows all processes; each
//! line names the crate it comes from (`core_server`, `core_server_worker`, ...).

use std::io::{self, IsTerminal};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// What is logged without `RUST_LOG`: `info`, but only errors of h2 (HTTP/2). h2 warns once
/// for each peer connection that breaks its rules (a client cancelling streams in bursts: an
/// outside tester's attack wrote 134 such lines), which anyone can cause; what matters of it is
/// logged in our own words (a tunnel connection that ends says why).
pub const DEFAULT_FILTER: &str = "info,h2=error";

/// Logs to stderr (colours only on a terminal). A stderr nobody reads any more (a child's log
/// pipe, once the supervisor is gone) loses the lines but never stops the process: tracing
/// would report the failed write on stderr itself, and `eprintln!` panics when that fails too.
pub fn init() {
    init_with(|| LossyStderr, std::io::stderr().is_terminal());
}

/// Stderr, with write errors ignored (see [`init`]).
struct LossyStderr;

impl io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Logs to `writer`.
pub fn init_with<W>(writer: W, ansi: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .init();
}

/// `e` and its causes, `: `-separated, as one log line.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
