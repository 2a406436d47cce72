//! Connections to apps on local ports (HTTP/1.1 to `127.0.0.1:<port>`), kept open between
//! requests, and driven by the task of the request that uses them.
//!
//! hyper-util's pooled client, which this replaces, runs each backend connection in a task of
//! its own, hands it every request through a channel and the response back through another,
//! and spawns one more task per request to put the connection back once it is ready: four task
//! wake-ups per request besides the work. Here the task serving the client polls the backend
//! connection itself: while it waits for the response head ([`BackendPool::send`]) and while it
//! passes the response body on ([`Pooled::drive`], from `response_body`). When the body has
//! ended and the response is dropped, the connection goes back into the pool.
//!
//! One case needs a task of its own, as every exchange did under hyper-util: a backend that
//! answers before the upload has ended (an early 413, or a streaming echo). hyper reads a
//! response body only while it can write to the client, and a client that sends its whole body
//! before reading would then wait on an upload that waits on it. That connection is driven by a
//! task until the upload has ended (or the backend stops taking it for the backend timeout),
//! then goes back into the pool if it is idle.
//!
//! What hyper-util's client did that this does too (tested in `tests`, but for the resend,
//! whose moment cannot be chosen from outside):
//! - keep-alive connections per backend port, the most recently used first, at most
//!   [`MAX_IDLE_PER_BACKEND`] idle ones (of each kind: those hyper drives, and the plain ones
//!   below; a port's traffic mostly uses one), each closed after [`IDLE_TIMEOUT`] unused, or
//!   once the app has closed it: an idle connection is polled by no one, so that is seen when
//!   it is next taken or at the sweep every [`SWEEP_EVERY`] (hyper-util, a task per
//!   connection, saw it at once);
//! - a request that found its pooled connection closed by the app just then (hyper hands it
//!   back unsent) goes again on another connection, its body untouched;
//! - a connect timeout, and `TCP_NODELAY`.
//!
//! Requests relayed as bytes (see `http1_relay`) take plain TCP connections from a list of
//! their own, kept by the same rules, and used again only while the app has neither closed
//! them nor sent anything on them (see `core_server_proto::idle_connections`).

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use core_server_proto::app_exchange::AppConnections;
use core_server_proto::idle_connections::{first_quiet, quiet, IdleList};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use crate::proxy::BackendError;
use crate::request_body::{RequestBody, Upload};

/// How long an unused connection is kept (hyper-util's default, and more than nginx's
/// `keepalive_timeout` for upstreams, 60 s: apps usually close first, which is seen).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How many unused connections to one backend are kept; more are closed once their request is
/// done. nginx keeps as many as its `keepalive` says per worker process (its docs show 16 to
/// 32, with several workers); core-server is one process for all cores, and the benches give
/// nginx as many. Enough for a busy app to reuse connections under load: four HTTP/2
/// clients with all their streams open (`http_server`'s 128 each) ask for 512 at once, and
/// with fewer kept, each burst of answers closes the surplus and the next burst connects
/// again (a third of the requests, measured with h2load at 16 x 32 streams). Few enough that
/// a burst leaves no thousands of idle sockets on either side; and should the worker run out
/// of file descriptors, they are the first to go ([`BackendPool::close_idle`]).
pub const MAX_IDLE_PER_BACKEND: usize = 512;

/// How often idle connections are looked at, to close those the app closed or that expired.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// How many pooled connections one request may find closed before it gives up on reuse: after
/// that, it goes on a new connection.
const STALE_TRIES: usize = 3;

type Driver = http1::Connection<TokioIo<TcpStream>, RequestBody>;

/// Idle connections by backend port.
type IdleLists<C> = Mutex<HashMap<u16, IdleList<C>>>;

/// The connections to every backend port.
pub struct BackendPool {
    idle: IdleLists<Connection>,
    /// Connections that requests are relayed on as bytes.
    raw: IdleLists<TcpStream>,
    /// `backend_timeout`: for connecting, and for an upload the backend stops taking.
    timeout: Duration,
    /// Idle connections [`Self::close_idle`] has closed so far, whoever asked.
    closed_idle: AtomicUsize,
}

