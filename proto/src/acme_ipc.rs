//! The messages of the ACME helper (`core-server-acme`): with the supervisor that starts it,
//! and with the worker that serves the certificates it holds.
//!
//! The helper owns the certificate store and the ACME account key; the worker never sees
//! either. It asks for a name's certificate ([`WorkerToAcme::Certificate`]) when a handshake
//! needs one it has not loaded, and gets the chain and private key of that one name back. The
//! two talk over a socketpair the supervisor creates and hands one end of to each, again each
//! time either is restarted; the supervisor relays none of their messages.
//!
//! These pass only between binaries of one version (see `ipc.rs`), except
//! [`CertificateStatus`], which `core-server status` reads from the control socket and so
//! follows the control messages' append-only rule: it never changes shape.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::Domain;

/// Where certificates come from: the design's release and local modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertificateSource {
    /// An ACME CA (Let's Encrypt), on the first handshake for a name. Port 80 then redirects
    /// registered hosts to HTTPS, except ACME HTTP-01 challenge paths.
    Acme,
    /// `mkcert`, for local development; HTTP stays served as well, without redirect.
    Mkcert,
}

/// What the worker needs to know about HTTPS, part of its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpsSettings {
    pub source: CertificateSource,
    /// How long a handshake for a name without a certificate waits for one (`--acme-wait`);
    /// the order goes on past it, so a later handshake is fast.
    pub certificate_wait: Duration,
}

/// Secret bytes (a private key, a ticket key): shown as their length only, so that no `{:?}`
/// of a message puts them into a log.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// What the supervisor passes on to the helper from its command line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcmeSettings {
    pub source: CertificateSource,
    /// The ACME directory URL (`--acme-directory`).
    pub directory: String,
    /// The account's contact (`--acme-email`), if any.
    pub email: Option<String>,
    /// Extra roots (PEM) to trust for the CA's own HTTPS listener (`--acme-ca-root`), read
    /// by the supervisor so the helper needs no access to wherever the operator keeps it.
    pub ca_root_pem: Option<Vec<u8>>,
    /// Local mode: the `mkcert` binary found on the supervisor's PATH, and the `CAROOT` it is
    /// run with (the helper's environment has neither); `None`: no mkcert, HTTP only.
    pub mkcert: Option<Mkcert>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mkcert {
    pub binary: PathBuf,
    pub caroot: PathBuf,
}

/// Supervisor to helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToAcme {
    /// The first message. One descriptor attached: the store directory (`DIR/acme`, mode
    /// 0700, owned by the helper's user, opened without following links); the helper keeps
    /// every file it writes beneath it. Answered `Ready`.
    Start { settings: AcmeSettings },
    /// One descriptor attached: the helper's end of a new channel to the (new) worker
    /// (`Channel<AcmeToWorker, WorkerToAcme>`); any earlier one is dropped.
    Worker,
    /// Exit once the orders under way are finished (within a bound, past which they are
    /// abandoned), starting no other; what is on disk stays consistent.
    Shutdown,
    /// Answer `Pong`: a helper that does not, within a deadline, is stopped or stuck and is
    /// replaced.
    Ping,
}

/// Helper to supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromAcme {
    /// The store is open; certificates can be asked for.
    Ready,
    /// What `core-server status` shows for one name; sent for every name in the store at
    /// start, then whenever it changes. Replaces the earlier status of the same name.
    Status(CertificateStatus),
    /// The answer to `Ping`.
    Pong,
}

/// Worker to helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerToAcme {
    /// A handshake for `name` (a registered domain) needs its certificate: answered
    /// `Certificate` or `Unavailable`, however many times it is asked meanwhile (one order
    /// at a time per name).
    Certificate {
        name: Domain,
    },
    /// `name` is no longer routed: stop renewing it (its files stay, for a later `add`).
    Forget {
        name: Domain,
    },
    /// The challenge `AcmeToWorker::TlsAlpnChallenge` or `HttpChallenge` with this `id` is
    /// being answered: the CA may be told to validate.
    ChallengeReady {
        id: u64,
    },
    /// Part of the routed names, sent on every new link (in chunks of at most
    /// [`crate::ipc::ROUTES_PER_MESSAGE`]) and ended by `RoutedEnd`: the names the helper may
    /// renew. Names routed later are asked for (`Certificate`), names removed are `Forget`.
    Routed(Vec<Domain>),
    RoutedEnd,
}

/// Helper to worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AcmeToWorker {
    /// The certificate to serve for `name` from now on: the chain as DER (leaf first) and the
    /// private key as PKCS#8 DER. Also sent unasked, when a renewal replaces it.
    Certificate {
        name: Domain,
        chain: Vec<Vec<u8>>,
        key: Secret,
    },
    /// There is no certificate for `name` now (the reason says why, for the log): handshakes
    /// waiting for one fail. The worker may ask again at a later handshake.
    Unavailable { name: Domain, reason: String },
    /// TLS-ALPN-01 (RFC 8737): answer `acme-tls/1` handshakes for `name` with this validation
    /// certificate (DER) and key (PKCS#8 DER) until `ChallengeDone`; then say `ChallengeReady`.
    TlsAlpnChallenge {
        id: u64,
        name: Domain,
        certificate: Vec<u8>,
        key: Secret,
    },
    /// HTTP-01: answer `GET /.well-known/acme-challenge/<token>` for `name` on the HTTP port
    /// with `key_authorization` (`text/plain`) until `ChallengeDone`; then say `ChallengeReady`.
    HttpChallenge {
        id: u64,
        name: Domain,
        token: String,
        key_authorization: String,
    },
    /// The challenge with this `id` is over: stop answering it.
    ChallengeDone { id: u64 },
}

/// One name in the certificate store, as `core-server status` lists it. Carried by a control
/// reply: never changes shape (see the module's doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateStatus {
    pub name: String,
    /// The issuer's common name (or whole name), if a certificate is held.
    pub issuer: Option<String>,
    /// The held certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: Option<u64>,
    /// Why the last attempt to get one failed, if it did.
    pub last_error: Option<String>,
    /// The earliest time (seconds since the Unix epoch) another order may be placed, while
    /// backing off after failures.
    pub next_try: Option<u64>,
}

/// The most bytes of an issuer's name or an error message a [`CertificateStatus`] shows
/// (the supervisor cuts longer ones), so that
/// [`crate::ipc::CERTIFICATES_PER_MESSAGE`] statuses fit one control message.
pub const MAX_STATUS_TEXT: usize = 300;

/// The file name of the session-ticket key under DIR: 0600, written once by the supervisor
/// and handed to every worker, so a ticket outlives the worker that issued it (and a rerun).
pub const TICKET_KEY_FILE: &str = "tls-ticket-key";

/// The store directory under DIR, owned by the helper's user.
pub const ACME_DIR: &str = "acme";
