//! UDP commands are for this machine only: a datagram from another host's address is dropped
//! unread and unanswered. The other host is real: a network namespace and a veth link.

use std::net::UdpSocket;
use std::time::Duration;

use core_server_tests::http::get;
use core_server_tests::netns::{TestHost, INSIDE, OUTSIDE};
use core_server_tests::{have_root, CoreServer};

#[tokio::test(flavor = "multi_thread")]
async fn commands_from_another_host_are_dropped_unanswered() {
    if !have_root("commands_from_another_host_are_dropped_unanswered") {
        return;
    }
    let host = TestHost::create();
    let server = CoreServer::start_in_netns(&host.name);

    // From outside the namespace: a real non-loopback source address.
    let remote = UdpSocket::bind((OUTSIDE, 0)).unwrap();
    remote
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    remote
        .send_to(b"add remote.example 9", (INSIDE, server.udp_port))
        .unwrap();
    let mut buf = [0u8; 256];
    assert!(
        remote.recv_from(&mut buf).is_err(),
        "no reply to a remote sender"
    );

    // It arrived and was dropped (the worker says so at debug level) ...
    let dropped = format!("dropped a datagram from {OUTSIDE}");
    server
        .wait_logged_async(&dropped, Duration::from_secs(5))
        .await;
    // ... and changed nothing: HTTP over the same link finds no such route.
    let url = format!("http://{INSIDE}:{}/", server.http_port);
    assert_eq!(get(&url, "remote.example").await.status, 404);

    // The same command from the namespace's own loopback is applied.
    assert_eq!(server.udp("add remote.example 9"), "ok");
    assert_eq!(
        get(&url, "remote.example").await.status,
        502,
        "routed now (to a port nobody serves)"
    );
}
