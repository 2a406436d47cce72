//! An HTTP/1.1 request head as the fast path takes it (see `http1_fast_path`): parsed with
//! `httparse` (hyper's own parser) into offsets of the bytes it was read from, so that a
//! request relayed as bytes (see `http1_relay`) is never copied into a `HeaderMap`, and one
//! answered by the proxy shares those bytes for its URI and header values.
//!
//! What it does not take (a body, an upgrade, `Expect`, `TE`, HTTP/1.0, an absolute-form or
//! `*` target, CONNECT, a malformed head, a head not whole within [`MAX_HEAD`]) is
//! [`ForHyper`]: hyper serves the connection from there on, and answers it.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use core_server_proto::hop_by_hop;
use core_server_proto::http1_body::is_field_text;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri};

use crate::proxy::ClientRequest;

/// How much of a head the fast path reads before it gives up on it: a head not whole by then
/// (big cookies) goes to hyper, which takes up to about 400 KiB.
pub const MAX_HEAD: usize = 16 * 1024;

/// Header fields the fast path takes in one head; more go to hyper (which takes 100).
const MAX_HEADERS: usize = 64;

/// A request the fast path leaves to hyper: a body, an upgrade, HTTP/1.0 or HTTP/2, a
/// malformed head ...
pub struct ForHyper;

/// A request head without a body, taken out of the bytes a client sent.
pub struct RequestHead {
    /// The head's bytes, which the fields are offsets into.
    bytes: Bytes,
    method: Method,
    path: PathAndQuery,
    fields: [Field; MAX_HEADERS],
    count: usize,
    /// Whether the client asked to close after this request (`Connection: close`).
    close: bool,
}

/// A header field: the offsets of its name and of its value (a head is shorter than
/// [`MAX_HEAD`], so `u16` holds them and the head stays small).
#[derive(Clone, Copy, Default)]
struct Field {
    name: (u16, u16),
    value: (u16, u16),
}

/// A parsed head's parts, before its bytes are split off the buffer.
struct Taken {
    method: Method,
    path: (u16, u16),
    fields: [Field; MAX_HEADERS],
    close: bool,
}

