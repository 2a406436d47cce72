//! A tunnel's life once the `101` is sent: the agent's connection reversed (the worker
//! becomes an HTTP/2 client on it), its control stream opened, the connection put in the
//! registry once the agent's hello arrives, and taken out when it closes, when the agent
//! drains, or when the registry asks (see `tunnels`).
//!
//! Liveness: HTTP/2 PINGs every [`KEEP_ALIVE_INTERVAL`], answered within
//! [`KEEP_ALIVE_TIMEOUT`], even while idle, find a silent agent (cable pulled: no FIN) within
//! 8 seconds; `TCP_USER_TIMEOUT` also ends the socket once sent data stays unacknowledged for
//! [`USER_TIMEOUT`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use core_server_proto::app_exchange::{MAX_RESPONSE_HEAD, MAX_RESPONSE_HEADERS};
use core_server_proto::logging::describe;
use core_server_proto::tunnel;
use hyper::rt::{Read, Write};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto::upgrade::downcast;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use crate::client_stream::ClientStream;
use crate::http1_fast_path::HandedOver;
use crate::local_tasks::{self, LocalExecutor};
use crate::send_deadline::WatchedIo;
use crate::tunnel_control::{self, AgentSaid};
use crate::tunnels::{Joining, Reservation, TunnelBody};

pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(3);
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);
pub const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection's receive window: no bound at all (1 GiB, as Go's HTTP/2 client). Every
/// stream's unread bytes count against it too, so a few responses read slowly would fill a
/// smaller one and stall every other stream of the connection (with 8 MiB, four slow clients
/// did). A stream's window is sized for the agent's round trip (`tunnel::stream_window`): it is
/// what a response its client does not read holds in the worker.
const CONNECTION_WINDOW: u32 = 1 << 30;
/// The largest response head the worker takes from an agent: what it takes from an app on a
/// local port, and so what an agent takes from its app (`app_exchange`), in HTTP/2's measure
/// of a header list (RFC 9113 §6.5.2: each field counts 32 bytes more). hyper's default is
/// 16 KiB: an app's larger head (a long `Content-Security-Policy`, many cookies) failed.
const MAX_HEADER_LIST_SIZE: u32 = (MAX_RESPONSE_HEAD + 32 * MAX_RESPONSE_HEADERS) as u32;
/// Large frames: fewer headers and wake-ups per megabyte than the 16 KiB default.
const MAX_FRAME_SIZE: u32 = 256 << 10;
/// What an upload may have queued for a stream beyond its window (for an app that does not
/// read it: the client's reads wait meanwhile).
const MAX_SEND_BUF_SIZE: usize = 512 << 10;

/// Who the agent is, as its handshake told.
pub struct Agent {
    pub label: String,
    pub address: SocketAddr,
    pub nonce: String,
}

/// Runs a tunnel from its upgrade until it has closed, holding `reservation` meanwhile.
pub async fn run(on_upgrade: OnUpgrade, reservation: Reservation, agent: Agent) {
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            debug!("tunnel from {}: the upgrade failed: {e}", agent.address);
            return;
        }
    };
    // The stream itself, as `http_server` gave it to hyper, when it can be had: no dynamic
    // dispatch per read and write, TCP_USER_TIMEOUT can be set on its socket, and its round
    // trip measured.
    match downcast::<TokioIo<WatchedIo<HandedOver<ClientStream>>>>(upgraded) {
        Ok(parts) => {
            let io = parts.io.into_inner().into_inner();
            user_timeout(io.get_ref().socket(), &agent);
            measure_then_serve(io, parts.read_buf, reservation, agent).await
        }
        Err(upgraded) => {
            match downcast::<TokioIo<WatchedIo<HandedOver<TlsStream<TcpStream>>>>>(upgraded) {
                Ok(parts) => {
                    let io = parts.io.into_inner().into_inner();
                    user_timeout(Ok(SockRef::from(io.get_ref().get_ref().0)), &agent);
                    measure_then_serve(io, parts.read_buf, reservation, agent).await
                }
                Err(upgraded) => {
                    debug!(
                        "tunnel from {}: served without TCP_USER_TIMEOUT, with the smallest windows",
                        agent.address
                    );
                    serve::<Upgraded>(upgraded, reservation, agent, None).await
                }
            }
        }
    }
}

