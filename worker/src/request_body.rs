//! The client's request body on its way to the backend, watched so the proxy knows three things
//! hyper's client cannot tell it:
//!
//! - when the body has ended: the backend's time to answer counts from there, so an upload
//!   slower than `backend_timeout` to a healthy backend is not cut with a 504;
//! - when a piece of it last moved, and whether the proxy is waiting for the client or for the
//!   backend to take more: an upload that moves no byte for the timeout is ended, blaming the
//!   side that stalled (nginx: `client_body_timeout` and `proxy_send_timeout`, both 60 s);
//! - whether it failed on the client's side (a malformed chunk size, a client that went away):
//!   hyper's client reports that as its own error, which would otherwise read as the backend's.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

/// A client's request body as sent to a backend.
pub struct RequestBody {
    inner: Incoming,
    /// `None` for a body that was empty from the start (most requests): nothing to watch.
    upload: Option<Arc<Shared>>,
}

/// What the proxy sees of a [`RequestBody`] being sent.
pub struct Upload(Arc<Shared>);

struct Shared {
    start: Instant,
    /// When a frame last passed, in milliseconds since `start`.
    moved_ms: AtomicU64,
    /// Whether the backend asked for more and the client has not sent it yet.
    waiting_on_client: AtomicBool,
    /// Set once: `None` the body ended whole, `Some` why the client's side failed.
    outcome: OnceLock<Option<String>>,
    ended: Notify,
}

impl RequestBody {
    /// Wraps `inner`; the [`Upload`] to watch, unless the body is already complete.
    pub fn new(inner: Incoming) -> (Self, Option<Upload>) {
        if inner.is_end_stream() {
            return (
                RequestBody {
                    inner,
                    upload: None,
                },
                None,
            );
        }
        let shared = Arc::new(Shared {
            start: Instant::now(),
            moved_ms: AtomicU64::new(0),
            waiting_on_client: AtomicBool::new(false),
            outcome: OnceLock::new(),
            ended: Notify::new(),
        });
        let upload = Upload(shared.clone());
        (
            RequestBody {
                inner,
                upload: Some(shared),
            },
            Some(upload),
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        let Some(shared) = &this.upload else {
            return poll;
        };
        match &poll {
            Poll::Pending => shared.waiting_on_client.store(true, Ordering::Relaxed),
            Poll::Ready(Some(Ok(frame))) => {
                shared.moved();
                // hyper's client stops polling once `is_end_stream` says so.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    shared.end(None);
                }
            }
            Poll::Ready(Some(Err(e))) => shared.end(Some(e.to_string())),
            Poll::Ready(None) => shared.end(None),
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Shared {
    fn moved(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.moved_ms.fetch_max(ms, Ordering::Relaxed);
        self.waiting_on_client.store(false, Ordering::Relaxed);
    }

    fn end(&self, outcome: Option<String>) {
        if self.outcome.set(outcome).is_ok() {
            self.ended.notify_waiters();
        }
    }
}

impl Upload {
    /// Resolves once the body has ended, whole or failed on the client's side.
    pub async fn ended(&self) {
        let notified = self.0.ended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.0.outcome.get().is_none() {
            notified.await;
        }
    }

    /// Why the body failed on the client's side, if it did.
    pub fn client_error(&self) -> Option<&str> {
        self.0.outcome.get().and_then(Option::as_deref)
    }

    /// When the upload will have moved no byte for `timeout`, unless one moves before.
    pub fn stalled_at(&self, timeout: Duration) -> Instant {
        self.0.start + Duration::from_millis(self.0.moved_ms.load(Ordering::Relaxed)) + timeout
    }

    /// Whether a stall now is the client's doing (the backend asked for more), not the backend's.
    pub fn waiting_on_client(&self) -> bool {
        self.0.waiting_on_client.load(Ordering::Relaxed)
    }
}
