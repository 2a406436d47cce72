//! `core-server tunnel allow|revoke DOMAIN`: ask the running instance, over its control socket,
//! to let a new token's agents serve DOMAIN, or to shut every agent of DOMAIN out.
//!
//! The token is made here, in the CLI process, and printed once: only its SHA-256 goes to the
//! running instance (and from there to the worker and the routes file). Only the token goes to
//! stdout, so `core-server tunnel allow app.example.com > app.token` keeps it; what to do with
//! it goes to stderr.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::{bail, Context};
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{ControlReply, ControlRequest};
use core_server_proto::tunnel::Token;

use crate::control;
use crate::control_client::{connect, printable};

/// The exit status for a name that cannot be a tunnel, as for other usage errors.
const USAGE: u8 = 2;

pub fn allow(udp_port: u16, name: &str) -> anyhow::Result<ExitCode> {
    let Some(domain) = tunnel_domain(name) else {
        return Ok(ExitCode::from(USAGE));
    };
    let token = Token::generate().context("cannot generate a token")?;
    let request = ControlRequest::TunnelAllow {
        name: domain.as_str().to_owned(),
        token: token.hash(),
    };
    let done = crate::block_on(ask(udp_port, &request))?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", token.as_str())
        .and_then(|()| stdout.flush())
        .context("cannot print the token (it is allowed, but lost: allow another)")?;
    let keep = if std::io::stdout().is_terminal() {
        format!("Save the token above (e.g. as {domain}.token on the machine that runs the app)")
    } else {
        "The token went to stdout".to_owned()
    };
    eprintln!(
        "{done}\n\
         {keep}; it is shown this once, and core-server keeps only its SHA-256. Keep it secret:\n\
         whoever has it can serve {domain}. Where the app runs, start its agent with it:\n\
         \n  CORE_AGENT_TOKEN=$(cat {domain}.token) core-agent {domain} --to 127.0.0.1:3000\n\
         \n(--to: the app's address there). `core-server status` lists the connected agents."
    );
    Ok(ExitCode::SUCCESS)
}

pub fn revoke(udp_port: u16, name: &str) -> anyhow::Result<ExitCode> {
    let Some(domain) = tunnel_domain(name) else {
        return Ok(ExitCode::from(USAGE));
    };
    let request = ControlRequest::TunnelRevoke {
        name: domain.as_str().to_owned(),
    };
    println!("{}", crate::block_on(ask(udp_port, &request))?);
    Ok(ExitCode::SUCCESS)
}

/// `name` as a domain, or `None` once the reason it is not one is told.
fn tunnel_domain(name: &str) -> Option<Domain> {
    match Domain::parse(name) {
        Ok(domain) => Some(domain),
        Err(why) => {
            eprintln!("core-server: '{name}' cannot be a tunnel: {why}");
            None
        }
    }
}

/// Sends `request` to the running instance; the text of its `Done`.
async fn ask(udp_port: u16, request: &ControlRequest) -> anyhow::Result<String> {
    let instance = connect(udp_port)?;
    match control::ask(&instance, request).await? {
        Some((ControlReply::Done(text), _)) => Ok(printable(&text)),
        Some((ControlReply::Refused(why), _)) => {
            bail!("the running core-server refused: {}", printable(&why))
        }
        // An instance that cannot decode the request closes the connection unanswered.
        None => {
            bail!("the running core-server predates tunnels; rerun it (core-server) to update it")
        }
        Some((other, _)) => bail!("unexpected answer {other:?}"),
    }
}
