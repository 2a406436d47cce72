//! Apps for core-server to proxy to: real HTTP servers on loopback ports.

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A response body that an app writes piece by piece as the test sends them (server-sent
/// events, a long poll), and what tells the test that the app's request has ended: it
/// resolves once the body is dropped.
pub fn watched_stream() -> (mpsc::Sender<Bytes>, oneshot::Receiver<()>, Body) {
    let (pieces, received) = mpsc::channel(1);
    let (alive, ended) = oneshot::channel::<()>();
    let frames = futures_util::stream::unfold((received, alive), |(mut received, alive)| async {
        let piece = received.recv().await?;
        Some((Ok(Frame::data(piece)), (received, alive)))
    });
    (pieces, ended, StreamBody::new(frames).boxed())
}

/// An HTTP server on 127.0.0.1; stops when dropped.
pub struct Backend {
    pub port: u16,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Serves every request with `handler` (HTTP/1.1 and HTTP/2, keep-alive).
    pub async fn start<F, Fut>(handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        Self::start_at(std::net::Ipv4Addr::LOCALHOST.into(), handler).await
    }

    /// [`Backend::start`] listening on `ip` (an address of a test's veth link, say) instead of
    /// loopback.
    pub async fn start_at<F, Fut>(ip: std::net::IpAddr, handler: F) -> Backend
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let counter = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler(request).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend {
            port,
            connections,
            task,
        }
    }

    /// Answers with what it received: the request line, then one `name: value` line a header.
    pub async fn echo() -> Backend {
        Backend::start(|request| async move { Response::new(full(describe(&request))) }).await
    }

    /// Answers after `delay`.
    pub async fn slow(delay: Duration) -> Backend {
        Backend::start(move |_| async move {
            tokio::time::sleep(delay).await;
            Response::new(full("finally"))
        })
        .await
    }

    /// How many TCP connections it accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /path HTTP/1.1` then `name: value` lines.
pub fn describe<B>(request: &Request<B>) -> String {
    let mut text = format!(
        "{} {} {:?}\n",
        request.method(),
        request.uri(),
        request.version()
    );
    for (name, value) in request.headers() {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text
}

/// A WebSocket server on loopback that echoes every message until the client closes; its
/// port.
pub async fn websocket_echo() -> u16 {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
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

/// A WebSocket client's round trip to a [`websocket_echo`] behind core-server: the handshake
/// on `stream` for `url` (`ws://` or `wss://`, its host the routed name) gets 101, then `texts`
/// text messages and one 1 MiB binary message each come back, each within 30 s.
pub async fn check_websocket_echo<S>(url: &str, stream: S, texts: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream)
        .await
        .expect("WebSocket handshake through core-server");
    assert_eq!(response.status(), 101);
    let mut echoed = async |sent: Message| {
        ws.send(sent.clone()).await.unwrap();
        let back = tokio::time::timeout(std::time::Duration::from_secs(30), ws.next())
            .await
            .expect("an echo within 30s");
        assert_eq!(back.unwrap().unwrap(), sent);
    };
    for i in 0..texts {
        echoed(Message::text(format!("hello {i}"))).await;
    }
    echoed(Message::binary(vec![7u8; 1 << 20])).await;
    ws.close(None).await.unwrap();
}

/// With `--max-connections 2` on the server at `port`: two WebSockets open for `url` (a
/// [`websocket_echo`] behind it) fill the cap, neither idle, so a third client waits in the
/// kernel's queue until one of them closes; then it is served.
pub async fn third_websocket_waits_for_a_place(port: u16, url: &str) {
    use futures_util::StreamExt;
    use std::time::Duration;
    let connect = || tokio::net::TcpStream::connect(("127.0.0.1", port));
    let mut open = Vec::new();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::client_async(url, connect().await.unwrap())
            .await
            .unwrap();
        open.push(ws);
    }
    let (url, stream) = (url.to_owned(), connect().await.unwrap());
    let third = tokio::spawn(async move { check_websocket_echo(&url, stream, 1).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served at --max-connections 2"
    );
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    while first.next().await.is_some() {}
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("served once a WebSocket closed")
        .unwrap();
}

/// Answers every request with `text`: which of several backends served a request.
pub async fn saying(text: &'static str) -> Backend {
    Backend::start(move |_| async move { Response::new(full(text)) }).await
}
