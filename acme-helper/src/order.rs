//! One attempt at a certificate from the ACME CA: TLS-ALPN-01 first (RFC 8737), then, when
//! the CA does not offer it or its validation failed, HTTP-01 in a new order. Each order:
//! new order, the worker set up to answer the challenge (it says `ChallengeReady`), the CA
//! told to validate, the order polled tightly (from 50 ms, honouring Retry-After), a CSR for
//! a fresh ECDSA P-256 key, the chain fetched.
//!
//! Every failed validation is recorded in the name's [`Backoff`] as it happens, and the
//! fallback is skipped when it would make a fourth failure within the hour.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use core_server_proto::acme_ipc::{AcmeToWorker, Secret};
use core_server_proto::domain::Domain;
use instant_acme::{
    Account, AuthorizationStatus, CertificateIdentifier, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, DistinguishedName, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::certificate::Certificate;
use crate::clock;
use crate::names::checked;
use crate::worker_link::WorkerLink;

/// How long the worker may take to set a challenge up (it is one message away).
const CHALLENGE_SETUP: Duration = Duration::from_secs(10);

/// Polls of the order: tight at first, since a CA often validates and issues in milliseconds.
fn polling() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(50))
        .backoff(1.5)
        .timeout(Duration::from_secs(90))
}

/// How an order ended without a certificate.
enum OrderError {
    /// The CA offers no challenge of this type for the name.
    NotOffered,
    /// The CA could not validate the challenge: counts towards the backoff.
    Validation(String),
    /// Anything else (the CA unreachable, a rate limit): ends the attempt.
    Other {
        error: String,
        retry_after: Option<SystemTime>,
    },
}

impl From<instant_acme::Error> for OrderError {
    fn from(e: instant_acme::Error) -> OrderError {
        let retry_after = match &e {
            instant_acme::Error::Timeout(Some(at)) => {
                Some(SystemTime::now() + at.saturating_duration_since(Instant::now()))
            }
            // A rate limit's Retry-After does not reach us through instant-acme's error;
            // Let's Encrypt's limits are counted per hour at the least.
            instant_acme::Error::Api(problem)
                if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:rateLimited") =>
            {
                Some(SystemTime::now() + Duration::from_secs(3600))
            }
            _ => None,
        };
        OrderError::Other {
            error: e.to_string(),
            retry_after,
        }
    }
}

/// One attempt for `name`; `replacing` is the certificate a renewal replaces (for ARI).
pub async fn obtain(
    account: &Account,
    source: &str,
    name: &Domain,
    replacing: Option<&Certificate>,
    link: &Arc<WorkerLink>,
    backoff: &mut Backoff,
) -> Result<Certificate, String> {
    let replaces = replacing.and_then(|old| {
        CertificateIdentifier::try_from(&CertificateDer::from(old.chain[0].as_slice()))
            .ok()
            .map(CertificateIdentifier::into_owned)
    });
    let mut last = String::from("the CA offers neither TLS-ALPN-01 nor HTTP-01");
    for challenge in [ChallengeType::TlsAlpn01, ChallengeType::Http01] {
        let now = clock::now();
        if !backoff.allows_another_validation(now) {
            break;
        }
        let started = Instant::now();
        match order(account, name, challenge.clone(), replaces.clone(), link).await {
            Ok((key, chain)) => {
                info!(
                    "{name}: certificate issued ({challenge:?}) in {:?}",
                    started.elapsed()
                );
                return Certificate::new(name, Some(source.to_owned()), key, chain)
                    .map_err(|e| format!("the CA's certificate: {e}"));
            }
            Err(OrderError::NotOffered) => {}
            Err(OrderError::Validation(error)) => {
                warn!("{name}: {challenge:?} validation failed: {error}");
                last = format!("{challenge:?} validation failed: {error}");
                backoff.fail(now, last.clone(), None);
            }
            Err(OrderError::Other { error, retry_after }) => {
                let retry_after = retry_after.map(clock::secs);
                backoff.fail(now, error.clone(), retry_after);
                return Err(error);
            }
        }
    }
    Err(last)
}

