//! The worker's HTTPS side wired together: one certificate cache, one set of pending ACME
//! challenges and one link to the ACME helper, shared by the HTTPS listener (TLS), the HTTP
//! listener (challenges and redirects in release mode) and the supervisor's messages (a new
//! link to the helper).

use std::os::fd::OwnedFd;
use std::sync::Arc;

use core_server_proto::acme_ipc::{CertificateSource, Secret};
use core_server_proto::ipc::WorkerSettings;
use rustls::crypto::CryptoProvider;

use crate::acme_challenges::{Challenges, RedirectToHttps};
use crate::acme_link::AcmeLink;
use crate::certificates::Certificates;
use crate::http_server::Transport;
use crate::route_table::RouteTable;
use crate::tls_acceptor::{self, TlsAcceptor};

pub struct Https {
    routes: Arc<RouteTable>,
    provider: Arc<CryptoProvider>,
    link: Arc<AcmeLink>,
    certificates: Arc<Certificates>,
    challenges: Arc<Challenges>,
}

impl Https {
    /// Must be called inside the runtime: a route removed drops its certificate from now on.
    pub fn new(routes: Arc<RouteTable>) -> Self {
        let provider = tls_acceptor::crypto_provider();
        let link = Arc::new(AcmeLink::default());
        let certificates = Arc::new(Certificates::new(
            routes.clone(),
            link.clone(),
            provider.clone(),
        ));
        tokio::spawn(certificates.clone().forget_removed(routes.removals()));
        let challenges = Arc::new(Challenges::new(provider.clone()));
        Https {
            routes,
            provider,
            link,
            certificates,
            challenges,
        }
    }

    /// The HTTP port: in release mode, challenges and redirects before the proxy.
    pub fn http(&self, settings: &WorkerSettings) -> Transport {
        let redirect = (settings.https.source == CertificateSource::Acme).then(|| {
            Arc::new(RedirectToHttps {
                challenges: self.challenges.clone(),
                routes: self.routes.clone(),
            })
        });
        Transport::Http(redirect)
    }

    /// The HTTPS port.
    pub fn https(
        &self,
        settings: &WorkerSettings,
        ticket_key: &Secret,
    ) -> anyhow::Result<Transport> {
        let acceptor = self.acceptor(&ticket_key.0, settings.https.certificate_wait)?;
        Ok(Transport::Https(acceptor))
    }

    /// The TLS side of the HTTPS port: certificates waited for at most `certificate_wait`.
    pub fn acceptor(
        &self,
        ticket_key: &[u8],
        certificate_wait: std::time::Duration,
    ) -> anyhow::Result<TlsAcceptor> {
        TlsAcceptor::new(
            self.certificates.clone(),
            self.challenges.clone(),
            self.provider.clone(),
            ticket_key,
            certificate_wait,
        )
    }

    /// The certificate cache (for tests that hand it a certificate directly).
    #[cfg(test)]
    pub fn certificates(&self) -> &Certificates {
        &self.certificates
    }

    /// `fd` is the new channel to the ACME helper (`ToWorker::AcmeHelper`).
    pub fn connect_helper(&self, fd: OwnedFd) -> std::io::Result<()> {
        self.link.connect(
            fd,
            &self.routes,
            self.certificates.clone(),
            self.challenges.clone(),
        )
    }
}
