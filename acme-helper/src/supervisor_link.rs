//! The channel to the supervisor, on descriptor 3: `Start` with the store's descriptor, then
//! `Ready`; the worker links it hands over; the `Status` of each name; heartbeats; `Shutdown`.

use std::os::fd::OwnedFd;

use anyhow::bail;
use core_server_proto::acme_ipc::{AcmeSettings, CertificateStatus, FromAcme, ToAcme};
use core_server_proto::channel::{inherited_fd, Channel};
use tracing::warn;

pub struct SupervisorLink(Channel<FromAcme, ToAcme>);

impl SupervisorLink {
    /// The inherited channel (inside the runtime).
    pub fn inherited() -> anyhow::Result<SupervisorLink> {
        Ok(SupervisorLink(Channel::new(inherited_fd()?)?))
    }

    /// Reads `Start`: the settings and the store directory.
    pub async fn receive_start(&self) -> anyhow::Result<(AcmeSettings, OwnedFd)> {
        match self.0.recv().await? {
            Some((ToAcme::Start { settings }, mut fds)) if fds.len() == 1 => {
                Ok((settings, fds.remove(0)))
            }
            other => {
                bail!("expected Start with the store directory from the supervisor, got {other:?}")
            }
        }
    }

    pub async fn ready(&self) -> anyhow::Result<()> {
        Ok(self.0.send(&FromAcme::Ready, &[]).await?)
    }

    /// Tells the supervisor what `core-server status` shows for a name. A lost supervisor is
    /// noticed by [`Self::follow`], which ends the process.
    pub async fn status(&self, status: CertificateStatus) {
        if let Err(e) = self.0.send(&FromAcme::Status(status), &[]).await {
            warn!("cannot send a status to the supervisor: {e}");
        }
    }

    /// Hands each new worker link to `on_worker` until `Shutdown` or the supervisor is gone.
    pub async fn follow(&self, mut on_worker: impl FnMut(OwnedFd)) {
        loop {
            match self.0.recv().await {
                Ok(Some((ToAcme::Worker, mut fds))) if fds.len() == 1 => on_worker(fds.remove(0)),
                Ok(Some((ToAcme::Shutdown, _))) => return,
                Ok(Some((ToAcme::Ping, _))) => {
                    if let Err(e) = self.0.send(&FromAcme::Pong, &[]).await {
                        warn!("cannot answer the supervisor ({e}); stopping");
                        return;
                    }
                }
                Ok(Some(other)) => warn!("unexpected message from the supervisor: {other:?}"),
                Ok(None) => {
                    warn!("the supervisor is gone; stopping");
                    return;
                }
                Err(e) => {
                    warn!("cannot read from the supervisor ({e}); stopping");
                    return;
                }
            }
        }
    }
}
