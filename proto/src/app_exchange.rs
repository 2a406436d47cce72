//! One HTTP/1.1 exchange with an app, as bytes: the request head written as the app gets it
//! (see `start_request`), the response head read and parsed with `httparse` and rewritten for
//! the client (1xx skipped, the body's framing found as RFC 9112 §6.3 says, hop-by-hop fields
//! left out), the body left to `http1_body`. The worker relays most requests so (its
//! `http1_relay`), and `core-agent` the requests without a body that come through a tunnel
//! (see `relayed_body`).
//!
//! Why not hyper's client: it costs more CPU per request than the exchange itself (a task per
//! app connection, a dispatch channel and a response oneshot per request, two `HeaderMap`s
//! built and walked, large futures moved).
//!
//! What hyper's client did that this does too, and must keep doing:
//! - the app's response is read as RFC 9112 §6.3 says: no body after `HEAD` or for 204 and
//!   304; `Transfer-Encoding` (chunked), else `Content-Length`, else until the app closes;
//!   its 1xx interim responses are skipped; anything else is an error (a 502 for the client);
//! - a connection is reused only after a whole, well-framed response, and only if the app has
//!   sent nothing more on it since (see `idle_connections`); an idempotent request that finds
//!   its idle connection closed by the app (nothing came back) goes again once on a new one,
//!   as nginx does (hyper resent any request it had not written yet; here another is not sent
//!   twice);
//! - a connection waiting for the app holds no buffer (a long poll, a quiet event stream).

use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use crate::hop_by_hop::{self, is_hop_by_hop};
use crate::http1_body::Body;

/// The largest response head taken from an app: more is a 502 (nginx's `proxy_buffer_size`
/// is 4 or 8 KiB; hyper's client took about 400 KiB).
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Header fields taken in an app's response head, as hyper's client.
pub const MAX_RESPONSE_HEADERS: usize = 100;

/// What a read of a response head asks for; a larger head takes several reads.
const HEAD_READ: usize = 8 * 1024;

/// What the first read of a response body asks for.
const BODY_READ: usize = 64 * 1024;

/// The most a read of a response body asks for, once reads fill what they asked for (see
/// [`BodyReads`]).
const MAX_BODY_READ: usize = 512 * 1024;

/// What the next read of a response body asks for: [`BODY_READ`] at first, doubled up to
/// [`MAX_BODY_READ`] each time a read fills it (as hyper's client's reads grow), and back to
/// [`BODY_READ`] after a read of less. A download goes to the client in fewer, larger pieces
/// (fewer writes and wake-ups; through a tunnel, fewer HTTP/2 `DATA` frames, each with its own
/// costs on both sides), while a body that comes in small pieces (an event stream) asks for
/// 64 KiB. A response read faster than its client takes it holds one buffer of about 512 KiB
/// while it goes (the largest read, and what a read left of a chunk's framing: see
/// `make_room`), as it did through hyper's client.
///
/// Measured on 2 cores, 100 MB downloads: through a tunnel, 64 KiB reads made 530 MB/s where
/// hyper's client, reading up to about 400 KiB, made 930, and 512 KiB made 1,000; through the
/// plain proxy (the scratch harness, one runtime thread, medians of 15 downloads), 1,155 MB/s
/// with 64 KiB reads and 1,289 with these.
#[derive(Debug, Clone, Copy)]
pub struct BodyReads {
    next: usize,
}

impl Default for BodyReads {
    fn default() -> Self {
        BodyReads { next: BODY_READ }
    }
}

impl BodyReads {
    /// What the next read asks for.
    pub fn size(&self) -> usize {
        self.next
    }

    /// Notes that a read took `read` bytes.
    pub fn took(&mut self, read: usize) {
        if read >= self.next {
            self.next = (self.next * 2).min(MAX_BODY_READ);
        } else if read < BODY_READ {
            self.next = BODY_READ;
        }
    }
}

