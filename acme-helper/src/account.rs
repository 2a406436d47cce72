//! Release mode's ACME account: made once at the CA (with `--acme-email` as its contact) and
//! kept in the store (`account.json`, 0600, with its private key), so a restart reuses it.
//! A store whose account is for another directory URL gets a new one.
//!
//! The CA's own HTTPS is checked against the system's roots, or only against
//! `--acme-ca-root` when given (a test CA such as pebble).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::acme_ipc::AcmeSettings;
use hyper_rustls::ConfigBuilderExt;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, BodyWrapper, BytesResponse, HttpClient, NewAccount,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::store::Store;

/// How long a TCP connection to the CA may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request to the CA may wait for its answer: a CA that accepts and never
/// answers must not freeze a name (nor hold the store's lock) forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long loading or making the account may take (a few requests), while every order
/// waits for it.
const ACCOUNT_TIMEOUT: Duration = Duration::from_secs(60);

/// `account.json`.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    email: Option<String>,
    credentials: AccountCredentials,
}

pub struct AcmeAccount {
    settings: AcmeSettings,
    /// `None` until loaded or made, and again once the CA said it no longer knows it.
    account: tokio::sync::Mutex<Option<Account>>,
}

impl AcmeAccount {
    pub fn new(settings: AcmeSettings) -> AcmeAccount {
        AcmeAccount {
            settings,
            account: tokio::sync::Mutex::new(None),
        }
    }

    pub fn directory(&self) -> &str {
        &self.settings.directory
    }

    /// The account, loaded or made at the first call (retried at the next if that failed).
    pub async fn get(&self, store: &Store) -> Result<Account, String> {
        let mut account = self.account.lock().await;
        if let Some(account) = &*account {
            return Ok(account.clone());
        }
        let loaded = self.load_or_create_in_time(store, false).await?;
        *account = Some(loaded.clone());
        Ok(loaded)
    }

    /// The CA no longer knows the account (a test CA restarted, an account deleted): makes a
    /// new one, replacing the stored one.
    pub async fn replace(&self, store: &Store) -> Result<Account, String> {
        let mut account = self.account.lock().await;
        let made = self.load_or_create_in_time(store, true).await?;
        *account = Some(made.clone());
        Ok(made)
    }

    /// `load_or_create` within [`ACCOUNT_TIMEOUT`]: every order waits on the mutex meanwhile.
    async fn load_or_create_in_time(&self, store: &Store, anew: bool) -> Result<Account, String> {
        tokio::time::timeout(ACCOUNT_TIMEOUT, self.load_or_create(store, anew))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "network error: the ACME directory {} did not set our account up within {ACCOUNT_TIMEOUT:?}",
                    self.settings.directory
                ))
            })
    }

    async fn load_or_create(&self, store: &Store, anew: bool) -> Result<Account, String> {
        let directory = &self.settings.directory;
        let error =
            |e: instant_acme::Error| format!("ACME directory {directory}: {}", describe(&e));
        if !anew {
            if let Some(account) = self.reuse_stored(store, true).await? {
                return Ok(account);
            }
        }
        let lock = store.lock().await.map_err(|e| e.to_string())?;
        // A helper that ran meanwhile (a rerun's) may have made it.
        if !anew {
            if let Some(account) = self.reuse_stored(store, false).await? {
                return Ok(account);
            }
        }
        let contact: Vec<String> = self
            .settings
            .email
            .iter()
            .map(|email| format!("mailto:{email}"))
            .collect();
        let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = self
            .builder()?
            .create(
                &NewAccount {
                    contact: &contact,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                directory.clone(),
                None,
            )
            .await
            .map_err(error)?;
        let stored = StoredAccount {
            directory: directory.clone(),
            email: self.settings.email.clone(),
            credentials,
        };
        let json = serde_json::to_vec_pretty(&stored).map_err(|e| e.to_string())?;
        store
            .write_account(&lock, &json)
            .map_err(|e| format!("cannot keep the new ACME account: {e}"))?;
        info!("made an ACME account at {directory}: {}", account.id());
        Ok(account)
    }

    /// The stored account, when it is for this directory and contact; `tell`: say why not.
    async fn reuse_stored(&self, store: &Store, tell: bool) -> Result<Option<Account>, String> {
        let directory = &self.settings.directory;
        let Some(stored) = self.stored(store)? else {
            return Ok(None);
        };
        if stored.directory != *directory || stored.email != self.settings.email {
            if tell {
                info!(
                    "the stored ACME account is for {} ({:?}): making one for {directory} ({:?})",
                    stored.directory, stored.email, self.settings.email
                );
            }
            return Ok(None);
        }
        self.builder()?
            .from_credentials(stored.credentials)
            .await
            .map(Some)
            .map_err(|e| format!("ACME directory {directory}: {}", describe(&e)))
    }

    fn stored(&self, store: &Store) -> Result<Option<StoredAccount>, String> {
        let Some(bytes) = store.read_account().map_err(|e| e.to_string())? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            format!(
                "account.json in the store is corrupt ({e}): move it aside to make a new account"
            )
        })
    }

    /// An HTTP client trusting the system's roots, or only `--acme-ca-root`.
    fn builder(&self) -> Result<AccountBuilder, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let tls = match &self.settings.ca_root_pem {
            None => tls
                .try_with_platform_verifier()
                .map_err(|e| format!("cannot set up HTTPS to the CA: {e}"))?,
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(pem) {
                    let cert = cert.map_err(|e| format!("--acme-ca-root: {e}"))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("--acme-ca-root: {e}"))?;
                }
                if roots.is_empty() {
                    return Err("--acme-ca-root holds no certificate".into());
                }
                tls.with_root_certificates(roots)
            }
        };
        // Without TCP_NODELAY, a request whose body follows its head in a second write waits
        // for the server's delayed ACK: 40 ms per ACME request.
        let mut tcp = HttpConnector::new();
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.with_no_client_auth())
            .https_only()
            .enable_http1()
            .wrap_connector(tcp);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Account::builder_with_http(Box::new(TimedClient {
            client,
            limit: REQUEST_TIMEOUT,
        })))
    }
}

