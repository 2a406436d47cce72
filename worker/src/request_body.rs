//! The client's request body on its way to the backend, watched so the proxy knows what
//! hyper's client cannot tell it:
//!
//! - when the body has ended: the backend's time to answer counts from there, so an upload
//!   slower than `backend_timeout` to a healthy backend is not cut with a 504;
//! - whether it failed on the client's side (a malformed chunk size, a client that went away,
//!   or one that sent no byte for the timeout, as nginx's `client_body_timeout`): hyper's client
//!   reports that as its own error, which would otherwise read as the backend's;
//! - when a piece of it last passed, and whether the backend is taking more: a backend that
//!   stops reading the upload is the proxy's to end (nginx: `proxy_send_timeout`), since the
//!   body, not being read, cannot time itself out.
//!
//! The body ends a client's stall itself, even after the response head (a backend may answer
//! before reading the whole upload): its backend connection is then closed, not held.
//!
//! Trailers pass end to end, so the client's claims about its origin are removed from them as
//! from the request's head (see `forwarding`): a backend merging trailers into headers must not
//! find an `X-Forwarded-For` of the client's making there.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::forwarding;
use crate::last_moment::LastMoment;
use crate::read_deadline::ReadDeadline;

/// Why a request body stopped short, on the client's side.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientBodyError {
    #[error("{0}")]
    Broken(String),
    #[error("the client sent no byte of its request body for {0:?}")]
    Stalled(Duration),
}

/// A client's request body as sent to a backend.
pub struct RequestBody {
    /// `None` for a request that came without a body (see `http1_fast_path`).
    inner: Option<Incoming>,
    /// `None` for a body that was empty from the start (most requests): nothing to watch.
    watch: Option<(Arc<Shared>, ReadDeadline)>,
}

/// What the proxy sees of a [`RequestBody`] being sent.
#[derive(Clone)]
pub struct Upload(Arc<Shared>);

struct Shared {
    /// When a frame last passed (or the body started).
    moved: LastMoment,
    /// Whether the backend asked for more and the client has not sent it yet.
    waiting_on_client: AtomicBool,
    /// Set once: `Ok` the body ended whole, `Err` it failed on the client's side.
    outcome: OnceLock<Result<(), ClientBodyError>>,
    ended: Notify,
}

/// Whether a client's request has no body (`None`: the fast path read it without one), or one
/// that has ended already (a length of 0, or HTTP/2's `END_STREAM` on the head): then there is
/// nothing to send, nor an [`Upload`] to watch.
pub fn is_none(body: &Option<Incoming>) -> bool {
    body.as_ref().is_none_or(Body::is_end_stream)
}

