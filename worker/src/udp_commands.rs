//! The UDP command port: `add <domain> <port>` / `remove <domain>` from this machine only.
//!
//! Each datagram is read whole (up to 64 KiB, so nothing is ever truncated into a different
//! command), parsed by the shared grammar, applied, and answered with one line. Datagrams from
//! other machines are dropped unread and unanswered. When the worker stops, or pauses while a
//! new instance takes over, it stops reading: unread datagrams stay queued in the kernel
//! socket, which the next worker reads.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use core_server_proto::command::{Command, Reply};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::route_table::RouteTable;

/// Whether `addr` is this machine's loopback (IPv4-mapped IPv6 included: the socket is dual-stack).
pub fn is_loopback(addr: IpAddr) -> bool {
    addr.to_canonical().is_loopback()
}

/// Pausing the reader while another instance takes over, and resuming it if that fails.
pub enum Control {
    /// Stop reading; answer once every change made so far is reported to the supervisor.
    Pause(oneshot::Sender<()>),
    Resume,
}

/// Reads and answers commands until `stop`; starts `paused` (a taker's worker) or reading.
pub async fn serve(
    socket: UdpSocket,
    routes: Arc<RouteTable>,
    stop: CancellationToken,
    tasks: TaskTracker,
    mut control: mpsc::Receiver<Control>,
    mut paused: bool,
) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (len, from) = tokio::select! {
            Some(request) = control.recv() => {
                // Changes are reported before the next datagram is read, so at this point
                // every change made is already on its way to the supervisor.
                match request {
                    Control::Pause(done) => {
                        paused = true;
                        let _ = done.send(());
                    }
                    Control::Resume => paused = false,
                }
                continue;
            }
            received = socket.recv_from(&mut buf), if !paused => match received {
                Ok(received) => received,
                Err(e) => {
                    // Errors here are per-datagram (e.g. an ICMP error for an earlier reply).
                    debug!("UDP receive: {e}");
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        if !is_loopback(from.ip()) {
            let from = from.ip().to_canonical();
            debug!("dropped a datagram from {from}: commands are accepted from this machine only");
            continue;
        }
        let command = match Command::parse(&buf[..len]) {
            Ok(command) => command,
            Err(e) => {
                reply(&socket, from, Reply::Error(e.to_string())).await;
                continue;
            }
        };
        let text = command.to_string();
        match routes.change(command.into()).await {
            Ok(saved) => {
                let socket = socket.clone();
                tasks.spawn(async move {
                    let answer = saved.await;
                    info!("{text} (from {}): {answer}", from.ip().to_canonical());
                    reply(&socket, from, answer).await;
                });
            }
            Err(e) => reply(&socket, from, Reply::Error(e.to_string())).await,
        }
    }
}

async fn reply(socket: &UdpSocket, to: SocketAddr, reply: Reply) {
    if let Err(e) = socket.send_to(reply.to_string().as_bytes(), to).await {
        warn!("cannot reply to {to}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_senders_count_as_local() {
        for local in ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"] {
            assert!(is_loopback(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
            "fe80::1",
            "2001:db8::1",
            "0.0.0.0",
            "::",
        ] {
            assert!(!is_loopback(remote.parse().unwrap()), "{remote}");
        }
    }
}
