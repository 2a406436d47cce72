//! The headers a reverse proxy rewrites on the way through.
//!
//! Hop-by-hop headers (see [`core_server_proto::hop_by_hop`]) are removed in both directions.
//!
//! core-server is the edge: nothing in front of it can vouch for a client's claim about where a
//! request came from. Every header that frameworks read for the client's address, scheme, host,
//! port or path prefix is removed from requests (see [`CLIENT_CLAIMS`]), and core-server sets its
//! own `X-Forwarded-For`, `-Proto`, `-Host` and `Forwarded` (RFC 7239), replacing rather than
//! appending, so a backend can trust them (as Caddy does by default).
//!
//! An HTTP/2 client may send its cookies in one `Cookie` field per pair (RFC 9113 §8.2.3);
//! the app, which speaks HTTP/1.1, gets them in one field, as that section asks (and nginx
//! does): many servers read only the first `Cookie` line.

use std::io::Write as _;
use std::net::IpAddr;

use core_server_proto::app_exchange::push_field;
pub use core_server_proto::hop_by_hop::{frame_request_body, lists, remove_hop_by_hop};
use core_server_proto::tunnel;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Request headers through which a client claims to be someone or somewhere else, besides every
/// `X-Forwarded-*` (`-For`, `-Proto`, `-Host`, `-Port`, `-Ssl`, `-Prefix`, `-Scheme`, `-Server`,
/// ...: Express, Rails/Rack, Django, Spring, ASP.NET Core, Werkzeug's ProxyFix and Tomcat's
/// RemoteIpValve read one or more of them). These are the ones that the same frameworks, and
/// common middleware such as `request-ip`, read for the client's address or scheme when set by a
/// CDN or load balancer in front; none of those sits in front of core-server, so a client that
/// sends one is lying. Headers that rewrite the path (`X-Original-URL`) are not forwarding
/// claims and pass, as through nginx. Then `Proxy`, which CGI-style apps read as `HTTP_PROXY`,
/// the variable their own HTTP clients take a proxy from (httpoxy, CVE-2016-5385). Last, the
/// tunnel nonce: an agent takes the request that carries it for the worker's control stream,
/// never a client's. (A `static`, as `hop_by_hop`'s list: a `const` array would be built and
/// dropped at each use.)
static CLIENT_CLAIMS: [HeaderName; 12] = [
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-client-ip"),
    HeaderName::from_static("client-ip"),
    HeaderName::from_static("true-client-ip"),
    HeaderName::from_static("cf-connecting-ip"),
    HeaderName::from_static("fastly-client-ip"),
    HeaderName::from_static("x-cluster-client-ip"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("proxy"),
    HeaderName::from_static(tunnel::NONCE_HEADER),
];

/// Joins the `Cookie` fields of `headers`, if more than one, into one, `; `-separated.
pub fn join_cookies(headers: &mut HeaderMap) {
    let cookies = headers.get_all(header::COOKIE);
    if cookies.iter().nth(1).is_none() {
        return;
    }
    let pairs: Vec<&[u8]> = cookies.iter().map(HeaderValue::as_bytes).collect();
    let joined = HeaderValue::from_bytes(&pairs.join(&b"; "[..]))
        .expect("header values joined by `; ` are a header value");
    headers.insert(header::COOKIE, joined);
}

/// Replaces whatever the client said about where its request came from with what core-server
/// knows: a request from `client` for `host` over `proto` (`"http"` or `"https"`).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    host: &HeaderValue,
    proto: &'static str,
) {
    remove_client_claims(headers);
    let client = ClientAddress::new(client);
    let mut forwarded = Vec::with_capacity(64);
    push_forwarded(&mut forwarded, &client, host.as_bytes(), proto);
    let forwarded = HeaderValue::try_from(forwarded)
        .expect("quoted visible characters make a valid header value");
    let for_value =
        HeaderValue::from_bytes(client.text()).expect("an IP address is a valid header value");
    headers.insert(X_FORWARDED_FOR, for_value);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    headers.insert(X_FORWARDED_HOST, host.clone());
    headers.insert(header::FORWARDED, forwarded);
}

