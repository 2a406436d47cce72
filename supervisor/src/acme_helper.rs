//! The ACME helper (`core-server-acme`) as the supervisor sees it: starting one on the
//! certificate store, linking it to the worker, restarting it with backoff when it exits, and
//! stopping it. Unlike the worker, it is never waited for: a helper that is slow to start, or
//! gone, delays only certificates not yet issued (the worker keeps serving those it holds),
//! never the main loop.
//!
//! The worker and the helper talk over a socketpair made here, one end to each
//! ([`ToAcme::Worker`], [`ToWorker::AcmeHelper`]), made anew whenever either is restarted; the
//! supervisor reads none of their messages.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use core_server_proto::acme_ipc::{AcmeSettings, CertificateSource, FromAcme, Mkcert, ToAcme};
use core_server_proto::channel::{socketpair_fds, Channel};
use core_server_proto::ipc::ToWorker;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::child::{self, Child};
use crate::cli::ServerOptions;
use crate::supervise::Supervisor;
use crate::worker::{Worker, WORKER_TIMEOUT};

/// How long a helper told to shut down may take to exit before it is killed.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// What the supervisor needs to start helpers.
pub struct HelperSetup {
    pub binary: PathBuf,
    pub settings: AcmeSettings,
    /// `DIR/acme`, owned by the children's user; each helper gets a copy.
    pub store: OwnedFd,
}

impl HelperSetup {
    /// From the command line: finds the helper binary and mkcert, reads the CA root.
    pub fn new(
        options: &ServerOptions,
        source: CertificateSource,
        store: OwnedFd,
    ) -> anyhow::Result<Self> {
        let ca_root_pem = match &options.acme_ca_root {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read --acme-ca-root {}", path.display()))?,
            ),
            None => None,
        };
        let mkcert = match source {
            CertificateSource::Mkcert => find_mkcert(),
            CertificateSource::Acme => None,
        };
        Ok(HelperSetup {
            binary: child::sibling_binary("core-server-acme")?,
            settings: AcmeSettings {
                source,
                directory: options.acme_directory.clone(),
                email: options.acme_email.clone(),
                ca_root_pem,
                mkcert,
            },
            store,
        })
    }
}

/// mkcert on our PATH, and the CA root it would use (its own rule: `$CAROOT`, else
/// `$XDG_DATA_HOME/mkcert`, else `~/.local/share/mkcert`): the helper's environment has
/// neither. `None`: HTTPS is off in local mode (the helper says why, once).
fn find_mkcert() -> Option<Mkcert> {
    use std::os::unix::fs::PermissionsExt;
    let binary = std::env::split_paths(&std::env::var_os("PATH")?)
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
}

impl AcmeHelper {
    /// Sends `message` with `fds`; a helper that does not take it within [`WORKER_TIMEOUT`]
    /// is killed (its channel then closes, and it is restarted).
    async fn tell(&mut self, message: &ToAcme, fds: &[std::os::fd::BorrowedFd<'_>]) -> bool {
        match tokio::time::timeout(WORKER_TIMEOUT, self.channel.send(message, fds)).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => {}
            Err(_) => warn!("the ACME helper took no message for {WORKER_TIMEOUT:?}; killing it"),
        }
        let _ = self.child.start_kill();
        false
    }
}

/// What happened to the helper, for the main loop.
pub enum HelperEvent {
    Said(FromAcme),
    /// It exited (and is restarted after a delay).
    Exited,
    /// The delay is over: start one ([`Supervisor::restart_acme_helper`]).
    RestartDue,
}

/// The main loop's helper: running, or waiting for its restart.
pub struct HelperSlot {
    running: Option<AcmeHelper>,
    restart_at: Instant,
    backoff: Backoff,
}

impl HelperSlot {
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().and_then(|h| h.child.id())
    }

    /// The next thing that happens to it. Cancel-safe: an exit cut short is seen again.
    pub async fn event(&mut self) -> HelperEvent {
        let Some(helper) = &mut self.running else {
            tokio::time::sleep_until(self.restart_at).await;
            return HelperEvent::RestartDue;
        };
        if let Ok(Some((message, _))) = helper.channel.recv().await {
            return HelperEvent::Said(message);
        }
        let _ = helper.child.start_kill();
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
            let _ = helper.child.start_kill();
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
        };
        let start = ToAcme::Start {
            settings: setup.settings.clone(),
        };
        if !helper.tell(&start, &[setup.store.as_fd()]).await {
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
