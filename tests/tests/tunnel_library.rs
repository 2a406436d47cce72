//! The agent as a library: `agent/examples/in_process.rs`, a program serving its own hyper
//! service through a tunnel with no local port, answers a request end to end.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use core_server_tests::http::get;
use core_server_tests::CoreServer;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const APP: &str = "app.example";

/// The built example, `target/<profile>/examples/in_process` (`cargo test --workspace` and
/// `cargo build --workspace --all-targets` build it).
fn example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/in_process");
    assert!(
        path.is_file(),
        "{} is missing: build it first (cargo build -p core-agent --examples)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn the_in_process_example_serves_a_request() {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(example())
        .env("CORE_AGENT_DOMAIN", APP)
        .env(
            "CORE_AGENT_CONNECT",
            format!("127.0.0.1:{}", server.http_port),
        )
        .env("CORE_AGENT_TOKEN", &token)
        .env("CORE_AGENT_INSECURE_PLAINTEXT", "1")
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("run the in_process example");
    // The request waits (up to --tunnel-wait) for the example to connect.
    let reply = get(&server.url("/"), APP).await;
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
    let length = reply
        .headers
        .get("content-length")
        .map(|v| v.to_str().unwrap());
    assert_eq!(
        (reply.status.as_u16(), &*reply.body, length),
        (200, "hello from in-process\n", Some("22")),
        "{}",
        std::fs::read_to_string(log.path()).unwrap_or_default()
    );
}
