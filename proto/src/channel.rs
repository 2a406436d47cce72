//! A typed message channel between two core-server processes, able to carry descriptors.
//!
//! The transport is a `SOCK_SEQPACKET` Unix socketpair: the kernel keeps message boundaries,
//! so one `sendmsg` is one postcard-encoded message, and the descriptors attached to it
//! (`SCM_RIGHTS`) arrive with exactly that message. Received descriptors are close-on-exec.
//!
//! `Channel<Out, In>` sends `Out` and receives `In`, so the supervisor's end
//! (`Channel<ToWorker, FromWorker>`) cannot send what only a worker may send.

use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::cmsg_space;
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::ipc::CHILD_IPC_FD;

/// The largest message either side sends; larger ones are refused before sending.
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// The most descriptors one message carries.
pub const MAX_FDS: usize = 8;

/// A connected, non-blocking, close-on-exec `SOCK_SEQPACKET` pair.
pub fn socketpair_fds() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// A child's end of its socketpair, which the supervisor put on [`CHILD_IPC_FD`]. Checked to
/// be a socket, so a child binary started by hand says what went wrong.
pub fn inherited_fd() -> io::Result<OwnedFd> {
    use nix::sys::stat::{fstat, SFlag};
    // SAFETY: borrowed for one fstat; an unopened number just makes fstat fail.
    let is_socket = fstat(unsafe { BorrowedFd::borrow_raw(CHILD_IPC_FD) })
        .is_ok_and(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFSOCK);
    if !is_socket {
        return Err(io::Error::other(format!(
            "no IPC socket on descriptor {CHILD_IPC_FD}: this program is started by core-server, not by hand"
        )));
    }
    // SAFETY: the supervisor set this descriptor up for this process alone, and nothing else in
    // the process takes ownership of it: it is taken once, at start-up.
    let fd = unsafe { OwnedFd::from_raw_fd(CHILD_IPC_FD) };
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

pub struct Channel<Out, In> {
    fd: AsyncFd<OwnedFd>,
    _types: PhantomData<fn(Out) -> In>,
}

impl<Out: Serialize, In: DeserializeOwned> Channel<Out, In> {
    /// Wraps one end of a [`socketpair_fds`] pair (or a descriptor inherited from a parent,
    /// which is then made non-blocking). Must be called inside a tokio runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(fd.as_raw_fd())?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which is its only owner from here
        // on, so it is neither closed nor replaced while registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)?
        };
        Ok(Channel {
            fd,
            _types: PhantomData,
        })
    }

    /// The process at the other end, as the kernel saw it connect (`SO_PEERCRED`).
    pub fn peer(&self) -> io::Result<nix::sys::socket::UnixCredentials> {
        Ok(getsockopt(self.fd.get_ref(), sockopt::PeerCredentials)?)
    }

    /// Sends `message` with `fds` attached (the receiver gets duplicates; ours stay open).
    pub async fn send(&self, message: &Out, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let bytes = postcard::to_stdvec(message).map_err(invalid_data)?;
        if bytes.len() > MAX_MESSAGE_LEN || fds.len() > MAX_FDS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "IPC message too large: {} bytes, {} descriptors",
                    bytes.len(),
                    fds.len()
                ),
            ));
        }
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs: &[ControlMessage] = if raw.is_empty() {
            &[]
        } else {
            &[ControlMessage::ScmRights(&raw)]
        };
        self.fd
            .async_io(Interest::WRITABLE, |fd| {
                let iov = [IoSlice::new(&bytes)];
                sendmsg::<()>(fd.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            })
            .await
            .map(drop)
    }

    /// Receives the next message and the descriptors attached to it.
    /// `Ok(None)`: the other process closed its end (it exited).
    pub async fn recv(&self) -> io::Result<Option<(In, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE_LEN];
        let (len, fds) = self
            .fd
            .async_io(Interest::READABLE, |fd| {
                match receive(fd.as_fd(), &mut buf) {
                    // A peer that closed with our message unread is reported as a reset once;
                    // what it sent before closing is still queued, and is read next.
                    Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ECONNRESET as i32) => {
                        receive(fd.as_fd(), &mut buf)
                    }
                    received => received,
                }
            })
            .await?;
        if len == 0 {
            return Ok(None);
        }
        let message = postcard::from_bytes(&buf[..len]).map_err(invalid_data)?;
        Ok(Some((message, fds)))
    }
}

fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these descriptors in our table for us; nothing
            // else owns them, so each gets exactly one owner here.
            fds.extend(
                received
                    .into_iter()
                    .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) }),
            );
        }
    }
    if msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "IPC message truncated",
        ));
    }
    Ok((msg.bytes, fds))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    // SAFETY: only borrowed for the two fcntl calls; the caller owns the descriptor.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

fn invalid_data(e: postcard::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed IPC message: {e}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn messages_and_descriptors_arrive_together() {
        let (a, b) = socketpair_fds().unwrap();
        let a: Channel<String, u32> = Channel::new(a).unwrap();
        let b: Channel<u32, String> = Channel::new(b).unwrap();

        let (mut reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
        a.send(&"hello".to_owned(), &[writer.as_fd()])
            .await
            .unwrap();
        let (text, mut fds) = b.recv().await.unwrap().unwrap();
        assert_eq!(text, "hello");
        assert_eq!(fds.len(), 1);
        drop(writer);
        let mut passed = std::os::unix::net::UnixStream::from(fds.pop().unwrap());
        passed.write_all(b"through the passed descriptor").unwrap();
        drop(passed);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the passed descriptor");

        b.send(&7, &[]).await.unwrap();
        assert_eq!(a.recv().await.unwrap().unwrap().0, 7);
        drop(b);
        assert!(
            a.recv().await.unwrap().is_none(),
            "closed end reads as None"
        );
    }

    #[tokio::test]
    async fn a_reply_sent_before_the_peer_closed_is_still_read() {
        let (a, b) = socketpair_fds().unwrap();
        let client: Channel<u32, String> = Channel::new(a).unwrap();
        let server: Channel<String, u32> = Channel::new(b).unwrap();
        server.send(&"refused".to_owned(), &[]).await.unwrap();
        client.send(&1, &[]).await.unwrap(); // never read by the server
        drop(server);
        assert_eq!(client.recv().await.unwrap().unwrap().0, "refused");
        assert!(client.recv().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversize_is_refused_before_sending() {
        let (a, _b) = socketpair_fds().unwrap();
        let a: Channel<Vec<u8>, ()> = Channel::new(a).unwrap();
        let err = a
            .send(&vec![0; MAX_MESSAGE_LEN + 1], &[])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