/// One HTTP/1.1 connection to a backend: the handle requests go through, and the future that
/// does the connection's reading and writing, polled by whoever holds it.
struct Connection {
    sender: http1::SendRequest<RequestBody>,
    /// `None` once it has returned: the connection is closed, and what waited on it has been
    /// told (dropping the driver fails the requests it had not answered).
    driver: Option<Pin<Box<Driver>>>,
}

impl Connection {
    /// Does the connection's pending reading and writing; whether it is closed.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    debug!("backend connection closed: {e}");
                }
                self.driver = None;
            }
        }
        self.driver.is_none()
    }

    fn closed(&self) -> bool {
        self.driver.is_none()
    }

    /// Whether the connection can take a request now (looking, with no one to wake later).
    fn ready_now(&mut self) -> bool {
        !self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// Waits until the connection can take a request; `false` if it closed instead.
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            if self.drive(cx) {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|ready| ready.is_ok())
        })
        .await
    }

    /// Runs `send` (a request on this connection) to its end, driving the connection meanwhile.
    async fn drive_while<T>(&mut self, mut send: Pin<&mut impl Future<Output = T>>) -> T {
        poll_fn(|cx| {
            self.drive(cx);
            send.as_mut().poll(cx)
        })
        .await
    }
}

impl BackendPool {
    /// A pool whose waits give up after `timeout`, and a task that looks at its idle
    /// connections every [`SWEEP_EVERY`] while the pool lives.
    pub fn new(timeout: Duration) -> Arc<Self> {
        let pool = Arc::new(BackendPool {
            idle: Mutex::new(HashMap::new()),
            raw: Mutex::new(HashMap::new()),
            timeout,
            closed_idle: AtomicUsize::new(0),
        });
        tokio::spawn(sweep(Arc::downgrade(&pool)));
        pool
    }

    /// Sends `request` (origin-form URI, `Host` set; its body being `upload`, if any) to the
    /// app on `127.0.0.1:<port>`: the response head, and the connection it came on, to drive
    /// and hold until the body ends.
    pub async fn send(
        self: &Arc<Self>,
        port: u16,
        mut request: Request<RequestBody>,
        upload: Option<&Upload>,
    ) -> Result<(Response<Incoming>, Pooled), BackendError> {
        let pooled = |connection| match upload {
            Some(upload) if !upload.is_ended() => self.finish_upload(port, connection, upload),
            _ => self.pooled(port, connection),
        };
        for _ in 0..STALE_TRIES {
            let Some((mut connection, _)) = take(&self.idle, port, Instant::now()) else {
                break;
            };
            if !connection.ready().await {
                continue;
            }
            let sent = pin!(connection.sender.try_send_request(request));
            match connection.drive_while(sent).await {
                Ok(response) => return Ok((response, pooled(connection))),
                Err(mut e) => match e.take_message() {
                    // Closed by the app as the request came: never written, so sent again.
                    Some(unsent) => request = unsent,
                    None => return Err(BackendError::Http(e.into_error())),
                },
            }
        }
        // Boxed: most requests find a connection in the pool, and futures are moved by copying.
        let mut connection = Box::pin(self.connect(port)).await?;
        let sent = pin!(connection.sender.send_request(request));
        let response = connection.drive_while(sent).await?;
        Ok((response, pooled(connection)))
    }

    fn pooled(self: &Arc<Self>, port: u16, connection: Connection) -> Pooled {
        Pooled {
            connection: Some(connection),
            port,
            pool: self.clone(),
        }
    }

