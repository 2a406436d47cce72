//! A request without a body, for an app on a local port, relayed as bytes (see `http1_relay`)
//! for a client hyper serves: every HTTP/2 client, and the HTTP/1.1 connections the fast path
//! handed over. The app's response comes back as an `http::Response` whose body reads the app's
//! connection itself; hyper's server frames it for the client.
//!
//! Why: hyper's client costs more CPU per request than the relaying itself (a task per backend
//! connection, a dispatch channel and a response oneshot per request, its own parse and
//! encode), and an HTTP/2 client's requests are mostly bodiless `GET`s. Requests with a body,
//! and upgrades, still go through hyper's client (see `proxy`, `backend_pool`).
//!
//! What hyper's client did that this does too, and must keep doing:
//! - the app gets the request as `proxy` prepared it (hop-by-hop headers removed,
//!   `X-Forwarded-*` and `Forwarded` set, its `Host`), as HTTP/1.1 in origin form;
//! - the response head is read as `http1_relay` reads it (1xx skipped, framing as RFC 9112
//!   §6.3 says, 502 for nonsense), with the app's reason phrase for an HTTP/1.1 client;
//! - a chunked body's trailers are passed on (HTTP/2 carries them);
//! - the connection goes back to the pool only after a whole, well-framed response with
//!   nothing after it, and an idempotent request is sent once more as `http1_relay` says
//!   (hyper sent any request again that it had not written yet: a bodiless `POST` whose idle
//!   connection the app closed just then is now a 502, unless the pool saw it closed first);
//! - an empty body of known length keeps its `Content-Length: 0` (hyper's server adds none to
//!   a body that has ended from the start);
//! - a body that stalls is cut by `response_body`, which wraps this one as it wrapped hyper's;
//! - a body that waits for the app holds no buffer.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use hyper::ext::ReasonPhrase;
use tokio::net::TcpStream;

use crate::backend_pool::BackendPool;
use crate::http1_body::Body as Framing;
use crate::http1_body::{Decoder, Piece};
use crate::http1_relay::{
    poll_read_some, start_request, Relay, RelayError, ResponseHead, BODY_READ,
};
use crate::http1_response::{push_field, WriteError};
use crate::proxy::BackendError;

/// `request`'s head as the app gets it: `proxy` has prepared its fields and made its URI the
/// origin form.
pub fn request_head<B>(request: &Request<B>) -> Vec<u8> {
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut out = start_request(request.method(), path);
    for (name, value) in request.headers() {
        push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

impl Relay<'_> {
    /// Sends `request` (see [`request_head`]; a `HEAD` if `to_head`; sent again on a new
    /// connection if `idempotent` and its idle one turns out closed) and returns the app's
    /// response head, with a body that reads the rest.
    pub async fn fetch(
        &self,
        request: Vec<u8>,
        to_head: bool,
        idempotent: bool,
    ) -> Result<Response<RelayedBody>, BackendError> {
        let (backend, buffer, mut response) = self
            .send::<Response<()>>(&request, to_head, idempotent)
            .await?;
        if response.body == Framing::Length(0) {
            let length = HeaderValue::from_static("0");
            response.head.headers_mut().insert(CONTENT_LENGTH, length);
        }
        let body = RelayedBody {
            backend: Some(backend),
            buffer,
            decoder: Decoder::keeping_trailers(response.body),
            keep_alive: response.keep_alive,
            pool: self.pool.clone(),
            port: self.port,
        };
        Ok(response.head.map(|()| body))
    }
}

impl ResponseHead for Response<()> {
    fn start(status: StatusCode, reason: &[u8]) -> Self {
        let mut response = Response::new(());
        *response.status_mut() = status;
        // As hyper's client: an HTTP/1.1 client gets the app's own words (HTTP/2 has none).
        if status.canonical_reason().map(str::as_bytes) != Some(reason) {
            if let Ok(reason) = ReasonPhrase::try_from(reason) {
                response.extensions_mut().insert(reason);
            }
        }
        response
    }

    fn push(&mut self, name: &[u8], value: &[u8]) -> Result<(), RelayError> {
        let refused = |e: &dyn std::fmt::Display| {
            RelayError::Field(format!("{}: {e}", String::from_utf8_lossy(name)))
        };
        let name = HeaderName::from_bytes(name).map_err(|e| refused(&e))?;
        let value = HeaderValue::from_bytes(value).map_err(|e| refused(&e))?;
        self.headers_mut().append(name, value);
        Ok(())
    }
}

/// An app's response body, read from its connection as the client takes it; the connection
/// goes back to the pool once the body has ended whole.
pub struct RelayedBody {
    /// Until the body has ended or failed.
    backend: Option<TcpStream>,
    /// What was read of the app's connection and not passed on yet.
    buffer: BytesMut,
    decoder: Decoder,
    /// Whether the app keeps the connection after this response.
    keep_alive: bool,
    pool: Arc<BackendPool>,
    port: u16,
}

impl RelayedBody {
    /// Gives the connection back to the pool if the body has ended whole and nothing came
    /// after it (the app is not to be trusted with another request otherwise); drops it if not.
    fn let_go(&mut self) {
        let backend = self.backend.take();
        if let Some(backend) = backend {
            if self.keep_alive && self.decoder.ended() && self.buffer.is_empty() {
                self.pool.put_raw(self.port, backend);
            }
        }
    }

    /// The body failed: its connection is not used again.
    fn failed(&mut self, e: WriteError) -> Poll<Option<Result<Frame<Bytes>, WriteError>>> {
        self.backend = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl Drop for RelayedBody {
    fn drop(&mut self) {
        // hyper polls no body that has ended from the start (HEAD, 204, 304, a length of 0).
        self.let_go();
    }
}

impl Body for RelayedBody {
    type Data = Bytes;
    type Error = WriteError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WriteError>>> {
        let this = &mut *self;
        loop {
            match this.decoder.next(&mut this.buffer) {
                Ok(Some(Piece::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(Piece::Trailers(fields))) => {
                    return Poll::Ready(Some(Ok(Frame::trailers(fields))))
                }
                Ok(Some(Piece::End)) => {
                    this.let_go();
                    return Poll::Ready(None);
                }
                Ok(None) => {}
                Err(e) => return this.failed(e),
            }
            let Some(backend) = &mut this.backend else {
                return Poll::Ready(None); // polled again after it failed
            };
            match ready!(poll_read_some(backend, &mut this.buffer, BODY_READ, cx)) {
                Ok(0) => {
                    this.backend = None;
                    return match this.decoder.closed() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    return this.failed(WriteError::Body(format!("reading from the app: {e}")))
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.ended()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.left() {
            Some(left) => SizeHint::with_exact(left),
            None => SizeHint::default(),
        }
    }
}
