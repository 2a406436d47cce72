//! What the connection loop in `http_server` knows of a client connection: when a byte last
//! moved (recorded by an IO wrapper), and whether it speaks HTTP/2.
//!
//! hyper closes an idle HTTP/1 keep-alive connection through its header-read timeout, but has
//! no idle timeout for HTTP/2: the loop asks [`Activity`] when the connection will have been
//! idle for the timeout, and closes it gracefully then (GOAWAY for HTTP/2), so a request still
//! in flight is never cut. The protocol decides how a draining worker closes it.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

/// When a connection last moved a byte (in milliseconds since it was accepted), and whether it
/// speaks HTTP/2, which decides how it is closed.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    http2: AtomicBool,
    http2_seen: Notify,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            http2_seen: Notify::new(),
        })
    }

    pub fn saw_http2(&self) {
        if !self.http2.swap(true, Ordering::Relaxed) {
            self.http2_seen.notify_one(); // kept as a permit if nobody waits yet
        }
    }

    /// Resolves once the connection has carried an HTTP/2 request (at once if it already has).
    pub async fn speaks_http2(&self) {
        self.http2_seen.notified().await
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// The instant the connection becomes idle for `timeout`, if nothing moves before.
    pub fn idle_at(&self, timeout: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + timeout
    }
}

/// `inner`, with every successful read or write of at least one byte recorded in `activity`.
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
