//! The UDP command port and the `core-server add|remove` client, as an app or operator uses them.

use std::process::Command;
use std::time::Duration;

use core_server_tests::http::get;
use core_server_tests::server::{binaries, free_udp_port};
use core_server_tests::{Backend, CoreServer};

#[tokio::test(flavor = "multi_thread")]
async fn malformed_datagrams_get_an_error_and_change_nothing() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("kept.example", backend.port);

    let huge = vec![b'x'; 65_507]; // the largest UDP payload over IPv4
    let long_domain = format!("add {}.example 80", "a".repeat(300));
    let bad: Vec<&[u8]> = vec![
        b"",
        b"   \n",
        b"add",
        b"add kept.example",
        b"add kept.example 0",
        b"add kept.example 65536",
        b"add kept.example 99999999999",
        b"add kept.example -80",
        b"add kept.example +80",
        b"add kept.example http",
        b"add kept.example 80 extra",
        b"add under_score.example 80",
        b"add 127.0.0.1 80",
        b"add 127.1 80",
        b"add 0x7f.1 80",
        b"add 2130706433 80",
        b"add 0x7f000001 80",
        b"add 0177.0.0.1 80",
        b"add 1.2.3.4.5 80",
        b"add kept.example\n80",
        b"add a..b 80",
        b"add -lead.example 80",
        long_domain.as_bytes(),
        b"remove",
        b"remove kept.example extra",
        b"remove never-added.example",
        b"ADD kept.example 80",
        b"delete kept.example",
        b"add kept.example 1\nremove kept.example",
        b"\xff\xfe\x00\x01",
        b"add k\xc3\xa9pt.example 80",
        b"\0\0\0\0",
        &huge,
    ];
    for datagram in &bad {
        let reply = server.udp(&String::from_utf8_lossy(datagram));
        assert!(
            reply.starts_with("error: "),
            "{:?} got {reply:?}",
            String::from_utf8_lossy(datagram)
        );
        assert!(!reply.contains('\n'), "one line: {reply:?}");
    }
    // Raw bytes too (udp() above sends lossy UTF-8).
    for datagram in [&b"\xff\xfe\x00\x01"[..], &huge] {
        let reply = server
            .try_udp(datagram, Duration::from_secs(5))
            .expect("a reply");
        assert!(reply.starts_with("error: "), "{reply}");
    }

    // Nothing changed: the route is still there, with its port, and nothing else was added.
    assert_eq!(get(&server.url("/"), "kept.example").await.status, 200);
    assert_eq!(
        get(&server.url("/"), "under_score.example").await.status,
        404
    );
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(server.dir.join("routes.json")).unwrap()).unwrap();
    assert_eq!(
        saved["routes"],
        serde_json::json!({ "kept.example": backend.port })
    );

    // And a valid command still works.
    let other = Backend::echo().await;
    server.add("new.example", other.port);
    assert_eq!(get(&server.url("/"), "new.example").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn replies_explain_themselves() {
    let server = CoreServer::start();
    for (datagram, reply) in [
        (
            "add example.com 0",
            "error: bad port '0' (expected a number from 1 to 65535)",
        ),
        (
            "frobnicate x",
            "error: unknown command 'frobnicate' (expected 'add' or 'remove')",
        ),
        ("add example.com", "error: usage: add <domain> <port>"),
        (
            "remove nothing.example",
            "error: no route for nothing.example",
        ),
        ("add Example.COM. 8080\n", "ok"),
        ("remove example.com", "ok"),
    ] {
        assert_eq!(server.udp(datagram), reply, "{datagram:?}");
    }
}

fn cli(udp_port: u16, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(binaries().join("core-server"))
        .arg("--udp-port")
        .arg(udp_port.to_string())
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn add_and_remove_from_the_command_line() {
    let server = CoreServer::start();
    let backend = Backend::echo().await;
    let port = backend.port.to_string();

    assert_eq!(
        cli(server.udp_port, &["add", "cli.example", &port]),
        (true, "ok".into(), "".into())
    );
    assert_eq!(get(&server.url("/"), "cli.example").await.status, 200);

    // The flag may also follow the subcommand.
    let output = Command::new(binaries().join("core-server"))
        .args([
            "remove",
            "cli.example",
            "--udp-port",
            &server.udp_port.to_string(),
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
    assert_eq!(get(&server.url("/"), "cli.example").await.status, 404);

    // Refused by the server: the reply is printed, the exit status says failure.
    let (ok, out, _) = cli(server.udp_port, &["remove", "cli.example"]);
    assert!(!ok);
    assert_eq!(out, "error: no route for cli.example");
    // Refused before sending, in the same words.
    let (ok, out, _) = cli(server.udp_port, &["add", "cli.example", "70000"]);
    assert!(!ok);
    assert_eq!(
        out,
        "error: bad port '70000' (expected a number from 1 to 65535)"
    );

    // Nobody listening.
    let (ok, _, err) = cli(free_udp_port(), &["add", "cli.example", &port]);
    assert!(!ok);
    assert!(err.contains("no core-server is listening"), "{err}");
}
