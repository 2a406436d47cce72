//! HTTP/1.1 Upgrade passes through: a real WebSocket client talks to a real WebSocket server.

use core_server_tests::backend::websocket_echo;
use core_server_tests::CoreServer;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_proxy() {
    let server = CoreServer::start();
    server.add("ws.example", websocket_echo().await);

    let stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async("ws://ws.example/chat", stream)
        .await
        .expect("WebSocket handshake through core-server");
    assert_eq!(response.status(), 101);

    for i in 0..50 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("hello {i}"))
        );
    }
    let big = vec![7u8; 1 << 20];
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
    ws.close(None).await.unwrap();
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
