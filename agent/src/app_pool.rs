//! Connections to the app (`--to`) for requests without a body, the most common kind: plain
//! TCP, kept open between requests, each request relayed on one as bytes by the exchange the
//! worker uses for its own apps (`core_server_proto::app_exchange`, `relayed_body`), in the
//! task of the HTTP/2 stream that carries it.
//!
//! Why: hyper's client, which `forward` keeps for requests with a body, hands every request
//! and response through channels to the connection (a task of its own under hyper-util), and
//! parses and encodes through `HeaderMap`s. Measured with `wrk` through a tunnel on 2 cores
//! (small GETs, 3 x 2 interleaved runs): the agent's CPU per request fell 14.3-14.4 -> 11.1-11.6
//! us against hyper's connection driven by the stream's task, and requests/s rose 9%.
//!
//! What hyper-util's client did that this does too:
//! - keep-alive connections, the most recently used first, at most [`MAX_IDLE`] idle, each
//!   closed once unused for [`IDLE_TIMEOUT`] (looked for every [`SWEEP_EVERY`]);
//! - a connection the app closed, or sent stray bytes on, while it was idle is not used again
//!   (see `idle_connections`), and an idempotent request that finds its connection closed just
//!   then goes again, on another (see `app_exchange`);
//! - a connect timeout, and `TCP_NODELAY`.
//!
//! A request with a body is not taken: its upload must go on while the response is not read
//! (an app may answer before the body has ended), which needs a task of its own.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::app_exchange::AppConnections;
use core_server_proto::idle_connections::{first_quiet, quiet, IdleList};
use core_server_proto::relayed_body::RelayedBody;
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::net::TcpStream;

use crate::connection::BoxError;

/// The most idle connections kept.
const MAX_IDLE: usize = 256;
/// How long an idle connection is kept (as the agent's hyper-util client keeps its own).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are looked at, to close those past their time or closed.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// The idle connections to the app at one address (a handle: clones share them).
#[derive(Clone)]
pub(crate) struct AppPool(Arc<Pool>);

struct Pool {
    app: SocketAddr,
    connect_timeout: Duration,
    idle: Mutex<IdleList<TcpStream>>,
    sweeping: AtomicBool,
}

impl AppPool {
    pub fn new(app: SocketAddr, connect_timeout: Duration) -> AppPool {
        AppPool(Arc::new(Pool {
            app,
            connect_timeout,
            idle: Mutex::default(),
            sweeping: AtomicBool::new(false),
        }))
    }
}

impl Pool {
    fn idle(&self) -> MutexGuard<'_, IdleList<TcpStream>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl AppConnections for AppPool {
    type Error = BoxError;

    fn take(&self) -> Option<TcpStream> {
        // Each looked at outside the lock: a peek is a system call.
        first_quiet(|now| self.0.idle().take(now, IDLE_TIMEOUT))
    }

    fn connect(&self) -> impl Future<Output = Result<TcpStream, BoxError>> + Send {
        let (app, timeout) = (self.0.app, self.0.connect_timeout);
        async move {
            let stream = tokio::time::timeout(timeout, TcpStream::connect(app))
                .await
                .map_err(|_| format!("connecting to {app} took over {timeout:?}"))??;
            stream.set_nodelay(true)?;
            Ok(stream)
        }
    }

    fn put(&self, stream: TcpStream) {
        let pool = &self.0;
        pool.idle().keep(stream, MAX_IDLE);
        if !pool.sweeping.swap(true, Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(sweep(Arc::downgrade(pool)))),
                // A body read outside tokio: the next give-back tries again.
                Err(_) => pool.sweeping.store(false, Ordering::Relaxed),
            }
        }
    }
}

/// Closes the pool's connections past their time, or closed by the app, every
/// [`SWEEP_EVERY`], for as long as the pool lives (started with its first idle connection: the
/// pool is made before the runtime).
async fn sweep(pool: Weak<Pool>) {
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        pool.idle().sweep(IDLE_TIMEOUT, |stream| quiet(stream));
    }
}

