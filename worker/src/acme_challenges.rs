//! ACME challenges the worker answers for the helper, and the HTTP port in release mode.
//!
//! - TLS-ALPN-01 (RFC 8737): a handshake offering ALPN `acme-tls/1` for a name with a pending
//!   challenge gets the validation certificate, from a config that offers `acme-tls/1` only.
//! - HTTP-01 (RFC 8555 §8.3): `GET /.well-known/acme-challenge/<token>` on the HTTP port, for
//!   the challenge's name, gets the key authorization as `text/plain`.
//!
//! The helper sends the challenges under way again on every new link (and a rerun's new helper
//! sends those of the old one's orders), so a worker just started or relinked may not know yet
//! the one a validation is for: the CA can come first. A validation for a challenge not known
//! waits for it while the link is that new ([`FIRST_LINK_WAIT`], [`RELINK_WAIT`]), then fails.
//!
//! In release mode (`CertificateSource::Acme`) the HTTP port otherwise answers registered hosts
//! with `308` to `https://<host><path and query>`, as Caddy and Traefik do; unknown hosts get
//! the proxy's 404 as before. In local mode the HTTP port proxies as always.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::acme_ipc::AcmeToWorker;
use core_server_proto::domain::Domain;
use futures_util::future;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::proxy::{error_page, request_host, ProxyBody};
use crate::route_table::RouteTable;

/// The ALPN protocol of TLS-ALPN-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

/// How long after the worker starts a validation for a challenge not known waits for the
/// first link to the helper (started after the worker, in a rerun after the handover).
const FIRST_LINK_WAIT: Duration = Duration::from_secs(10);
/// How long after a link is made such a validation waits for the helper to send the challenges
/// under way (once started: its end of the link is handed over as it starts, and it reads the
/// store first).
const RELINK_WAIT: Duration = Duration::from_secs(5);

/// The challenges pending, by the helper's id.
pub struct Challenges {
    provider: Arc<CryptoProvider>,
    pending: Mutex<Pending>,
    /// Woken at each challenge installed and each new link, for validations waiting.
    changed: Notify,
    started: Instant,
}

struct Pending {
    by_id: HashMap<u64, Challenge>,
    /// When the helper was last linked; `None`: not yet.
    linked_at: Option<Instant>,
}

impl Pending {
    /// Until when a validation for a challenge not known may wait for it.
    fn wait_until(&self, started: Instant) -> Instant {
        match self.linked_at {
            Some(at) => at + RELINK_WAIT,
            None => started + FIRST_LINK_WAIT,
        }
    }
}

enum Challenge {
    TlsAlpn {
        name: Domain,
        config: Arc<ServerConfig>,
    },
    Http {
        name: Domain,
        token: String,
        key_authorization: String,
    },
}

impl Challenges {
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Challenges {
            provider,
            pending: Mutex::new(Pending {
                by_id: HashMap::new(),
                linked_at: None,
            }),
            changed: Notify::new(),
            started: Instant::now(),
        }
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The first pending challenge `find` picks; if none, waits for one while the link to the
    /// helper is new (see the module's doc).
    async fn find<T>(&self, find: impl Fn(&Challenge) -> Option<T>) -> Option<T> {
        let asked = Instant::now();
        let mut waited = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before looking: a challenge installed after the look wakes it.
            changed.as_mut().enable();
            let deadline = {
                let pending = self.pending();
                if let Some(found) = pending.by_id.values().find_map(&find) {
                    if waited {
                        let waited = asked.elapsed();
                        info!("a validation waited {waited:?} for its challenge to come");
                    }
                    return Some(found);
                }
                pending.wait_until(self.started)
            };
            if Instant::now() >= deadline {
                return None;
            }
            tokio::select! {
                _ = changed => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            waited = true;
        }
    }

