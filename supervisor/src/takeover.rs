//! The taking side of a takeover: a rerun `core-server` receives the running instance's
//! sockets and routes over the control socket (it binds nothing itself), starts its own
//! worker on them, says whether that worked, and owns the instance only once the running one
//! has handed it over. The protocol and the giving side are in `handover.rs`.
//!
//! The running instance may be of a previous version. One following protocol 2 hands over no
//! tunnel routes (it has none). One following protocol 1 sends
//! `Sockets` without announcing a `Protocol`, and drains as soon as it reads `TookOver`. With
//! it, our worker serves nothing until `TookOver` is sent; only if that send succeeded does it
//! serve and do we save the routes. That protocol's own window stays (it is the old binary's,
//! gone once it is replaced): an old instance whose 20 s deadline for `TookOver` passes just
//! as we send it, before it closes the connection, serves on beside us.

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use core_server_proto::domain::DomainError;
use core_server_proto::ipc::{ControlReply, ControlRequest, ToWorker, TAKEOVER_PROTOCOL};
use core_server_proto::routes::{keep_routable, Routable, Route, Routes};

use crate::control;
use crate::control_client::running;
use crate::listeners::Listener;
use crate::supervise::{Ending, Supervisor};
use crate::test_hooks::freeze_point;
use crate::worker::Worker;

/// What the running instance handed over.
pub struct Inherited {
    pub listeners: Vec<Listener>,
    pub control: OwnedFd,
    pub routes: Routes,
    /// Routes it holds under names this version refuses, left out (an older version's).
    pub refused: Vec<(String, DomainError)>,
    /// The running instance's state directory and pid.
    pub dir: PathBuf,
    pub pid: u32,
    /// The takeover protocol it follows.
    pub protocol: u32,
}

/// How long the running instance may take to hand over its sockets and routes (it pauses
/// its worker's commands and saves first). Giving up here is safe: it then resumes.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the instance at the other end of `old` for everything it holds.
pub async fn receive(old: &control::ClientEnd) -> anyhow::Result<Inherited> {
    freeze_point("connected");
    tokio::time::timeout(RECEIVE_TIMEOUT, ask_for_everything(old))
        .await
        .unwrap_or_else(|_| {
            bail!("the running core-server did not hand over within {RECEIVE_TIMEOUT:?}; it keeps serving")
        })
}

