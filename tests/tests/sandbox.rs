//! The worker's sandbox (Landlock and seccomp), where it matters most: a setcap'd supervisor
//! run without root, whose worker shares its uid and so passes the control socket's uid check
//! and may signal it. A probe process applies the worker's real sandbox and then tries what a
//! compromised worker would; the same probe unconfined shows each attempt works without it.
//! The ACME helper installs the same seccomp filter (proto/src/seccomp.rs tests what it denies).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use core_server_tests::have_root;
use core_server_tests::logs::wait_logged;
use core_server_tests::server::{alive, proc_status};
use core_server_tests::setcap::{SetcapServer, UDP_PORT};
use core_server_tests::CoreServer;

/// Runs the probe beside `server` (as its uid, in its network namespace); each attempt's result.
fn probe(server: &SetcapServer, unconfined: bool) -> BTreeMap<String, String> {
    // Where nobody may run it from.
    let probe = server.install_dir().join("sandbox_probe");
    if !probe.exists() {
        std::fs::copy(Path::new(env!("CARGO_BIN_EXE_sandbox_probe")), &probe).unwrap();
    }
    let mut command = server.command_beside(&probe);
    if unconfined {
        command.arg("--unconfined");
    }
    let output = command
        .arg(server.pid().to_string())
        .arg(UDP_PORT.to_string())
        .arg(server.install_dir().join("bus.sock"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "probe failed ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .filter_map(|line| line.split_once(": "))
        .map(|(attempt, result)| (attempt.to_owned(), result.to_owned()))
        .collect()
}

fn results(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .collect()
}

#[test]
fn a_sandboxed_worker_cannot_touch_a_supervisor_of_its_own_uid() {
    if !have_root("a_sandboxed_worker_cannot_touch_a_supervisor_of_its_own_uid") {
        return;
    }
    let server = SetcapServer::start();
    // A named socket the worker's uid may reach, as the operator's session bus would be.
    let bus_path = server.install_dir().join("bus.sock");
    let _bus = std::os::unix::net::UnixListener::bind(&bus_path).unwrap();
    std::fs::set_permissions(&bus_path, std::fs::Permissions::from_mode(0o777)).unwrap();

    // The threat is real: without the sandbox, a process of the worker's uid does it all.
    assert_eq!(
        probe(&server, true),
        results(&[
            ("kill supervisor", "ok"),
            ("connect control socket", "ok"),
            ("connect named unix socket", "ok"),
            ("prlimit supervisor", "ok"),
            ("open /etc/passwd", "ok"),
            ("bind tcp", "ok"),
            ("netlink socket", "ok"),
            ("thread", "ok"),
            ("fork", "ok"),
            ("clone3", "ok"),
            ("exec", "ok"),
            ("ptrace traceme", "ok"),
        ]),
        "unconfined"
    );
    assert_eq!(
        probe(&server, false),
        results(&[
            // Landlock: signals stay inside the sandbox; seccomp: no Unix socket at all (the
            // control socket is abstract, which Landlock scopes too; a named one it does not).
            ("kill supervisor", "EPERM"),
            ("connect control socket", "EPERM"),
            ("connect named unix socket", "EPERM"),
            // seccomp: another process's limits are out of reach.
            ("prlimit supervisor", "EPERM"),
            // Landlock: no file by path, no TCP port bound.
            ("open /etc/passwd", "EACCES"),
            ("bind tcp", "EACCES"),
            // seccomp: threads yes; processes, tracing and other socket families no.
            ("netlink socket", "EPERM"),
            ("thread", "ok"),
            ("fork", "EPERM"),
            // Unreadable flags: refused as unknown, so that libc falls back to clone.
            ("clone3", "ENOSYS"),
            ("exec", "EPERM"),
            ("ptrace traceme", "EPERM"),
        ]),
        "sandboxed:\n{}",
        server.log()
    );

    // The real worker applied the same sandbox, and all still runs.
    let worker = server.worker_pid();
    assert_eq!(proc_status(worker, "Seccomp"), "2", "seccomp filter mode");
    assert_eq!(proc_status(worker, "NoNewPrivs"), "1");
    assert!(
        server.log().contains("sandboxed: Landlock"),
        "{}",
        server.log()
    );
    assert!(alive(server.pid()) && alive(worker));
}

#[test]
fn the_worker_runs_under_its_seccomp_filter() {
    let server = CoreServer::start();
    let worker = server.worker_pid();
    assert_eq!(proc_status(worker, "Seccomp"), "2", "seccomp filter mode");
    // Its runtime threads inherited it: they were started after the sandbox.
    let tasks = std::fs::read_dir(format!("/proc/{worker}/task")).unwrap();
    for task in tasks {
        let status =
            std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    }
    assert!(
        server.log().contains("sandboxed: Landlock"),
        "{}",
        server.log()
    );
}

/// The ACME helper installs the same seccomp deny-list (proto's unit tests show what it
/// denies in each mode) right after Landlock, in both modes, on all of its threads.
#[test]
fn the_acme_helper_runs_under_its_seccomp_filter_in_both_modes() {
    if !core_server_tests::have_tools(
        "the_acme_helper_runs_under_its_seccomp_filter_in_both_modes",
        &["mkcert"],
    ) {
        return;
    }
    let ca = core_server_tests::mkcert::MkcertCa::new();
    let env = ca.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let local = CoreServer::start_with_env(&env);
    // Release mode against a CA that is not there: the helper starts and confines itself all
    // the same.
    let directory = format!(
        "https://127.0.0.1:{}/dir",
        core_server_tests::pebble::dead_port()
    );
    let release = CoreServer::start_with(&[
        "--mode",
        "release",
        "--foreground",
        "--acme-directory",
        &directory,
    ]);
    for (server, line) in [
        (&local, "sandboxed: seccomp (mkcert may run)"),
        (&release, "sandboxed: seccomp (no process, no exec)"),
    ] {
        let helper = server.acme_helper_pid();
        // Release mode logs into a file.
        let log = || {
            let file = std::fs::read_to_string(server.dir.join("logs/core.log"));
            server.log() + &file.unwrap_or_default()
        };
        // The helper confines itself once `Start` is read, a moment after it exists.
        wait_logged(log, line, Duration::from_secs(20));
        assert_eq!(proc_status(helper, "Seccomp"), "2", "seccomp filter mode");
        let tasks = std::fs::read_dir(format!("/proc/{helper}/task")).unwrap();
        for task in tasks {
            let status =
                std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
            assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
        }
        assert!(alive(helper), "{}", log());
    }
}
