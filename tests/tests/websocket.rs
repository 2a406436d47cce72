//! HTTP/1.1 Upgrade passes through: a real WebSocket client talks to a real WebSocket server.

use core_server_tests::CoreServer;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket server that echoes every message; its port.
async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        break;
                    }
                    ws.send(message).await.unwrap();
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_echo_through_the_proxy() {
    let server = CoreServer::start();
    server.add("ws.example", echo_server().await);

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