    /// Starts answering a challenge message; its id once it is answered (to confirm with
    /// `ChallengeReady`), or `None` if it cannot be (or is no challenge).
    /// A challenge of the same kind for the same name still pending (its order abandoned)
    /// is replaced: only the newest can validate.
    pub fn install(&self, message: AcmeToWorker) -> Option<u64> {
        let (id, challenge) = match message {
            AcmeToWorker::TlsAlpnChallenge {
                id,
                name,
                certificate,
                key,
            } => match self.validation_config(certificate, key.0) {
                Ok(config) => (id, Challenge::TlsAlpn { name, config }),
                Err(e) => {
                    warn!("TLS-ALPN-01 challenge for {name}: unusable certificate: {e}");
                    return None;
                }
            },
            AcmeToWorker::HttpChallenge {
                id,
                name,
                token,
                key_authorization,
            } => (
                id,
                Challenge::Http {
                    name,
                    token,
                    key_authorization,
                },
            ),
            other @ (AcmeToWorker::Certificate { .. }
            | AcmeToWorker::Unavailable { .. }
            | AcmeToWorker::ChallengeDone { .. }) => {
                warn!("not a challenge from the ACME helper: {other:?}");
                return None;
            }
        };
        info!(
            "answering the {} challenge {id} for {}",
            challenge.kind(),
            challenge.name()
        );
        let mut pending = self.pending();
        let by_id = &mut pending.by_id;
        by_id.retain(|_, p| p.kind() != challenge.kind() || p.name() != challenge.name());
        by_id.insert(id, challenge);
        drop(pending);
        self.changed.notify_waiters();
        Some(id)
    }

    /// A new link to the helper: every pending challenge is dropped, as the helper sends again
    /// those still in progress, and one whose order died with the old helper would never be
    /// `ChallengeDone`.
    pub fn relinked(&self) {
        let mut pending = self.pending();
        pending.by_id.clear();
        pending.linked_at = Some(Instant::now());
        drop(pending);
        self.changed.notify_waiters();
    }

    pub fn done(&self, id: u64) {
        if let Some(challenge) = self.pending().by_id.remove(&id) {
            info!(
                "the {} challenge {id} for {} is over",
                challenge.kind(),
                challenge.name()
            );
        }
    }

    /// The config answering a TLS-ALPN-01 validation handshake for `name`, if one is pending.
    pub async fn tls_alpn(&self, name: &Domain) -> Option<Arc<ServerConfig>> {
        self.find(|challenge| match challenge {
            Challenge::TlsAlpn { name: n, config } if n == name => Some(config.clone()),
            _ => None,
        })
        .await
    }

    /// The key authorization for `token` under `name`, if an HTTP-01 challenge is pending.
    async fn key_authorization(&self, name: &Domain, token: &str) -> Option<String> {
        self.find(|challenge| match challenge {
            Challenge::Http {
                name: n,
                token: t,
                key_authorization,
            } if n == name && t == token => Some(key_authorization.clone()),
            _ => None,
        })
        .await
    }

    fn validation_config(
        &self,
        certificate: Vec<u8>,
        key: Vec<u8>,
    ) -> Result<Arc<ServerConfig>, rustls::Error> {
        // Not `CertifiedKey::from_der`: its check that key and certificate match parses the
        // certificate with webpki, which refuses the critical acmeIdentifier extension
        // (RFC 8737 §3) every validation certificate has.
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
        let key = self.provider.key_provider.load_private_key(key)?;
        let certificate = Arc::new(CertifiedKey::new(vec![certificate.into()], key));
        let mut config = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Always(certificate)));
        config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
        // One handshake per validation, never resumed: nothing to keep for later.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }
}

impl Challenge {
    fn name(&self) -> &Domain {
        match self {
            Challenge::TlsAlpn { name, .. } | Challenge::Http { name, .. } => name,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Challenge::TlsAlpn { .. } => "TLS-ALPN-01",
            Challenge::Http { .. } => "HTTP-01",
        }
    }
}

/// One certificate for every handshake (the validation certificate names the one domain).
#[derive(Debug)]
struct Always(Arc<CertifiedKey>);

