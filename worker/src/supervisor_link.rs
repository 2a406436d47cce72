//! The worker's side of its channel to the supervisor (descriptor 3): `Start` and the routes
//! it starts with, then the supervisor's messages while the worker runs: tunnel commands
//! (`tunnel allow|revoke`) and `status` reports, route saves, the ACME helper's channel, the
//! hand-over between instances (`PauseCommands`, `Own`), heartbeats, and `Shutdown`.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use core_server_proto::acme_ipc::Secret;
use core_server_proto::command::Reply;
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{
    FromWorker, ListenerKind, ToWorker, WorkerSettings, TUNNEL_STATUSES_PER_MESSAGE,
};
use core_server_proto::routes::{Route, RouteChange, Routes};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::https::Https;
use crate::route_table::{RouteTable, SupervisorChannel};
use crate::tunnels::Tunnels;
use crate::udp_commands;

/// The grace period when the supervisor vanished without saying how long to drain.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);

/// What the supervisor gives a worker to start with.
pub struct Start {
    pub listeners: Vec<(ListenerKind, OwnedFd)>,
    pub settings: WorkerSettings,
    pub ticket_key: Secret,
    pub routes: Routes,
    /// Whether to serve at once (see `ToWorker::Serve`).
    pub owner: bool,
    /// The channel to the ACME helper, if it came before `Serve`.
    pub acme_helper: Option<OwnedFd>,
}

/// `Start`, then `Routes` chunks, until `Serve` (which says whether we own the routes yet).
pub async fn receive_start(supervisor: &SupervisorChannel) -> anyhow::Result<Start> {
    let (listeners, settings, ticket_key) = match supervisor.recv().await? {
        Some((
            ToWorker::Start {
                listeners,
                settings,
                ticket_key,
            },
            fds,
        )) if fds.len() == listeners.len() => (
            listeners.into_iter().zip(fds).collect(),
            settings,
            ticket_key,
        ),
        other => bail!("expected Start with its sockets from the supervisor, got {other:?}"),
    };
    let mut routes = Vec::new();
    let mut acme_helper = None;
    let owner = loop {
        match supervisor.recv().await? {
            Some((ToWorker::Routes(chunk), _)) => {
                routes.extend(chunk.into_iter().map(|(d, port)| (d, Route::Port(port))))
            }
            Some((ToWorker::TunnelRoutes(chunk), _)) => {
                for tunnel in chunk {
                    match Domain::parse(&tunnel.name) {
                        Ok(domain) => routes.push((
                            domain,
                            Route::Tunnel {
                                tokens: tunnel.tokens,
                            },
                        )),
                        Err(e) => warn!("ignored the tunnel route {:?}: {e}", tunnel.name),
                    }
                }
            }
            Some((ToWorker::AcmeHelper, fds)) => acme_helper = fds.into_iter().next(),
            Some((ToWorker::Serve { owner }, _)) => break owner,
            other => bail!("expected Routes or Serve from the supervisor, got {other:?}"),
        }
    };
    Ok(Start {
        listeners,
        settings,
        ticket_key,
        routes: routes.into_iter().collect(),
        owner,
        acme_helper,
    })
}

/// Handles the supervisor's messages until it asks us to stop or goes away; the grace period.
pub async fn follow_supervisor(
    supervisor: &Arc<SupervisorChannel>,
    routes: &Arc<RouteTable>,
    tunnels: &Tunnels,
    udp: &mpsc::Sender<udp_commands::Control>,
    owns: &watch::Sender<bool>,
    https: &Https,
    tasks: &TaskTracker,
) -> Duration {
    loop {
        match supervisor.recv().await {
            Ok(Some((ToWorker::Tunnel { id, change }, _))) => {
                // Applied and reported here, in order with the messages around it (a
                // `PauseCommands` after it finds it reported); the save is awaited apart.
                let saved = tunnel_change(routes, change).await;
                let supervisor = supervisor.clone();
                tasks.spawn(async move {
                    let error = match saved {
                        Ok(saved) => match saved.await {
                            Reply::Ok => None,
                            Reply::Error(e) => Some(e),
                        },
                        Err(e) => Some(e),
                    };
                    let done = FromWorker::TunnelDone { id, error };
                    if let Err(e) = supervisor.send(&done, &[]).await {
                        warn!("cannot answer the supervisor's tunnel command: {e}");
                    }
                });
            }
            Ok(Some((ToWorker::ReportTunnels { id }, _))) => {
                if report_tunnels(supervisor, tunnels, id).await.is_err() {
                    routes.supervisor_gone();
                    return ORPHAN_GRACE;
                }
            }
            Ok(Some((ToWorker::AcmeHelper, fds))) => match <[OwnedFd; 1]>::try_from(fds) {
                Ok([fd]) => {
                    if let Err(e) = https.connect_helper(fd) {
                        warn!("cannot use the channel to the ACME helper: {e}");
                    }
                }
                Err(fds) => warn!("AcmeHelper came with {} descriptors, not 1", fds.len()),
            },
            Ok(Some((ToWorker::Saved { upto, error }, _))) => routes.saved(upto, error),
            Ok(Some((ToWorker::Shutdown { grace }, _))) => return grace,
            Ok(Some((ToWorker::PauseCommands, _))) => {
                let (paused, done) = oneshot::channel();
                // No UDP socket (or its loop ended): nothing reads commands, so already paused.
                if udp.send(udp_commands::Control::Pause(paused)).await.is_ok() {
                    let _ = done.await;
                }
                if supervisor
                    .send(&FromWorker::CommandsPaused, &[])
                    .await
                    .is_err()
                {
                    routes.supervisor_gone();
                    return ORPHAN_GRACE;
                }
            }
            Ok(Some((ToWorker::Own, _))) => {
                owns.send_replace(true);
                let _ = udp.send(udp_commands::Control::Resume).await;
            }
            Ok(Some((ToWorker::Ping, _))) => {
                if supervisor.send(&FromWorker::Pong, &[]).await.is_err() {
                    routes.supervisor_gone();
                    return ORPHAN_GRACE;
                }
            }
            Ok(Some((other, _))) => warn!("unexpected message from the supervisor: {other:?}"),
            Ok(None) | Err(_) => {
                warn!("the supervisor is gone; stopping");
                routes.supervisor_gone();
                return ORPHAN_GRACE;
            }
        }
    }
}

/// Applies a tunnel command's `change` (reported like a UDP command's); resolves to its
/// reply once saved, or why it could not be applied.
async fn tunnel_change(
    routes: &RouteTable,
    change: RouteChange,
) -> Result<impl std::future::Future<Output = Reply>, String> {
    let text = format!("{change:?}");
    match routes.change(change).await {
        Ok(saved) => Ok(saved),
        Err(e) => {
            info!("tunnel command {text}: {e}");
            Err(e.to_string())
        }
    }
}

/// Answers `ReportTunnels`: the tunnel domains and their agents, in chunks.
async fn report_tunnels(
    supervisor: &SupervisorChannel,
    tunnels: &Tunnels,
    id: u64,
) -> std::io::Result<()> {
    let snapshot = tunnels.snapshot();
    let mut chunks = snapshot.chunks(TUNNEL_STATUSES_PER_MESSAGE).peekable();
    if chunks.peek().is_none() {
        let last = FromWorker::Tunnels {
            id,
            chunk: Vec::new(),
            last: true,
        };
        return supervisor.send(&last, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let message = FromWorker::Tunnels {
            id,
            chunk: chunk.to_vec(),
            last: chunks.peek().is_none(),
        };
        supervisor.send(&message, &[]).await?;
    }
    Ok(())
}
