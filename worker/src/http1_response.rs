//! Writing a response to an HTTP/1.1 client ourselves, for `http1_fast_path` (and, for
//! `http1_relay`, which writes the app's answer as it comes, the pieces of a head and the
//! [`Outgoing`] body writer): the status line and headers in one buffer, the body framed as
//! hyper's server would frame it, and the first piece of the body in the same `writev` as the
//! head when it is already there (most responses: one system call).
//!
//! Framing, as hyper's server (RFC 9112 §6): no body after a `HEAD` request or for 1xx, 204
//! and 304 (a `HEAD`'s and a 304's `Content-Length` describe the body a `GET` would get: the
//! app's passes through); a body of known length gets `Content-Length`; any other is chunked.
//! Trailers are not sent: the fast path only serves requests without `TE: trailers`, which
//! hyper would not send them to either. A `Date` is added when the app gave none.
//!
//! While it waits for more of a body, it watches the client ([`ClientConnection::gone`]): a
//! client gone from a long stream (server-sent events, a long poll) ends the response at once,
//! and with it the backend's request, as hyper's server does, rather than at the backend's next
//! write. A client still there that takes no byte of its response for
//! [`ClientConnection::send_timeout`] is given up on (nginx's `send_timeout`), and with it
//! the response: it would hold the app's connection (or a tunnel stream's window) forever.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use core_server_proto::app_exchange::{bodiless, push_field, start_head};
use core_server_proto::http1_body::{Body as Delimited, BodyError};
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::ext::ReasonPhrase;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::forwarding::lists;
use crate::proxy::describe;

/// What a written response leaves the connection fit for.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// The response went out whole and framed: the connection can carry the next request.
    KeepAlive,
    /// The response went out whole, marked `Connection: close`: the connection is to end.
    Close,
}

/// Why a response could not be written whole; the connection is to be dropped.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing to the client: {0}")]
    Client(#[from] io::Error),
    #[error("the response body broke off: {0}")]
    Body(String),
    #[error("the response body ended after {sent} of its {length} bytes")]
    Short { sent: u64, length: u64 },
    #[error("the client went away while the response body was awaited")]
    ClientGone,
}

impl From<BodyError> for WriteError {
    fn from(e: BodyError) -> Self {
        match e {
            BodyError::Short { sent, length } => WriteError::Short { sent, length },
            BodyError::Broken(why) => WriteError::Body(why),
        }
    }
}

/// How the client gets a body the app delimited as `body`: a length is passed on, anything
/// else is chunked (the client must be able to tell a whole body from a cut one).
pub fn framing(body: Delimited) -> Framing {
    match body {
        Delimited::None => Framing::None,
        Delimited::Length(length) => Framing::Length(length),
        Delimited::Chunked | Delimited::UntilClose => Framing::Chunked,
    }
}

/// The client's connection, as [`write`] needs it: written to, and watched while the body is
/// awaited.
pub trait ClientConnection {
    type Stream: AsyncWrite + Unpin + Send;
    /// What the response is written to.
    fn stream(&mut self) -> &mut Self::Stream;
    /// Resolves once the client has closed its connection (or it failed).
    fn gone(&mut self) -> impl Future<Output = ()> + Send + '_;
    /// How long a write may wait for the client to take a byte.
    fn send_timeout(&self) -> Duration;
}

