//! The cap on concurrent client connections (`--max-connections`), and what happens at it.
//!
//! Every client connection holds a [`Slot`] for its whole life. At the cap, the accept loop
//! first makes idle connections give theirs back (no request in flight: an HTTP/1 keep-alive
//! connection waiting for its next request, one that never sent a request, an HTTP/2
//! connection with no open stream), the longest idle first and a batch at a time, as nginx
//! reuses its "reusable" connections. If none is idle, it stops accepting until a connection
//! closes or turns idle; new clients wait in the kernel's accept queue meanwhile.
//!
//! Registering a connection takes a lock, a request takes none: the registry is only scanned
//! at the cap, which is the rare path.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slab::Slab;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use crate::activity::Activity;

/// Descriptors the worker keeps apart from client connections and the backend connections
/// they use: stdio, the IPC socket, the listeners and the UDP socket, the runtime's epoll and
/// wake-up descriptors (about 16 in all), and headroom for idle pooled backend connections that
/// outlive the client connection that opened them, and for WebSocket splices. HTTP/2 clients
/// can leave more idle ones than that (a stream each); out of descriptors, the worker closes
/// them first (`BackendPool::close_idle`).
const RESERVED_FDS: u64 = 256;

/// How many idle connections one scan closes at most (nginx frees 32 at a time too): enough
/// that a flood of new clients does not rescan the registry for each one.
pub const EVICTION_BATCH: usize = 32;

/// At most one "full, none idle" warning this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The default `--max-connections` for an open-file soft limit of `nofile`: half of what the
/// reserve leaves, because each client connection with a request in flight also holds a
/// backend connection (HTTP/1 and WebSocket: one each).
pub fn default_max(nofile: u64) -> usize {
    let usable = nofile.saturating_sub(RESERVED_FDS) / 2;
    usable.clamp(1, u32::MAX.into()) as usize
}

pub struct ConnectionLimit {
    /// `--max-connections`, lowered to what the descriptor table holds if it runs out
    /// ([`Self::out_of_descriptors`]), never below `floor`.
    max: AtomicUsize,
    floor: usize,
    /// One entry a slot: empty until the connection's task starts.
    open: Mutex<Slab<Option<Arc<Activity>>>>,
    /// Evicted connections not closed yet: no new batch is chosen while some are.
    closing: AtomicUsize,
    /// Whether the accept loop waits for room (only then do connections turning idle wake it).
    waiting: AtomicBool,
    /// A connection closed, or turned idle while `waiting`.
    changed: Notify,
    /// Idle connections were asked to close: parked ones (see `parked_connections`) have no
    /// task of their own to hear it.
    evicted_some: Notify,
    warned_at: Mutex<Option<Instant>>,
}

