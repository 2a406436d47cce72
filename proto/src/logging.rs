//! The one tracing set-up every core-server binary uses: human-readable lines on stderr,
//! filtered by `RUST_LOG` (default `info`). Children inherit the supervisor's stderr, so
//! one terminal (or, in release mode, one log file) shows all processes; each line names
//! the crate it comes from (`core_server`, `core_server_worker`, ...).

use tracing_subscriber::EnvFilter;

pub fn init() {
    use std::io::IsTerminal;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
