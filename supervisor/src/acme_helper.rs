//! The ACME helper (`core-server-acme`) as the supervisor sees it: starting one on the
//! certificate store, linking it to the worker, restarting it with backoff when it exits, and
//! stopping it. Unlike the worker, it is never waited for: a helper that is slow to start, or
//! gone, delays only certificates not yet issued (the worker keeps serving those it holds),
//! never the main loop.
//!
//! The worker and the helper talk over a socketpair made here, one end to each
//! ([`ToAcme::Worker`], [`ToWorker::AcmeHelper`]), made anew whenever either is restarted; the
//! supervisor reads none of their messages.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use core_server_proto::acme_ipc::{
    AcmeSettings, CertificateSource, CertificateStatus, FromAcme, Mkcert, ToAcme, MAX_STATUS_TEXT,
};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::domain::Domain;
use core_server_proto::ipc::ToWorker;
use core_server_proto::routes::Routes;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::child::{self, Child};
use crate::cli::ServerOptions;
use crate::supervise::Supervisor;
use crate::worker::Worker;

/// How often a helper is asked to prove it runs, and how long it has to answer (generous: a
/// stuck helper only delays certificates not yet issued).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a helper told to shut down may take to exit before it is killed: it first
/// finishes the orders under way (15 s at most; at once when there are none), so that a
/// rerun's old worker gets the certificates its handshakes wait for.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);

/// The largest `--acme-ca-root` file: a few roots, not a whole system bundle (it travels in
/// one message, and the CA's own listener needs only its root).
const MAX_CA_ROOT_LEN: usize = 32 * 1024;

/// The most names `status` keeps apart from the routed ones (names once routed, still in
/// the store); a helper saying more is not believed.
const MAX_UNROUTED_STATUSES: usize = 10_000;

/// What the supervisor needs to start helpers: read from the command line before anything
/// is bound or taken over, so a mistake there changes nothing.
pub struct HelperSetup {
    pub binary: PathBuf,
    pub settings: AcmeSettings,
}

impl HelperSetup {
    /// Finds the helper binary and mkcert, reads the CA root.
    pub fn new(options: &ServerOptions, source: CertificateSource) -> anyhow::Result<Self> {
        let ca_root_pem = match &options.acme_ca_root {
            Some(path) => Some(read_ca_root(path)?),
            None => None,
        };
        let mkcert = match source {
            CertificateSource::Mkcert => find_mkcert(),
            CertificateSource::Acme => None,
        };
        if let Some(mkcert) = &mkcert {
            info!(
                "local mode: HTTPS certificates from {} with CAROOT {} (which the children's \
                 user must be able to read)",
                mkcert.binary.display(),
                mkcert.caroot.display()
            );
        }
        Ok(HelperSetup {
            binary: child::sibling_binary("core-server-acme")?,
            settings: AcmeSettings {
                source,
                directory: options.acme_directory.clone(),
                email: options.acme_email.clone(),
                ca_root_pem,
                mkcert,
            },
        })
    }
}

/// The `--acme-ca-root` file: certificates in PEM, nothing else (a key given by mistake
/// must not travel to the helper), and small.
fn read_ca_root(path: &Path) -> anyhow::Result<Vec<u8>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("cannot read --acme-ca-root {}", path.display()))?;
    let text = String::from_utf8_lossy(&pem);
    if pem.len() > MAX_CA_ROOT_LEN {
        anyhow::bail!(
            "--acme-ca-root {}: {} bytes, at most {MAX_CA_ROOT_LEN}: give the CA's root, not a \
             bundle",
            path.display(),
            pem.len()
        );
    }
    if !text.contains("-----BEGIN CERTIFICATE-----") || text.contains("PRIVATE KEY") {
        anyhow::bail!(
            "--acme-ca-root {}: not a PEM file of certificates only",
            path.display()
        );
    }
    Ok(pem)
}

