//! A request without a body, relayed to an app as bytes (see `app_exchange`) for a client that
//! hyper serves: the app's response comes back as an `http::Response` whose body reads the
//! app's connection itself, and hyper's server frames it for the client. The worker relays
//! so the bodiless requests hyper's server took (HTTP/2 clients', and those of HTTP/1.1
//! connections the fast path handed over), and `core-agent` those from its tunnel.
//!
//! What hyper's client did that this does too, and must keep doing:
//! - the app gets the request head the caller wrote (see [`request_head`] for the agent's), as
//!   HTTP/1.1 in origin form;
//! - the response head is read as `app_exchange` reads it, with the app's reason phrase for an
//!   HTTP/1.1 client;
//! - a chunked body's trailers are passed on (HTTP/2 carries them);
//! - the connection goes back to the pool only after a whole, well-framed response with
//!   nothing after it, and an idempotent request is sent once more as `app_exchange` says
//!   (hyper sent any request again that it had not written yet: a bodiless `POST` whose idle
//!   connection the app closed just then is now a 502, unless the pool saw it closed first);
//! - a body of known length keeps its `Content-Length`, an empty one too (hyper's HTTP/2
//!   server adds none to a body that has ended from the start);
//! - a body that waits for the app holds no buffer.
//!
//! Not here: deadlines. The worker cuts a body that stalls (its `response_body`); the agent
//! has none of its own (as hyper's client had none): an exchange ends when the worker resets
//! its stream.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Request, Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use hyper::ext::ReasonPhrase;
use tokio::net::TcpStream;

use crate::app_exchange::{self, poll_read_some, push_field, start_request};
use crate::app_exchange::{AppConnections, BodyReads, RelayError, ResponseHead};
use crate::http1_body::Body as Framing;
use crate::http1_body::{BodyError, Decoder, Piece};

/// `request`'s head as the app gets it: the caller has prepared its fields (a `Host` among
/// them), and its URI's path and query are the request target.
pub fn request_head<B>(request: &Request<B>) -> Vec<u8> {
    let (path, query) = (request.uri().path(), request.uri().query());
    let mut out = start_request(request.method(), path, query);
    for (name, value) in request.headers() {
        push_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Sends `request` (see [`request_head`]; a `HEAD` if `to_head`; sent again on a new
/// connection if `idempotent` and its idle one turns out closed) on a connection from
/// `connections`, and returns the app's response head, with a body that reads the rest and
/// gives the connection back to `connections` once it has ended whole.
pub async fn fetch<C: AppConnections>(
    connections: C,
    request: &[u8],
    to_head: bool,
    idempotent: bool,
) -> Result<Response<RelayedBody<C>>, C::Error> {
    let (backend, buffer, mut response) =
        app_exchange::send::<Response<()>, C>(&connections, request, to_head, idempotent).await?;
    if let Framing::Length(length) = response.body {
        // Set here, though hyper's server would set it from the body's size: its HTTP/2 server
        // sets none for a body that has ended from the start (a length of 0), and its own
        // costs two allocations to this one.
        let mut digits = itoa::Buffer::new();
        let length = HeaderValue::from_bytes(digits.format(length).as_bytes())
            .expect("digits are a header value");
        response.head.headers_mut().insert(CONTENT_LENGTH, length);
    }
    let body = RelayedBody {
        backend: Some(backend),
        buffer,
        decoder: Decoder::keeping_trailers(response.body),
        keep_alive: response.keep_alive,
        reads: BodyReads::default(),
        connections,
    };
    Ok(response.head.map(|()| body))
}

impl ResponseHead for Response<()> {
    fn start(status: StatusCode, reason: &[u8], _: usize) -> Self {
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
/// goes back to where it came from once the body has ended whole.
pub struct RelayedBody<C: AppConnections> {
    /// Until the body has ended or failed.
    backend: Option<TcpStream>,
    /// What was read of the app's connection and not passed on yet.
    buffer: BytesMut,
    decoder: Decoder,
    /// Whether the app keeps the connection after this response.
    keep_alive: bool,
    /// What the next read asks for.
    reads: BodyReads,
    connections: C,
}

impl<C: AppConnections> RelayedBody<C> {
    /// Gives the connection back if the body has ended whole and nothing came after it (the
    /// app is not to be trusted with another request otherwise); drops it if not.
    fn let_go(&mut self) {
        let backend = self.backend.take();
        if let Some(backend) = backend {
            if self.keep_alive && self.decoder.ended() && self.buffer.is_empty() {
                self.connections.put(backend);
            }
        }
    }

    /// The body failed: its connection is not used again.
    fn failed(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.backend = None;
        Poll::Ready(Some(Err(e)))
    }
}

impl<C: AppConnections> Drop for RelayedBody<C> {
    fn drop(&mut self) {
        // hyper polls no body that has ended from the start (HEAD, 204, 304, a length of 0).
        self.let_go();
    }
}

impl<C: AppConnections + Unpin> Body for RelayedBody<C> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            match this.decoder.next(&mut this.buffer) {
                Ok(Some(Piece::Data(data))) => {
                    // The last: hyper asks no more of a body that says it has ended, and
                    // the connection is free now, however long the client takes this piece.
                    if this.decoder.ended() {
                        this.let_go();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
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
            let read = poll_read_some(backend, &mut this.buffer, this.reads.size(), cx);
            match ready!(read) {
                Ok(0) => {
                    this.backend = None;
                    return match this.decoder.closed() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e))),
                    };
                }
                Ok(read) => this.reads.took(read),
                Err(e) => {
                    return this.failed(BodyError::Broken(format!("reading from the app: {e}")))
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
