//! The latest of a series of moments (when a connection's last request ended, when a body or a
//! splice last moved a byte), kept in one atomic so one task can note it and another read it
//! without a lock: milliseconds since a start, only ever moving forward.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub struct LastMoment {
    start: Instant,
    since_start_ms: AtomicU64,
}

impl LastMoment {
    /// Starts now; the last moment is the start until [`Self::note`] says otherwise.
    pub fn new() -> Self {
        LastMoment {
            start: Instant::now(),
            since_start_ms: AtomicU64::new(0),
        }
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// Notes the present moment.
    pub fn note(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.since_start_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn get(&self) -> Instant {
        self.start + Duration::from_millis(self.since_start_ms.load(Ordering::Relaxed))
    }
}
