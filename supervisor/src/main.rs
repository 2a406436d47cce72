//! `core-server`: the supervisor, the only privileged process.
//!
//! It binds the ports once (or, rerun while an instance runs, takes that instance's sockets
//! over), starts the unprivileged worker and hands it the sockets, restarts it when it dies,
//! persists the routes it reports, and answers its control socket. It parses no network input:
//! HTTP and UDP commands are the worker's job. `add`, `remove`, `status`, `stop` and `tunnel`
//! are small local clients.

mod acme_helper;
mod backoff;
mod child;
mod child_logs;
mod cli;
mod control;
mod control_client;
mod detach;
mod fd_limit;
mod handover;
mod listeners;
mod log_file;
mod privileges;
mod routes_file;
mod routes_journal;
mod state_dir;
mod stop_signals;
mod supervise;
mod systemd;
mod takeover;
mod test_hooks;
mod ticket_key;
mod tunnel_client;
mod tunnel_requests;
mod udp_client;
mod worker;

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use core_server_proto::acme_ipc::{CertificateSource, HttpsSettings, ACME_DIR};
use core_server_proto::ipc::WorkerSettings;

use crate::acme_helper::HelperSetup;
use crate::child_logs::ChildLogs;
use crate::cli::{Cli, Command, Mode, ServerOptions, TunnelCommand};
use crate::detach::ReadyReport;
use crate::log_file::LogFile;
use crate::privileges::Unprivileged;
use crate::routes_file::{RoutesFile, SavedRoutes};
use crate::state_dir::StateDir;
use crate::stop_signals::StopSignals;
use crate::supervise::Supervisor;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let udp_port = cli.udp_port;
    let result = match &cli.command {
        Some(Command::Add { domain, port }) => udp_client::run(udp_port, &["add", domain, port]),
        Some(Command::Remove { domain }) => udp_client::run(udp_port, &["remove", domain]),
        Some(Command::Status) => block_on(control_client::status(udp_port)),
        Some(Command::Stop) => block_on(control_client::stop(udp_port)),
        Some(Command::Tunnel { command }) => match command {
            TunnelCommand::Allow { domain } => tunnel_client::allow(udp_port, domain),
            TunnelCommand::Revoke { domain } => tunnel_client::revoke(udp_port, domain),
        },
        None => serve(&cli.server, udp_port),
    };
    result.unwrap_or_else(|e| {
        eprintln!("core-server: {e:#}");
        ExitCode::FAILURE
    })
}

pub(crate) fn block_on<T>(
    future: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

/// Runs the server: detached in release mode (unless `--foreground`), attached otherwise.
fn serve(options: &ServerOptions, udp_port: u16) -> anyhow::Result<ExitCode> {
    let mode = options.mode.unwrap_or_else(Mode::of_this_build);
    if mode == Mode::Release && !options.foreground {
        return detach::launch();
    }
    let mut ready = options.ready_fd.map(ReadyReport::from_fd).transpose()?;
    // Lives here, so the error below still reaches the file (dropping it flushes it).
    let mut log_file = None;
    match run_server(options, udp_port, mode, &mut ready, &mut log_file) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            if mode == Mode::Release {
                tracing::error!("{e:#}"); // the log file is where a detached instance speaks
            }
            drop(log_file.take()); // flushed before the launcher (and whoever reads on) hears
            match ready {
                Some(ready) => {
                    ready.failed(&format!("{e:#}"));
                    Ok(ExitCode::FAILURE)
                }
                None => Err(e),
            }
        }
    }
}

