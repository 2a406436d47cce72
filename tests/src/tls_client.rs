//! A TLS client for tests (rustls through tokio-rustls): connect to a loopback port with a
//! chosen SNI (a name, an IP address, or none), trusting only the roots the test gives, offer
//! an ALPN list, and make one HTTP/1.1 or HTTP/2 request; or just handshake, to see the alert
//! a refused handshake ends with.
//!
//! One [`TlsClient`] keeps its TLS sessions (tickets) across connections, as a browser does,
//! so a second connection through it can resume the first one's session.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore, Resumption};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{
    ClientConfig, HandshakeKind, ProtocolVersion, RootCertStore, SupportedProtocolVersion,
};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// How long a handshake or a request may take before the test gives up on it: far above
/// `--acme-wait`'s default of 10 s, so it never decides a test by itself.
const TIMEOUT: Duration = Duration::from_secs(60);

/// What the ClientHello names.
#[derive(Debug, Clone)]
pub enum Sni {
    /// A DNS name: sent as SNI, and the certificate must be valid for it.
    Name(String),
    /// An IP address: never sent as SNI (RFC 6066); the certificate must be valid for it.
    Ip(IpAddr),
    /// No SNI extension at all (the certificate is checked against `localhost`).
    None,
}

impl Sni {
    pub fn name(name: &str) -> Self {
        Sni::Name(name.to_owned())
    }

    fn server_name(&self) -> ServerName<'static> {
        match self {
            Sni::Name(name) => ServerName::try_from(name.clone()).expect("a valid DNS name"),
            Sni::Ip(ip) => ServerName::IpAddress((*ip).into()),
            Sni::None => ServerName::try_from("localhost").unwrap(),
        }
    }
}

/// A client trusting only the given roots, with its own session store.
#[derive(Clone)]
pub struct TlsClient {
    roots: Arc<RootCertStore>,
    sessions: Arc<dyn ClientSessionStore>,
    /// Built once: rustls resumes a session only with the very verifier (the same `Arc`) that
    /// checked the server first, so every connection uses a clone of this one.
    config: Arc<ClientConfig>,
}

/// What one handshake negotiated.
#[derive(Debug, Clone)]
pub struct Session {
    /// The ALPN protocol the server chose (`h2`, `http/1.1`), if any.
    pub alpn: Option<String>,
    pub version: ProtocolVersion,
    /// Whether the session was resumed from an earlier one (a ticket) rather than made anew.
    pub resumed: bool,
    /// The server's certificate chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
}

/// A response read whole, with the session it came over.
#[derive(Debug)]
pub struct TlsReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
    pub session: Session,
}

/// Why a handshake failed: the TLS error (an alert the server sent shows as
/// `rustls::Error::AlertReceived`), or the connection failing beneath it.
#[derive(Debug)]
pub enum HandshakeError {
    Tls(rustls::Error),
    Io(std::io::Error),
    /// No outcome within [`TIMEOUT`]: the server neither finished nor refused the handshake.
    TimedOut,
}