/// mkcert on our PATH, and the CA root it would use (its own rule: `$CAROOT`, else
/// `$XDG_DATA_HOME/mkcert`, else `~/.local/share/mkcert`): the helper's environment has
/// neither. `None`: HTTPS is off in local mode (the helper says why, once).
fn find_mkcert() -> Option<Mkcert> {
    use std::os::unix::fs::PermissionsExt;
    let binary = std::env::split_paths(&std::env::var_os("PATH")?)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join("mkcert"))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })?;
    let env_dir = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let caroot = match (env_dir("CAROOT"), env_dir("XDG_DATA_HOME")) {
        (Some(caroot), _) => PathBuf::from(caroot),
        (None, Some(data)) => Path::new(&data).join("mkcert"),
        (None, None) => Path::new(&env_dir("HOME")?).join(".local/share/mkcert"),
    };
    Some(Mkcert { binary, caroot })
}

/// A running helper.
pub struct AcmeHelper {
    child: Child,
    channel: Channel<ToAcme, FromAcme>,
    started: Instant,
    /// When to send the next `Ping`, or, while one is unanswered, when it is overdue.
    heartbeat_due: Instant,
    ping_unanswered: bool,
}

impl AcmeHelper {
    async fn tell(&mut self, message: &ToAcme, fds: &[BorrowedFd<'_>]) -> bool {
        self.child.tell(&self.channel, message, fds).await
    }

    /// Sends the next `Ping`, or kills a helper that left the last one unanswered (its
    /// channel then closes, and it is restarted).
    async fn heartbeat(&mut self) {
        self.heartbeat_due = Instant::now() + HEARTBEAT_TIMEOUT;
        if self.ping_unanswered {
            warn!(
                "the ACME helper did not answer within {HEARTBEAT_TIMEOUT:?} (stopped or stuck); replacing it"
            );
            self.child.start_kill();
        } else {
            self.ping_unanswered = self.tell(&ToAcme::Ping, &[]).await;
        }
    }
}

/// What happened to the helper that the main loop acts on.
pub enum HelperEvent {
    /// It said something (taken in already: see [`HelperSlot::certificates`]).
    Said,
    /// It exited (and is restarted after a delay), or its channel failed.
    Exited,
    /// The delay is over: start one ([`Supervisor::restart_acme_helper`]).
    RestartDue,
}

/// The main loop's helper: running, or waiting for its restart; and what it said of each
/// name, for `status`.
pub struct HelperSlot {
    running: Option<AcmeHelper>,
    restart_at: Instant,
    backoff: Backoff,
    certificates: BTreeMap<Domain, CertificateStatus>,
}

impl HelperSlot {
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().and_then(|h| h.child.id())
    }

    /// Each name's status, as the helper last said it.
    pub fn certificates(&self) -> impl Iterator<Item = &CertificateStatus> {
        self.certificates.values()
    }

    /// The next thing that happens to it. Cancel-safe: an exit cut short is seen again.
    /// `routes` bounds what `status` keeps of what it says.
    pub async fn event(&mut self, routes: &Routes) -> HelperEvent {
        let Some(helper) = &mut self.running else {
            tokio::time::sleep_until(self.restart_at).await;
            return HelperEvent::RestartDue;
        };
        let received = tokio::select! {
            received = helper.channel.recv() => received,
            _ = tokio::time::sleep_until(helper.heartbeat_due) => {
                helper.heartbeat().await;
                return HelperEvent::Said;
            }
        };
        match received {
            Ok(Some((FromAcme::Pong, _))) => {
                helper.ping_unanswered = false;
                helper.heartbeat_due = Instant::now() + HEARTBEAT_INTERVAL;
                return HelperEvent::Said;
            }
            Ok(Some((FromAcme::Ready, _))) => {
                info!("ACME helper ready");
                return HelperEvent::Said;
            }
            Ok(Some((FromAcme::Status(status), _))) => {
                self.note(status, routes);
                return HelperEvent::Said;
            }
            Ok(None) => {}
            Err(e) => warn!("the ACME helper's channel failed: {e}"),
        }
        helper.child.start_kill();
        let status = helper.child.wait().await;
        let delay = self.backoff.after_exit(helper.started.elapsed());
        warn!(
            "the ACME helper exited ({}); starting a new one in {delay:?}",
            child::describe(status)
        );
        self.running = None;
        self.restart_at = Instant::now() + delay;
        HelperEvent::Exited
    }

