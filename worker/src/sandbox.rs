//! The worker confines itself: what a compromised worker could still do to the machine and,
//! above all, to its own supervisor, which may run as the same uid (setcap, no root).
//!
//! - Landlock: no file may be opened, created, removed or truncated by path (the worker works
//!   only on descriptors it already holds), no TCP port may be bound (it receives its listeners
//!   bound), and signals and abstract Unix sockets reach only processes inside the same sandbox:
//!   the supervisor can neither be signalled nor reached on its control socket
//!   `@core-server.<udp port>`, whatever the uid check there would say.
//! - seccomp: [`core_server_proto::seccomp`]'s deny-list, with no process creation and no
//!   program execution ([`Programs::Forbidden`]; threads stay allowed). It denies, among the
//!   rest, ptrace, namespaces, bpf, io_uring, keyrings, `TIOCSTI` and sockets other than IP
//!   (a named Unix socket, which Landlock does not guard, may be the operator's session bus,
//!   ssh-agent or docker).
//!
//! TLS needs nothing denied here: rustls and aws-lc-rs draw randomness with `getrandom(2)`
//! (tests/https.rs handshakes with a sandboxed worker).
//!
//! Apply it before any thread exists: Landlock (up to ABI 7) confines only the calling thread
//! and the threads it starts afterwards. Where the kernel lacks a feature, one warning names
//! what is not enforced and the process goes on.

use core_server_proto::seccomp::{self, Programs, SeccompError};
use landlock::{
    Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetError, RulesetStatus,
    Scope, ABI,
};

/// The Landlock ABI the rules are written for (Linux 6.15): older kernels enforce what they
/// know, newer ones nothing more until this is raised.
const LANDLOCK_ABI: ABI = ABI::V7;

/// Landlock features by the ABI that brought them, for naming what an older kernel lacks.
const LANDLOCK_FEATURES: &[(ABI, &str)] = &[
    (ABI::V3, "truncating files by path (Landlock ABI 3)"),
    (ABI::V4, "binding TCP ports (Landlock ABI 4)"),
    (
        ABI::V6,
        "signalling the supervisor and reaching its control socket (Landlock ABI 6)",
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot apply the Landlock ruleset")]
    Landlock(#[from] RulesetError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Confines the calling process for the rest of its life; see the module documentation.
pub fn apply() -> Result<(), SandboxError> {
    let mut missing = landlock()?;
    if let Some(what) = seccomp::apply(Programs::Forbidden)? {
        missing.push(what);
    }
    if missing.is_empty() {
        tracing::info!("sandboxed: Landlock (no files, no TCP bind, scoped signals and abstract sockets) and seccomp");
    } else {
        tracing::warn!(
            "sandbox: this kernel does not enforce {}; going on without",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Applies the Landlock ruleset; what the kernel could not enforce.
fn landlock() -> Result<Vec<&'static str>, RulesetError> {
    // Every right handled and none granted: nothing by path, no TCP bind. TCP connect stays
    // unrestricted: Landlock filters it by port only, and backends listen on any port.
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(LANDLOCK_ABI))?
        .handle_access(AccessNet::BindTcp)?
        .scope(Scope::from_all(LANDLOCK_ABI))?
        .create()?
        .restrict_self()?;
    Ok(landlock_gaps(status.ruleset, status.landlock))
}

/// What the ruleset lacks where it was restricted to `ruleset` by a kernel with `landlock`.
fn landlock_gaps(ruleset: RulesetStatus, landlock: LandlockStatus) -> Vec<&'static str> {
    match (ruleset, landlock) {
        (RulesetStatus::NotEnforced, _) => {
            vec!["Landlock (file access, TCP bind, signals and abstract sockets to the supervisor)"]
        }
        (_, LandlockStatus::Available { effective_abi, .. }) => LANDLOCK_FEATURES
            .iter()
            .filter(|(abi, _)| effective_abi < *abi)
            .map(|(_, what)| *what)
            .collect(),
        (_, _) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn available(effective_abi: ABI) -> LandlockStatus {
        LandlockStatus::Available {
            effective_abi,
            kernel_abi: None,
        }
    }

    #[test]
    fn an_older_kernel_names_what_it_does_not_enforce() {
        let full = landlock_gaps(RulesetStatus::FullyEnforced, available(ABI::V7));
        assert!(full.is_empty(), "{full:?}");
        assert_eq!(
            landlock_gaps(RulesetStatus::PartiallyEnforced, available(ABI::V5)),
            ["signalling the supervisor and reaching its control socket (Landlock ABI 6)"]
        );
        assert_eq!(
            landlock_gaps(RulesetStatus::PartiallyEnforced, available(ABI::V2)).len(),
            3
        );
        let none = landlock_gaps(RulesetStatus::NotEnforced, LandlockStatus::NotImplemented);
        assert_eq!(none.len(), 1);
        assert!(none[0].starts_with("Landlock ("), "{none:?}");
    }
}
