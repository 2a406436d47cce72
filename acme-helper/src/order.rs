//! One attempt at a certificate from the ACME CA: TLS-ALPN-01 first (RFC 8737), then, when
//! the CA does not offer it, the worker could not set it up, or its validation failed, HTTP-01
//! in a new order. Each order:
//! new order, the worker set up to answer the challenge (it says `ChallengeReady`), the CA
//! told to validate, the order polled tightly (from 50 ms, honouring Retry-After), a CSR for
//! a fresh ECDSA P-256 key, the chain fetched.
//!
//! Every failed validation is recorded in the name's [`Backoff`] as it happens, and the
//! fallback is skipped when it would make a fourth failure within the hour. Before each
//! order, the backoff is stored with that order counted as failed: a helper killed while it
//! runs (or stopped before it could finish it) has it counted; the end of the attempt stores
//! the real outcome.

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
use tracing::{debug, info, warn};

use crate::account::describe;
use crate::backoff::Backoff;
use crate::certificate::Certificate;
use crate::clock;
use crate::names::checked;
use crate::worker_link::{Challenge, WorkerLink};

/// How long the worker may take to set a challenge up (it is one message away, and a
/// handshake waits meanwhile).
const CHALLENGE_SETUP: Duration = Duration::from_secs(2);

/// Polls of the order: tight at first, since a CA often validates and issues in milliseconds.
fn polling() -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(50))
        .backoff(1.5)
        .timeout(Duration::from_secs(90))
}

/// The failure an order counts as until it ends (when the helper is killed meanwhile).
pub const UNFINISHED: &str = "an order was under way when the helper stopped";

/// How an order ended without a certificate.
enum OrderError {
    /// The CA offers no challenge of this type for the name.
    NotOffered,
    /// The worker set up none of the challenges: the CA was not asked to validate.
    NotAnswered(String),
    /// The CA could not validate the challenge: counts towards the backoff.
    Validation { kind: ChallengeType, error: String },
    /// The CA does not know our account (any more).
    NoAccount,
    /// Anything else (the CA unreachable, a rate limit): ends the attempt.
    Other {
        error: String,
        retry_after: Option<SystemTime>,
    },
}

impl From<instant_acme::Error> for OrderError {
    fn from(e: instant_acme::Error) -> OrderError {
        if let instant_acme::Error::Api(problem) = &e {
            if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:accountDoesNotExist") {
                return OrderError::NoAccount;
            }
        }
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
            error: describe(&e),
            retry_after,
        }
    }
}

/// Why an attempt failed.
pub enum Failure {
    /// The CA does not know the account: make a new one and try again.
    NoAccount,
    Other(String),
}

/// One attempt for `name`; `replaces`: the certificate a renewal replaces (for ARI), when
/// this CA issued it. `store` keeps a backoff in the store at once.
pub async fn obtain(
    account: &Account,
    source: &str,
    name: &Domain,
    replaces: Option<&Certificate>,
    link: &Arc<WorkerLink>,
    backoff: &mut Backoff,
    store: &mut (dyn FnMut(&Backoff) + Send),
) -> Result<Certificate, Failure> {
    let replaces = replaces.and_then(|old| {
        CertificateIdentifier::try_from(&CertificateDer::from(old.chain[0].as_slice()))
            .ok()
            .map(CertificateIdentifier::into_owned)
    });
    let mut kinds = vec![ChallengeType::TlsAlpn01, ChallengeType::Http01];
    let mut last = String::from("the CA offers neither TLS-ALPN-01 nor HTTP-01");
    while !kinds.is_empty() {
        let now = clock::now();
        if !backoff.allows_another_validation(now) {
            break;
        }
        let mut tentative = backoff.clone();
        tentative.fail(now, UNFINISHED.into(), None);
        store(&tentative);
        let started = Instant::now();
        match order(account, name, &kinds, replaces.clone(), link).await {
            Ok((key, chain, kind)) => {
                info!(
                    "{name}: certificate issued ({kind:?}) in {:?}",
                    started.elapsed()
                );
                return Certificate::new(name, Some(source.to_owned()), key, chain)
                    .map_err(|e| Failure::Other(format!("the CA's certificate: {e}")));
            }
            // Nothing to validate: the attempt fails, and backs off like any other, so that
            // a worker that answers no challenge does not have an order placed per handshake.
            Err(OrderError::NotOffered) => {
                backoff.fail(now, last.clone(), None);
                break;
            }
            Err(OrderError::NotAnswered(error)) => {
                last = error;
                backoff.fail(now, last.clone(), None);
                break;
            }
            Err(OrderError::NoAccount) => return Err(Failure::NoAccount),
            // That authorization is spent: a new order, with the other challenge types.
            Err(OrderError::Validation { kind, error }) => {
                warn!("{name}: {kind:?} validation failed: {error}");
                last = format!("{kind:?} validation failed: {error}");
                backoff.fail(now, last.clone(), None);
                kinds.retain(|k| *k != kind);
            }
            Err(OrderError::Other { error, retry_after }) => {
                let retry_after = retry_after.map(clock::secs);
                backoff.fail(now, error.clone(), retry_after);
                return Err(Failure::Other(error));
            }
        }
    }
    Err(Failure::Other(last))
}

