//! A WebSocket (any HTTP/1.1 `Upgrade`) to a tunnel domain, as RFC 8441's extended CONNECT on
//! the agent connection.
//!
//! HTTP/2 has no `Upgrade`: a new protocol is asked for with `CONNECT` and a `:protocol`
//! pseudo-header, and granted with a `200`, after which the stream carries the protocol's bytes.
//! So the browser's `GET` with `Upgrade: P` goes to the agent as `CONNECT` with `:protocol P`
//! and the request's other headers (`Sec-WebSocket-Key/-Version/-Protocol/-Extensions`,
//! cookies, `Origin`, the proxy's `X-Forwarded-*`), which the agent turns back into an HTTP/1.1
//! upgrade to its backend, passing the backend's `Sec-WebSocket-Accept` back in its `200`. The
//! worker answers the browser `101` with those headers, and splices the browser's connection
//! and the CONNECT stream as it does a local backend's (see `upgrade`: same idle timeout), the
//! lease on the agent connection held for as long. Any other answer is an ordinary response.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use core_server_proto::tunnel::APP_STATUS_HEADER;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use tokio_util::task::TaskTracker;

use crate::connection_limit::UpgradeCap;
use crate::forwarding;
use crate::proxy::BackendError;
use crate::request_body::RequestBody;
use crate::tunnel_forward::{self, Leased};
use crate::tunnels::NoAgent;
use crate::upgrade;

/// Asks an agent connection from `pick` for `protocols` (the browser's `Upgrade`, `h2c` left
/// out) on behalf of `request` (addressed by `tunnel_forward::address`). On success, the
/// response is the browser's `101`, and the splice runs in a task tracked by `tasks`, closed
/// once no byte moves either way for `idle_timeout`; otherwise, the agent's response, with the
/// lease to hold until its body ends.
pub async fn proxy<L, P, F>(
    mut request: Request<RequestBody>,
    protocols: HeaderValue,
    pick: P,
    tasks: &TaskTracker,
    idle_timeout: Duration,
) -> Result<(Response<Incoming>, Option<L>), BackendError>
where
    L: Leased,
    P: FnMut() -> F,
    F: Future<Output = Result<L, NoAgent>>,
{
    let client_side = hyper::upgrade::on(&mut request);
    // `:protocol` names one; a browser asks for one (`websocket`) anyway.
    let protocol = first(&protocols);
    let (mut parts, _body) = request.into_parts();
    let cap = parts.extensions.remove::<UpgradeCap>();
    parts.method = Method::CONNECT;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.extensions.insert(Protocol::from(protocol));
    let connect = Request::from_parts(parts, Either::Right(Empty::<Bytes>::new().boxed()));

    let (mut response, lease) = tunnel_forward::send(connect, pick).await?;
    if response.status() != StatusCode::OK {
        app_status(&mut response);
        return Ok((response, Some(lease)));
    }
    let agent_side = hyper::upgrade::on(&mut response);
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    forwarding::remove_hop_by_hop(headers);
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let protocol = HeaderValue::from_str(protocol).expect("part of a header value is one");
    headers.insert(header::UPGRADE, protocol);
    let slot = cap.map(|cap| cap.slot());
    upgrade::splice(client_side, agent_side, tasks, idle_timeout, (lease, slot));
    Ok((response, None))
}

/// Gives `response` back the 2xx its app answered the upgrade with, if the agent says so (see
/// `APP_STATUS_HEADER`).
fn app_status(response: &mut Response<Incoming>) {
    let Some(said) = response.headers_mut().remove(APP_STATUS_HEADER) else {
        return;
    };
    let status = StatusCode::from_bytes(said.as_bytes()).ok();
    if let Some(status) = status.filter(StatusCode::is_success) {
        *response.status_mut() = status;
    }
}

