//! Accepting client connections and serving HTTP/1.1 and HTTP/2 (prior knowledge) on them.
//!
//! Each connection runs in its own task, tracked so a stopping worker can wait for them. On
//! stop, the accept loop ends first (new connections then wait in the kernel's queue for the
//! next worker) and each connection winds down without losing a request (see
//! `serve_connection`). A connection that moves no byte for the idle timeout is closed
//! gracefully: requests in flight finish.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use core_server_proto::ipc::WorkerSettings;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error};

use crate::activity::{Activity, Tracked};
use crate::proxy::{Proxy, ProxyBody};

/// Pause after an accept error such as EMFILE, so a full descriptor table is not a busy loop.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

pub struct HttpServer {
    proxy: Arc<Proxy>,
    builder: auto::Builder<TokioExecutor>,
    idle_timeout: Duration,
    scheme: &'static str,
}

impl HttpServer {
    pub fn new(proxy: Arc<Proxy>, settings: &WorkerSettings, scheme: &'static str) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_timeout);
        builder.http2().timer(TokioTimer::new());
        HttpServer {
            proxy,
            builder,
            idle_timeout: settings.idle_timeout,
            scheme,
        }
    }

    /// Accepts until `stop`, serving each connection in a task of `tasks`.
    pub async fn serve(self, listener: TcpListener, stop: CancellationToken, tasks: TaskTracker) {
        let server = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => return,
            };
            match accepted {
                Ok((stream, client)) => {
                    tasks.spawn(
                        server
                            .clone()
                            .serve_connection(stream, client, stop.clone()),
                    );
                }
                Err(e) => {
                    error!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    }

    async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        stop: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let proxy = self.proxy.clone();
        let scheme = self.scheme;
        let service = {
            let (activity, stop) = (activity.clone(), stop.clone());
            service_fn(move |request: Request<Incoming>| {
                if request.version() == Version::HTTP_2 {
                    activity.saw_http2();
                }
                let (proxy, stop) = (proxy.clone(), stop.clone());
                async move {
                    let mut response = proxy.handle(request, client, scheme).await;
                    if stop.is_cancelled() {
                        ask_to_close(&mut response);
                    }
                    Ok::<_, Infallible>(response)
                }
            })
        };
        let io = TokioIo::new(Tracked::new(stream, activity.clone()));
        let connection = self.builder.serve_connection_with_upgrades(io, service);
        tokio::pin!(connection);

        // Runs the connection. Stopping: HTTP/2 gets GOAWAY (its clients retry elsewhere) as
        // soon as the connection is known to speak it; an HTTP/1 connection stays open, so a
        // request already on its way is answered (with `Connection: close`): closing an idle
        // HTTP/1 connection always races a client that is just sending. Idle: closed gracefully.
        let mut stopping = false;
        let mut closing = false;
        let mut check_idle_at = activity.idle_at(self.idle_timeout);
        let result = loop {
            tokio::select! {
                result = connection.as_mut() => break result,
                _ = stop.cancelled(), if !stopping => stopping = true,
                _ = activity.speaks_http2(), if stopping && !closing => {
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                }
                _ = tokio::time::sleep_until(check_idle_at), if !closing => {
                    check_idle_at = activity.idle_at(self.idle_timeout);
                    if check_idle_at <= Instant::now() {
                        debug!("connection from {client} idle for {:?}: closing", self.idle_timeout);
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
        };
        if let Err(e) = result {
            debug!("connection from {client}: {e}");
        }
    }
}

/// Marks an HTTP/1 response as the connection's last (HTTP/2 has no such header; a switch of
/// protocols keeps its `Connection: upgrade`).
fn ask_to_close(response: &mut Response<ProxyBody>) {
    if response.version() < Version::HTTP_2 && response.status() != StatusCode::SWITCHING_PROTOCOLS
    {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
}
