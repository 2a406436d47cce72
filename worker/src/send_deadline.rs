//! A deadline for a client to take the response hyper writes to it (nginx's `send_timeout`):
//! on each HTTP/2 stream, and on each connection hyper serves (the fast path times its own
//! writes: `http1_response::within`). Without it, a client that stops reading (an HTTP/2 one
//! that leaves a stream's window at 0, hundreds of streams at once) holds each response's
//! backend connection or tunnel stream, and the kernel's buffers behind them, for as long as
//! it likes.
//!
//! A [`Deadline`] runs around a future and gives it up (drops it) once the response it writes
//! has waited for the client for the timeout with nothing moving; what waits and what moves is
//! told by a [`Progress`]:
//! - a connection (HTTP/1, or HTTP/2 as a whole): its IO, through [`WatchedIo`]. A write that
//!   has to wait starts the time; any byte written or read restarts it (a client still sending
//!   its upload is not cut for not reading yet). Dropping the connection closes it.
//! - an HTTP/2 stream (its future, as the connection's executor runs it: `local_tasks`): its
//!   response body, through [`Watched`]. hyper has no hook for it: a stream waiting for the
//!   client's window waits inside hyper for capacity and polls no body meanwhile. So the time
//!   runs while hyper holds a piece of the body it has not been able to send, and restarts
//!   when it asks for the next; pieces are at most [`PIECE`]. Dropping the stream's future
//!   resets the stream (`RST_STREAM`), and the body goes with it, letting go of what it comes
//!   on (the app's connection, the tunnel's stream).
//!
//! A timer is set only when such a wait begins, so a response sent at once costs none. A
//! client must take something per timeout: a byte of a connection, a piece of a stream (the
//! streams of one connection share its pace: at 32 KB/s, over a hundred streams each get a
//! piece a minute).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::futures::TaskLocalFuture;

use crate::read_deadline::ReadDeadline;

tokio::task_local! {
    static PROGRESS: Arc<Progress>;
}

/// The most of a body an HTTP/2 stream gets at once: a client must take this much per timeout
/// (a backend's read can bring far more, which a slow stream could take minutes over).
const PIECE: usize = 16 << 10;

/// What a [`Deadline`] goes by.
#[derive(Default)]
pub struct Progress {
    /// Moves whenever the client takes (or sends) something.
    moved: AtomicU64,
    /// Whether the response waits for the client.
    waiting: AtomicBool,
}

impl Progress {
    fn moved(&self) {
        self.moved.fetch_add(1, Ordering::Relaxed);
    }

    fn waiting(&self, waiting: bool) {
        self.waiting.store(waiting, Ordering::Relaxed);
    }
}

pin_project! {
    /// A connection's IO, telling its [`Progress`].
    pub struct WatchedIo<S> {
        #[pin]
        io: S,
        progress: Arc<Progress>,
    }
}

impl<S> WatchedIo<S> {
    pub fn new(io: S, progress: Arc<Progress>) -> Self {
        WatchedIo { io, progress }
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead> AsyncRead for WatchedIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let read = ready!(this.io.poll_read(cx, buf));
        if buf.filled().len() > before {
            this.progress.moved();
        }
        Poll::Ready(read)
    }
}

impl<S: AsyncWrite> WatchedIo<S> {
    /// Notes how a write (or flush) went: done, or waiting for the client.
    fn wrote<T>(progress: &Progress, written: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        progress.waiting(written.is_pending());
        if written.is_ready() {
            progress.moved();
        }
        written
    }
}

impl<S: AsyncWrite> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        Self::wrote(this.progress, this.io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        Self::wrote(this.progress, this.io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        Self::wrote(this.progress, this.io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        Self::wrote(this.progress, this.io.poll_shutdown(cx))
    }
}

pin_project! {
    /// An HTTP/2 response body telling the [`Progress`] of the stream it is sent on (see the
    /// module's doc), given in pieces of at most [`PIECE`].
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
                progress.waiting(false);
            }
        }
    }
}

impl<B> Watched<B> {
    /// Told to the [`Deadline::stream`] this is called under, if any (on HTTP/1, none: the
    /// connection's IO tells).
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
        progress.moved();
        let frame = if this.rest.is_empty() {
            let Poll::Ready(frame) = this.body.as_mut().poll_frame(cx) else {
                // Waiting for the backend, not the client.
                progress.waiting(false);
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
        // Until hyper asks again (or drops the body, after the last piece) it holds this one,
        // which it may have to wait to send: the last too (hyper keeps it until the client's
        // window opens).
        progress.waiting(matches!(&frame, Some(Ok(_))));
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

/// The client took nothing of a response for the send timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client took nothing of the response for {0:?}")]
pub struct TimedOut(pub Duration);

pin_project! {
    /// A future serving responses, given up when the client takes nothing of them for
    /// `timeout` (see the module's doc).
    pub struct Deadline<F> {
        #[pin]
        inner: F,
        progress: Arc<Progress>,
        // Runs while the response waits; restarted when `progress` moves past `seen`.
        deadline: ReadDeadline,
        seen: u64,
    }
}

impl<F: Future> Deadline<F> {
    /// For an HTTP/2 stream's future: its response body (a [`Watched`] made in it) tells.
    pub fn stream(inner: F, timeout: Duration) -> Deadline<TaskLocalFuture<Arc<Progress>, F>> {
        let progress = Arc::new(Progress::default());
        Deadline::connection(PROGRESS.scope(progress.clone(), inner), progress, timeout)
    }

    /// For a connection's future, whose IO (a [`WatchedIo`]) tells `progress`.
    pub fn connection(inner: F, progress: Arc<Progress>, timeout: Duration) -> Self {
        Deadline {
            inner,
            progress,
            deadline: ReadDeadline::new(timeout),
            seen: 0,
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
        if let Poll::Ready(output) = this.inner.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if !this.progress.waiting.load(Ordering::Relaxed) {
            return Poll::Pending;
        }
        let moved = this.progress.moved.load(Ordering::Relaxed);
        if *this.seen != moved {
            *this.seen = moved;
            this.deadline.moved();
        }
        if !this.deadline.poll_expired(cx) {
            return Poll::Pending;
        }
        Poll::Ready(Err(TimedOut(this.deadline.timeout())))
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
            // Held until asked for the next, the last too.
            assert!(progress.waiting.load(Ordering::Relaxed), "after {pieces:?}");
        }
        assert_eq!(pieces, [PIECE, PIECE, 10]);
        assert!(!progress.waiting.load(Ordering::Relaxed));
        // Three pieces, and the end.
        assert_eq!(progress.moved.load(Ordering::Relaxed), 4);
        drop(body);
        assert!(!progress.waiting.load(Ordering::Relaxed));
    }
}
