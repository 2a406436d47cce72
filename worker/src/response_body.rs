//! The backend's response body on its way to the client, with a read timeout: a backend that
//! sends its response head and then stalls would otherwise hold the client forever with nothing
//! arriving. When no byte of the body comes for the timeout (`backend_timeout`, 60 s by default,
//! as nginx's `proxy_read_timeout`), the body fails, and hyper closes the client's HTTP/1
//! connection (or resets the HTTP/2 stream): the client sees a cut response, not a complete one.
//!
//! The body also holds what it comes on until it has ended: from an app on a local port, the
//! backend connection, which it drives (see `backend_pool`) and then gives back to the pool; through
//! a tunnel, the lease on the agent connection, which counts the request in flight (for the
//! balancing). A body relayed from the app's connection (see `core_server_proto::relayed_body`)
//! holds its connection itself.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::warn;

use core_server_proto::http1_body::BodyError;
use core_server_proto::logging::describe;
use core_server_proto::relayed_body::RelayedBody;

use crate::backend_pool::{BackendPool, Pooled, PortConnections};
use crate::proxy::Upstream;
use crate::read_deadline::ReadDeadline;
use crate::tunnels::Lease;

/// A backend's body as it comes: through hyper's client, or read from the app's connection
/// (see `core_server_proto::relayed_body`).
pub enum BackendBody {
    Hyper(Incoming),
    Relayed(RelayedBody<PortConnections<Arc<BackendPool>>>),
}

impl From<Incoming> for BackendBody {
    fn from(body: Incoming) -> Self {
        BackendBody::Hyper(body)
    }
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        match self.get_mut() {
            BackendBody::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            BackendBody::Relayed(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            BackendBody::Hyper(body) => body.is_end_stream(),
            BackendBody::Relayed(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BackendBody::Hyper(body) => body.size_hint(),
            BackendBody::Relayed(body) => body.size_hint(),
        }
    }
}

/// What a response body comes on, held until it has ended.
pub enum Holding {
    /// A connection to an app on a local port.
    Connection(Pooled),
    /// A lease on a tunnel's agent connection.
    Lease(Lease),
}

/// Why a response body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error(transparent)]
    Backend(#[from] hyper::Error),
    #[error(transparent)]
    Relayed(#[from] BodyError),
    #[error("the backend sent no byte of its response body for {0:?}")]
    Stalled(Duration),
}

/// A backend's response body, failing once no byte arrives for `read_timeout`.
pub struct ResponseBody {
    inner: BackendBody,
    deadline: ReadDeadline,
    /// For the log line when it stalls.
    upstream: Upstream,
    /// Released when the body ends.
    holding: Option<Holding>,
}

impl ResponseBody {
    pub fn new(inner: impl Into<BackendBody>, read_timeout: Duration, upstream: Upstream) -> Self {
        ResponseBody {
            inner: inner.into(),
            deadline: ReadDeadline::new(read_timeout),
            upstream,
            holding: None,
        }
    }

    /// Holds `holding` until the body ends (or is dropped, the client gone).
    pub fn holding(mut self, holding: Option<Holding>) -> Self {
        self.holding = holding;
        self
    }

    /// Lets go of what the body came on; `complete`: the body ended, so a backend connection
    /// can serve another request.
    fn release(&mut self, complete: bool) {
        match self.holding.take() {
            Some(Holding::Connection(mut connection)) => {
                connection.release(complete, self.deadline.timeout())
            }
            // The agent connection counts one request fewer in flight.
            Some(Holding::Lease(lease)) => drop(lease),
            None => {}
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper reads no body that says it has ended from the start (HEAD, 204, 304).
        let complete = self.inner.is_end_stream();
        self.release(complete);
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = ResponseBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ResponseBodyError>>> {
        let this = &mut *self;
        if let Some(Holding::Connection(connection)) = &mut this.holding {
            connection.drive(cx);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.deadline.moved();
            // hyper polls no further once the body says it has ended.
            match &frame {
                // Trailers are the last frame: hyper polls no further after them.
                Some(Ok(f)) if !f.is_trailers() && !this.inner.is_end_stream() => {}
                Some(Ok(_)) | None => this.release(true),
                Some(Err(e)) => {
                    this.release(false);
                    // The client gets a cut response; nginx logs this too ("upstream
                    // prematurely closed connection").
                    match e {
                        // It says so itself.
                        ResponseBodyError::Relayed(e) => warn!("{}: {e}", this.upstream),
                        e => warn!(
                            "{}: the response body broke off: {}",
                            this.upstream,
                            describe(e)
                        ),
                    }
                }
            }
            return Poll::Ready(frame);
        }
        if !this.deadline.poll_expired(cx) {
            return Poll::Pending;
        }
        this.release(false);
        let timeout = this.deadline.timeout();
        warn!(
            "{} sent no byte of its response body for {timeout:?}: cutting the response",
            this.upstream
        );
        Poll::Ready(Some(Err(ResponseBodyError::Stalled(timeout))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