    /// Keeps `status`, checked: a valid name, text cut short, and no more names than routes
    /// plus [`MAX_UNROUTED_STATUSES`] (a helper gone wrong cannot fill our memory).
    fn note(&mut self, mut status: CertificateStatus, routes: &Routes) {
        let Ok(name) = Domain::parse(&status.name) else {
            warn!(
                "the ACME helper sent a status for {:?}; ignored",
                status.name
            );
            return;
        };
        for text in [&mut status.issuer, &mut status.last_error]
            .into_iter()
            .flatten()
        {
            if text.len() > MAX_STATUS_TEXT {
                let cut = (0..=MAX_STATUS_TEXT)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text.truncate(cut);
            }
        }
        let full = self.certificates.len() >= routes.len() + MAX_UNROUTED_STATUSES;
        if full && !self.certificates.contains_key(&name) {
            return;
        }
        self.certificates.insert(name, status);
    }

    /// Tells it to exit, and waits (killing it after [`SHUTDOWN_WAIT`]).
    pub async fn shut_down(&mut self) {
        let Some(mut helper) = self.running.take() else {
            return;
        };
        helper.tell(&ToAcme::Shutdown, &[]).await;
        if tokio::time::timeout(SHUTDOWN_WAIT, helper.child.wait())
            .await
            .is_err()
        {
            warn!("the ACME helper did not exit within {SHUTDOWN_WAIT:?}; killing it");
            helper.child.start_kill();
            let _ = helper.child.wait().await;
        }
    }
}

impl Supervisor {
    /// Starts the first helper and links it to `worker`; if it cannot start, it is tried again
    /// (with backoff) from the main loop.
    pub async fn start_acme_helper(&self, worker: &mut Worker) -> HelperSlot {
        let mut slot = HelperSlot {
            running: None,
            restart_at: Instant::now(),
            backoff: Backoff::default(),
            certificates: BTreeMap::new(),
        };
        self.restart_acme_helper(&mut slot, worker).await;
        slot
    }

    /// Starts a helper in `slot` and links it to `worker`; on failure, schedules another try.
    pub async fn restart_acme_helper(&self, slot: &mut HelperSlot, worker: &mut Worker) {
        match self.spawn_acme_helper().await {
            Ok(helper) => {
                info!(
                    "ACME helper started (pid {})",
                    helper.child.id().unwrap_or(0)
                );
                // It says again what its store holds.
                slot.certificates.clear();
                slot.running = Some(helper);
                self.link_acme_helper(slot, worker).await;
            }
            Err(e) => {
                let delay = slot.backoff.after_exit(Duration::ZERO);
                warn!("{e:#}; trying again in {delay:?}");
                slot.restart_at = Instant::now() + delay;
            }
        }
    }

    async fn spawn_acme_helper(&self) -> anyhow::Result<AcmeHelper> {
        let setup = &self.acme;
        let (ours, theirs) = socketpair_fds().context("cannot create the helper's socketpair")?;
        let stderr = self
            .child_logs
            .stderr()
            .context("cannot set up the helper's log")?;
        let child = child::spawn(&setup.binary, theirs, self.privileges, stderr)?;
        let mut helper = AcmeHelper {
            child,
            channel: Channel::new(ours)?,
            started: Instant::now(),
            heartbeat_due: Instant::now() + HEARTBEAT_INTERVAL,
            ping_unanswered: false,
        };
        let start = ToAcme::Start {
            settings: setup.settings.clone(),
        };
        if !helper.tell(&start, &[self.acme_store.as_fd()]).await {
            anyhow::bail!("the ACME helper did not take its start message");
        }
        Ok(helper)
    }

    /// Gives the worker and the helper in `slot` (if one runs) a new channel to each other.
    pub async fn link_acme_helper(&self, slot: &mut HelperSlot, worker: &mut Worker) {
        let Some(helper) = &mut slot.running else {
            return;
        };
        let (for_helper, for_worker) = match socketpair_fds() {
            Ok(pair) => pair,
            Err(e) => {
                // Both keep running unlinked: cached certificates still serve.
                warn!("cannot link the worker to the ACME helper: {e}");
                return;
            }
        };
        if helper.tell(&ToAcme::Worker, &[for_helper.as_fd()]).await {
            worker
                .tell_with(&ToWorker::AcmeHelper, &[for_worker.as_fd()])
                .await;
        }
    }
}