/// One order with one challenge type: the key (PKCS#8) and the chain (DER, leaf first).
async fn order(
    account: &Account,
    name: &Domain,
    challenge_type: ChallengeType,
    replaces: Option<CertificateIdentifier<'static>>,
    link: &Arc<WorkerLink>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>), OrderError> {
    let dns = checked(name).map_err(|e| OrderError::Other {
        error: e.to_string(),
        retry_after: None,
    })?;
    let identifiers = [Identifier::Dns(dns.to_owned())];
    let mut new_order = NewOrder::new(&identifiers);
    if let Some(replaces) = replaces {
        new_order = new_order.replaces(replaces);
    }
    let mut order = match account.new_order(&new_order).await {
        // A CA without ARI refuses `replaces`; order without it.
        Err(instant_acme::Error::Unsupported(_)) => {
            account.new_order(&NewOrder::new(&identifiers)).await?
        }
        result => result?,
    };

    let mut challenges = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authorization) = authorizations.next().await {
        let mut authorization = authorization?;
        match authorization.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            status => {
                return Err(OrderError::Other {
                    error: format!("the CA's authorization for {name} is {status:?}"),
                    retry_after: None,
                })
            }
        }
        let Some(mut challenge) = authorization.challenge(challenge_type.clone()) else {
            return Err(OrderError::NotOffered);
        };
        let key_authorization = challenge.key_authorization();
        let message: Box<dyn FnOnce(u64) -> AcmeToWorker + Send> = match challenge_type {
            ChallengeType::TlsAlpn01 => {
                let (certificate, key) =
                    tls_alpn_certificate(name, key_authorization.digest().as_ref()).map_err(
                        |error| OrderError::Other {
                            error,
                            retry_after: None,
                        },
                    )?;
                let name = name.clone();
                Box::new(move |id| AcmeToWorker::TlsAlpnChallenge {
                    id,
                    name,
                    certificate,
                    key: Secret(key),
                })
            }
            _ => {
                let (name, token) = (name.clone(), challenge.token.clone());
                let key_authorization = key_authorization.as_str().to_owned();
                Box::new(move |id| AcmeToWorker::HttpChallenge {
                    id,
                    name,
                    token,
                    key_authorization,
                })
            }
        };
        let answering = link
            .challenge(message, CHALLENGE_SETUP)
            .await
            .map_err(|error| OrderError::Other {
                error,
                retry_after: None,
            })?;
        challenges.push(answering);
        challenge.set_ready().await?;
    }

    let status = order.poll_ready(&polling()).await?;
    // Validated or not: the worker stops answering.
    drop(challenges);
    if status != OrderStatus::Ready {
        return Err(OrderError::Validation(
            why_invalid(&mut order)
                .await
                .unwrap_or_else(|| format!("order {status:?}")),
        ));
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(other)?;
    let mut params = CertificateParams::new(vec![dns.to_owned()]).map_err(other)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(other)?;
    order.finalize_csr(csr.der()).await?;
    let pem = order.poll_certificate(&polling()).await?;
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OrderError::Other {
            error: format!("the CA's chain is malformed: {e}"),
            retry_after: None,
        })?;
    Ok((key.serialize_der(), chain))
}

/// The CA's reason for an invalid order: its challenge's error.
async fn why_invalid(order: &mut instant_acme::Order) -> Option<String> {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if let Ok(state) = authorization.refresh().await {
            if let Some(problem) = state.challenges.iter().find_map(|c| c.error.as_ref()) {
                return Some(problem.to_string());
            }
        }
    }
    None
}

/// RFC 8737's validation certificate: self-signed for `name`, with the critical
/// acmeIdentifier extension holding the SHA-256 of the key authorization.
fn tls_alpn_certificate(name: &Domain, digest: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params =
        CertificateParams::new(vec![name.as_str().to_owned()]).map_err(|e| e.to_string())?;
    params.distinguished_name = DistinguishedName::new();
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let certificate = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((certificate.der().to_vec(), key.serialize_der()))
}

fn other(e: rcgen::Error) -> OrderError {
    OrderError::Other {
        error: format!("cannot make the key or CSR: {e}"),
        retry_after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::{FromDer, X509Certificate};

    #[test]
    fn the_validation_certificate_follows_rfc_8737() {
        let name = Domain::parse("v.example").unwrap();
        let digest = [7u8; 32];
        let (der, key) = tls_alpn_certificate(&name, &digest).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(ext.value, [&[0x04, 32][..], &digest].concat());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        assert!(Certificate::new(&name, None, key, vec![der]).is_ok());
    }
}
