//! A request without a body, for an app on a local port, relayed as bytes: the fast path's
//! answer to most requests (see `http1_fast_path`). The client's head is rewritten straight
//! into the app's (no `http::Request`, no `HeaderMap`), written to a plain pooled TCP
//! connection, and the app's response head is parsed with `httparse` and rewritten straight
//! into the client's, its body passed on as it comes. A bodiless request hyper's server took
//! (HTTP/2, and HTTP/1.1 connections the fast path handed over) is relayed by the same
//! exchange, its answer read into an `http::Response` (see `relayed_response`); the proxy's
//! other requests (bodies, upgrades, tunnels) go through hyper's client (see `proxy`,
//! `backend_pool`).
//!
//! Why: hyper's client costs more CPU per request than the relaying itself (a dispatch channel
//! and a response oneshot per request, two `HeaderMap`s built and walked, large futures
//! moved), and a proxy's user time is also the time its peers sleep and must be woken.
//!
//! What hyper's client and the proxy did that this does too, and must keep doing:
//! - the app gets what `proxy` sends through hyper: hop-by-hop headers and the client's
//!   claims about its origin removed (see `forwarding`), core-server's `X-Forwarded-*` and
//!   `Forwarded` set, HTTP/1.1, the client's `Host`;
//! - the app's response is read as RFC 9112 §6.3 says: no body after `HEAD` or for 204 and
//!   304; `Transfer-Encoding` (chunked, decoded here), else `Content-Length`, else until the
//!   app closes. Its 1xx interim responses are skipped, as hyper's client does;
//! - the client gets it framed as `http1_response` frames hyper's answers: hop-by-hop headers
//!   removed, the app's reason phrase, `Content-Length` when known, else chunked, no
//!   trailers, a `Date` unless given, `Connection: close` when closing;
//! - deadlines (`backend_timeout`): to connect and get the response head, and for each stall
//!   of the body (which is then cut short); errors before the response head give the proxy's
//!   error pages (502, 504);
//! - a client gone while the response is awaited ends the exchange and closes the app's
//!   connection, as hyper drops it;
//! - connections are reused only after a whole, well-framed response, and only if the app has
//!   sent nothing more on them since (see `backend_pool`); an idempotent request that finds
//!   its idle connection closed by the app (nothing came back) goes again once on a new one,
//!   as nginx does (hyper resent any request it had not written yet; here another is not sent
//!   twice, and the pool has already set aside most connections the app closed);
//! - a connection waiting for the app holds no buffer (a long poll, a quiet event stream).

use std::io;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use core_server_proto::hop_by_hop::{self, is_hop_by_hop};
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;
use tracing::warn;

use crate::backend_pool::BackendPool;
use crate::forwarding;
use crate::http1_body::{Body, Decoder, Piece};
use crate::http1_fast_path::Closing;
use crate::http1_response::{bodiless, end_head, push_field, start_head};
use crate::http1_response::{ClientConnection, Outgoing};
use crate::http1_response::{WriteError, Written};
use crate::proxy::{BackendError, Failure};
use crate::request_head::RequestHead;

/// The largest response head taken from an app: more is a 502 (nginx's `proxy_buffer_size`
/// is 4 or 8 KiB; hyper's client took about 400 KiB).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Header fields taken in an app's response head, as hyper's client.
const MAX_RESPONSE_HEADERS: usize = 100;

/// What a read of a response head asks for at least.
const HEAD_READ: usize = 8 * 1024;

/// What a read of a response body asks for at least.
pub const BODY_READ: usize = 64 * 1024;

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

/// `head` as the app gets it: HTTP/1.1, hop-by-hop headers and the client's claims removed,
/// core-server's forwarding headers (for `client`, over `scheme`) added.
pub fn request(head: &RequestHead, host: &[u8], client: IpAddr, scheme: &'static str) -> Vec<u8> {
    let mut out = start_request(head.method(), head.path().as_str());
    let named = connection_names(head.fields());
    for (name, value) in head.fields() {
        // `Connection: host` cannot take the Host away: the app needs it.
        let named = names(&named, name) && !name.eq_ignore_ascii_case(b"host");
        if !is_hop_by_hop(name) && !forwarding::is_client_claim(name) && !named {
            push_field(&mut out, name, value);
        }
    }
    forwarding::write_forwarded(&mut out, client, host, scheme);
    out.extend_from_slice(b"\r\n");
    out
}

