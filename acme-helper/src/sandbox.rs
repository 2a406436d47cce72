//! The helper confines itself once `Start` is read (the rules need the store's descriptor and
//! mkcert's paths), before it reads anything else: what a compromised helper could still do,
//! above all to its supervisor, which may run as the same uid (setcap, no root).
//!
//! - Landlock: files may be read and written only beneath the store; read (for DNS and the
//!   system's TLS roots) in `/etc` and `/usr`; in local mode, mkcert may be run (and its
//!   dynamic loader), and its `CAROOT` read (and written: mkcert makes its CA there at its
//!   first run, as it does for a user). No TCP port may be bound (the helper has no
//!   listening socket), and signals and abstract Unix sockets reach only processes inside the
//!   same sandbox: the supervisor can be neither signalled nor reached on its control socket.
//! - seccomp, right after: the worker's deny-list ([`core_server_proto::seccomp`]): no ptrace,
//!   namespaces, bpf, io_uring, keyrings or `TIOCSTI`, and no socket but IP (the helper talks
//!   to the CA over TCP/IP and to its peers over descriptors it was handed; glibc's resolver,
//!   refused a Unix socket to nscd, goes on with the files and DNS). In release mode no
//!   process may be made nor program run ([`Programs::Forbidden`]); in local mode mkcert must
//!   run, so process creation and exec stay allowed ([`Programs::Allowed`]), and mkcert runs
//!   under the same filter.
//!
//! Apply it while the helper has one thread: Landlock (up to ABI 7) confines the calling
//! thread and the threads it starts afterwards (the runtime is single-threaded, and its
//! blocking threads, for DNS, start later; the seccomp filter is put on every thread anyway).
//! Where the kernel lacks a feature, one warning names what is not enforced and the helper
//! goes on.

use std::os::fd::BorrowedFd;
use std::path::Path;

use core_server_proto::acme_ipc::Mkcert;
use core_server_proto::seccomp::{self, Programs, SeccompError};
use landlock::{
    Access, AccessFs, AccessNet, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetError, RulesetStatus, Scope, ABI,
};
use tracing::{info, warn};

/// The Landlock ABI the rules are written for (Linux 6.15).
const LANDLOCK_ABI: ABI = ABI::V7;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot apply the Landlock ruleset")]
    Landlock(#[from] RulesetError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

/// Confines the process for the rest of its life; `mkcert` in local mode.
pub fn apply(store: BorrowedFd<'_>, mkcert: Option<&Mkcert>) -> Result<(), SandboxError> {
    landlock(store, mkcert)?;
    let (programs, which) = match mkcert {
        Some(_) => (Programs::Allowed, "mkcert may run"),
        None => (Programs::Forbidden, "no process, no exec"),
    };
    match seccomp::apply(programs)? {
        None => info!("sandboxed: seccomp ({which})"),
        Some(what) => warn!("sandbox: this kernel does not enforce {what}; going on without"),
    }
    Ok(())
}

/// Applies the Landlock ruleset.
fn landlock(store: BorrowedFd<'_>, mkcert: Option<&Mkcert>) -> Result<(), RulesetError> {
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let read = AccessFs::from_read(LANDLOCK_ABI) & !AccessFs::Execute;
    let mut ruleset = Ruleset::default()
        .handle_access(all)?
        .handle_access(AccessNet::BindTcp)?
        .scope(Scope::from_all(LANDLOCK_ABI))?
        .create()?
        .add_rule(PathBeneath::new(store, all & !AccessFs::Execute))?;
    // Read-only system files: resolv.conf, hosts, nsswitch and the NSS modules, TLS roots.
    let mut readable: Vec<(&Path, _)> = vec![(Path::new("/etc"), read), (Path::new("/usr"), read)];
    // tokio's process spawning reads /dev/null for the child's stdin.
    readable.push((
        Path::new("/dev/null"),
        AccessFs::ReadFile | AccessFs::WriteFile,
    ));
    if let Some(mkcert) = mkcert {
        // The binary and the shared libraries and loader it needs (mkcert is dynamic).
        let exec = read | AccessFs::Execute;
        readable.push((Path::new("/usr"), exec));
        readable.push((
            mkcert.binary.as_path(),
            AccessFs::ReadFile | AccessFs::Execute,
        ));
        // mkcert makes its CA there at its first run, as it does for a user.
        let ca = read | AccessFs::MakeReg | AccessFs::WriteFile;
        readable.push((mkcert.caroot.as_path(), ca));
    }
    for (path, access) in readable {
        match PathFd::new(path) {
            Ok(fd) => ruleset = ruleset.add_rule(PathBeneath::new(fd, access))?,
            // mkcert cannot work without its CA: said plainly, once, at start (not only at
            // each handshake's failure).
            Err(e) if mkcert.is_some_and(|m| m.caroot == path) => warn!(
                "local mode: mkcert's CA directory {} cannot be opened by this process's user \
                 ({e}): HTTPS handshakes will fail. Make the CA with `mkcert -install`, and \
                 start core-server as the user whose CA it is (setcap for ports below 1024), \
                 or set CAROOT to a CA directory that --user may read and write",
                path.display()
            ),
            // A missing path grants nothing; mkcert then fails with a reason of its own.
            Err(e) => warn!("sandbox: cannot grant {}: {e}", path.display()),
        }
    }
    let status = ruleset.restrict_self()?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => info!(
            "sandboxed: Landlock (files only beneath the store, no TCP bind, scoped signals and abstract sockets)"
        ),
        RulesetStatus::PartiallyEnforced => warn!(
            "sandbox: this kernel enforces only part of the Landlock rules (signals and abstract sockets need Linux 6.12)"
        ),
        RulesetStatus::NotEnforced => {
            warn!("sandbox: this kernel does not enforce Landlock; going on without")
        }
    }
    Ok(())
}