impl ConnectionLimit {
    /// A cap of `max` that stays where it is.
    #[cfg(test)]
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_floor(max, max)
    }

    /// A cap of `max` that running out of descriptors may lower down to `floor`.
    pub fn with_floor(max: usize, floor: usize) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            max: AtomicUsize::new(max),
            floor: floor.min(max),
            open: Mutex::new(Slab::new()),
            closing: AtomicUsize::new(0),
            waiting: AtomicBool::new(false),
            changed: Notify::new(),
            evicted_some: Notify::new(),
            warned_at: Mutex::new(None),
        })
    }

    /// A slot for a client just accepted, once there is room: at the cap, idle connections are
    /// asked to close, and this waits until one has (or until a busy one closes or turns idle).
    pub async fn admit(self: &Arc<Self>) -> Slot {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(slot) = self.try_admit() {
                self.waiting.store(false, Ordering::Relaxed);
                return slot;
            }
            self.waiting.store(true, Ordering::Relaxed);
            if self.closing.load(Ordering::Relaxed) == 0 && self.evict_idle() == 0 {
                self.warn_full();
            }
            changed.await;
        }
    }

    fn try_admit(self: &Arc<Self>) -> Option<Slot> {
        let open = self.open.lock().expect("connection registry lock");
        if open.len() >= self.max.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.insert(open))
    }

    /// A slot even at the cap: for the one client accepted when the worker stops.
    pub fn admit_beyond_cap(self: &Arc<Self>) -> Slot {
        self.insert(self.open.lock().expect("connection registry lock"))
    }

    /// What an upgrade request carries to take its connection's place once upgraded.
    pub fn for_upgrades(self: &Arc<Self>) -> UpgradeCap {
        UpgradeCap(self.clone())
    }

    fn insert(
        self: &Arc<Self>,
        mut open: std::sync::MutexGuard<'_, Slab<Option<Arc<Activity>>>>,
    ) -> Slot {
        let key = open.insert(None);
        Slot {
            limit: self.clone(),
            key,
            activity: None,
        }
    }

    fn warn_full(&self) {
        let mut warned_at = self.warned_at.lock().expect("warning clock lock");
        if warned_at.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            *warned_at = Some(Instant::now());
            warn!(
                "at the cap of {} client connections, none idle: not accepting until one \
                 closes (--max-connections)",
                self.max.load(Ordering::Relaxed)
            );
        }
    }

    /// Asks up to [`EVICTION_BATCH`] idle connections, the longest idle first, to close; how
    /// many were asked. Also used when the descriptor table is full (EMFILE).
    pub fn evict_idle(&self) -> usize {
        let open = self.open.lock().expect("connection registry lock");
        // The longest idle, kept in a small max-heap (the most recently idle on top, pushed
        // out by older ones): no allocation as large as the registry.
        let mut oldest = BinaryHeap::with_capacity(EVICTION_BATCH + 1);
        for (key, activity) in open.iter() {
            let Some(activity) = activity.as_ref().filter(|a| !a.was_evicted()) else {
                continue;
            };
            let Some(since) = activity.idle_since() else {
                continue;
            };
            oldest.push((since, key));
            if oldest.len() > EVICTION_BATCH {
                oldest.pop();
            }
        }
        let mut asked = 0;
        for (_, key) in oldest {
            if open[key].as_ref().is_some_and(|a| a.evict()) {
                self.closing.fetch_add(1, Ordering::Relaxed);
                asked += 1;
            }
        }
        drop(open); // the parked set, woken next, closes connections: `Slot::drop` locks it
        if asked > 0 {
            self.evicted_some.notify_waiters();
        }
        asked
    }

    /// Accepting failed with EMFILE, and closing idle connections to apps freed few: the cap
    /// (`--max-connections`, more than the open-file limit holds) becomes the clients open now
    /// less a batch, never below its floor (what the limit holds with a connection to an app
    /// per client), and a batch of idle ones is asked to close. From then on new clients wait
    /// for room under the cap, as at any cap, and the descriptors kept free serve requests'
    /// connections to their apps: had the accept loop taken every descriptor freed, a request
    /// would find none to reach its app with.
    pub fn out_of_descriptors(&self) {
        let open = self.open.lock().expect("connection registry lock").len();
        let fits = open.saturating_sub(EVICTION_BATCH).max(self.floor);
        let before = self.max.fetch_min(fits, Ordering::Relaxed);
        if fits < before {
            warn!(
                "out of file descriptors with {open} client connections open: at most {fits} \
                 from now on, not {before} (raise the open-file limit, or lower \
                 --max-connections)"
            );
        }
        self.evict_idle();
    }

    /// Resolves once [`Self::evict_idle`] has asked connections to close (after the call, if
    /// the future was not enabled before).
    pub fn evictions(&self) -> Notified<'_> {
        self.evicted_some.notified()
    }

    /// Called by a connection whose last request in flight just ended.
    pub fn turned_idle(&self) {
        if self.waiting.load(Ordering::Relaxed) {
            self.changed.notify_waiters();
        }
    }
}

/// A client connection's place under the cap; given back when dropped.
pub struct Slot {
    limit: Arc<ConnectionLimit>,
    key: usize,
    activity: Option<Arc<Activity>>,
}

impl Slot {
    /// The connection was accepted: its clock starts, and from now on it may be evicted.
    pub fn connected(&mut self) -> Arc<Activity> {
        let activity = Activity::new(self.limit.clone());
        self.limit.open.lock().expect("connection registry lock")[self.key] =
            Some(activity.clone());
        self.activity = Some(activity.clone());
        activity
    }

