//! Hop-by-hop headers (RFC 9110 §7.6.1: `Connection`, the headers it names, `Keep-Alive`,
//! `Transfer-Encoding`, ...): they describe one connection, so every proxy hop (the worker,
//! and `core-agent` in front of its app) removes them in both directions.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;

/// `Trailer` is not among them: it names the trailer fields to come, end to end (RFC 9110
/// §6.6.2), and hyper's HTTP/1 encoder sends only the trailer fields it declares.
///
/// A `static`: a `const` array would be built and dropped wherever it is used, per header.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // Connection-specific by RFC 7540 §3.2.1, even when `Connection` forgets to name it.
    HeaderName::from_static("http2-settings"),
];

/// Removes the hop-by-hop headers, including every header the `Connection` header names.
/// `TE: trailers` is kept: it is end-to-end in meaning (gRPC needs it).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one look at each name is cheaper than a lookup of each.
    let any = headers
        .keys()
        .any(|name| *name == header::TE || HOP_BY_HOP.contains(name));
    if !any {
        return;
    }
    let named: Vec<HeaderName> = (headers.get_all(header::CONNECTION).iter())
        .flat_map(|value| tokens(value.as_bytes()))
        .filter_map(|name| HeaderName::from_bytes(name).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
    let te_trailers = (headers.get_all(header::TE).iter())
        .flat_map(|value| tokens(value.as_bytes()))
        .any(|token| token.eq_ignore_ascii_case(b"trailers"));
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Frames a request body for the next hop, an HTTP/1.1 app that hyper's client sends it to
/// (the client's own framing went with the hop-by-hop headers): chunked when its `length` is
/// unknown, for hyper would send none at all of a `GET`'s or a `HEAD`'s (it takes them for
/// bodiless: "if you must send a body, set the headers explicitly"), or when `Trailer`
/// declares trailers, which HTTP/1.1 carries in a chunked body only. Else hyper frames it.
///
/// A chunked body of a `GET` or a `HEAD`, most often empty (an HTTP/2 client's empty `DATA`),
/// goes with `Connection: close`: an app that reads no body there would take the chunks for
/// the start of the next request on a pooled connection.
pub fn frame_request_body(method: &Method, headers: &mut HeaderMap, length: Option<u64>) {
    if length.is_none() || headers.contains_key(header::TRAILER) {
        headers.remove(header::CONTENT_LENGTH);
        let chunked = HeaderValue::from_static("chunked");
        headers.insert(header::TRANSFER_ENCODING, chunked);
        if method == Method::GET || method == Method::HEAD {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Whether a header named `name` (in any case) is hop-by-hop by its name alone, `TE`
/// included: for a head handled as bytes (`app_exchange`, the worker's `http1_relay`), whose
/// `Connection` header names the rest.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    let is = |known: &HeaderName| name.eq_ignore_ascii_case(known.as_str().as_bytes());
    is(&header::TE) || HOP_BY_HOP.iter().any(is)
}

/// The tokens of a comma-separated list such as a `Connection` header's value, trimmed, empty
/// ones left out: for a head handled as bytes.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    (value.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// Whether the comma-separated lists in the `name` headers of `headers` include `token`
/// (case-insensitively, as `Connection: Keep-Alive, Upgrade`).
pub fn lists(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|listed| listed.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAMAAABkAAQAAP__"),
            ("proxy-authorization", "Basic x"),
            ("trailer", "x-checksum"),
            ("x-kept", "yes"),
        ] {
            h.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        remove_hop_by_hop(&mut h);
        let mut left: Vec<_> = (h.iter())
            .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
            .collect();
        left.sort();
        assert_eq!(left, ["te: trailers", "trailer: x-checksum", "x-kept: yes"]);
    }

    #[test]
    fn a_body_of_unknown_length_or_with_trailers_goes_chunked() {
        let framed_for = |method, pairs: &[(&'static str, &'static str)], length| {
            let mut h = HeaderMap::new();
            for &(name, value) in pairs {
                h.append(name, HeaderValue::from_static(value));
            }
            frame_request_body(&method, &mut h, length);
            let mut fields: Vec<_> = (h.iter())
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap()))
                .collect();
            fields.sort();
            fields
        };
        let framed = |pairs, length| framed_for(Method::POST, pairs, length);
        assert_eq!(framed(&[], None), ["transfer-encoding: chunked"]);
        assert_eq!(
            framed_for(Method::GET, &[], None),
            ["connection: close", "transfer-encoding: chunked"]
        );
        assert_eq!(
            framed_for(Method::GET, &[("content-length", "3")], Some(3)),
            ["content-length: 3"]
        );
        assert_eq!(
            framed(&[("content-length", "3")], Some(3)),
            ["content-length: 3"]
        );
        assert_eq!(
            framed(&[("content-length", "3"), ("trailer", "x-sum")], Some(3)),
            ["trailer: x-sum", "transfer-encoding: chunked"]
        );
    }
}