/// The same four headers as [`set_forwarded`], as lines of a head written as bytes (see
/// `http1_relay`), whose other fields went through [`is_client_claim`]. Written in place, with
/// no value built apart (an allocation per request saved is worth it here).
pub fn write_forwarded(head: &mut Vec<u8>, client: IpAddr, host: &[u8], proto: &'static str) {
    let client = ClientAddress::new(client);
    push_field(head, X_FORWARDED_FOR.as_str().as_bytes(), client.text());
    push_field(
        head,
        X_FORWARDED_PROTO.as_str().as_bytes(),
        proto.as_bytes(),
    );
    push_field(head, X_FORWARDED_HOST.as_str().as_bytes(), host);
    head.extend_from_slice(header::FORWARDED.as_str().as_bytes());
    head.extend_from_slice(b": ");
    push_forwarded(head, &client, host, proto);
    head.extend_from_slice(b"\r\n");
}

/// A client's address (an IPv4-mapped IPv6 one as IPv4), as text, made once per request for
/// the two fields that carry it, without `fmt`: its per-octet calls were a third of the
/// copies the worker makes per plain-HTTP request.
struct ClientAddress {
    address: IpAddr,
    text: [u8; 39],
    len: usize,
}

impl ClientAddress {
    fn new(client: IpAddr) -> ClientAddress {
        let address = client.to_canonical();
        let mut text = [0; 39];
        let len = match address {
            IpAddr::V4(v4) => {
                let mut len = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text[len] = b'.';
                        len += 1;
                    }
                    len += write_decimal(&mut text[len..], octet);
                }
                len
            }
            // Rarer: `fmt`, into the array (39 bytes: eight groups of four hex digits).
            IpAddr::V6(v6) => {
                let mut rest = &mut text[..];
                write!(rest, "{v6}").expect("an IPv6 address is at most 39 characters");
                39 - rest.len()
            }
        };
        ClientAddress { address, text, len }
    }

    fn text(&self) -> &[u8] {
        &self.text[..self.len]
    }
}

/// Writes `n` in decimal at the start of `out`; how many digits it took.
fn write_decimal(out: &mut [u8], n: u8) -> usize {
    let digits = [n / 100, n / 10 % 10, n % 10];
    let skip = match n {
        100.. => 0,
        10.. => 1,
        _ => 2,
    };
    for (slot, digit) in out.iter_mut().zip(&digits[skip..]) {
        *slot = b'0' + digit;
    }
    3 - skip
}

/// Whether a header named `name` is one through which a client claims to be someone or
/// somewhere else: any `X-Forwarded-*`, or one of [`CLIENT_CLAIMS`], in any case and with `_`
/// for any `-`. CGI and the interfaces made after it (WSGI, Rack, PHP) name a field by its name
/// with `-` as `_`, so to an app there `X_Forwarded_For` is `X-Forwarded-For`: it would read
/// the client's claim joined to core-server's (nginx drops every field with a `_` for this).
pub fn is_client_claim(name: &[u8]) -> bool {
    let prefix = b"x-forwarded-";
    name.get(..prefix.len())
        .is_some_and(|start| names_alike(start, prefix))
        || CLIENT_CLAIMS
            .iter()
            .any(|claim| names_alike(name, claim.as_str().as_bytes()))
}

/// Whether `name` is `known` (lowercase) as a CGI-style app sees it: in any case, `_` for `-`.
fn names_alike(name: &[u8], known: &[u8]) -> bool {
    name.len() == known.len()
        && (name.iter().zip(known))
            .all(|(&n, &k)| n.to_ascii_lowercase() == k || (n, k) == (b'_', b'-'))
}

