//! A bounded HTTP/1.1 load that counts every kind of failure apart, for "zero failed requests"
//! checks: keep-alive clients (reconnecting when the server says `Connection: close`, as real
//! clients do) and clients opening a new connection per request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Outcomes, each kind of failure counted apart.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub connect_errors: u64,
    pub resets: u64,
    pub early_eofs: u64,
    pub non_2xx: u64,
    pub other_errors: u64,
}

impl Counts {
    pub fn failures(&self) -> u64 {
        self.connect_errors + self.resets + self.early_eofs + self.non_2xx + self.other_errors
    }

    fn add(&mut self, other: Counts) {
        self.ok += other.ok;
        self.connect_errors += other.connect_errors;
        self.resets += other.resets;
        self.early_eofs += other.early_eofs;
        self.non_2xx += other.non_2xx;
        self.other_errors += other.other_errors;
    }

    fn failed(&mut self, e: &hyper::Error) {
        let io_kind = std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .map(|io| io.kind());
        if e.is_incomplete_message() {
            self.early_eofs += 1;
        } else if matches!(
            io_kind,
            Some(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ) {
            self.resets += 1;
        } else {
            self.other_errors += 1;
        }
        eprintln!("load: request failed: {e:?}");
    }
}

/// A running load; [`Load::finish`] stops it and returns the counts.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: JoinSet<Counts>,
}

/// No request loop runs longer than this, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(120);

impl Load {
    /// `keep_alive` clients reusing connections and `fresh` clients connecting per request,
    /// all asking `127.0.0.1:port` for `Host: host`, back to back.
    pub fn start(port: u16, host: &str, keep_alive: usize, fresh: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = JoinSet::new();
        for reuse in std::iter::repeat_n(true, keep_alive).chain(std::iter::repeat_n(false, fresh))
        {
            clients.spawn(client(port, host.to_owned(), reuse, stop.clone()));
        }
        Load { stop, clients }
    }

    pub async fn finish(mut self) -> Counts {
        self.stop.store(true, Ordering::SeqCst);
        let mut total = Counts::default();
        while let Some(counts) = self.clients.join_next().await {
            total.add(counts.expect("load client panicked"));
        }
        total
    }
}

async fn client(port: u16, host: String, reuse: bool, stop: Arc<AtomicBool>) -> Counts {
    let mut counts = Counts::default();
    let started = Instant::now();
    let mut connection: Option<SendRequest<Full<Bytes>>> = None;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_DURATION {
        // A connection the server closed after its last answer (`Connection: close`) is not
        // a failure: make a new one, as every HTTP client does.
        if let Some(sender) = connection.as_mut() {
            if sender.ready().await.is_err() {
                connection = None;
            }
        }
        let sender = match connection.as_mut() {
            Some(sender) => sender,
            None => match connect(port).await {
                Ok(sender) => connection.insert(sender),
                Err(e) => {
                    eprintln!("load: connect failed: {e}");
                    counts.connect_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let mut request = Request::get("/load").header("host", &host);
        if !reuse {
            request = request.header("connection", "close");
        }
        let request = request.body(Full::default()).unwrap();
        match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                match response.into_body().collect().await {
                    Ok(_) if status.is_success() => counts.ok += 1,
                    Ok(_) => counts.non_2xx += 1,
                    Err(e) => counts.failed(&e),
                }
            }
            Err(e) => counts.failed(&e),
        }
        if !reuse {
            connection = None;
        }
    }
    counts
}

async fn connect(port: u16) -> std::io::Result<SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(sender)
}
