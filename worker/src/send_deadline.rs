//! A deadline for a client to take the response hyper writes to it (nginx's `send_timeout`):
//! each HTTP/2 stream, and HTTP/1 responses hyper writes (the fast path times its own writes:
//! `http1_response::within`). Without it, a client that stops reading (an HTTP/2 one that
//! leaves a stream's window at 0, hundreds of streams at once) holds each response's backend
//! connection or tunnel stream, and the kernel's buffers behind them, for as long as it likes.
//!
//! hyper has no hook for it: a stream waiting for the client's window waits inside hyper for
//! capacity, and polls no body meanwhile. So the deadline is kept in two places that share a
//! [`Progress`], found through a task-local value:
//! - [`Watched`], the response body, records each time hyper takes a piece of it, and whether
//!   hyper holds a piece it has not come back from (sending it, or waiting to);
//! - [`Deadline`], around what hyper polls the body in (an HTTP/2 stream's future, as the
//!   connection's executor runs it: `local_tasks`; an HTTP/1 connection), times how long it
//!   waits while hyper holds a piece. A piece taken restarts the time; when it runs out, the
//!   future is dropped: hyper resets the HTTP/2 stream (or the HTTP/1 connection closes), and
//!   the body goes with it, letting go of what it comes on.
//!
//! A timer is set only when such a wait begins, so a response sent at once costs none. The time
//! is between two pieces of the body (as nginx's is between two writes), pieces of at most
//! [`PIECE`]: a client that takes less than that per timeout is cut.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

/// How far hyper has come with the response bodies of one stream (or HTTP/1 connection).
#[derive(Default)]
pub struct Progress {
    /// Pieces hyper has asked for.
    asked: AtomicU64,
    /// hyper holds a piece it has not come back for the next after.
    holding: AtomicBool,
}

/// The most of a body hyper gets at once: what a client must take within the timeout (a
/// backend's read can bring far more, which a slow reader could take minutes over).
const PIECE: usize = 64 << 10;

pin_project! {
    /// A response body that records its [`Progress`] for the [`Deadline`] it is polled under,
    /// in pieces of at most [`PIECE`].
    pub struct Watched<B> {
        #[pin]
        body: B,
        progress: Option<Arc<Progress>>,
        // The rest of a larger piece, to give next.
        rest: Bytes,
    }

    impl<B> PinnedDrop for Watched<B> {
        fn drop(this: Pin<&mut Self>) {
            // Gone (ended, or the stream reset): hyper holds nothing of it any more.
            if let Some(progress) = &this.progress {
                progress.holding.store(false, Ordering::Relaxed);
            }
        }
    }
}

impl<B> Watched<B> {
    /// Watched by the [`Deadline`] of the future this is called in, if any.
    pub fn new(body: B) -> Self {
        Watched {
            body,
            progress: PROGRESS.try_with(Arc::clone).ok(),
            rest: Bytes::new(),
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Watched<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let Some(progress) = this.progress else {
            return this.body.poll_frame(cx);
        };
        progress.asked.fetch_add(1, Ordering::Relaxed);
        let frame = if this.rest.is_empty() {
            let Poll::Ready(frame) = this.body.as_mut().poll_frame(cx) else {
                // Waiting for the backend, not the client.
                progress.holding.store(false, Ordering::Relaxed);
                return Poll::Pending;
            };
            frame.map(|frame| {
                frame.map(|frame| match frame.into_data() {
                    Ok(mut data) if data.len() > PIECE => {
                        *this.rest = data.split_off(PIECE);
                        Frame::data(data)
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                })
            })
        } else {
            let piece = this.rest.split_to(PIECE.min(this.rest.len()));
            Some(Ok(Frame::data(piece)))
        };
        // After the last piece hyper asks no more: what it then holds is in its buffers
        // (bounded, `max_send_buf_size`), and nothing behind it waits.
        let last = this.rest.is_empty() && this.body.is_end_stream();
        let holding = matches!(&frame, Some(Ok(_))) && !last;
        progress.holding.store(holding, Ordering::Relaxed);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

/// The client took no piece of a response for the send timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client took no part of the response for {0:?}")]
pub struct TimedOut(pub Duration);

pin_project! {
    /// A future that hyper polls response bodies in, given up when the client takes nothing
    /// for `timeout` (see the module's doc).
    pub struct Deadline<F> {
        #[pin]
        inner: F,
        progress: Arc<Progress>,
        timeout: Duration,
        // Set while hyper holds a piece, with `asked` then: restarted when that moves on.
        timer: Option<(Pin<Box<Sleep>>, u64)>,
    }
}

impl<F: Future> Deadline<F> {
    pub fn new(inner: F, timeout: Duration) -> Self {
        Deadline {
            inner,
            progress: Arc::default(),
            timeout,
            timer: None,
        }
    }

    /// The future within.
    pub fn inner(self: Pin<&mut Self>) -> Pin<&mut F> {
        self.project().inner
    }
}

impl<F: Future> Future for Deadline<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let inner = this.inner;
        if let Poll::Ready(output) = PROGRESS.sync_scope(this.progress.clone(), || inner.poll(cx)) {
            return Poll::Ready(Ok(output));
        }
        if !this.progress.holding.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        let asked = this.progress.asked.load(Ordering::Relaxed);
        let (timer, since) = match this.timer {
            Some((timer, since)) => {
                if *since != asked {
                    timer.as_mut().reset(Instant::now() + *this.timeout);
                }
                (timer, since)
            }
            None => {
                let timer = Box::pin(tokio::time::sleep(*this.timeout));
                let (timer, since) = this.timer.insert((timer, asked));
                (timer, since)
            }
        };
        *since = asked;
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(Err(TimedOut(*this.timeout)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn a_large_piece_is_given_in_pieces_and_the_body_still_says_its_size() {
        let progress = Arc::new(Progress::default());
        let watched = PROGRESS.scope(progress.clone(), async {
            Watched::new(Full::new(Bytes::from(vec![7u8; 2 * PIECE + 10])))
        });
        let mut body = watched.await;
        assert_eq!(body.size_hint().exact(), Some(2 * PIECE as u64 + 10));
        let mut pieces = Vec::new();
        while let Some(frame) = body.frame().await {
            pieces.push(frame.unwrap().into_data().unwrap().len());
            let holding = progress.holding.load(Ordering::Relaxed);
            assert_eq!(holding, !body.is_end_stream(), "after {pieces:?}");
        }
        assert_eq!(pieces, [PIECE, PIECE, 10]);
        // Three pieces, and the end.
        assert_eq!(progress.asked.load(Ordering::Relaxed), 4);
    }
}
