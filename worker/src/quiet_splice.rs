//! Splicing an upgraded (WebSocket) connection to its backend until either side closes, or
//! until no byte has moved either way for a timeout.
//!
//! Every byte either way passes through the client's side of the splice, so one IO wrapper
//! there notes when a byte last moved; the splice checks that clock only when the timeout
//! would have run out, so the copy itself reads no timer.
//!
//! An open WebSocket is mostly quiet, and there are many: the copy holds no buffer while
//! nothing moves. Each read lands in a buffer on the stack of the poll that made it and is
//! written on at once; only bytes the other side cannot take yet are kept, on the heap, until
//! it can (`tokio::io::copy_bidirectional` holds two 8 KiB buffers per splice for its whole
//! life: 16 KiB for every idle WebSocket).

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tracing::debug;

use crate::last_moment::LastMoment;

/// The most one read takes (as `tokio::io::copy`'s buffer).
const READ_SIZE: usize = 8 * 1024;

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
    let (mut up, mut down) = (OneWay::default(), OneWay::default());
    // As `copy_bidirectional`: done once both ways are (a side's end of stream passed on as a
    // write shutdown to the other), or at the first error.
    let copy = poll_fn(|cx| {
        let up_done = up.poll_copy(cx, &mut client, &mut backend)?.is_ready();
        let down_done = down.poll_copy(cx, &mut backend, &mut client)?.is_ready();
        if up_done && down_done {
            Poll::Ready(Ok::<_, io::Error>(()))
        } else {
            Poll::Pending
        }
    });
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

/// One way of the copy: what was read and not written yet, and how far it got.
#[derive(Default)]
struct OneWay {
    /// Read, not yet taken by the writer (from `written` on); empty, with no heap buffer, while
    /// the writer keeps up.
    unwritten: Vec<u8>,
    written: usize,
    /// Something was written since the writer was last flushed.
    to_flush: bool,
    read_done: bool,
    done: bool,
}

impl OneWay {
    /// Copies from `reader` to `writer` until `reader`'s end of stream has been passed on as
    /// `writer`'s shutdown (Ready), or neither can go on now (Pending).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        while !self.done {
            while self.written < self.unwritten.len() {
                let n = ready!(write_some(cx, writer, &self.unwritten[self.written..]))?;
                self.written += n;
                self.to_flush = true;
            }
            // Caught up: the heap buffer goes back.
            self.unwritten = Vec::new();
            self.written = 0;
            if self.read_done {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                self.done = true;
                break;
            }
            let mut stack = [MaybeUninit::<u8>::uninit(); READ_SIZE];
            let mut read = ReadBuf::uninit(&mut stack);
            if Pin::new(&mut *reader)
                .poll_read(cx, &mut read)?
                .is_pending()
            {
                if self.to_flush {
                    ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                    self.to_flush = false;
                }
                return Poll::Pending;
            }
            let data = read.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let taken = match write_some(cx, writer, data) {
                Poll::Ready(taken) => taken?,
                Poll::Pending => 0,
            };
            self.to_flush |= taken > 0;
            if taken < data.len() {
                self.unwritten = data[taken..].to_vec();
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes some of `bytes`; an error if the writer takes none.
fn write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    writer: &mut W,
    bytes: &[u8],
) -> Poll<io::Result<usize>> {
    let n = ready!(Pin::new(writer).poll_write(cx, bytes))?;
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    Poll::Ready(Ok(n))
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

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// Writes `bytes` to `to` then shuts it down, while reading all of `from` to its end.
    async fn send_and_receive(
        mut to: tokio::io::WriteHalf<DuplexStream>,
        mut from: tokio::io::ReadHalf<DuplexStream>,
        bytes: Vec<u8>,
    ) -> Vec<u8> {
        let write = async move {
            to.write_all(&bytes).await.unwrap();
            to.shutdown().await.unwrap();
        };
        let read = async move {
            let mut got = Vec::new();
            from.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(write, read).1
    }

    #[tokio::test]
    async fn bytes_go_both_ways_whole_through_sides_slower_than_a_read_and_ends_pass_on() {
        // The client's pipe holds 64 KiB, the backend's 16 bytes: a read from the client of up
        // to 8 KiB meets a writer that takes 16 bytes at a time, so most bytes wait in the
        // copy's kept buffer; 1 MiB of a pattern each way.
        let (client, client_side) = duplex(64 * 1024);
        let (backend_side, backend) = duplex(16);
        let splice = tokio::spawn(splice(client_side, backend_side, Duration::from_secs(30)));
        let up: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 241) as u8).collect();
        let (client_read, client_write) = tokio::io::split(client);
        let (backend_read, backend_write) = tokio::io::split(backend);
        let (at_backend, at_client) = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::join!(
                send_and_receive(client_write, backend_read, up.clone()),
                send_and_receive(backend_write, client_read, down.clone()),
            )
        })
        .await
        .expect("the splice stalled");
        assert!(at_backend == up, "the client's bytes arrived changed");
        assert!(at_client == down, "the backend's bytes arrived changed");
        // Both ends passed on: the splice is over.
        tokio::time::timeout(Duration::from_secs(5), splice)
            .await
            .expect("the splice did not end once both sides had")
            .unwrap();
    }
}
