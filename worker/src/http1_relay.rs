//! A request without a body, for an app on a local port, relayed as bytes: the fast path's
//! answer to most requests (see `http1_fast_path`). The client's head is rewritten straight
//! into the app's (no `http::Request`, no `HeaderMap`), written to a plain pooled TCP
//! connection, and the app's response head is parsed with `httparse` and rewritten straight
//! into the client's, its body passed on as it comes. A bodiless request hyper's server took
//! (HTTP/2, and HTTP/1.1 connections the fast path handed over) is relayed by the same
//! exchange, its answer read into an `http::Response` (`core_server_proto::relayed_body`); the
//! proxy's other requests (bodies, upgrades, tunnels) go through hyper's client (see `proxy`,
//! `backend_pool`).
//!
//! Why: hyper's client costs more CPU per request than the relaying itself (a dispatch channel
//! and a response oneshot per request, two `HeaderMap`s built and walked, large futures
//! moved), and a proxy's user time is also the time its peers sleep and must be woken.
//!
//! What hyper's client and the proxy did that this does too, and must keep doing (besides what
//! `app_exchange` says of the exchange itself):
//! - the app gets what `proxy` sends through hyper: hop-by-hop headers and the client's
//!   claims about its origin removed (see `forwarding`), core-server's `X-Forwarded-*` and
//!   `Forwarded` set, HTTP/1.1, the `Host` the client named (its `:authority`, else its one
//!   `Host`);
//! - the client gets the response framed as `http1_response` frames hyper's answers: hop-by-hop
//!   headers removed, the app's reason phrase, `Content-Length` when known, else chunked, no
//!   trailers, a `Date` unless given, `Connection: close` when closing;
//! - deadlines (`backend_timeout`): to connect and get the response head, and for each stall
//!   of the body (which is then cut short); errors before the response head give the proxy's
//!   error pages (502, 504);
//! - a client gone while the response is awaited ends the exchange and closes the app's
//!   connection, as hyper drops it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use core_server_proto::app_exchange::{self, push_field, read_some, ConnectionTokens};
use core_server_proto::app_exchange::{start_request, AppConnections, AppResponse, BodyReads};
use core_server_proto::hop_by_hop::{is_hop_by_hop, tokens};
use core_server_proto::http1_body::{Body, BodyError, Decoder, Piece};
use core_server_proto::relayed_body::{self, RelayedBody};
use http::header::{HeaderName, COOKIE, HOST, TE};
use http::{Method, Response};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::warn;

use crate::backend_pool::{BackendPool, PortConnections};
use crate::forwarding;
use crate::http1_fast_path::Closing;
use crate::http1_response::{end_head, framing, ClientConnection, Outgoing};
use crate::http1_response::{WriteError, Written};
use crate::proxy::{BackendError, Failure};

/// A bodiless request (`method` for `path` and `query`, with the fields `fields` yields, for
/// `host`, from `client` over `scheme`) as the app gets it, as bytes: HTTP/1.1 in origin form,
/// `host` as its `Host`, hop-by-hop headers (but `TE: trailers`) and the client's claims
/// removed, its cookies in one field, core-server's forwarding headers added.
///
/// Every bodiless request for an app on a local port comes here, the fast path's heads and
/// those hyper's server took; `Proxy::prepare` applies the same rules to the `HeaderMap` of the
/// others (bodies, upgrades, tunnels). A rule added to one belongs in the other (the test
/// `the_bytes_and_the_header_map_rules_agree` compares them).
pub fn request<'a, I>(
    method: &Method,
    (path, query): (&str, Option<&str>),
    fields: impl Fn() -> I,
    host: &[u8],
    client: IpAddr,
    scheme: &'static str,
) -> Vec<u8>
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let is = |name: &[u8], known: &HeaderName| name.eq_ignore_ascii_case(known.as_str().as_bytes());
    let named = ConnectionTokens::of(fields());
    let passes = |name: &[u8]| {
        let dropped = is(name, &HOST) || is_hop_by_hop(name) || named.lists(name);
        !dropped && !forwarding::is_client_claim(name)
    };
    let (mut cookies, mut te_trailers) = (0, false);
    for (name, value) in fields() {
        cookies += usize::from(is(name, &COOKIE) && passes(name));
        te_trailers |= is(name, &TE)
            && !named.lists(name)
            && tokens(value).any(|token| token.eq_ignore_ascii_case(b"trailers"));
    }
    let mut out = start_request(method, path, query);
    push_field(&mut out, b"host", host);
    for (name, value) in fields() {
        if passes(name) && !(cookies > 1 && is(name, &COOKIE)) {
            push_field(&mut out, name, value);
        }
    }
    if te_trailers {
        push_field(&mut out, b"te", b"trailers");
    }
    if cookies > 1 {
        // RFC 9113 §8.2.3: an HTTP/2 client may split them; the app reads one line.
        let values = fields().filter(|&(name, _)| is(name, &COOKIE) && passes(name));
        out.extend_from_slice(b"cookie:");
        for (i, (_, value)) in values.enumerate() {
            out.extend_from_slice(if i == 0 { &b" "[..] } else { b"; " });
            out.extend_from_slice(value);
        }
        out.extend_from_slice(b"\r\n");
    }
    forwarding::write_forwarded(&mut out, client, host, scheme);
    out.extend_from_slice(b"\r\n");
    out
}

