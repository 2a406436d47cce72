//! A deadline for the next piece of a stream, restarted by every piece that arrives: what the
//! request and response bodies use to end a peer that stalls (nginx's `client_body_timeout`
//! and `proxy_read_timeout` work the same way: between two reads, not for the whole body),
//! and the send timeout for a client that takes nothing (`send_deadline`).
//!
//! The timer is only armed when a read has to wait, so data that is already there costs none.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

pub struct ReadDeadline {
    timeout: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether a piece arrived since the timer was last set.
    moved: bool,
}

impl ReadDeadline {
    pub fn new(timeout: Duration) -> Self {
        ReadDeadline {
            timeout,
            timer: None,
            moved: false,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records that a piece arrived.
    pub fn moved(&mut self) {
        self.moved = true;
    }

    /// To call when a read returned `Pending`: whether nothing has arrived for the timeout
    /// (if not, `cx` is woken when that would be the case).
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        // The clock is read only when the deadline moves, not at every wait.
        let timer = match &mut self.timer {
            Some(timer) => {
                if self.moved {
                    timer.as_mut().reset(Instant::now() + self.timeout);
                }
                timer
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep(self.timeout))),
        };
        self.moved = false;
        timer.as_mut().poll(cx) == Poll::Ready(())
    }
}
