//! The certificates the worker serves, by name, as the ACME helper hands them over.
//!
//! The worker holds no certificate store of its own: a handshake for a name not loaded yet asks
//! the helper (`WorkerToAcme::Certificate`) and waits for its answer, at most
//! `--acme-wait`. However many handshakes wait for one name, one request is outstanding: they
//! all wake on the answer (a certificate, or `Unavailable`), or each at its own deadline. A
//! request nobody waits for any more stays outstanding, so the certificate that answers it
//! is loaded and the next handshake is fast; requests unanswered when the link to the helper
//! breaks are sent again on the next link (see `acme_link`). A certificate the helper sends
//! unasked (a renewal) replaces the loaded one. Loaded certificates stay served while the
//! helper is down.
//!
//! A refusal (`Unavailable`) is remembered for [`REFUSAL_HELD`]: handshakes for that name
//! meanwhile fail at once, without asking the helper again, so a client cannot make it work
//! on every handshake for a name it cannot serve (a certificate sent meanwhile still loads).
//!
//! The routes table is the allowlist: a certificate is only asked for and kept for a routed
//! name, and a route removed drops its certificate (and tells the helper, `Forget`). Requests
//! and `Forget`s are checked and queued for the helper under one lock, so no request for a
//! name can follow that name's `Forget`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_server_proto::acme_ipc::WorkerToAcme;
use core_server_proto::domain::Domain;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::acme_link::AcmeLink;
use crate::route_table::RouteTable;

/// How long an `Unavailable` answers every handshake for its name without asking again.
pub const REFUSAL_HELD: Duration = Duration::from_secs(10);

/// What became of a request: the certificate, or why there is none.
type Answer = Result<Arc<CertifiedKey>, Arc<str>>;

/// Why a handshake got no certificate.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("no certificate: {0}")]
    Unavailable(Arc<str>),
    #[error("no certificate within {0:?}")]
    TimedOut(Duration),
    #[error("the route was removed while waiting for its certificate")]
    Removed,
    #[error("not a registered domain")]
    NotRouted,
}

pub struct Certificates {
    routes: Arc<RouteTable>,
    link: Arc<AcmeLink>,
    provider: Arc<CryptoProvider>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: HashMap<Domain, Arc<CertifiedKey>>,
    /// Names asked for and not answered yet, with the handshakes waiting for them.
    asked: HashMap<Domain, watch::Sender<Option<Answer>>>,
    /// Names the helper refused lately: why, and until when that stands.
    refused: HashMap<Domain, (Instant, Arc<str>)>,
}

