//! Routes survive restarts: a clean stop, a crash of everything, and a corrupt state file.

use core_server_tests::http::get;
use core_server_tests::{Backend, CoreServer};

#[tokio::test(flavor = "multi_thread")]
async fn routes_survive_a_clean_restart() {
    let mut server = CoreServer::start();
    let a = Backend::echo().await;
    let b = Backend::echo().await;
    server.add("a.example", b.port);
    server.add("a.example", a.port); // overwritten
    server.add("b.example", b.port);
    server.add("gone.example", b.port);
    assert_eq!(server.udp("remove gone.example"), "ok");

    assert!(
        server.stop().success(),
        "clean stop exits 0:\n{}",
        server.log()
    );
    server.launch();

    let reply = get(&server.url("/"), "a.example").await;
    assert_eq!(reply.status, 200);
    assert!(a.connections() > 0, "a.example goes to its last port");
    assert_eq!(get(&server.url("/"), "b.example").await.status, 200);
    assert_eq!(get(&server.url("/"), "gone.example").await.status, 404);
    assert!(server.log().contains("; 2 routes from"), "{}", server.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn ok_means_saved_even_if_everything_is_killed_right_after() {
    let mut server = CoreServer::start();
    let backend = Backend::echo().await;
    for i in 0..50 {
        server.add(&format!("app{i}.example"), backend.port);
    }
    // No clean stop: kill the supervisor and the worker the instant the last `ok` arrived.
    server.crash();

    server.launch();
    for i in 0..50 {
        assert_eq!(
            get(&server.url("/"), &format!("app{i}.example"))
                .await
                .status,
            200,
            "app{i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_state_file_is_reported_and_kept_aside() {
    let mut server = CoreServer::start();
    let backend = Backend::echo().await;
    server.add("before.example", backend.port);
    server.stop();

    let file = server.dir.join("routes.json");
    std::fs::write(
        &file,
        b"{\"version\": 1, \"routes\": {\"before.example\": 80",
    )
    .unwrap(); // torn by hand
    server.launch();

    let log = server.log();
    assert!(
        log.contains(&format!("routes file {} is corrupt", file.display())),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(&server.dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("routes.json.corrupt-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(
        std::fs::read_to_string(&aside[0])
            .unwrap()
            .contains("before.example"),
        "content kept"
    );

    // It serves, with an empty table, and saves new routes to a fresh file.
    assert_eq!(get(&server.url("/"), "before.example").await.status, 404);
    server.add("after.example", backend.port);
    assert_eq!(get(&server.url("/"), "after.example").await.status, 200);
    assert!(std::fs::read_to_string(&file)
        .unwrap()
        .contains("after.example"));
}
