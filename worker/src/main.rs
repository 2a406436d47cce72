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

// Freed memory goes back to the system: see `core_server_proto::allocator`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod accept_errors;
mod acme_challenges;
mod acme_link;
mod activity;
mod backend_pool;
mod certificates;
mod client_stream;
mod connection_limit;
mod failed_attempts;
mod forwarding;
mod http1_fast_path;
mod http1_relay;
mod http1_response;
mod http_server;
mod https;
mod last_moment;
mod local_tasks;
mod parked_connections;
mod proxy;
mod quiet_splice;
mod read_deadline;
mod request_body;
mod request_head;
mod response_body;
mod route_table;
mod send_deadline;
mod session_tickets;
mod supervisor_link;
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

use anyhow::Context;
use core_server_proto::allocator;
use core_server_proto::channel::{inherited_fd, Channel};
use core_server_proto::ipc::{FromWorker, ListenerKind, WorkerSettings};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::client_stream::Listener;
use crate::connection_limit::ConnectionLimit;
use crate::http_server::HttpServer;
use crate::https::Https;
use crate::proxy::Proxy;
use crate::route_table::{RouteTable, SupervisorChannel};
use crate::supervisor_link::{follow_supervisor, receive_start, Start};
use crate::tunnel_endpoint::TunnelEndpoint;
use crate::tunnels::Tunnels;

fn main() -> ExitCode {
    core_server_proto::logging::init();
    // As many as `TOKIO_WORKER_THREADS` says (passed through by the supervisor: the benches
    // compare one thread with one nginx worker), else one per CPU the worker may use, read
    // before the sandbox hides the cgroup's CPU quota from it. An explicit count overrides
    // tokio's own reading of the variable, hence read here.
    let threads = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n: &usize| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    // Before the runtime starts its threads: Landlock confines only the calling thread and
    // those it starts afterwards. Nothing until then has read network input.
    let result = core_server_proto::dumpable::forbid()
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            // Memory per connection, not correctness: a kernel without it is served all the same.
            if let Err(e) = allocator::no_huge_pages() {
                tracing::warn!("cannot turn transparent huge pages off: {e}");
            }
            core_server_worker::sandbox::apply().context("cannot sandbox the worker")
        })
        .and_then(|()| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .on_thread_park(allocator::give_back_when_idle)
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
    // Not tracked: it never ends, and holds nothing a stopping worker waits for.
    tokio::spawn(allocator::give_back_freed_memory());
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
    listener: Listener,
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

/// The cap on client connections: `--max-connections`, or derived from the open-file limit
/// this process started with (the supervisor raises the soft limit to the hard one).
fn connection_limit(settings: &WorkerSettings) -> anyhow::Result<Arc<ConnectionLimit>> {
    use nix::sys::resource::{getrlimit, Resource};
    let (nofile, _) =
        getrlimit(Resource::RLIMIT_NOFILE).context("cannot read the open-file limit")?;
    let floor = connection_limit::default_max(nofile);
    let max = settings.max_connections.map_or(floor, |max| max as usize);
    if max > floor {
        warn!(
            "--max-connections {max} is more than the open-file limit ({nofile}) leaves room \
             for; when descriptors run out, accepts fail (and are retried) and the cap comes \
             down to what fits, not below {floor}"
        );
    }
    info!("at most {max} client connections (open-file limit {nofile})");
    Ok(ConnectionLimit::with_floor(max, floor))
}

fn tcp_listener(fd: OwnedFd) -> anyhow::Result<Listener> {
    Ok(Listener::new(std::net::TcpListener::from(fd))?)
}

fn udp_socket(fd: OwnedFd) -> anyhow::Result<tokio::net::UdpSocket> {
    let socket = std::net::UdpSocket::from(fd);
    socket.set_nonblocking(true)?;
    Ok(tokio::net::UdpSocket::from_std(socket)?)
}