impl Certificates {
    pub fn new(
        routes: Arc<RouteTable>,
        link: Arc<AcmeLink>,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Certificates {
            routes,
            link,
            provider,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The loaded certificate for `name`, if any.
    pub fn loaded(&self, name: &Domain) -> Option<Arc<CertifiedKey>> {
        self.state().loaded.get(name).cloned()
    }

    /// The certificate for `name`, if it is routed: loaded, or asked of the helper, waiting
    /// at most `wait` for it.
    pub async fn get(&self, name: &Domain, wait: Duration) -> Result<Arc<CertifiedKey>, Missing> {
        let mut answer = {
            let mut state = self.state();
            // Under the lock `forget` takes: a route removed now is either seen here, or
            // its `Forget` is queued after this request.
            if !self.routes.is_routed(name) {
                return Err(Missing::NotRouted);
            }
            if let Some(loaded) = state.loaded.get(name) {
                return Ok(loaded.clone());
            }
            if let Some((until, reason)) = state.refused.get(name) {
                if Instant::now() < *until {
                    return Err(Missing::Unavailable(reason.clone()));
                }
                state.refused.remove(name);
            }
            match state.asked.get(name) {
                Some(asked) => asked.subscribe(),
                None => {
                    let (asked, answer) = watch::channel(None);
                    state.asked.insert(name.clone(), asked);
                    debug!("asking the ACME helper for the certificate of {name}");
                    // Without a link now, the request goes out on the next one.
                    self.link
                        .send(WorkerToAcme::Certificate { name: name.clone() });
                    answer
                }
            }
        };
        let answer = match tokio::time::timeout(wait, answer.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => answer.clone().expect("waited for an answer"),
            Ok(Err(_)) => return Err(Missing::Removed),
            Err(_) => return Err(Missing::TimedOut(wait)),
        };
        answer.map_err(Missing::Unavailable)
    }

    /// Runs `link` (which makes a new link the current one) with the names asked for and
    /// not answered yet, to ask again on it, under the lock requests and `Forget`s are sent
    /// under.
    pub fn relink(&self, link: impl FnOnce(Vec<Domain>)) {
        let state = self.state();
        link(state.asked.keys().cloned().collect());
    }

    /// The helper's certificate for `name`: loaded (replacing an earlier one), and handed to
    /// the handshakes waiting for it.
    pub fn received(&self, name: Domain, chain: Vec<Vec<u8>>, key: Vec<u8>) {
        let answer: Answer = match certified_key(&self.provider, chain, key) {
            Ok(certificate) => Ok(Arc::new(certificate)),
            Err(e) => {
                warn!("the ACME helper's certificate for {name} is unusable: {e}");
                Err(format!("the certificate is unusable: {e}").into())
            }
        };
        let mut state = self.state();
        // Checked under the lock that `forget` takes too, so a removed route stays removed.
        if !self.routes.is_routed(&name) {
            debug!("certificate for {name} received, but {name} is not routed: dropped");
            state.asked.remove(&name);
            return;
        }
        if let Ok(certificate) = &answer {
            let renewed = state.loaded.insert(name.clone(), certificate.clone());
            info!(
                "certificate for {name} {}",
                if renewed.is_some() {
                    "replaced"
                } else {
                    "loaded"
                }
            );
        }
        state.refused.remove(&name);
        if let Some(asked) = state.asked.remove(&name) {
            asked.send_replace(Some(answer));
        }
    }

    /// The helper has no certificate for `name` now: the handshakes waiting fail, and those
    /// for the next [`REFUSAL_HELD`] too.
    pub fn unavailable(&self, name: Domain, reason: String) {
        info!("no certificate for {name}: {reason}");
        let reason: Arc<str> = reason.into();
        let mut state = self.state();
        // Only routed names are kept (checked under the lock `forget` takes).
        if self.routes.is_routed(&name) {
            let until = Instant::now() + REFUSAL_HELD;
            state.refused.insert(name.clone(), (until, reason.clone()));
        }
        if let Some(asked) = state.asked.remove(&name) {
            asked.send_replace(Some(Err(reason)));
        }
    }

    /// `name` is no longer routed: its certificate is no longer served (handshakes waiting
    /// for it fail), and the helper stops renewing it.
    pub fn forget(&self, name: Domain) {
        let mut state = self.state();
        state.loaded.remove(&name);
        state.refused.remove(&name);
        // Dropping the sender wakes its waiters.
        state.asked.remove(&name);
        // Without a link now, the next link's routed names leave it out.
        self.link.send(WorkerToAcme::Forget { name });
    }

    /// Forgets each route removed, as `removals` (see `RouteTable::removals`) says.
    pub async fn forget_removed(self: Arc<Self>, mut removals: mpsc::UnboundedReceiver<Domain>) {
        while let Some(name) = removals.recv().await {
            self.forget(name);
        }
    }
}

/// Serves, during a handshake, the certificate `Certificates::get` has just loaded for the
/// ClientHello's name (normalised as a Host header is).
impl ResolvesServerCert for Certificates {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = Domain::parse(client_hello.server_name()?).ok()?;
        self.loaded(&name)
    }
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificates")
    }
}

/// A chain (DER, leaf first) and its PKCS#8 key, checked to belong together.
fn certified_key(
    provider: &CryptoProvider,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
) -> Result<CertifiedKey, rustls::Error> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key));
    let chain = chain.into_iter().map(CertificateDer::from).collect();
    CertifiedKey::from_der(chain, key, provider)
}

#[cfg(test)]
mod tests {
    use super::*;

    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::routes::Routes;

    use crate::tls_acceptor::crypto_provider;

    fn asked(certificates: &Certificates) -> Vec<Domain> {
        let mut asked = Vec::new();
        certificates.relink(|unanswered| asked = unanswered);
        asked
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_stands_for_a_while_without_asking_again_unless_a_certificate_comes() {
        let (worker, _supervisor) = socketpair_fds().unwrap();
        let name = Domain::parse("a.example").unwrap();
        let routes: Routes = [(name.clone(), 8080)].into_iter().collect();
        let routes = Arc::new(RouteTable::new(
            routes,
            Arc::new(Channel::new(worker).unwrap()),
        ));
        let link = Arc::new(AcmeLink::default());
        let certificates = Arc::new(Certificates::new(routes, link, crypto_provider()));
        let wait = Duration::from_secs(60);

        let waiting = tokio::spawn({
            let (certificates, name) = (certificates.clone(), name.clone());
            async move { certificates.get(&name, wait).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(asked(&certificates), std::slice::from_ref(&name));
        certificates.unavailable(name.clone(), "the CA said no".into());
        assert!(matches!(
            waiting.await.unwrap(),
            Err(Missing::Unavailable(_))
        ));

        // Refused at once, nothing asked, until the refusal has stood its time.
        tokio::time::advance(REFUSAL_HELD - Duration::from_secs(1)).await;
        let refused = certificates.get(&name, wait).await.unwrap_err();
        assert_eq!(refused.to_string(), "no certificate: the CA said no");
        assert!(asked(&certificates).is_empty());
        tokio::time::advance(Duration::from_secs(2)).await;
        let short = Duration::from_millis(10);
        assert!(matches!(
            certificates.get(&name, short).await,
            Err(Missing::TimedOut(_))
        ));
        assert_eq!(asked(&certificates), std::slice::from_ref(&name));
    }
}
