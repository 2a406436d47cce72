//! HTTP/1.1 served by core-server itself for the requests most traffic is made of: a head and
//! no body (`GET`, `HEAD`, a `DELETE` ...), no upgrade, no `Expect`. Everything else is handed
//! to hyper, with the bytes already read, and hyper serves the connection from there on: the
//! fast path only ever serves a connection's first requests, and never guesses.
//!
//! Why not hyper for these too: its HTTP/1 connection keeps an 8 KiB read buffer and an 8 KiB
//! write buffer for as long as the connection lives, idle or not (nginx frees its buffers while
//! a keep-alive connection waits), and its dispatcher, header-timer and service plumbing cost
//! more CPU per request than the proxying itself. Here an idle connection holds no buffer: it
//! waits for readability, then reads into a 4 KiB buffer that goes once the head is parsed.
//!
//! What the fast path does that hyper's server did (and that it must keep doing):
//! - parse with `httparse` (hyper's own parser); anything it cannot parse, or a head not whole
//!   within [`MAX_HEAD`] bytes, goes to hyper, which answers it;
//! - bound the wait for a head by `--header-timeout`, from the accept or from the end of the
//!   previous response (so idle keep-alive connections close), and by `--idle-timeout`;
//! - close after a response when the client asked (`Connection: close`), when the worker is
//!   stopping or the connection was evicted (the response then says `Connection: close`), or
//!   when the response's body broke off (the client must see it cut short);
//! - count each request in flight on the connection's [`Activity`] until its response is
//!   written, for the idle timeout, the connection limit and a draining worker;
//! - drop a request whose client closed the connection before its response came, or while
//!   more of its response's body is awaited;
//! - frame responses as hyper would (see `http1_response`), pipelined requests included.
//!
//! Who answers is the [`Answer`]'s choice: a request for an app on a local port is relayed to
//! it as bytes ([`Answer::relay_target`], see `http1_relay`); any other (a tunnel, an error
//! page, a redirect to HTTPS) is built into a request for the proxy, whose response is written
//! here.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Response};
use hyper::body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::activity::Activity;
use crate::client_stream::WATCH_AFTER;
use crate::http1_response::{self, ClientConnection, WriteError, Written};
use crate::proxy::ClientRequest;
use crate::request_head::{ForHyper, RequestHead, MAX_HEAD};

/// What a read asks for at least: most heads fit in one read of this.
const READ_SIZE: usize = 4096;

/// How long the fast path waits for a head, and what it tells [`Activity`].
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a write of a response may wait for the client to take a byte
    /// (`--backend-timeout`, as the other waits of an exchange).
    pub send_timeout: Duration,
    /// After how long a connection waiting for its next request, with nothing of it read, is
    /// given back as [`Served::Idle`] (see `parked_connections`); `None`: it waits here.
    pub park_after: Option<Duration>,
}

/// How [`serve`] let go of a connection.
pub enum Served<S> {
    /// It ended (closed by either side, timed out, evicted, or its response broke off).
    Ended,
    /// A request came that hyper is to serve: the stream, with what was read of it.
    ToHyper(HandedOver<S>),
    /// It waited for its next request [`Limits::park_after`], with nothing read of it; it is
    /// to be closed at `close_at` if no request comes by then.
    Idle { stream: S, close_at: Instant },
}

/// What the fast path answers requests with.
pub trait Answer {
    type Body: Body<Data = Bytes>;
    /// Where a request relayed as bytes goes.
    type Target;

    /// Where `head` goes if it is to be relayed to its app as bytes (see `http1_relay`);
    /// `None`: it is answered by [`Answer::respond`].
    fn relay_target(&self, head: &RequestHead) -> Option<Self::Target>;

    /// Relays `head` to `target`, writing the answer to `client` as it comes: `None` if the
    /// client went away before the response.
    fn relay<'a, C: ClientConnection + Send>(
        &'a self,
        target: Self::Target,
        head: RequestHead,
        client: &'a mut C,
        closing: &'a Closing<'a>,
    ) -> impl Future<Output = Option<Result<Written, WriteError>>> + Send + 'a;

    /// The response to `request`, for the fast path to write.
    fn respond(&self, request: ClientRequest) -> impl Future<Output = Response<Self::Body>>;
}