impl ResolvesServerCert for Always {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The HTTP port in release mode: challenges answered, registered hosts sent to HTTPS.
pub struct RedirectToHttps {
    pub challenges: Arc<Challenges>,
    pub routes: Arc<RouteTable>,
}

impl RedirectToHttps {
    /// The answer to `request` if it is not for the proxy: a challenge's, or a redirect. A
    /// future of its own (it borrows nothing): a challenge not known yet may be waited for.
    pub fn answer<B>(
        &self,
        request: &Request<B>,
    ) -> Option<impl Future<Output = Response<ProxyBody>> + Send + 'static> {
        let domain = request_host(request)
            .ok()
            .and_then(|host| Domain::from_host(host.to_str().ok()?))?;
        let Some(token) = request.uri().path().strip_prefix(CHALLENGE_PATH) else {
            let redirect = self.redirect(&domain, request)?;
            return Some(future::Either::Left(std::future::ready(redirect)));
        };
        let asked = matches!(*request.method(), Method::GET | Method::HEAD)
            .then(|| (self.challenges.clone(), token.to_owned()));
        Some(future::Either::Right(async move {
            let key_authorization = match asked {
                Some((challenges, token)) => challenges.key_authorization(&domain, &token).await,
                None => None,
            };
            match key_authorization {
                Some(key_authorization) => Response::builder()
                    .header(header::CONTENT_TYPE, "text/plain")
                    .header(header::CACHE_CONTROL, "no-store")
                    .body(Either::Right(Full::from(key_authorization)))
                    .expect("static headers make a valid response"),
                None => error_page(StatusCode::NOT_FOUND, "no such ACME challenge"),
            }
        }))
    }

