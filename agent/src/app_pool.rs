//! Connections to the app (`--to`) for requests without a body, the most common kind: HTTP/1.1
//! with hyper's client connection, kept open between requests, and driven by the task of the
//! stream that uses it (hyper's HTTP/2 server runs each stream in a task of its own).
//!
//! Why: hyper-util's pooled client, which `forward` keeps for requests with a body, runs each
//! app connection in a task of its own and hands it every request and every response through
//! channels; each of those hand-overs is a trip through the scheduler. Driven here, a request's
//! exchange with the app wakes no other task. Measured with `wrk` through a
//! tunnel on 2 cores (small GETs, 4 x 2 interleaved runs): the agent's CPU per request fell
//! 15.1-15.5 -> 14.3-14.5 us.
//!
//! What hyper-util's client did that this does too:
//! - keep-alive connections, the most recently used first, at most [`MAX_IDLE`] idle, each
//!   closed once unused for [`IDLE_TIMEOUT`] (looked for every [`SWEEP_EVERY`]);
//! - a connection the app closed while it was idle is not used again (seen when it is next
//!   taken: an idle connection is polled by no one), and a request that a connection closing
//!   just then hands back unsent goes again, on another;
//! - a connect timeout, and `TCP_NODELAY`.
//!
//! A request with a body is not taken: its upload must go on while the response is not read
//! (an app may answer before the body has ended), which needs a task of its own.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::connection::BoxError;

/// The most idle connections kept.
const MAX_IDLE: usize = 256;
/// How long an idle connection is kept (as the agent's hyper-util client keeps its own).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are looked at, to close those past their time.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// One connection to the app: its request handle and the connection itself, to drive.
struct AppConnection {
    send: SendRequest<Empty<Bytes>>,
    connection: Connection<TokioIo<TcpStream>, Empty<Bytes>>,
}

impl AppConnection {
    /// Whether it may carry a request: the app has not closed it, and its last exchange ended.
    fn usable(&mut self) -> bool {
        // Polled without a waker to register: it reads what came while it was idle. Outside
        // tokio's budget, or a task that looked at many might see a closed one as open.
        let ended = tokio::task::unconstrained(&mut self.connection).now_or_never();
        ended.is_none() && self.send.is_ready()
    }
}

type Idle = Vec<(AppConnection, Instant)>;

/// The idle connections to the app at one address.
pub(crate) struct AppPool {
    app: SocketAddr,
    connect_timeout: Duration,
    /// Oldest first.
    idle: Mutex<Idle>,
    sweeping: AtomicBool,
}

impl AppPool {
    pub fn new(app: SocketAddr, connect_timeout: Duration) -> Arc<AppPool> {
        Arc::new(AppPool {
            app,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        })
    }

    /// Sends `request` (no body) to the app and returns its response head; the body drives the
    /// connection, which goes back into the pool once the body has ended.
    pub async fn send(
        self: &Arc<Self>,
        mut request: Request<Empty<Bytes>>,
    ) -> Result<Response<AppBody>, BoxError> {
        loop {
            let (mut app, reused) = match self.take() {
                Some(app) => (app, true),
                None => (self.connect().await?, false),
            };
            let sent = app.send.try_send_request(request);
            match drive(app, sent).await {
                Ok((response, app)) => {
                    let pool = self.clone();
                    let driving = app.map(|app| Driving { app, pool });
                    let mut response = response.map(|body| AppBody { body, driving });
                    // Without a body (HEAD, 204, 304 ...), it is never read.
                    response.body_mut().give_back_if_ended(false);
                    return Ok(response);
                }
                // Closing as it was taken: the request goes again, on another.
                Err(DriveError::Sent(mut e)) if reused && e.message().is_some() => {
                    request = e.take_message().expect("checked above");
                }
                Err(DriveError::Sent(e)) => return Err(e.into_error().into()),
                Err(DriveError::Closed(e)) => return Err(e),
            }
        }
    }

    /// The most recently used idle connection still usable; those looked at meanwhile that are
    /// not, go.
    fn take(&self) -> Option<AppConnection> {
        loop {
            // Looked at outside the lock: that reads from the connection.
            let (mut app, since) = self.idle().pop()?;
            if since.elapsed() < IDLE_TIMEOUT && app.usable() {
                return Some(app);
            }
        }
    }

    fn give_back(self: &Arc<Self>, app: AppConnection) {
        let gone = {
            let mut idle = self.idle();
            let mut gone = expired(&mut idle);
            if idle.len() == MAX_IDLE {
                gone.push(idle.remove(0));
            }
            idle.push((app, Instant::now()));
            gone
        };
        // Closed outside the lock.
        drop(gone);
        if !self.sweeping.swap(true, Ordering::Relaxed) {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(sweep(Arc::downgrade(self)))),
                // A body read outside tokio: the next give-back tries again.
                Err(_) => self.sweeping.store(false, Ordering::Relaxed),
            }
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn connect(&self) -> Result<AppConnection, BoxError> {
        let app = self.app;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(app))
            .await
            .map_err(|_| format!("connecting to {app} took over {:?}", self.connect_timeout))??;
        let _ = stream.set_nodelay(true);
        let (send, connection) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(AppConnection { send, connection })
    }
}

/// Takes out of `idle` those unused for [`IDLE_TIMEOUT`] (at its front: oldest first).
fn expired(idle: &mut Idle) -> Idle {
    let expired = idle
        .iter()
        .take_while(|(_, since)| since.elapsed() >= IDLE_TIMEOUT)
        .count();
    idle.drain(..expired).collect()
}