/// The body of an app's response: read from a pooled connection by the task of the stream
/// that carries it (a request without a body), or hyper's (one with a body, an upgrade).
pub struct AppBody(Either<RelayedBody<AppPool>, Incoming>);

impl AppBody {
    pub(crate) fn relayed(body: RelayedBody<AppPool>) -> AppBody {
        AppBody(Either::Left(body))
    }

    pub(crate) fn hyper(body: Incoming) -> AppBody {
        AppBody(Either::Right(body))
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use core_server_proto::relayed_body;
    use http::Request;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    use super::*;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const OK_CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";

    /// An app on loopback giving each request `answer`, keeping its connections open until
    /// `true` is sent on the returned channel (then closing those it has); counts the
    /// connections it accepted.
    async fn app(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (close, closing) = watch::channel(false);
        let counted = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                // Closed by a `true` sent after it was accepted.
                let mut closing = closing.clone();
                closing.borrow_and_update();
                tokio::spawn(async move {
                    let mut received = Vec::new();
                    let mut chunk = [0; 1024];
                    loop {
                        let head_end = loop {
                            if let Some(at) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            tokio::select! {
                                read = stream.read(&mut chunk) => match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => received.extend_from_slice(&chunk[..n]),
                                },
                                _ = closing.changed() => return,
                            }
                        };
                        received.drain(..head_end);
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (address, accepted, close)
    }

    /// A GET's body, read as hyper's HTTP/2 server reads it: until it says it has ended, or
    /// its last frame.
    async fn get(pool: &AppPool) -> String {
        let head = relayed_body::request_head(&Request::get("/").body(()).unwrap());
        let response = relayed_body::fetch(pool.clone(), &head, false, true).await;
        let mut body = response.unwrap().into_body();
        let mut text = Vec::new();
        while !body.is_end_stream() {
            let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
            let Some(frame) = frame else { break };
            text.extend_from_slice(frame.unwrap().data_ref().unwrap_or(&Bytes::new()));
        }
        String::from_utf8(text).unwrap()
    }

    #[tokio::test]
    async fn a_connection_whose_response_has_ended_carries_the_next_request() {
        // Delimited by its length (read until it says it has ended), or chunked (read to its
        // last frame).
        for answer in [OK, OK_CHUNKED] {
            let (address, accepted, _close) = app(answer).await;
            let pool = AppPool::new(address, Duration::from_secs(5));
            for _ in 0..3 {
                assert_eq!(get(&pool).await, "ok");
                assert_eq!(pool.0.idle().len(), 1, "idle connections");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "connections opened");
        }
    }

    #[tokio::test]
    async fn connections_the_app_closed_while_idle_are_not_taken() {
        let (address, accepted, close) = app(OK).await;
        let pool = AppPool::new(address, Duration::from_secs(5));
        let (go, ready) = watch::channel(false);
        let requests: Vec<_> = (0..200)
            .map(|_| {
                let (pool, mut ready) = (pool.clone(), ready.clone());
                // Each holds its connection until all have one: 200 at once.
                tokio::spawn(async move {
                    let head = relayed_body::request_head(&Request::get("/").body(()).unwrap());
                    let response = relayed_body::fetch(pool, &head, false, true).await;
                    let mut body = response.unwrap().into_body();
                    ready.wait_for(|go| *go).await.unwrap();
                    while !body.is_end_stream() {
                        std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
                    }
                })
            })
            .collect();
        while accepted.load(Ordering::SeqCst) < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        go.send(true).unwrap();
        for request in requests {
            request.await.unwrap();
        }
        assert_eq!(pool.0.idle().len(), 200, "idle connections");
        close.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.take().is_none(), "a closed connection was taken");
        assert_eq!(get(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 201, "connections opened");
    }
}
