//! A bounded load that counts every kind of failure apart, for "zero failed requests" checks:
//! keep-alive clients (reconnecting when the server says `Connection: close` or sends an
//! HTTP/2 GOAWAY, as real clients do) and clients opening a new connection per request; over
//! plain HTTP/1.1, or HTTPS with HTTP/1.1 or HTTP/2 (each new connection a new handshake,
//! or a resumed one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::tls_client::{Sni, TlsClient};

/// Outcomes, each kind of failure counted apart.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub ok: u64,
    pub connect_errors: u64,
    pub resets: u64,
    pub early_eofs: u64,
    pub non_2xx: u64,
    pub other_errors: u64,
    /// Requests the connection closed under before sending them (hyper's "canceled": an
    /// HTTP/2 connection's GOAWAY crossed them), or that an HTTP/2 server's GOAWAY declared
    /// unprocessed (above its last stream id, RFC 9113 §6.8), sent again on a new connection,
    /// as browsers and hyper-util's pooled client do. Not failures: the server never saw them.
    pub retried: u64,
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
        self.retried += other.retried;
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

/// How the load's clients reach the server.
#[derive(Clone)]
pub enum Via {
    /// Plain HTTP/1.1 to this port.
    Http(u16),
    /// HTTPS to this port through `client` (which trusts the server's CA), SNI the `Host`;
    /// HTTP/2 if `http2`, else HTTP/1.1.
    Https {
        port: u16,
        client: TlsClient,
        http2: bool,
    },
}

impl Load {
    /// `keep_alive` clients reusing connections and `fresh` clients connecting per request,
    /// all asking `127.0.0.1:port` for `Host: host` over plain HTTP/1.1, back to back.
    pub fn start(port: u16, host: &str, keep_alive: usize, fresh: usize) -> Load {
        Self::start_via(Via::Http(port), host, keep_alive, fresh)
    }

    /// As [`Load::start`], reaching the server `via` HTTP or HTTPS.
    pub fn start_via(via: Via, host: &str, keep_alive: usize, fresh: usize) -> Load {
        // The protocol asked for, and only that one, whatever the server prefers.
        let via = match via {
            Via::Https {
                port,
                client,
                http2,
            } => Via::Https {
                port,
                client: client.alpn(if http2 { &["h2"] } else { &["http/1.1"] }),
                http2,
            },
            via => via,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = JoinSet::new();
        for reuse in std::iter::repeat_n(true, keep_alive).chain(std::iter::repeat_n(false, fresh))
        {
            clients.spawn(client(via.clone(), host.to_owned(), reuse, stop.clone()));
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

async fn client(via: Via, host: String, reuse: bool, stop: Arc<AtomicBool>) -> Counts {
    let mut counts = Counts::default();
    let started = Instant::now();
    let mut connection: Option<Sender> = None;
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
            None => match connect(&via, &host).await {
                Ok(sender) => connection.insert(sender),
                Err(e) => {
                    eprintln!("load: connect failed: {e}");
                    counts.connect_errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        match sender.send(&host, reuse).await {
            Ok(response) => {
                let status = response.status();
                match response.into_body().collect().await {
                    Ok(_) if status.is_success() => counts.ok += 1,
                    Ok(_) => counts.non_2xx += 1,
                    Err(e) => counts.failed(&e),
                }
            }
            Err(e) if e.is_canceled() || refused_unprocessed(&e) => {
                counts.retried += 1;
                connection = None;
                continue;
            }
            Err(e) => counts.failed(&e),
        }
        if !reuse {
            connection = None;
        }
    }
    counts
}

/// Whether `error` is an HTTP/2 stream that the server's GOAWAY left unprocessed (its id above
/// the GOAWAY's last stream id) or refused with REFUSED_STREAM: safe to send again.
fn refused_unprocessed(error: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(error).and_then(|e| e.downcast_ref::<h2::Error>())
    else {
        return false;
    };
    (h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR))
        || h2.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// One client connection, HTTP/1.1 or HTTP/2.
enum Sender {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Whether the connection can take another request (not closed, no GOAWAY).
    async fn ready(&mut self) -> hyper::Result<()> {
        match self {
            Sender::Http1(sender) => sender.ready().await,
            Sender::Http2(sender) => sender.ready().await,
        }
    }

    /// `GET /load` for `host`; over HTTP/1.1 `Connection: close` unless `reuse`.
    async fn send(&mut self, host: &str, reuse: bool) -> hyper::Result<http::Response<Incoming>> {
        match self {
            Sender::Http1(sender) => {
                let mut request = Request::get("/load").header("host", host);
                if !reuse {
                    request = request.header("connection", "close");
                }
                sender
                    .send_request(request.body(Full::default()).unwrap())
                    .await
            }
            Sender::Http2(sender) => {
                let request = Request::get(format!("https://{host}/load"));
                sender
                    .send_request(request.body(Full::default()).unwrap())
                    .await
            }
        }
    }
}

async fn connect(via: &Via, host: &str) -> std::io::Result<Sender> {
    let (port, tls) = match via {
        Via::Http(port) => (*port, None),
        Via::Https {
            port,
            client,
            http2,
        } => (*port, Some((client, *http2))),
    };
    let Some((client, http2)) = tls else {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        return http1_over(stream).await;
    };
    let stream = client
        .connect(port, &Sni::name(host))
        .await
        .map_err(|e| std::io::Error::other(format!("TLS handshake: {e:?}")))?;
    if !http2 {
        return http1_over(stream).await;
    }
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(Sender::Http2(sender))
}

async fn http1_over<S>(stream: S) -> std::io::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(connection);
    Ok(Sender::Http1(sender))
}

/// Raises this process's open-file soft limit to the hard one (children started after this
/// inherit it), and checks that `needed` descriptors fit.
pub fn raise_open_file_limit(needed: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    assert!(
        hard >= needed,
        "this test holds {needed} sockets; the hard open-file limit is {hard}"
    );
}