    /// Drives `connection` in a task of its own until `upload` has been sent, then keeps it if
    /// it is idle; the response body reads what that task receives. A backend that takes no
    /// byte of the upload for the timeout loses the connection (the client's stalls end the
    /// body itself).
    fn finish_upload(
        self: &Arc<Self>,
        port: u16,
        mut connection: Connection,
        upload: &Upload,
    ) -> Pooled {
        let (pool, upload, timeout) = (self.clone(), upload.clone(), self.timeout);
        tokio::spawn(async move {
            loop {
                let check_at = upload
                    .backend_stalled_at(timeout)
                    .unwrap_or_else(|| Instant::now() + timeout);
                tokio::select! {
                    ready = connection.ready() => {
                        if ready {
                            pool.put(port, connection);
                        }
                        return;
                    }
                    () = tokio::time::sleep_until(check_at) => {
                        if upload.backend_stalled_at(timeout).is_some_and(|at| at <= Instant::now()) {
                            debug!("backend on port {port} took no byte of an upload for {timeout:?}: closing");
                            return;
                        }
                    }
                }
            }
        });
        Pooled {
            connection: None,
            port,
            pool: self.clone(),
        }
    }

    /// The most recently used idle connection to `port` for a request relayed as bytes, if
    /// one is still open and quiet: peeked at, unless it was in use moments ago and tokio has
    /// seen nothing come on it since (see `core_server_proto::idle_connections`).
    pub fn take_raw(&self, port: u16) -> Option<TcpStream> {
        first_quiet(|now| take(&self.raw, port, now))
    }

    /// A new connection to the app on `port`, for a request relayed as bytes.
    pub async fn connect_raw(&self, port: u16) -> Result<TcpStream, BackendError> {
        // Boxed: most requests find a connection in the pool, and futures are moved by copying.
        Box::pin(self.connect_tcp(port)).await
    }

    /// Keeps `stream`, done with a relayed exchange, for the next one to `port`, if there is
    /// room.
    pub fn put_raw(&self, port: u16, stream: TcpStream) {
        keep(&self.raw, port, stream);
    }

    async fn connect(&self, port: u16) -> Result<Connection, BackendError> {
        let stream = self.connect_tcp(port).await?;
        let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
        Ok(Connection {
            sender,
            driver: Some(Box::pin(driver)),
        })
    }

    async fn connect_tcp(&self, port: u16) -> Result<TcpStream, BackendError> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let connect = || tokio::time::timeout(self.timeout, TcpStream::connect(address));
        let mut connected = connect().await;
        if matches!(&connected, Ok(Err(e)) if out_of_descriptors(e)) {
            self.close_idle();
            connected = connect().await;
        }
        let stream = match connected {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(BackendError::Connect(e)),
            Err(_) => {
                return Err(BackendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {:?}", self.timeout),
                )))
            }
        };
        stream.set_nodelay(true).map_err(BackendError::Connect)?;
        Ok(stream)
    }

    /// Closes every idle connection, to every app: the worker is out of file descriptors, and
    /// these are only a cache. How many it has closed so far in all, whoever asked: a request
    /// that found no descriptor to connect with may have closed them all just before the accept
    /// loop, out of descriptors at the same moment, asks and finds none.
    pub fn close_idle(&self) -> usize {
        fn close_all<C>(lists: &IdleLists<C>, closed: &AtomicUsize) {
            let mut lists = lists.lock().expect("pool lock");
            let count = lists.drain().map(|(_, list)| list.len()).sum();
            // Counted before the lock is let go: whoever takes it next and finds none left
            // counts them.
            closed.fetch_add(count, Ordering::Relaxed);
        }
        close_all(&self.idle, &self.closed_idle);
        close_all(&self.raw, &self.closed_idle);
        self.closed_idle.load(Ordering::Relaxed)
    }

    /// Keeps `connection` for the next request to `port`, if it is ready for one and there is
    /// room.
    fn put(&self, port: u16, mut connection: Connection) {
        if connection.ready_now() {
            keep(&self.idle, port, connection);
        }
    }

    /// Closes the idle connections that the app closed or that expired.
    fn sweep(&self) {
        sweep_lists(&self.idle, Connection::ready_now);
        sweep_lists(&self.raw, |stream| quiet(stream));
    }

    #[cfg(test)]
    fn idle_count(&self, port: u16) -> usize {
        let idle = self.idle.lock().expect("pool lock");
        idle.get(&port).map_or(0, IdleList::len)
    }
}