/// A function from request to response answers every request itself (the tests' servers).
impl<F, Fut, B> Answer for F
where
    F: Fn(ClientRequest) -> Fut,
    Fut: Future<Output = Response<B>>,
    B: Body<Data = Bytes>,
{
    type Body = B;
    type Target = std::convert::Infallible;

    fn relay_target(&self, _: &RequestHead) -> Option<Self::Target> {
        None
    }

    fn relay<'a, C: ClientConnection + Send>(
        &'a self,
        _: Self::Target,
        _: RequestHead,
        _: &'a mut C,
        _: &'a Closing<'a>,
    ) -> impl Future<Output = Option<Result<Written, WriteError>>> + Send + 'a {
        std::future::pending() // never called: there is no target
    }

    fn respond(&self, request: ClientRequest) -> impl Future<Output = Response<B>> {
        self(request)
    }
}

/// Whether a response is to be its connection's last: the client asked, the worker is
/// stopping, or the connection was evicted. Looked at as the response's head is written.
pub struct Closing<'a> {
    asked: bool,
    stop: &'a CancellationToken,
    activity: &'a Activity,
}

impl Closing<'_> {
    /// Whether the response now being written is to be the last.
    pub fn now(&self) -> bool {
        self.asked || self.stop.is_cancelled() || self.activity.was_evicted()
    }
}

/// A stream whose readability can be awaited without a buffer, so a connection that waits for
/// its next request holds none.
pub trait WaitReadable {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;

    /// Whether the stream is in tokio's reactor: not yet for one that has never had to wait
    /// (see `client_stream`), whose first wait costs registering it.
    fn in_reactor(&self) -> bool {
        true
    }
}

impl WaitReadable for TcpStream {
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
}

impl WaitReadable for tokio_rustls::server::TlsStream<TcpStream> {
    /// At once if TLS holds decrypted bytes already.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let (tcp, tls) = self.get_ref();
        let wait = tls.wants_read();
        async move {
            if wait {
                tcp.readable().await?;
            }
            Ok(())
        }
    }
}

