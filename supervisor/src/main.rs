//! `core-server`: the supervisor, the only privileged process.
//!
//! It binds the ports once, starts the unprivileged worker and hands it the sockets, restarts
//! it when it dies, and persists the routes it reports. It parses no network input: HTTP and
//! UDP commands are the worker's job. `core-server add|remove` are small local clients.

mod child;
mod cli;
mod listeners;
mod privileges;
mod routes_file;
mod supervise;
mod udp_client;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use core_server_proto::ipc::WorkerSettings;

use crate::cli::{Cli, Command, ServerOptions};
use crate::privileges::Unprivileged;
use crate::routes_file::RoutesFile;
use crate::supervise::Supervisor;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Add { domain, port }) => {
            udp_client::run(cli.udp_port, &["add", domain, port])
        }
        Some(Command::Remove { domain }) => udp_client::run(cli.udp_port, &["remove", domain]),
        None => {
            core_server_proto::logging::init();
            run_server(&cli.server, cli.udp_port).map(|()| ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("core-server: {e:#}");
        ExitCode::FAILURE
    })
}

fn run_server(options: &ServerOptions, udp_port: u16) -> anyhow::Result<()> {
    // Everything that can be checked is checked before a port is bound.
    let privileges = Unprivileged::for_user(&options.user)?;
    let worker_binary = child::sibling_binary("core-server-worker")?;
    std::fs::create_dir_all(&options.dir)
        .with_context(|| format!("cannot create --dir {}", options.dir.display()))?;
    let routes_file = RoutesFile::in_dir(&options.dir);
    let routes = routes_file.load()?;

    let listeners = listeners::bind_all(options.http_port, options.https_port, udp_port)?;
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
        settings: WorkerSettings {
            header_timeout: options.header_timeout,
            idle_timeout: options.idle_timeout,
            backend_timeout: options.backend_timeout,
        },
        grace: options.grace,
        routes,
        routes_file,
        privileges,
        worker_binary,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(supervisor.run())
}
