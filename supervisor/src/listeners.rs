//! Binding the ports, once, for the instance's whole life.
//!
//! Sockets are bound on every address (IPv6 `[::]` accepting IPv4 too, or `0.0.0.0` where the
//! host has no IPv6) without `SO_REUSEPORT`: exactly one socket owns each port, and that same
//! kernel socket is handed to every worker. A socket that is never closed never drops its
//! accept queue, which is how a worker restart loses no connection.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;

use core_server_proto::ipc::ListenerKind;
use socket2::{Domain, Protocol, Socket, Type};

/// Connections the kernel queues while no worker accepts (clamped to `net.core.somaxconn`).
const ACCEPT_BACKLOG: i32 = 4096;
/// Commands the kernel queues while no worker reads (clamped to `net.core.rmem_max`).
const UDP_RECEIVE_BUFFER: usize = 4 << 20;

/// A bound socket, and what it is for.
pub struct Listener {
    pub kind: ListenerKind,
    pub fd: OwnedFd,
}

impl Listener {
    /// The port it is bound to (0 if the kernel cannot say, which it always can).
    pub fn port(&self) -> u16 {
        socket2::SockRef::from(&self.fd)
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .map_or(0, |a| a.port())
    }
}

/// Binds HTTP, HTTPS and UDP, in that order. The error says which port failed and why.
pub fn bind_all(http_port: u16, https_port: u16, udp_port: u16) -> anyhow::Result<Vec<Listener>> {
    if http_port == https_port {
        anyhow::bail!("--http-port and --https-port are both {http_port}: they must differ");
    }
    [
        (ListenerKind::Http, http_port),
        (ListenerKind::Https, https_port),
        (ListenerKind::Udp, udp_port),
    ]
    .into_iter()
    .map(|(kind, port)| {
        let fd = bind(kind, port).map_err(|e| bind_error(kind, port, e))?;
        Ok(Listener { kind, fd })
    })
    .collect()
}

fn bind(kind: ListenerKind, port: u16) -> io::Result<OwnedFd> {
    let socket = match dual_stack_socket(kind) {
        Ok(socket) => {
            socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            socket
        }
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EAFNOSUPPORT as i32) => {
            let socket = Socket::new(Domain::IPV4, socket_type(kind), Some(protocol(kind)))?;
            prepare(&socket, kind)?;
            socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            socket
        }
        Err(e) => return Err(e),
    };
    if kind != ListenerKind::Udp {
        socket.listen(ACCEPT_BACKLOG)?;
    }
    Ok(socket.into())
}

fn dual_stack_socket(kind: ListenerKind) -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, socket_type(kind), Some(protocol(kind)))?;
    socket.set_only_v6(false)?;
    prepare(&socket, kind)?;
    Ok(socket)
}

fn prepare(socket: &Socket, kind: ListenerKind) -> io::Result<()> {
    if kind == ListenerKind::Udp {
        // Best effort: a bigger queue only helps, the default still works.
        let _ = socket.set_recv_buffer_size(UDP_RECEIVE_BUFFER);
    } else {
        // Lets a restarted instance bind while old connections sit in TIME_WAIT. This is not
        // SO_REUSEPORT: a second live listener on the port is still refused.
        socket.set_reuse_address(true)?;
    }
    Ok(())
}

fn socket_type(kind: ListenerKind) -> Type {
    match kind {
        ListenerKind::Udp => Type::DGRAM,
        ListenerKind::Http | ListenerKind::Https => Type::STREAM,
    }
}

fn protocol(kind: ListenerKind) -> Protocol {
    match kind {
        ListenerKind::Udp => Protocol::UDP,
        ListenerKind::Http | ListenerKind::Https => Protocol::TCP,
    }
}

fn bind_error(kind: ListenerKind, port: u16, e: io::Error) -> anyhow::Error {
    let (proto, flag) = match kind {
        ListenerKind::Http => ("TCP", "--http-port"),
        ListenerKind::Https => ("TCP", "--https-port"),
        ListenerKind::Udp => ("UDP", "--udp-port"),
    };
    let hint = match e.kind() {
        io::ErrorKind::PermissionDenied => {
            let exe = std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "core-server".into());
            format!(
                "\nports below 1024 need privilege: start core-server as root, or give this binary \
                 (only this one) the capability once with\n    sudo setcap cap_net_bind_service=+eip {exe}\n\
                 or choose a port of 1024 or more with {flag}"
            )
        }
        io::ErrorKind::AddrInUse => format!(
            "\nanother program holds it, and no core-server answers on the control socket for this \
             --udp-port, so it is not one to take over; stop that program or choose another \
             port with {flag}"
        ),
        _ => String::new(),
    };
    anyhow::anyhow!("cannot bind {proto} port {port} ({flag}): {e}{hint}")
}
