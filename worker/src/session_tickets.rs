//! TLS session tickets that outlive the worker: a client resumes its session (no certificate,
//! no signature: one round trip less and far less CPU) after a worker restart and after a rerun.
//!
//! rustls's own ticketer draws a random key per process, so every restart would invalidate
//! every ticket. Here the keys are derived from the instance's static ticket key
//! (`ToWorker::Start.ticket_key`, kept 0600 under DIR by the supervisor and the same for every
//! worker), as nginx's `ssl_session_ticket_key` is used: HKDF-SHA256 of it per [`PERIOD`] (12
//! hours), so a ticket is accepted for two periods at most. That bounds how long a ticket
//! resumes, not what a leaked key exposes: this is not forward secrecy. Whoever reads
//! `DIR/tls-ticket-key` can derive the key of any period, past or future, and decrypt every
//! ticket issued under it; for TLS 1.2 a ticket holds the session's master secret, so recorded
//! TLS 1.2 traffic (the full handshake's too) can then be read. TLS 1.3 resumption here always
//! adds an ECDHE exchange (psk_dhe_ke, no 0-RTT), so its traffic stays unreadable. Removing
//! the file (the supervisor makes a new one at its next start) is the only rotation.
//!
//! A ticket is `period (8 bytes) | nonce (12) | AES-256-GCM(state) | tag (16)`; the period is
//! authenticated as associated data. Tickets of the current and the previous period are
//! accepted, so one issued at the end of a period still works for a whole period. The same
//! tickets serve TLS 1.3 and TLS 1.2 (RFC 5077).

use std::fmt;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf::{Salt, HKDF_SHA256};
use rustls::server::ProducesTickets;

/// How long one derived key issues tickets; it decrypts them for one period more.
const PERIOD: Duration = Duration::from_secs(12 * 60 * 60);

/// Separates these keys from anything else that might one day be derived from the same secret.
const SALT: &[u8] = b"core-server session tickets v1";

const PERIOD_LEN: usize = 8;

pub struct SessionTickets {
    secret: Vec<u8>,
    keys: RwLock<Keys>,
}

/// The keys of the current period and of the one before it.
struct Keys {
    period: u64,
    current: RandomizedNonceKey,
    previous: RandomizedNonceKey,
}

impl SessionTickets {
    /// Keys derived from the instance's ticket key `secret` (32 random bytes).
    pub fn new(secret: &[u8]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            secret.len() >= 32,
            "the session-ticket key has {} bytes, not 32",
            secret.len()
        );
        let period = current_period();
        let keys = Keys::derive(secret, period);
        Ok(SessionTickets {
            secret: secret.to_vec(),
            keys: RwLock::new(keys),
        })
    }

    /// Runs `f` on the keys of the current period, rotating them first if it has changed.
    fn with_keys<T>(&self, f: impl FnOnce(&Keys) -> T) -> T {
        let period = current_period();
        {
            let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
            if keys.period == period {
                return f(&keys);
            }
        }
        let mut keys = self.keys.write().unwrap_or_else(|e| e.into_inner());
        if keys.period != period {
            *keys = Keys::derive(&self.secret, period);
        }
        f(&keys)
    }
}

impl Keys {
    fn derive(secret: &[u8], period: u64) -> Keys {
        Keys {
            period,
            current: derive_key(secret, period),
            previous: derive_key(secret, period.saturating_sub(1)),
        }
    }

    fn for_period(&self, period: u64) -> Option<&RandomizedNonceKey> {
        if period == self.period {
            Some(&self.current)
        } else if period.checked_add(1) == Some(self.period) {
            Some(&self.previous)
        } else {
            None
        }
    }
}

fn derive_key(secret: &[u8], period: u64) -> RandomizedNonceKey {
    let mut bytes = [0u8; 32];
    let info = period.to_be_bytes();
    let info = [info.as_slice()];
    Salt::new(HKDF_SHA256, SALT)
        .extract(secret)
        .expand(&info, HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut bytes))
        .expect("HKDF-SHA256 yields 32 bytes");
    RandomizedNonceKey::new(&AES_256_GCM, &bytes).expect("a 32-byte AES-256-GCM key")
}

fn current_period() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_secs() / PERIOD.as_secs()
}

impl ProducesTickets for SessionTickets {
    fn enabled(&self) -> bool {
        true
    }

    /// One period: a ticket issued at any time of it still decrypts that long.
    fn lifetime(&self) -> u32 {
        PERIOD.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.with_keys(|keys| {
            let header = keys.period.to_be_bytes();
            let mut sealed = plain.to_vec();
            let nonce = keys
                .current
                .seal_in_place_append_tag(Aad::from(header), &mut sealed)
                .ok()?;
            let mut ticket = Vec::with_capacity(PERIOD_LEN + NONCE_LEN + sealed.len());
            ticket.extend_from_slice(&header);
            ticket.extend_from_slice(nonce.as_ref());
            ticket.extend_from_slice(&sealed);
            Some(ticket)
        })
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (header, rest) = ticket.split_at_checked(PERIOD_LEN)?;
        let (nonce, sealed) = rest.split_at_checked(NONCE_LEN)?;
        let period = u64::from_be_bytes(header.try_into().ok()?);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        self.with_keys(|keys| {
            let key = keys.for_period(period)?;
            let mut plain = sealed.to_vec();
            let len = key
                .open_in_place(nonce, Aad::from(header), &mut plain)
                .ok()?
                .len();
            plain.truncate(len);
            Some(plain)
        })
    }
}

impl fmt::Debug for SessionTickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionTickets")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_worker_with_the_same_key_decrypts_and_a_forgery_fails() {
        let key = [7u8; 32];
        let one = SessionTickets::new(&key).unwrap();
        let ticket = one.encrypt(b"session state").unwrap();
        let other = SessionTickets::new(&key).unwrap();
        assert_eq!(other.decrypt(&ticket).unwrap(), b"session state");

        let stranger = SessionTickets::new(&[8u8; 32]).unwrap();
        assert_eq!(stranger.decrypt(&ticket), None);
        for i in [0, PERIOD_LEN, PERIOD_LEN + NONCE_LEN, ticket.len() - 1] {
            let mut flipped = ticket.clone();
            flipped[i] ^= 1;
            assert_eq!(one.decrypt(&flipped), None, "byte {i} flipped");
        }
        for len in 0..PERIOD_LEN + NONCE_LEN + 16 {
            assert_eq!(one.decrypt(&ticket[..len]), None, "cut to {len}");
        }
    }

    #[test]
    fn the_previous_period_is_accepted_older_ones_are_not() {
        let key = [1u8; 32];
        let tickets = SessionTickets::new(&key).unwrap();
        let now = current_period();
        let sealed_in = |period: u64| {
            let header = period.to_be_bytes();
            let mut sealed = b"state".to_vec();
            let nonce = derive_key(&key, period)
                .seal_in_place_append_tag(Aad::from(header), &mut sealed)
                .unwrap();
            [&header[..], nonce.as_ref(), &sealed].concat()
        };
        assert!(tickets.decrypt(&sealed_in(now)).is_some());
        assert!(tickets.decrypt(&sealed_in(now - 1)).is_some());
        assert_eq!(tickets.decrypt(&sealed_in(now - 2)), None);
        assert_eq!(tickets.decrypt(&sealed_in(now + 1)), None);
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(SessionTickets::new(&[0u8; 16]).is_err());
    }
}
