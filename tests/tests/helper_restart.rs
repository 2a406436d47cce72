//! The ACME helper as the supervisor keeps it: a helper that dies is restarted, and the worker
//! serves the certificates it holds meanwhile; no other process of the children's user can
//! look into either child (they are not dumpable).

use std::process::Command;
use std::time::{Duration, Instant};

use core_server_tests::mkcert::MkcertCa;
use core_server_tests::server::alive;
use core_server_tests::tls_client::{Sni, TlsClient};
use core_server_tests::{have_root, have_tools, Backend, CoreServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const APP: &str = "app.example";

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_helper_is_restarted_and_loaded_certificates_serve_meanwhile() {
    if !have_tools(
        "a_killed_helper_is_restarted_and_loaded_certificates_serve_meanwhile",
        &["mkcert"],
    ) {
        return;
    }
    let ca = MkcertCa::new();
    let env = ca.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let server = CoreServer::start_with_env(&env);
    let backend = Backend::echo().await;
    server.add(APP, backend.port);
    let client = TlsClient::new(&[&ca.root_pem()]);
    let sni = Sni::name(APP);
    assert_eq!(
        client.get(server.https_port, &sni, APP, "/").await.status,
        200
    );

    let old = server.acme_helper_pid();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    // New handshakes for the loaded name, while the helper is gone or restarting.
    for _ in 0..5 {
        let reply = client.get(server.https_port, &sni, APP, "/").await;
        assert_eq!(reply.status, 200, "{}", server.log());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let new = loop {
        let pid = server.acme_helper_pid();
        if pid != old && alive(pid) {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "no new helper:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = server.command().arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.contains(&format!("ACME helper  pid {new}")),
        "{status}"
    );
    assert!(
        status.contains(APP),
        "the store's certificate listed: {status}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_process_of_the_childrens_user_cannot_look_into_them() {
    if !have_root("another_process_of_the_childrens_user_cannot_look_into_them") {
        return;
    }
    let server = CoreServer::start();
    for (child, pid) in [
        ("worker", server.worker_pid()),
        ("helper", server.acme_helper_pid()),
    ] {
        // `nobody`, as the children are: without non-dumpable, it could list (and open) the
        // descriptors of a process of its own.
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
