//! The integration-test harness: real core-server binaries on real loopback sockets.
//!
//! - [`CoreServer`] starts the supervisor (which starts its worker) on free ports with its own
//!   `--dir`, waits until it answers on the UDP port, and stops it on drop.
//! - [`Backend`] is an app for it to proxy to: a real HTTP server on a loopback port.
//! - [`raw_backend`] is a backend on raw TCP, for backends that misbehave (stall, switch
//!   protocols) and for seeing a request exactly as it arrived.
//! - [`http`] holds small clients: hyper for ordinary requests, raw TCP for malformed ones.
//! - [`load`] is a bounded load generator counting each kind of failure apart.
//! - [`adder`] is an app adding routes throughout, to check none acknowledged is lost.
//! - [`previous`] holds the previous version's binaries, for tests of mixing versions.
//! - [`netns`] makes a test host of its own: a network namespace joined to ours by a veth pair.
//! - [`setcap`] runs a setcap'd supervisor as nobody, as an operator without root does.
//! - [`tls_client`] is a rustls client: chosen SNI, only the given roots trusted, ALPN,
//!   session resumption, and the alert of a refused handshake.
//! - [`mkcert`] is a throwaway mkcert CA (`CAROOT`) for local-mode HTTPS.
//! - [`pebble`] is a real ACME CA (pebble, with pebble-challtestsrv as its DNS) for release mode.
//! - [`agent`] runs the real `core-agent`, serving a domain through a reverse tunnel.
//! - [`delay_link`] is a long network path on loopback: a forwarder delaying each direction.
//! - [`logs`] waits for a line in a process's log ([`CoreServer::wait_logged`] and the like).

pub mod adder;
pub mod agent;
pub mod backend;
pub mod big_body;
pub mod delay_link;
pub mod http;
pub mod load;
pub mod logs;
pub mod mkcert;
pub mod netns;
pub mod pebble;
pub mod previous;
pub mod raw_backend;
pub mod server;
pub mod setcap;
pub mod tls_client;

pub use backend::Backend;
pub use server::CoreServer;

/// Whether tests that need root (privilege dropping, network namespaces) can run. Outside CI
/// they are skipped with a printed reason; in CI (run as root) a missing root is a failure.
pub fn have_root(test: &str) -> bool {
    if nix::unistd::Uid::effective().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run the tests as root"
    );
    eprintln!("skipping {test}: needs root");
    false
}

/// Whether the tools a test runs (`pebble`, `mkcert`, ...) are installed. Outside CI a missing
/// one skips the test with a printed reason; in CI it is a failure (scripts/test.sh installs
/// them all).
pub fn have_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| which(tool).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs {missing:?} on PATH (scripts/test.sh installs them)"
    );
    eprintln!("skipping {test}: {missing:?} not on PATH (scripts/test.sh installs them)");
    false
}

/// The first executable file named `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}
