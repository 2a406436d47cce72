//! The headers a reverse proxy rewrites on the way through.
//!
//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection`, the headers it names, `Keep-Alive`,
//! `Transfer-Encoding`, ...) describe one connection and are removed in both directions.
//! core-server is the edge: `X-Forwarded-For`, `-Proto` and `-Host` from clients are replaced,
//! not appended to, so a backend can trust them (as Caddy does by default).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, including every header the `Connection` header names.
/// `TE: trailers` is kept: it is end-to-end in meaning (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let te_trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Sets the `X-Forwarded-*` headers for a request from `client` for `host` over `proto`.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: &HeaderValue,
    proto: &'static str,
) {
    let client = HeaderValue::try_from(client.to_canonical().to_string())
        .expect("an IP address is a valid header value");
    headers.insert(X_FORWARDED_FOR, client);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_HOST, host.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = h
            .iter()
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        left.sort();
        assert_eq!(left, ["te: trailers", "x-kept: yes"]);
    }

    #[test]
    fn forwarded_headers_replace_what_the_client_sent() {
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
        ]);
        let host = HeaderValue::from_static("Example.com:8080");
        set_forwarded(&mut h, "::ffff:10.1.2.3".parse().unwrap(), &host, "http");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "Example.com:8080");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    }
}