/// The first of a comma-separated list of protocols.
fn first(protocols: &HeaderValue) -> &str {
    let listed = protocols.to_str().unwrap_or_default();
    listed.split(',').next().unwrap_or_default().trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::tunnel_forward::tests::{agent, empty, front, full, sorted, text};

    /// What the test agent saw of the CONNECT, and its side of the stream.
    type Seen = Arc<Mutex<Option<String>>>;

    /// An agent granting a WebSocket as the real one does (a 200 with the backend's
    /// `Sec-WebSocket-Accept`), greeting, then upper-casing what it reads.
    async fn websocket_agent(
        seen: Seen,
        extended_connect: bool,
    ) -> crate::tunnel_forward::tests::TestAgent {
        agent(
            move |mut request| {
                let seen = seen.clone();
                async move {
                    let protocol = request
                        .extensions()
                        .get::<Protocol>()
                        .map(|p| p.as_str().to_owned());
                    let upgraded = hyper::upgrade::on(&mut request);
                    let (parts, body) = request.into_parts();
                    let mut lines = vec![format!(
                        "{} {} :protocol {protocol:?}",
                        parts.method, parts.uri
                    )];
                    lines.extend(sorted(&parts.headers));
                    *seen.lock().unwrap() = Some(lines.join("\n"));
                    drop(body);
                    tokio::spawn(async move {
                        let mut stream = TokioIo::new(upgraded.await.expect("CONNECT stream"));
                        stream.write_all(b"hello from the agent\n").await.unwrap();
                        let mut buf = [0; 64];
                        loop {
                            let n = stream.read(&mut buf).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            stream
                                .write_all(&buf[..n].to_ascii_uppercase())
                                .await
                                .unwrap();
                        }
                    });
                    Response::builder()
                        .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                        .header("sec-websocket-protocol", "chat")
                        .body(full(""))
                        .unwrap()
                }
            },
            extended_connect,
        )
        .await
    }

    fn websocket_request() -> Request<crate::tunnel_forward::tests::ClientBody> {
        Request::get("/chat?room=1")
            .header("host", "app.example.com")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "chat, superchat")
            .header("origin", "https://app.example.com")
            .body(empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_websocket_upgrade_becomes_an_extended_connect_spliced_both_ways() {
        let seen = Seen::default();
        let agent = websocket_agent(seen.clone(), true).await;
        let mut client = front(vec![agent.lease.clone()]).await;
        let mut response = client.send_request(websocket_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        let mut headers = response.headers().clone();
        headers.remove("date");
        assert_eq!(
            sorted(&headers),
            [
                "connection: upgrade",
                "sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                "sec-websocket-protocol: chat",
                "upgrade: websocket",
            ]
        );
        assert_eq!(
            seen.lock().unwrap().as_deref().unwrap(),
            "CONNECT https://app.example.com/chat?room=1 :protocol Some(\"websocket\")\n\
             forwarded: for=192.0.2.7;host=app.example.com;proto=https\n\
             origin: https://app.example.com\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\n\
             sec-websocket-protocol: chat, superchat\n\
             sec-websocket-version: 13\n\
             x-forwarded-for: 192.0.2.7\n\
             x-forwarded-host: app.example.com\n\
             x-forwarded-proto: https"
        );
        let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
        let mut stream = TokioIo::new(upgraded);
        let mut greeting = [0; 21];
        stream.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting, b"hello from the agent\n");
        stream.write_all(b"ping").await.unwrap();
        let mut echo = [0; 4];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"PING");
    }

    #[tokio::test]
    async fn an_agent_without_extended_connect_is_a_bad_gateway() {
        let seen = Seen::default();
        let agent = websocket_agent(seen.clone(), false).await;
        let mut client = front(vec![agent.lease.clone()]).await;
        let response = client.send_request(websocket_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        let page = text(response.into_body()).await;
        assert!(page.contains("does not support WebSockets"), "{page}");
        assert!(seen.lock().unwrap().is_none(), "nothing was sent");
    }

    #[tokio::test]
    async fn a_refused_upgrade_is_an_ordinary_response() {
        let agent = agent(
            |request| async move {
                Response::builder()
                    .status(StatusCode::FORBIDDEN)
                    .header("x-agent-saw", request.method().as_str())
                    .body(full("not for you"))
                    .unwrap()
            },
            true,
        )
        .await;
        let mut client = front(vec![agent.lease.clone()]).await;
        let response = client.send_request(websocket_request()).await.unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["x-agent-saw"], "CONNECT");
        assert!(response.headers().get("upgrade").is_none());
        assert_eq!(text(response.into_body()).await, "not for you");
    }
}