    /// The connection's [`Activity`], once [`Self::connected`].
    pub fn activity(&self) -> Option<&Arc<Activity>> {
        self.activity.as_ref()
    }
}

/// The place under the cap of a client connection that outlives its task: once upgraded (a
/// WebSocket), hyper lets go of the connection, its task ends and gives its [`Slot`] back,
/// while the connection lives on, spliced to the app in a task of its own. That task holds
/// this instead, so an open WebSocket counts against `--max-connections` as any connection
/// does. Never evicted: an upgraded connection is never idle in the cap's sense (its own idle
/// timeout closes it).
pub struct UpgradeSlot(#[expect(dead_code, reason = "held for its drop")] Slot);

/// Rides in an upgrade request's extensions, for the [`UpgradeSlot`] taken once the app (or
/// agent) has switched protocols: not before, so that requests that are not upgraded (a 404,
/// a refusal) touch the registry not at all.
#[derive(Clone)]
pub struct UpgradeCap(Arc<ConnectionLimit>);

impl UpgradeCap {
    /// Taken beyond the cap: the connection holds a slot of its own until hyper lets go.
    pub fn slot(&self) -> UpgradeSlot {
        UpgradeSlot(self.0.admit_beyond_cap())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limit
            .open
            .lock()
            .expect("connection registry lock")
            .remove(self.key);
        if self.activity.as_ref().is_some_and(|a| a.was_evicted()) {
            self.limit.closing.fetch_sub(1, Ordering::Relaxed);
        }
        self.limit.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_leaves_the_reserve_and_a_backend_descriptor_per_client() {
        assert_eq!(default_max(1024), 384);
        assert_eq!(default_max(20000), 9872);
        assert_eq!(default_max(1_048_576), 524_160);
        assert_eq!(default_max(100), 1);
    }

    #[tokio::test]
    async fn at_the_cap_the_longest_idle_connection_makes_room() {
        let limit = ConnectionLimit::new(2);
        let mut first = limit.admit().await;
        let first_activity = first.connected();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let mut second = limit.admit().await;
        let second_activity = second.connected();
        let _busy = second_activity.request_started();
        let admit = tokio::spawn({
            let limit = limit.clone();
            async move { limit.admit().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(first_activity.was_evicted(), "the idle one is asked");
        assert!(!second_activity.was_evicted(), "the busy one is not");
        assert!(!admit.is_finished(), "no room before it closes");
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), admit)
            .await
            .expect("admitted once the idle connection closed")
            .unwrap();
    }

    #[tokio::test]
    async fn at_the_cap_with_none_idle_a_request_ending_makes_room() {
        let limit = ConnectionLimit::new(1);
        let mut only = limit.admit().await;
        let only_activity = only.connected();
        let busy = only_activity.request_started();
        let admit = tokio::spawn({
            let limit = limit.clone();
            async move { limit.admit().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!only_activity.was_evicted());
        drop(busy);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(only_activity.was_evicted(), "asked once idle");
        drop(only);
        tokio::time::timeout(std::time::Duration::from_secs(5), admit)
            .await
            .expect("admitted")
            .unwrap();
    }

    #[tokio::test]
    async fn out_of_descriptors_the_cap_comes_down_to_what_fits_less_a_batch() {
        let limit = ConnectionLimit::with_floor(1000, 4);
        let mut open = Vec::new();
        for _ in 0..40 {
            let mut slot = limit.admit().await;
            let activity = slot.connected();
            open.push((slot, activity));
        }
        limit.out_of_descriptors();
        let asked = open.iter().filter(|(_, a)| a.was_evicted()).count();
        assert_eq!(
            asked, EVICTION_BATCH,
            "a batch of idle ones is asked to close"
        );
        open.retain(|(_, a)| !a.was_evicted());
        assert!(limit.try_admit().is_none(), "8 open: the cap is 40 - 32");
        open.pop();
        assert!(limit.try_admit().is_some(), "7 open: room again");
        limit.out_of_descriptors();
        assert_eq!(
            limit.max.load(Ordering::Relaxed),
            4,
            "never below its floor"
        );
    }
}
