//! Plain-HTTP client connections, accepted outside tokio's reactor and registered with it only
//! once they must wait.
//!
//! tokio registers every socket it accepts with its epoll (`epoll_ctl` ADD) and takes it out
//! again when it is dropped (DEL): two system calls per connection, about 4% of the worker's
//! CPU when every request comes on a connection of its own. Some such connections never wait:
//! the request is there when the connection is accepted, the response fits in the socket's
//! send buffer, and the connection closes. As haproxy does, a [`ClientStream`] reads and
//! writes its socket directly for as long as it can, and joins the reactor the first time a
//! read or a write would block (the fast path reads such a stream before it waits for it:
//! `http1_fast_path::read_more`). Measured with wrk and `Connection: close`: 1.43 `epoll_ctl`
//! per connection instead of 2 (the others were accepted before their request arrived).
//!
//! So that more are accepted with their request there, the kernel hands a connection over
//! only once its client has sent, or after [`DEFER_ACCEPT_SECONDS`] ([`Listener::defer_accept`]),
//! as nginx's `deferred` and haproxy's `defer-accept` do: measured as above, almost no
//! `epoll_ctl` instead of 1 to 1.7 per connection, and 8% more requests/s. A client that
//! connects and sends nothing reaches the worker that much later, and holds neither a task
//! nor a slot under `--max-connections` meanwhile (its header timeout starts when it does).
//!
//! What a connection outside the reactor is not told of: its client closing while its request
//! is with the app. The fast path watches for that after [`WATCH_AFTER`] only (see
//! `http1_fast_path::client_gone`), when the app is slow enough for registering to be cheap
//! beside it.

use std::future::Future;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
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

/// How long the kernel keeps a connection whose client has sent nothing before it hands it
/// over anyway ([`Listener::defer_accept`]), in seconds: it resends its SYN-ACK then, and
/// accepts the connection on the client's answer (should that be lost, on an answer to a
/// later resend). nginx and haproxy set the same. Connections completed by SYN cookies (a
/// SYN flood) are not deferred.
const DEFER_ACCEPT_SECONDS: nix::libc::c_int = 1;

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

    /// Has the kernel hand over each new connection once its client has sent something, or
    /// after [`DEFER_ACCEPT_SECONDS`] (`TCP_DEFER_ACCEPT`: std has it unstable only, socket2
    /// and rustix not at all, nix as a macro that expands to this same call). The option stays
    /// on the listening socket, which the supervisor keeps across workers and reruns.
    pub fn defer_accept(&self) -> io::Result<()> {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let seconds = DEFER_ACCEPT_SECONDS;
        // SAFETY: the kernel reads one `c_int` from `&seconds`, which lives through the call,
        // and the length passed is that of a `c_int`; the descriptor, the listening socket's,
        // stays open through the call (borrowed from `self`).
        let set = unsafe {
            libc::setsockopt(
                self.get_ref().as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                (&seconds as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
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
    /// and the stream is registered for the caller to wait on. Direct I/O spends the task's
    /// cooperative budget as tokio's own does: a client that never makes a read or a write
    /// block still lets the runtime thread go now and then.
    fn direct_or_register<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: impl FnOnce(&std::net::TcpStream) -> io::Result<T>,
    ) -> Poll<Option<io::Result<T>>> {
        if let State::Direct(direct) = &self.0 {
            let budget = ready!(tokio::task::coop::poll_proceed(cx));
            match io(direct) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => {
                    budget.made_progress();
                    return Poll::Ready(Some(done));
                }
            }
        }
        Poll::Ready(self.register().err().map(Err))
    }

    /// The registered stream, after [`Self::direct_or_register`] said `None`.
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

/// Reads what `socket` has into `buf`'s unfilled part, left uninitialised as tokio's own
/// streams leave it (hyper's buffers are large: zeroing them per read would cost more than
/// the read).
fn read(socket: &std::net::TcpStream, buf: &mut ReadBuf<'_>) -> io::Result<()> {
    // SAFETY: `recv` only writes into the slice, and no byte of it is de-initialised.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n = SockRef::from(socket).recv(unfilled)?;
    // SAFETY: the kernel wrote the first `n` bytes of the unfilled part.
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(())
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match ready!(this.direct_or_register(cx, |direct| read(direct, buf))) {
            Some(read) => Poll::Ready(read),
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
        match ready!(this.direct_or_register(cx, |mut direct| direct.write(buf))) {
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
        match ready!(this.direct_or_register(cx, |mut direct| direct.write_vectored(bufs))) {
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

    fn in_reactor(&self) -> bool {
        !matches!(self.0, State::Direct(_))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const PROMPT: Duration = Duration::from_secs(5);

    /// A listener, a client connected to it, and the connection as accepted.
    async fn connected() -> (TcpStream, ClientStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let listener = Listener::new(listener).unwrap();
        let client = TcpStream::connect(address).await.unwrap();
        let (server, from) = listener.accept().await.unwrap();
        assert_eq!(from, client.local_addr().unwrap());
        (client, server)
    }

    #[tokio::test]
    async fn a_read_reads_at_once_or_waits_for_the_client() {
        let (mut client, mut server) = connected().await;
        client.write_all(b"GET").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut got = [0; 3];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET");
        assert!(!server.in_reactor(), "read without waiting");

        let mut more = [0; 4];
        let read = tokio::spawn(async move { server.read_exact(&mut more).await.map(|_| more) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!read.is_finished(), "read with nothing sent");
        client.write_all(b" / H").await.unwrap();
        let more = tokio::time::timeout(PROMPT, read).await.expect("woken");
        assert_eq!(&more.unwrap().unwrap(), b" / H");
    }

    #[tokio::test]
    async fn a_write_larger_than_the_socket_buffers_ends_as_the_client_reads() {
        let (mut client, mut server) = connected().await;
        let sent = vec![7; 16 << 20];
        let write = tokio::spawn(async move {
            server.write_all(&sent).await.unwrap();
            server.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        tokio::time::timeout(PROMPT, client.read_to_end(&mut got))
            .await
            .expect("all of it within the time")
            .unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(got.iter().all(|&b| b == 7));
        write.await.unwrap();
    }
}
