//! Idle plain-HTTP/1 connections, parked. A connection that has waited [`PARK_AFTER`] for its
//! next request, with nothing of it read, leaves its task and tokio's reactor and waits here,
//! in an epoll set of its own, as its descriptor and a few words, until:
//! - its client sends (or closes): it goes back to be served by a new task;
//! - its idle deadline passes (`--header-timeout` or `--idle-timeout`, as in its task): closed;
//! - the connection limit asks idle connections to make room: closed, as in its task.
//!
//! Why: an idle keep-alive connection cost its task (over 1 KiB: a connection's future is as
//! large as its largest state, a request in flight) and tokio's registration of its socket
//! (256 B);
//! nginx's costs its descriptor and a small struct (bench/connections.sh). A connection is
//! parked once per idle spell longer than [`PARK_AFTER`] (two `epoll_ctl`s out, two back and a
//! new task), never between requests that follow each other closely. TLS connections are not
//! parked: their session lives in their task.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::pending;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::client_stream::ClientStream;
use crate::connection_limit::{ConnectionLimit, Slot};

/// How long a connection waits for its next request in its own task before it is parked.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 64;

/// Below this many entries the set's tables are not shrunk.
const SMALL: usize = 1024;

/// Connections closed at most in one go, between which other tasks run.
const CLOSE_PER_PASS: usize = 256;

/// What [`ParkedConnections::park`] did with a connection.
pub enum Parking {
    Parked,
    /// Closed instead: evicted just before, or an error (logged).
    Closed,
    /// Given back: [`ParkedConnections::run`] has ended (the worker is stopping, or the set
    /// could no longer be watched). The caller serves it on.
    Refused(ClientStream, Slot),
}

/// The parked connections of one listener.
pub struct ParkedConnections {
    epoll: AsyncFd<EpollSet>,
    state: Mutex<State>,
    /// A connection was parked with a deadline before all others': `run` sleeps less.
    sooner: Notify,
}

/// A connection while parked: all that is kept of it (its client's address is asked of the
/// kernel again when it is served again).
struct Parked {
    stream: std::net::TcpStream,
    slot: Slot,
}

#[derive(Default)]
struct State {
    /// By the id their epoll event carries.
    parked: HashMap<u64, Parked>,
    /// The deadline of each parking, soonest first; those of connections no longer parked
    /// stay until they come up (or the heap is rebuilt).
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
    /// [`ParkedConnections::run`] has ended: nothing more is parked.
    closed: bool,
}

/// The epoll instance, for tokio to watch (an epoll descriptor is readable while any of its
/// set is ready).
struct EpollSet(Epoll);

impl AsRawFd for EpollSet {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

impl ParkedConnections {
    /// An empty set, watched by the current runtime's reactor.
    pub fn new() -> io::Result<Self> {
        let epoll = EpollSet(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
        // SAFETY: `EpollSet` owns its descriptor and neither closes nor replaces it while the
        // `AsyncFd` holds it.
        let epoll = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE)? };
        Ok(ParkedConnections {
            epoll,
            state: Mutex::default(),
            sooner: Notify::new(),
        })
    }

