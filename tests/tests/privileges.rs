//! Privilege separation as the kernel reports it in /proc, and start-up errors that say what
//! to do. Tests that need root run as root in CI and are skipped (with a reason) elsewhere.

use std::path::Path;
use std::process::{Command, Output};

use core_server_tests::server::alive;
use core_server_tests::server::{
    binaries, free_tcp_port, free_udp_port, install_copy, proc_status,
};
use core_server_tests::setcap::SetcapServer;
use core_server_tests::{have_root, CoreServer};

const NO_CAPS: &str = "0000000000000000";

fn assert_unprivileged(worker: u32) {
    for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(proc_status(worker, set), NO_CAPS, "{set} of the worker");
    }
    assert_eq!(proc_status(worker, "NoNewPrivs"), "1");
}

#[test]
fn worker_has_no_capabilities_and_no_new_privileges() {
    let server = CoreServer::start();
    assert_unprivileged(server.worker_pid());
}

#[test]
fn started_as_root_the_worker_runs_as_nobody_without_groups() {
    if !have_root("started_as_root_the_worker_runs_as_nobody_without_groups") {
        return;
    }
    let server = CoreServer::start();
    let worker = server.worker_pid();
    assert_eq!(proc_status(worker, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(proc_status(worker, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(proc_status(worker, "Groups"), "");
    assert_unprivileged(worker);
    // The supervisor itself keeps root: it restarts workers as nobody.
    assert_eq!(proc_status(server.pid(), "Uid"), "0\t0\t0\t0");
}

/// `core-server` run as nobody in a network namespace of its own, where binding below 1024
/// needs privilege whatever the host's sysctl says, and nothing touches the host's network.
fn as_nobody_in_own_netns(install: &Path, args: &[&str]) -> Command {
    let mut command = Command::new("unshare");
    command
        .args([
            "--net",
            "--",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
        ])
        .arg(install.join("core-server"))
        .args(["--https-port", "8443", "--udp-port", "40608", "--dir"])
        .arg(install.join("state"))
        .args(args);
    command
}

#[test]
fn a_privileged_port_without_privilege_says_how_to_fix_it() {
    if !have_root("a_privileged_port_without_privilege_says_how_to_fix_it") {
        return;
    }
    let install = install_copy();
    let output = as_nobody_in_own_netns(install.path(), &["--http-port", "81"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("cannot bind TCP port 81 (--http-port): Permission denied"),
        "{stderr}"
    );
    assert!(
        stderr.contains("setcap cap_net_bind_service=+eip"),
        "{stderr}"
    );
    assert!(stderr.contains("--http-port"), "{stderr}");
}

#[test]
fn setcap_supervisor_binds_port_81_and_its_worker_gets_nothing() {
    if !have_root("setcap_supervisor_binds_port_81_and_its_worker_gets_nothing") {
        return;
    }
    let server = SetcapServer::start();
    // The supervisor holds the one capability it was given; the worker has none of it.
    assert_eq!(
        proc_status(server.pid(), "Uid"),
        "65534\t65534\t65534\t65534"
    );
    assert_eq!(
        proc_status(server.pid(), "CapEff"),
        "0000000000000400",
        "cap_net_bind_service"
    );
    assert_eq!(
        proc_status(server.worker_pid(), "Uid"),
        "65534\t65534\t65534\t65534"
    );
    assert_unprivileged(server.worker_pid());
    assert!(server.terminate().success());
}

fn run_supervisor(args: &[&str]) -> Output {
    run_supervisor_from(&binaries().join("core-server"), args)
}

/// Runs `binary` on free ports (HTTPS and UDP; `args` adds the rest) with a fresh `--dir`.
fn run_supervisor_from(binary: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .args([
            "--https-port",
            &free_tcp_port().to_string(),
            "--udp-port",
            &free_udp_port().to_string(),
        ])
        .arg("--dir")
        .arg(tempfile::tempdir().unwrap().path())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_busy_port_is_named() {
    let busy = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let output = run_supervisor(&["--http-port", &port]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot bind TCP port {port} (--http-port)")),
        "{stderr}"
    );
    // Not an instance to take over: that would have answered on its control socket.
    assert!(
        stderr.contains("no core-server answers on the control socket"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_user_is_refused_before_binding() {
    if !have_root("an_unknown_user_is_refused_before_binding") {
        return;
    }
    let output = run_supervisor(&[
        "--http-port",
        &free_tcp_port().to_string(),
        "--user",
        "no-such-user-here",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no user 'no-such-user-here'"), "{stderr}");
    let output = run_supervisor(&[
        "--http-port",
        &free_tcp_port().to_string(),
        "--user",
        "root",
    ]);
    assert!(String::from_utf8_lossy(&output.stderr).contains("must run unprivileged"));
}

#[test]
fn a_missing_worker_binary_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        binaries().join("core-server"),
        dir.path().join("core-server"),
    )
    .unwrap();
    let output = run_supervisor_from(
        &dir.path().join("core-server"),
        &["--http-port", &free_tcp_port().to_string()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("core-server-worker must be installed next to"),
        "{stderr}"
    );
}

/// The supervisor parses no network input: it does not even link an HTTP implementation.
#[test]
fn the_supervisor_links_no_http_code() {
    let output = Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "core-server",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let tree = String::from_utf8_lossy(&output.stdout);
    assert!(
        tree.lines().any(|l| l.starts_with("core-server-proto")),
        "{tree}"
    );
    for http in ["hyper ", "h2 ", "httparse ", "http "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(http)),
            "the supervisor depends on {http}:\n{tree}"
        );
    }
}

#[test]
fn a_first_worker_that_cannot_start_is_reported_and_core_server_exits() {
    let install = install_copy();
    let worker = install.path().join("core-server-worker");
    std::fs::write(&worker, "#!/bin/sh\necho 'worker says: no' >&2\nexit 3\n").unwrap();
    let output = run_supervisor_from(
        &install.path().join("core-server"),
        &["--http-port", &free_tcp_port().to_string()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("worker says: no"), "{stderr}");
    assert!(
        stderr.contains("the worker did not start: exited during start-up (exit status: 3)"),
        "{stderr}"
    );
}

#[test]
fn another_user_may_not_control_the_instance() {
    if !have_root("another_user_may_not_control_the_instance") {
        return;
    }
    let server = CoreServer::start();
    let output = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(binaries().join("core-server"))
        .args(["--udp-port", &server.udp_port.to_string(), "stop"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("uid 65534 may not control this core-server (it runs as uid 0)"),
        "{stderr}"
    );
    assert!(alive(server.pid()), "still running");
}
