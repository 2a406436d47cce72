//! `core-server`: the supervisor, the only privileged process.
//!
//! It binds the ports once (or, rerun while an instance runs, takes that instance's sockets
//! over), starts the unprivileged worker and hands it the sockets, restarts it when it dies,
//! persists the routes it reports, and answers its control socket. It parses no network input:
//! HTTP and UDP commands are the worker's job. `add`, `remove`, `status` and `stop` are small
//! local clients.

mod child;
mod cli;
mod control;
mod control_client;
mod listeners;
mod privileges;
mod routes_file;
mod supervise;
mod takeover;
mod udp_client;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use core_server_proto::ipc::{ControlRequest, WorkerSettings};

use crate::cli::{Cli, Command, ServerOptions};
use crate::privileges::Unprivileged;
use crate::routes_file::RoutesFile;
use crate::supervise::Supervisor;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let udp_port = cli.udp_port;
    let result = match &cli.command {
        Some(Command::Add { domain, port }) => udp_client::run(udp_port, &["add", domain, port]),
        Some(Command::Remove { domain }) => udp_client::run(udp_port, &["remove", domain]),
        Some(Command::Status) => block_on(control_client::status(udp_port)),
        Some(Command::Stop) => block_on(control_client::stop(udp_port)),
        None => {
            core_server_proto::logging::init();
            run_server(&cli.server, udp_port).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("core-server: {e:#}");
        ExitCode::FAILURE
    })
}

fn block_on<T>(future: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn run_server(options: &ServerOptions, udp_port: u16) -> anyhow::Result<()> {
    // Everything that can be checked is checked before a port is bound.
    let privileges = Unprivileged::for_user(&options.user)?;
    let worker_binary = child::sibling_binary("core-server-worker")?;
    block_on(async {
        let settings = WorkerSettings {
            header_timeout: options.header_timeout,
            idle_timeout: options.idle_timeout,
            backend_timeout: options.backend_timeout,
        };
        let Some(running) = control::connect_to(udp_port)? else {
            return start_fresh(options, udp_port, settings, privileges, worker_binary).await;
        };

        let inherited = takeover::receive(&running).await?;
        let dir = absolute_dir(options.dir.as_deref().unwrap_or(&inherited.dir))?;
        let routes_file = RoutesFile::in_dir(&dir);
        routes_file
            .save(&inherited.routes)
            .with_context(|| format!("cannot save the routes in {}", dir.display()))?;
        tracing::info!(
            "taking over from core-server pid {}: {} routes, state in {}",
            inherited.pid,
            inherited.routes.len(),
            dir.display()
        );
        let supervisor = Supervisor {
            listeners: inherited.listeners,
            control: control::Listener::new(inherited.control)?,
            settings,
            grace: options.grace,
            routes: inherited.routes,
            routes_file,
            privileges,
            worker_binary,
        };
        let worker = match supervisor.start_worker().await {
            Ok(worker) => worker,
            Err(e) => {
                let reason = format!("{e:#}");
                let _ = running
                    .send(&ControlRequest::TakeOverFailed { reason }, &[])
                    .await;
                return Err(e.context(format!(
                    "the running core-server (pid {}) keeps serving",
                    inherited.pid
                )));
            }
        };
        running.send(&ControlRequest::TookOver, &[]).await?;
        tracing::info!("took over from core-server pid {}", inherited.pid);
        supervisor.run(worker).await
    })
}

/// No instance runs for this UDP port: bind everything and load the routes from disk.
async fn start_fresh(
    options: &ServerOptions,
    udp_port: u16,
    settings: WorkerSettings,
    privileges: Unprivileged,
    worker_binary: PathBuf,
) -> anyhow::Result<()> {
    let dir = absolute_dir(options.dir.as_deref().unwrap_or(Path::new(".")))?;
    let routes_file = RoutesFile::in_dir(&dir);
    let routes = routes_file.load()?;
    let listeners = listeners::bind_all(options.http_port, options.https_port, udp_port)?;
    let control = control::Listener::new(control::bind_for(udp_port)?)?;
    tracing::info!(
        "bound HTTP :{}, HTTPS :{}, UDP :{}; {} routes from {}",
        options.http_port,
        options.https_port,
        udp_port,
        routes.len(),
        routes_file.path().display()
    );
    let supervisor = Supervisor {
        listeners,
        control,
        settings,
        grace: options.grace,
        routes,
        routes_file,
        privileges,
        worker_binary,
    };
    let worker = supervisor.start_worker().await?;
    supervisor.run(worker).await
}

/// Creates `dir` if needed; its absolute path (a rerun from elsewhere must find it).
fn absolute_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --dir {}", dir.display()))?;
    Ok(std::path::absolute(dir)?)
}