/// Serves requests on `stream` with `answer` until the connection ends, a request comes that
/// the fast path leaves to hyper, or it idles long enough to be parked (see [`Served`]).
/// Stopping, it is not parked: it waits here, and its next request is its last.
pub async fn serve<S, A>(
    mut stream: S,
    limits: &Limits,
    activity: &Arc<Activity>,
    stop: &CancellationToken,
    answer: A,
) -> Served<S>
where
    S: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send,
    A: Answer,
    <A::Body as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut buffer = BytesMut::new();
    // Parked no sooner than `park_after` from here: a connection back from being parked
    // waits in its task for the request that woke it (tokio hears of its readiness only at
    // its reactor's next turn; parked again at once, it would never be served).
    let served_from = Instant::now();
    let wait = limits.header_timeout.min(limits.idle_timeout);
    let deadline = tokio::time::sleep_until(activity.accepted_at() + wait);
    tokio::pin!(deadline);
    loop {
        // Boxed: the proxy's future and the response being written are the largest states of
        // a connection, and only a request in flight needs room for them; a connection waiting
        // for its next request stays small. The head goes into it before any wait, so it takes
        // no room in this future either (nor does the wait for more bytes, after this block).
        let written = {
            let exchange = match RequestHead::parse(&mut buffer) {
                Ok(Some(head)) => Some(Box::pin(exchange(
                    head,
                    Client {
                        stream: &mut stream,
                        buffer: &mut buffer,
                        send_timeout: limits.send_timeout,
                    },
                    &answer,
                    stop,
                    activity,
                ))),
                Ok(None) => None,
                Err(ForHyper) => return Served::ToHyper(HandedOver::new(stream, buffer.freeze())),
            };
            match exchange {
                Some(exchange) => {
                    let in_flight = activity.request_started();
                    let written = exchange.await;
                    drop(in_flight);
                    Some(written)
                }
                None => None,
            }
        };
        match written {
            Some(Some(Ok(Written::KeepAlive))) => {}
            Some(Some(Ok(Written::Close))) => {
                let _ = tokio::time::timeout(limits.header_timeout, stream.shutdown()).await;
                return Served::Ended;
            }
            Some(Some(Err(e))) => {
                debug!("an HTTP/1 response was not written whole: {e}");
                return Served::Ended;
            }
            Some(None) => {
                debug!("an HTTP/1 client went away before its response: request dropped");
                return Served::Ended;
            }
            None => {
                if activity.was_evicted() {
                    return Served::Ended;
                }
                // Counted from the accept, then from the end of each response.
                let idle_since = activity.idle_since().unwrap_or_else(Instant::now);
                let close_at = idle_since + wait;
                // Parked only between requests: a head begun is awaited here.
                let park_at = limits
                    .park_after
                    .filter(|_| buffer.is_empty() && !stop.is_cancelled())
                    .map(|after| idle_since.max(served_from) + after);
                let wake_at = park_at.map_or(close_at, |park_at| park_at.min(close_at));
                if deadline.deadline() != wake_at {
                    deadline.as_mut().reset(wake_at);
                }
                tokio::select! {
                    biased;
                    read = read_more(&mut stream, &mut buffer) => match read {
                        Ok(0) | Err(_) => return Served::Ended,
                        Ok(_) => continue,
                    },
                    () = activity.evicted() => {
                        debug!("an HTTP/1 connection closed to make room");
                        return Served::Ended;
                    }
                    () = &mut deadline => {
                        if park_at.is_some() && Instant::now() < close_at {
                            return Served::Idle { stream, close_at };
                        }
                        debug!("an HTTP/1 connection sent no request within {wait:?}: closing");
                        return Served::Ended;
                    }
                }
            }
        }
        if buffer.is_empty() {
            buffer = BytesMut::new(); // nothing pipelined: hold no memory while waiting
        }
    }
}

/// Answers `head` on `stream` with `answer`, marked as the connection's last as [`Closing`]
/// says; `None` if the client went away first (see [`client_gone`]). Not an `async fn`: that
/// would hold the head twice (as passed, and as the body's local), and this future is moved
/// into its box whole, once per request.
#[expect(
    clippy::manual_async_fn,
    reason = "an `async fn` holds its arguments twice"
)]
fn exchange<'a, S, A>(
    head: RequestHead,
    mut client: Client<'a, S>,
    answer: &'a A,
    stop: &'a CancellationToken,
    activity: &'a Activity,
) -> impl Future<Output = Option<Result<Written, WriteError>>> + 'a
where
    S: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send,
    A: Answer,
    <A::Body as Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    async move {
        let to_head = head.method() == Method::HEAD;
        let closing = Closing {
            asked: head.close(),
            stop,
            activity,
        };
        if let Some(target) = answer.relay_target(&head) {
            return answer.relay(target, head, &mut client, &closing).await;
        }
        let Some(request) = head.into_request() else {
            debug!("a request head that http refuses: connection closed");
            return Some(Ok(Written::Close));
        };
        let response = tokio::select! {
            biased;
            response = answer.respond(request) => response,
            () = client.gone() => return None,
        };
        Some(http1_response::write(&mut client, response, to_head, closing.now()).await)
    }
}

/// The client's connection while its response is written: the stream, and the buffer that
/// what it sends meanwhile (pipelined requests) goes into.
struct Client<'a, S> {
    stream: &'a mut S,
    buffer: &'a mut BytesMut,
    send_timeout: Duration,
}

