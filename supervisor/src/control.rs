//! The control socket: how `core-server status|stop` and a rerun `core-server` reach the
//! running supervisor.
//!
//! An abstract Unix socket, `@core-server.<udp port>`: found from any working directory, and
//! nothing is left on disk. `SOCK_SEQPACKET`, like the children's channels, so it carries the
//! listening sockets on a takeover. Any local user can connect to an abstract socket, so both
//! ends check the other's uid (`SO_PEERCRED`): the same user, or root.
//!
//! Clients are served off the supervisor's main loop ([`serve`]): each gets a task of its own
//! and a short deadline to send its request, so a client that connects and says nothing holds
//! up no UDP reply, worker restart or signal.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use core_server_proto::channel::Channel;
use core_server_proto::ipc::{ControlReply, ControlRequest};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, UnixAddr,
};
use nix::unistd::Uid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

/// How long a client has, once connected, to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client has to take in an answer (the socket buffer is full only if it reads none).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many clients are read, or wait for the main loop, at once; more wait in the
/// listen backlog.
const MAX_PENDING: usize = 32;
/// A failed accept (out of descriptors) is retried after this, not in a busy loop.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The running supervisor's end of a control connection.
pub type ServerEnd = Channel<ControlReply, ControlRequest>;
/// A client's end.
pub type ClientEnd = Channel<ControlRequest, ControlReply>;

fn address(udp_port: u16) -> io::Result<UnixAddr> {
    Ok(UnixAddr::new_abstract(
        format!("core-server.{udp_port}").as_bytes(),
    )?)
}

fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?)
}

/// Binds the control socket for the instance using `udp_port`.
pub fn bind_for(udp_port: u16) -> anyhow::Result<OwnedFd> {
    let fd = seqpacket_socket()?;
    bind(fd.as_raw_fd(), &address(udp_port)?).map_err(|e| {
        anyhow::anyhow!("cannot bind the control socket @core-server.{udp_port}: {e}")
    })?;
    listen(&fd, Backlog::new(64)?)?;
    Ok(fd)
}

/// Whether the process at the other end of `fd` may control us (or be trusted by us).
fn peer_is_trusted(fd: &impl AsFd) -> io::Result<(bool, u32)> {
    let peer = getsockopt(fd, sockopt::PeerCredentials)?;
    let ours = Uid::effective().as_raw();
    Ok((peer.uid() == ours || peer.uid() == 0, peer.uid()))
}

/// Connects to the running instance for `udp_port`; `None` if there is none.
pub fn connect_to(udp_port: u16) -> anyhow::Result<Option<ClientEnd>> {
    let fd = seqpacket_socket()?;
    match connect(fd.as_raw_fd(), &address(udp_port)?) {
        Ok(()) => {}
        Err(nix::errno::Errno::ECONNREFUSED | nix::errno::Errno::ENOENT) => return Ok(None),
        // A full backlog on a non-blocking connect: the instance is there but busy.
        Err(nix::errno::Errno::EAGAIN) => {
            anyhow::bail!(
                "the core-server for UDP port {udp_port} is not accepting control connections"
            )
        }
        Err(e) => return Err(e.into()),
    }
    let (trusted, uid) = peer_is_trusted(&fd)?;
    if !trusted {
        anyhow::bail!(
            "the core-server for UDP port {udp_port} runs as uid {uid}: run this command as that user or root"
        );
    }
    Ok(Some(Channel::new(fd)?))
}

/// Sends `request` and returns the first answer. A refusal sent before we spoke (the instance
/// does not trust our uid) is still read, even though sending then failed.
pub async fn ask(
    instance: &ClientEnd,
    request: &ControlRequest,
) -> anyhow::Result<Option<(ControlReply, Vec<OwnedFd>)>> {
    let sent = instance.send(request, &[]).await;
    match (sent, instance.recv().await) {
        (_, Ok(Some(answer))) => Ok(Some(answer)),
        (Err(e), _) => Err(e.into()),
        (Ok(()), answer) => Ok(answer?),
    }
}

/// Sends `replies` in a task of its own, so a client that reads slowly holds up nothing.
pub fn send_replies(connection: ServerEnd, replies: Vec<ControlReply>) {
    tokio::spawn(reply(connection, replies));
}

/// Sends `replies`; a client that takes none within [`REPLY_TIMEOUT`] is dropped.
pub async fn reply(connection: ServerEnd, replies: Vec<ControlReply>) {
    let sent = tokio::time::timeout(REPLY_TIMEOUT, async {
        for reply in &replies {
            connection.send(reply, &[]).await?;
        }
        io::Result::Ok(())
    });
    match sent.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("control connection: {e}"),
        Err(_) => {
            tracing::warn!("a control client read no answer within {REPLY_TIMEOUT:?}; closed")
        }
    }
}

/// The listening control socket, served by the running supervisor.
#[derive(Clone)]
pub struct Listener {
    fd: Arc<AsyncFd<OwnedFd>>,
}

impl Listener {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, its only owner from here on, so it
        // is neither closed nor replaced while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Listener { fd: Arc::new(fd) })
    }

    /// The socket itself, to hand to the instance taking over.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// The next connection from a trusted peer (others are logged and closed).
    pub async fn accept(&self) -> io::Result<ServerEnd> {
        loop {
            let fd = self
                .fd
                .async_io(Interest::READABLE, |fd| {
                    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
                    accept4(fd.as_raw_fd(), flags).map_err(io::Error::from)
                })
                .await?;
            // SAFETY: accept4 just returned this new descriptor, owned by nothing else.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let (trusted, uid) = peer_is_trusted(&fd)?;
            let peer: ServerEnd = Channel::new(fd)?;
            if trusted {
                return Ok(peer);
            }
            tracing::warn!("refused a control connection from uid {uid}");
            let why = format!(
                "uid {uid} may not control this core-server (it runs as uid {}): use that user or root",
                Uid::effective()
            );
            let _ = peer.send(&ControlReply::Refused(why), &[]).await;
        }
    }
}

/// A request read from a control client, and the connection to answer it on.
pub struct Incoming {
    pub request: ControlRequest,
    pub connection: ServerEnd,
}

/// Accepts control clients and reads their requests, each in a task of its own with
/// [`REQUEST_TIMEOUT`] to speak; the requests come out of `requests`. Runs until aborted
/// (a takeover stops it while the sockets change hands).
pub fn serve(listener: Listener, requests: mpsc::Sender<Incoming>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let pending = Arc::new(Semaphore::new(MAX_PENDING));
        loop {
            let Ok(permit) = pending.clone().acquire_owned().await else {
                return;
            };
            let connection = match listener.accept().await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!("control socket: {e}");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                let request = tokio::time::timeout(REQUEST_TIMEOUT, connection.recv()).await;
                match request {
                    Ok(Ok(Some((request, _)))) => {
                        let _ = requests
                            .send(Incoming {
                                request,
                                connection,
                            })
                            .await;
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::warn!("control connection: {e}"),
                    Err(_) => tracing::warn!(
                        "a control client sent no request within {REQUEST_TIMEOUT:?}; closed"
                    ),
                }
                drop(permit); // held until the main loop has the request
            });
        }
    })
}
