//! A tunnel's control stream: the long-lived `POST` [`CONTROL_PATH`] the worker opens first on a
//! reversed connection (see `core_server_proto::tunnel`). Its request body carries the worker's
//! lines to the agent (`reconnect`), its response body the agent's to the worker (`draining`);
//! its response head is the agent's hello.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use core_server_proto::domain::Domain;
use core_server_proto::tunnel::{CONTROL_PATH, DRAINING, NONCE_HEADER};
use http::{Method, Request, StatusCode};
use http_body_util::channel::{Channel, Sender};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;

use crate::tunnels::TunnelBody;

/// How long an agent has to answer the control stream's request (its hello).
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest line the agent may send; longer ones are skipped.
const MAX_LINE: usize = 256;

/// Why a control stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the agent did not answer the control stream within {HELLO_TIMEOUT:?}")]
    NoHello,
    #[error("the agent answered the control stream with {0}")]
    Status(StatusCode),
    #[error("the control stream failed")]
    Http(#[from] hyper::Error),
}

/// How the agent's side of the control stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentSaid {
    /// `draining`: it is stopping, and takes no new request.
    Draining,
    /// The stream ended (or broke) without a word.
    Ended,
}

/// Opens the control stream and waits for the agent's hello. Returns the worker's end of the
/// stream (dropping it ends the request body) and the agent's lines.
pub async fn open(
    send: &mut SendRequest<TunnelBody>,
    domain: &Domain,
    nonce: &str,
) -> Result<(Sender<Bytes>, Incoming), ControlError> {
    // A line or two at most are ever sent: room for one is plenty.
    let (lines, body) = Channel::new(1);
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("https://{domain}{CONTROL_PATH}"))
        .header(NONCE_HEADER, nonce)
        .body(Either::Right(body.boxed()))
        .expect("a valid domain and nonce make a valid request");
    let response = tokio::time::timeout(HELLO_TIMEOUT, send.send_request(request))
        .await
        .map_err(|_| ControlError::NoHello)??;
    if response.status() != StatusCode::OK {
        return Err(ControlError::Status(response.status()));
    }
    Ok((lines, response.into_body()))
}

/// Reads the agent's lines until it says it is draining, or the stream ends.
pub async fn agent_said(mut body: Incoming) -> AgentSaid {
    let mut line = BytesMut::new();
    // Within a line too long to be one we know, until its end.
    let mut skipping = false;
    while let Some(Ok(frame)) = body.frame().await {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        for &byte in data.iter() {
            if !skipping {
                line.extend_from_slice(&[byte]);
            }
            if byte == b'\n' {
                if !skipping && &line[..] == DRAINING {
                    return AgentSaid::Draining;
                }
                line.clear();
                skipping = false;
            } else if line.len() > MAX_LINE {
                line.clear();
                skipping = true;
            }
        }
    }
    AgentSaid::Ended
}
