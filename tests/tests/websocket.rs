//! HTTP/1.1 Upgrade passes through: a real WebSocket client talks to a real WebSocket server.

use std::time::Duration;

use core_server_tests::backend::{check_websocket_echo, websocket_echo};
use core_server_tests::CoreServer;
use futures_util::StreamExt;
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_proxy() {
    let server = CoreServer::start();
    server.add("ws.example", websocket_echo().await);

    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    check_websocket_echo("ws://ws.example/chat", stream, 50).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upgrade_to_an_unknown_host_is_404() {
    let server = CoreServer::start();
    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let err = tokio_tungstenite::client_async("ws://nobody.example/", stream)
        .await
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 404),
        other => panic!("expected an HTTP 404, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn open_websockets_count_against_max_connections() {
    let server = CoreServer::start_with(&["--max-connections", "2"]);
    server.add("ws.example", websocket_echo().await);
    let connect = || TcpStream::connect(("127.0.0.1", server.http_port));

    let mut open = Vec::new();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::client_async("ws://ws.example/", connect().await.unwrap())
            .await
            .unwrap();
        open.push(ws);
    }
    // Two WebSockets open, the cap reached and no connection idle: a third client waits in the
    // kernel's queue...
    let third = tokio::spawn(check_websocket_echo(
        "ws://ws.example/",
        connect().await.unwrap(),
        3,
    ));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served at --max-connections 2"
    );
    // ...until one of them closes.
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a WebSocket closed")
        .unwrap();
}