/// A request head as the app gets it, begun: its line, `METHOD path HTTP/1.1`; its fields
/// follow (see `push_field`).
pub fn start_request(method: &Method, path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    out
}

/// One request's way to the app on a local port.
pub struct Relay<'a> {
    pub pool: &'a Arc<BackendPool>,
    pub port: u16,
    /// `backend_timeout`.
    pub timeout: Duration,
}

impl Relay<'_> {
    /// Sends `request` (see [`request`]; a `HEAD` if `to_head`; sent again on a new connection
    /// if `idempotent` and its idle one turns out closed) and relays the answer to `client`.
    /// `Ok(None)`: the client went away before the response head came. `Err`: the app gave no
    /// response head, and the client has had nothing yet.
    pub async fn exchange<C: ClientConnection + Send>(
        &self,
        request: Vec<u8>,
        to_head: bool,
        idempotent: bool,
        client: &mut C,
        closing: &Closing<'_>,
    ) -> Result<Option<Result<Written, WriteError>>, Failure> {
        let by = Instant::now() + self.timeout;
        let answered = tokio::select! {
            biased;
            answered = tokio::time::timeout_at(by, self.send::<Vec<u8>>(&request, to_head, idempotent)) => answered,
            () = client.gone() => return Ok(None),
        };
        drop(request); // not held for as long as the body takes (an event stream)
        let (mut backend, mut buffer, response) = match answered {
            Ok(answered) => answered.map_err(Failure::Backend)?,
            Err(_) => return Err(Failure::NoResponse),
        };
        let AppResponse {
            mut head,
            date,
            body,
            keep_alive,
        } = response;
        let close = closing.now();
        end_head(&mut head, &body.framing(), close, !date);
        let sent = self.relay_body(&mut backend, &mut buffer, body, head, client);
        let reusable = match sent.await {
            Ok(reusable) => reusable,
            Err(e) => return Ok(Some(Err(e))),
        };
        if keep_alive && reusable {
            self.pool.put_raw(self.port, backend);
        }
        Ok(Some(Ok(if close {
            Written::Close
        } else {
            Written::KeepAlive
        })))
    }

    /// Sends `request` on a connection and reads the response head: the connection, the bytes
    /// read after the head, and the head.
    pub async fn send<H: ResponseHead>(
        &self,
        request: &[u8],
        to_head: bool,
        idempotent: bool,
    ) -> Result<(TcpStream, BytesMut, AppResponse<H>), BackendError> {
        let mut idle = self.pool.take_raw(self.port);
        loop {
            let reused = idle.is_some();
            let mut backend = match idle.take() {
                Some(stream) => stream,
                None => self.pool.connect_raw(self.port).await?,
            };
            let mut buffer = BytesMut::new();
            match Self::ask(&mut backend, &mut buffer, request, to_head).await {
                Ok(response) => return Ok((backend, buffer, response)),
                // Closed by the app as it was taken: an idempotent request goes again, once,
                // on a new connection.
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
            if buffer.len() >= MAX_RESPONSE_HEAD {
                return Err(RelayError::TooLarge);
            }
            match read_some(backend, buffer, HEAD_READ).await {
                Ok(0) if received => return Err(RelayError::Cut),
                Ok(0) => return Err(RelayError::Closed),
                Ok(_) => received = true,
                // A reset of an idle connection the app had closed.
                Err(e) if !received => return Err(RelayError::Unanswered(e)),
                Err(e) => return Err(RelayError::Read(e)),
            }
        }
    }

    /// Writes `head` and the body to `client` as it comes from `backend` (what of it was read
    /// already is in `buffer`); whether the connection can carry another request.
    async fn relay_body<C: ClientConnection + Send>(
        &self,
        backend: &mut TcpStream,
        buffer: &mut BytesMut,
        body: Body,
        head: Vec<u8>,
        client: &mut C,
    ) -> Result<bool, WriteError> {
        let mut outgoing = Outgoing::new(head, body.framing());
        let mut decoder = Decoder::new(body);
        loop {
            match decoder.next(buffer)? {
                Some(Piece::Data(data)) => outgoing.piece(client, &data).await?,
                // None come: `Decoder::new` drops them (the fast path's client asked for none).
                Some(Piece::Trailers(_)) => {}
                Some(Piece::End) => {
                    outgoing.end(client).await?;
                    // Bytes after the body: the app is not to be trusted with another request.
                    return Ok(buffer.is_empty());
                }
                None => {
                    outgoing.head_now(client).await?;
                    if self.read_body(backend, buffer, client).await? == 0 {
                        decoder.closed()?;
                        outgoing.end(client).await?;
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Reads more of the body into `buffer`, for as long as the app keeps sending within the
    /// timeout and the client stays.
    async fn read_body<C: ClientConnection + Send>(
        &self,
        backend: &mut TcpStream,
        buffer: &mut BytesMut,
        client: &mut C,
    ) -> Result<usize, WriteError> {
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(self.timeout, read_some(backend, buffer, BODY_READ)) => read,
            () = client.gone() => return Err(WriteError::ClientGone),
        };
        match read {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => Err(WriteError::Body(format!("reading from the app: {e}"))),
            Err(_) => {
                let (port, timeout) = (self.port, self.timeout);
                warn!("backend 127.0.0.1:{port} sent no byte of its response body for {timeout:?}: cutting the response");
                Err(WriteError::Body(format!(
                    "the app sent no byte of its response body for {timeout:?}"
                )))
            }
        }
    }
}

/// Reads what `backend` has into `buffer`, with room for `size` more made first; `Ok(0)` at
/// its end.
async fn read_some(
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
    if buffer.capacity() - buffer.len() < size / 4 {
        buffer.reserve(size);
    }
    let read = poll_read_buf(Pin::new(backend), cx, buffer);
    if read.is_pending() && buffer.is_empty() {
        *buffer = BytesMut::new(); // its readiness was stale
    }
    read
}

/// Where the client's copy of an app's response head is written: the bytes of an HTTP/1.1
/// head for the fast path (the status line and fields, not yet ended: see `end_head`), or an
/// `http::Response` for hyper's server (see `relayed_response`).
pub trait ResponseHead: Sized {
    /// A head with `status`, and the app's `reason` phrase.
    fn start(status: StatusCode, reason: &[u8]) -> Self;
    /// Adds a field the client gets.
    fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), RelayError>;
}

impl ResponseHead for Vec<u8> {
    fn start(status: StatusCode, reason: &[u8]) -> Self {
        let mut head = Vec::with_capacity(256);
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
            // Left uninitialised, as for requests (see `request_head`).
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
            let response = Self::rewritten(&parsed, status, to_head)?;
            buffer.advance(length);
            return Ok(Some(response));
        }
    }

    fn rewritten(
        parsed: &httparse::Response<'_, '_>,
        status: StatusCode,
        to_head: bool,
    ) -> Result<Self, RelayError> {
        let fields = || parsed.headers.iter().map(|h| (h.name.as_bytes(), h.value));
        let named = connection_names(fields());
        let mut keep_alive = parsed.version == Some(1) && !names(&named, b"close");
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
        let mut head = H::start(status, parsed.reason.unwrap_or_default().as_bytes());
        let mut date = false;
        for (name, value) in fields() {
            if !is(name, b"content-length") && !is_hop_by_hop(name) && !names(&named, name) {
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

/// The header names that the `Connection` fields among `fields` list (hop-by-hop too), and
/// its other tokens (`close`, `keep-alive`).
fn connection_names<'a>(fields: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> Vec<&'a [u8]> {
    fields
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, value)| hop_by_hop::tokens(value))
        .collect()
}

/// Whether `named` (see [`connection_names`]) includes `name`.
fn names(named: &[&[u8]], name: &[u8]) -> bool {
    named.iter().any(|listed| listed.eq_ignore_ascii_case(name))
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

    #[test]
    fn the_app_gets_no_hop_by_hop_field_nor_claim_and_core_servers_forwarding() {
        let mut buffer = BytesMut::from(
            "GET /p?q HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, X-Private, host\r\n\
             X-Private: s\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nKeep-Alive: 5\r\n\
             Proxy-Authorization: x\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n",
        );
        let head = RequestHead::parse(&mut buffer).ok().unwrap().unwrap();
        let client = "::ffff:192.0.2.1".parse().unwrap();
        let sent = request(&head, b"a.example", client, "https");
        assert_eq!(
            String::from_utf8(sent).unwrap(),
            "GET /p?q HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nContent-Length: 0\r\n\
             x-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: a.example\r\nforwarded: for=192.0.2.1;host=a.example;proto=https\r\n\r\n"
        );
    }
}
