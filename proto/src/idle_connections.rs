//! Idle keep-alive connections to one app, kept between requests by the worker's pool (one
//! list per backend port) and by `core-agent`'s (one for `--to`): the most recently used
//! first, at most as many as the caller keeps, each let go once unused for longer than the
//! caller's idle timeout.
//!
//! A plain TCP connection (see `app_exchange`) is used again only if the app has neither
//! closed it nor sent anything on it since its last response (a misbehaving app's stray bytes
//! must not become the next client's response): as tokio's readiness says if it was in use
//! moments ago ([`READINESS_TRUSTED_FOR`]: bytes the runtime has not heard of yet slip
//! through), else as a peek says. Bytes the app sends after the next request is on its way
//! cannot be told apart from the answer, by any HTTP/1.1 proxy.

use std::future::{poll_fn, Future};
use std::pin::pin;
use std::task::{Context, Waker};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How soon after its last response an idle connection is taken on tokio's word that the app
/// has neither closed it nor sent on it since, without a peek (a system call per request, 5%
/// of the worker's CPU at keep-alive load). What slips through: what the app sent or closed
/// since the runtime last polled its events, as in nginx and haproxy, which learn of it from
/// their event loops too (neither peeks when it takes a connection). A heuristic on apps, not
/// a bound on that: they close idle connections after seconds, not within 100 ms of answering
/// (a bodiless request that finds one closed just then goes again if idempotent, else is a
/// 502). Longer idle, a connection is peeked at.
pub const READINESS_TRUSTED_FOR: Duration = Duration::from_millis(100);

/// The idle connections to one app, oldest first.
pub struct IdleList<C> {
    idle: Vec<Idle<C>>,
}

struct Idle<C> {
    connection: C,
    since: Instant,
}

impl<C> Default for IdleList<C> {
    fn default() -> Self {
        IdleList { idle: Vec::new() }
    }
}

impl<C> IdleList<C> {
    /// The most recently used connection that has been idle for less than `timeout` by `now`,
    /// and since when it has been; older ones met on the way go.
    pub fn take(&mut self, now: Instant, timeout: Duration) -> Option<(C, Instant)> {
        while let Some(Idle { connection, since }) = self.idle.pop() {
            if now < since + timeout {
                return Some((connection, since));
            }
        }
        None
    }

    /// Keeps `connection` if fewer than `max` are kept; else it goes.
    pub fn keep(&mut self, connection: C, max: usize) {
        if self.idle.len() < max {
            let since = Instant::now();
            self.idle.push(Idle { connection, since });
        }
    }

    /// Lets go of the connections idle for `timeout` or more, and of those no longer `usable`.
    pub fn sweep(&mut self, timeout: Duration, mut usable: impl FnMut(&mut C) -> bool) {
        let now = Instant::now();
        self.idle
            .retain_mut(|Idle { connection, since }| now < *since + timeout && usable(connection));
    }

    pub fn len(&self) -> usize {
        self.idle.len()
    }

    pub fn is_empty(&self) -> bool {
        self.idle.is_empty()
    }
}

/// The first of the idle connections `next` takes out at a time (most recently used first,
/// with since when each has been idle) that may carry the next request; those met on the way
/// that may not, go.
pub fn first_quiet(
    mut next: impl FnMut(Instant) -> Option<(TcpStream, Instant)>,
) -> Option<TcpStream> {
    let now = Instant::now();
    loop {
        let (stream, since) = next(now)?;
        if still_quiet(&stream, since, now) {
            return Some(stream);
        }
    }
}

/// Whether an idle plain connection, idle since `since`, may carry the next request: the app
/// has neither closed it nor sent on it since (see the module's comment).
fn still_quiet(stream: &TcpStream, since: Instant, now: Instant) -> bool {
    let recent = now < since + READINESS_TRUSTED_FOR;
    (recent && !readiness_seen(stream)) || quiet(stream)
}

/// Whether tokio has seen `stream` turn readable (the app sent bytes or closed it) since a
/// read last came back short. It learns of it when the runtime next polls its events (when a
/// runtime thread has nothing to run, and between every 61 tasks it runs). Asked outside the
/// task's budget: a task out of it would be told "not ready" whatever tokio saw.
fn readiness_seen(stream: &TcpStream) -> bool {
    let readiness = tokio::task::unconstrained(poll_fn(|cx| stream.poll_read_ready(cx)));
    let mut cx = Context::from_waker(Waker::noop());
    pin!(readiness).poll(&mut cx).is_ready()
}

/// Whether an idle plain connection is still open and has nothing to read: neither closed by
/// the app nor sent bytes after its last response. A peek, which sees what tokio's readiness
/// has not caught up with yet.
pub fn quiet(stream: &TcpStream) -> bool {
    let peeked = socket2::SockRef::from(stream).peek(&mut [std::mem::MaybeUninit::uninit()]);
    matches!(peeked, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
