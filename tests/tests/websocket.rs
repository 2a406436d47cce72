//! HTTP/1.1 Upgrade passes through: a real WebSocket client talks to a real WebSocket server.

use core_server_tests::backend::{
    check_websocket_echo, third_websocket_waits_for_a_place, websocket_echo,
};
use core_server_tests::CoreServer;
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

/// An open WebSocket holds its client's place under `--max-connections` for as long as it is
/// open, as any client connection does.
#[tokio::test(flavor = "multi_thread")]
async fn open_websockets_count_against_max_connections() {
    let server = CoreServer::start_with(&["--max-connections", "2"]);
    server.add("ws.example", websocket_echo().await);
    third_websocket_waits_for_a_place(server.http_port, "ws://ws.example/").await;
}
