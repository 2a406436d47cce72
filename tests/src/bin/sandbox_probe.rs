//! `sandbox_probe`: a stand-in for a compromised worker, for tests/tests/sandbox.rs. It applies
//! the worker's real sandbox (unless `--unconfined`, the baseline that shows each attempt would
//! succeed without it), then tries what the sandbox must forbid, printing one line per attempt:
//! `<attempt>: ok` or `<attempt>: <errno>`, e.g. `kill supervisor: EPERM`.
//!
//!     sandbox_probe [--unconfined] SUPERVISOR_PID UDP_PORT UNIX_SOCKET
//!
//! Run it as the supervisor's uid, in its network namespace (abstract sockets live there).
//! UNIX_SOCKET is a named socket listening for that uid, as a session bus or ssh-agent is.
//! What it does to the supervisor's limits sets them to what they already are. (Its scheduling
//! is out of reach without the sandbox too, for a setcap'd supervisor: the kernel lets no
//! process with fewer capabilities renice it.)

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::kill;
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::unistd::Pid;

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let unconfined = args.first().is_some_and(|a| a == "--unconfined");
    if unconfined {
        args.remove(0);
    }
    let [supervisor, udp_port, unix_socket] = &args[..] else {
        eprintln!("usage: sandbox_probe [--unconfined] SUPERVISOR_PID UDP_PORT UNIX_SOCKET");
        return ExitCode::FAILURE;
    };
    let supervisor = Pid::from_raw(supervisor.parse().expect("a pid"));
    if !unconfined {
        core_server_worker::sandbox::apply().expect("the sandbox applies");
    }

    // Signal 0 goes through the same permission checks as a real signal, and harms nothing.
    report("kill supervisor", kill(supervisor, None));
    report("connect control socket", connect_control(udp_port));
    report("connect named unix socket", connect_named(unix_socket));
    report("prlimit supervisor", prlimit(supervisor));
    report("open /etc/passwd", open_read("/etc/passwd"));
    report("bind tcp", bind_tcp());
    report("netlink socket", netlink());
    report("thread", thread());
    report("fork", fork());
    report("clone3", clone3());
    report("exec", exec());
    // Last: once traced, a signal would stop this process until its tracer (the test) acts.
    report("ptrace traceme", traceme());
    ExitCode::SUCCESS
}

fn report(attempt: &str, result: nix::Result<()>) {
    match result {
        Ok(()) => println!("{attempt}: ok"),
        Err(errno) => println!("{attempt}: {errno:?}"),
    }
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(0))
}

/// What `core-server stop` does first: connect to `@core-server.<udp port>`.
fn connect_control(udp_port: &str) -> nix::Result<()> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let address = UnixAddr::new_abstract(format!("core-server.{udp_port}").as_bytes())?;
    connect(fd.as_raw_fd(), &address)
}

/// What reaches the operator's session bus (which starts any program it is asked to).
fn connect_named(path: &str) -> nix::Result<()> {
    std::os::unix::net::UnixStream::connect(path)
        .map(drop)
        .map_err(errno)
}

/// RLIMIT_CPU of 1 s would kill the supervisor; this sets it to what it is.
fn prlimit(pid: Pid) -> nix::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads into `limit`, a valid rlimit; no new limit given.
    Errno::result(unsafe {
        libc::prlimit(pid.as_raw(), libc::RLIMIT_CPU, std::ptr::null(), &mut limit)
    })?;
    // SAFETY: passes `limit` as the new limit; no old one asked for.
    Errno::result(unsafe {
        libc::prlimit(pid.as_raw(), libc::RLIMIT_CPU, &limit, std::ptr::null_mut())
    })
    .map(drop)
}

fn open_read(path: &str) -> nix::Result<()> {
    std::fs::File::open(path).map(drop).map_err(errno)
}

fn bind_tcp() -> nix::Result<()> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .map(drop)
        .map_err(errno)
}

/// A socket family a proxy never needs (and a classic way into kernel bugs).
fn netlink() -> nix::Result<()> {
    socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map(drop)
}

/// Threads must keep working: tokio starts blocking threads on demand.
fn thread() -> nix::Result<()> {
    std::thread::Builder::new()
        .spawn(|| ())
        .map_err(errno)?
        .join()
        .expect("the thread ran");
    Ok(())
}

fn fork() -> nix::Result<()> {
    // SAFETY: the child only calls `_exit`, which is async-signal-safe.
    match unsafe { libc::fork() } {
        -1 => Err(Errno::last()),
        // SAFETY: ends the child at once, running nothing of the parent's.
        0 => unsafe { libc::_exit(0) },
        child => {
            // SAFETY: waits for the child just made; no pointer but a null status.
            unsafe { libc::waitpid(child, std::ptr::null_mut(), 0) };
            Ok(())
        }
    }
}

/// A new process through clone3 (its flags are out of a seccomp filter's reach), as a raw
/// syscall: libc would fall back to clone.
fn clone3() -> nix::Result<()> {
    // `struct clone_args`, first version: flags, pidfd, child_tid, parent_tid, exit_signal,
    // stack, stack_size, tls. No flags: a copy of this process, as fork makes.
    let mut args = [0u64; 8];
    args[4] = libc::SIGCHLD as u64;
    // SAFETY: `args` is a valid clone_args of the size given; without CLONE_VM the child runs
    // on its own copy of memory, and it only calls `_exit`.
    let child = unsafe { libc::syscall(libc::SYS_clone3, args.as_ptr(), size_of_val(&args)) };
    match child {
        -1 => Err(Errno::last()),
        // SAFETY: ends the child at once, running nothing of the parent's.
        0 => unsafe { libc::_exit(0) },
        child => {
            // SAFETY: waits for the child just made; no pointer but a null status.
            unsafe { libc::waitpid(child as libc::pid_t, std::ptr::null_mut(), 0) };
            Ok(())
        }
    }
}

/// Runs /bin/true the way std does (posix_spawn: clone3, then clone, then execve).
fn exec() -> nix::Result<()> {
    std::process::Command::new("/bin/true")
        .status()
        .map(drop)
        .map_err(errno)
}

fn traceme() -> nix::Result<()> {
    // SAFETY: PTRACE_TRACEME takes no pointer.
    let result = unsafe {
        libc::ptrace(
            libc::PTRACE_TRACEME,
            0,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Errno::result(result).map(drop)
}
