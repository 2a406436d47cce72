//! The backend's response body on its way to the client, with a read timeout: a backend that
//! sends its response head and then stalls would otherwise hold the client forever with nothing
//! arriving. When no byte of the body comes for the timeout (`backend_timeout`, 60 s by default,
//! as nginx's `proxy_read_timeout`), the body fails, and hyper closes the client's HTTP/1
//! connection (or resets the HTTP/2 stream): the client sees a cut response, not a complete one.
//!
//! A response through a tunnel also holds its lease on the agent connection, so the connection
//! counts the request in flight (for the balancing) until the body has ended.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::warn;

use crate::proxy::Upstream;
use crate::read_deadline::ReadDeadline;
use crate::tunnels::Lease;

/// Why a response body stopped short.
#[derive(Debug, thiserror::Error)]
pub enum ResponseBodyError {
    #[error(transparent)]
    Backend(#[from] hyper::Error),
    #[error("the backend sent no byte of its response body for {0:?}")]
    Stalled(Duration),
}

/// A backend's response body, failing once no byte arrives for `read_timeout`.
pub struct ResponseBody {
    inner: Incoming,
    deadline: ReadDeadline,
    /// For the log line when it stalls.
    upstream: Upstream,
    /// A tunnel's agent connection, released when the body ends.
    lease: Option<Lease>,
}

impl ResponseBody {
    pub fn new(inner: Incoming, read_timeout: Duration, upstream: Upstream) -> Self {
        ResponseBody {
            inner,
            deadline: ReadDeadline::new(read_timeout),
            upstream,
            lease: None,
        }
    }

    /// Holds `lease` until the body ends (or is dropped, the client gone).
    pub fn holding(mut self, lease: Option<Lease>) -> Self {
        self.lease = lease;
        self
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
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.deadline.moved();
            // hyper polls no further once the body says it has ended.
            if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
                this.lease = None;
            }
            return Poll::Ready(frame.map(|f| f.map_err(ResponseBodyError::Backend)));
        }
        if !this.deadline.poll_expired(cx) {
            return Poll::Pending;
        }
        this.lease = None;
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
