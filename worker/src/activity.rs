//! What the connection loop in `http_server` and the connection limit know of a client
//! connection: how many requests are in flight and since when none is, whether it ever sent
//! one, whether it speaks HTTP/2, and whether the limit asked it to make room.
//!
//! Idleness counts requests, not bytes: a connection is idle while no request is in flight,
//! from the end of its last one (or from its start). HTTP/2 PINGs, SETTINGS or WINDOW_UPDATEs,
//! which a client can send forever without asking for anything, do not keep it open. A request
//! is in flight from the moment hyper hands its head to the service until its response body is
//! finished or dropped ([`InFlight`] rides in [`CountedBody`]). That costs two atomic updates
//! per request, where noting every read and write (what this did before) read the clock on
//! each and still let a PING keep a connection alive.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::connection_limit::ConnectionLimit;
use crate::last_moment::LastMoment;

pub struct Activity {
    in_flight: AtomicU32,
    /// When the connection was accepted, and when a request last started or ended.
    changed: LastMoment,
    started_a_request: AtomicBool,
    http2: AtomicBool,
    evicted: AtomicBool,
    /// Told when `http2` or `evicted` turns true: one `Notify` for both keeps this in a
    /// smaller class of the allocator's (it lives as long as the connection, idle or not).
    news: Notify,
    limit: Arc<ConnectionLimit>,
}

impl Activity {
    pub fn new(limit: Arc<ConnectionLimit>) -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicU32::new(0),
            changed: LastMoment::new(),
            started_a_request: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            evicted: AtomicBool::new(false),
            news: Notify::new(),
            limit,
        })
    }

    /// A request's head arrived; it is in flight until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.started_a_request.store(true, Ordering::Relaxed);
        self.changed.note();
        InFlight {
            activity: self.clone(),
        }
    }

    pub fn accepted_at(&self) -> Instant {
        self.changed.start()
    }

    pub fn started_a_request(&self) -> bool {
        self.started_a_request.load(Ordering::Relaxed)
    }

    /// Since when no request has been in flight; `None` while one is.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.changed.get())
    }

    pub fn saw_http2(&self) {
        if !self.http2.swap(true, Ordering::Relaxed) {
            self.news.notify_waiters();
        }
    }

    /// Resolves once the connection has carried an HTTP/2 request (at once if it already has).
    pub async fn speaks_http2(&self) {
        self.until(|activity| activity.http2.load(Ordering::Relaxed))
            .await
    }

    /// Asks the connection to close to make room; false if it was asked already.
    pub fn evict(&self) -> bool {
        let first = !self.evicted.swap(true, Ordering::Relaxed);
        if first {
            self.news.notify_waiters();
        }
        first
    }

    pub fn was_evicted(&self) -> bool {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Resolves once the connection limit asked this connection to close (at once if it has).
    pub async fn evicted(&self) {
        self.until(Self::was_evicted).await
    }

    /// Resolves once `done` holds, looking again at each news.
    async fn until(&self, done: impl Fn(&Self) -> bool) {
        loop {
            // Listening before looking: news told in between is not missed.
            let news = self.news.notified();
            tokio::pin!(news);
            news.as_mut().enable();
            if done(self) {
                return;
            }
            news.await;
        }
    }
}

/// A request in flight on a connection (see the module's comment).
pub struct InFlight {
    activity: Arc<Activity>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        activity.changed.note();
        if activity.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            activity.limit.turned_idle();
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it ends or is dropped.
    pub struct CountedBody<B> {
        #[pin]
        body: B,
        in_flight: Option<InFlight>,
    }
}

impl<B> CountedBody<B> {
    pub fn new(body: B, in_flight: InFlight) -> Self {
        CountedBody {
            body,
            in_flight: Some(in_flight),
        }
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = this.body.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.in_flight.take(); // ended: no need to wait for hyper to drop the body
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