/// One request's way to the app on a local port.
pub struct Relay<'a> {
    pub pool: &'a Arc<BackendPool>,
    pub port: u16,
    /// `backend_timeout`.
    pub timeout: Duration,
}

impl<'a> Relay<'a> {
    /// The plain connections to the app, for one exchange.
    fn connections(&self) -> PortConnections<&'a BackendPool> {
        PortConnections {
            pool: self.pool,
            port: self.port,
        }
    }

    /// Sends `request` (see [`request`]; a `HEAD` if `to_head`; sent again on
    /// a new connection if `idempotent` and its idle one turns out closed) and returns the
    /// app's response head, with a body that reads the rest.
    pub async fn fetch(
        &self,
        request: &[u8],
        to_head: bool,
        idempotent: bool,
    ) -> Result<Response<RelayedBody<PortConnections<Arc<BackendPool>>>>, BackendError> {
        let connections = PortConnections {
            pool: self.pool.clone(),
            port: self.port,
        };
        relayed_body::fetch(connections, request, to_head, idempotent).await
    }

    /// Sends `request` (see [`request`]; a `HEAD` if `to_head`; sent again on a new connection
    /// if `idempotent` and its idle one turns out closed) and relays the answer to `client`.
    /// `Ok(None)`: the client went away before the response head came. `Err`: the app gave no
    /// response head, and the client has had nothing yet.
    pub async fn exchange<C: ClientConnection + Send>(
        &self,
        request: Vec<u8>,
        to_head: bool,
        idempotent: bool,
        client: &mut C,
        closing: &Closing<'_>,
    ) -> Result<Option<Result<Written, WriteError>>, Failure> {
        let by = Instant::now() + self.timeout;
        let connections = self.connections();
        let send = app_exchange::send::<Vec<u8>, _>(&connections, &request, to_head, idempotent);
        let answered = tokio::select! {
            biased;
            answered = tokio::time::timeout_at(by, send) => answered,
            () = client.gone() => return Ok(None),
        };
        drop(request); // not held for as long as the body takes (an event stream)
        let (mut backend, mut buffer, response) = match answered {
            Ok(answered) => answered.map_err(Failure::Backend)?,
            Err(_) => return Err(Failure::NoResponse),
        };
        let AppResponse {
            mut head,
            date,
            body,
            keep_alive,
        } = response;
        let close = closing.now();
        end_head(&mut head, &framing(body), close, !date);
        let sent = self.relay_body(&mut backend, &mut buffer, body, head, client);
        let reusable = match sent.await {
            Ok(reusable) => reusable,
            Err(e) => return Ok(Some(Err(e))),
        };
        if keep_alive && reusable {
            connections.put(backend);
        }
        Ok(Some(Ok(if close {
            Written::Close
        } else {
            Written::KeepAlive
        })))
    }

    /// Writes `head` and the body to `client` as it comes from `backend` (what of it was read
    /// already is in `buffer`); whether the connection can carry another request.
    async fn relay_body<C: ClientConnection + Send>(
        &self,
        backend: &mut TcpStream,
        buffer: &mut BytesMut,
        body: Body,
        head: Vec<u8>,
        client: &mut C,
    ) -> Result<bool, WriteError> {
        let mut outgoing = Outgoing::new(head, framing(body));
        let mut decoder = Decoder::new(body);
        let mut reads = BodyReads::default();
        // The client gets a cut response; the app's doing is logged (as nginx's "upstream
        // prematurely closed connection").
        let port = self.port;
        let app_broke = |e: BodyError| {
            warn!("backend 127.0.0.1:{port}: {e}");
            WriteError::from(e)
        };
        loop {
            match decoder.next(buffer).map_err(app_broke)? {
                Some(Piece::Data(data)) => outgoing.piece(client, &data).await?,
                // None come: `Decoder::new` drops them (the fast path's client asked for none).
                Some(Piece::Trailers(_)) => {}
                Some(Piece::End) => {
                    outgoing.end(client).await?;
                    // Bytes after the body: the app is not to be trusted with another request.
                    return Ok(buffer.is_empty());
                }
                None => {
                    outgoing.head_now(client).await?;
                    let read = self
                        .read_body(backend, buffer, reads.size(), client)
                        .await?;
                    reads.took(read);
                    if read == 0 {
                        decoder.closed().map_err(app_broke)?;
                        outgoing.end(client).await?;
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Reads up to `size` more bytes of the body into `buffer`, for as long as the app keeps
    /// sending within the timeout and the client stays.
    async fn read_body<C: ClientConnection + Send>(
        &self,
        backend: &mut TcpStream,
        buffer: &mut BytesMut,
        size: usize,
        client: &mut C,
    ) -> Result<usize, WriteError> {
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(self.timeout, read_some(backend, buffer, size)) => read,
            () = client.gone() => return Err(WriteError::ClientGone),
        };
        match read {
            Ok(Ok(n)) => Ok(n),
            Ok(Err(e)) => {
                let e = WriteError::Body(format!("reading from the app: {e}"));
                warn!("backend 127.0.0.1:{}: {e}", self.port);
                Err(e)
            }
            Err(_) => {
                let (port, timeout) = (self.port, self.timeout);
                warn!("backend 127.0.0.1:{port} sent no byte of its response body for {timeout:?}: cutting the response");
                Err(WriteError::Body(format!(
                    "the app sent no byte of its response body for {timeout:?}"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request_head::RequestHead;

    /// What the app gets for `GET /p?q` with `fields` (name, value), for `a.example`.
    fn sent<'a, I: Iterator<Item = (&'a [u8], &'a [u8])>>(fields: impl Fn() -> I) -> String {
        let client = "::ffff:192.0.2.1".parse().unwrap();
        let sent = request(
            &Method::GET,
            ("/p", Some("q")),
            fields,
            b"a.example",
            client,
            "https",
        );
        String::from_utf8_lossy(&sent).into_owned()
    }

    #[test]
    fn the_app_gets_no_hop_by_hop_field_nor_claim_and_core_servers_forwarding() {
        let mut buffer = BytesMut::from(
            "GET /p?q HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, X-Private, host\r\n\
             X-Private: s\r\nX-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nKeep-Alive: 5\r\n\
             Proxy-Authorization: x\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n",
        );
        let head = RequestHead::parse(&mut buffer).ok().unwrap().unwrap();
        assert_eq!(
            sent(|| head.fields()),
            "GET /p?q HTTP/1.1\r\nhost: a.example\r\nAccept: */*\r\nContent-Length: 0\r\n\
             x-forwarded-for: 192.0.2.1\r\nx-forwarded-proto: https\r\n\
             x-forwarded-host: a.example\r\nforwarded: for=192.0.2.1;host=a.example;proto=https\r\n\r\n"
        );
    }

    /// The head written as bytes and a `HeaderMap` under `Proxy::prepare`'s rules (and
    /// `to_port`'s `Host`) give the app the same fields, in cases that tell rules apart.
    #[test]
    fn the_bytes_and_the_header_map_rules_agree() {
        let cases: [&[(&str, &[u8])]; 8] = [
            &[
                ("host", b"A.example:80"),
                ("connection", b"close, x-gone"),
                ("x-gone", b"1"),
                ("te", b"gzip, trailers"),
                ("cookie", b"a=1"),
                ("x-kept", b"1"),
                ("cookie", b"b=2; c=3"),
                ("forwarded", b"for=6.6.6.6"),
                ("upgrade", b"h2c"),
                ("x-forwarded-host", b"evil"),
            ],
            &[("connection", b"te"), ("te", b"trailers")],
            &[
                ("connection", b"cookie"),
                ("cookie", b"a=1"),
                ("cookie", b"b=2"),
            ],
            &[("connection", b"host"), ("host", b"a.example")],
            &[
                ("connection", b"x-real-ip, keep-alive"),
                ("x-real-ip", b"1"),
            ],
            &[("te", b"gzip"), ("te", b"trailers")],
            &[
                ("connection", b"x-a, \xe9"),
                ("x-a", b"1"),
                ("x-b", b"\xe9"),
            ],
            &[
                ("x_forwarded_for", b"6.6.6.6"),
                ("x_real_ip", b"6.6.6.6"),
                ("x_kept", b"1"),
            ],
        ];
        for fields in cases {
            let sent = sent(|| fields.iter().map(|&(name, value)| (name.as_bytes(), value)));
            let mut lines: Vec<_> = sent.lines().skip(1).filter(|l| !l.is_empty()).collect();
            lines.sort();

            let mut map = http::HeaderMap::new();
            for &(name, value) in fields {
                let value = http::HeaderValue::from_bytes(value).unwrap();
                map.append(HeaderName::from_static(name), value);
            }
            forwarding::remove_hop_by_hop(&mut map);
            forwarding::join_cookies(&mut map);
            let host = http::HeaderValue::from_static("a.example");
            forwarding::set_forwarded(&mut map, "192.0.2.1".parse().unwrap(), &host, "https");
            map.insert(HOST, host);
            let mut expected: Vec<_> = (map.iter())
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(v.as_bytes())))
                .collect();
            expected.sort();
            assert_eq!(lines, expected, "{fields:?}");
        }
        let cookies: [(&[u8], &[u8]); 2] = [(b"cookie", b"a=1"), (b"cookie", b"b=2")];
        let joined = sent(|| cookies.into_iter());
        assert!(joined.contains("\r\ncookie: a=1; b=2\r\n"), "{joined}");
    }
}
