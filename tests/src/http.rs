//! Small HTTP clients for tests: hyper for well-formed requests, raw TCP for everything else.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// Sends `request` over a new connection and reads the whole response.
pub async fn send(request: Request<Full<Bytes>>) -> Reply {
    let client = Client::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .expect("response within 30s")
        .expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("whole body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// `body` read whole, as the UTF-8 text it must be.
pub async fn text<B>(body: B) -> String
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = body.collect().await.expect("whole body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("a UTF-8 body")
}

/// `GET url` with `Host: host`.
pub async fn get(url: &str, host: &str) -> Reply {
    send(
        Request::get(url)
            .header("host", host)
            .body(Full::default())
            .unwrap(),
    )
    .await
}

/// An HTTP/1.1 connection to `127.0.0.1:port`: the request sender, and the task driving the
/// connection (it ends when the server closes it).
pub async fn http1_connect(
    port: u16,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    (sender, tokio::spawn(connection))
}

/// An HTTP/2 (prior knowledge) connection to `127.0.0.1:port`: the request sender, and the
/// task driving the connection (it ends when the server closes it).
pub async fn h2_connect(
    port: u16,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    tokio::task::JoinHandle<hyper::Result<()>>,
) {
    let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (sender, tokio::spawn(connection))
}

/// Writes `bytes` to `127.0.0.1:port` and reads until the server closes (or 10 s pass).
pub async fn raw(port: u16, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A raw connection to `server`'s HTTP port that has sent `request`.
pub async fn send_raw(server: &crate::CoreServer, request: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", server.http_port))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    stream
}

/// Reads from `stream` until the server closes it: what arrived, or `Err` with what arrived if
/// the connection is still open after `within`.
pub async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<String, String> {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    match closed {
        Ok(_) => Ok(text),
        Err(_) => Err(text),
    }
}