impl RequestBody {
    /// Wraps `inner`, failing it once the client sends no byte for `stall_timeout`; the
    /// [`Upload`] to watch, unless the body is already complete.
    pub fn new(inner: Option<Incoming>, stall_timeout: Duration) -> (Self, Option<Upload>) {
        if is_none(&inner) {
            return (RequestBody { inner, watch: None }, None);
        }
        let shared = Arc::new(Shared {
            moved: LastMoment::new(),
            waiting_on_client: AtomicBool::new(false),
            outcome: OnceLock::new(),
            ended: Notify::new(),
        });
        let upload = Upload(shared.clone());
        let watch = Some((shared, ReadDeadline::new(stall_timeout)));
        (RequestBody { inner, watch }, Some(upload))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let poll = Pin::new(&mut *inner)
            .poll_frame(cx)
            .map_ok(without_client_claims);
        let Some((shared, deadline)) = &mut this.watch else {
            return poll.map(|frame| frame.map(|f| f.map_err(ClientBodyError::broken)));
        };
        match poll {
            Poll::Pending => {
                shared.waiting_on_client.store(true, Ordering::Relaxed);
                if !deadline.poll_expired(cx) {
                    return Poll::Pending;
                }
                shared.fail(ClientBodyError::Stalled(deadline.timeout()))
            }
            Poll::Ready(Some(Ok(frame))) => {
                deadline.moved();
                shared.moved();
                // hyper's client stops polling once `is_end_stream` says so.
                if frame.is_trailers() || inner.is_end_stream() {
                    shared.end(Ok(()));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => shared.fail(ClientBodyError::broken(e)),
            Poll::Ready(None) => {
                shared.end(Ok(()));
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), Body::size_hint)
    }
}

/// `frame`, with the client's claims removed if it holds trailers.
fn without_client_claims(mut frame: Frame<Bytes>) -> Frame<Bytes> {
    if let Some(trailers) = frame.trailers_mut() {
        forwarding::remove_client_claims(trailers);
    }
    frame
}

impl ClientBodyError {
    fn broken(e: hyper::Error) -> Self {
        ClientBodyError::Broken(e.to_string())
    }
}

impl Shared {
    fn moved(&self) {
        self.moved.note();
        self.waiting_on_client.store(false, Ordering::Relaxed);
    }

    fn end(&self, outcome: Result<(), ClientBodyError>) {
        if self.outcome.set(outcome).is_ok() {
            self.ended.notify_waiters();
        }
    }

    /// Ends the body with `e`, as the frame to hand hyper's client.
    fn fail(&self, e: ClientBodyError) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        self.end(Err(e.clone()));
        Poll::Ready(Some(Err(e)))
    }
}

impl Upload {
    /// Whether the body has ended, whole or failed on the client's side.
    pub fn is_ended(&self) -> bool {
        self.0.outcome.get().is_some()
    }

    /// Resolves once the body has ended, whole or failed on the client's side.
    pub async fn ended(&self) {
        let notified = self.0.ended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.0.outcome.get().is_none() {
            notified.await;
        }
    }

    /// How the body failed on the client's side, if it did.
    pub fn client_error(&self) -> Option<&ClientBodyError> {
        self.0
            .outcome
            .get()
            .and_then(|outcome| outcome.as_ref().err())
    }

    /// The backend's time to take the body starts now: what went before (the wait for a
    /// tunnel's agent) was not the backend's.
    pub fn starts_now(&self) {
        self.0.moved.note();
    }

    /// When the backend, not reading, will have taken no byte for `timeout`; `None` while the
    /// proxy waits for the client instead (its stalls are the body's own to end).
    pub fn backend_stalled_at(&self, timeout: Duration) -> Option<Instant> {
        if self.0.waiting_on_client.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.0.moved.get() + timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue, Request, Response};
    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn the_clients_claims_are_removed_from_its_trailers() {
        let (client_io, server_io) = tokio::io::duplex(64 << 10);
        let (received, mut trailers) = mpsc::unbounded_channel();
        let service = service_fn(move |request: Request<Incoming>| {
            let received = received.clone();
            async move {
                let (body, _upload) =
                    RequestBody::new(Some(request.into_body()), Duration::from_secs(5));
                let collected = body.collect().await.unwrap();
                let _ = received.send(collected.trailers().cloned());
                Ok::<_, std::convert::Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(server_io), service);
        tokio::spawn(server);
        let (mut send, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .unwrap();
        tokio::spawn(connection);

        let (mut body, channel) = http_body_util::channel::Channel::<Bytes>::new(2);
        let request = Request::post("http://app.example/upload")
            .body(channel)
            .unwrap();
        let response = tokio::spawn(send.send_request(request));
        body.send_data(Bytes::from_static(b"data")).await.unwrap();
        let mut sent = HeaderMap::new();
        for (name, value) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
            (
                "core-server-tunnel-nonce",
                "0123456789abcdef0123456789abcdef",
            ),
            ("x-checksum", "1234"),
        ] {
            sent.insert(name, HeaderValue::from_static(value));
        }
        body.send_trailers(sent).await.unwrap();
        drop(body);
        response.await.unwrap().unwrap();
        let trailers = trailers.recv().await.unwrap().expect("the trailers arrive");
        let names: Vec<_> = trailers.keys().map(|name| name.as_str()).collect();
        assert_eq!(names, ["x-checksum"]);
    }
}
