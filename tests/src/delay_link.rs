//! A long network path on loopback: a TCP forwarder that holds every byte for a fixed time
//! each way before passing it on, as a link to a distant host would (this machine's kernel has
//! no `netem` to delay packets). The round trip through it is twice that delay.
//!
//! Like a TCP connection across such a link, it keeps at most [`MAX_IN_FLIGHT`] bytes
//! unacknowledged each way (what Linux's default largest send buffer lets TCP have), a byte
//! counting from its read until a round trip later, so that a plain TCP relay through it
//! (rathole's data channel) is held to about what TCP would get, not given an endless buffer.
//! It models no more of TCP: no slow start, no loss, and a connection through it is set up at
//! once. It records the most bytes it ever had in flight each way ([`DelayLink::peaks`]): what
//! the two ends' flow control let them send ahead.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// The most bytes each direction of a connection holds: Linux's default `tcp_wmem` maximum.
pub const MAX_IN_FLIGHT: usize = 4 << 20;
/// The most one read takes, so that bytes move on in pieces as segments would.
const PIECE: usize = 64 << 10;

/// A forwarder on 127.0.0.1 to a given address; stops when dropped (with its connections).
pub struct DelayLink {
    pub port: u16,
    peaks: Arc<Peaks>,
    task: JoinHandle<()>,
}

/// The most bytes in flight in one direction of one connection, over all of them so far.
#[derive(Default)]
struct Peaks {
    /// From the side that connected to the link to the side it forwards to.
    forward: AtomicUsize,
    /// The other way.
    back: AtomicUsize,
}

impl DelayLink {
    /// Forwards each connection to `to`, delaying each direction by `one_way`.
    pub async fn start(to: SocketAddr, one_way: Duration) -> std::io::Result<DelayLink> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let peaks = Arc::new(Peaks::default());
        let counted = peaks.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let Ok((near, _)) = listener.accept().await else {
                    // Out of descriptors, say: a while later there may be some.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let peaks = counted.clone();
                connections.spawn(async move {
                    let Ok(far) = TcpStream::connect(to).await else {
                        return;
                    };
                    let _ = (near.set_nodelay(true), far.set_nodelay(true));
                    let (near_read, near_write) = near.into_split();
                    let (far_read, far_write) = far.into_split();
                    tokio::join!(
                        delayed(near_read, far_write, one_way, &peaks.forward),
                        delayed(far_read, near_write, one_way, &peaks.back),
                    );
                });
            }
        });
        Ok(DelayLink { port, peaks, task })
    }

    /// The most bytes one connection ever had in flight through it: (forward, back), forward
    /// being from the side that connected.
    pub fn peaks(&self) -> (usize, usize) {
        (
            self.peaks.forward.load(Ordering::Relaxed),
            self.peaks.back.load(Ordering::Relaxed),
        )
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to`, each piece `delay` after it was read, until `from` ends (then
/// shuts `to` down, as late) or either fails. A piece holds its room in the link for twice
/// `delay`: there and back. Raises `peak` to the most bytes held at once.
async fn delayed(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    delay: Duration,
    peak: &AtomicUsize,
) {
    let room = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let (pieces, mut arriving) = mpsc::unbounded_channel();
    let reading = {
        let room = room.clone();
        async move {
            let mut buffer = vec![0; PIECE];
            loop {
                let Ok(mut permit) = room.clone().acquire_many_owned(PIECE as u32).await else {
                    break;
                };
                let n = from.read(&mut buffer).await.unwrap_or(0);
                // What the piece does not use is room for the next one.
                drop(permit.split(PIECE - n));
                peak.fetch_max(MAX_IN_FLIGHT - room.available_permits(), Ordering::Relaxed);
                let piece = Bytes::copy_from_slice(&buffer[..n]);
                if pieces
                    .send((Instant::now() + delay, piece, permit))
                    .is_err()
                    || n == 0
                {
                    break;
                }
            }
        }
    };
    let writing = async move {
        while let Some((due, piece, permit)) = arriving.recv().await {
            tokio::time::sleep_until(due).await;
            if piece.is_empty() {
                let _ = to.shutdown().await;
                break;
            }
            if to.write_all(&piece).await.is_err() {
                break;
            }
            // Its room comes back when the acknowledgement would: one more way later.
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                drop(permit);
            });
        }
        room.close();
    };
    tokio::join!(reading, writing);
}