/// Why an app's answer could not be relayed.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("sending the request")]
    Send(#[source] io::Error),
    #[error("the connection failed before a response")]
    Unanswered(#[source] io::Error),
    #[error("reading the response")]
    Read(#[source] io::Error),
    #[error("the connection closed before a response")]
    Closed,
    #[error("the connection closed within the response head")]
    Cut,
    #[error("the response head is not HTTP/1.x: {0}")]
    Malformed(httparse::Error),
    #[error("the response head is larger than {MAX_RESPONSE_HEAD} bytes")]
    TooLarge,
    #[error("the response has a malformed or conflicting Content-Length")]
    Length,
    #[error("the response switches protocols, which the request did not ask for")]
    Switched,
    #[error("the response has status {0}")]
    Status(u16),
    #[error("the response has a header field that http refuses: {0}")]
    Field(String),
}

impl RelayError {
    /// Whether the app answered, but with what HTTP/1.1 does not allow (rather than not at all).
    pub fn is_invalid_answer(&self) -> bool {
        match self {
            RelayError::Malformed(_)
            | RelayError::TooLarge
            | RelayError::Length
            | RelayError::Switched
            | RelayError::Status(_)
            | RelayError::Field(_) => true,
            RelayError::Send(_)
            | RelayError::Unanswered(_)
            | RelayError::Read(_)
            | RelayError::Closed
            | RelayError::Cut => false,
        }
    }
}

/// A request head as the app gets it, begun: its line, `METHOD path?query HTTP/1.1` (origin
/// form); its fields follow (see `push_field`).
pub fn start_request(method: &Method, path: &str, query: Option<&str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    // An absolute-form target with no path (`http://a.example?x`) has the path `/` here.
    out.extend_from_slice(if path.is_empty() {
        b"/"
    } else {
        path.as_bytes()
    });
    if let Some(query) = query {
        out.push(b'?');
        out.extend_from_slice(query.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out
}

/// Adds a header field to a head.
pub fn push_field(head: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    head.extend_from_slice(name);
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Starts a response head with its status line: `status`, three digits, and `reason`.
pub fn start_head(head: &mut Vec<u8>, status: &[u8], reason: &[u8]) {
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status);
    head.push(b' ');
    head.extend_from_slice(reason);
    head.extend_from_slice(b"\r\n");
}

/// Whether a response with `status` has no body, whatever its headers say (RFC 9112 §6.3): an
/// answer to a `HEAD` (`to_head`), a 1xx, a 204 or a 304.
pub fn bodiless(status: StatusCode, to_head: bool) -> bool {
    to_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
}

/// The connections to one app that exchanges take and give back: a pool, which sets aside
/// idle connections the app has closed (see `idle_connections`).
pub trait AppConnections {
    /// Why no connection could be had; also what a failed exchange becomes.
    type Error: From<RelayError>;
    /// The most recently used idle connection, if one is still open and quiet.
    fn take(&self) -> Option<TcpStream>;
    /// A new connection (`TCP_NODELAY`, a connect timeout).
    fn connect(&self) -> impl Future<Output = Result<TcpStream, Self::Error>> + Send;
    /// Keeps `stream`, whose last response was whole with nothing after it, for the next
    /// request, if there is room.
    fn put(&self, stream: TcpStream);
}

/// Sends `request` (see [`start_request`]; a `HEAD` if `to_head`; sent again on a new
/// connection if `idempotent` and its idle one turns out closed) on a connection from
/// `connections` and reads the response head: the connection, the bytes read after the head,
/// and the head.
pub async fn send<H: ResponseHead, C: AppConnections>(
    connections: &C,
    request: &[u8],
    to_head: bool,
    idempotent: bool,
) -> Result<(TcpStream, BytesMut, AppResponse<H>), C::Error> {
    let mut idle = connections.take();
    loop {
        let reused = idle.is_some();
        let mut backend = match idle.take() {
            Some(stream) => stream,
            None => connections.connect().await?,
        };
        let mut buffer = BytesMut::new();
        match ask(&mut backend, &mut buffer, request, to_head).await {
            Ok(response) => return Ok((backend, buffer, response)),
            // Closed by the app as it was taken: an idempotent request goes again, once, on a
            // new connection.
            Err(RelayError::Closed | RelayError::Send(_) | RelayError::Unanswered(_))
                if idempotent && reused => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Writes `request` to `backend` and reads the response head into `buffer` (what follows
/// it stays there).
async fn ask<H: ResponseHead>(
    backend: &mut TcpStream,
    buffer: &mut BytesMut,
    request: &[u8],
    to_head: bool,
) -> Result<AppResponse<H>, RelayError> {
    backend.write_all(request).await.map_err(RelayError::Send)?;
    let mut received = false;
    loop {
        if let Some(response) = AppResponse::parse(buffer, to_head)? {
            return Ok(response);
        }
        // Reads take no more than the limit leaves: a head that fills it and is not whole is
        // too large, whatever follows.
        let room = MAX_RESPONSE_HEAD.saturating_sub(buffer.len());
        if room == 0 {
            return Err(RelayError::TooLarge);
        }
        match read_some(backend, buffer, HEAD_READ.min(room)).await {
            Ok(0) if received => return Err(RelayError::Cut),
            Ok(0) => return Err(RelayError::Closed),
            Ok(_) => received = true,
            // A reset of an idle connection the app had closed.
            Err(e) if !received => return Err(RelayError::Unanswered(e)),
            Err(e) => return Err(RelayError::Read(e)),
        }
    }
}

/// Reads what `backend` has into `buffer`, with room for `size` more made first; `Ok(0)` at
/// its end.
pub async fn read_some(
    backend: &mut TcpStream,
    buffer: &mut BytesMut,
    size: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| poll_read_some(backend, buffer, size, cx)).await
}

/// [`read_some`], polled. A buffer with nothing in it is let go of while the read waits (a
/// long poll, a quiet event stream), but kept when bytes are there already (a download).
/// Read through `AsyncRead`, which takes a short read as the socket drained (no read more
/// that would only say `EWOULDBLOCK`).
pub fn poll_read_some(
    backend: &mut TcpStream,
    buffer: &mut BytesMut,
    size: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buffer.is_empty() && backend.poll_read_ready(cx)?.is_pending() {
        *buffer = BytesMut::new();
        return Poll::Pending;
    }
    debug_assert!(
        size > 0,
        "a read of nothing would look like the end of the stream"
    );
    make_room(buffer, size);
    let read = poll_read_buf(Pin::new(backend), cx, &mut (&mut *buffer).limit(size));
    if read.is_pending() && buffer.is_empty() {
        *buffer = BytesMut::new(); // its readiness was stale
    }
    read
}

/// Makes room in `buffer` for a read of `size`, keeping what it holds, in an allocation no
/// larger than the read and what it holds need. `reserve` would keep the bytes of the pieces
/// split off before in the allocation it grows: a download's buffer grew to about twice its
/// largest read. So the allocation is taken back (`try_reclaim`) when no piece read into it is
/// still in use (a download whose pieces went out), and replaced when it is.
fn make_room(buffer: &mut BytesMut, size: usize) {
    let spare = buffer.capacity() - buffer.len();
    if spare >= size || (spare >= size / 4 && !buffer.is_empty()) || buffer.try_reclaim(size) {
        return;
    }
    if buffer.is_empty() {
        if spare < size / 4 {
            *buffer = BytesMut::with_capacity(size);
        }
    } else {
        // What the last read left (a chunk's framing, a head begun), copied: at most 64 KiB.
        let held = buffer.len();
        let mut grown = BytesMut::with_capacity((held + size).max(2 * held));
        grown.extend_from_slice(buffer);
        *buffer = grown;
    }
}

/// Where the client's copy of an app's response head is written: the bytes of an HTTP/1.1
/// head for the worker's fast path (the status line and fields, not yet ended), or an
/// `http::Response` for hyper's server (see `relayed_body`).
pub trait ResponseHead: Sized {
    /// A head with `status`, and the app's `reason` phrase; the app's head was `size` bytes.
    fn start(status: StatusCode, reason: &[u8], size: usize) -> Self;
    /// Adds a field the client gets.
    fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), RelayError>;
}

impl ResponseHead for Vec<u8> {
    fn start(status: StatusCode, reason: &[u8], size: usize) -> Self {
        // Room for the app's head and what the worker adds to it (its framing, `Connection:
        // close` and `Date`: under 100 bytes), so that it is never grown.
        let mut head = Vec::with_capacity(size + 128);
        start_head(&mut head, status.as_str().as_bytes(), reason);
        head
    }

    fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), RelayError> {
        push_field(self, name, value);
        Ok(())
    }
}

/// An app's response head, rewritten for the client.
#[derive(Debug)]
pub struct AppResponse<H> {
    /// The status line and the fields the client gets.
    pub head: H,
    /// Whether the app gave a `Date`.
    pub date: bool,
    pub body: Body,
    /// Whether the app keeps the connection open after this response.
    pub keep_alive: bool,
}

impl<H: ResponseHead> AppResponse<H> {
    /// The first final response's head in `buffer`, taken out of it (1xx before it skipped);
    /// `None` if not whole yet.
    fn parse(buffer: &mut BytesMut, to_head: bool) -> Result<Option<Self>, RelayError> {
        loop {
            // Left uninitialised, as hyper does: httparse fills those it uses.
            let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
            let mut parsed = httparse::Response::new(&mut []);
            let config = httparse::ParserConfig::default();
            let length = match config.parse_response_with_uninit_headers(
                &mut parsed,
                buffer,
                &mut headers,
            ) {
                Ok(httparse::Status::Complete(length)) => length,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(RelayError::Malformed(e)),
            };
            let code = parsed.code.unwrap_or_default();
            let status = StatusCode::from_u16(code).map_err(|_| RelayError::Status(code))?;
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(RelayError::Switched);
            }
            if status.is_informational() {
                buffer.advance(length); // as hyper's client: interim answers are not passed on
                continue;
            }
            let response = Self::rewritten(&parsed, length, status, to_head)?;
            buffer.advance(length);
            return Ok(Some(response));
        }
    }

    fn rewritten(
        parsed: &httparse::Response<'_, '_>,
        size: usize,
        status: StatusCode,
        to_head: bool,
    ) -> Result<Self, RelayError> {
        let fields = || parsed.headers.iter().map(|h| (h.name.as_bytes(), h.value));
        let named = ConnectionTokens::of(fields());
        let mut keep_alive = parsed.version == Some(1) && !named.close();
        let is = |name: &[u8], wanted: &[u8]| name.eq_ignore_ascii_case(wanted);
        let bodiless = bodiless(status, to_head);
        let mut length = None;
        let mut bad_length = false;
        let mut chunked = None;
        for (name, value) in fields() {
            if is(name, b"content-length") {
                match content_length(value) {
                    Some(listed) if length.is_none_or(|known| known == listed) => {
                        length = Some(listed)
                    }
                    _ => bad_length = true,
                }
            } else if is(name, b"transfer-encoding") && !bodiless {
                // The last coding of the last field says whether it is chunked.
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            }
        }
        if bad_length {
            if !bodiless {
                return Err(RelayError::Length);
            }
            length = None; // without a body, the client is told no length rather than a bad one
        }
        let body = match (chunked, length) {
            _ if bodiless => Body::None,
            (Some(true), _) => Body::Chunked,
            (Some(false), _) => Body::UntilClose,
            (None, Some(length)) => Body::Length(length),
            (None, None) => Body::UntilClose,
        };
        // Both framings given: not to be trusted with another request (RFC 9112 §6.3).
        if body == Body::UntilClose || (chunked.is_some() && length.is_some()) {
            keep_alive = false;
        }
        // The app's reason phrase, whatever it is, as hyper's client and server pass it.
        let mut head = H::start(status, parsed.reason.unwrap_or_default().as_bytes(), size);
        let mut date = false;
        for (name, value) in fields() {
            if !is(name, b"content-length") && !is_hop_by_hop(name) && !named.lists(name) {
                date |= is(name, b"date");
                head.push(name, value)?;
            }
        }
        // Framed anew (see `end_head`; hyper's server frames by the body's length), but a
        // HEAD's and a 304's say what a GET would get.
        if let (Some(length), true) = (length, bodiless && status != StatusCode::NO_CONTENT) {
            let mut digits = itoa::Buffer::new();
            head.push(b"content-length", digits.format(length).as_bytes())?;
        }
        Ok(AppResponse {
            head,
            date,
            body,
            keep_alive,
        })
    }
}

/// A `Content-Length` field's value: a number, or a list of the same number (RFC 9110 §8.6).
fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for listed in value.split(|&b| b == b',') {
        let listed = parse_length(listed.trim_ascii())?;
        if *length.get_or_insert(listed) != listed {
            return None;
        }
    }
    length
}

/// A number of `Content-Length`: digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The tokens of a head's `Connection` fields: the header names they list (hop-by-hop too),
/// and the options `close` and `keep-alive`. Those two are kept apart: most heads list nothing
/// else, and then no allocation is made.
#[derive(Default)]
pub struct ConnectionTokens<'a> {
    close: bool,
    keep_alive: bool,
    others: Vec<&'a [u8]>,
}

impl<'a> ConnectionTokens<'a> {
    /// The tokens of the `Connection` fields among `fields`.
    pub fn of(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Self {
        let mut tokens = ConnectionTokens::default();
        let values = fields.filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"));
        for token in values.flat_map(|(_, value)| hop_by_hop::tokens(value)) {
            if token.eq_ignore_ascii_case(b"close") {
                tokens.close = true;
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                tokens.keep_alive = true;
            } else {
                tokens.others.push(token);
            }
        }
        tokens
    }

    /// Whether they include `close`.
    pub fn close(&self) -> bool {
        self.close
    }

    /// Whether they include `name` (in any case), which is then hop-by-hop.
    pub fn lists(&self, name: &[u8]) -> bool {
        (self.close && name.eq_ignore_ascii_case(b"close"))
            || (self.keep_alive && name.eq_ignore_ascii_case(b"keep-alive"))
            || self
                .others
                .iter()
                .any(|listed| listed.eq_ignore_ascii_case(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first final response in `bytes`: what the client's head starts with, the body's
    /// framing, whether the app keeps the connection, and what was left after the head.
    fn parsed(bytes: &str, to_head: bool) -> (String, Body, bool, String) {
        let mut buffer = BytesMut::from(bytes);
        let response = AppResponse::<Vec<u8>>::parse(&mut buffer, to_head)
            .unwrap()
            .unwrap();
        let head = String::from_utf8(response.head).unwrap();
        let rest = String::from_utf8(buffer.to_vec()).unwrap();
        (head, response.body, response.keep_alive, rest)
    }

    #[test]
    fn interim_answers_are_skipped_and_hop_by_hop_fields_go() {
        let (head, body, keep_alive, rest) = parsed(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n\
             HTTP/1.1 200 Fine\r\nConnection: X-Private, keep-alive\r\nX-Private: 1\r\n\
             Keep-Alive: timeout=5\r\nContent-Length: 3\r\nX-App: yes\r\nDate: then\r\n\r\nabc",
            false,
        );
        assert_eq!(head, "HTTP/1.1 200 Fine\r\nX-App: yes\r\nDate: then\r\n");
        assert_eq!(
            (body, keep_alive, rest.as_str()),
            (Body::Length(3), true, "abc")
        );
    }

    #[test]
    fn bodies_are_delimited_as_rfc_9112_says() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
                false,
                Body::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Body::Chunked,
                true,
            ),
            // Both: chunked wins, and the connection is not trusted again.
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
                Body::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                false,
                Body::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Body::UntilClose, false),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                false,
                Body::Length(1),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                false,
                Body::Length(1),
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
                false,
                Body::None,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                Body::None,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
                Body::None,
                true,
            ),
        ];
        for (response, to_head, body, keep_alive) in cases {
            let parsed = parsed(response, to_head);
            assert_eq!((parsed.1, parsed.2), (body, keep_alive), "{response}");
        }
        // A HEAD's and a 304's length is the GET's, passed on; a 204's goes.
        let head = parsed("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true).0;
        assert_eq!(head, "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n");
        // A bad one is not passed on, nor an error without a body.
        let bad = "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nContent-Length: 8\r\nX: y\r\n\r\n";
        assert_eq!(parsed(bad, true).0, "HTTP/1.1 200 OK\r\nX: y\r\n");
        let not_modified = parsed(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .0;
        assert_eq!(
            not_modified,
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n"
        );
        let no_content = parsed(
            "HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\n",
            false,
        )
        .0;
        assert_eq!(no_content, "HTTP/1.1 204 No Content\r\n");
    }

    #[test]
    fn body_reads_grow_while_they_fill_and_start_again_after_a_short_one() {
        let mut reads = BodyReads::default();
        assert_eq!(reads.size(), 64 << 10);
        reads.took(1000);
        assert_eq!(reads.size(), 64 << 10, "a short read asks for no more");
        let mut sizes = Vec::new();
        for _ in 0..5 {
            reads.took(reads.size());
            sizes.push(reads.size() >> 10);
        }
        assert_eq!(sizes, [128, 256, 512, 512, 512]);
        reads.took(300 << 10);
        assert_eq!(reads.size(), 512 << 10, "a large read keeps the size");
        reads.took(100);
        assert_eq!(
            reads.size(),
            64 << 10,
            "a small one takes it back to the start"
        );
    }

    /// A connection over loopback: the proxy's end, and the app's.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (app, _) = listener.accept().await.unwrap();
        (proxy, app)
    }

    /// A download read as the fast path reads it, each piece split off and let go before the
    /// next read (`keep`: bytes the decoder leaves, a chunk's framing): no read takes more
    /// than it asked for, and the buffer never grows past the largest read and what it kept.
    async fn download(keep: usize) {
        let (mut backend, mut app) = connected().await;
        const SENT: usize = 32 << 20;
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..SENT >> 20 {
                app.write_all(&chunk).await.unwrap();
            }
        });
        let (mut buffer, mut reads, mut total, mut largest) =
            (BytesMut::new(), BodyReads::default(), 0, 0);
        let mut probe = vec![0u8; MAX_BODY_READ];
        while total < SENT {
            let size = reads.size();
            // What the read asks for is there first (or all the socket holds), as in a
            // download the app sends faster than the client takes it: on a busy machine the
            // reads would otherwise often come first, short, and never grow.
            let (ready, mut there) = (size.min(SENT - total), 0);
            loop {
                let now = backend.peek(&mut probe[..ready]).await.unwrap();
                if now >= ready || now == there {
                    break;
                }
                there = now;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            let read = read_some(&mut backend, &mut buffer, size).await.unwrap();
            assert_ne!(read, 0, "the app's connection closed early");
            assert!(read <= size, "a read took {read} bytes for {size} asked");
            let most = MAX_BODY_READ + 2 * keep;
            let capacity = buffer.capacity();
            assert!(
                capacity <= most,
                "a buffer of {capacity} bytes, {most} at most"
            );
            reads.took(read);
            (total, largest) = (total + read, largest.max(read));
            let sent = buffer.len().saturating_sub(keep);
            drop(buffer.split_to(sent)); // the piece, written to the client
        }
        assert!(largest > BODY_READ, "the reads never grew");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn body_reads_take_what_they_ask_for_in_one_buffer_no_larger() {
        let downloads = async {
            download(0).await;
            download(5).await;
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), downloads)
            .await
            .expect("the downloads took over a minute");
    }

    /// The answer to a request on a real socket from an app that sends `head` and then waits.
    async fn asked(head: String) -> Result<AppResponse<Vec<u8>>, RelayError> {
        let (mut backend, mut app) = connected().await;
        let answer = tokio::spawn(async move {
            app.write_all(head.as_bytes()).await.unwrap();
            std::future::pending::<()>().await
        });
        let mut buffer = BytesMut::new();
        let asked = ask(&mut backend, &mut buffer, b"GET / HTTP/1.1\r\n\r\n", false).await;
        answer.abort();
        asked
    }

    #[tokio::test]
    async fn a_response_head_of_the_limit_is_taken_and_one_byte_more_is_not() {
        // One field padded so that the whole head is `size` bytes. An interim answer before
        // it, which does not count, leaves the reads that follow unaligned on the limit.
        let head = |size: usize| {
            let frame = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: \r\n\r\n".len();
            let padding = "p".repeat(size - frame);
            format!(
                "HTTP/1.1 100 Continue\r\n\r\n\
                 HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX: {padding}\r\n\r\n"
            )
        };
        let taken = asked(head(MAX_RESPONSE_HEAD)).await.unwrap();
        assert_eq!(taken.body, Body::Length(0));
        let refused = asked(head(MAX_RESPONSE_HEAD + 1)).await.unwrap_err();
        assert!(matches!(refused, RelayError::TooLarge), "{refused:?}");
    }

    #[test]
    fn a_head_not_whole_waits_and_a_bad_one_is_an_error() {
        let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\nContent-Le");
        assert!(AppResponse::<Vec<u8>>::parse(&mut partial, false)
            .unwrap()
            .is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "HTTP/1.1 099 Low\r\n\r\n",
            "SURPRISE\r\n\r\n",
        ] {
            let mut buffer = BytesMut::from(bad);
            assert!(
                AppResponse::<Vec<u8>>::parse(&mut buffer, false).is_err(),
                "{bad}"
            );
        }
    }

    /// Connections to an app, the first taken being `stale`: one the app has closed, as if the
    /// pool had looked at it just before.
    struct Stale {
        app: std::net::SocketAddr,
        stale: std::sync::Mutex<Option<TcpStream>>,
    }

    impl AppConnections for Stale {
        type Error = RelayError;

        fn take(&self) -> Option<TcpStream> {
            self.stale.lock().unwrap().take()
        }

        fn connect(&self) -> impl Future<Output = Result<TcpStream, RelayError>> + Send {
            let app = self.app;
            async move { TcpStream::connect(app).await.map_err(RelayError::Send) }
        }

        fn put(&self, _: TcpStream) {}
    }

    /// An app on loopback that answers every request with a 200, and a connection to it that
    /// it has closed.
    async fn app_and_stale_connection() -> Stale {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = listener.local_addr().unwrap();
        let stale = TcpStream::connect(app).await.unwrap();
        drop(listener.accept().await.unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let (mut head, mut chunk) = (Vec::new(), [0; 1024]);
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                    let _ = stream.write_all(answer).await;
                });
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await; // its FIN arrives
        Stale {
            app,
            stale: std::sync::Mutex::new(Some(stale)),
        }
    }

    #[tokio::test]
    async fn a_request_whose_idle_connection_the_app_closed_goes_again_if_idempotent() {
        for (method, idempotent) in [("GET", true), ("POST", false)] {
            let connections = app_and_stale_connection().await;
            let request = format!("{method} / HTTP/1.1\r\nHost: a\r\n\r\n");
            let sent = send::<Vec<u8>, _>(&connections, request.as_bytes(), false, idempotent);
            match sent.await {
                Ok((_, buffer, response)) => {
                    assert!(idempotent, "a {method} was sent twice");
                    assert_eq!((response.body, &buffer[..]), (Body::Length(2), &b"ok"[..]));
                }
                Err(e) => assert!(!idempotent, "a {method} failed: {e}"),
            }
        }
    }
}