/// One order, answered with the first of `kinds` that the CA offers and the worker sets
/// up: the key (PKCS#8), the chain (DER, leaf first) and the challenge type used.
async fn order(
    account: &Account,
    name: &Domain,
    kinds: &[ChallengeType],
    replaces: Option<CertificateIdentifier<'static>>,
    link: &Arc<WorkerLink>,
) -> Result<(Vec<u8>, Vec<Vec<u8>>, ChallengeType), OrderError> {
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
        // A CA without ARI refuses `replaces`, and one with it refuses to replace a
        // certificate twice (RFC 9773 section 5): order without it.
        Err(instant_acme::Error::Unsupported(_)) => {
            account.new_order(&NewOrder::new(&identifiers)).await?
        }
        Err(instant_acme::Error::Api(problem))
            if problem.r#type.as_deref() == Some("urn:ietf:params:acme:error:alreadyReplaced") =>
        {
            account.new_order(&NewOrder::new(&identifiers)).await?
        }
        result => result?,
    };

    let started = Instant::now();
    let step = |what: &str| debug!("{name}: {what} at {:?}", started.elapsed());
    step("order placed");
    let mut challenges = Vec::new();
    // The type of the challenge answered (none when the CA had the name validated already).
    let mut used = None;
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
        let (kind, answering) =
            answer(account, name, &authorization.challenges, kinds, link).await?;
        challenges.push(answering);
        step("challenge answered by the worker");
        let mut challenge = authorization
            .challenge(kind.clone())
            .ok_or(OrderError::NotOffered)?;
        challenge.set_ready().await?;
        used = Some(kind);
        step("CA told to validate");
    }

    let polled = order.poll_ready(&polling()).await;
    // Validated or not: the worker stops answering.
    drop(challenges);
    let kind = used.unwrap_or_else(|| kinds[0].clone());
    let invalid = match polled {
        Ok(OrderStatus::Ready) => None,
        // An order the CA made invalid (with its reason, or not) failed validation.
        Ok(status) => Some(format!("the order is {status:?}")),
        Err(instant_acme::Error::Api(problem)) => Some(problem.to_string()),
        Err(e) => return Err(e.into()),
    };
    if let Some(invalid) = invalid {
        let why = why_invalid(&mut order).await;
        return Err(OrderError::Validation {
            kind,
            error: why.unwrap_or(invalid),
        });
    }

    step("validated");
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(other)?;
    let mut params = CertificateParams::new(vec![dns.to_owned()]).map_err(other)?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(other)?;
    order.finalize_csr(csr.der()).await?;
    step("finalized");
    let pem = order.poll_certificate(&polling()).await?;
    step("certificate fetched");
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|cert| cert.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| OrderError::Other {
            error: format!("the CA's chain is malformed: {e}"),
            retry_after: None,
        })?;
    Ok((key.serialize_der(), chain, kind))
}

/// Has the worker answer the first challenge of `kinds` that the CA offers and that the
/// worker sets up; its type, and the challenge (over when dropped).
async fn answer(
    account: &Account,
    name: &Domain,
    offered: &[instant_acme::Challenge],
    kinds: &[ChallengeType],
    link: &Arc<WorkerLink>,
) -> Result<(ChallengeType, Challenge), OrderError> {
    let mut not_answered = None;
    for kind in kinds {
        let Some(challenge) = offered.iter().find(|c| c.r#type == *kind) else {
            continue;
        };
        // RFC 8555 section 8.1: the token, a dot, the account key's thumbprint.
        let key_authorization = format!("{}.{}", challenge.token, account.key_thumbprint());
        let message: Box<dyn FnOnce(u64) -> AcmeToWorker + Send> = match kind {
            ChallengeType::TlsAlpn01 => {
                let digest = aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    key_authorization.as_bytes(),
                );
                let (certificate, key) =
                    tls_alpn_certificate(name, digest.as_ref()).map_err(|error| {
                        OrderError::Other {
                            error,
                            retry_after: None,
                        }
                    })?;
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
                Box::new(move |id| AcmeToWorker::HttpChallenge {
                    id,
                    name,
                    token,
                    key_authorization,
                })
            }
        };
        match link.challenge(message, CHALLENGE_SETUP).await {
            Ok(answering) => return Ok((kind.clone(), answering)),
            Err(error) => {
                warn!("{name}: {kind:?}: {error}");
                not_answered = Some(error);
            }
        }
    }
    Err(not_answered.map_or(OrderError::NotOffered, OrderError::NotAnswered))
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