/// How the body is framed on the wire.
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes `response` to `client`, the answer to a request that was a `HEAD` if `to_head`;
/// marked as the connection's last if `close` or if it says so itself.
pub async fn write<C, B>(
    client: &mut C,
    response: Response<B>,
    to_head: bool,
    close: bool,
) -> Result<Written, WriteError>
where
    C: ClientConnection,
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut parts, body) = response.into_parts();
    let status = parts.status;
    let framing = if bodiless(status, to_head) {
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            parts.headers.remove(header::CONTENT_LENGTH); // RFC 9110 §8.6: MUST NOT
        } else if to_head && !parts.headers.contains_key(header::CONTENT_LENGTH) {
            // As hyper: a HEAD answer says how long the GET's body would be, when known.
            if let Some(length) = body.size_hint().exact() {
                parts.headers.insert(header::CONTENT_LENGTH, length.into());
            }
        }
        Framing::None
    } else {
        // Ours replaces the app's: the body at hand is what gets framed.
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.remove(header::TRANSFER_ENCODING);
        match body.size_hint().exact() {
            Some(length) => Framing::Length(length),
            None => Framing::Chunked,
        }
    };
    // A switch of protocols (or another 1xx) the client did not ask for ends the connection,
    // as hyper does: what follows is no longer HTTP/1.1 requests.
    let close = close || status.is_informational() || asks_to_close(&parts.headers);
    let reason = parts.extensions.get::<ReasonPhrase>();
    let head = encode_head(status, reason, &parts.headers, &framing, close);
    let written = if close {
        Written::Close
    } else {
        Written::KeepAlive
    };
    if let Framing::None = framing {
        Outgoing::new(head, framing).end(client).await?; // the body is not read
        return Ok(written);
    }
    let mut body = pin!(body);
    let mut outgoing = Outgoing::new(head, framing);
    loop {
        let frame = if outgoing.head_sent() {
            tokio::select! {
                biased;
                frame = body.frame() => Poll::Ready(frame),
                () = client.gone() => return Err(WriteError::ClientGone),
            }
        } else {
            std::future::poll_fn(|cx| Poll::Ready(body.as_mut().poll_frame(cx))).await
        };
        match frame {
            Poll::Pending => outgoing.head_now(client).await?,
            Poll::Ready(None) => break,
            // Whatever was sent stays cut short: the client must not take it as whole.
            Poll::Ready(Some(Err(e))) => return Err(WriteError::Body(describe(&*e.into()))),
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers are not sent (see the module's comment).
                if let Ok(data) = frame.into_data() {
                    outgoing.piece(client, &data).await?;
                }
            }
        }
    }
    outgoing.end(client).await?;
    Ok(written)
}

/// A response on its way to the client, its head made: the head waits for the body's first
/// piece, to go out with it (most responses: one system call), or goes alone at once when the
/// body is late (a response whose body comes later, server-sent events, must not wait for it);
/// the body goes in its framing.
pub struct Outgoing {
    head: Option<Vec<u8>>,
    framing: Framing,
    sent: u64,
}

impl Outgoing {
    pub fn new(head: Vec<u8>, framing: Framing) -> Self {
        Outgoing {
            head: Some(head),
            framing,
            sent: 0,
        }
    }

    pub fn head_sent(&self) -> bool {
        self.head.is_none()
    }

    /// Writes `data`, the body's next piece, with the head if it has not gone yet; nothing
    /// of a response that has no body (to a `HEAD`, a 204 or a 304).
    pub async fn piece<C: ClientConnection>(
        &mut self,
        client: &mut C,
        data: &[u8],
    ) -> Result<(), WriteError> {
        if data.is_empty() || matches!(self.framing, Framing::None) {
            return Ok(());
        }
        self.sent += data.len() as u64;
        if let Framing::Length(length) = self.framing {
            if self.sent > length {
                return Err(WriteError::Body(format!(
                    "the body is longer than its {length} bytes"
                )));
            }
        }
        let head = self.head.take();
        let limit = client.send_timeout();
        write_piece(client.stream(), head.as_deref(), data, &self.framing, limit).await?;
        within(limit, client.stream().flush()).await?;
        Ok(())
    }

    /// Writes the head now if it has not gone yet: the body is late.
    pub async fn head_now<C: ClientConnection>(
        &mut self,
        client: &mut C,
    ) -> Result<(), WriteError> {
        if let Some(head) = self.head.take() {
            let limit = client.send_timeout();
            write_all(client.stream(), &mut [IoSlice::new(&head)], limit).await?;
            within(limit, client.stream().flush()).await?;
        }
        Ok(())
    }

    /// Ends the response: the last chunk, or the head if there was no body; an error if a body
    /// of known length came short.
    pub async fn end<C: ClientConnection>(self, client: &mut C) -> Result<(), WriteError> {
        let head = self.head.as_deref();
        let limit = client.send_timeout();
        match self.framing {
            Framing::Length(length) if self.sent < length => {
                return Err(WriteError::Short {
                    sent: self.sent,
                    length,
                })
            }
            Framing::Chunked => {
                write_piece(client.stream(), head, b"", &self.framing, limit).await?
            }
            _ => write_piece(client.stream(), head, b"", &Framing::None, limit).await?,
        }
        within(limit, client.stream().flush()).await?;
        Ok(())
    }
}