async fn ask_for_everything(old: &control::ClientEnd) -> anyhow::Result<Inherited> {
    let mut answer = control::ask(old, &ControlRequest::TakeOver)
        .await
        .context("the running core-server did not answer the takeover; it keeps serving")?;
    // The first answer tells the versions apart: protocol 1 sends the sockets at once.
    let mut protocol = 1;
    if let Some((ControlReply::Protocol(theirs), _)) = answer {
        if !(2..=TAKEOVER_PROTOCOL).contains(&theirs) {
            let reason = format!(
                "it follows takeover protocol {theirs}; this core-server knows 1 to {TAKEOVER_PROTOCOL}"
            );
            let _ = old
                .send(
                    &ControlRequest::TakeOverFailed {
                        reason: reason.clone(),
                    },
                    &[],
                )
                .await;
            bail!("cannot take over from the running core-server, which keeps serving: {reason}");
        }
        protocol = theirs;
        answer = old.recv().await?;
    }
    let (kinds, dir, pid, mut fds) = match answer {
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
    let Routable { kept, mut refused } = receive_routes(old).await?;
    let mut routes: Routes = kept.into_iter().collect();
    if protocol >= 3 {
        let tunnels = receive_tunnels(old).await?;
        for (domain, route) in tunnels.kept {
            routes.insert(domain, route);
        }
        refused.extend(tunnels.refused);
    }
    Ok(Inherited {
        listeners,
        control,
        routes,
        refused,
        dir,
        pid,
        protocol,
    })
}

/// Starts our worker on the inherited sockets (serving nothing yet) and completes the
/// handover: returns the worker, serving, once the instance at the other end of `old` (pid
/// `old_pid`, following takeover `protocol`) has handed over; the routes are then saved.
pub async fn complete(
    supervisor: &mut Supervisor,
    old: &control::ClientEnd,
    old_pid: u32,
    protocol: u32,
) -> anyhow::Result<Worker> {
    freeze_point("sockets-received");
    let keeps_serving = || format!("the running core-server (pid {old_pid}) keeps serving");
    let mut worker = match supervisor.start_worker(false).await {
        Ok(worker) => worker,
        Err(e) => {
            let reason = format!("{e:#}");
            let _ = old
                .send(&ControlRequest::TakeOverFailed { reason }, &[])
                .await;
            return Err(e.context(keeps_serving()));
        }
    };
    freeze_point("worker-ready");
    let verdict = match protocol {
        1 => took_over(old, old_pid).await,
        _ => handed_over(old, old_pid).await,
    };
    if let Err(why) = verdict {
        supervisor.stop(worker, Ending::NotOwner).await;
        return Err(anyhow!("{why}").context(keeps_serving()));
    }
    freeze_point("handed-over");
    worker.tell(&ToWorker::Own).await;
    tracing::info!("took over from core-server pid {old_pid}");
    freeze_point("owning");
    // Ours alone from now on: the whole table as a snapshot, with a journal of our own after
    // it. The worker serves meanwhile; no change it reports is acknowledged before this is
    // done (a failure is logged, and the next change's save tries again).
    let _ = supervisor.routes.compact();
    Ok(worker)
}

/// Protocol 2: says our worker is ready and waits for the owner's verdict; `Ok` if we own.
async fn handed_over(old: &control::ClientEnd, old_pid: u32) -> Result<(), String> {
    // A verdict sent before we spoke (the takeover was void already) is still read.
    let _ = old.send(&ControlRequest::TakerReady, &[]).await;
    freeze_point("ready-sent");
    match old.recv().await {
        Ok(Some((ControlReply::HandedOver, _))) => Ok(()),
        Ok(Some((ControlReply::Refused(why), _))) => Err(why),
        Ok(Some((other, _))) => Err(format!("unexpected answer {other:?}")),
        Ok(None) | Err(_) if owner_exited(old_pid) => Ok(()),
        Ok(None) | Err(_) => Err("it closed the connection without handing over".to_owned()),
    }
}

/// Protocol 1: tells the owner we serve, which it takes as its cue to drain; `Ok` if it heard.
async fn took_over(old: &control::ClientEnd, old_pid: u32) -> Result<(), String> {
    tracing::info!("core-server pid {old_pid} is of a previous version (takeover protocol 1)");
    match old.send(&ControlRequest::TookOver, &[]).await {
        Ok(()) => Ok(()),
        Err(_) if owner_exited(old_pid) => Ok(()),
        Err(e) => Err(format!(
            "it closed the connection before we could take over ({e})"
        )),
    }
}

/// Whether the owner's process has exited: with no verdict, only then can nobody else act.
fn owner_exited(old_pid: u32) -> bool {
    if running(old_pid) {
        return false;
    }
    tracing::warn!("core-server pid {old_pid} exited during the takeover; taking its place");
    true
}

/// `Routes` chunks until `RoutesEnd`: the routes, and those left out (see [`Routable`]).
pub async fn receive_routes(old: &control::ClientEnd) -> anyhow::Result<Routable> {
    let mut routes = Routable::default();
    loop {
        match old.recv().await? {
            Some((ControlReply::Routes(chunk), _)) => {
                routes.kept.extend(chunk.kept);
                routes.refused.extend(chunk.refused);
            }
            Some((ControlReply::RoutesEnd, _)) => return Ok(routes),
            other => bail!("expected the routes from the running core-server, got {other:?}"),
        }
    }
}

/// Protocol 3: `Tunnels` chunks until `TunnelsEnd`, read as leniently as the routes.
async fn receive_tunnels(old: &control::ClientEnd) -> anyhow::Result<Routable<Route>> {
    let mut tunnels = Vec::new();
    loop {
        match old.recv().await? {
            Some((ControlReply::Tunnels(chunk), _)) => tunnels.extend(chunk),
            Some((ControlReply::TunnelsEnd, _)) => break,
            other => {
                bail!("expected the tunnel routes from the running core-server, got {other:?}")
            }
        }
    }
    let tunnels = (tunnels.into_iter())
        .map(|tunnel| match Route::tunnel(tunnel.tokens) {
            Ok(route) => Ok((tunnel.name, route)),
            Err(why) => Err(anyhow!(
                "the running core-server's tunnel route for {}: {why}",
                tunnel.name
            )),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(keep_routable(tunnels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::channel::{socketpair_fds, Channel};
    use core_server_proto::domain::Domain;
    use core_server_proto::tunnel::{TokenHash, TunnelRoute};

    #[tokio::test]
    async fn tunnel_routes_are_read_as_leniently_as_routes() {
        let (ours, theirs) = socketpair_fds().unwrap();
        let owner: control::ServerEnd = Channel::new(ours).unwrap();
        let taker: control::ClientEnd = Channel::new(theirs).unwrap();
        let route = |name: &str| TunnelRoute {
            name: name.into(),
            tokens: vec![TokenHash([1; 32])],
        };
        for reply in [
            ControlReply::Tunnels(vec![route("App.Example"), route("127.1")]),
            ControlReply::Tunnels(vec![route("b.example")]),
            ControlReply::TunnelsEnd,
        ] {
            owner.send(&reply, &[]).await.unwrap();
        }
        let Routable { kept, refused } = receive_tunnels(&taker).await.unwrap();
        let tunnel = Route::Tunnel {
            tokens: vec![TokenHash([1; 32])],
        };
        let expected =
            ["app.example", "b.example"].map(|n| (Domain::parse(n).unwrap(), tunnel.clone()));
        assert_eq!(kept, expected);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "127.1");
    }
}
