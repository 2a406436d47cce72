//! The control socket: how `core-server status|stop` and a rerun `core-server` reach the
//! running supervisor.
//!
//! An abstract Unix socket, `@core-server.<udp port>`: found from any working directory, and
//! nothing is left on disk. `SOCK_SEQPACKET`, like the children's channels, so it carries the
//! listening sockets on a takeover. Any local user can connect to an abstract socket, so both
//! ends check the other's uid (`SO_PEERCRED`): the same user, or root.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use core_server_proto::channel::Channel;
use core_server_proto::ipc::{ControlReply, ControlRequest};
use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, socket, sockopt, AddressFamily, Backlog, SockFlag,
    SockType, UnixAddr,
};
use nix::unistd::Uid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

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

/// The listening control socket, served by the running supervisor.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
}

impl Listener {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, its only owner from here on, so it
        // is neither closed nor replaced while registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE)? };
        Ok(Listener { fd })
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
