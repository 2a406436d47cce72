//! HTTP/1.1 `Upgrade` (WebSocket) passed through to the backend.
//!
//! The request goes to the backend on a connection of its own (an upgraded connection never
//! returns to the pool). If the backend switches protocols, the client's and the backend's
//! upgraded connections are spliced, bytes copied both ways until either side closes.

use std::net::SocketAddr;

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::proxy::BackendError;

/// The protocol a request asks to upgrade to, if it is an HTTP/1.1 upgrade request.
pub fn requested_protocol(request: &Request<Incoming>) -> Option<HeaderValue> {
    let connection_says_upgrade = request
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if request.version() != Version::HTTP_11 || !connection_says_upgrade {
        return None;
    }
    request.headers().get(header::UPGRADE).cloned()
}

/// Sends `request` (hop-by-hop headers already removed) to `backend` asking for `protocol`.
/// On `101 Switching Protocols`, splices the two connections in a task tracked by `tasks`.
pub async fn proxy(
    mut request: Request<Incoming>,
    protocol: HeaderValue,
    backend: SocketAddr,
    tasks: &TaskTracker,
) -> Result<Response<Incoming>, BackendError> {
    let client_side = hyper::upgrade::on(&mut request);
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
        tasks.spawn(async move {
            let (Ok(client), Ok(backend)) = tokio::join!(client_side, backend_side) else {
                return;
            };
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                debug!("upgraded connection ended: {e}");
            }
        });
    }
    Ok(response)
}
