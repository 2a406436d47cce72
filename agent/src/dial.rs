//! Dialing core-server and asking to become a tunnel: TCP, then TLS (SNI the tunnel domain,
//! ALPN `http/1.1` only), then the HTTP/1.1 upgrade on [`TUNNEL_PATH`] with the token. A `101`
//! hands back the raw connection, which the agent then serves HTTP/2 on (the reversal).

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

use core_server_proto::tunnel::{AGENT_LABEL_HEADER, NONCE_HEADER, TUNNEL_PATH, UPGRADE_PROTOCOL};

use crate::config::Settings;

/// The most a dial may take, from the TCP connect to the `101`.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection the worker accepted as a tunnel.
pub(crate) struct Tunnel {
    pub io: Upgraded,
    /// The worker's nonce from the `101`: its control stream carries it.
    pub nonce: String,
    pub peer: SocketAddr,
    /// From the upgrade request to the `101`: the tunnel's round trip.
    pub round_trip: Duration,
}

impl Tunnel {
    /// The receive window of its streams, sized for its round trip.
    pub fn stream_window(&self) -> u32 {
        core_server_proto::tunnel::stream_window(self.round_trip)
    }
}

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DialError {
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("no tunnel within {DIAL_TIMEOUT:?} (connect, TLS and upgrade)")]
    Timeout,
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("HTTP handshake: {0}")]
    Http(#[from] hyper::Error),
    #[error("the token was refused (revoked, wrong, or the domain is no longer a tunnel)")]
    Refused,
    #[error("rate limited after too many refused tokens from this address")]
    RateLimited { retry_after: Option<Duration> },
    #[error("redirected to {0}: this port is not served in plaintext (core-server in release mode): drop --insecure-plaintext")]
    Redirected(String),
    #[error("answered {status} instead of switching to a tunnel: {}", said.as_deref().unwrap_or("is this core-server, and a version with tunnels?"))]
    Unexpected {
        status: StatusCode,
        /// The first line of the answer's body.
        said: Option<String>,
    },
    #[error("the 101 carries no {NONCE_HEADER}")]
    NoNonce,
}

impl DialError {
    /// The least wait the proxy asked for before the next try.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DialError::RateLimited { retry_after } => *retry_after,
            _ => None,
        }
    }
}

/// Dials `settings.connect` and asks to become a tunnel for `settings.domain`.
pub(crate) async fn dial(settings: &Settings) -> Result<Tunnel, DialError> {
    tokio::time::timeout(DIAL_TIMEOUT, dial_now(settings))
        .await
        .map_err(|_| DialError::Timeout)?
}

async fn dial_now(settings: &Settings) -> Result<Tunnel, DialError> {
    let tcp = TcpStream::connect(&settings.connect)
        .await
        .map_err(DialError::Connect)?;
    let peer = tcp.peer_addr().map_err(DialError::Connect)?;
    let _ = tcp.set_nodelay(true);
    let (io, nonce, round_trip) = match &settings.tls {
        Some((connector, name)) => {
            let tls = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(DialError::Tls)?;
            upgrade(TokioIo::new(tls), settings).await?
        }
        None => upgrade(TokioIo::new(tcp), settings).await?,
    };
    Ok(Tunnel {
        io,
        nonce,
        peer,
        round_trip,
    })
}

/// The upgrade request on an HTTP/1.1 connection; the upgraded connection, the nonce and the
/// round trip.
async fn upgrade<T>(io: T, settings: &Settings) -> Result<(Upgraded, String, Duration), DialError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!("tunnel handshake connection: {e}");
        }
    });
    let mut authorization = HeaderValue::try_from(format!("Bearer {}", settings.token.as_str()))
        .expect("a token is base64url");
    authorization.set_sensitive(true);
    let request = Request::get(TUNNEL_PATH)
        .header(header::HOST, settings.domain.as_str())
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, UPGRADE_PROTOCOL)
        .header(header::AUTHORIZATION, authorization)
        .header(AGENT_LABEL_HEADER, settings.label.as_str())
        .body(Empty::<bytes::Bytes>::new())
        .expect("a checked domain and label are valid header values");
    let sent = Instant::now();
    let response = sender.send_request(request).await?;
    let round_trip = sent.elapsed();
    match response.status() {
        StatusCode::SWITCHING_PROTOCOLS => {}
        StatusCode::UNAUTHORIZED => return Err(DialError::Refused),
        StatusCode::TOO_MANY_REQUESTS => {
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Err(DialError::RateLimited { retry_after });
        }
        status if status.is_redirection() && settings.tls.is_none() => {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("HTTPS");
            return Err(DialError::Redirected(location.to_owned()));
        }
        status => {
            let said = first_line(status, response.into_body()).await;
            return Err(DialError::Unexpected { status, said });
        }
    }
    let nonce = response
        .headers()
        .get(NONCE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or(DialError::NoNonce)?;
    let io = hyper::upgrade::on(response).await?;
    Ok((io, nonce, round_trip))
}

/// The first line of what the proxy said with a refusal (core-server says why: "this domain has
/// 64 agent connections already"), if it said so in a few lines of text; without the `status`
/// core-server's pages start with, which the error says already.
async fn first_line(status: StatusCode, body: Incoming) -> Option<String> {
    let said = Limited::new(body, 4096).collect().await.ok()?.to_bytes();
    let line = std::str::from_utf8(&said).ok()?.lines().next()?.trim();
    let line = line.strip_prefix(&format!("{status}: ")).unwrap_or(line);
    (!line.is_empty()).then(|| line.to_owned())
}
