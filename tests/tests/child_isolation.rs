//! The children share nothing with the operator's terminal nor with what the supervisor itself
//! inherited: a session of their own without a controlling terminal, and only the descriptors
//! passed on purpose. They get the open-file limit raised to the hard one; their stderr reaches
//! the supervisor's log in bounded, tagged lines; and the supervisor is non-dumpable. All as the
//! kernel reports it in /proc.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use core_server_tests::server::{
    binaries, free_tcp_port, free_udp_port, install_copy, proc_status,
};
use core_server_tests::{have_root, CoreServer};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};

/// Session id and controlling terminal (`tty_nr`, 0 for none) of `pid`.
fn session_and_tty(pid: u32) -> (i32, i32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // "pid (comm) state ppid pgrp session tty_nr ...": comm may hold spaces.
    let (_, fields) = stat.rsplit_once(')').unwrap();
    let fields: Vec<&str> = fields.split_whitespace().collect();
    (fields[3].parse().unwrap(), fields[4].parse().unwrap())
}

/// What each open descriptor of `pid` refers to, by number.
fn descriptors(pid: u32) -> BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.to_string_lossy().into_owned()))
        })
        .collect()
}

/// The worker leads a session of its own, without a terminal, and holds exactly what it was
/// given (/dev/null, its stderr pipe to the supervisor, the IPC socket) and what it opened
/// since (sockets, tokio's epoll and eventfd): no pipe, terminal or file of anyone else's.
fn assert_isolated(server: &CoreServer) {
    let worker = server.worker_pid();
    let (session, tty) = session_and_tty(worker);
    assert_ne!(session, session_and_tty(server.pid()).0, "same session");
    assert_eq!(session, worker as i32, "the worker leads its session");
    assert_eq!(tty, 0, "the worker has a controlling terminal");

    let fds = descriptors(worker);
    let listing = format!("descriptors of the worker: {fds:#?}");
    let fd = |n: i32| fds.get(&n).map_or("(closed)", String::as_str);
    assert_eq!(fd(0), "/dev/null", "{listing}");
    assert_eq!(fd(1), "/dev/null", "{listing}");
    assert!(fd(2).starts_with("pipe:"), "{listing}");
    assert!(
        descriptors(server.pid()).values().any(|t| t == fd(2)),
        "the supervisor does not read the worker's stderr pipe; {listing}"
    );
    assert!(fd(3).starts_with("socket:"), "no IPC socket; {listing}");
    for (n, target) in fds.range(4..) {
        assert!(
            target.starts_with("socket:") || target.starts_with("anon_inode:"),
            "descriptor {n} ({target}) was not given on purpose; {listing}"
        );
    }
}

#[test]
fn the_worker_has_its_own_session_and_only_the_descriptors_it_was_given() {
    let server = CoreServer::start();
    assert_isolated(&server);
}

/// Marks `fd` inheritable, in the child about to exec.
fn inherit(fd: i32) -> std::io::Result<()> {
    // SAFETY: one fcntl on a descriptor number; async-signal-safe.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    Ok(())
}

/// As an operator would run it: on a terminal (a pty that is the supervisor's controlling
/// terminal, its stdin, stdout and stderr), from a shell that leaked a pipe and a file to it.
#[test]
fn on_a_terminal_with_stray_descriptors_the_worker_gets_none_of_them() {
    let pty = nix::pty::openpty(None, None).unwrap();
    for fd in [&pty.master, &pty.slave] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    let (stray_pipe, _stray_pipe_writer) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let stray_file = tempfile::tempfile().unwrap();
    let stray = [stray_pipe.as_raw_fd(), stray_file.as_raw_fd()];

    let server = CoreServer::start_with_command(|command, log| {
        let terminal = |fd: &OwnedFd| Stdio::from(fd.try_clone().unwrap());
        command
            .stdin(terminal(&pty.slave))
            .stdout(terminal(&pty.slave))
            .stderr(terminal(&pty.slave));
        // SAFETY: setsid, ioctl and fcntl are async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid()?;
                if nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                stray.into_iter().try_for_each(inherit)
            });
        }
        // What the processes print on the terminal goes to the log, until it closes.
        let mut screen = File::from(pty.master.try_clone().unwrap());
        let mut log = File::options().append(true).open(log).unwrap();
        std::thread::spawn(move || std::io::copy(&mut screen, &mut log));
    });
    drop(pty);

    // The set-up is what it claims: the supervisor has the terminal and the strays.
    let supervisor = server.pid();
    assert_ne!(session_and_tty(supervisor).1, 0, "no terminal to test with");
    let held = descriptors(supervisor);
    for fd in stray {
        assert!(
            held.contains_key(&fd),
            "stray {fd} not inherited: {held:#?}"
        );
    }
    assert_isolated(&server);

    // The worker's lines still reach the terminal, through the supervisor, tagged (the copy
    // from the terminal to the log file runs on its own: wait for it).
    let worker = server.worker_pid();
    let mut server = server;
    server.stop();
    let tag = format!("worker[{worker}]: ");
    server.wait_logged(&tag, Duration::from_secs(10));
}