/// The most recently used idle connection to `port` in `lists` that has not expired by `now`,
/// and since when it has been idle.
fn take<C>(lists: &IdleLists<C>, port: u16, now: Instant) -> Option<(C, Instant)> {
    let mut lists = lists.lock().expect("pool lock");
    lists.get_mut(&port)?.take(now, IDLE_TIMEOUT)
}

/// Keeps `connection` in `lists` for the next request to `port`, if there is room.
fn keep<C>(lists: &IdleLists<C>, port: u16, connection: C) {
    let mut lists = lists.lock().expect("pool lock");
    let list = lists.entry(port).or_default();
    list.keep(connection, MAX_IDLE_PER_BACKEND);
}

/// Closes the connections in `lists` that expired or that are no longer `usable`.
fn sweep_lists<C>(lists: &IdleLists<C>, mut usable: impl FnMut(&mut C) -> bool) {
    let mut lists = lists.lock().expect("pool lock");
    lists.retain(|_, list| {
        list.sweep(IDLE_TIMEOUT, &mut usable);
        !list.is_empty()
    });
}

/// Whether `e` says the process (or the system) has no file descriptor left.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE)
    )
}

async fn sweep(pool: Weak<BackendPool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// The plain connections to the app on one port, for requests relayed as bytes (see
/// `app_exchange`): `P` is the pool, borrowed by the fast path's exchange, or held by the body
/// of a response that outlives it (see `relayed_body`).
pub struct PortConnections<P> {
    pub pool: P,
    pub port: u16,
}

impl<P: Deref<Target = BackendPool> + Sync> AppConnections for PortConnections<P> {
    type Error = BackendError;

    fn take(&self) -> Option<TcpStream> {
        self.pool.take_raw(self.port)
    }

    fn connect(&self) -> impl Future<Output = Result<TcpStream, BackendError>> + Send {
        self.pool.connect_raw(self.port)
    }

    fn put(&self, stream: TcpStream) {
        self.pool.put_raw(self.port, stream);
    }
}

/// A backend connection while its response body is passed on: driven by the body's reader
/// ([`Pooled::drive`]), back into the pool when dropped after the body ended.
pub struct Pooled {
    connection: Option<Connection>,
    port: u16,
    pool: Arc<BackendPool>,
}

impl Pooled {
    /// Does the connection's pending reading (the body) and writing (an upload still going).
    pub fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(connection) = &mut self.connection {
            connection.drive(cx);
        }
    }

    /// Done with the response: `complete`, its body ended, and the connection goes back into
    /// the pool once it is ready (at once, unless an upload is still going); else it closes,
    /// as HTTP/1.1 cannot abandon a response midway.
    pub fn release(&mut self, complete: bool, finish_within: Duration) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if !complete || connection.closed() {
            return;
        }
        if connection.ready_now() {
            return self.pool.put(self.port, connection);
        }
        let (pool, port) = (self.pool.clone(), self.port);
        tokio::spawn(async move {
            if let Ok(true) = tokio::time::timeout(finish_within, connection.ready()).await {
                pool.put(port, connection);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    //! The pool between a front (hyper's HTTP/1.1 server, its service sending each request on
    //! as the proxy does) and an app on a loopback port: hyper's server, or a raw one where the
    //! test needs bytes hyper would not send.

    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use crate::proxy::Upstream;
    use crate::response_body::{Holding, ResponseBody};
    use crate::tunnel_forward::tests::{http1, text, Client, Frames};

    const TIMEOUT: Duration = Duration::from_secs(10);
    /// How long a test waits for what should come at once.
    const PROMPT: Duration = Duration::from_secs(5);

    /// An app on a loopback port, each connection handed to `serve` in a task of its own: the
    /// port, and how many connections it accepted.
    async fn listen<F, Fut>(serve: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream));
            }
        });
        (port, accepted)
    }

    /// An app served by hyper, answering with `answer`.
    async fn hyper_app<F, Fut>(answer: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        listen(move |stream| {
            let answer = answer.clone();
            async move {
                let service = service_fn(move |request| {
                    let response = answer(request);
                    async move { Ok::<_, hyper::Error>(response.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await
    }

    /// An app answering each request with its body's length after `delay`; it says
    /// `Connection: close` on the answer to a request with `x-last`.
    async fn app(delay: Duration) -> (u16, Arc<AtomicUsize>) {
        hyper_app(move |request: Request<Incoming>| async move {
            tokio::time::sleep(delay).await;
            let last = request.headers().contains_key("x-last");
            let length = request
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .len();
            let mut response = Response::new(Full::new(Bytes::from(length.to_string())));
            if last {
                let close = http::HeaderValue::from_static("close");
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, close);
            }
            response
        })
        .await
    }

    /// Reads from `stream` into `buffer` until it holds `at_least` bytes; `false` at its end.
    async fn read_into(stream: &mut TcpStream, buffer: &mut Vec<u8>, at_least: usize) -> bool {
        while buffer.len() < at_least {
            let mut chunk = [0; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        true
    }

    /// The next request head from `stream` (lowercased), taken out of `buffer`; `None` at its
    /// end.
    async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<String> {
        loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buffer[..at + 4]).to_lowercase();
                buffer.drain(..at + 4);
                return Some(head);
            }
            let wanted = buffer.len() + 1;
            if !read_into(stream, buffer, wanted).await {
                return None;
            }
        }
    }

    #[tokio::test]
    async fn an_idle_connection_the_app_sent_on_is_not_taken_even_by_a_task_out_of_budget() {
        let pool = BackendPool::new(TIMEOUT);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let backend = pool.connect_raw(port).await.unwrap();
        let (mut app, _) = listener.accept().await.unwrap();
        pool.put_raw(port, backend);
        // Sent right after its answer (taken well within READINESS_TRUSTED_FOR, by when tokio
        // has heard of it).
        app.write_all(b"stray").await.unwrap();
        // Another socket with bytes waiting, for a task to use its budget up on.
        let busy = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let (mut busy_app, _) = listener.accept().await.unwrap();
        busy_app.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;

        let taken = poll_fn(|cx| {
            // Ready until the budget is used up; then tokio says "not ready" to this task.
            while busy.poll_read_ready(cx).is_ready() {}
            Poll::Ready(pool.take_raw(port))
        })
        .await;
        assert!(taken.is_none(), "the stray bytes would be the next answer");
    }

    /// A front sending every request to the app on `port` through `pool`.
    async fn front(pool: Arc<BackendPool>, port: u16) -> Client {
        http1(move |request: Request<Incoming>| {
            let pool = pool.clone();
            async move {
                let (parts, body) = request.into_parts();
                let (body, upload) = RequestBody::new(Some(body), TIMEOUT);
                let request = Request::from_parts(parts, body);
                let sent = pool.send(port, request, upload.as_ref()).await;
                let (mut response, connection) = sent.unwrap();
                // The app's `Connection: close` is about its connection, not the client's.
                crate::forwarding::remove_hop_by_hop(response.headers_mut());
                let upstream = Upstream::Port(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
                response.map(|body| {
                    ResponseBody::new(body, TIMEOUT, upstream)
                        .holding(Some(Holding::Connection(connection)))
                })
            }
        })
        .await
    }

    /// `request` through `client`: the response, within [`PROMPT`].
    async fn send(client: &mut Client, request: Request<ClientBody>) -> Response<Incoming> {
        client.ready().await.unwrap();
        let response = tokio::time::timeout(PROMPT, client.send_request(request));
        response.await.expect("no response head").unwrap()
    }

    type ClientBody = crate::tunnel_forward::tests::ClientBody;

    fn get(method: &str, path: &str) -> Request<ClientBody> {
        let request = Request::builder().method(method).uri(path);
        let body = Full::new(Bytes::new()).boxed();
        request.header("host", "a").body(body).unwrap()
    }

    /// A request whose body the test sends piece by piece (`length` bytes in all, if known).
    fn streamed(
        path: &str,
        length: Option<usize>,
    ) -> (Request<ClientBody>, mpsc::Sender<Frame<Bytes>>) {
        let (pieces, body) = mpsc::channel(1);
        let mut request = Request::post(path).header("host", "a");
        if let Some(length) = length {
            request = request.header("content-length", length);
        }
        (request.body(Frames(body).boxed()).unwrap(), pieces)
    }

    async fn post(client: &mut Client, body: &'static str, last: bool) -> String {
        let mut request = Request::post("/").header("host", "app.example");
        if last {
            request = request.header("x-last", "1");
        }
        let request = request.body(Full::new(Bytes::from(body)).boxed()).unwrap();
        text(send(client, request).await.into_body()).await
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_until_the_app_closes_it() {
        let (port, accepted) = app(Duration::ZERO).await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        for body in ["a", "bb", "ccc"] {
            assert_eq!(post(&mut client, body, false).await, body.len().to_string());
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(port), 1);

        // Closed by the app after its answer: not kept, the next request on a new one.
        assert_eq!(post(&mut client, "dddd", true).await, "4");
        assert_eq!(pool.idle_count(port), 0);
        assert_eq!(post(&mut client, "e", false).await, "1");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_not_used_and_the_sweep_drops_it() {
        // An app that answers one request per connection with keep-alive, then closes it
        // without saying so (as an app whose own idle timeout ran out).
        let (port, accepted) = listen(|mut stream| async move {
            if read_head(&mut stream, &mut Vec::new()).await.is_some() {
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(answer).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        assert_eq!(post(&mut client, "", false).await, "ok");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let kept = pool.idle_count(port);
        assert_eq!(kept, 1, "kept: nobody has looked at it yet");

        assert_eq!(post(&mut client, "", false).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        tokio::time::sleep(Duration::from_millis(300)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(port), 0);
    }

    #[tokio::test]
    async fn at_most_the_cap_of_idle_connections_are_kept() {
        // Each request in flight for a while, so that each needs a connection of its own.
        let (port, accepted) = app(Duration::from_millis(500)).await;
        let pool = BackendPool::new(TIMEOUT);
        let mut requests = tokio::task::JoinSet::new();
        for _ in 0..MAX_IDLE_PER_BACKEND + 4 {
            let mut client = front(pool.clone(), port).await;
            requests.spawn(async move { post(&mut client, "x", false).await });
        }
        while let Some(answer) = requests.join_next().await {
            assert_eq!(answer.unwrap(), "1");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), MAX_IDLE_PER_BACKEND + 4);
        assert_eq!(pool.idle_count(port), MAX_IDLE_PER_BACKEND);
    }

    #[tokio::test]
    async fn an_early_answer_lets_the_upload_finish_and_the_connection_serves_the_next_request_right(
    ) {
        // Requests in order on each connection: `/early` is answered 413 at once, before its
        // body is read (then read and dropped); any other with its body's length.
        let (port, accepted) = listen(|mut stream| async move {
            let mut buffer = Vec::new();
            while let Some(head) = read_head(&mut stream, &mut buffer).await {
                let early = head.starts_with("post /early");
                let length: usize = (head.lines())
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if early {
                    let answer = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig";
                    stream.write_all(answer).await.unwrap();
                }
                if !read_into(&mut stream, &mut buffer, length).await {
                    return;
                }
                buffer.drain(..length);
                if !early {
                    let body = length.to_string();
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                }
            }
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        let (request, pieces) = streamed("/early", Some(10));
        client.ready().await.unwrap();
        let response = client.send_request(request);
        pieces
            .send(Frame::data(Bytes::from_static(b"12345")))
            .await
            .unwrap();
        let response = tokio::time::timeout(PROMPT, response)
            .await
            .expect("head")
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(text(response.into_body()).await, "big");

        tokio::time::sleep(Duration::from_millis(200)).await;
        pieces
            .send(Frame::data(Bytes::from_static(b"67890")))
            .await
            .unwrap();
        drop(pieces);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut other = front(pool.clone(), port).await;
        assert_eq!(post(&mut other, "abc", false).await, "3");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "reused once the upload ended"
        );
        assert_eq!(post(&mut client, "abcd", false).await, "4");
    }

    #[tokio::test]
    async fn connections_come_back_after_head_204_and_304() {
        let (port, accepted) = hyper_app(|request: Request<Incoming>| async move {
            let (status, body) = match request.uri().path() {
                "/204" => (StatusCode::NO_CONTENT, ""),
                "/304" => (StatusCode::NOT_MODIFIED, ""),
                _ => (StatusCode::OK, "hello"),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        let exchanges = [
            ("HEAD", "/", ""),
            ("GET", "/204", ""),
            ("GET", "/304", ""),
            ("GET", "/", "hello"),
            ("HEAD", "/", ""),
        ];
        for (method, path, expected) in exchanges {
            let response = send(&mut client, get(method, path)).await;
            assert_eq!(
                text(response.into_body()).await,
                expected,
                "{method} {path}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            assert_eq!(
                pool.idle_count(port),
                1,
                "{method} {path}: back in the pool"
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_comes_back_after_a_response_with_trailers() {
        let (port, accepted) = listen(|mut stream| async move {
            let mut buffer = Vec::new();
            while read_head(&mut stream, &mut buffer).await.is_some() {
                let answer =
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
                    3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n";
                stream.write_all(answer).await.unwrap();
            }
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        for _ in 0..3 {
            let mut request = get("GET", "/");
            let te = http::HeaderValue::from_static("trailers");
            request.headers_mut().insert(http::header::TE, te);
            let answer = send(&mut client, request).await.into_body().collect().await;
            let answer = answer.unwrap();
            assert_eq!(answer.trailers().and_then(|t| t.get("x-t")).unwrap(), "1");
            assert_eq!(answer.to_bytes(), "abc");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused after trailers");
    }

    #[tokio::test]
    async fn a_client_gone_mid_response_closes_its_connection_and_the_next_request_is_answered_right(
    ) {
        let (port, accepted) = hyper_app(|request: Request<Incoming>| async move {
            let body = match request.uri().path() {
                "/big" => Bytes::from(vec![b'x'; 4 << 20]),
                _ => Bytes::from_static(b"small"),
            };
            Response::new(Full::new(body))
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        {
            let mut client = front(pool.clone(), port).await;
            let mut response = send(&mut client, get("GET", "/big")).await;
            let _ = response.body_mut().frame().await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut client = front(pool.clone(), port).await;
        for _ in 0..3 {
            let response = send(&mut client, get("GET", "/small")).await;
            assert_eq!(text(response.into_body()).await, "small");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the cut one closed, then one"
        );
    }

    #[tokio::test]
    async fn a_full_duplex_echo_streams_both_ways_and_its_connection_is_reused() {
        let (port, accepted) = listen(|stream| async move {
            let service = service_fn(|request: Request<Incoming>| async move {
                Ok::<_, hyper::Error>(Response::new(request.into_body()))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        for _ in 0..2 {
            let (request, pieces) = streamed("/", None);
            client.ready().await.unwrap();
            let response = client.send_request(request);
            pieces
                .send(Frame::data(Bytes::from_static(b"a")))
                .await
                .unwrap();
            let mut response = tokio::time::timeout(PROMPT, response)
                .await
                .unwrap()
                .unwrap();
            // Each piece comes back before the next is sent.
            for piece in [b"a", b"b", b"c"] {
                let echoed = tokio::time::timeout(PROMPT, response.body_mut().frame()).await;
                let echoed = echoed
                    .expect("no echo")
                    .unwrap()
                    .unwrap()
                    .into_data()
                    .unwrap();
                assert_eq!(echoed, &piece[..]);
                if piece != b"c" {
                    let next = [piece[0] + 1];
                    pieces
                        .send(Frame::data(Bytes::copy_from_slice(&next)))
                        .await
                        .unwrap();
                }
            }
            drop(pieces);
            assert_eq!(text(response.into_body()).await, "");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_response_head_before_a_slow_upload_then_its_body_after_it() {
        let (port, _) = listen(|mut stream| async move {
            let mut buffer = Vec::new();
            if read_head(&mut stream, &mut buffer).await.is_none() {
                return;
            }
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            stream.write_all(head).await.unwrap();
            if read_into(&mut stream, &mut buffer, 30).await {
                stream.write_all(b"5\r\nhello\r\n0\r\n\r\n").await.unwrap();
                let _ = stream.read(&mut [0; 16]).await;
            }
        })
        .await;
        let pool = BackendPool::new(TIMEOUT);
        let mut client = front(pool.clone(), port).await;
        let (request, pieces) = streamed("/", Some(30));
        client.ready().await.unwrap();
        let response = client.send_request(request);
        let uploading = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let piece = Frame::data(Bytes::from_static(b"0123456789"));
                pieces.send(piece).await.unwrap();
            }
        });
        let response = tokio::time::timeout(PROMPT, response)
            .await
            .expect("head")
            .unwrap();
        let body = tokio::time::timeout(PROMPT, text(response.into_body())).await;
        assert_eq!(body.expect("no body"), "hello");
        uploading.await.unwrap();
    }

    /// An app that streams a big response at once while it reads the upload; a client that
    /// reads the response only after it has sent its whole body (each larger than the buffers
    /// between them): the upload must go on while nobody reads the response.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_big_early_answer_does_not_stop_the_upload_of_a_client_that_reads_later() {
        const UP: usize = 16 << 20;
        const DOWN: usize = 16 << 20;
        const PIECE: usize = 64 << 10;
        let (port, _) = listen(|mut stream| async move {
            // The answer starts once the request's head is in, as an app's would: bytes before
            // any request are a broken app, which hyper's client rightly refuses.
            read_head(&mut stream, &mut Vec::new()).await;
            let (mut from, mut to) = stream.into_split();
            tokio::spawn(async move {
                let mut buffer = vec![0; PIECE];
                while from.read(&mut buffer).await.unwrap_or(0) > 0 {}
            });
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {DOWN}\r\n\r\n");
            to.write_all(head.as_bytes()).await.unwrap();
            for _ in 0..DOWN / PIECE {
                if to.write_all(&[b'x'; PIECE]).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        })
        .await;
        let pool = BackendPool::new(Duration::from_secs(60));
        let mut client = front(pool.clone(), port).await;
        let (request, pieces) = streamed("/", Some(UP));
        client.ready().await.unwrap();
        let response = tokio::spawn(client.send_request(request));
        let piece = Bytes::from(vec![b'u'; PIECE]);
        for i in 0..UP / PIECE {
            let sent = tokio::time::timeout(TIMEOUT, pieces.send(Frame::data(piece.clone())));
            assert!(
                sent.await.is_ok(),
                "the upload stopped after {} KiB",
                i * 64
            );
        }
        drop(pieces);
        let mut body = response.await.unwrap().unwrap().into_body();
        let mut got = 0;
        while let Some(frame) = tokio::time::timeout(TIMEOUT, body.frame())
            .await
            .expect("stopped")
        {
            got += frame.unwrap().data_ref().map_or(0, |d| d.len());
        }
        assert_eq!(got, DOWN);
    }
}