/// Closes the pool's connections past their time every [`SWEEP_EVERY`], for as long as the
/// pool lives (started with its first idle connection: the pool is made before the runtime).
async fn sweep(pool: Weak<AppPool>) {
    let mut ticks = tokio::time::interval(SWEEP_EVERY);
    loop {
        ticks.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let gone = expired(&mut pool.idle());
        drop(gone);
    }
}

enum DriveError {
    /// What hyper said of the request: it may hand the request back unsent.
    Sent(Box<TrySendError<Request<Empty<Bytes>>>>),
    Closed(BoxError),
}

/// Drives `app` until `sent` has its response head; returns it with the connection, unless the
/// connection has ended meanwhile.
async fn drive(
    mut app: AppConnection,
    sent: impl Future<Output = Result<Response<Incoming>, TrySendError<Request<Empty<Bytes>>>>>,
) -> Result<(Response<Incoming>, Option<AppConnection>), DriveError> {
    tokio::pin!(sent);
    let sent_error = |e| DriveError::Sent(Box::new(e));
    let ended = tokio::select! {
        biased;
        response = sent.as_mut() => return response.map(|r| (r, Some(app))).map_err(sent_error),
        ended = &mut app.connection => ended,
    };
    // Dropped, the connection answers a request it has not sent by handing it back.
    drop(app);
    // Outside tokio's budget, as in `usable`: spent, it would hide the answer.
    match tokio::task::unconstrained(sent).now_or_never() {
        Some(response) => response.map(|r| (r, None)).map_err(sent_error),
        None => Err(DriveError::Closed(match ended {
            Ok(()) => "the app closed the connection before answering".into(),
            Err(e) => e.into(),
        })),
    }
}

/// A connection whose response body is being read, and the pool it goes back to.
struct Driving {
    app: AppConnection,
    pool: Arc<AppPool>,
}

/// The body of an app's response: hyper's, and for a pooled connection, the connection, driven
/// as the body is read and put back into the pool once it has ended. Dropped before its end,
/// it closes the connection.
pub struct AppBody {
    body: Incoming,
    driving: Option<Driving>,
}

impl AppBody {
    /// Once the body has ended (`read_to_end`: its last frame was just read), its connection
    /// goes back into the pool, where it is taken again only if usable. hyper's HTTP/2 server
    /// stops reading a body of known length as soon as it says it has ended, and a chunked one
    /// after its last frame or trailers.
    fn give_back_if_ended(&mut self, read_to_end: bool) {
        if read_to_end || self.body.is_end_stream() {
            if let Some(Driving { app, pool }) = self.driving.take() {
                pool.give_back(app);
            }
        }
    }

    /// A body whose connection is driven elsewhere (hyper-util's client, an upgrade).
    pub(crate) fn driven_elsewhere(body: Incoming) -> AppBody {
        AppBody {
            body,
            driving: None,
        }
    }
}

impl Body for AppBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(driving) = &mut this.driving {
            // It reads the body into `body`; ended early, `body` says how.
            if Pin::new(&mut driving.app.connection).poll(cx).is_ready() {
                this.driving = None;
            }
        }
        let frame = std::task::ready!(Pin::new(&mut this.body).poll_frame(cx));
        let last = match &frame {
            None => true,
            Some(Ok(frame)) => frame.is_trailers(),
            Some(Err(_)) => false,
        };
        this.give_back_if_ended(last);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

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
    async fn get(pool: &Arc<AppPool>) -> String {
        let request = Request::get("/").body(Empty::new()).unwrap();
        let mut body = pool.send(request).await.unwrap().into_body();
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
                assert_eq!(pool.idle().len(), 1, "idle connections");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1, "connections opened");
        }
    }

    #[tokio::test]
    async fn connections_the_app_closed_while_idle_are_not_taken() {
        // 200: more than tokio's cooperative budget lets one task read in a row (128).
        let (address, accepted, close) = app(OK).await;
        let pool = AppPool::new(address, Duration::from_secs(5));
        let (go, ready) = watch::channel(false);
        let requests: Vec<_> = (0..200)
            .map(|_| {
                let (pool, mut ready) = (pool.clone(), ready.clone());
                // Each holds its connection until all have one: 200 at once.
                tokio::spawn(async move {
                    let request = Request::get("/").body(Empty::new()).unwrap();
                    let mut body = pool.send(request).await.unwrap().into_body();
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
        assert_eq!(pool.idle().len(), 200, "idle connections");
        close.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(pool.take().is_none(), "a closed connection was taken");
        assert_eq!(get(&pool).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 201, "connections opened");
    }

    #[tokio::test]
    async fn a_request_a_closed_connection_hands_back_goes_again() {
        let (address, accepted, close) = app(OK).await;
        let pool = AppPool::new(address, Duration::from_secs(5));
        assert_eq!(get(&pool).await, "ok");
        let mut app = pool.take().expect("an idle connection");
        close.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // As if `usable` had looked just before the app closed it.
        let request = Request::get("/").body(Empty::new()).unwrap();
        let sent = app.send.try_send_request(request);
        match drive(app, sent).await {
            Err(DriveError::Sent(e)) => assert!(e.message().is_some(), "sent: {e:?}"),
            Err(DriveError::Closed(e)) => panic!("not handed back: {e}"),
            Ok(_) => panic!("answered on a closed connection"),
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }
}