impl RequestHead {
    /// Takes the first request's head out of `buffer` if it is whole (`None`: not yet); hyper's
    /// if the fast path does not take it, or if it is not whole within [`MAX_HEAD`].
    pub fn parse(buffer: &mut BytesMut) -> Result<Option<RequestHead>, ForHyper> {
        if buffer.is_empty() {
            return Ok(None);
        }
        // Left uninitialised, as hyper leaves them: filling 64 slots per request cost about as
        // much as the parsing (measured with perf).
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut []);
        let length = match parsed.parse_with_uninit_headers(buffer, &mut headers) {
            Ok(httparse::Status::Complete(length)) if length <= MAX_HEAD => length,
            Ok(httparse::Status::Complete(_)) => return Err(ForHyper),
            Ok(httparse::Status::Partial) if buffer.len() >= MAX_HEAD => return Err(ForHyper),
            Ok(httparse::Status::Partial) => return Ok(None),
            // hyper answers what it makes of it (400, 431, HTTP/2's preface ...).
            Err(_) => return Err(ForHyper),
        };
        let Taken {
            method,
            path,
            fields,
            close,
        } = Self::taken(&parsed, buffer).ok_or(ForHyper)?;
        let count = parsed.headers.len();
        let bytes = buffer.split_to(length).freeze();
        let Ok(path) =
            PathAndQuery::from_maybe_shared(bytes.slice(usize::from(path.0)..usize::from(path.1)))
        else {
            // Not what `http` takes as a path: hyper gets it all back, and answers.
            let mut whole = BytesMut::from(&bytes[..]);
            whole.extend_from_slice(buffer);
            *buffer = whole;
            return Err(ForHyper);
        };
        Ok(Some(RequestHead {
            bytes,
            method,
            path,
            fields,
            count,
            close,
        }))
    }

    /// What of `parsed` (read from `buffer`) the head keeps, if the fast path takes it.
    fn taken(parsed: &httparse::Request<'_, '_>, buffer: &[u8]) -> Option<Taken> {
        // Within MAX_HEAD, so within u16.
        let at = |part: &[u8]| {
            let from = part.as_ptr() as usize - buffer.as_ptr() as usize;
            debug_assert!(from + part.len() <= MAX_HEAD);
            (from as u16, (from + part.len()) as u16)
        };
        if parsed.version != Some(1) {
            return None; // HTTP/1.0: hyper knows its keep-alive rules
        }
        let path = parsed.path?;
        // An absolute-form or asterisk-form target, or CONNECT: rare, and hyper's.
        if !path.starts_with('/') {
            return None;
        }
        let method = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
        if method == Method::CONNECT {
            return None;
        }
        let mut fields = [Field::default(); MAX_HEADERS];
        let mut close = false;
        for (field, header) in fields.iter_mut().zip(parsed.headers.iter()) {
            let name = header.name.as_bytes();
            let is = |wanted: &str| name.eq_ignore_ascii_case(wanted.as_bytes());
            if is("content-length") {
                if header.value != b"0" {
                    return None; // a body
                }
            } else if is("transfer-encoding")
                || is("expect")
                || is("upgrade")
                || is("te")
                || is("http2-settings")
            {
                return None;
            } else if is("connection") {
                for token in hop_by_hop::tokens(header.value) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    }
                }
            }
            if !is_field_text(header.value) {
                return None;
            }
            *field = Field {
                name: at(name),
                value: at(header.value),
            };
        }
        Some(Taken {
            method,
            path: at(path.as_bytes()),
            fields,
            close,
        })
    }

    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The target, in origin form (`/path?query`).
    pub fn path(&self) -> &PathAndQuery {
        &self.path
    }

    /// Whether the client asked to close the connection after this request.
    pub fn close(&self) -> bool {
        self.close
    }

    /// The header fields, names as the client wrote them, in its order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let slice = |(from, to): (u16, u16)| &self.bytes[usize::from(from)..usize::from(to)];
        (self.fields[..self.count].iter()).map(move |field| (slice(field.name), slice(field.value)))
    }

    /// The `Host` header's value if there is exactly one.
    pub fn host(&self) -> Option<&[u8]> {
        let mut hosts = (self.fields()).filter(|(name, _)| name.eq_ignore_ascii_case(b"host"));
        let host = hosts.next()?;
        hosts.next().is_none().then_some(host.1)
    }

    /// The request, its header values sharing the head's bytes; `None` if `http` refuses a
    /// header name that httparse took (none: see the test below).
    pub fn into_request(self) -> Option<ClientRequest> {
        let slice = |(from, to): (u16, u16)| self.bytes.slice(usize::from(from)..usize::from(to));
        // With room for the four forwarding fields `Proxy::prepare` sets: no second allocation.
        let mut headers = HeaderMap::with_capacity(self.count + 4);
        for field in &self.fields[..self.count] {
            let name = HeaderName::from_bytes(&slice(field.name)).ok()?;
            let value = HeaderValue::from_maybe_shared(slice(field.value)).ok()?;
            headers.append(name, value);
        }
        let mut request = Request::new(None);
        *request.method_mut() = self.method;
        *request.uri_mut() = Uri::from(self.path);
        *request.headers_mut() = headers;
        Some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `into_request` relies on: httparse and `http` take the same header names.
    #[test]
    fn httparse_and_http_take_the_same_header_name_bytes() {
        // A colon ends the name, in any parser.
        for byte in (0..=u8::MAX).filter(|&b| b != b':') {
            let name = [b'x', byte];
            let head = [b"GET / HTTP/1.1\r\n", &name[..], b": v\r\n\r\n"].concat();
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let by_httparse = httparse::Request::new(&mut headers).parse(&head).is_ok();
            let by_http = HeaderName::from_bytes(&name).is_ok();
            assert_eq!(by_httparse, by_http, "byte {byte:#x}");
        }
    }

    #[test]
    fn a_head_is_taken_with_its_fields_in_order_and_what_follows_stays() {
        let mut buffer = BytesMut::from(
            &b"GET /a?b HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nconnection: keep-alive, close\r\n\r\nGET /next"[..],
        );
        let head = RequestHead::parse(&mut buffer).ok().unwrap().unwrap();
        assert_eq!(buffer, &b"GET /next"[..]);
        assert_eq!(head.path(), "/a?b");
        assert!(head.close());
        assert_eq!(head.host(), Some(&b"x"[..]));
        let fields: Vec<_> = head.fields().collect();
        assert_eq!(fields[1], (&b"X-A"[..], &b"1"[..]));
        let request = head.into_request().unwrap();
        assert_eq!(request.headers()["x-a"], "1");
        assert_eq!(request.uri(), "/a?b");
    }

    #[test]
    fn two_hosts_are_no_host() {
        let mut buffer = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: x\r\nhost: y\r\n\r\n"[..]);
        let head = RequestHead::parse(&mut buffer).ok().unwrap().unwrap();
        assert_eq!(head.host(), None);
    }
}