#[test]
fn the_worker_gets_the_hard_open_file_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let soft = 256.min(hard);
    let server = CoreServer::start_with_command(|command, _| {
        // SAFETY: setrlimit is an async-signal-safe system call.
        unsafe {
            command.pre_exec(move || Ok(setrlimit(Resource::RLIMIT_NOFILE, soft, hard)?));
        }
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.worker_pid())).unwrap();
    let open_files: Vec<&str> = limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        open_files[..2],
        [hard.to_string(), hard.to_string()],
        "{limits}"
    );
    if soft < hard {
        let raised = format!("open-file limit: {hard} (raised from {soft})");
        assert!(server.log().contains(&raised), "{}", server.log());
    }
}

/// Run as an ordinary user, the supervisor shares its uid with its worker: a process of that
/// uid must still not read its memory or environment (nor ptrace it).
#[test]
fn a_process_of_the_supervisors_own_uid_cannot_read_its_environment() {
    if !have_root("a_process_of_the_supervisors_own_uid_cannot_read_its_environment") {
        return;
    }
    const NOBODY: u32 = 65534;
    let server = CoreServer::start_with_command(|command, log| {
        // Its state directory is made there, by nobody.
        let dir = log.parent().unwrap();
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        command.env("CORE_SERVER_TEST_SECRET", "s3cr3t");
        // SAFETY: setgroups, setgid and setuid are async-signal-safe system calls.
        unsafe {
            command.pre_exec(|| {
                setgroups(&[])?;
                setgid(Gid::from_raw(NOBODY))?;
                setuid(Uid::from_raw(NOBODY))?;
                Ok(())
            });
        }
    });
    let uid = format!("{NOBODY}\t{NOBODY}\t{NOBODY}\t{NOBODY}");
    assert_eq!(proc_status(server.pid(), "Uid"), uid);
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg("cat")
        .arg(format!("/proc/{}/environ", server.pid()))
        .output()
        .expect("setpriv is installed (util-linux)");
    let environ = String::from_utf8_lossy(&output.stdout);
    assert!(
        !environ.contains("s3cr3t"),
        "read by uid {NOBODY}: {environ}"
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn another_process_of_the_childrens_user_cannot_look_into_them() {
    if !have_root("another_process_of_the_childrens_user_cannot_look_into_them") {
        return;
    }
    let server = CoreServer::start();
    for (child, pid) in [
        ("worker", server.worker_pid()),
        ("ACME helper", server.acme_helper_pid()),
    ] {
        // `nobody`, as the children are: were they dumpable, it could list (and open) their
        // descriptors (the certificate store) and read their memory (served keys).
        let output = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg("ls")
            .arg(format!("/proc/{pid}/fd"))
            .output()
            .expect("setpriv is installed (util-linux)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("Permission denied"),
            "the {child}'s descriptors, listed by nobody: {}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
}

/// A stand-in worker that writes one 50 MB line without a newline to stderr, then a normal
/// line, and fails. Each step waits for a file that the test creates, so the test can measure
/// the supervisor in between.
fn install_long_line_worker() -> tempfile::TempDir {
    let install = install_copy();
    let dir = install.path().display();
    std::fs::write(
        install.path().join("core-server-worker"),
        format!(
            r#"#!/bin/sh
PATH=/usr/bin:/bin
wait_for() {{ i=0; while [ ! -e {dir}/$1 ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; }}
echo $$ > {dir}/pid.tmp && mv {dir}/pid.tmp {dir}/pid
wait_for go
head -c 50000000 /dev/zero | tr '\0' x >&2
touch {dir}/written
wait_for finish
printf '\nafter the long line\n' >&2
exit 3
"#
        ),
    )
    .unwrap();
    install
}

/// Waits for `path` to exist while `supervisor` runs.
fn wait_for_file(path: &Path, supervisor: &mut Child, output: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = supervisor.try_wait().unwrap() {
            let output = std::fs::read_to_string(output).unwrap_or_default();
            panic!("core-server exited ({status}) before {path:?}:\n{output}");
        }
        assert!(Instant::now() < deadline, "no {path:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kib(status_value: &str) -> u64 {
    status_value.trim_end_matches(" kB").parse().unwrap()
}

#[test]
fn a_child_that_never_ends_its_line_costs_the_supervisor_no_memory() {
    for mode in ["local", "release"] {
        let install = install_long_line_worker();
        let dir = install.path();
        let output = dir.join("output");
        let output_file = File::create(&output).unwrap();
        let state = dir.join("state");
        let mut supervisor = Command::new(dir.join("core-server"))
            .args(["--http-port", &free_tcp_port().to_string()])
            .args(["--https-port", &free_tcp_port().to_string()])
            .args(["--udp-port", &free_udp_port().to_string()])
            .arg("--dir")
            .arg(&state)
            .args(["--mode", mode, "--foreground"])
            .stdin(Stdio::null())
            .stdout(output_file.try_clone().unwrap())
            .stderr(output_file)
            .spawn()
            .unwrap();
        let pid = supervisor.id();

        wait_for_file(&dir.join("pid"), &mut supervisor, &output);
        let before = kib(&proc_status(pid, "VmRSS"));
        File::create(dir.join("go")).unwrap();
        wait_for_file(&dir.join("written"), &mut supervisor, &output);
        let peak = kib(&proc_status(pid, "VmHWM"));
        File::create(dir.join("finish")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while supervisor.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "core-server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }

        println!("{mode} mode: supervisor RSS {before} kB before the 50 MB line, peak {peak} kB");
        assert!(
            peak < before + 8 * 1024,
            "{mode} mode: the supervisor grew from {before} kB to {peak} kB"
        );

        let log: PathBuf = match mode {
            "local" => output,
            _ => state.join("logs/core.log"),
        };
        let log = std::fs::read_to_string(log).unwrap();
        let worker = std::fs::read_to_string(dir.join("pid")).unwrap();
        let tag = format!("worker[{}]: ", worker.trim());
        let lines: Vec<&str> = log.lines().filter(|l| l.starts_with(&tag)).collect();
        let summary = || format!("{mode} mode, lines of {tag}: {lines:?}");
        assert_eq!(lines.len(), 2, "{}", summary());
        assert!(
            lines[0].starts_with(&format!("{tag}xxxxxxxx")),
            "{}",
            summary()
        );
        assert!(
            lines[0].ends_with("x [cut: line too long]"),
            "{}",
            summary()
        );
        assert!(lines[0].len() < 4096, "{}", summary());
        assert_eq!(lines[1], format!("{tag}after the long line"));
    }
}

/// Release mode detaches: the instance left running keeps none of the descriptors the command
/// was run with (a script's pipe held by it would keep the script waiting for its end).
#[test]
fn a_detached_instance_keeps_none_of_the_launchers_stray_descriptors() {
    let (stray_pipe, stray_writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let stray = stray_writer.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let udp_port = free_udp_port().to_string();
    let mut command = Command::new(binaries().join("core-server"));
    command
        .args(["--mode", "release", "--udp-port", &udp_port])
        .args(["--http-port", &free_tcp_port().to_string()])
        .args(["--https-port", &free_tcp_port().to_string()])
        .arg("--dir")
        .arg(dir.path());
    // SAFETY: fcntl is an async-signal-safe system call.
    unsafe {
        command.pre_exec(move || inherit(stray));
    }
    let output = command.output().unwrap();
    let said = String::from_utf8_lossy(&output.stdout);
    let stop = || {
        Command::new(binaries().join("core-server"))
            .args(["--udp-port", &udp_port, "stop"])
            .output()
    };
    let pid: Option<u32> = said
        .strip_prefix("core-server is running (pid ")
        .and_then(|rest| rest.split(')').next()?.parse().ok());
    let Some(pid) = pid else {
        let _ = stop();
        panic!("{said}{}", String::from_utf8_lossy(&output.stderr));
    };
    let held = descriptors(pid);
    let _ = stop();
    let stray_target = std::fs::read_link(format!("/proc/self/fd/{stray}")).unwrap();
    let stray_target = stray_target.to_string_lossy();
    assert!(
        !held.values().any(|t| *t == stray_target),
        "the detached instance holds the launcher's {stray_target}: {held:#?}"
    );
    drop((stray_pipe, stray_writer));
}
