//! Idle plain-HTTP/1 connections, parked. A connection that has waited [`PARK_AFTER`] for its
//! next request, with nothing of it read, leaves its task and tokio's reactor and waits here,
//! in an epoll set of its own, as its descriptor and a few words, until:
//! - its client sends (or closes): it goes back to be served by a new task;
//! - its idle deadline passes (`--header-timeout` or `--idle-timeout`, as in its task): closed;
//! - the connection limit asks idle connections to make room: closed, as in its task.
//!
//! Why: an idle keep-alive connection cost its task (1 KiB: a connection's future is as large
//! as its largest state, a request in flight) and tokio's registration of its socket (256 B);
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

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::connection_limit::{ConnectionLimit, Slot};

/// How long a connection waits for its next request in its own task before it is parked.
pub const PARK_AFTER: Duration = Duration::from_millis(250);

/// Readiness events taken per `epoll_wait`.
const EVENTS: usize = 64;

/// Below this many entries the set's tables are not shrunk.
const SMALL: usize = 1024;

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
    /// or an eviction (see the module's comment); if it cannot be (an error, logged), closes
    /// it. Gives it back if [`Self::run`] has ended (the worker is stopping): the caller
    /// serves it on.
    pub fn park(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        slot: Slot,
        close_at: Instant,
    ) -> Result<(), (TcpStream, Slot)> {
        let mut state = self.lock();
        if state.closed {
            return Err((stream, slot));
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                warn!("cannot park an idle connection from {client} ({e}): closed");
                return Ok(());
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        let event = EpollEvent::new(EpollFlags::EPOLLIN, id);
        if let Err(e) = self.epoll.get_ref().0.add(&stream, event) {
            warn!("cannot park an idle connection from {client} ({e}): closed");
            return Ok(());
        }
        if state.next_deadline().is_none_or(|next| close_at < next) {
            self.sooner.notify_one(); // kept for `run` if it is not waiting just now
        }
        state.deadlines.push(Reverse((close_at, id)));
        state.parked.insert(id, Parked { stream, slot });
        Ok(())
    }

    /// Hands each parked connection whose client sent something (or closed) to `resume`,
    /// closes those past their deadline or evicted by `limit`, and parks no more once `stop`
    /// is cancelled and none is left.
    pub async fn run(
        &self,
        limit: &ConnectionLimit,
        stop: &CancellationToken,
        mut resume: impl FnMut(TcpStream, SocketAddr, Slot),
    ) {
        let mut events = [EpollEvent::empty(); EVENTS];
        let mut ready = Vec::new();
        let evictions = limit.evictions();
        tokio::pin!(evictions);
        evictions.as_mut().enable();
        let mut stopping = false;
        loop {
            let wake = {
                let mut state = self.lock();
                state.close_expired(Instant::now());
                if stopping && state.parked.is_empty() {
                    state.closed = true;
                    return;
                }
                state.tidy();
                state.next_deadline()
            };
            let deadline = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => pending().await,
                }
            };
            tokio::select! {
                guard = self.epoll.readable() => {
                    let mut guard = match guard {
                        Ok(guard) => guard,
                        Err(e) => {
                            warn!("parked connections can no longer be watched ({e}): closing them");
                            self.lock().closed = true;
                            return;
                        }
                    };
                    let taken = match self.epoll.get_ref().0.wait(&mut events, EpollTimeout::ZERO) {
                        Ok(taken) => taken,
                        Err(e) => {
                            warn!("waiting on parked connections: {e}");
                            continue;
                        }
                    };
                    if taken < events.len() {
                        guard.clear_ready(); // drained; tokio hears of any event since
                    }
                    self.take(&events[..taken], &mut ready);
                    for parked in ready.drain(..) {
                        // A client gone meanwhile has no address any more: closed.
                        let client = match parked.stream.peer_addr() {
                            Ok(client) => client,
                            Err(e) => {
                                debug!("a parked connection is gone ({e}): closed");
                                continue;
                            }
                        };
                        match TcpStream::from_std(parked.stream) {
                            Ok(stream) => resume(stream, client, parked.slot),
                            Err(e) => warn!("cannot serve the parked connection from {client} again ({e}): closed"),
                        }
                    }
                }
                () = &mut evictions => {
                    evictions.set(limit.evictions());
                    evictions.as_mut().enable();
                    self.lock().close_evicted();
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
    /// Closes the connections whose deadline is past (dropping a descriptor takes it out of
    /// the epoll set too), and forgets the deadlines of connections no longer parked.
    fn close_expired(&mut self, now: Instant) {
        while let Some(&Reverse((at, id))) = self.deadlines.peek() {
            if at > now && self.parked.contains_key(&id) {
                break;
            }
            self.deadlines.pop();
            if self.parked.remove(&id).is_some() {
                debug!("a parked HTTP/1 connection sent no request in time: closed");
            }
        }
    }

    fn close_evicted(&mut self) {
        let before = self.parked.len();
        self.parked
            .retain(|_, parked| !parked.slot.activity().is_some_and(|a| a.was_evicted()));
        let closed = before - self.parked.len();
        if closed > 0 {
            debug!("{closed} parked HTTP/1 connections closed to make room");
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
