//! The tasks hyper starts for one connection, run inside that connection's own task rather
//! than as tasks of their own: for an HTTP/2 client on a tunnel connection, the connection's
//! I/O, each request's wait for its response and each request body's upload; for an HTTP/2
//! server connection, each stream (the request's service call and its response's upload).
//!
//! Why: as tasks of their own, every hand-over between them is a trip through the scheduler,
//! and with more than one runtime thread often the wake-up of a sleeping thread. A request
//! through a tunnel went through four tasks (the client's, hyper's dispatch, the connection's
//! I/O, and one spawned for its response); an HTTP/2 request through two (the connection's and
//! its stream's), and the responses of streams woken together now leave in one write. Here
//! they are polled by the connection's task, where they are woken from. Measured with
//! `wrk`/`h2load` on 2 cores: the worker's CPU per request through a tunnel 16-19 -> 15-16 us;
//! HTTP/2 (h2c, 4 connections x 32 streams) 52k -> 59k requests/s on one runtime thread.
//!
//! They run until every one of them has finished, as spawned tasks would: a connection that
//! closes softly finishes the requests it carries first. Dropping [`LocalTasks::run`] drops
//! them all at once, which closes the connection and fails its streams.
//!
//! On an HTTP/2 server connection, each stream runs under a [`Deadline`]: one whose client
//! takes none of its response for the send timeout is dropped (see `send_deadline`).
//!
//! What sharing one task means: the streams of one connection share its thread and tokio's
//! cooperative budget (those of other connections do not). A panic in one of them ends that
//! one only, as it ended its task before (the panic hook reports it).

use std::future::{poll_fn, Future};
use std::panic::AssertUnwindSafe;
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::sync::mpsc;
use tracing::info;

use crate::send_deadline::Deadline;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where hyper spawns; what it spawns runs in [`LocalTasks::run`].
#[derive(Clone)]
pub struct LocalExecutor {
    spawn: mpsc::UnboundedSender<Task>,
    /// For an HTTP/2 server connection: how long a stream may wait for its client.
    send_timeout: Option<Duration>,
}

impl<F> hyper::rt::Executor<F> for LocalExecutor
where
    F: Future + Send + 'static,
{
    fn execute(&self, future: F) {
        let task: Task = match self.send_timeout {
            Some(timeout) => Box::pin(
                AssertUnwindSafe(Deadline::stream(future, timeout))
                    .catch_unwind()
                    .map(|ended| {
                        if let Ok(Err(e)) = ended {
                            info!("HTTP/2 stream reset: {e}");
                        }
                    }),
            ),
            None => Box::pin(AssertUnwindSafe(future).catch_unwind().map(drop)),
        };
        // Fails only once `LocalTasks` is gone: the connection was dropped.
        let _ = self.spawn.send(task);
    }
}

/// The tasks spawned on a [`LocalExecutor`].
pub struct LocalTasks {
    spawned: mpsc::UnboundedReceiver<Task>,
    running: FuturesUnordered<Task>,
}

/// An executor, and the tasks spawned on it.
pub fn new() -> (LocalExecutor, LocalTasks) {
    executor(None)
}

/// An executor for an HTTP/2 server connection: each stream given up when its client takes
/// none of its response for `send_timeout`; and the tasks spawned on it.
pub fn with_send_timeout(send_timeout: Duration) -> (LocalExecutor, LocalTasks) {
    executor(Some(send_timeout))
}

fn executor(send_timeout: Option<Duration>) -> (LocalExecutor, LocalTasks) {
    let (spawn, spawned) = mpsc::unbounded_channel();
    let tasks = LocalTasks {
        spawned,
        running: FuturesUnordered::new(),
    };
    let executor = LocalExecutor {
        spawn,
        send_timeout,
    };
    (executor, tasks)
}

impl LocalTasks {
    /// Runs `main` and the tasks spawned meanwhile, until `main` and every task have finished.
    pub async fn run(mut self, main: impl Future<Output = ()>) {
        let mut main = pin!(main);
        let mut main_done = false;
        poll_fn(|cx| {
            main_done = main_done || main.as_mut().poll(cx).is_ready();
            while let Poll::Ready(Some(task)) = self.spawned.poll_recv(cx) {
                self.running.push(task);
            }
            while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
            // `is_empty` too: the receive above stops short when the task's budget is spent.
            if main_done && self.running.is_empty() && self.spawned.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use hyper::rt::Executor;
    use tokio::sync::oneshot;

    use super::*;

    #[tokio::test]
    async fn tasks_spawned_by_main_run_to_their_end_after_main_has_ended() {
        let (executor, tasks) = new();
        let (finish, finished) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let run = tokio::spawn(tasks.run(async move {
            executor.execute(async move {
                let _ = finished.await;
                done_tx.send(()).unwrap();
            });
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!run.is_finished(), "run ended before the task it had");
        finish.send(()).unwrap();
        done.await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run ends with its last task")
            .unwrap();
    }

    #[tokio::test]
    async fn a_task_spawned_by_a_task_runs_too() {
        let (executor, tasks) = new();
        let (done_tx, done) = oneshot::channel();
        let run = tokio::spawn(tasks.run(async move {
            let inner = executor.clone();
            executor.execute(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                inner.execute(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    done_tx.send(()).unwrap();
                });
            });
        }));
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run ends with its last task")
            .unwrap();
        done.await
            .expect("the inner task ran to its end before run ended");
    }

    #[tokio::test]
    async fn a_task_that_panics_ends_alone() {
        let (executor, tasks) = new();
        let (done_tx, done) = oneshot::channel();
        let run = tokio::spawn(tasks.run(async move {
            executor.execute(async { panic!("a bug in one stream") });
            executor.execute(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                done_tx.send(()).unwrap();
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }));
        tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("run ends with its last task")
            .expect("the panic stays in its task");
        done.await.expect("the other task ran to its end");
    }

    #[tokio::test]
    async fn dropping_the_run_drops_its_tasks() {
        let (executor, tasks) = new();
        let (dropped_tx, dropped) = oneshot::channel::<()>();
        let run = tokio::spawn(tasks.run(async move {
            executor.execute(async move {
                let _held_until_dropped = dropped_tx;
                std::future::pending::<()>().await;
            });
        }));
        tokio::time::sleep(Duration::from_millis(100)).await;
        run.abort();
        let gone = tokio::time::timeout(Duration::from_secs(5), dropped).await;
        assert!(gone.expect("the task outlived its run").is_err());
    }
}
