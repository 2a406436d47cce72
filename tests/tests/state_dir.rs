//! The state directory (`--dir`): no link in it is ever followed, a directory others control
//! is refused as root, nothing set aside is overwritten, what a kill left is cleaned up; and
//! a UDP reply says truthfully whether a change was saved.
//!
//! Each planted link points at a file outside the directory holding "precious": whatever
//! core-server does, that file must stay as it was.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use core_server_tests::http::get;
use core_server_tests::server::{binaries, children_named, free_tcp_port, free_udp_port};
use core_server_tests::{have_root, CoreServer};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const PRECIOUS: &str = "precious";

/// A file outside any state directory, holding [`PRECIOUS`].
fn precious_file(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    let path = tmp.path().join(name);
    std::fs::write(&path, PRECIOUS).unwrap();
    path
}

fn assert_untouched(path: &Path) {
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        PRECIOUS,
        "{} was written through a link",
        path.display()
    );
}

/// A state directory as an operator makes one: mode 0700, owned by us.
fn state_dir(tmp: &tempfile::TempDir) -> PathBuf {
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

/// Runs core-server on free ports with `--dir dir` and `args`, expecting it to refuse to start:
/// its stderr. Panics if it is still running after a while (it started).
fn refused_start(dir: &Path, args: &[&str]) -> String {
    let stderr_path = dir.with_extension("stderr");
    let mut child = Command::new(binaries().join("core-server"))
        .args(["--http-port", &free_tcp_port().to_string()])
        .args(["--https-port", &free_tcp_port().to_string()])
        .args(["--udp-port", &free_udp_port().to_string()])
        .arg("--dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let workers = children_named(child.id(), "core-server-wor");
            let _ = child.kill();
            let _ = child.wait();
            for worker in workers {
                let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
            }
            panic!(
                "core-server started with --dir {} {args:?}:\n{}",
                dir.display(),
                std::fs::read_to_string(&stderr_path).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success(), "{stderr}");
    stderr
}

const RELEASE: &[&str] = &["--mode", "release", "--foreground"];

#[test]
fn a_link_at_the_temp_name_of_the_routes_file_is_not_written_through() {
    let server = CoreServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let target = precious_file(&tmp, "target");
    // The name older versions used: predictable from the supervisor's pid.
    let planted = server
        .dir
        .join(format!(".routes.json.tmp-{}", server.pid()));
    symlink(&target, &planted).unwrap();

    server.add("a.example", 8080);
    assert_untouched(&target);
    let saved = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
    assert!(saved.contains("a.example"), "{saved}");
    let meta = std::fs::symlink_metadata(server.dir.join("routes.json")).unwrap();
    assert!(meta.is_file(), "routes.json is a file of its own");
}

#[test]
fn a_link_at_the_routes_file_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = state_dir(&tmp);
    let target = precious_file(&tmp, "target");
    symlink(&target, dir.join("routes.json")).unwrap();

    let stderr = refused_start(&dir, &[]);
    assert!(
        stderr.contains(&format!(
            "{}/routes.json is a symbolic link, and core-server never follows one",
            dir.display()
        )),
        "{stderr}"
    );
    assert_untouched(&target);
    assert!(std::fs::symlink_metadata(dir.join("routes.json"))
        .unwrap()
        .is_symlink());
}

#[test]
fn a_link_at_the_log_file_or_the_logs_directory_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = state_dir(&tmp);
    let target = precious_file(&tmp, "target");
    std::fs::create_dir(dir.join("logs")).unwrap();
    symlink(&target, dir.join("logs/core.log")).unwrap();
    let stderr = refused_start(&dir, RELEASE);
    assert!(
        stderr.contains(&format!(
            "cannot open the log file {0}/logs/core.log: {0}/logs/core.log is a symbolic link",
            dir.display()
        )),
        "{stderr}"
    );
    assert_untouched(&target);

    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(dir.join("logs")).unwrap();
    symlink(&elsewhere, dir.join("logs")).unwrap();
    let stderr = refused_start(&dir, RELEASE);
    assert!(
        stderr.contains(&format!("{}/logs is a symbolic link", dir.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn links_at_the_rotated_log_names_are_never_written_through() {
    let mut server = CoreServer::start_with(&[RELEASE, &["--log-cap", "50000"]].concat());
    server.stop();
    let tmp = tempfile::tempdir().unwrap();
    let logs = server.dir.join("logs");
    let targets: Vec<_> = (1..10)
        .map(|n| {
            let target = precious_file(&tmp, &format!("target.{n}"));
            let _ = std::fs::remove_file(logs.join(format!("core.log.{n}")));
            symlink(&target, logs.join(format!("core.log.{n}"))).unwrap();
            target
        })
        .collect();
    server.launch();

    // Every 404 is a debug line from the worker: enough to rotate through all the names.
    let url = server.url("/");
    for _ in 0..1500 {
        assert_eq!(get(&url, "nobody-here.example").await.status, 404);
    }
    server.stop();
    for target in &targets {
        assert_untouched(target);
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        assert!(meta.is_file(), "{:?} is a link still", entry.file_name());
        names.push(entry.file_name().into_string().unwrap());
    }
    assert_eq!(names.len(), 10, "rotated through every name: {names:?}");
}

#[test]
fn as_root_a_directory_others_own_or_may_write_is_refused() {
    if !have_root("as_root_a_directory_others_own_or_may_write_is_refused") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = state_dir(&tmp);
    let display = dir.display();

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let stderr = refused_start(&dir, &[]);
    assert!(
        stderr.contains(&format!(
            "refusing {display}: group or others may write to it (mode 770)"
        )),
        "{stderr}"
    );

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let stderr = refused_start(&dir, &[]);
    assert!(
        stderr.contains(&format!("refusing {display}: it is owned by uid 65534")),
        "{stderr}"
    );

    // What core-server keeps inside it, too.
    std::os::unix::fs::chown(&dir, Some(0), Some(0)).unwrap();
    std::fs::create_dir(dir.join("logs")).unwrap();
    std::fs::set_permissions(dir.join("logs"), std::fs::Permissions::from_mode(0o757)).unwrap();
    let stderr = refused_start(&dir, RELEASE);
    assert!(
        stderr.contains(&format!(
            "refusing {display}/logs: group or others may write to it (mode 757)"
        )),
        "{stderr}"
    );
    std::fs::write(dir.join("routes.json"), "{\"version\":1,\"routes\":{}}").unwrap();
    std::os::unix::fs::chown(dir.join("routes.json"), Some(65534), None).unwrap();
    let stderr = refused_start(&dir, &[]);
    assert!(
        stderr.contains(&format!(
            "refusing {display}/routes.json: it is owned by uid 65534"
        )),
        "{stderr}"
    );
}

#[test]
fn as_root_without_dir_the_state_goes_to_var_lib_core_server() {
    if !have_root("as_root_without_dir_the_state_goes_to_var_lib_core_server") {
        return;
    }
    // In a mount namespace of its own with an empty /var/lib, so the host's stays untouched.
    let udp_port = free_udp_port().to_string();
    let script = format!(
        "mount -t tmpfs tmpfs /var/lib && exec {} --http-port {} --https-port {} --udp-port {}",
        binaries().join("core-server").display(),
        free_tcp_port(),
        free_tcp_port(),
        udp_port
    );
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = Command::new(binaries().join("core-server"))
            .args(["--udp-port", &udp_port, "status"])
            .output()
            .unwrap();
        let status = String::from_utf8_lossy(&status.stdout).into_owned();
        if status.contains("state") || Instant::now() > deadline {
            break status;
        }
        assert!(child.try_wait().unwrap().is_none(), "core-server exited");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mode = std::fs::metadata(format!("/proc/{}/root/var/lib/core-server", child.id()))
        .map(|m| m.permissions().mode() & 0o7777);
    let workers = children_named(child.id(), "core-server-wor");
    let _ = child.kill();
    let _ = child.wait();
    for worker in workers {
        let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
    }
    assert!(
        status.contains("state        /var/lib/core-server\n"),
        "{status}"
    );
    assert_eq!(mode.unwrap(), 0o700);
}

#[test]
fn corrupt_files_set_aside_never_replace_earlier_ones() {
    let mut server = CoreServer::start();
    server.stop();
    // Names for every second the next start may take: each already holds a kept file.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for t in now..now + 60 {
        std::fs::write(
            server.dir.join(format!("routes.json.corrupt-{t}")),
            format!("kept {t}"),
        )
        .unwrap();
    }
    std::fs::write(server.dir.join("routes.json"), "{torn").unwrap();
    server.launch();
    server.stop();
    std::fs::write(server.dir.join("routes.json"), "{torn again").unwrap();
    server.launch();

    for t in now..now + 60 {
        let kept = server.dir.join(format!("routes.json.corrupt-{t}"));
        assert_eq!(std::fs::read_to_string(kept).unwrap(), format!("kept {t}"));
    }
    let mut aside: Vec<_> = std::fs::read_dir(&server.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("routes.json.corrupt-"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .filter(|content| !content.starts_with("kept "))
        .collect();
    aside.sort();
    assert_eq!(aside, ["{torn", "{torn again"]);
}

#[test]
fn a_temp_file_left_by_a_kill_is_removed_at_start() {
    let mut server = CoreServer::start();
    server.add("a.example", 8080);
    server.stop();
    // As a kill between creating the temp file and renaming it leaves them (old and new names).
    for name in [".routes.json.tmp-4242", ".routes.json.tmp-5f3a9c0e12d4b786"] {
        std::fs::write(server.dir.join(name), "{\"version\":1,\"rou").unwrap();
    }
    server.launch();
    let mut names: Vec<_> = std::fs::read_dir(&server.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["acme", "routes.json", "tls-ticket-key"]);
    assert!(
        server
            .log()
            .contains("removed .routes.json.tmp-4242, left by a save that was interrupted"),
        "{}",
        server.log()
    );
    assert_eq!(server.udp("add b.example 8081"), "ok");
}

/// The supervisor dies with a change reported to it and not yet answered: it may or may not
/// have saved it, and the reply says exactly that (not that it was not saved).
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_after_the_supervisor_died_says_the_outcome_is_unknown() {
    let server = CoreServer::start();
    let worker = server.worker_pid();
    server.signal(Signal::SIGSTOP);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    socket
        .send_to(b"add a.example 8080", ("127.0.0.1", server.udp_port))
        .unwrap();
    // The worker applies the change (then a.example answers 502, not 404), reports it at once
    // (into the socket's buffer), and holds the reply until the supervisor answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&server.url("/"), "a.example").await.status == 404 {
        assert!(Instant::now() < deadline, "the route never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.signal(Signal::SIGKILL);
    let mut buf = [0u8; 512];
    let reply = tokio::task::block_in_place(|| socket.recv(&mut buf)).map(|n| buf[..n].to_vec());
    let _ = kill(Pid::from_raw(worker as i32), Signal::SIGKILL);
    let reply = String::from_utf8(reply.expect("a reply")).unwrap();
    assert_eq!(
        reply,
        "error: route applied, but whether it was saved is unknown (the supervisor stopped \
         before saying); resending it is safe"
    );
}

/// A save that fails is reported as such; the route stays live, and saving it again once the
/// directory is writable again works.
#[test]
fn a_reply_after_a_failed_save_says_not_saved() {
    if !have_root("a_reply_after_a_failed_save_says_not_saved") {
        return;
    }
    let server = CoreServer::start();
    // Immutable: not even root may create the temp file in it.
    let chattr = |flag: &str| {
        Command::new("chattr")
            .arg(flag)
            .arg(&server.dir)
            .status()
            .expect("chattr is installed (e2fsprogs)")
            .success()
    };
    assert!(
        chattr("+i"),
        "the test directory's filesystem supports chattr +i"
    );
    let reply = server.udp("add a.example 8080");
    assert!(chattr("-i"));
    assert_eq!(
        reply,
        format!(
            "error: route applied but not saved: cannot save {}/routes.json: Operation not \
             permitted (os error 1)",
            server.dir.display()
        )
    );
    assert_eq!(server.udp("add a.example 8080"), "ok", "resending saves it");
    let saved = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
    assert!(saved.contains("a.example"), "{saved}");
}

/// Two instances (two UDP ports) on one directory would overwrite each other's routes: the
/// second is refused, and the first serves on untouched.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_on_the_same_directory_is_refused() {
    let server = CoreServer::start();
    server.add("first.example", 8080);
    let output = Command::new(binaries().join("core-server"))
        .args(["--http-port", &free_tcp_port().to_string()])
        .args(["--https-port", &free_tcp_port().to_string()])
        .args(["--udp-port", &free_udp_port().to_string()])
        .arg("--dir")
        .arg(&server.dir)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("another core-server (with another --udp-port) uses --dir"),
        "{stderr}"
    );
    assert_eq!(server.udp("add second.example 8081"), "ok");
    let saved = std::fs::read_to_string(server.dir.join("routes.json")).unwrap();
    assert!(
        saved.contains("first.example") && saved.contains("second.example"),
        "{saved}"
    );
}
