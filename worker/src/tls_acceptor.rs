//! TLS on the HTTPS port: the ClientHello decides, before any certificate is touched.
//!
//! The ClientHello is read first (tokio-rustls `LazyConfigAcceptor`), and its SNI normalised
//! exactly as a Host header is ([`Domain`]). The routes table is the allowlist: no SNI (an
//! IP literal is sent as none), a name that is not a valid DNS name, or one that is not routed
//! fails at once with an alert, and nothing is asked of the ACME helper or any CA (an open
//! on-demand issuer is an abuse vector: anyone could make it order certificates). Then the
//! certificate: loaded already, or asked of the helper and waited for at most `--acme-wait`
//! (see `certificates`). A ClientHello offering `acme-tls/1` is a CA validating a
//! TLS-ALPN-01 challenge (see `acme_challenges`).
//!
//! Served: TLS 1.3 and 1.2, ALPN `h2` and `http/1.1`, session tickets that outlive the worker
//! (see `session_tickets`). The stream then goes to the same `HttpServer` as port 80.
//!
//! A plain HTTP request (`http://host:443/`, a common slip) gets a `400` that says so, as nginx
//! and Caddy answer it, rather than a TLS alert a browser or curl shows as garbage.

use std::sync::Arc;
use std::time::Duration;

use core_server_proto::domain::Domain;
use rustls::crypto::CryptoProvider;
use rustls::server::Acceptor;
use rustls::{AlertDescription, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, StartHandshake};

use crate::acme_challenges::{Challenges, ACME_TLS_ALPN};
use crate::certificates::{Certificates, Missing};
use crate::session_tickets::SessionTickets;

/// The one place the crypto provider is chosen, for TLS and for loading keys: aws-lc-rs,
/// rustls's default. Measured on this project's 2-core machine against ring, in-process
/// full handshakes with an ECDSA P-256 certificate, the server's CPU alone: TLS 1.3 with
/// X25519 about 12 000/s against 10 500/s, TLS 1.2 about 17 500/s against 12 000/s.
/// (aws-lc-rs also offers X25519MLKEM768 first, post-quantum, about 20% more CPU, to
/// clients that offer it.) Swap it here to measure another.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Why a handshake was not completed.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("TLS: {0}")]
    Tls(#[from] std::io::Error),
    #[error("no SNI (or an IP address): refused")]
    NoName,
    #[error("SNI {0:?} is not a domain name: refused")]
    BadName(String),
    #[error("SNI {0} is not a registered domain: refused")]
    NotRouted(Domain),
    #[error("ALPN acme-tls/1 for {0}, which has no TLS-ALPN-01 challenge pending: refused")]
    NoChallenge(Domain),
    #[error("{0}: {1}")]
    NoCertificate(Domain, Missing),
    #[error("a plain HTTP request on the HTTPS port: answered 400")]
    PlainHttp,
}

/// The answer to plain HTTP on the HTTPS port.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
    Content-Type: text/plain; charset=utf-8\r\n\
    Content-Length: 56\r\n\
    Connection: close\r\n\r\n\
    This port speaks HTTPS: the request came as plain HTTP.\n";
/// The most of the plain request read (and dropped) before closing, so that the close sends
/// no reset that could destroy the answer on its way.
const PLAIN_HTTP_DRAIN: usize = 64 << 10;

pub struct TlsAcceptor {
    certificates: Arc<Certificates>,
    challenges: Arc<Challenges>,
    /// For every handshake but validations: the certificate is found by `certificates`.
    config: Arc<ServerConfig>,
    certificate_wait: Duration,
}

impl TlsAcceptor {
    pub fn new(
        certificates: Arc<Certificates>,
        challenges: Arc<Challenges>,
        provider: Arc<CryptoProvider>,
        ticket_key: &[u8],
        certificate_wait: Duration,
    ) -> anyhow::Result<Self> {
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = Arc::new(SessionTickets::new(ticket_key)?);
        Ok(TlsAcceptor {
            certificates,
            challenges,
            config: Arc::new(config),
            certificate_wait,
        })
    }

