//! Plain-HTTP client connections, accepted outside tokio's reactor and registered with it only
//! once they must wait.
//!
//! tokio registers every socket it accepts with its epoll (`epoll_ctl` ADD) and takes it out
//! again when it is dropped (DEL): two system calls per connection, about 4% of the worker's
//! CPU when every request comes on a connection of its own. Most such connections never wait:
//! the request is there when the connection is accepted, the response fits in the socket's
//! send buffer, and the connection closes. As haproxy does, a [`ClientStream`] reads and
//! writes its socket directly for as long as it can, and joins the reactor the first time a
//! read or a write would block. Waiting for readability ([`WaitReadable`]) does not register
//! it either: it says "readable" at once, and the read that follows finds out.
//!
//! What a connection outside the reactor is not told of: its client closing while its request
//! is with the app. The fast path watches for that after [`WATCH_AFTER`] only (see
//! `http1_fast_path::client_gone`), when the app is slow enough for registering to be cheap
//! beside it.

use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rustix::net::SocketFlags;
use socket2::SockRef;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::http1_fast_path::WaitReadable;

/// How long a request may be with its app before a client connection outside the reactor is
/// registered, to be told if its client goes away meanwhile.
pub const WATCH_AFTER: Duration = Duration::from_millis(20);

/// A listening socket whose connections are accepted as [`ClientStream`]s.
pub struct Listener {
    listener: AsyncFd<std::net::TcpListener>,
}

impl Listener {
    /// `listener`, watched by the current runtime's reactor.
    pub fn new(listener: std::net::TcpListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        // SAFETY: the `AsyncFd` owns the listener, which neither closes nor replaces its
        // descriptor while registered.
        let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE)? };
        Ok(Listener { listener })
    }

    pub fn get_ref(&self) -> &std::net::TcpListener {
        self.listener.get_ref()
    }

    /// The next connection, with its client's address.
    pub async fn accept(&self) -> io::Result<(ClientStream, SocketAddr)> {
        loop {
            let mut ready = self.listener.readable().await?;
            if let Ok(accepted) = ready.try_io(|listener| accept(listener.get_ref())) {
                return accepted;
            }
        }
    }
}

fn accept(listener: &std::net::TcpListener) -> io::Result<(ClientStream, SocketAddr)> {
    let flags = SocketFlags::NONBLOCK | SocketFlags::CLOEXEC;
    let (socket, client) = rustix::net::acceptfrom_with(listener, flags)?;
    let client = client
        .and_then(|address| SocketAddr::try_from(address).ok())
        .ok_or_else(|| io::Error::other("a connection accepted without an IP address"))?;
    Ok((ClientStream::direct(socket.into()), client))
}

/// A client's connection, in tokio's reactor or not yet (see the module's comment).
pub struct ClientStream(State);

enum State {
    /// Not registered: read and written directly; non-blocking.
    Direct(std::net::TcpStream),
    Registered(TcpStream),
    /// Registering failed; the socket is closed.
    Failed,
}

impl ClientStream {
    /// `stream` (non-blocking), outside the reactor.
    pub fn direct(stream: std::net::TcpStream) -> Self {
        ClientStream(State::Direct(stream))
    }

    /// The stream as tokio's, registered (for TLS).
    pub fn into_tokio(mut self) -> io::Result<TcpStream> {
        self.register()?;
        match self.0 {
            State::Registered(stream) => Ok(stream),
            State::Direct(_) | State::Failed => unreachable!("registered above"),
        }
    }

    /// The socket, for its options.
    pub fn socket(&self) -> io::Result<SockRef<'_>> {
        match &self.0 {
            State::Direct(stream) => Ok(SockRef::from(stream)),
            State::Registered(stream) => Ok(SockRef::from(stream)),
            State::Failed => Err(failed()),
        }
    }

    /// The socket, out of the reactor (for parking).
    pub fn into_std(self) -> io::Result<std::net::TcpStream> {
        match self.0 {
            State::Direct(stream) => Ok(stream),
            State::Registered(stream) => stream.into_std(),
            State::Failed => Err(failed()),
        }
    }

    /// The stream registered with the reactor, registering it first if it was not.
    fn register(&mut self) -> io::Result<&mut TcpStream> {
        if let State::Direct(_) = self.0 {
            let State::Direct(direct) = std::mem::replace(&mut self.0, State::Failed) else {
                unreachable!("matched above");
            };
            self.0 = State::Registered(TcpStream::from_std(direct)?);
        }
        match &mut self.0 {
            State::Registered(stream) => Ok(stream),
            State::Direct(_) | State::Failed => Err(failed()),
        }
    }

    /// `io` on the socket if it is outside the reactor and `io` does not block; else `None`,
    /// and the stream is registered for the caller to wait on.
    fn direct_or_register<T>(
        &mut self,
        io: impl FnOnce(&std::net::TcpStream) -> io::Result<T>,
    ) -> Option<io::Result<T>> {
        if let State::Direct(direct) = &self.0 {
            match io(direct) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Some(done),
            }
        }
        self.register().err().map(Err)
    }

    /// The registered stream, after [`Self::direct_or_register`] returned `None`.
    fn registered(&mut self) -> &mut TcpStream {
        match &mut self.0 {
            State::Registered(stream) => stream,
            State::Direct(_) | State::Failed => unreachable!("registered"),
        }
    }
}

fn failed() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the connection could not be registered with the reactor",
    )
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = this.direct_or_register(|mut direct| direct.read(buf.initialize_unfilled()));
        match read {
            Some(Ok(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Some(Err(e)) => Poll::Ready(Err(e)),
            None => Pin::new(this.registered()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.direct_or_register(|mut direct| direct.write(buf)) {
            Some(written) => Poll::Ready(written),
            None => Pin::new(this.registered()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.direct_or_register(|mut direct| direct.write_vectored(bufs)) {
            Some(written) => Poll::Ready(written),
            None => Pin::new(this.registered()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            State::Direct(direct) => Poll::Ready(direct.shutdown(Shutdown::Write)),
            State::Registered(stream) => Pin::new(stream).poll_shutdown(cx),
            State::Failed => Poll::Ready(Err(failed())),
        }
    }
}

impl WaitReadable for ClientStream {
    /// Outside the reactor: at once (the read that follows registers the stream if it finds
    /// nothing).
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let state = &self.0;
        async move {
            match state {
                State::Direct(_) => Ok(()),
                State::Registered(stream) => stream.readable().await,
                State::Failed => Err(failed()),
            }
        }
    }

    fn watched_cheaply(&self) -> bool {
        !matches!(self.0, State::Direct(_))
    }
}
