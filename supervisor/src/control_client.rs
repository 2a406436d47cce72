//! `core-server status` and `core-server stop`: ask the running instance over its control
//! socket, and print what it says.

use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use core_server_proto::acme_ipc::CertificateStatus;
use core_server_proto::ipc::{ControlReply, ControlRequest, ListenerKind};
use core_server_proto::tunnel::{AgentConnection, TunnelRoute, TunnelStatus};

use crate::control;
use crate::takeover::receive_routes;

/// The running instance's control socket; an error saying so if none runs.
pub(crate) fn connect(udp_port: u16) -> anyhow::Result<control::ClientEnd> {
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
    let routes = receive_routes(&instance).await?.kept;
    let Rest {
        certificates,
        tunnel_routes,
        tunnels,
    } = receive_rest(&instance).await?;
    let pid = |pid: Option<u32>| pid.map_or("not running".to_owned(), |p| format!("pid {p}"));
    let mut text = format!("core-server {}\n", status.version);
    let mut line = |l: String| {
        text.push_str(&l);
        text.push('\n');
    };
    line(format!("  supervisor   pid {}", status.supervisor_pid));
    line(format!("  worker       {}", pid(status.worker_pid)));
    line(format!("  ACME helper  {}", pid(status.acme_pid)));
    for (kind, port) in &status.ports {
        let name = match kind {
            ListenerKind::Http => "HTTP",
            ListenerKind::Https => "HTTPS",
            ListenerKind::Udp => "UDP",
        };
        line(format!("  {name:<12} port {port}"));
    }
    line(format!("  state        {}", status.dir.display()));
    // Port and tunnel routes come apart; shown together, by name.
    let mut all: Vec<(String, String)> = (routes.iter())
        .map(|(domain, port)| (domain.to_string(), format!("127.0.0.1:{port}")))
        .chain(tunnel_routes.iter().map(|route| {
            let tokens = count(route.tokens.len(), "token");
            (printable(&route.name), format!("tunnel ({tokens})"))
        }))
        .collect();
    all.sort();
    line(format!("routes ({}):", all.len()));
    for (name, target) in &all {
        line(format!("  {name} -> {target}"));
    }
    line(format!("certificates ({}):", certificates.len()));
    for certificate in &certificates {
        line(format!("  {}", describe(certificate)));
    }
    if !tunnel_routes.is_empty() {
        line(format!("tunnels ({}):", tunnels.len()));
        for tunnel in &tunnels {
            line(describe_tunnel(tunnel));
        }
    }
    print_to_closed_pipe_too(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// What follows the routes in answer to `status`.
#[derive(Default)]
struct Rest {
    certificates: Vec<CertificateStatus>,
    tunnel_routes: Vec<TunnelRoute>,
    tunnels: Vec<TunnelStatus>,
}

/// What follows the routes: the certificates, then, if there are tunnel routes, those routes
/// and their agents, until the instance closes the connection (one of an earlier version sends
/// fewer sections).
async fn receive_rest(instance: &control::ClientEnd) -> anyhow::Result<Rest> {
    let mut rest = Rest::default();
    loop {
        match instance.recv().await? {
            Some((ControlReply::Certificates(chunk), _)) => rest.certificates.extend(chunk),
            Some((ControlReply::Tunnels(chunk), _)) => rest.tunnel_routes.extend(chunk),
            Some((ControlReply::TunnelsEnd, _)) => {}
            Some((ControlReply::TunnelStatus(chunk), _)) => rest.tunnels.extend(chunk),
            None => return Ok(rest),
            other => return Err(unexpected(other)),
        }
    }
}

/// A tunnel domain's lines: `  name  2 tokens  1 agent connection`, then one per connection.
/// Labels and addresses come from the agents: shown through [`printable`].
fn describe_tunnel(tunnel: &TunnelStatus) -> String {
    let mut text = format!(
        "  {}  {}  {}",
        printable(&tunnel.name),
        count(tunnel.tokens as usize, "token"),
        count(tunnel.connections.len(), "agent connection")
    );
    for AgentConnection {
        label,
        address,
        since,
        in_flight,
        served,
    } in &tunnel.connections
    {
        text += &format!(
            "\n    {}  from {}  since {}  in flight {in_flight}  served {served}",
            printable(label),
            printable(address),
            time(*since)
        );
    }
    text
}

/// `1 token`, `2 tokens`.
fn count(n: usize, what: &str) -> String {
    let s = if n == 1 { "" } else { "s" };
    format!("{n} {what}{s}")
}

/// One line: `name  issuer ...  expires ...`, and why the last try failed, if it did. The
/// texts come from a CA and certificates: shown through [`printable`].
fn describe(certificate: &CertificateStatus) -> String {
    let mut line = certificate.name.clone();
    match (&certificate.issuer, certificate.not_after) {
        (Some(issuer), Some(not_after)) => {
            line += &format!("  issuer {issuer}  expires {}", time(not_after))
        }
        _ => line += "  no certificate",
    }
    if let Some(error) = &certificate.last_error {
        line += &format!("  last error: {error}");
    }
    if let Some(next) = certificate.next_try {
        line += &format!("  next try {}", time(next));
    }
    printable(&line)
}

/// `text` with each control character, and each invisible one that reorders or hides text
/// (bidirectional overrides, zero-width characters), shown as `?`, so that none from a peer
/// (a CA, an agent, the worker) reaches the operator's terminal.
pub(crate) fn printable(text: &str) -> String {
    let hidden = |c: char| matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{061c}' | '\u{feff}');
    text.chars()
        .map(|c| if c.is_control() || hidden(c) { '?' } else { c })
        .collect()
}

/// Seconds since the Unix epoch as an RFC 3339 time (UTC), or as the number if out of range.
fn time(secs: u64) -> String {
    const YEAR_10000: u64 = 253_402_300_800;
    if secs >= YEAR_10000 {
        return format!("{secs} s after 1970");
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string()
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

/// Writes `text` to stdout. A reader that stops early (`core-server status | head -1`) is not
/// an error: the rest is simply not wanted.
fn print_to_closed_pipe_too(text: &str) -> std::io::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tunnel_shows_its_agents_with_their_texts_made_printable() {
        let connection = AgentConnection {
            label: "laptop/42\u{1b}[2J".into(),
            address: "203.0.113.7:50112".into(),
            since: 1_795_640_400,
            in_flight: 3,
            served: 1204,
        };
        let tunnel = TunnelStatus {
            name: "app.example.com".into(),
            tokens: 2,
            connections: vec![connection],
        };
        assert_eq!(
            describe_tunnel(&tunnel),
            "  app.example.com  2 tokens  1 agent connection\n    laptop/42?[2J  from \
             203.0.113.7:50112  since 2026-11-25T21:00:00Z  in flight 3  served 1204"
        );
        let revoked = TunnelStatus {
            tokens: 1,
            connections: Vec::new(),
            ..tunnel
        };
        assert_eq!(
            describe_tunnel(&revoked),
            "  app.example.com  1 token  0 agent connections"
        );
    }
}