    /// The handshake on a freshly accepted connection (the caller bounds its time).
    pub async fn accept(&self, mut stream: TcpStream) -> Result<TlsStream<TcpStream>, Refused> {
        if speaks_plain_http(&stream).await? {
            answer_plain_http(&mut stream).await;
            return Err(Refused::PlainHttp);
        }
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream).await?;
        let hello = start.client_hello();
        let validation = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN));
        let Some(sni) = hello.server_name() else {
            return Err(refuse(start, AlertDescription::HandshakeFailure, Refused::NoName).await);
        };
        let name = match Domain::parse(sni) {
            Ok(name) => name,
            Err(_) => {
                let why = Refused::BadName(sni.to_owned());
                return Err(refuse(start, AlertDescription::UnrecognisedName, why).await);
            }
        };
        let config = if validation {
            match self.challenges.tls_alpn(&name).await {
                Some(config) => config,
                None => {
                    let why = Refused::NoChallenge(name);
                    return Err(refuse(start, AlertDescription::HandshakeFailure, why).await);
                }
            }
        } else {
            match self.certificates.get(&name, self.certificate_wait).await {
                Ok(_) => {}
                Err(Missing::NotRouted) => {
                    let why = Refused::NotRouted(name);
                    return Err(refuse(start, AlertDescription::UnrecognisedName, why).await);
                }
                Err(missing) => {
                    let why = Refused::NoCertificate(name, missing);
                    return Err(refuse(start, AlertDescription::HandshakeFailure, why).await);
                }
            }
            self.config.clone()
        };
        Ok(start.into_stream(config).await?)
    }
}

/// Whether the client's first byte starts an HTTP method (uppercase letters) rather than a TLS
/// record (its content type, 20 to 24) or an SSL 2 hello (high bit set).
async fn speaks_plain_http(stream: &TcpStream) -> std::io::Result<bool> {
    let mut first = [0u8];
    let read = stream.peek(&mut first).await?;
    Ok(read == 1 && first[0].is_ascii_uppercase())
}

/// Answers plain HTTP with [`PLAIN_HTTP_ANSWER`] and closes, reading what came meanwhile.
async fn answer_plain_http(stream: &mut TcpStream) {
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() || stream.shutdown().await.is_err() {
        return;
    }
    let mut drained = 0;
    let mut buffer = [0u8; 4096];
    while drained < PLAIN_HTTP_DRAIN {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => drained += read,
        }
    }
}

