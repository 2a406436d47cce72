//! The seccomp filter the worker and the ACME helper install on themselves, after Landlock: a
//! deny-list on a default-allow filter. A tokio program's exact syscall set depends on the libc,
//! the kernel and the code paths taken (glibc tries clone3 before clone, statx before fstat,
//! ...), so an allow-list breaks on the next upgrade in ways that only show under load; what
//! these processes never need is short and stable.
//!
//! Denied (`EPERM`): ptrace and other ways into another process's memory, limits or scheduling,
//! namespaces and mounts, kernel facilities with a record of exploits (bpf, perf_event_open,
//! userfaultfd, io_uring, keyrings), the machine's own state (reboot, modules, clock, swap),
//! typing into a terminal (`TIOCSTI`), sockets other than IP (a named Unix socket, which
//! Landlock does not guard, may be the operator's session bus, ssh-agent or docker; glibc's
//! resolver, refused a Unix socket to nscd, falls back to reading the files and asking DNS
//! itself), and, unless [`Programs::Allowed`], process creation and program execution
//! (threads stay allowed: tokio starts blocking threads on demand). `clone3` gets `ENOSYS`
//! (its flags are out of a filter's reach; libc then falls back to `clone`).
//!
//! The filter is inherited by every thread (TSYNC) and by any program run (mkcert).

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// Whether the process may start other programs: the one thing the worker and the helper
/// need differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    /// No new process and no exec; threads only (the worker, the helper in release mode).
    Forbidden,
    /// New processes (fork, vfork, clone without `CLONE_THREAD`) and exec stay allowed: the
    /// helper in local mode runs mkcert.
    Allowed,
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter")]
    Build(#[from] seccompiler::BackendError),
    #[error("cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Installs the filters on every thread of the process, for the rest of its life; what the
/// kernel (or this architecture) could not enforce, for the caller's one warning.
pub fn apply(programs: Programs) -> Result<Option<&'static str>, SeccompError> {
    let Ok(arch) = TargetArch::try_from(std::env::consts::ARCH) else {
        return Ok(Some("seccomp (no filter for this architecture)"));
    };
    let denied = BpfProgram::try_from(SeccompFilter::new(
        denied_syscalls(programs)?,
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
            Err(e) => return Err(SeccompError::Install(e)),
        }
    }
    Ok(None)
}