/// Writes `head` (unless already sent) and `data` in `framing`; with chunked framing, empty
/// `data` is the last chunk. Each write may wait `limit` for the client.
async fn write_piece<S>(
    stream: &mut S,
    head: Option<&[u8]>,
    data: &[u8],
    framing: &Framing,
    limit: Duration,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let head = head.unwrap_or_default();
    match framing {
        Framing::Chunked if data.is_empty() => {
            write_all(
                stream,
                &mut [IoSlice::new(head), IoSlice::new(b"0\r\n\r\n")],
                limit,
            )
            .await
        }
        Framing::Chunked => {
            let size = format!("{:x}\r\n", data.len());
            let pieces = [head, size.as_bytes(), data, b"\r\n"];
            write_all(stream, &mut pieces.map(IoSlice::new), limit).await
        }
        _ => write_all(stream, &mut [IoSlice::new(head), IoSlice::new(data)], limit).await,
    }
}

/// Writes all of `slices`, in as few system calls as the stream allows, each waiting at most
/// `limit` for the client.
async fn write_all<S>(
    stream: &mut S,
    mut slices: &mut [IoSlice<'_>],
    limit: Duration,
) -> io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = within(limit, stream.write_vectored(slices)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// `write` (to the client), unless it has waited `limit`: then an error. Most writes are
/// done at once, and start no timer.
async fn within<T>(limit: Duration, write: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    let mut write = pin!(write);
    if let Poll::Ready(done) = futures_util::poll!(write.as_mut()) {
        return done;
    }
    let waited = || {
        let why = format!("the client took none of its response for {limit:?}");
        io::Error::new(io::ErrorKind::TimedOut, why)
    };
    tokio::time::timeout(limit, write)
        .await
        .unwrap_or_else(|_| Err(waited()))
}

/// Whether `headers` carry `Connection: close` (an error page after a bad request does).
fn asks_to_close(headers: &HeaderMap) -> bool {
    lists(headers, header::CONNECTION, "close")
}

/// The status line (with the app's own reason phrase if it had one, as hyper's server writes
/// it), the headers, the framing's header, a `Date` unless given, and `Connection: close` if
/// `close` and not already said.
fn encode_head(
    status: StatusCode,
    reason: Option<&ReasonPhrase>,
    headers: &HeaderMap,
    framing: &Framing,
    close: bool,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(256);
    let reason = match reason {
        Some(reason) => reason.as_bytes(),
        // As hyper: a reason is always written, for the parsers that expect one.
        None => status.canonical_reason().unwrap_or("<none>").as_bytes(),
    };
    start_head(&mut head, status.as_str().as_bytes(), reason);
    for (name, value) in headers {
        push_field(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    let close = close && !asks_to_close(headers);
    end_head(
        &mut head,
        framing,
        close,
        !headers.contains_key(header::DATE),
    );
    head
}

/// Ends a response head: the framing's header, `Connection: close` if `close`, a `Date` if
/// `date`, and the blank line.
pub fn end_head(head: &mut Vec<u8>, framing: &Framing, close: bool, date: bool) {
    match framing {
        Framing::None => {}
        Framing::Length(length) => push_field(
            head,
            b"content-length",
            itoa::Buffer::new().format(*length).as_bytes(),
        ),
        Framing::Chunked => push_field(head, b"transfer-encoding", b"chunked"),
    }
    if close {
        push_field(head, b"connection", b"close");
    }
    if date {
        DATE.with(|date| push_field(head, b"date", date.borrow_mut().now()));
    }
    head.extend_from_slice(b"\r\n");
}

thread_local! {
    static DATE: RefCell<CachedDate> = const { RefCell::new(CachedDate { second: 0, text: Vec::new() }) };
}

/// The `Date` value, formatted once a second per thread (as hyper does).
struct CachedDate {
    second: u64,
    text: Vec<u8>,
}

impl CachedDate {
    fn now(&mut self) -> &[u8] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if second != self.second || self.text.is_empty() {
            self.second = second;
            self.text = httpdate::fmt_http_date(now).into_bytes();
        }
        &self.text
    }
}
