//! Renewal in the background: a handshake never waits for it (the old certificate is served
//! until the new one replaces it, and the worker gets that one unasked).
//!
//! When it is due: inside the CA's ACME Renewal Information window (RFC 9773), at a random
//! point of it, when the CA offers ARI; otherwise when a third of the lifetime remains (half,
//! for certificates shorter than 10 days). Only the names the worker routes are renewed (its
//! routed set at each link, then its requests and `Forget`s, kept as the names' `forgotten`),
//! and a name backing off waits for its next try. Asking the CA for a window is bounded in
//! time, so a silent CA cannot stop the renewals of the other names.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use core_server_proto::domain::Domain;
use instant_acme::CertificateIdentifier;
use rustls_pki_types::CertificateDer;
use tracing::debug;

use crate::certificate::Certificate;
use crate::clock;
use crate::issuer::{Issuer, Source};

const DAY: u64 = 24 * 3600;
/// The longest sleep between two looks at the store.
const MAX_SLEEP: u64 = 3600;
/// ARI windows are fetched again after the CA's Retry-After, within these bounds.
const ARI_RECHECK: (u64, u64) = (60, 6 * 3600);
/// How long asking the CA for a renewal window may take (the account, then one request).
const ARI_TIMEOUT: Duration = Duration::from_secs(90);

/// When a certificate valid from `not_before` to `not_after` is renewed without ARI.
pub fn by_lifetime(not_before: u64, not_after: u64) -> u64 {
    let lifetime = not_after.saturating_sub(not_before);
    let remaining = if lifetime < 10 * DAY {
        lifetime / 2
    } else {
        lifetime / 3
    };
    not_after - remaining
}

/// A point of the window `[start, end]` chosen by `random`, not before `now`.
pub fn in_window(start: u64, end: u64, now: u64, random: u64) -> u64 {
    let end = end.max(start);
    (start + random % (end - start + 1)).max(now)
}

/// The ARI answer for one certificate.
struct Ari {
    leaf: Vec<u8>,
    renew_at: Option<u64>,
    recheck_at: u64,
}

pub async fn run(issuer: Arc<Issuer>) {
    let mut ari: HashMap<Domain, Ari> = HashMap::new();
    loop {
        let now = clock::now();
        let mut wake = now + MAX_SLEEP;
        for name in issuer.store.names().unwrap_or_default() {
            let Ok(state) = issuer.store.read_state(&name) else {
                continue;
            };
            // A name without a certificate gets one at its next handshake.
            let Some(certificate) = issuer.stored(&name) else {
                continue;
            };
            if state.forgotten || matches!(issuer.source, Source::NoMkcert) {
                continue;
            }
            let (due, recheck) = if issuer.servable(&certificate) {
                due(&issuer, &name, &certificate, &mut ari).await
            } else {
                (now, u64::MAX) // expired, or from another source
            };
            let due = due.max(state.backoff.next_try.unwrap_or(0));
            wake = wake.min(recheck);
            if due <= clock::now() {
                debug!("{name}: renewing");
                issuer.renew(&name, &certificate).await;
                // Look again soon (a failure has set a next try).
                wake = wake.min(clock::now() + 1);
            } else {
                wake = wake.min(due);
            }
        }
        let sleep = Duration::from_secs(wake.saturating_sub(clock::now()).max(1));
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = issuer.changed.notified() => {}
        }
    }
}

/// When `certificate` is due: by ARI when the CA has it, else by its lifetime; and when to
/// ask the CA again (so a window it moves earlier is seen).
async fn due(
    issuer: &Issuer,
    name: &Domain,
    certificate: &Certificate,
    ari: &mut HashMap<Domain, Ari>,
) -> (u64, u64) {
    let lifetime = by_lifetime(certificate.not_before, certificate.not_after);
    let Source::Acme(account) = &issuer.source else {
        return (lifetime, u64::MAX);
    };
    let now = clock::now();
    let fresh = ari
        .get(name)
        .is_some_and(|a| a.leaf == certificate.chain[0] && a.recheck_at > now);
    if !fresh {
        let answer = async {
            let account = account.get(&issuer.store).await.ok()?;
            let id = CertificateIdentifier::try_from(&CertificateDer::from(
                certificate.chain[0].as_slice(),
            ))
            .ok()?;
            account.renewal_info(&id).await.ok()
        };
        // A CA that does not answer must not stop the renewals of every other name.
        let answer = tokio::time::timeout(ARI_TIMEOUT, answer);
        let (renew_at, recheck) = match answer.await.ok().flatten() {
            Some((info, retry_after)) => {
                let window = info.suggested_window;
                let (start, end) = (
                    window.start.unix_timestamp().max(0) as u64,
                    window.end.unix_timestamp().max(0) as u64,
                );
                let at = in_window(start, end, now, random());
                debug!("{name}: ARI window {start}..{end}, renewing at {at}");
                (Some(at), retry_after.as_secs())
            }
            None => (None, ARI_RECHECK.1),
        };
        ari.insert(
            name.clone(),
            Ari {
                leaf: certificate.chain[0].clone(),
                renew_at,
                recheck_at: now + recheck.clamp(ARI_RECHECK.0, ARI_RECHECK.1),
            },
        );
    }
    let known = &ari[name];
    (known.renew_at.unwrap_or(lifetime), known.recheck_at)
}

fn random() -> u64 {
    let mut bytes = [0u8; 8];
    let _ = rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty());
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_third_of_the_lifetime_remains_or_half_when_short() {
        // 90 days: renewed with 30 left.
        assert_eq!(by_lifetime(0, 90 * DAY), 60 * DAY);
        // 6 days: with 3 left.
        assert_eq!(by_lifetime(1000, 1000 + 6 * DAY), 1000 + 3 * DAY);
        // 10 days is not short.
        assert_eq!(by_lifetime(0, 30 * DAY), 20 * DAY);
        // Minutes-long test certificates too.
        assert_eq!(by_lifetime(100, 160), 130);
    }

    #[test]
    fn a_point_in_the_window_never_in_the_past() {
        for random in [0, 1, 7, u64::MAX] {
            let at = in_window(100, 200, 50, random);
            assert!((100..=200).contains(&at), "{at}");
        }
        assert_eq!(in_window(100, 200, 300, 5), 300, "a past window: now");
        assert_eq!(in_window(100, 100, 0, 9), 100);
        assert_eq!(
            in_window(200, 100, 0, 9),
            200,
            "an inverted window is its start"
        );
    }
}
