//! `core-server status` and `core-server stop`: ask the running instance over its control
//! socket, and print what it says.

use std::process::ExitCode;

use anyhow::bail;
use core_server_proto::ipc::{ControlReply, ControlRequest, ListenerKind};

use crate::control;
use crate::takeover::receive_routes;

fn connect(udp_port: u16) -> anyhow::Result<control::ClientEnd> {
    match control::connect_to(udp_port)? {
        Some(instance) => Ok(instance),
        None => bail!("no core-server is running for UDP port {udp_port} (see --udp-port)"),
    }
}

/// Prints the instance's processes, ports, state directory and routes.
pub async fn status(udp_port: u16) -> anyhow::Result<ExitCode> {
    let instance = connect(udp_port)?;
    let status = match control::ask(&instance, &ControlRequest::Status).await? {
        Some((ControlReply::Status(status), _)) => status,
        other => return Err(unexpected(other)),
    };
    let routes = receive_routes(&instance).await?;
    let pid = |pid: Option<u32>| pid.map_or("not running".to_owned(), |p| format!("pid {p}"));
    println!("core-server {}", status.version);
    println!("  supervisor   pid {}", status.supervisor_pid);
    println!("  worker       {}", pid(status.worker_pid));
    println!("  ACME helper  {}", pid(status.acme_pid));
    for (kind, port) in &status.ports {
        let name = match kind {
            ListenerKind::Http => "HTTP",
            ListenerKind::Https => "HTTPS",
            ListenerKind::Udp => "UDP",
        };
        println!("  {name:<12} port {port}");
    }
    println!("  state        {}", status.dir.display());
    println!("routes ({}):", routes.len());
    for (domain, port) in routes.iter() {
        println!("  {domain} -> 127.0.0.1:{port}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks the instance to stop (in-flight requests finish) and waits until it has.
pub async fn stop(udp_port: u16) -> anyhow::Result<ExitCode> {
    let instance = connect(udp_port)?;
    let pid = match control::ask(&instance, &ControlRequest::Stop).await? {
        Some((ControlReply::Stopping { pid }, _)) => pid,
        other => return Err(unexpected(other)),
    };
    println!("stopping core-server (pid {pid})...");
    // The instance keeps the connection open until its worker is gone, then exits.
    while instance.recv().await.is_ok_and(|m| m.is_some()) {}
    while running(pid) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    println!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Whether `pid` is still a live process (a zombie waiting to be reaped is not).
pub(crate) fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

fn unexpected(answer: Option<(ControlReply, Vec<std::os::fd::OwnedFd>)>) -> anyhow::Error {
    match answer {
        Some((ControlReply::Refused(why), _)) => {
            anyhow::anyhow!("the running core-server refused: {why}")
        }
        None => anyhow::anyhow!("the running core-server closed the connection"),
        Some((other, _)) => anyhow::anyhow!("unexpected answer {other:?}"),
    }
}
