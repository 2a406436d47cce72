//! HTTP/1.1 `Upgrade` (WebSocket) passed through to the backend.
//!
//! The request goes to the backend on a connection of its own (an upgraded connection never
//! returns to the pool), in origin form (`GET /ws/chat?room=1`) as every other request. If the
//! backend switches protocols, the client's and the backend's upgraded connections are spliced,
//! bytes copied both ways until either side closes, or until no byte has moved either way for
//! the idle timeout (the proxy passes `backend_timeout`, 60 s by default, as nginx's
//! `proxy_read_timeout` closes a quiet WebSocket; WebSocket libraries ping every 20 to 30 s, so a
//! live socket is never quiet that long).
//!
//! A tunnel domain's upgrades go to its agent instead (see `tunnel_upgrade`), spliced the same way.
//!
//! `Upgrade: h2c` is never passed on: core-server speaks HTTP/2 to clients itself, and a
//! backend switching the client's connection to cleartext HTTP/2 behind the proxy's back would
//! escape every rule the proxy applies per request (hosts, headers, deadlines).

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::connection_limit::UpgradeCap;
use crate::forwarding::lists;
use crate::proxy::BackendError;
use crate::quiet_splice;
use crate::request_body::RequestBody;

/// The protocols an HTTP/1.1 upgrade request asks for, `h2c` left out; `None` if that leaves
/// nothing (then the request is an ordinary one, its `Upgrade` header removed with the other
/// hop-by-hop headers).
pub fn requested_protocol<B>(request: &Request<B>) -> Option<HeaderValue> {
    let connection_says_upgrade = lists(request.headers(), header::CONNECTION, "upgrade");
    if request.version() != Version::HTTP_11 || !connection_says_upgrade {
        return None;
    }
    let protocols: Vec<&str> = request
        .headers()
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty() && !is_h2c(p))
        .collect();
    if protocols.is_empty() {
        return None;
    }
    HeaderValue::try_from(protocols.join(", ")).ok()
}

/// `h2c`, or `h2c/<version>` (RFC 9110 §7.8 `protocol-name/protocol-version`).
fn is_h2c(protocol: &str) -> bool {
    let name = protocol.split('/').next().unwrap_or_default();
    name.eq_ignore_ascii_case("h2c")
}

/// Sends `request` (hop-by-hop headers already removed, URI in origin form) to `backend` asking
/// for `protocol`. On `101 Switching Protocols`, splices the two connections in a task tracked
/// by `tasks`, closed once no byte moves either way for `idle_timeout`.
pub async fn proxy(
    mut request: Request<RequestBody>,
    protocol: HeaderValue,
    backend: SocketAddr,
    tasks: &TaskTracker,
    idle_timeout: Duration,
) -> Result<Response<Incoming>, BackendError> {
    let client_side = hyper::upgrade::on(&mut request);
    let cap = request.extensions_mut().remove::<UpgradeCap>();
    request
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    request.headers_mut().insert(header::UPGRADE, protocol);

    let stream = TcpStream::connect(backend)
        .await
        .map_err(BackendError::Connect)?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tasks.spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!("upgrade connection to {backend}: {e}");
        }
    });
    let mut response = sender.send_request(request).await?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let backend_side = hyper::upgrade::on(&mut response);
        let slot = cap.map(|cap| cap.slot());
        splice(client_side, backend_side, tasks, idle_timeout, slot);
    }
    Ok(response)
}

/// Once the client's and the upstream's connections have both switched protocols, splices them
/// in a task tracked by `tasks`, closed once no byte moves either way for `idle_timeout`.
/// `hold` (the client connection's [`UpgradeSlot`](crate::connection_limit::UpgradeSlot); through a tunnel, with the lease on its
/// agent connection) lives as long as the splice.
pub fn splice<H: Send + 'static>(
    client_side: OnUpgrade,
    upstream_side: OnUpgrade,
    tasks: &TaskTracker,
    idle_timeout: Duration,
    hold: H,
) {
    tasks.spawn(async move {
        if let (Ok(client), Ok(upstream)) = tokio::join!(client_side, upstream_side) {
            quiet_splice::splice(TokioIo::new(client), TokioIo::new(upstream), idle_timeout).await;
        }
        drop(hold);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_request(upgrade: &str) -> Request<()> {
        Request::get("/")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", upgrade)
            .body(())
            .unwrap()
    }

    #[test]
    fn h2c_is_never_an_upgrade() {
        assert_eq!(requested_protocol(&upgrade_request("h2c")), None);
        assert_eq!(requested_protocol(&upgrade_request("H2C/1.0")), None);
        assert_eq!(
            requested_protocol(&upgrade_request("h2c, websocket")).unwrap(),
            "websocket"
        );
        assert_eq!(
            requested_protocol(&upgrade_request("websocket")).unwrap(),
            "websocket"
        );
    }
}
