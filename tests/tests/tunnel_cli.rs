//! `core-server tunnel allow|revoke`: what the operator sees (the token alone on stdout, the
//! guidance on stderr, status), what is kept (only the token's SHA-256, in a private routes
//! file), and that a tunnel route lives through a crash and a rerun like any route.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use core_server_tests::server::{binaries, wait_gone};
use core_server_tests::CoreServer;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The SHA-256 of `token` in hex, as coreutils computes it.
fn sha256_hex(token: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(token.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    text(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// routes.json as text, and its permission bits.
fn routes_file(server: &CoreServer) -> (String, u32) {
    let path = server.dir.join("routes.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    (std::fs::read_to_string(&path).unwrap(), mode)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap()
}

#[test]
fn allow_prints_a_token_keeps_its_hash_only_and_revoke_and_add_undo_it() {
    let server = CoreServer::start();
    server.add("port.example", 5665);
    let (before, mode) = routes_file(&server);
    assert_eq!(json(&before)["version"], 1);
    assert_eq!(mode, 0o644);

    let output = server.cli(&["tunnel", "allow", "app.example"]);
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(output.status.success(), "{stderr}\n{}", server.log());
    let first = stdout.trim_end().to_owned();
    assert!(
        stderr.contains("app.example is now a tunnel with 1 token\n"),
        "{stderr}"
    );
    assert!(
        stderr.contains("core-agent app.example"),
        "how to run the agent: {stderr}"
    );
    assert!(
        !stderr.contains(&first[5..]),
        "the token on stderr: {stderr}"
    );
    let (saved, mode) = routes_file(&server);
    assert_eq!(mode, 0o600, "{saved}");
    let saved = json(&saved);
    assert_eq!(saved["version"], 2);
    assert_eq!(saved["routes"]["port.example"], 5665);
    let hashes = |saved: &serde_json::Value| saved["routes"]["app.example"]["tunnel"].clone();
    assert_eq!(hashes(&saved), serde_json::json!([sha256_hex(&first)]));
    assert!(
        !saved.to_string().contains(&first[5..]),
        "the token is kept"
    );

    // Again: a second token, the first one still valid.
    let second = server.tunnel_allow("app.example");
    assert_ne!(first, second);
    let saved = json(&routes_file(&server).0);
    assert_eq!(
        hashes(&saved),
        serde_json::json!([sha256_hex(&first), sha256_hex(&second)])
    );
    let shown = server.status();
    assert!(
        shown.contains(
            "routes (2):\n  app.example -> tunnel (2 tokens)\n  port.example -> 127.0.0.1:5665\n"
        ),
        "{shown}"
    );
    assert!(
        shown.contains("tunnels (1):\n  app.example  2 tokens  0 agent connections\n"),
        "{shown}"
    );

    let output = server.cli(&["tunnel", "revoke", "app.example"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "revoked every token of app.example; its agents are disconnected\n"
    );
    let saved = json(&routes_file(&server).0);
    assert_eq!(hashes(&saved), serde_json::json!([]));
    assert!(
        server
            .status()
            .contains("  app.example -> tunnel (0 tokens)\n"),
        "the route stays"
    );

    // A port route is replaced, and the operator told so.
    let output = server.cli(&["tunnel", "allow", "port.example"]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stderr).contains(
            "port.example is now a tunnel with 1 token (it replaced the route to 127.0.0.1:5665)"
        ),
        "{}",
        text(&output.stderr)
    );

    // UDP `add` and `remove` replace tunnels like any route; without tunnels the file is
    // version 1 again, and readable by all.
    assert_eq!(server.udp("add app.example 5666"), "ok");
    assert_eq!(server.udp("remove port.example"), "ok");
    let (saved, mode) = routes_file(&server);
    assert_eq!(
        json(&saved),
        serde_json::json!({"version": 1, "routes": {"app.example": 5666}})
    );
    assert_eq!(mode, 0o644);
    let shown = server.status();
    assert!(!shown.contains("tunnel"), "{shown}");

    // Revoking what is not a tunnel is refused, with the reason.
    let output = server.cli(&["tunnel", "revoke", "app.example"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("app.example is not a tunnel"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn a_tunnel_route_survives_a_crash_a_worker_restart_and_a_rerun() {
    let mut server = CoreServer::start();
    server.tunnel_allow("app.example");
    let line = "  app.example -> tunnel (1 token)\n";

    // Everything killed: the route was saved before `allow` answered.
    server.crash();
    server.launch();
    assert!(server.status().contains(line), "{}", server.log());

    // A new worker gets the tunnel routes, hashes included.
    let worker = server.worker_pid();
    kill(Pid::from_raw(worker as i32), Signal::SIGKILL).unwrap();
    wait_gone(worker, Duration::from_secs(5));
    server.wait_until_answering();
    server.tunnel_revoke("app.example");
    let token = server.tunnel_allow("app.example");

    // A rerun hands it over (takeover protocol 3) to the new instance and its worker.
    assert!(server.rerun().success(), "{}", server.log());
    assert!(server.status().contains(line), "{}", server.log());
    let saved = json(&routes_file(&server).0);
    assert_eq!(
        saved["routes"]["app.example"]["tunnel"],
        serde_json::json!([sha256_hex(&token)])
    );
    server.tunnel_revoke("app.example");
}

#[test]
fn bad_names_are_refused_with_status_2_and_change_nothing() {
    let server = CoreServer::start();
    server.add("keep.example", 5665);
    let before = routes_file(&server);
    for name in [
        "127.0.0.1",
        "bad-.example",
        "",
        "a..example",
        "spa ce.example",
    ] {
        for verb in ["allow", "revoke"] {
            let output = server.cli(&["tunnel", verb, name]);
            assert_eq!(output.status.code(), Some(2), "{verb} {name:?}");
            assert_eq!(text(&output.stdout), "", "{verb} {name:?}: no token");
            assert!(
                text(&output.stderr).contains(&format!("'{name}' cannot be a tunnel")),
                "{verb} {name:?}: {}",
                text(&output.stderr)
            );
        }
    }
    assert_eq!(routes_file(&server), before);
    assert!(!server.status().contains("tunnel"));
}

#[test]
fn with_no_instance_running_it_says_so_as_status_does_and_prints_no_token() {
    let server = CoreServer::unstarted();
    let status = server.cli(&["status"]);
    assert_eq!(status.status.code(), Some(1));
    for verb in ["allow", "revoke"] {
        let output = server.cli(&["tunnel", verb, "app.example"]);
        assert_eq!(output.status.code(), Some(1), "{verb}");
        assert_eq!(text(&output.stdout), "", "{verb}");
        assert_eq!(text(&output.stderr), text(&status.stderr), "{verb}");
    }
}

#[test]
fn an_instance_from_before_tunnels_is_told_apart_and_serves_on() {
    let previous = core_server_tests::previous::install();
    let mut server = CoreServer::start_installed(previous.path());
    server.add("port.example", 5665);
    // This version's CLI, that instance's.
    server.set_binaries(binaries());
    let output = server.cli(&["tunnel", "allow", "app.example"]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stdout),
        "",
        "no token for a tunnel that is not"
    );
    assert!(
        text(&output.stderr).contains(
            "the running core-server predates tunnels; rerun it (core-server) to update it"
        ),
        "{}",
        text(&output.stderr)
    );
    let shown = server.status();
    assert!(
        shown.contains("routes (1):\n  port.example -> 127.0.0.1:5665\n"),
        "{shown}"
    );
}
