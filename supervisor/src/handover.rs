//! The giving side of a takeover, and the protocol both sides follow (the taking side, a
//! rerun `core-server`, is in `takeover.rs`).
//!
//! One instance owns the routes at every instant: the owner's worker is the only one reading
//! UDP commands and accepting clients, and the owner alone writes the routes file and serves
//! the control socket. The taker's worker accepts no client until its instance owns: the
//! listening sockets are shared, so connections arriving while ownership moves wait in the
//! kernel's queue for it (none is refused), and after a void takeover a taker, even one frozen
//! before it could drain, serves no stale routes. Ownership moves by one explicit message, and
//! only the owner decides whether it moves (protocol 2, and 3, which is 2 with the tunnel
//! routes: [`TAKEOVER_PROTOCOL`]):
//!
//! 1. The taker asks `TakeOver`. The owner stops serving control clients, pauses its worker's
//!    commands (confirmed within `WORKER_TIMEOUT`, or the worker is killed, to be replaced,
//!    and the takeover is void), saves every change reported, and sends `Protocol(3)`, then
//!    `Sockets` (the listeners and the control socket), the port routes (`Routes`...
//!    `RoutesEnd`) and the tunnel routes (`Tunnels`... `TunnelsEnd`, even if there are none).
//!    Unread commands wait in the kernel.
//! 2. The taker starts its worker on them serving nothing, writes nothing, serves no control
//!    client, and says `TakerReady` (or `TakeOverFailed`).
//! 3. The owner decides, once. `TakerReady` within [`TAKER_TIMEOUT`] of step 1: it answers
//!    `HandedOver`, and from then on only drains (its worker stops accepting and never reads a
//!    command again, it saves nothing). Anything else (a failure, silence past the deadline,
//!    the taker gone): it answers `Refused`, and only then reads commands again; the takeover
//!    is void.
//! 4. The taker waits for that verdict with no deadline of its own: a frozen owner still owns,
//!    and a taker frozen past the deadline finds `Refused` when it wakes. On `HandedOver` it
//!    saves the routes and tells its worker to serve (accept clients, read commands), and
//!    serves the control socket. On `Refused` it stops its worker, saving nothing, and exits.
//!    If the connection closes with no verdict and the owner's process is gone (it died
//!    mid-way), nobody else can act: the taker owns.
//!
//! Versions mix on an upgrade. An owner of a previous version follows protocol 2 (no tunnel
//! routes) or 1 (it sends `Sockets` with no `Protocol` first, and drains when told
//! `TookOver`); `takeover.rs` follows either. A taker of a previous version cannot read
//! `Protocol(3)`: it gives up, and the owner, hearing nothing more, keeps serving (step 3).

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use core_server_proto::ipc::{
    ControlReply, ControlRequest, FromWorker, ToWorker, TAKEOVER_PROTOCOL,
};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{info, warn};

use crate::control::{ServerEnd, REPLY_TIMEOUT};
use crate::supervise::{routes_replies, tunnel_replies, Supervisor};
use crate::test_hooks;
use crate::worker::{Worker, WORKER_TIMEOUT};

/// How long a taker may take, from our sending the sockets, to start its worker and say so.
const TAKER_TIMEOUT: Duration = Duration::from_secs(20);

impl Supervisor {
    /// Our side of a takeover; `true` once the taker owns the instance (we then only drain).
    pub async fn give_over(&mut self, taker: &ServerEnd, worker: &mut Worker) -> bool {
        info!("a new core-server is taking over; pausing UDP commands");
        let verdict = match self.pause(worker).await {
            Ok(()) => self.hand_sockets(taker).await,
            Err(reason) => Err(reason),
        };
        let reason = match verdict {
            Ok(()) => {
                match timeout(REPLY_TIMEOUT, taker.send(&ControlReply::HandedOver, &[])).await {
                    Ok(Ok(())) => return true,
                    _ => "the new core-server went away before it was handed over".to_owned(),
                }
            }
            Err(reason) => reason,
        };
        warn!("takeover void: {reason}; serving on");
        let refusal = ControlReply::Refused(format!("takeover void: {reason}"));
        let _ = timeout(REPLY_TIMEOUT, taker.send(&refusal, &[])).await;
        // Only now: the taker, if it still runs, has been told it owns nothing.
        worker.tell(&ToWorker::Own).await;
        false
    }

    /// Stops the worker reading commands and saves every change it made before.
    async fn pause(&mut self, worker: &mut Worker) -> Result<(), String> {
        if !worker.tell(&ToWorker::PauseCommands).await {
            return Err("the worker is gone".to_owned());
        }
        let paused = timeout(WORKER_TIMEOUT, async {
            loop {
                match worker.channel.recv().await {
                    Ok(Some((FromWorker::CommandsPaused, _))) => return true,
                    Ok(Some((message, _))) => self.on_message(worker, message),
                    Ok(None) | Err(_) => return false,
                }
            }
        })
        .await;
        match paused {
            Ok(true) => {
                self.save(worker).await;
                Ok(())
            }
            Ok(false) => Err("the worker exited".to_owned()),
            Err(_) => {
                worker.kill();
                Err(format!(
                    "the worker did not pause within {WORKER_TIMEOUT:?}; it is replaced"
                ))
            }
        }
    }

    /// Announces our protocol, sends the sockets and routes; `Ok` when the taker says its worker is ready in time.
    async fn hand_sockets(&self, taker: &ServerEnd) -> Result<(), String> {
        let limit = test_hooks::taker_timeout(TAKER_TIMEOUT);
        let deadline = Instant::now() + limit;
        match timeout_at(deadline, self.send_sockets(taker)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("cannot send the sockets: {e}")),
            Err(_) => return Err(format!("the new core-server took no sockets for {limit:?}")),
        }
        match timeout_at(deadline, taker.recv()).await {
            Ok(Ok(Some((ControlRequest::TakerReady, _)))) => Ok(()),
            Ok(Ok(Some((ControlRequest::TakeOverFailed { reason }, _)))) => {
                Err(format!("the new core-server failed ({reason})"))
            }
            Ok(Ok(Some((other, _)))) => Err(format!(
                "the new core-server answered {other:?}, not TakerReady"
            )),
            // What a version before protocol 2 does: it cannot read `Protocol`.
            Ok(Ok(None)) => Err(
                "the new core-server went away (it may be a version that cannot take over from \
                 this one; its output says why)"
                    .to_owned(),
            ),
            Ok(Err(e)) => Err(format!("the new core-server's connection failed: {e}")),
            Err(_) => Err(format!(
                "the new core-server was not ready within {limit:?}"
            )),
        }
    }

    async fn send_sockets(&self, taker: &ServerEnd) -> std::io::Result<()> {
        let mut fds: Vec<BorrowedFd> = self.listeners.iter().map(|l| l.fd.as_fd()).collect();
        fds.push(self.control.as_fd());
        taker
            .send(&ControlReply::Protocol(TAKEOVER_PROTOCOL), &[])
            .await?;
        let sockets = ControlReply::Sockets {
            listeners: self.listeners.iter().map(|l| l.kind).collect(),
            dir: self.routes.dir().to_path_buf(),
            pid: std::process::id(),
        };
        taker.send(&sockets, &fds).await?;
        let routes = self.routes.routes();
        for reply in routes_replies(routes)
            .into_iter()
            .chain(tunnel_replies(routes))
        {
            taker.send(&reply, &[]).await?;
        }
        Ok(())
    }
}