/// Serves `io` (of which `read` was read already) once the agent's round trip is known: the
/// time from the `101` to its first bytes, its HTTP/2 SETTINGS, which it sends as soon as it
/// reads the `101`. An agent that sends nothing within the time a silent one is found by PINGs
/// is let go.
async fn measure_then_serve<S>(
    mut io: HandedOver<S>,
    read: Bytes,
    reservation: Reservation,
    agent: Agent,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !read.is_empty() || !io.already_read().is_empty() {
        // Sent with the upgrade request, before the `101`: no round trip to time.
        return serve(
            TokioIo::new(HandedOver::new(io, read)),
            reservation,
            agent,
            None,
        )
        .await;
    }
    let started = Instant::now();
    let mut first = BytesMut::with_capacity(16 << 10);
    let silence = KEEP_ALIVE_INTERVAL + KEEP_ALIVE_TIMEOUT;
    let result = tokio::select! {
        result = tokio::time::timeout(silence, io.read_buf(&mut first)) => result,
        () = reservation.killed() => return,
        () = reservation.leave() => return,
    };
    let (domain, label, address) = (reservation.domain(), &agent.label, agent.address);
    match result {
        Ok(Ok(n)) if n > 0 => {
            let round_trip = started.elapsed();
            let io = HandedOver::new(io, first.freeze());
            serve(TokioIo::new(io), reservation, agent, Some(round_trip)).await
        }
        Ok(Ok(_)) => debug!("tunnel from {address}: closed after its 101"),
        Ok(Err(e)) => debug!("tunnel from {address}: lost after its 101: {e}"),
        Err(_) => info!(
            "{domain}: agent {label:?} at {address}: nothing came within {silence:?} of its 101"
        ),
    }
}

fn user_timeout(socket: std::io::Result<SockRef<'_>>, agent: &Agent) {
    if let Err(e) = socket.and_then(|s| s.set_tcp_user_timeout(Some(USER_TIMEOUT))) {
        debug!(
            "tunnel from {}: cannot set TCP_USER_TIMEOUT: {e}",
            agent.address
        );
    }
}

/// Runs the HTTP/2 client on the reversed connection with the tasks it spawns (see
/// `local_tasks`), until they have all finished or the connection is killed.
async fn serve<T>(io: T, reservation: Reservation, agent: Agent, round_trip: Option<Duration>)
where
    T: Read + Write + Unpin + Send + 'static,
{
    let (executor, tasks) = local_tasks::new();
    tokio::select! {
        () = tasks.run(http2_client(io, &reservation, agent, round_trip, executor)) => {}
        () = reservation.killed() => {}
    }
}

/// The HTTP/2 client on the reversed connection, from its handshake to its end.
async fn http2_client<T>(
    io: T,
    reservation: &Reservation,
    agent: Agent,
    round_trip: Option<Duration>,
    executor: LocalExecutor,
) where
    T: Read + Write + Unpin + Send + 'static,
{
    let domain = reservation.domain().clone();
    let Agent {
        label,
        address,
        nonce,
    } = agent;
    let stream_window = tunnel::stream_window(round_trip.unwrap_or_default());
    let handshake = hyper::client::conn::http2::Builder::new(executor)
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(stream_window)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buf_size(MAX_SEND_BUF_SIZE)
        .adaptive_window(false)
        .handshake::<_, TunnelBody>(io);
    let (mut send, connection) = match handshake.await {
        Ok(handshake) => handshake,
        Err(e) => {
            info!(
                "{domain}: agent {label:?} at {address}: HTTP/2 handshake failed: {}",
                describe(&e)
            );
            return;
        }
    };
    tokio::pin!(connection);

    let opened = tokio::select! {
        opened = tunnel_control::open(&mut send, &domain, &nonce) => opened,
        result = connection.as_mut() => {
            let why = result.err().map_or("it closed".into(), |e| describe(&e));
            info!("{domain}: agent {label:?} at {address} ended before its hello: {why}");
            return;
        }
        () = reservation.killed() => return,
    };
    let (control, replies) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            info!(
                "{domain}: agent {label:?} at {address} refused: {}",
                describe(&e)
            );
            return;
        }
    };
    // The agent's SETTINGS came before its hello.
    let joining = Joining {
        label: label.clone(),
        address,
        send,
        extended_connect: connection.is_extended_connect_protocol_enabled(),
        control,
    };
    if let Err(e) = reservation.join(joining) {
        debug!("{domain}: agent {label:?} at {address} not taken: {e}");
        return;
    }
    let round_trip = round_trip.map_or("unknown".into(), |rtt| format!("{rtt:.1?}"));
    info!(
        "{domain}: agent {label:?} connected from {address} (round trip {round_trip}: a stream's window is {} KiB)",
        stream_window >> 10
    );

    let (why, ended) = tokio::select! {
        result = connection.as_mut() => match result {
            Ok(()) => ("it closed".to_owned(), true),
            Err(e) => (describe(&e), true),
        },
        said = tunnel_control::agent_said(replies) => match said {
            AgentSaid::Draining => ("it is draining".to_owned(), false),
            AgentSaid::Ended => ("it ended its control stream".to_owned(), false),
        },
        () = reservation.leave() => ("it was taken out of the balancer".to_owned(), false),
        () = reservation.killed() => {
            info!("{domain}: agent {label:?} at {address} disconnected: the tunnel was closed");
            return;
        }
    };
    // No new request; those in flight finish, after which hyper closes the connection.
    reservation.remove();
    info!("{domain}: agent {label:?} at {address} left: {why}");
    if !ended {
        tokio::select! {
            _ = connection.as_mut() => {}
            () = reservation.killed() => {}
        }
    }
}
