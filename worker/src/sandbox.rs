//! The worker confines itself: what a compromised worker could still do to the machine and,
//! above all, to its own supervisor, which may run as the same uid (setcap, no root).
//!
//! - Landlock: no file may be opened, created, removed or truncated by path (the worker works
//!   only on descriptors it already holds), no TCP port may be bound (it receives its listeners
//!   bound), and signals and abstract Unix sockets reach only processes inside the same sandbox:
//!   the supervisor can neither be signalled nor reached on its control socket
//!   `@core-server.<udp port>`, whatever the uid check there would say.
//! - seccomp: a deny-list on a default-allow filter. A tokio program's exact syscall set depends
//!   on the libc, the kernel and the code paths taken (glibc tries clone3 before clone, statx
//!   before fstat, ...), so an allow-list breaks on the next upgrade in ways that only show under
//!   load; what a proxy never needs is short and stable. Denied: process creation and program
//!   execution (threads stay allowed: tokio starts blocking threads on demand), ptrace and other
//!   ways into another process's memory, limits or scheduling, namespaces and mounts, kernel
//!   facilities with a record of exploits (bpf, perf_event_open, userfaultfd, io_uring,
//!   keyrings), the machine's own state (reboot, modules, clock, swap), typing into a terminal
//!   (`TIOCSTI`), and sockets other than IP (a named Unix socket, which Landlock does not
//!   guard, may be the operator's session bus, ssh-agent or docker).
//!
//! TLS needs nothing denied here: rustls and aws-lc-rs draw randomness with `getrandom(2)`
//! (tests/https.rs handshakes with a sandboxed worker).
//!
//! Apply it before any thread exists: Landlock (up to ABI 7) confines only the calling thread
//! and the threads it starts afterwards. Where the kernel lacks a feature, one warning names
//! what is not enforced and the process goes on.

use std::collections::BTreeMap;

use landlock::{
    Access, AccessFs, AccessNet, LandlockStatus, Ruleset, RulesetAttr, RulesetError, RulesetStatus,
    Scope, ABI,
};
use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
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
    #[error("cannot build the seccomp filter")]
    SeccompFilter(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
}

/// Confines the calling process for the rest of its life; see the module documentation.
pub fn apply() -> Result<(), SandboxError> {
    let mut missing = landlock()?;
    if let Some(what) = seccomp()? {
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

/// Installs the seccomp filters; what the kernel (or this architecture) could not enforce.
fn seccomp() -> Result<Option<&'static str>, SandboxError> {
    let Ok(arch) = TargetArch::try_from(std::env::consts::ARCH) else {
        return Ok(Some("seccomp (no filter for this architecture)"));
    };
    let denied = BpfProgram::try_from(SeccompFilter::new(
        denied_syscalls()?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?)?;
    // The first also kills any syscall of a foreign architecture (i386 on x86_64), whose
    // numbers mean other syscalls, so the second need not check the architecture.
    for filter in [&denied, &unknown_syscalls()] {
        match seccompiler::apply_filter_all_threads(filter) {
            Ok(()) => {}
            // A kernel built without seccomp filters.
            Err(seccompiler::Error::Seccomp(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Some("seccomp"));
            }
            Err(e) => return Err(SandboxError::Seccomp(e)),
        }
    }
    Ok(None)
}

/// Syscalls answered with `EPERM`, all or only with the arguments given.
fn denied_syscalls() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let always = [
        // Programs and processes.
        libc::SYS_execve,
        libc::SYS_execveat,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_fork,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_vfork,
        // Other processes' memory and descriptors.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        // Other processes' scheduling (a worker could starve the supervisor; the worker itself
        // never sets its own).
        libc::SYS_setpriority,
        libc::SYS_sched_setscheduler,
        libc::SYS_sched_setparam,
        libc::SYS_sched_setattr,
        libc::SYS_sched_setaffinity,
        libc::SYS_ioprio_set,
        // Namespaces, mounts, the root directory.
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        // Kernel facilities a proxy never uses.
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_personality,
        libc::SYS_fanotify_init,
        libc::SYS_lookup_dcookie,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_modify_ldt,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_uselib,
        // The machine's own state.
        libc::SYS_reboot,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_syslog,
        libc::SYS_vhangup,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_iopl,
        #[cfg(target_arch = "x86_64")]
        libc::SYS_ioperm,
    ];
    let arg = |index, op, value| SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        always.into_iter().map(|nr| (nr, Vec::new())).collect();
    // Another process's limits (Landlock does not scope them; a process of the same uid may
    // change them): a worker could kill the supervisor with RLIMIT_CPU, or leave it unable to
    // open a descriptor. Its own (pid 0: `getrlimit` reads its open-file limit) stay allowed.
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, 0)?])?],
    );
    // A new process, not a thread (the flags are the first argument on x86_64 and aarch64).
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![arg(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )?])?],
    );
    // Typing into a terminal the worker may still share.
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![arg(
            1,
            SeccompCmpOp::Eq,
            libc::TIOCSTI,
        )?])?],
    );
    // Only IP sockets are needed. Not Unix: the worker's channels come ready-made, and Landlock
    // (up to ABI 7) does not guard connecting to a named Unix socket, behind which may be the
    // operator's session bus (which starts any program), ssh-agent or docker. Nor netlink,
    // packet, vsock, crypto and the other families.
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(
            [libc::AF_INET, libc::AF_INET6]
                .into_iter()
                .map(|family| arg(0, SeccompCmpOp::Ne, family as u64))
                .collect::<Result<_, _>>()?,
        )?],
    );
    Ok(rules)
}

/// A filter answering `ENOSYS` to clone3, whose flags sit in memory a filter cannot read (glibc
/// then falls back to clone, whose flags the other filter checks), and, on x86_64, to every
/// x32 syscall (numbers with bit 30 set), which a deny-list written with x86_64 numbers would
/// otherwise let through where the kernel has x32 enabled.
fn unknown_syscalls() -> BpfProgram {
    const LOAD_NR: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    // The syscall number is the first field of `struct seccomp_data`.
    let mut program = vec![op(LOAD_NR, 0, 0, 0)];
    #[cfg(target_arch = "x86_64")]
    {
        const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
        const X32_SYSCALL_BIT: u32 = 0x4000_0000;
        // Over the clone3 test and the allow, onto ENOSYS.
        program.push(op(JGE, 2, 0, X32_SYSCALL_BIT));
    }
    program.extend([
        op(JEQ, 1, 0, libc::SYS_clone3 as u32),
        op(RET, 0, 0, libc::SECCOMP_RET_ALLOW),
        op(RET, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
    ]);
    program
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