/// The HTTP client to the CA, each request bounded by `limit` ([`REQUEST_TIMEOUT`]).
struct TimedClient<C> {
    client: C,
    limit: Duration,
}

impl<C: HttpClient> HttpClient for TimedClient<C> {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let answer = self.client.request(req);
        let limit = self.limit;
        Box::pin(async move {
            tokio::time::timeout(limit, answer)
                .await
                .unwrap_or_else(|_| {
                    Err(instant_acme::Error::Other(Box::new(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("the CA did not answer within {limit:?}"),
                    ))))
                })
        })
    }
}

/// An instant-acme error for `last_error`: one that never reached the CA's ACME layer (no
/// connection, TLS, a timeout) is called a network error, since it counts towards the
/// failures of the hour as well.
pub fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Other(_) | instant_acme::Error::Hyper(_) => {
            format!("network error: {}", chain(e))
        }
        _ => chain(e),
    }
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection refused").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::acme_ipc::CertificateSource;

    fn account(ca_root_pem: Option<Vec<u8>>) -> AcmeAccount {
        AcmeAccount::new(AcmeSettings {
            source: CertificateSource::Acme,
            directory: "https://127.0.0.1:1/dir".into(),
            email: None,
            ca_root_pem,
            mkcert: None,
        })
    }

    #[test]
    fn the_ca_root_must_hold_a_certificate() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let (_, der) = crate::certificate::tests::make(&["ca.example"], 0, 2_000_000_000);
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", der));
        assert!(account(Some(pem.into_bytes())).builder().is_ok());
        let error = account(Some(b"no PEM here".to_vec())).builder().err();
        assert_eq!(
            error.as_deref(),
            Some("--acme-ca-root holds no certificate")
        );
        assert!(account(None).builder().is_ok(), "the system's roots");
    }

    /// A CA that accepts and never answers.
    struct Silent;

    impl HttpClient for Silent {
        fn request(
            &self,
            _: http::Request<BodyWrapper<Bytes>>,
        ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>>
        {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_ca_that_never_answers_is_a_network_error_in_time() {
        let client = TimedClient {
            client: Silent,
            limit: Duration::from_millis(50),
        };
        let request = http::Request::new(BodyWrapper::default());
        let answer = tokio::time::timeout(Duration::from_secs(10), client.request(request));
        let Err(e) = answer.await.expect("bounded by the limit") else {
            panic!("an answer from nowhere");
        };
        assert_eq!(
            describe(&e),
            "network error: the CA did not answer within 50ms"
        );
    }

    #[test]
    fn a_cause_already_shown_is_not_repeated() {
        let e = instant_acme::Error::Other(Box::new(std::io::Error::other("tcp connect")));
        assert_eq!(chain(&e), "tcp connect");
    }
}