/// Ends the handshake with a fatal alert, sent as the plaintext record a server sends before
/// its ServerHello (TLS 1.2 and 1.3 alike), then closes; `why`, for the caller to log.
async fn refuse(
    start: StartHandshake<TcpStream>,
    alert: AlertDescription,
    why: Refused,
) -> Refused {
    const ALERT: u8 = 21;
    const FATAL: u8 = 2;
    let record = [ALERT, 3, 3, 0, 2, FATAL, u8::from(alert)];
    let mut stream = start.io;
    let _ = stream.write_all(&record).await;
    let _ = stream.shutdown().await;
    why
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use core_server_proto::acme_ipc::{AcmeToWorker, Secret, WorkerToAcme};
    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::ipc::{FromWorker, ToWorker};
    use core_server_proto::routes::Routes;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsConnector;

    use crate::https::Https;
    use crate::route_table::RouteTable;

    type HelperEnd = Channel<AcmeToWorker, WorkerToAcme>;

    /// A CA, and certificates it issues.
    struct Ca {
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    impl Ca {
        fn new() -> Ca {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap());
            Ca {
                issuer: issuer.unwrap(),
            }
        }

        /// A chain and PKCS#8 key for `name`, as the helper sends them.
        fn issue(&self, name: &str) -> AcmeToWorker {
            let key = KeyPair::generate().unwrap();
            let leaf = CertificateParams::new(vec![name.to_owned()])
                .unwrap()
                .signed_by(&key, &self.issuer)
                .unwrap();
            AcmeToWorker::Certificate {
                name: Domain::parse(name).unwrap(),
                chain: vec![leaf.der().to_vec()],
                key: Secret(key.serialize_der()),
            }
        }

        fn client(&self, alpn: &[&[u8]]) -> ClientConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.issuer.der().clone()).unwrap();
            let mut config = ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            config
        }
    }

    /// A worker's TLS side: routes for `names`, serving on loopback.
    struct Worker {
        addr: std::net::SocketAddr,
        https: Https,
        routes: Arc<RouteTable>,
        _supervisor: Channel<ToWorker, FromWorker>,
    }

    impl Worker {
        async fn start(names: &[&str], ticket_key: &[u8], wait: Duration) -> Worker {
            let (ours, theirs) = socketpair_fds().unwrap();
            let routes: Routes = names
                .iter()
                .map(|n| (Domain::parse(n).unwrap(), 8080))
                .collect();
            let routes = Arc::new(RouteTable::new(
                routes,
                Arc::new(Channel::new(ours).unwrap()),
            ));
            let https = Https::new(routes.clone());
            let acceptor = Arc::new(https.acceptor(ticket_key, wait).unwrap());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(mut stream) = acceptor.accept(stream).await {
                            let alpn = stream.get_ref().1.alpn_protocol().unwrap_or(b"none");
                            let alpn = alpn.to_vec();
                            let _ = stream.write_all(&alpn).await;
                            let _ = stream.shutdown().await;
                        }
                    });
                }
            });
            Worker {
                addr,
                https,
                routes,
                _supervisor: Channel::new(theirs).unwrap(),
            }
        }

        /// A new link to a helper; the helper's end, once told the routed names (checked).
        async fn link_helper(&self) -> HelperEnd {
            let (ours, theirs) = socketpair_fds().unwrap();
            self.https.connect_helper(ours).unwrap();
            let helper = Channel::new(theirs).unwrap();
            assert_eq!(routed(&helper).await, self.routes.names());
            helper
        }

        /// A handshake for `sni`; what the server said after it (its ALPN) and how it went.
        async fn handshake(
            &self,
            config: &Arc<ClientConfig>,
            sni: &str,
        ) -> std::io::Result<(String, HandshakeKind)> {
            let tcp = TcpStream::connect(self.addr).await?;
            let name = ServerName::try_from(sni.to_owned()).unwrap();
            let mut tls = TlsConnector::from(config.clone())
                .connect(name, tcp)
                .await?;
            let mut said = String::new();
            tls.read_to_string(&mut said).await?;
            let kind = tls.get_ref().1.handshake_kind().unwrap();
            Ok((said, kind))
        }

        /// A handshake for `sni` in a task of its own, so several can wait at once: `Ok`
        /// once it is done.
        fn spawn_handshake(
            &self,
            config: &Arc<ClientConfig>,
            sni: &'static str,
        ) -> tokio::task::JoinHandle<std::io::Result<()>> {
            let (config, addr) = (config.clone(), self.addr);
            tokio::spawn(async move {
                let tcp = TcpStream::connect(addr).await?;
                let name = ServerName::try_from(sni).unwrap();
                TlsConnector::from(config)
                    .connect(name, tcp)
                    .await
                    .map(drop)
            })
        }
    }

    /// The routed names a new link starts with, each chunk at most `ROUTES_PER_MESSAGE`.
    async fn routed(helper: &HelperEnd) -> Vec<Domain> {
        let mut names = Vec::new();
        loop {
            match next(helper).await {
                WorkerToAcme::Routed(chunk) => {
                    assert!(chunk.len() <= core_server_proto::ipc::ROUTES_PER_MESSAGE);
                    names.extend(chunk);
                }
                WorkerToAcme::RoutedEnd => return names,
                other => panic!("{other:?} before RoutedEnd"),
            }
        }
    }

    async fn next(helper: &HelperEnd) -> WorkerToAcme {
        tokio::time::timeout(Duration::from_secs(5), helper.recv())
            .await
            .expect("a message from the worker")
            .unwrap()
            .unwrap()
            .0
    }

    async fn nothing_from(helper: &HelperEnd) {
        let heard = tokio::time::timeout(Duration::from_millis(200), helper.recv()).await;
        assert!(heard.is_err(), "the helper heard {heard:?}");
    }

    const KEY: [u8; 32] = [3; 32];

    #[tokio::test]
    async fn concurrent_first_handshakes_ask_once_and_all_get_the_certificate() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(10)).await;
        let helper = worker.link_helper().await;
        let client = Arc::new(ca.client(&[b"h2", b"http/1.1"]));
        let handshakes: Vec<_> = (0..10)
            .map(|_| {
                let (client, addr) = (client.clone(), worker.addr);
                tokio::spawn(async move {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    // Normalised as a Host header is.
                    let name = ServerName::try_from("A.Example.").unwrap();
                    let mut tls = TlsConnector::from(client).connect(name, tcp).await?;
                    let mut said = String::new();
                    tls.read_to_string(&mut said).await?;
                    Ok::<_, std::io::Error>(said)
                })
            })
            .collect();
        let asked = next(&helper).await;
        assert_eq!(
            asked,
            WorkerToAcme::Certificate {
                name: Domain::parse("a.example").unwrap()
            }
        );
        nothing_from(&helper).await;
        assert!(handshakes.iter().all(|h| !h.is_finished()), "all wait");
        helper.send(&ca.issue("a.example"), &[]).await.unwrap();
        for handshake in handshakes {
            assert_eq!(handshake.await.unwrap().unwrap(), "h2");
        }
        // Loaded: served without asking again, HTTP/1.1 too.
        let http1 = Arc::new(ca.client(&[b"http/1.1"]));
        assert_eq!(
            worker.handshake(&http1, "a.example").await.unwrap().0,
            "http/1.1"
        );
        nothing_from(&helper).await;
    }

    #[tokio::test]
    async fn names_not_routed_fail_at_once_without_asking_the_helper() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(10)).await;
        let helper = worker.link_helper().await;
        let client = Arc::new(ca.client(&[b"h2"]));
        let started = std::time::Instant::now();
        for sni in ["b.example", "x.a.example", "127.0.0.1", "a.example.com"] {
            let refused = worker.handshake(&client, sni).await.unwrap_err();
            let text = refused.to_string();
            assert!(
                text.contains("UnrecognisedName") || text.contains("HandshakeFailure"),
                "{sni}: {text}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        nothing_from(&helper).await;
    }

    #[tokio::test]
    async fn without_an_answer_the_handshake_fails_at_its_deadline_and_the_request_stays() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_millis(300)).await;
        let client = Arc::new(ca.client(&[b"h2"]));
        // No link yet: the handshake waits its time, then fails with an alert.
        let refused = worker.handshake(&client, "a.example").await.unwrap_err();
        assert!(
            refused.to_string().contains("HandshakeFailure"),
            "{refused}"
        );
        // The request still unanswered goes out on the new link, once.
        let helper = worker.link_helper().await;
        assert!(matches!(
            next(&helper).await,
            WorkerToAcme::Certificate { .. }
        ));
        helper.send(&ca.issue("a.example"), &[]).await.unwrap();
        nothing_from(&helper).await;
        assert_eq!(
            worker.handshake(&client, "a.example").await.unwrap().0,
            "h2"
        );
        // The helper gone, the loaded certificate is still served.
        drop(helper);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            worker.handshake(&client, "a.example").await.unwrap().0,
            "h2"
        );
    }

    #[tokio::test]
    async fn a_new_link_gets_the_routed_names_as_they_are_then_the_unanswered_requests() {
        let ca = Ca::new();
        let names: Vec<String> = (0..450).map(|i| format!("n{i}.example")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let worker = Worker::start(&names, &KEY, Duration::from_millis(200)).await;
        let client = Arc::new(ca.client(&[b"h2"]));
        // Asked, and removed, while there is no link.
        assert!(worker.handshake(&client, "n1.example").await.is_err());
        let removal = core_server_proto::routes::RouteChange::Remove {
            domain: Domain::parse("n2.example").unwrap(),
        };
        drop(worker.routes.change(removal).await.unwrap());
        let (ours, theirs) = socketpair_fds().unwrap();
        worker.https.connect_helper(ours).unwrap();
        let helper: HelperEnd = Channel::new(theirs).unwrap();
        let mut sizes = Vec::new();
        let mut routed = Vec::new();
        loop {
            match next(&helper).await {
                WorkerToAcme::Routed(chunk) => {
                    sizes.push(chunk.len());
                    routed.extend(chunk);
                }
                WorkerToAcme::RoutedEnd => break,
                other => panic!("{other:?} before RoutedEnd"),
            }
        }
        assert_eq!(sizes, [200, 200, 49]);
        assert!(!routed.contains(&Domain::parse("n2.example").unwrap()));
        assert_eq!(routed, worker.routes.names());
        // The request; and the removal's `Forget`, if it was handled after the link was made
        // (then after the routed names: harmless).
        let asked = WorkerToAcme::Certificate {
            name: Domain::parse("n1.example").unwrap(),
        };
        let forget = WorkerToAcme::Forget {
            name: Domain::parse("n2.example").unwrap(),
        };
        let mut rest = vec![next(&helper).await];
        while let Ok(heard) = tokio::time::timeout(Duration::from_millis(200), helper.recv()).await
        {
            rest.push(heard.unwrap().unwrap().0);
        }
        rest.retain(|m| *m != forget);
        assert_eq!(rest, [asked]);
    }

    #[tokio::test]
    async fn unavailable_fails_the_waiting_handshakes_and_the_next_at_once_until_a_certificate() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(10)).await;
        let helper = worker.link_helper().await;
        let client = Arc::new(ca.client(&[b"h2"]));
        let handshake = worker.spawn_handshake(&client, "a.example");
        assert!(matches!(
            next(&helper).await,
            WorkerToAcme::Certificate { .. }
        ));
        let unavailable = AcmeToWorker::Unavailable {
            name: Domain::parse("a.example").unwrap(),
            reason: "the CA said no".into(),
        };
        helper.send(&unavailable, &[]).await.unwrap();
        assert!(handshake.await.unwrap().is_err());
        // Refused at once, without asking the helper again (the wait is 10 s).
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert!(worker.handshake(&client, "a.example").await.is_err());
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        nothing_from(&helper).await;
        // A certificate sent meanwhile is served.
        helper.send(&ca.issue("a.example"), &[]).await.unwrap();
        let name = Domain::parse("a.example").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while worker.https.certificates().loaded(&name).is_none() {
            assert!(std::time::Instant::now() < deadline, "not loaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(worker.handshake(&client, "a.example").await.is_ok());
    }

    #[tokio::test]
    async fn a_ticket_resumes_on_another_worker_with_the_same_key_tls13_and_tls12() {
        let ca = Ca::new();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let client = Arc::new(
                ClientConfig::builder_with_provider(crypto_provider())
                    .with_protocol_versions(&[version])
                    .unwrap()
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
            );
            let mut kinds = Vec::new();
            for ticket_key in [KEY, KEY, [4; 32]] {
                let worker =
                    Worker::start(&["a.example"], &ticket_key, Duration::from_secs(5)).await;
                let helper = worker.link_helper().await;
                let issued = ca.issue("a.example");
                let AcmeToWorker::Certificate { name, chain, key } = issued else {
                    unreachable!()
                };
                worker.https.certificates().received(name, chain, key.0);
                kinds.push(worker.handshake(&client, "a.example").await.unwrap().1);
                drop(helper);
            }
            assert_eq!(
                kinds,
                [
                    HandshakeKind::Full,
                    HandshakeKind::Resumed,
                    HandshakeKind::Full
                ],
                "{version:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_pending_tls_alpn_challenge_is_answered_with_its_certificate_only() {
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(5)).await;
        let helper = worker.link_helper().await;
        let acme = TlsConnector::from(Arc::new(validating_ca()));
        let validate = || async {
            let tcp = TcpStream::connect(worker.addr).await.unwrap();
            let name = ServerName::try_from("a.example").unwrap();
            let tls = acme.connect(name, tcp).await?;
            let (_, connection) = tls.get_ref();
            assert_eq!(connection.alpn_protocol(), Some(ACME_TLS_ALPN));
            Ok::<_, std::io::Error>(connection.peer_certificates().unwrap()[0].to_vec())
        };
        let refused = validate().await.unwrap_err();
        assert!(
            refused.to_string().contains("HandshakeFailure"),
            "{refused}"
        );
        nothing_from(&helper).await;

        // The validation certificate: self-signed, with the critical acmeIdentifier extension.
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["a.example".to_owned()]).unwrap();
        params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&[9; 32])];
        let certificate = params.self_signed(&key).unwrap().der().to_vec();
        let challenge = AcmeToWorker::TlsAlpnChallenge {
            id: 7,
            name: Domain::parse("a.example").unwrap(),
            certificate: certificate.clone(),
            key: Secret(key.serialize_der()),
        };
        helper.send(&challenge, &[]).await.unwrap();
        assert_eq!(next(&helper).await, WorkerToAcme::ChallengeReady { id: 7 });
        assert_eq!(validate().await.unwrap(), certificate);
        helper
            .send(&AcmeToWorker::ChallengeDone { id: 7 }, &[])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(validate().await.is_err());

        // A helper that dies mid-order never says `ChallengeDone`: a new link drops the
        // challenge (the new helper sends again those it still has in progress).
        let again = AcmeToWorker::TlsAlpnChallenge {
            id: 8,
            name: Domain::parse("a.example").unwrap(),
            certificate,
            key: Secret(key.serialize_der()),
        };
        helper.send(&again, &[]).await.unwrap();
        assert_eq!(next(&helper).await, WorkerToAcme::ChallengeReady { id: 8 });
        assert!(validate().await.is_ok());
        drop(helper);
        let _helper = worker.link_helper().await;
        assert!(validate().await.is_err());
    }

    /// A client as a CA validating TLS-ALPN-01: offers only `acme-tls/1` and checks the
    /// certificate itself (RFC 8737 §3), as webpki cannot.
    pub(crate) fn validating_ca() -> ClientConfig {
        let mut acme = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Validator(crypto_provider())))
            .with_no_client_auth();
        acme.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        acme
    }

    /// Takes any certificate: the test compares it with the challenge's (webpki, which
    /// rustls's signature checks parse certificates with, refuses acmeIdentifier).
    #[derive(Debug)]
    pub(crate) struct Validator(pub(crate) Arc<CryptoProvider>);

    impl ServerCertVerifier for Validator {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    #[tokio::test]
    async fn a_certificate_sent_unasked_replaces_the_loaded_one() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(5)).await;
        let helper = worker.link_helper().await;
        let client = Arc::new(ca.client(&[b"h2"]));
        let leaf = || async {
            let tcp = TcpStream::connect(worker.addr).await.unwrap();
            let name = ServerName::try_from("a.example").unwrap();
            let tls = TlsConnector::from(client.clone())
                .connect(name, tcp)
                .await
                .unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        };
        for _ in 0..2 {
            let issued = ca.issue("a.example");
            let AcmeToWorker::Certificate { chain, .. } = &issued else {
                unreachable!()
            };
            let expected = chain[0].clone();
            helper.send(&issued, &[]).await.unwrap();
            // Loaded (the link is read in its own task), then served.
            let name = Domain::parse("a.example").unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while worker
                .https
                .certificates()
                .loaded(&name)
                .is_none_or(|loaded| loaded.cert[0].as_ref() != expected.as_slice())
            {
                assert!(std::time::Instant::now() < deadline, "not loaded");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(leaf().await, expected);
        }
        nothing_from(&helper).await;
    }

    #[tokio::test]
    async fn a_removed_route_is_no_longer_served_and_the_helper_is_told() {
        let ca = Ca::new();
        let worker = Worker::start(&["a.example"], &KEY, Duration::from_secs(5)).await;
        let helper = worker.link_helper().await;
        let client = Arc::new(ca.client(&[b"h2"]));
        let AcmeToWorker::Certificate { name, chain, key } = ca.issue("a.example") else {
            unreachable!()
        };
        worker
            .https
            .certificates()
            .received(name.clone(), chain, key.0);
        assert!(worker.handshake(&client, "a.example").await.is_ok());
        let removal = core_server_proto::routes::RouteChange::Remove {
            domain: name.clone(),
        };
        drop(worker.routes.change(removal).await.unwrap());
        assert_eq!(
            next(&helper).await,
            WorkerToAcme::Forget { name: name.clone() }
        );
        assert!(worker.https.certificates().loaded(&name).is_none());
        let refused = worker.handshake(&client, "a.example").await.unwrap_err();
        assert!(
            refused.to_string().contains("UnrecognisedName"),
            "{refused}"
        );
        nothing_from(&helper).await;
    }
}
