//! Splicing an upgraded (WebSocket) connection to its backend until either side closes, or
//! until no byte has moved either way for a timeout.
//!
//! Every byte either way passes through the client's side of the splice, so one IO wrapper
//! there notes when a byte last moved; the splice checks that clock only when the timeout
//! would have run out, so the copy itself reads no timer.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::last_moment::LastMoment;

/// Copies bytes both ways between `client` and `backend` until either side closes or nothing
/// moves for `idle_timeout`.
pub async fn splice<C, B>(client: C, mut backend: B, idle_timeout: Duration)
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let clock = Arc::new(LastMoment::new());
    let mut client = Noted {
        inner: client,
        clock: clock.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut backend);
    tokio::pin!(copy);
    let mut check_at = clock.get() + idle_timeout;
    loop {
        tokio::select! {
            result = copy.as_mut() => {
                if let Err(e) = result {
                    debug!("upgraded connection ended: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(check_at) => {
                check_at = clock.get() + idle_timeout;
                if check_at <= Instant::now() {
                    debug!("upgraded connection quiet for {idle_timeout:?}: closing");
                    return;
                }
            }
        }
    }
}

/// `inner`, with every read or write of at least one byte noted in `clock`.
struct Noted<T> {
    inner: T,
    clock: Arc<LastMoment>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Noted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.clock.note();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Noted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.clock.note();
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