fn run_server(
    options: &ServerOptions,
    udp_port: u16,
    mode: Mode,
    ready: &mut Option<ReadyReport>,
    log_file: &mut Option<LogFile>,
) -> anyhow::Result<()> {
    privileges::protect_supervisor()?;
    // Everything that can be checked is checked before a port is bound.
    let privileges = Unprivileged::for_user(&options.user)?;
    let worker_binary = child::sibling_binary("core-server-worker")?;
    let source = match mode {
        Mode::Release => CertificateSource::Acme,
        Mode::Local => CertificateSource::Mkcert,
    };
    let acme = HelperSetup::new(options, source)?;
    let settings = WorkerSettings {
        header_timeout: options.header_timeout,
        idle_timeout: options.idle_timeout,
        backend_timeout: options.backend_timeout,
        max_connections: options.max_connections,
        https: HttpsSettings {
            source,
            certificate_wait: options.acme_wait,
        },
        tunnel_wait: options.tunnel_wait,
    };
    block_on(async {
        let signals = StopSignals::new()?;
        let takeover = match control::connect_to(udp_port)? {
            Some(running) => {
                let inherited = takeover::receive(&running).await?;
                Some((running, inherited))
            }
            None => None,
        };
        // Rerun without --dir: keep the running instance's directory.
        let dir = match (&options.dir, &takeover) {
            (Some(dir), _) => dir.as_path(),
            (None, Some((_, inherited))) => inherited.dir.as_path(),
            (None, None) if nix::unistd::geteuid().is_root() => Path::new(state_dir::ROOT_DEFAULT),
            (None, None) => Path::new("."),
        };
        let dir = StateDir::open(dir)?;
        let child_logs = start_logging(mode, &dir, options.log_cap, log_file)?;
        fd_limit::raise();
        if takeover.is_none() {
            dir.claim()?;
        }
        let ticket_key = ticket_key::load_or_create(&dir)?;
        let acme_store = dir.child_dir(ACME_DIR, privileges.ids())?;
        let supervisor = |listeners, control, routes| Supervisor {
            listeners,
            control,
            settings,
            ticket_key,
            acme,
            acme_store,
            grace: options.grace,
            routes,
            privileges,
            worker_binary,
            child_logs,
            tunnel_requests: Default::default(),
        };

        let (supervisor, worker) = match takeover {
            Some((running, inherited)) => {
                tracing::info!(
                    "taking over from core-server pid {}: {} routes, state in {}",
                    inherited.pid,
                    inherited.routes.len(),
                    dir.display()
                );
                for (name, why) in &inherited.refused {
                    tracing::error!(
                        "left out the route for '{name}' from the running core-server: {why}"
                    );
                }
                dir.claim_when_free();
                let control = control::Listener::new(inherited.control)?;
                let routes = SavedRoutes::new(inherited.routes, RoutesFile::in_dir(&dir));
                let mut supervisor = supervisor(inherited.listeners, control, routes);
                let worker = takeover::complete(
                    &mut supervisor,
                    &running,
                    inherited.pid,
                    inherited.protocol,
                )
                .await?;
                (supervisor, worker)
            }
            None => {
                let routes_file = RoutesFile::in_dir(&dir);
                let path = routes_file.path();
                let routes = SavedRoutes::load(routes_file)?;
                let listeners =
                    listeners::bind_all(options.http_port, options.https_port, udp_port)?;
                let control = control::Listener::new(control::bind_for(udp_port)?)?;
                tracing::info!(
                    "bound HTTP :{}, HTTPS :{}, UDP :{}; {} routes from {}",
                    options.http_port,
                    options.https_port,
                    udp_port,
                    routes.routes().len(),
                    path.display()
                );
                let supervisor = supervisor(listeners, control, routes);
                let worker = supervisor.start_worker(true).await?;
                (supervisor, worker)
            }
        };
        systemd::serving();
        if let Some(ready) = ready.take() {
            let log = log_file
                .as_ref()
                .and_then(|log| log.path.as_deref())
                .unwrap_or(Path::new("stderr"));
            ready.serving(log);
        }
        supervisor.run(worker, signals).await
    })
}

/// Stderr in local mode; in release mode the rotated log file under `dir`; kept in `file`.
fn start_logging(
    mode: Mode,
    dir: &StateDir,
    cap: u64,
    file: &mut Option<LogFile>,
) -> anyhow::Result<ChildLogs> {
    let log = file.insert(match mode {
        Mode::Local => LogFile::stderr(),
        Mode::Release => LogFile::open(dir, cap)?,
    });
    let ansi = log.path.is_none() && std::io::stderr().is_terminal();
    core_server_proto::logging::init_with(log.writer.clone(), ansi);
    Ok(ChildLogs(log.writer.clone()))
}
