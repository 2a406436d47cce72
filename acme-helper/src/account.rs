//! Release mode's ACME account: made once at the CA (with `--acme-email` as its contact) and
//! kept in the store (`account.json`, 0600, with its private key), so a restart reuses it.
//! A store whose account is for another directory URL gets a new one.
//!
//! The CA's own HTTPS is checked against the system's roots, or only against
//! `--acme-ca-root` when given (a test CA such as pebble).

use std::sync::Arc;

use core_server_proto::acme_ipc::AcmeSettings;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use instant_acme::{Account, AccountBuilder, AccountCredentials, NewAccount};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;
use tracing::info;

use crate::store::Store;

/// `account.json`.
#[derive(Serialize, Deserialize)]
struct StoredAccount {
    directory: String,
    email: Option<String>,
    credentials: AccountCredentials,
}

pub struct AcmeAccount {
    settings: AcmeSettings,
    account: OnceCell<Account>,
}

impl AcmeAccount {
    pub fn new(settings: AcmeSettings) -> AcmeAccount {
        AcmeAccount {
            settings,
            account: OnceCell::new(),
        }
    }

    pub fn directory(&self) -> &str {
        &self.settings.directory
    }

    /// The account, loaded or made at the first call (retried at the next if that failed).
    pub async fn get(&self, store: &Store) -> Result<&Account, String> {
        self.account
            .get_or_try_init(|| self.load_or_create(store))
            .await
    }

    async fn load_or_create(&self, store: &Store) -> Result<Account, String> {
        let directory = &self.settings.directory;
        let error = |e: instant_acme::Error| format!("ACME directory {directory}: {e}");
        if let Some(stored) = self.stored(store)? {
            if stored.directory == *directory && stored.email == self.settings.email {
                return self
                    .builder()?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(error);
            }
            info!(
                "the stored ACME account is for {} ({:?}): making one for {directory} ({:?})",
                stored.directory, stored.email, self.settings.email
            );
        }
        let lock = store.lock().await.map_err(|e| e.to_string())?;
        // A helper that ran meanwhile (a rerun's) may have made it.
        if let Some(stored) = self.stored(store)? {
            if stored.directory == *directory && stored.email == self.settings.email {
                return self
                    .builder()?
                    .from_credentials(stored.credentials)
                    .await
                    .map_err(error);
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
        let Some(pem) = &self.settings.ca_root_pem else {
            return Account::builder().map_err(|e| format!("cannot set up HTTPS to the CA: {e}"));
        };
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
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Account::builder_with_http(Box::new(client)))
    }
}
