//! `core-server-worker`: the unprivileged, network-facing process.
//!
//! Started by the supervisor with no privilege left, it receives the listening sockets and the
//! routes (port and tunnel routes) over its IPC channel (descriptor 3), serves HTTP and the UDP
//! command port, reports every route change (the supervisor's `tunnel allow|revoke` too),
//! serves HTTPS with the certificates the ACME helper hands it over their own channel
//! (`ToWorker::AcmeHelper`), takes agents' tunnels, and on `Shutdown` (or when the supervisor
//! is gone) stops accepting, lets in-flight requests finish within the grace period, and
//! exits. A taker's worker (a rerun's, before the running instance has handed over) serves
//! nothing until told `Own`.
//!
//! Stopping, within the grace period: the accept loops end; every agent is asked to dial a
//! replacement (the next worker's) while its connections here keep serving; the client
//! connections finish; then the tunnels leave the balancer and close once their last
//! requests are done.

mod accept_errors;
mod acme_challenges;
mod acme_link;
mod activity;
mod certificates;
mod connection_limit;
mod failed_attempts;
mod forwarding;
mod http_server;
mod https;
mod last_moment;
mod proxy;
mod quiet_splice;
mod read_deadline;
mod request_body;
mod response_body;
mod route_table;
mod session_tickets;
mod tls_acceptor;
mod tunnel_connection;
mod tunnel_control;
mod tunnel_endpoint;
mod tunnel_forward;
#[cfg(test)]
mod tunnel_tests;
mod tunnel_upgrade;
mod tunnels;
mod udp_commands;
mod upgrade;

use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use core_server_proto::acme_ipc::Secret;
use core_server_proto::channel::{inherited_fd, Channel};
use core_server_proto::command::Reply;
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{
    FromWorker, ListenerKind, ToWorker, WorkerSettings, TUNNEL_STATUSES_PER_MESSAGE,
};
use core_server_proto::routes::{Route, RouteChange, Routes};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::connection_limit::ConnectionLimit;
use crate::http_server::HttpServer;
use crate::https::Https;
use crate::proxy::Proxy;
use crate::route_table::{RouteTable, SupervisorChannel};
use crate::tunnel_endpoint::TunnelEndpoint;
use crate::tunnels::Tunnels;

