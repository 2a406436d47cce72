//! Release mode: the command detaches and returns once the instance serves (or fails, saying
//! why); logs go to logs/core.log, rotated so that all log files stay under the cap.

use std::path::Path;
use std::process::{Command, Output};

use core_server_tests::http::get;
use core_server_tests::server::{alive, binaries, free_tcp_port, free_udp_port};
use core_server_tests::Backend;

/// Stops the detached instance (if any) when the test ends, passed or not.
struct StopOnDrop(u16);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = cli(self.0, &["stop"]);
    }
}

fn cli(udp_port: u16, args: &[&str]) -> Output {
    Command::new(binaries().join("core-server"))
        .arg("--udp-port")
        .arg(udp_port.to_string())
        .args(args)
        .env("RUST_LOG", "debug")
        .output()
        .unwrap()
}

fn logs_size(dir: &Path) -> (u64, usize) {
    let files: Vec<_> = std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    (
        files.iter().map(|f| f.metadata().unwrap().len()).sum(),
        files.len(),
    )
}

fn supervisor_pid(udp_port: u16) -> u32 {
    let status = String::from_utf8(cli(udp_port, &["status"]).stdout).unwrap();
    let line = status
        .lines()
        .find(|l| l.contains("supervisor"))
        .expect("status names the supervisor");
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// `app.example` on port 80 is answered `308` to its HTTPS address.
async fn assert_redirected(url: &str) {
    let reply = get(url, "app.example").await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.headers["location"], "https://app.example/");
}

#[tokio::test(flavor = "multi_thread")]
async fn detaches_serves_logs_under_the_cap_and_reruns_detached() {
    const CAP: u64 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let (http, udp) = (free_tcp_port(), free_udp_port());
    let start = |extra: &[&str]| {
        let mut args = vec!["--mode", "release", "--log-cap", "200000"];
        args.extend([
            "--http-port",
            &*http.to_string().leak(),
            "--https-port",
            &*free_tcp_port().to_string().leak(),
        ]);
        args.extend(extra);
        cli(udp, &args)
    };
    let dir_arg = dir.path().to_str().unwrap();

    let output = tokio::task::block_in_place(|| start(&["--dir", dir_arg]));
    let _stop = StopOnDrop(udp);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.starts_with("core-server is running (pid "), "{said}");
    assert!(
        said.contains(&format!("logs in {dir_arg}/logs/core.log")),
        "{said}"
    );
    let first = supervisor_pid(udp);

    // It serves, with the launching command long gone: in release mode, port 80 sends a
    // registered host to HTTPS.
    let backend = Backend::echo().await;
    assert!(cli(udp, &["add", "app.example", &backend.port.to_string()])
        .status
        .success());
    let url = format!("http://127.0.0.1:{http}/");
    assert_redirected(&url).await;

    // Fill the log well past the cap: every 404 is a debug line from the worker.
    for _ in 0..3000 {
        assert_eq!(get(&url, "nobody-here.example").await.status, 404);
    }
    let log = std::fs::read_to_string(dir.path().join("logs/core.log")).unwrap();
    assert!(
        log.contains("core_server_worker"),
        "the worker's lines are in the file too"
    );
    let (size, files) = logs_size(dir.path());
    assert!(files > 2, "rotated into {files} files");
    assert!(size <= CAP, "{size} bytes of logs, cap {CAP}");

    // Rerun, detached again, from another directory and without --dir: it takes over.
    let output = tokio::task::block_in_place(|| start(&[]));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let second = supervisor_pid(udp);
    assert_ne!(first, second);
    assert_redirected(&url).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alive(first) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old instance did not exit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("logs/core.log")).unwrap();
    assert!(
        log.contains(&format!("took over from core-server pid {first}")),
        "{log}"
    );

    let stop = tokio::task::block_in_place(|| cli(udp, &["stop"]));
    assert!(stop.status.success());
    assert!(!alive(second));
}

#[test]
fn a_detached_start_that_fails_says_why() {
    let busy = std::net::TcpListener::bind("[::]:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = cli(
        free_udp_port(),
        &[
            "--mode",
            "release",
            "--http-port",
            &port,
            "--https-port",
            &free_tcp_port().to_string(),
            "--dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains(&format!("cannot bind TCP port {port} (--http-port)")),
        "{stderr}"
    );
    // The reason is in the log file too.
    let log = std::fs::read_to_string(dir.path().join("logs/core.log")).unwrap();
    assert!(log.contains("cannot bind TCP port"), "{log}");
}
