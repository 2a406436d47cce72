//! The taking side of a takeover: a rerun `core-server` receives the running instance's
//! sockets and routes over the control socket (it binds nothing itself), starts its own
//! worker on them, and says whether that worked. The giving side is in `supervise.rs`.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use core_server_proto::ipc::{ControlReply, ControlRequest};
use core_server_proto::routes::Routes;

use crate::control;
use crate::listeners::Listener;

/// What the running instance handed over.
pub struct Inherited {
    pub listeners: Vec<Listener>,
    pub control: OwnedFd,
    pub routes: Routes,
    /// The running instance's state directory and pid.
    pub dir: PathBuf,
    pub pid: u32,
}

/// Asks the instance at the other end of `old` for everything it holds.
pub async fn receive(old: &control::ClientEnd) -> anyhow::Result<Inherited> {
    let (kinds, dir, pid, mut fds) = match control::ask(old, &ControlRequest::TakeOver).await? {
        Some((
            ControlReply::Sockets {
                listeners,
                dir,
                pid,
            },
            fds,
        )) if fds.len() == listeners.len() + 1 => (listeners, dir, pid, fds),
        Some((ControlReply::Refused(why), _)) => bail!("the running core-server refused: {why}"),
        other => bail!("the running core-server did not hand over its sockets (got {other:?})"),
    };
    let control = fds.pop().context("no control socket")?;
    let listeners = kinds
        .into_iter()
        .zip(fds)
        .map(|(kind, fd)| Listener { kind, fd })
        .collect();
    let routes = receive_routes(old).await?;
    Ok(Inherited {
        listeners,
        control,
        routes,
        dir,
        pid,
    })
}

/// `Routes` chunks until `RoutesEnd`.
pub async fn receive_routes(old: &control::ClientEnd) -> anyhow::Result<Routes> {
    let mut routes = Vec::new();
    loop {
        match old.recv().await? {
            Some((ControlReply::Routes(chunk), _)) => routes.extend(chunk),
            Some((ControlReply::RoutesEnd, _)) => return Ok(routes.into_iter().collect()),
            other => bail!("expected the routes from the running core-server, got {other:?}"),
        }
    }
}