    /// Parks `stream`, idle and with nothing of it read, until its client sends, `close_at`,
    /// or an eviction (see the module's comment).
    pub fn park(
        &self,
        stream: ClientStream,
        client: SocketAddr,
        slot: Slot,
        close_at: Instant,
    ) -> Parking {
        let mut state = self.lock();
        if state.closed {
            return Parking::Refused(stream, slot);
        }
        // Evicted since its task last looked: `close_evicted` may have run already, and would
        // not look again.
        if slot.activity().is_some_and(|a| a.was_evicted()) {
            debug!("an HTTP/1 connection closed to make room");
            return Parking::Closed;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!("cannot park an idle connection from {client} ({e}): closed");
                return Parking::Closed;
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        let event = EpollEvent::new(EpollFlags::EPOLLIN, id);
        if let Err(e) = self.epoll.get_ref().0.add(&stream, event) {
            warn!("cannot park an idle connection from {client} ({e}): closed");
            return Parking::Closed;
        }
        if state.next_deadline().is_none_or(|next| close_at < next) {
            self.sooner.notify_one(); // kept for `run` if it is not waiting just now
        }
        state.deadlines.push(Reverse((close_at, id)));
        state.parked.insert(id, Parked { stream, slot });
        Parking::Parked
    }

    /// Hands each parked connection whose client sent something (or closed) to `resume`,
    /// closes those past their deadline or evicted by `limit`, and parks no more once `stop`
    /// is cancelled and none is left (or if the set can no longer be watched: then it closes
    /// them all).
    pub async fn run(
        &self,
        limit: &ConnectionLimit,
        stop: &CancellationToken,
        mut resume: impl FnMut(ClientStream, SocketAddr, Slot),
    ) {
        let mut events = [EpollEvent::empty(); EVENTS];
        // Connections leaving the set: served again or closed outside its lock.
        let mut leaving = Vec::new();
        let evictions = limit.evictions();
        tokio::pin!(evictions);
        evictions.as_mut().enable();
        let mut stopping = false;
        loop {
            let (wake, more) = {
                let mut state = self.lock();
                let more = state.close_expired(Instant::now(), &mut leaving);
                if stopping && state.parked.is_empty() {
                    state.closed = true;
                    return;
                }
                state.tidy();
                (state.next_deadline(), more)
            };
            leaving.clear(); // closes them
            if more {
                tokio::task::yield_now().await; // a crowd expired: let others run meanwhile
                continue;
            }
            let deadline = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => pending().await,
                }
            };
            tokio::select! {
                guard = self.epoll.readable() => {
                    let taken = match guard {
                        Ok(mut guard) => match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                            Ok(taken) => {
                                if taken < events.len() {
                                    guard.clear_ready(); // drained; tokio hears of any event since
                                }
                                Ok(taken)
                            }
                            Err(Errno::EINTR) => Ok(0), // still ready: looked at again
                            Err(e) => Err(io::Error::from(e)),
                        },
                        Err(e) => Err(e),
                    };
                    match taken {
                        Ok(taken) => self.take(&events[..taken], &mut leaving),
                        Err(e) => {
                            warn!("parked connections can no longer be watched ({e}): closing them");
                            let parked = {
                                let mut state = self.lock();
                                state.closed = true;
                                std::mem::take(&mut state.parked)
                            };
                            drop(parked); // closes them, outside the lock as elsewhere
                            return;
                        }
                    }
                    for parked in leaving.drain(..) {
                        // A client gone meanwhile has no address any more: closed.
                        let client = match parked.stream.peer_addr() {
                            Ok(client) => client,
                            Err(e) => {
                                debug!("a parked connection is gone ({e}): closed");
                                continue;
                            }
                        };
                        // Its client sent: read at once, outside the reactor.
                        resume(ClientStream::direct(parked.stream), client, parked.slot);
                    }
                }
                () = &mut evictions => {
                    evictions.set(limit.evictions());
                    evictions.as_mut().enable();
                    self.lock().close_evicted(&mut leaving);
                    leaving.clear();
                }
                () = deadline => {}
                () = self.sooner.notified() => {}
                () = stop.cancelled(), if !stopping => stopping = true,
            }
        }
    }

    /// Moves the connections `events` name out of the set, into `ready`.
    fn take(&self, events: &[EpollEvent], ready: &mut Vec<Parked>) {
        let mut state = self.lock();
        for event in events {
            if let Some(parked) = state.parked.remove(&event.data()) {
                // Out of this set before tokio's takes it: a descriptor is in one at a time.
                if let Err(e) = self.epoll.get_ref().0.delete(&parked.stream) {
                    warn!("cannot unpark a connection ({e}): closed");
                    continue;
                }
                ready.push(parked);
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("parked connections lock")
    }
}

impl State {
    /// Moves the connections whose deadline is past into `closing` (dropping a descriptor
    /// takes it out of the epoll set too), at most [`CLOSE_PER_PASS`], and forgets the
    /// deadlines of connections no longer parked; whether more are due.
    fn close_expired(&mut self, now: Instant, closing: &mut Vec<Parked>) -> bool {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now && self.parked.contains_key(&id) {
                break;
            }
            if closing.len() == CLOSE_PER_PASS {
                return true;
            }
            self.deadlines.pop();
            if let Some(parked) = self.parked.remove(&id) {
                debug!("a parked HTTP/1 connection sent no request in time: closing");
                closing.push(parked);
            }
        }
        false
    }

    /// Moves the connections the connection limit asked to close into `closing`.
    fn close_evicted(&mut self, closing: &mut Vec<Parked>) {
        let evicted = self
            .parked
            .iter()
            .filter(|(_, parked)| parked.slot.activity().is_some_and(|a| a.was_evicted()));
        let evicted: Vec<u64> = evicted.map(|(&id, _)| id).collect();
        closing.extend(evicted.iter().filter_map(|id| self.parked.remove(id)));
        if !closing.is_empty() {
            debug!(
                "{} parked HTTP/1 connections closed to make room",
                closing.len()
            );
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.peek().map(|&Reverse((at, _))| at)
    }

    /// Keeps the tables in proportion to what is parked: the heap's forgotten deadlines, and
    /// the room left by a crowd of connections that has gone.
    fn tidy(&mut self) {
        let live = self.parked.len();
        if self.deadlines.len() > 2 * live + SMALL || self.deadlines.capacity() > 4 * live + SMALL {
            self.deadlines
                .retain(|Reverse((_, id))| self.parked.contains_key(id));
            self.deadlines.shrink_to(2 * live);
        }
        if self.parked.capacity() > 4 * live + SMALL {
            self.parked.shrink_to(2 * live);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;
    use tokio::task::JoinHandle;

    const PROMPT: Duration = Duration::from_secs(5);

    type Resumed = mpsc::UnboundedReceiver<(ClientStream, SocketAddr, Slot)>;

    /// A connection: the client's end, and the server's with its slot under `limit`.
    async fn connection(limit: &Arc<ConnectionLimit>) -> (TcpStream, TcpStream, Slot) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut slot = limit.admit().await;
        slot.connected();
        (client, server, slot)
    }

    /// A set and its `run`, which sends each connection it serves again on the channel.
    fn running(
        limit: &Arc<ConnectionLimit>,
        stop: &CancellationToken,
    ) -> (Arc<ParkedConnections>, Resumed, JoinHandle<()>) {
        let parked = Arc::new(ParkedConnections::new().unwrap());
        let (sender, resumed) = mpsc::unbounded_channel();
        let run = tokio::spawn({
            let (parked, limit, stop) = (parked.clone(), limit.clone(), stop.clone());
            async move {
                let resume = |stream, client, slot| sender.send((stream, client, slot)).unwrap();
                parked.run(&limit, &stop, resume).await
            }
        });
        (parked, resumed, run)
    }

    fn park(parked: &ParkedConnections, server: TcpStream, slot: Slot, close_at: Instant) {
        let (server, client) = direct(server);
        assert!(matches!(
            parked.park(server, client, slot, close_at),
            Parking::Parked
        ));
    }

    /// The server's end as the worker serves it, with its client's address.
    fn direct(server: TcpStream) -> (ClientStream, SocketAddr) {
        let client = server.peer_addr().unwrap();
        (ClientStream::direct(server.into_std().unwrap()), client)
    }

    /// Whether the server closed `client` within `within`.
    async fn closed_within(client: &mut TcpStream, within: Duration) -> bool {
        let mut byte = [0];
        let read = tokio::time::timeout(within, client.read(&mut byte)).await;
        matches!(read, Ok(Ok(0)))
    }

    #[tokio::test]
    async fn a_parked_connection_is_served_again_when_its_client_sends_or_closes() {
        let limit = ConnectionLimit::new(8);
        let stop = CancellationToken::new();
        let (parked, mut resumed, _run) = running(&limit, &stop);
        let later = Instant::now() + PROMPT;
        let (mut sending, server, slot) = connection(&limit).await;
        park(&parked, server, slot, later);
        let (mut closing, server, slot) = connection(&limit).await;
        park(&parked, server, slot, later);

        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            resumed.try_recv().is_err(),
            "served again with nothing sent"
        );
        sending.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (mut stream, client, _slot) = resumed.recv().await.unwrap();
        assert_eq!(client, sending.local_addr().unwrap());
        let mut got = [0; 16];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");

        closing.shutdown().await.unwrap();
        let (mut stream, client, _slot) = resumed.recv().await.unwrap();
        assert_eq!(client, closing.local_addr().unwrap());
        assert_eq!(stream.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_parked_connection_closes_at_its_deadline_and_gives_its_slot_back() {
        let limit = ConnectionLimit::new(2);
        let stop = CancellationToken::new();
        let (parked, _resumed, _run) = running(&limit, &stop);
        let (mut late, server, slot) = connection(&limit).await;
        park(&parked, server, slot, Instant::now() + PROMPT);
        // Parked after one with a later deadline, while `run` sleeps until that one's.
        let (mut soon, server, slot) = connection(&limit).await;
        let parked_at = Instant::now();
        park(
            &parked,
            server,
            slot,
            parked_at + Duration::from_millis(300),
        );

        assert!(!closed_within(&mut soon, Duration::from_millis(200)).await);
        assert!(closed_within(&mut soon, PROMPT).await, "still open");
        let after = parked_at.elapsed();
        assert!(
            after >= Duration::from_millis(300),
            "closed after {after:?}"
        );
        tokio::time::timeout(PROMPT, limit.admit())
            .await
            .expect("its slot was given back");
        assert!(!closed_within(&mut late, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn evicted_connections_close_parked_or_on_their_way_to_it() {
        let limit = ConnectionLimit::new(2);
        let stop = CancellationToken::new();
        let (parked, _resumed, _run) = running(&limit, &stop);
        let later = Instant::now() + PROMPT;
        let (mut first, server, slot) = connection(&limit).await;
        park(&parked, server, slot, later);
        let (mut second, second_server, second_slot) = connection(&limit).await;

        // At the cap, both idle: both asked to close, the second before it is parked.
        let admit = tokio::spawn({
            let limit = limit.clone();
            async move { limit.admit().await }
        });
        assert!(
            closed_within(&mut first, PROMPT).await,
            "parked, still open"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (second_server, client) = direct(second_server);
        assert!(matches!(
            parked.park(second_server, client, second_slot, later),
            Parking::Closed
        ));
        assert!(closed_within(&mut second, PROMPT).await, "still open");
        tokio::time::timeout(PROMPT, admit)
            .await
            .expect("room made")
            .unwrap();
    }

    #[tokio::test]
    async fn stopping_it_serves_those_parked_then_parks_no_more() {
        let limit = ConnectionLimit::new(8);
        let stop = CancellationToken::new();
        let (parked, mut resumed, run) = running(&limit, &stop);
        let (mut client, server, slot) = connection(&limit).await;
        park(&parked, server, slot, Instant::now() + PROMPT);

        stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!run.is_finished(), "a connection is still parked");
        client.write_all(b"GET").await.unwrap();
        let (_stream, _, _slot) = resumed.recv().await.unwrap();
        tokio::time::timeout(PROMPT, run)
            .await
            .expect("ended once none was parked")
            .unwrap();
        let (_client, server, slot) = connection(&limit).await;
        let (server, client) = direct(server);
        let later = Instant::now() + PROMPT;
        assert!(matches!(
            parked.park(server, client, slot, later),
            Parking::Refused(..)
        ));
    }
}