    /// `308` to the same URL over HTTPS, if `domain` is routed.
    fn redirect<B>(&self, domain: &Domain, request: &Request<B>) -> Option<Response<ProxyBody>> {
        // No URL says `*` (`https://app.example*` is another host): the proxy's own rules
        // answer it, `OPTIONS *` going to the app and any other method a 400.
        if request.uri().path() == "*" {
            return None;
        }
        self.routes.is_routed(domain).then_some(())?;
        let path_and_query = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = HeaderValue::try_from(format!("https://{domain}{path_and_query}")).ok()?;
        Some(
            Response::builder()
                .status(StatusCode::PERMANENT_REDIRECT)
                .header(header::LOCATION, location)
                .header(header::CONTENT_LENGTH, "0")
                .body(Either::Right(Full::new(Bytes::new())))
                .expect("static headers make a valid response"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use core_server_proto::acme_ipc::Secret;
    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::routes::Routes;

    use crate::tls_acceptor::crypto_provider;
    use crate::tunnel_forward::tests::text;

    fn port80(routed: &str) -> RedirectToHttps {
        let (worker, _supervisor) = socketpair_fds().unwrap();
        let routes: Routes = [(Domain::parse(routed).unwrap(), 8080)]
            .into_iter()
            .collect();
        RedirectToHttps {
            challenges: Arc::new(Challenges::new(crypto_provider())),
            routes: Arc::new(RouteTable::new(
                routes,
                Arc::new(Channel::new(worker).unwrap()),
            )),
        }
    }

    fn request(method: Method, host: &str, path: &str) -> Request<()> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn registered_hosts_go_to_https_with_path_and_query_others_to_the_proxy() {
        let port80 = port80("app.example");
        let response = port80
            .answer(&request(Method::POST, "App.Example:8080", "/a/b?c=d"))
            .expect("answered")
            .await;
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(
            response.headers()[header::LOCATION],
            "https://app.example/a/b?c=d"
        );
        assert!(port80
            .answer(&request(Method::GET, "other.example", "/"))
            .is_none());
        assert!(port80
            .answer(&request(Method::GET, "127.0.0.1", "/"))
            .is_none());
        for method in [Method::OPTIONS, Method::GET] {
            assert!(port80
                .answer(&request(method, "app.example", "*"))
                .is_none());
        }
    }

    // Paused: each answer that finds no challenge waits out the first link's wait at once.
    #[tokio::test(start_paused = true)]
    async fn a_pending_http_challenge_is_answered_until_done_and_never_redirected() {
        let port80 = port80("app.example");
        let path = "/.well-known/acme-challenge/tok-1";
        let challenge = AcmeToWorker::HttpChallenge {
            id: 3,
            name: Domain::parse("app.example").unwrap(),
            token: "tok-1".into(),
            key_authorization: "tok-1.thumbprint".into(),
        };
        assert_eq!(port80.challenges.install(challenge), Some(3));
        let response = port80
            .answer(&request(Method::GET, "app.example", path))
            .unwrap()
            .await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(text(response.into_body()).await, "tok-1.thumbprint");
        // Another name, another token, or another method: not this challenge.
        for (method, host, path) in [
            (Method::GET, "other.example", path),
            (
                Method::GET,
                "app.example",
                "/.well-known/acme-challenge/tok-2",
            ),
            (Method::POST, "app.example", path),
        ] {
            let response = port80.answer(&request(method, host, path)).unwrap().await;
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{host} {path}");
        }
        port80.challenges.done(3);
        let response = port80
            .answer(&request(Method::GET, "app.example", path))
            .unwrap()
            .await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }

    fn http(id: u64, name: &str, token: &str) -> AcmeToWorker {
        AcmeToWorker::HttpChallenge {
            id,
            name: Domain::parse(name).unwrap(),
            token: token.into(),
            key_authorization: format!("{token}.thumbprint"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_challenge_replaces_the_pending_one_of_its_kind_for_its_name() {
        let challenges = Challenges::new(crypto_provider());
        let a = Domain::parse("a.example").unwrap();
        let b = Domain::parse("b.example").unwrap();
        assert_eq!(challenges.install(http(1, "a.example", "old")), Some(1));
        assert_eq!(challenges.install(http(2, "b.example", "other")), Some(2));
        assert_eq!(challenges.install(http(3, "a.example", "new")), Some(3));
        assert!(challenges.key_authorization(&a, "old").await.is_none());
        assert!(challenges.key_authorization(&a, "new").await.is_some());
        assert!(challenges.key_authorization(&b, "other").await.is_some());
        challenges.relinked();
        assert!(challenges.key_authorization(&a, "new").await.is_none());
        assert!(challenges.key_authorization(&b, "other").await.is_none());
    }

    /// The CA may validate before a new link has brought the challenge (a rerun's new worker
    /// serves before its helper is up): the validation waits for it, while the link is new.
    #[tokio::test(start_paused = true)]
    async fn a_validation_waits_for_its_challenge_while_the_link_is_new() {
        let challenges = Arc::new(Challenges::new(crypto_provider()));
        let a = Domain::parse("a.example").unwrap();
        let start = Instant::now();
        let waiting = tokio::spawn({
            let (challenges, a) = (challenges.clone(), a.clone());
            async move { challenges.key_authorization(&a, "tok").await }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        challenges.relinked();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(challenges.install(http(1, "a.example", "tok")), Some(1));
        let answer = waiting.await.unwrap();
        assert_eq!(answer.as_deref(), Some("tok.thumbprint"));
        assert_eq!(start.elapsed(), Duration::from_millis(2500));

        // One never sent fails once the link is no longer new, and from then on at once.
        let start = Instant::now();
        let rest_of_the_wait = RELINK_WAIT - Duration::from_millis(500);
        assert!(challenges.key_authorization(&a, "other").await.is_none());
        assert_eq!(start.elapsed(), rest_of_the_wait);
        assert!(challenges.key_authorization(&a, "other").await.is_none());
        assert_eq!(start.elapsed(), rest_of_the_wait);
    }

    /// With no link at all, a validation waits for the first one only so long.
    #[tokio::test(start_paused = true)]
    async fn a_validation_waits_for_a_first_link_only_so_long() {
        let challenges = Challenges::new(crypto_provider());
        let start = Instant::now();
        let a = Domain::parse("a.example").unwrap();
        assert!(challenges.tls_alpn(&a).await.is_none());
        assert_eq!(start.elapsed(), FIRST_LINK_WAIT);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unusable_tls_alpn_certificate_is_not_confirmed() {
        let challenges = Challenges::new(crypto_provider());
        let challenge = AcmeToWorker::TlsAlpnChallenge {
            id: 1,
            name: Domain::parse("app.example").unwrap(),
            certificate: b"not DER".to_vec(),
            key: Secret(b"not a key".to_vec()),
        };
        assert_eq!(challenges.install(challenge), None);
        assert!(challenges
            .tls_alpn(&Domain::parse("app.example").unwrap())
            .await
            .is_none());
    }
}
