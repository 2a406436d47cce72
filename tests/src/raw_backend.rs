//! A backend on raw TCP, for what a well-behaved HTTP server never does: it records each
//! request head exactly as it arrived (request line included), answers with fixed bytes, and
//! then neither closes nor answers more: it echoes whatever else it receives (the other end of a
//! WebSocket splice) until the peer closes. A response that promises more than it sends is a
//! backend that stalls after its head.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a connection to it lives at most, whatever happens.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// The longest request head it reads.
const MAX_HEAD: usize = 64 * 1024;

/// A raw TCP backend on 127.0.0.1; stops when dropped.
pub struct RawBackend {
    pub port: u16,
    heads: mpsc::UnboundedReceiver<String>,
    task: JoinHandle<()>,
}

impl RawBackend {
    /// Answers every request head with `answer`, then echoes.
    pub async fn start(answer: &'static [u8]) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (sender, heads) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sender = sender.clone();
                tokio::spawn(tokio::time::timeout(
                    CONNECTION_LIFETIME,
                    serve(stream, answer, sender),
                ));
            }
        });
        RawBackend { port, heads, task }
    }

    /// The next request head it received (up to the blank line), waiting up to 10 s.
    pub async fn next_head(&mut self) -> String {
        tokio::time::timeout(Duration::from_secs(10), self.heads.recv())
            .await
            .expect("a request reached the backend within 10s")
            .expect("the backend is running")
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut stream: TcpStream, answer: &[u8], heads: mpsc::UnboundedSender<String>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
    if stream.write_all(answer).await.is_err() {
        return;
    }
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