/// Syscalls answered with `EPERM`, all or only with the arguments given.
fn denied_syscalls(
    programs: Programs,
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let always = [
        // Other processes' memory and descriptors.
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_migrate_pages,
        libc::SYS_move_pages,
        // Other processes' scheduling (a child could starve the supervisor; neither child sets
        // its own).
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
        // Kernel facilities neither child uses.
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
    // change them): a child could kill the supervisor with RLIMIT_CPU, or leave it unable to
    // open a descriptor. Its own (pid 0: `getrlimit` reads its open-file limit) stay allowed.
    rules.insert(
        libc::SYS_prlimit64,
        vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, 0)?])?],
    );
    if programs == Programs::Forbidden {
        rules.extend(
            [
                libc::SYS_execve,
                libc::SYS_execveat,
                #[cfg(target_arch = "x86_64")]
                libc::SYS_fork,
                #[cfg(target_arch = "x86_64")]
                libc::SYS_vfork,
            ]
            .map(|nr| (nr, Vec::new())),
        );
        // A new process, not a thread (the flags are the first argument on x86_64 and
        // aarch64).
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![arg(
                0,
                SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
                0,
            )?])?],
        );
    }
    // Typing into a terminal the process may still share.
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(vec![arg(
            1,
            SeccompCmpOp::Eq,
            libc::TIOCSTI,
        )?])?],
    );
    // Only IP sockets are needed. Not Unix: the channels come ready-made, and Landlock
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
    //! Each test runs itself again in a child process (a filter cannot be taken off), which
    //! installs the filter, tries what it must deny and what must keep working, and fails
    //! (a panic: non-zero exit) if any attempt goes otherwise.

    use std::io;
    use std::net::ToSocketAddrs;
    use std::process::Command;

    use super::*;

    /// Set in the child: which filter to install.
    const CHILD: &str = "CORE_SERVER_SECCOMP_TEST";

    /// Runs `test` (this module's test of that name) in a child under `programs`' filter;
    /// returns in the child once the filter is installed, and ends the test in the parent.
    fn in_child(test: &str, programs: Programs) -> bool {
        if let Ok(which) = std::env::var(CHILD) {
            assert_eq!(which, format!("{programs:?}"));
            assert_eq!(apply(programs).unwrap(), None, "this kernel has seccomp");
            return true;
        }
        let output = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("seccomp::tests::{test}"), "--nocapture"])
            .args(["--test-threads", "1"])
            .env(CHILD, format!("{programs:?}"))
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "the child failed: {log}");
        // `--exact` with a wrong name would run nothing and succeed.
        assert!(log.contains("1 passed"), "the child ran no test: {log}");
        false
    }

    /// The errno of the last failed call.
    fn errno() -> Option<i32> {
        Some(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn socket(family: libc::c_int, kind: libc::c_int) -> Option<i32> {
        // SAFETY: no pointer; the descriptor, if any, is closed at once.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return errno();
        }
        // SAFETY: `fd` was just opened here and is used nowhere else.
        unsafe { libc::close(fd) };
        None
    }

    fn traceme() -> Option<i32> {
        // SAFETY: PTRACE_TRACEME takes no pointer.
        let result = unsafe {
            libc::ptrace(
                libc::PTRACE_TRACEME,
                0,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if result < 0 {
            errno()
        } else {
            None
        }
    }

    fn unshare() -> Option<i32> {
        // SAFETY: no pointer.
        let result = unsafe { libc::unshare(libc::CLONE_NEWUSER) };
        if result < 0 {
            errno()
        } else {
            None
        }
    }

    /// Runs /bin/true as std (and tokio::process) does: posix_spawn, clone3, then clone.
    fn run_true() -> Option<i32> {
        match Command::new("/bin/true").status() {
            Ok(status) => {
                assert!(status.success());
                None
            }
            Err(e) => Some(e.raw_os_error().unwrap_or(0)),
        }
    }

    /// What both filters deny and what both let through.
    fn common() {
        assert_eq!(traceme(), Some(libc::EPERM), "ptrace");
        assert_eq!(unshare(), Some(libc::EPERM), "unshare");
        assert_eq!(socket(libc::AF_UNIX, libc::SOCK_STREAM), Some(libc::EPERM));
        assert_eq!(socket(libc::AF_NETLINK, libc::SOCK_RAW), Some(libc::EPERM));
        assert_eq!(socket(libc::AF_INET, libc::SOCK_STREAM), None);
        assert_eq!(socket(libc::AF_INET6, libc::SOCK_DGRAM), None);
        std::thread::spawn(|| ()).join().unwrap();
        // glibc's resolver, refused its Unix socket to nscd, still answers (here from
        // /etc/hosts, as it would from DNS: the same NSS path).
        let localhost = ("localhost", 443).to_socket_addrs().unwrap();
        assert!(localhost.into_iter().any(|a| a.ip().is_loopback()));
    }

    #[test]
    fn without_programs_no_process_may_be_made() {
        if !in_child(
            "without_programs_no_process_may_be_made",
            Programs::Forbidden,
        ) {
            return;
        }
        common();
        assert_eq!(run_true(), Some(libc::EPERM), "exec");
        // SAFETY: the child, if one were made, would only `_exit`.
        let child = unsafe { libc::fork() };
        if child == 0 {
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(0) };
        }
        assert_eq!((child, errno()), (-1, Some(libc::EPERM)), "fork");
    }

    #[test]
    fn with_programs_mkcert_may_run_and_nothing_else_opens() {
        if !in_child(
            "with_programs_mkcert_may_run_and_nothing_else_opens",
            Programs::Allowed,
        ) {
            return;
        }
        common();
        assert_eq!(run_true(), None, "exec");
        // The program runs under the filter too.
        let output = Command::new("cat")
            .arg("/proc/self/status")
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&output.stdout);
        assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    }
}
