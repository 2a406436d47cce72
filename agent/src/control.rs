//! The control stream of one tunnel connection: the long-lived `POST` [`CONTROL_PATH`] the
//! worker opens first, carrying the nonce of the `101`. Answering its head is the agent's hello
//! (the worker then starts sending requests); the request body brings the worker's lines
//! (`reconnect`: dial a replacement, as it is rerunning or stopping, or this connection nears
//! the end of its HTTP/2 stream ids), the response body takes the agent's
//! (`draining`: this agent is stopping). The worker ending its request body after a `draining`
//! means the connection is out of its balancer, so no new request can come.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use core_server_proto::tunnel::{CONTROL_PATH, DRAINING, NONCE_HEADER, RECONNECT};

use crate::connection::{boxed, AgentBody};

/// How long a draining agent waits for the worker to take the connection out of its balancer.
const RELEASE_WAIT: Duration = Duration::from_secs(1);

/// The control side of one tunnel connection.
pub(crate) struct Control {
    nonce: String,
    /// The response body's sender while the stream is open; `None` before and after.
    to_worker: Mutex<Option<Sender<Bytes>>>,
    claimed: std::sync::atomic::AtomicBool,
    reconnect: Notify,
    /// The worker ended its request body (or the stream broke).
    released: CancellationToken,
    /// The agent is done with the stream: stop reading, end the response.
    closed: CancellationToken,
    tasks: TaskTracker,
}

impl Control {
    pub fn new(nonce: String, tasks: TaskTracker) -> Arc<Control> {
        Arc::new(Control {
            nonce,
            to_worker: Mutex::new(None),
            claimed: Default::default(),
            reconnect: Notify::new(),
            released: CancellationToken::new(),
            closed: CancellationToken::new(),
            tasks,
        })
    }

    /// Whether `request` is this connection's control stream (only the worker knows the nonce,
    /// and it strips the header from clients' requests).
    pub fn is_control(&self, request: &Request<Incoming>) -> bool {
        request.method() == Method::POST
            && request.uri().path() == CONTROL_PATH
            && request
                .headers()
                .get(NONCE_HEADER)
                .is_some_and(|v| v.as_bytes() == self.nonce.as_bytes())
    }

    /// Answers the control stream at once (the hello) and reads the worker's lines.
    pub fn accept(self: &Arc<Self>, request: Request<Incoming>) -> Response<AgentBody> {
        if self.closed.is_cancelled() {
            return refusal(StatusCode::SERVICE_UNAVAILABLE, "this agent is stopping\n");
        }
        if self.claimed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return refusal(
                StatusCode::CONFLICT,
                "this connection already has a control stream\n",
            );
        }
        let (sender, body) = Channel::<Bytes, std::convert::Infallible>::new(4);
        *self.to_worker.lock().unwrap() = Some(sender);
        let control = self.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                _ = control.read_lines(request.into_body()) => {}
                _ = control.closed.cancelled() => {}
            }
            control.released.cancel();
        });
        Response::new(boxed(body))
    }

    async fn read_lines(&self, mut body: Incoming) {
        let mut pending = Vec::new();
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    pending.extend_from_slice(&data);
                    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        if line == RECONNECT {
                            self.reconnect.notify_one();
                        } else {
                            debug!(
                                "control stream: unknown line {:?}",
                                String::from_utf8_lossy(&line)
                            );
                        }
                    }
                    // A line never grows without end: the worker sends short ones only.
                    if pending.len() > 1024 {
                        pending.clear();
                    }
                }
                Some(Err(e)) => {
                    debug!("control stream broke: {e}");
                    return;
                }
                None => return,
            }
        }
    }

    /// Resolves when the worker asks this connection to be replaced (it is rerunning, or the
    /// connection nears the end of its stream ids).
    pub async fn reconnect_asked(&self) {
        self.reconnect.notified().await
    }

    /// Tells the worker that this agent stops, waits (at most [`RELEASE_WAIT`]) for it to take
    /// the connection out of its balancer, then closes the stream, which then holds nothing up.
    pub async fn drain(&self) {
        let sender = self.to_worker.lock().unwrap().take();
        if let Some(mut sender) = sender {
            if sender.send_data(Bytes::from_static(DRAINING)).await.is_ok() {
                let _ = tokio::time::timeout(RELEASE_WAIT, self.released.cancelled()).await;
            }
        }
        self.closed.cancel();
    }
}

fn refusal(status: StatusCode, text: &'static str) -> Response<AgentBody> {
    let mut response = Response::new(boxed(http_body_util::Full::new(Bytes::from_static(
        text.as_bytes(),
    ))));
    *response.status_mut() = status;
    response
}
