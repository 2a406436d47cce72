//! The agent's connections: `--connections` slots, each keeping one tunnel connection up
//! forever: dial, serve until the connection ends, back off, dial again. When the worker asks
//! for a replacement (`reconnect`: it is rerunning, or the connection nears the end of its
//! HTTP/2 stream ids), the slot dials at once and leaves the old connection to finish its
//! requests on its own until the worker closes it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper_util::rt::TokioExecutor;
use tracing::{error, info, warn};

use crate::backoff::{Backoff, STABLE_AFTER};
use crate::config::Settings;
use crate::connection::{self, BoxError};
use crate::dial::{dial, Tunnel};
use crate::shutdown::Shutdown;

/// What every slot shares.
pub(crate) struct Pool<S> {
    pub settings: Settings,
    pub service: S,
    pub builder: http2::Builder<TokioExecutor>,
    pub shutdown: Shutdown,
}

impl<S, B> Pool<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Starts every slot in the shutdown's tasks.
    pub fn start(self: Arc<Self>) {
        for slot in 1..=self.settings.connections {
            let pool = self.clone();
            self.shutdown
                .tasks
                .spawn(async move { pool.slot(slot).await });
        }
    }

    async fn slot(&self, slot: usize) {
        let Settings {
            domain,
            connect,
            connections,
            ..
        } = &self.settings;
        let name = format!("tunnel for {domain}, connection {slot} of {connections}");
        let stop = &self.shutdown.stop;
        let mut backoff = Backoff::default();
        loop {
            let dialed = tokio::select! {
                dialed = dial(&self.settings) => dialed,
                _ = stop.cancelled() => return,
            };
            let delay = match dialed {
                Ok(_) if stop.is_cancelled() => return,
                Ok(tunnel) => {
                    if self.settings.tls.is_none() {
                        warn!("WARNING: {name} is plaintext: the token and every request cross the network unencrypted");
                    }
                    info!(
                        "tunnel for {domain} connected to {} (connection {slot} of {connections}; round trip {:.1?}: a stream's window is {} KiB)",
                        tunnel.peer,
                        tunnel.round_trip,
                        tunnel.stream_window() >> 10
                    );
                    match self.serve(tunnel, &name).await {
                        Ended::Replaced => {
                            backoff.reset();
                            continue;
                        }
                        Ended::Stopped => return,
                        // The proxy may close a connection: a warning, where a failed dial
                        // (the agent is not serving) is an error.
                        Ended::Closed { lived, why } => {
                            if lived >= STABLE_AFTER {
                                backoff.reset();
                            }
                            let delay = backoff.next_delay();
                            warn!("{name} {why}; reconnecting in {}", shown(delay));
                            delay
                        }
                    }
                }
                Err(e) => {
                    let delay = backoff
                        .next_delay()
                        .max(e.retry_after().unwrap_or_default());
                    error!(
                        "{name}: dialing {connect} failed: {e}; retrying in {}",
                        shown(delay)
                    );
                    delay
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Serves `tunnel` until it ends, the proxy asks for a replacement (the connection then
    /// goes on alone until the proxy closes it), or the agent stops (it then drains alone).
    async fn serve(&self, tunnel: Tunnel, name: &str) -> Ended {
        let since = Instant::now();
        let mut running = connection::start(
            tunnel,
            self.service.clone(),
            &self.builder,
            &self.shutdown,
            name.to_owned(),
        );
        tokio::select! {
            ended = &mut running.ended => Ended::Closed {
                lived: since.elapsed(),
                why: ended.unwrap_or_else(|e| format!("failed: {e}")),
            },
            _ = running.control.reconnect_asked() => {
                info!("{name}: the proxy asked for a replacement (it is stopping, or this connection nears the end of its HTTP/2 stream ids): dialing one");
                Ended::Replaced
            }
            _ = self.shutdown.stop.cancelled() => Ended::Stopped,
        }
    }
}

/// How a slot's connection stopped being its own.
enum Ended {
    Replaced,
    Stopped,
    Closed { lived: Duration, why: String },
}

/// `delay` to the millisecond, for people.
fn shown(delay: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64))
}