impl TlsClient {
    /// Trusts only the certificates in the PEM files `roots`; offers ALPN `h2` and `http/1.1`,
    /// TLS 1.3 and 1.2.
    pub fn new(roots: &[&Path]) -> Self {
        let mut store = RootCertStore::empty();
        for path in roots {
            let certificates: Vec<_> = CertificateDer::pem_file_iter(path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()));
            assert!(
                !certificates.is_empty(),
                "no certificate in {}",
                path.display()
            );
            for certificate in certificates {
                store.add(certificate).unwrap();
            }
        }
        let roots = Arc::new(store);
        let sessions: Arc<dyn ClientSessionStore> = Arc::new(ClientSessionMemoryCache::new(64));
        let config = config(&roots, &sessions, rustls::ALL_VERSIONS);
        TlsClient {
            roots,
            sessions,
            config,
        }
    }

    /// Offers these ALPN protocols instead (none: no ALPN extension).
    pub fn alpn(mut self, protocols: &[&str]) -> Self {
        Arc::make_mut(&mut self.config).alpn_protocols =
            protocols.iter().map(|p| p.as_bytes().to_vec()).collect();
        self
    }

    /// Offers only these TLS versions (`&rustls::version::TLS12`, `&rustls::version::TLS13`).
    pub fn versions(mut self, versions: &[&'static SupportedProtocolVersion]) -> Self {
        let alpn = self.config.alpn_protocols.clone();
        self.config = config(&self.roots, &self.sessions, versions);
        Arc::make_mut(&mut self.config).alpn_protocols = alpn;
        self
    }

    /// This client's configuration for one connection, sharing its verifier and sessions.
    fn config_for(&self, sni: &Sni) -> Arc<ClientConfig> {
        let mut config = ClientConfig::clone(&self.config);
        config.enable_sni = !matches!(sni, Sni::None);
        Arc::new(config)
    }

    /// A new TLS connection to `127.0.0.1:port`, handshake done.
    pub async fn connect(
        &self,
        port: u16,
        sni: &Sni,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let attempt = async {
            let tcp = TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(HandshakeError::Io)?;
            TlsConnector::from(self.config_for(sni))
                .connect(sni.server_name(), tcp)
                .await
                .map_err(|error| {
                    match error
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<rustls::Error>())
                    {
                        Some(tls) => HandshakeError::Tls(tls.clone()),
                        None => HandshakeError::Io(error),
                    }
                })
        };
        tokio::time::timeout(TIMEOUT, attempt)
            .await
            .unwrap_or(Err(HandshakeError::TimedOut))
    }

    /// Handshakes with `127.0.0.1:port` and closes: what was negotiated, or why it failed.
    /// (A TLS 1.3 ticket arrives after the handshake: to resume later, use [`Self::get`].)
    pub async fn handshake(&self, port: u16, sni: &Sni) -> Result<Session, HandshakeError> {
        self.connect(port, sni).await.map(|tls| session(&tls))
    }

    /// `GET path` with `Host: host` over a new connection: HTTP/2 if the server chose `h2`,
    /// else HTTP/1.1. Panics if the handshake or the request fails.
    pub async fn get(&self, port: u16, sni: &Sni, host: &str, path: &str) -> TlsReply {
        self.try_get(port, sni, host, path)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake with port {port} ({sni:?}): {e:?}"))
    }

    /// [`Self::get`], but a failed handshake is returned (the request after it must work).
    pub async fn try_get(
        &self,
        port: u16,
        sni: &Sni,
        host: &str,
        path: &str,
    ) -> Result<TlsReply, HandshakeError> {
        let tls = self.connect(port, sni).await?;
        let session = session(&tls);
        let io = TokioIo::new(tls);
        let request = async {
            if session.alpn.as_deref() == Some("h2") {
                let (mut sender, connection) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                let request = Request::get(format!("https://{host}{path}"))
                    .body(Full::<Bytes>::default())
                    .unwrap();
                sender.send_request(request).await
            } else {
                let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                let request = Request::get(path)
                    .header("host", host)
                    .body(Full::<Bytes>::default())
                    .unwrap();
                sender.send_request(request).await
            }
        };
        let response = tokio::time::timeout(TIMEOUT, request)
            .await
            .unwrap_or_else(|_| panic!("no response from port {port} within {TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("request to port {port} ({host}{path}): {e}"));
        let (parts, body) = response.into_parts();
        let body = tokio::time::timeout(TIMEOUT, body.collect())
            .await
            .expect("the whole body in time")
            .expect("the whole body")
            .to_bytes();
        Ok(TlsReply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            session,
        })
    }
}

/// A configuration trusting `roots` for `versions`, offering `h2` and `http/1.1`, keeping its
/// sessions in `sessions`.
fn config(
    roots: &Arc<RootCertStore>,
    sessions: &Arc<dyn ClientSessionStore>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.resumption = Resumption::store(sessions.clone());
    Arc::new(config)
}

fn session(tls: &TlsStream<TcpStream>) -> Session {
    let (_, connection) = tls.get_ref();
    Session {
        alpn: connection
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned()),
        version: connection.protocol_version().expect("handshake done"),
        resumed: connection.handshake_kind() == Some(HandshakeKind::Resumed),
        chain: connection.peer_certificates().unwrap_or_default().to_vec(),
    }
}
