//! `core-agent`: serves a local app through core-server without an inbound port.
//! Not written yet; running it says so instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("core-agent: not implemented yet (tunnels arrive in a later release)");
    ExitCode::FAILURE
}