/// Removes every header through which a client claims to be someone or somewhere else (every
/// `X-Forwarded-*` and [`CLIENT_CLAIMS`]): from a request's head, and from its trailers (see
/// `request_body`), which pass end to end.
pub fn remove_client_claims(headers: &mut HeaderMap) {
    // Most requests carry none: one look at each name, and the map is changed only if needed.
    let claims: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_client_claim(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in &claims {
        headers.remove(name);
    }
}

/// Appends `for=192.0.2.1;host=example.com;proto=http`, `Forwarded`'s value (RFC 7239 §4) for
/// a request from `client`. An IPv6 address is bracketed and so quoted
/// (`for="[2001:db8::1]"`, §6); any value that is not a plain token (a host with a `:port`) is
/// quoted too.
fn push_forwarded(out: &mut Vec<u8>, client: &ClientAddress, host: &[u8], proto: &str) {
    match client.address {
        IpAddr::V4(_) => {
            out.extend_from_slice(b"for=");
            out.extend_from_slice(client.text());
        }
        IpAddr::V6(_) => {
            out.extend_from_slice(b"for=\"[");
            out.extend_from_slice(client.text());
            out.extend_from_slice(b"]\"");
        }
    }
    out.extend_from_slice(b";host=");
    push_token_or_quoted(out, host);
    out.extend_from_slice(b";proto=");
    push_token_or_quoted(out, proto.as_bytes());
}

/// Appends `raw` as an RFC 9110 token if it is one, else as a quoted-string (`"` and `\`
/// escaped; bytes that a quoted-string cannot hold are dropped, though a Host that reached
/// here has none).
fn push_token_or_quoted(out: &mut Vec<u8>, raw: &[u8]) {
    if !raw.is_empty() && raw.iter().all(|&b| is_tchar(b)) {
        out.extend_from_slice(raw);
        return;
    }
    out.push(b'"');
    for &b in raw {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            b'\t' | b' '..=b'~' => out.push(b),
            _ => {}
        }
    }
    out.push(b'"');
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel_forward::tests::sorted;

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
    fn cookie_fields_are_joined_into_one() {
        let mut split = headers(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2; c=3")]);
        join_cookies(&mut split);
        let cookies: Vec<_> = split.get_all(header::COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; c=3"]);
        let mut one = headers(&[("cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(one, headers(&[("cookie", "a=1")]));
    }

    #[test]
    fn forwarding_claims_are_replaced_not_appended_to() {
        let mut h = headers(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
            ("x-forwarded-ssl", "on"),
            ("x-forwarded-prefix", "/admin"),
            ("forwarded", "for=6.6.6.6;proto=https"),
            ("x-real-ip", "6.6.6.6"),
            ("true-client-ip", "6.6.6.6"),
            (
                "core-server-tunnel-nonce",
                "0123456789abcdef0123456789abcdef",
            ),
            // What a CGI-style app reads as the same fields.
            ("x_forwarded_for", "6.6.6.6"),
            ("x-forwarded_proto", "https"),
            ("x_real_ip", "6.6.6.6"),
            ("true_client-ip", "6.6.6.6"),
            ("proxy", "http://6.6.6.6:8080"),
            ("x-kept", "yes"),
            ("x_kept", "yes"),
        ]);
        let host = HeaderValue::from_static("Example.com:8080");
        set_forwarded(&mut h, "::ffff:10.1.2.3".parse().unwrap(), &host, "http");
        assert_eq!(
            sorted(&h),
            [
                "forwarded: for=10.1.2.3;host=\"Example.com:8080\";proto=http",
                "x-forwarded-for: 10.1.2.3",
                "x-forwarded-host: Example.com:8080",
                "x-forwarded-proto: http",
                "x-kept: yes",
                "x_kept: yes",
            ]
        );
    }

    #[test]
    fn the_head_written_as_bytes_gets_the_same_fields() {
        for client in ["::ffff:10.1.2.3", "2001:db8::1"] {
            let (client, host) = (client.parse().unwrap(), "Example.com:8080");
            let mut map = HeaderMap::new();
            set_forwarded(&mut map, client, &HeaderValue::from_static(host), "https");
            let mut bytes = Vec::new();
            write_forwarded(&mut bytes, client, host.as_bytes(), "https");
            let text = String::from_utf8(bytes).unwrap();
            let mut written: Vec<_> = text.lines().map(String::from).collect();
            written.sort();
            assert_eq!(written, sorted(&map));
        }
    }

    #[test]
    fn a_client_address_is_written_as_its_display_says() {
        let mut addresses: Vec<IpAddr> = (0..=255u8)
            .map(|n| std::net::Ipv4Addr::new(n, 255 - n, n / 3, 7).into())
            .collect();
        addresses.extend(
            [
                "0.0.0.0",
                "::ffff:10.1.2.3",
                "::1",
                "2001:db8::1",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ]
            .map(|a| a.parse::<IpAddr>().unwrap()),
        );
        for address in addresses {
            let text = ClientAddress::new(address);
            let expected = address.to_canonical().to_string();
            assert_eq!(std::str::from_utf8(text.text()), Ok(&expected[..]));
        }
    }

    #[test]
    fn forwarded_quotes_ipv6_and_what_is_not_a_token() {
        let forwarded = |client: &str, host: &[u8], proto| {
            let mut value = Vec::new();
            let client = ClientAddress::new(client.parse().unwrap());
            push_forwarded(&mut value, &client, host, proto);
            String::from_utf8(value).unwrap()
        };
        let value = forwarded("2001:db8::1", b"example.com", "https");
        assert_eq!(value, "for=\"[2001:db8::1]\";host=example.com;proto=https");
        let value = forwarded("192.0.2.1", b"a\"b\\c d", "http");
        assert_eq!(value, "for=192.0.2.1;host=\"a\\\"b\\\\c d\";proto=http");
    }
}
