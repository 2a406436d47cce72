//! `core-server-acme`: the ACME helper (account key, certificate store, mkcert in local mode).
//!
//! Not written yet: it arrives with HTTPS. Until then the supervisor does not start it, and
//! running it says so instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("core-server-acme: not implemented yet (HTTPS and ACME arrive in a later release)");
    ExitCode::FAILURE
}
