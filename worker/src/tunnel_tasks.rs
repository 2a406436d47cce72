//! The tasks hyper's HTTP/2 client starts for a tunnel connection (the connection's I/O, each
//! request's wait for its response, each request body's upload), run inside the tunnel
//! connection's own task rather than as tasks of their own.
//!
//! Why: as tasks of their own, each request through a tunnel went through four of them (the
//! client's, hyper's dispatch, the connection's I/O, and one spawned for its response), and
//! every hand-over between two was a trip through the scheduler, with more than one runtime
//! thread often the wake-up of a sleeping thread. Here hyper's tasks are polled by the tunnel
//! connection's task, where they are woken from: a request's hand-overs are between the
//! client's task and this one.
//!
//! They run until every one of them has finished, as spawned tasks would: a connection that
//! left softly finishes the requests it carries before it closes. Killing a connection drops
//! them all at once (the caller stops polling [`LocalTasks::run`]), which closes its socket and
//! fails its streams.
//!
//! What sharing one task means: the streams of one tunnel share its thread and tokio's
//! cooperative budget (those of other tunnels do not), and a panic in any of them ends the
//! whole tunnel connection, whose agent then reconnects, where it used to end one request.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where hyper's client spawns; what it spawns runs in [`LocalTasks::run`].
#[derive(Clone)]
pub struct LocalExecutor {
    spawn: mpsc::UnboundedSender<Task>,
}

impl<F> hyper::rt::Executor<F> for LocalExecutor
where
    F: Future + Send + 'static,
{
    fn execute(&self, future: F) {
        // Fails only once `LocalTasks` is gone: the connection was killed.
        let _ = self.spawn.send(Box::pin(async move {
            future.await;
        }));
    }
}

/// The tasks spawned on a [`LocalExecutor`].
pub struct LocalTasks {
    spawned: mpsc::UnboundedReceiver<Task>,
    running: FuturesUnordered<Task>,
}

/// An executor, and the tasks spawned on it.
pub fn new() -> (LocalExecutor, LocalTasks) {
    let (spawn, spawned) = mpsc::unbounded_channel();
    let tasks = LocalTasks {
        spawned,
        running: FuturesUnordered::new(),
    };
    (LocalExecutor { spawn }, tasks)
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
