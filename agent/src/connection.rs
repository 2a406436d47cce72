//! One reversed tunnel connection: the agent serves HTTP/2 on the connection it dialed. The
//! control stream goes to [`crate::control`], every other request to the user's service. On
//! shutdown the connection drains: `draining` on the control stream, then GOAWAY, then the
//! requests in flight finish.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use core_server_proto::logging::describe;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http2;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::control::Control;
use crate::dial::Tunnel;
use crate::shutdown::Shutdown;

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every response body the agent sends: the user's, whatever its type, or the control stream's.
pub(crate) type AgentBody = UnsyncBoxBody<Bytes, BoxError>;

/// `body` as an [`AgentBody`]. `copy_to_bytes` costs nothing for the usual `Bytes` chunks.
pub(crate) fn boxed<B>(body: B) -> AgentBody
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    IntoBytes { body }.boxed_unsync()
}

pin_project_lite::pin_project! {
    /// A body whose chunks are made `Bytes`, as http-body-util's `map_frame` would, but whose
    /// size hint is kept (`map_frame` drops it): hyper's HTTP/2 server sets `Content-Length`
    /// from it, and without one the worker sends an HTTP/1.1 client the body chunked.
    struct IntoBytes<B> {
        #[pin]
        body: B,
    }
}

impl<B> Body for IntoBytes<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(self.project().body.poll_frame(cx));
        Poll::Ready(frame.map(|frame| match frame {
            Ok(frame) => Ok(frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))),
            Err(e) => Err(e.into()),
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The largest request head (HTTP/2's measure of a header list: each field counts 32 bytes
/// more) the agent takes: one the worker took from an HTTP/1.1 client (hyper's server reads a
/// head of up to 408 KiB, 100 fields) with the worker's own fields. With 64 KiB, a 63 KB head
/// an app on a local port is given was answered 431 by the agent's HTTP/2 layer, unlogged.
const MAX_HEADER_LIST_SIZE: u32 = 512 << 10;

/// The HTTP/2 server settings of a tunnel connection but its streams' window, which [`start`]
/// sizes for the connection's round trip (`Tunnel::stream_window`, as the worker does). What a
/// response may queue beyond the worker's window is 512 KiB: what a download whose client does
/// not read holds here, with the read from the app (4 MiB made an outside tester's 1,024
/// stalled downloads take 1.8 GB). Frames are large (256 KiB, hyper's default 16 KiB): fewer
/// per megabyte. The connection's window is no bound (1 GiB): a bound shared by all streams
/// would let a few stalled uploads stall every other stream. Streams are capped by
/// `max_streams` requests, not hyper's default of 200, and one more: the worker's control
/// stream, open for as long as the connection. The PINGs notice a proxy that went silent (no
/// FIN) within 3 + 5 s. The worker is the only peer, and what it sends is its clients' doing:
/// so a request head may be as large as the worker takes ([`MAX_HEADER_LIST_SIZE`]), and the
/// streams it cancels before the agent has taken them may be many at once. h2 ends a connection
/// past 20 such (its defence against the "rapid reset" attack, CVE-2023-44487): clients
/// cancelling requests in bursts, which the worker passes on, made the agent drop its connection
/// and other clients' requests with it (an outside tester; `tests/tunnel_resets.rs`). Here it
/// is 4 connections' worth of streams, and at least 4,096 (a stream cancelled frees its place
/// for the next at once, so a small `max_streams` does not bound such bursts): still a bound on
/// what such streams hold (each its headers), and far above the bursts seen.
pub(crate) fn http2_builder(max_streams: u32) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_streams.saturating_add(1))
        .enable_connect_protocol()
        .initial_connection_window_size(1 << 30)
        .max_frame_size(256 << 10)
        .max_send_buf_size(512 << 10)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_pending_accept_reset_streams((4 * (max_streams as usize + 1)).max(4096))
        .keep_alive_interval(Duration::from_secs(3))
        .keep_alive_timeout(Duration::from_secs(5));
    builder
}

/// A connection being served.
pub(crate) struct Running {
    pub control: Arc<Control>,
    /// Ends with the connection, saying how.
    pub ended: JoinHandle<String>,
}

/// Serves `tunnel` with `service` in a task of `shutdown`'s, until the worker closes it, it
/// breaks, or the agent stops (then it drains first).
pub(crate) fn start<S, B>(
    tunnel: Tunnel,
    service: S,
    builder: &http2::Builder<TokioExecutor>,
    shutdown: &Shutdown,
    name: String,
) -> Running
where
    S: Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = builder.clone();
    builder.initial_stream_window_size(tunnel.stream_window());
    let control = Control::new(tunnel.nonce, shutdown.tasks.clone());
    let router = Router {
        service,
        control: control.clone(),
    };
    let connection = builder.serve_connection(tunnel.io, router);
    let (stop, force) = (shutdown.stop.clone(), shutdown.force.clone());
    let drain_control = control.clone();
    let ended = shutdown.tasks.spawn(async move {
        tokio::pin!(connection);
        let result = tokio::select! {
            result = connection.as_mut() => result,
            _ = stop.cancelled() => {
                // Serving on meanwhile: `draining`, and the worker's release (at most 1 s)...
                tokio::select! {
                    result = connection.as_mut() => result,
                    _ = drain_control.drain() => {
                        // ...then GOAWAY, and the streams in flight finish (or the grace ends).
                        connection.as_mut().graceful_shutdown();
                        tokio::select! {
                            result = connection.as_mut() => result,
                            _ = force.cancelled() => {
                                warn!("{name}: requests still in flight at the end of the grace period were cut");
                                return "cut".to_owned();
                            }
                        }
                    }
                }
            }
        };
        let why = match result {
            Ok(()) => "closed".to_owned(),
            // With its cause: hyper's own text for a missed PING is a bare "http2 error".
            Err(e) => format!("lost: {}", describe(&e)),
        };
        if stop.is_cancelled() {
            info!("{name} drained ({why})");
        }
        why
    });
    Running { control, ended }
}

/// Sends the control stream to [`Control`], the rest to the user's service.
struct Router<S> {
    service: S,
    control: Arc<Control>,
}

type RouterFuture = Pin<Box<dyn Future<Output = Result<Response<AgentBody>, BoxError>> + Send>>;

impl<S, B> Service<Request<Incoming>> for Router<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<AgentBody>;
    type Error = BoxError;
    type Future = RouterFuture;

    fn call(&self, request: Request<Incoming>) -> RouterFuture {
        if self.control.is_control(&request) {
            let response = self.control.accept(request);
            return Box::pin(async move { Ok(response) });
        }
        let response = self.service.call(request);
        Box::pin(async move { Ok(response.await.map_err(Into::into)?.map(boxed)) })
    }
}