impl<S> ClientConnection for Client<'_, S>
where
    S: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send,
{
    type Stream = S;

    fn stream(&mut self) -> &mut S {
        self.stream
    }

    fn gone(&mut self) -> impl Future<Output = ()> + Send + '_ {
        client_gone(self.stream, self.buffer)
    }

    fn send_timeout(&self) -> Duration {
        self.send_timeout
    }
}

/// Resolves once the client has closed its connection (or it failed), reading what it sends
/// meanwhile (pipelined requests) into `buffer`, up to [`MAX_HEAD`]. As hyper's server does
/// while a request is in flight, so that a client gone from a long poll ends its request at
/// the backend instead of leaving it open until the backend answers. A stream outside the
/// reactor is watched only after [`WATCH_AFTER`]: most requests are answered sooner, and
/// closed without the stream ever being registered.
async fn client_gone<S>(stream: &mut S, buffer: &mut BytesMut)
where
    S: AsyncRead + WaitReadable + Unpin,
{
    if !stream.in_reactor() {
        tokio::time::sleep(WATCH_AFTER).await;
    }
    while buffer.len() < MAX_HEAD {
        match read_more(stream, buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
    std::future::pending().await
}

/// Reads what `stream` has into `buffer`; waits for readability first when the buffer holds
/// no memory, so that a connection with nothing to read holds none either. A stream outside
/// the reactor is read at once instead: if its client has sent nothing yet, that read has
/// registered it, and the wait holds no buffer either.
async fn read_more<S>(stream: &mut S, buffer: &mut BytesMut) -> io::Result<usize>
where
    S: AsyncRead + WaitReadable + Unpin,
{
    if buffer.capacity() == 0 {
        if !stream.in_reactor() {
            buffer.reserve(READ_SIZE);
            let read = poll_fn(|cx| Poll::Ready(poll_read_buf(Pin::new(&mut *stream), cx, buffer)));
            match read.await {
                Poll::Ready(read) => return read,
                Poll::Pending => *buffer = BytesMut::new(),
            }
        }
        stream.readable().await?;
    }
    if buffer.capacity() - buffer.len() < READ_SIZE / 2 {
        buffer.reserve(READ_SIZE);
    }
    stream.read_buf(buffer).await
}

/// A stream handed to hyper, which reads first what was already read of it (by the fast path,
/// or by hyper's HTTP/1 connection before an upgrade).
pub struct HandedOver<S> {
    read: Bytes,
    stream: S,
}

impl<S> HandedOver<S> {
    /// `stream`, with nothing read of it yet.
    pub fn whole(stream: S) -> Self {
        Self::new(stream, Bytes::new())
    }

    /// `stream`, of which `read` was already read.
    pub fn new(stream: S, read: Bytes) -> Self {
        HandedOver { read, stream }
    }

    pub fn get_ref(&self) -> &S {
        &self.stream
    }

    /// What was read of the stream already.
    pub fn already_read(&self) -> &[u8] {
        &self.read
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HandedOver<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.stream).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HandedOver<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http::HeaderValue;
    use http_body_util::channel::{Channel, Sender};
    use http_body_util::{Either, Full};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use crate::connection_limit::ConnectionLimit;

    const PROMPT: Duration = Duration::from_secs(5);

    type TestBody = Either<Full<Bytes>, Channel<Bytes, io::Error>>;

    /// How long `/slow` takes to answer.
    const SLOW: Duration = Duration::from_millis(300);

    /// A connection served by the fast path, answering `"<method> <path>"` with a body of known
    /// length (`/slow` after [`SLOW`]), `/stream` with the body the test sends (see
    /// [`connection`]), and `/hang` never.
    struct Open {
        client: TcpStream,
        /// Told when a `/hang` request is dropped.
        abandoned: Arc<Notify>,
        activity: Arc<Activity>,
        stop: CancellationToken,
        served: tokio::task::JoinHandle<Served<TcpStream>>,
    }

    /// A connection with `header_timeout`, and the sender of its `/stream` body.
    async fn connection(header_timeout: Duration) -> (Open, Sender<Bytes, io::Error>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let activity = Activity::new(ConnectionLimit::new(16));
        let stop = CancellationToken::new();
        let (sender, body) = Channel::new(1);
        let streamed = std::sync::Mutex::new(Some(body));
        let abandoned = Arc::new(Notify::new());
        let (served_activity, served_stop) = (activity.clone(), stop.clone());
        let told = abandoned.clone();
        let served = tokio::spawn(async move {
            let limits = Limits {
                header_timeout,
                idle_timeout: Duration::from_secs(60),
                send_timeout: Duration::from_secs(60),
                park_after: None,
            };
            let respond = |request: ClientRequest| {
                let hang = (request.uri().path() == "/hang").then(|| Abandoned(told.clone()));
                let slow = request.uri().path() == "/slow";
                let body = match request.uri().path() {
                    "/stream" => Either::Right(streamed.lock().unwrap().take().unwrap()),
                    path => Either::Left(Full::from(format!("{} {path}", request.method()))),
                };
                async move {
                    if let Some(_abandoned) = hang {
                        std::future::pending::<()>().await;
                    }
                    if slow {
                        tokio::time::sleep(SLOW).await;
                    }
                    let mut response: Response<TestBody> = Response::new(body);
                    // As an app's answer to HEAD says how long the GET's body would be.
                    let length = HeaderValue::from(response.body().size_hint().lower());
                    response.headers_mut().insert("content-length", length);
                    response
                }
            };
            serve(server, &limits, &served_activity, &served_stop, respond).await
        });
        let served = Open {
            client,
            abandoned,
            activity,
            stop,
            served,
        };
        (served, sender)
    }

    /// A connection whose `/stream` response has begun: its head, then `first` as a chunk, read.
    async fn streaming(first: &str) -> (Open, Sender<Bytes, io::Error>) {
        let (mut served, mut body) = connection(PROMPT).await;
        served.send("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = answer("transfer-encoding: chunked\r\n", "");
        served.read(&head).await;
        body.send_data(Bytes::from(first.to_owned())).await.unwrap();
        let chunk = format!("{:x}\r\n{first}\r\n", first.len());
        assert_eq!(served.read(&chunk).await, chunk);
        (served, body)
    }

    /// Notifies its `Notify` when dropped.
    struct Abandoned(Arc<Notify>);

    impl Drop for Abandoned {
        fn drop(&mut self) {
            self.0.notify_one();
        }
    }

    impl Open {
        async fn send(&mut self, bytes: &str) {
            self.client.write_all(bytes.as_bytes()).await.unwrap();
        }

        /// Exactly `expected.len()` bytes, as text, with the `Date` value blanked.
        async fn read(&mut self, expected: &str) -> String {
            let mut got = vec![0; expected.len()];
            let read = tokio::time::timeout(PROMPT, self.client.read_exact(&mut got));
            read.await.expect("no answer").unwrap();
            without_date(&String::from_utf8(got).unwrap())
        }

        /// Whether the connection was closed (read returns 0) within [`PROMPT`].
        async fn closed(&mut self) -> bool {
            let mut byte = [0];
            let read = tokio::time::timeout(PROMPT, self.client.read(&mut byte));
            matches!(read.await, Ok(Ok(0)))
        }

        async fn handed_over(self) -> Option<HandedOver<TcpStream>> {
            let served = tokio::time::timeout(PROMPT, self.served).await.unwrap();
            match served.unwrap() {
                Served::ToHyper(stream) => Some(stream),
                Served::Ended => None,
                Served::Idle { .. } => panic!("parked, with no park_after"),
            }
        }
    }

    /// `text` with each `date:` value replaced by `D`.
    fn without_date(text: &str) -> String {
        let value = |text: &str| {
            let from = text.find("date: ")? + "date: ".len();
            Some((from, from + text[from..].find("\r\n")?))
        };
        match value(text) {
            Some((from, to)) => format!("{}D{}", &text[..from], without_date(&text[to..])),
            None => text.to_owned(),
        }
    }

    const DATE: &str = "Thu, 26 Nov 2026 04:00:00 GMT";

    fn answer(head: &str, body: &str) -> String {
        format!("HTTP/1.1 200 OK\r\n{head}date: {DATE}\r\n\r\n{body}")
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_framed_as_hyper_would() {
        let (mut served, _) = connection(PROMPT).await;
        served
            .send(
                "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
                 HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n\
                 DELETE /c HTTP/1.1\r\nHost: x\r\ncontent-length: 0\r\nConnection: keep-alive, close\r\n\r\n",
            )
            .await;
        let expected = [
            answer("content-length: 6\r\n", "GET /a"),
            // HEAD: the app's length, no body.
            answer("content-length: 7\r\n", ""),
            answer("content-length: 9\r\nconnection: close\r\n", "DELETE /c"),
        ];
        for expected in expected {
            assert_eq!(served.read(&expected).await, without_date(&expected));
        }
        assert!(served.closed().await);
        assert!(served.handed_over().await.is_none());
    }

    #[tokio::test]
    async fn a_body_that_comes_later_is_chunked_with_its_head_sent_at_once() {
        let (mut served, mut body) = connection(PROMPT).await;
        served.send("GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let head = answer("transfer-encoding: chunked\r\n", "");
        assert_eq!(served.read(&head).await, without_date(&head));
        body.send_data(Bytes::from("hello")).await.unwrap();
        assert_eq!(served.read("5\r\nhello\r\n").await, "5\r\nhello\r\n");
        drop(body);
        assert_eq!(served.read("0\r\n\r\n").await, "0\r\n\r\n");
        // The connection goes on.
        served.send("GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let next = answer("content-length: 9\r\n", "GET /next");
        assert_eq!(served.read(&next).await, without_date(&next));
    }

    #[tokio::test]
    async fn a_body_that_breaks_off_ends_the_connection_without_its_last_chunk() {
        let (mut served, body) = streaming("abc").await;
        body.abort(io::Error::other("the app went away"));
        assert!(
            served.closed().await,
            "the client must see the body cut short"
        );
    }

    #[tokio::test]
    async fn what_the_fast_path_does_not_serve_goes_to_hyper_with_every_byte() {
        // Still not whole at MAX_HEAD.
        let big = format!("GET / HTTP/1.1\r\nCookie: {}", "c".repeat(MAX_HEAD));
        let leftovers = [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n\r\n",
            "GET / HTTP/1.0\r\nHost: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n",
            "GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            "GET / HTTP/1.1\r\nno colon\r\n\r\n",
            // A path httparse takes and `http` does not (`<`, `>` and a backtick).
            "GET /a<b HTTP/1.1\r\nHost: x\r\n\r\n",
            &big,
        ];
        for leftover in leftovers {
            let (mut served, _) = connection(PROMPT).await;
            // A request the fast path serves first: hyper gets what follows it.
            served.send("GET /first HTTP/1.1\r\nHost: x\r\n\r\n").await;
            served.send(leftover).await;
            let first = answer("content-length: 10\r\n", "GET /first");
            served.read(&first).await;
            let mut stream = served.handed_over().await.expect("handed over");
            let mut got = vec![0; leftover.len()];
            stream.read_exact(&mut got).await.unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), leftover);
        }
    }

    #[tokio::test]
    async fn a_client_gone_before_its_response_ends_its_request_and_pipelined_ones_wait() {
        // Pipelined while the answer before it is awaited: kept, and answered after it.
        let (mut served, _) = connection(PROMPT).await;
        served.send("GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        tokio::time::sleep(SLOW / 2).await;
        served.send("GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
        for answered in [
            answer("content-length: 9\r\n", "GET /slow"),
            answer("content-length: 9\r\n", "GET /next"),
        ] {
            assert_eq!(served.read(&answered).await, without_date(&answered));
        }

        // Gone while its request waits for an answer: the request is dropped at once.
        let (mut served, _) = connection(PROMPT).await;
        served.send("GET /hang HTTP/1.1\r\nHost: x\r\n\r\n").await;
        served.client.shutdown().await.unwrap();
        let abandoned = served.abandoned.clone();
        let dropped = tokio::time::timeout(PROMPT, abandoned.notified());
        dropped.await.expect("the request outlived its client");
        assert!(served.handed_over().await.is_none());
    }

    #[tokio::test]
    async fn a_client_gone_while_its_body_is_awaited_ends_the_response() {
        let (mut served, mut body) = streaming("event").await;
        served.client.shutdown().await.unwrap();
        // The body is dropped (the backend's request with it) without waiting for more of it.
        let dropped = async { while body.send_data(Bytes::from("more")).await.is_ok() {} };
        tokio::time::timeout(PROMPT, dropped)
            .await
            .expect("the response outlived its client");
        assert!(served.handed_over().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_connection_closes_at_the_header_timeout_when_evicted_or_told_to_stop() {
        // The header timeout, counted from the end of the last response.
        let (mut served, _) = connection(Duration::from_millis(300)).await;
        served.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        served.read(&answer("content-length: 5\r\n", "GET /")).await;
        let asked = Instant::now();
        assert!(served.closed().await);
        assert!(asked.elapsed() >= Duration::from_millis(250));

        // Evicted while waiting: closed.
        let (mut served, _) = connection(PROMPT).await;
        served.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        served.read(&answer("content-length: 5\r\n", "GET /")).await;
        served.activity.evict();
        assert!(served.closed().await);

        // Stopping: the next request is answered, as the connection's last.
        let (mut served, _) = connection(PROMPT).await;
        served.stop.cancel();
        served.send("GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let last = answer("content-length: 5\r\nconnection: close\r\n", "GET /");
        assert_eq!(served.read(&last).await, without_date(&last));
        assert!(served.closed().await);
    }

    #[tokio::test]
    async fn a_connection_idle_past_park_after_is_given_back_and_then_served_when_it_sends() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let activity = Activity::new(ConnectionLimit::new(16));
        let stop = CancellationToken::new();
        let park_after = Duration::from_millis(100);
        let limits = Limits {
            header_timeout: PROMPT,
            idle_timeout: PROMPT,
            send_timeout: PROMPT,
            park_after: Some(park_after),
        };
        let answer = |request: ClientRequest| async move {
            Response::new(Full::<Bytes>::from(request.uri().path().to_owned()))
        };

        // Quiet: given back after `park_after`, to be closed at the header timeout.
        let Served::Idle { stream, close_at } =
            serve(server, &limits, &activity, &stop, answer).await
        else {
            panic!("an idle connection was not given back");
        };
        assert!(activity.accepted_at().elapsed() >= park_after);
        assert_eq!(close_at, activity.accepted_at() + PROMPT);

        // Out of tokio's reactor, as when parked, while the client sends; back in it well past
        // its time to be parked again: the request that woke it is answered first.
        let parked = stream.into_std().unwrap();
        client
            .write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(2 * park_after).await;
        let stream = TcpStream::from_std(parked).unwrap();
        let answered = async {
            let mut got = vec![0; 512];
            let read = tokio::time::timeout(PROMPT, client.read(&mut got)).await;
            let read = read.expect("no answer").unwrap();
            String::from_utf8_lossy(&got[..read]).into_owned()
        };
        let (served, answered) =
            tokio::join!(serve(stream, &limits, &activity, &stop, answer), answered);
        assert!(answered.starts_with("HTTP/1.1 200 OK\r\n"), "{answered}");
        assert!(answered.ends_with("\r\n\r\n/again"), "{answered}");
        let Served::Idle { stream, .. } = served else {
            panic!("not given back once quiet again");
        };

        // A head begun is waited for here, up to the header timeout: never given back.
        client.write_all(b"GET / HT").await.unwrap();
        let limits = Limits {
            header_timeout: Duration::from_millis(300),
            ..limits
        };
        assert!(matches!(
            serve(stream, &limits, &activity, &stop, answer).await,
            Served::Ended
        ));
    }
}