/// Requests allocate many small short-lived objects (headers, futures, channels); mimalloc
/// handles that pattern with less CPU than glibc's malloc (measured with bench/proxy.sh).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The grace period when the supervisor vanished without saying how long to drain.
const ORPHAN_GRACE: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    core_server_proto::logging::init();
    // Read before the sandbox hides the cgroup's CPU quota from it.
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    // Before the runtime starts its threads: Landlock confines only the calling thread and
    // those it starts afterwards. Nothing until then has read network input.
    let result = core_server_proto::dumpable::forbid()
        .map_err(anyhow::Error::from)
        .and_then(|()| core_server_worker::sandbox::apply().context("cannot sandbox the worker"))
        .and_then(|()| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .context("cannot start the runtime")
        })
        .and_then(|runtime| runtime.block_on(run()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let supervisor: Arc<SupervisorChannel> = Arc::new(Channel::new(inherited_fd()?)?);
    let Start {
        listeners,
        settings,
        ticket_key,
        routes,
        owner,
        acme_helper,
    } = receive_start(&supervisor).await?;

    let routes = Arc::new(RouteTable::new(routes, supervisor.clone()));
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let tunnels = Arc::new(Tunnels::new(settings.tunnel_wait, routes.clone()));
    // Not tracked: it ends with the table, which outlives every task.
    tokio::spawn(tunnels.clone().follow_closures(routes.tunnel_closures()));
    let endpoint = TunnelEndpoint::new(tunnels.clone());
    let proxy = Arc::new(Proxy::new(
        routes.clone(),
        settings.backend_timeout,
        tasks.clone(),
        tunnels.clone(),
        endpoint,
    ));
    let limit = connection_limit(&settings)?;
    let https = Https::new(routes.clone());
    // Whether our instance owns the routes: until it does, we accept no client (the running
    // instance's worker does) and read no command.
    let (owns, owned) = watch::channel(owner);
    let mut udp = None;
    for (kind, fd) in listeners {
        let transport = match kind {
            ListenerKind::Http => https.http(&settings),
            ListenerKind::Https => https.https(&settings, &ticket_key)?,
            ListenerKind::Udp => {
                udp = Some(udp_socket(fd)?);
                continue;
            }
        };
        let server = HttpServer::new(proxy.clone(), &settings, transport, limit.clone());
        tasks.spawn(serve_once_owner(
            server,
            tcp_listener(fd)?,
            owned.clone(),
            stop.clone(),
            tasks.clone(),
        ));
    }
    // Ready before the UDP loop starts, so the first message the supervisor reads is `Ready`.
    supervisor.send(&FromWorker::Ready, &[]).await?;
    let (udp_control, control) = mpsc::channel(1);
    if let Some(udp) = udp {
        let commands = udp_commands::serve(
            udp,
            routes.clone(),
            stop.clone(),
            tasks.clone(),
            control,
            !owner,
        );
        tasks.spawn(commands);
    }

    if let Some(fd) = acme_helper {
        https.connect_helper(fd)?;
    }
    let grace = follow_supervisor(
        &supervisor,
        &routes,
        &tunnels,
        &udp_control,
        &owns,
        &https,
        &tasks,
    )
    .await;
    info!(
        "stopping: {} connections and commands, and {} tunnel tasks, have {grace:?} to finish",
        tasks.len(),
        tunnels.tasks()
    );
    let deadline = tokio::time::Instant::now() + grace;
    stop.cancel();
    // Agents dial the next worker now, while their connections here serve this worker's
    // clients to the end; then those connections close, once their requests are done.
    tunnels.ask_to_reconnect();
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            "grace period over with {} tasks unfinished; exiting",
            tasks.len()
        );
        return Ok(());
    }
    tunnels.close_all();
    if tokio::time::timeout_at(deadline, tunnels.closed())
        .await
        .is_err()
    {
        warn!(
            "grace period over with {} tunnel tasks unfinished; exiting",
            tunnels.tasks()
        );
    }
    Ok(())
}

/// Accepts clients on `listener` from when our instance owns the routes until `stop`.
async fn serve_once_owner(
    server: HttpServer,
    listener: tokio::net::TcpListener,
    mut owned: watch::Receiver<bool>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let owner = tokio::select! {
        owned = owned.wait_for(|owned| *owned) => owned.is_ok(),
        _ = stop.cancelled() => false,
    };
    if owner {
        server.serve(listener, stop, tasks).await;
    }
}

/// What the supervisor gives a worker to start with.
struct Start {
    listeners: Vec<(ListenerKind, OwnedFd)>,
    settings: WorkerSettings,
    ticket_key: Secret,
    routes: Routes,
    /// Whether to serve at once (see `ToWorker::Serve`).
    owner: bool,
    /// The channel to the ACME helper, if it came before `Serve`.
    acme_helper: Option<OwnedFd>,
}

/// `Start`, then `Routes` chunks, until `Serve` (which says whether we own the routes yet).
async fn receive_start(supervisor: &SupervisorChannel) -> anyhow::Result<Start> {
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
async fn follow_supervisor(
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

/// The cap on client connections: `--max-connections`, or derived from the open-file limit
/// this process started with (the supervisor raises the soft limit to the hard one).
fn connection_limit(settings: &WorkerSettings) -> anyhow::Result<Arc<ConnectionLimit>> {
    use nix::sys::resource::{getrlimit, Resource};
    let (nofile, _) =
        getrlimit(Resource::RLIMIT_NOFILE).context("cannot read the open-file limit")?;
    let max = match settings.max_connections {
        Some(max) => max as usize,
        None => connection_limit::default_max(nofile),
    };
    if max > connection_limit::default_max(nofile) {
        warn!(
            "--max-connections {max} is more than the open-file limit ({nofile}) leaves room \
             for; accepts will fail (and be retried) when descriptors run out"
        );
    }
    info!("at most {max} client connections (open-file limit {nofile})");
    Ok(ConnectionLimit::new(max))
}

fn tcp_listener(fd: OwnedFd) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

fn udp_socket(fd: OwnedFd) -> anyhow::Result<tokio::net::UdpSocket> {
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(socket)?)
}
