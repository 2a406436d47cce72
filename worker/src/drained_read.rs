//! Reading a TCP socket without the system call that finds it empty.
//!
//! tokio forgets a socket's readiness only when a read fails with `WouldBlock`. After a read
//! that took all there was, the next wait for readability returns at once and the read after
//! it finds nothing: one `EAGAIN` system call per read, two of a proxied keep-alive request's
//! ten (the client's socket and the app's).
//!
//! A TCP read that returns less than it had room for has emptied the socket's receive queue,
//! so its readiness can be forgotten right there. That is done through `try_io`, whose
//! closure reports such a read as `WouldBlock` (the bytes are in the buffer): tokio then
//! clears the readiness it saw before the read, and only that. Bytes that arrive after the
//! read raise a new edge, which the runtime records as new readiness (a new tick, which the
//! clearing leaves alone), so no wake-up is lost.

use std::io;

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Reads what `stream` has into `buffer`, with room for `size` more made first; `Ok(0)` at
/// its end. While it waits, a buffer with nothing in it holds no memory (an idle keep-alive
/// connection, a long poll).
pub async fn read(stream: &TcpStream, buffer: &mut BytesMut, size: usize) -> io::Result<usize> {
    loop {
        if buffer.is_empty() && buffer.capacity() > 0 {
            *buffer = BytesMut::new();
        }
        stream.readable().await?;
        if buffer.capacity() - buffer.len() < size / 4 {
            buffer.reserve(size);
        }
        let room = buffer.capacity() - buffer.len();
        let mut taken = None;
        let read = stream.try_io(Interest::READABLE, || {
            let n = stream.try_read_buf(buffer)?;
            taken = Some(n);
            match n {
                // Emptied: as if the next read had found nothing (see the module's comment).
                1.. if n < room => Err(io::ErrorKind::WouldBlock.into()),
                _ => Ok(n),
            }
        });
        match (taken, read) {
            (Some(n), _) => return Ok(n),
            (None, Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
            (None, read) => return read,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// Bytes that come in many small writes, some right after a read emptied the socket,
    /// others while the reader waits, are all read, none waited for in vain: with the runtime's
    /// I/O driver on another thread, racing the clearing of readiness.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_byte_is_waited_for_in_vain() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        writer.set_nodelay(true).unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        let total: usize = (0..3000).map(|i| 1 + i % 97).sum();
        let written = tokio::spawn(async move {
            for i in 0..3000 {
                writer.write_all(&vec![7; 1 + i % 97]).await.unwrap();
                if i % 3 == 0 {
                    tokio::task::yield_now().await;
                }
                if i % 500 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            writer
        });
        let read_all = async {
            let mut got = 0;
            let mut buffer = BytesMut::new();
            while got < total {
                let n = read(&reader, &mut buffer, 4096).await.unwrap();
                assert!(n > 0, "ended early");
                got += n;
                buffer.clear();
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(20), read_all).await;
        assert_eq!(got.expect("a byte was waited for in vain"), total);
        drop(written.await.unwrap());
    }

    /// A read that fills its room leaves the rest to the next read, at once.
    #[tokio::test]
    async fn a_full_read_leaves_the_rest_ready() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        writer.write_all(&[1; 10_000]).await.unwrap();
        let mut buffer = BytesMut::new();
        let mut got = 0;
        // The writer stays: no end, no new bytes, to wake a reader that waits in vain.
        let read_all = async {
            while got < 10_000 {
                got += read(&reader, &mut buffer, 1024).await.unwrap();
            }
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(10), read_all).await;
        assert_eq!(got.expect("the rest was waited for"), 10_000);
    }
}
