//! Domain names as core-server routes them.
//!
//! A [`Domain`] is always lower case, without a trailing dot, and made of DNS labels
//! (`a-z`, `0-9`, `-`; 1 to 63 bytes; no leading or trailing hyphen; 253 bytes in all).
//! IP addresses and non-ASCII names are refused with a reason, so an operator learns at
//! `add` time, not at request time, why a name will never match. That includes every name a
//! browser reads as an IPv4 address: the WHATWG URL parser treats a host whose last label is
//! a number (`127.1`, `0x7f.1`, `2130706433`, `1.2.3.4.5`) as one, so no request ever
//! carries it as a Host.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest name DNS can carry, without the trailing dot.
const MAX_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A validated, normalised domain name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Domain(String);

/// Why a string is not a [`Domain`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("empty domain name")]
    Empty,
    #[error("domain name longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("empty label in domain name (two dots in a row?)")]
    EmptyLabel,
    #[error("label '{0}' is longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong(String),
    #[error("label '{0}' starts or ends with a hyphen")]
    Hyphen(String),
    #[error(
        "'{0}' is not allowed in a domain name (use punycode, xn--..., for international names)"
    )]
    BadChar(char),
    #[error("'{0}' is an IP address, not a domain name (browsers read a name ending in a number as one)")]
    IpAddress(String),
}

impl Domain {
    /// Validates and normalises `name`: lower case, one trailing dot dropped.
    pub fn parse(name: &str) -> Result<Domain, DomainError> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return Err(DomainError::Empty);
        }
        if name.len() > MAX_LEN {
            return Err(DomainError::TooLong);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
        {
            return Err(DomainError::BadChar(c));
        }
        if ends_in_a_number(name) {
            return Err(DomainError::IpAddress(name.to_owned()));
        }
        for label in name.split('.') {
            if label.is_empty() {
                return Err(DomainError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(DomainError::LabelTooLong(label.to_owned()));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(DomainError::Hyphen(label.to_owned()));
            }
        }
        Ok(Domain(name.to_ascii_lowercase()))
    }

    /// The domain a `Host` header (or an HTTP/2 `:authority`) names, if any: the port is
    /// dropped, case and a trailing dot do not matter. IP literals name no domain.
    pub fn from_host(host: &str) -> Option<Domain> {
        if host.starts_with('[') {
            return None; // an IPv6 literal, `[::1]:80`
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if is_port(port.as_bytes()) => name,
            Some(_) => return None,
            None => host,
        };
        Domain::parse(name).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `host`, a `Host` field (or an `:authority`), is what one may be (RFC 9110 §7.2):
/// a host, a name or an address (an IPv6 one in brackets), and an optional port, at most
/// 65535. Stricter than RFC 3986's `reg-name`, and than nginx: a name is made of letters,
/// digits and `-._~`, no `%`-escape nor sub-delimiter, so a list (`a.example, b.example`), a
/// user (`u@a.example`) or a path (`a.example/x`) is refused, not read as a domain nobody
/// registered.
pub fn is_host_field(host: &[u8]) -> bool {
    // RFC 3986's `port` may be empty.
    let port_ok = |port: &[u8]| match port.strip_prefix(b":") {
        Some(digits) => digits.is_empty() || is_port(digits),
        None => port.is_empty(),
    };
    if let Some(literal) = host.strip_prefix(b"[") {
        let ip = |&b: &u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
        return match literal.iter().position(|&b| b == b']') {
            Some(end) => end > 0 && literal[..end].iter().all(ip) && port_ok(&literal[end + 1..]),
            None => false,
        };
    }
    let (name, port) = host.split_at(host.iter().position(|&b| b == b':').unwrap_or(host.len()));
    let name_byte = |&b: &u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
    !name.is_empty() && name.iter().all(name_byte) && port_ok(port)
}

/// Whether `digits` is a port number: decimal digits alone (`u16`'s parser also takes a `+`),
/// at most 65535.
fn is_port(digits: &[u8]) -> bool {
    digits.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(digits).is_ok_and(|digits| digits.parse::<u16>().is_ok())
}

/// The WHATWG URL standard's "ends in a number" check (the trailing dot already dropped): the
/// last label is decimal digits, or `0x` and hex digits, which the host parser reads as an IPv4
/// address (the other number forms, octal included, are all digits).
fn ends_in_a_number(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    last.strip_prefix("0x")
        .or_else(|| last.strip_prefix("0X"))
        .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Deserialising validates too: a name read from disk or IPC obeys the same rules.
impl<'de> Deserialize<'de> for Domain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Domain::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        assert_eq!(
            Domain::parse("Example.COM.").unwrap().as_str(),
            "example.com"
        );
        assert_eq!(Domain::parse("localhost").unwrap().as_str(), "localhost");
        assert_eq!(
            Domain::parse("xn--bcher-kva.example").unwrap().as_str(),
            "xn--bcher-kva.example"
        );
    }

    #[test]
    fn refuses_what_dns_cannot_carry() {
        let long_label = "a".repeat(64);
        let long_name = ["abcdefghi"; 26].join(".");
        for (bad, why) in [
            ("", DomainError::Empty),
            (".", DomainError::Empty),
            ("a..b", DomainError::EmptyLabel),
            (".a", DomainError::EmptyLabel),
            ("a.b..", DomainError::EmptyLabel),
            ("-a.com", DomainError::Hyphen("-a".into())),
            ("a-.com", DomainError::Hyphen("a-".into())),
            ("a_b.com", DomainError::BadChar('_')),
            ("bücher.de", DomainError::BadChar('ü')),
            ("a b", DomainError::BadChar(' ')),
            ("127.0.0.1", DomainError::IpAddress("127.0.0.1".into())),
            ("127.0.0.1.", DomainError::IpAddress("127.0.0.1".into())),
            (
                long_label.as_str(),
                DomainError::LabelTooLong(long_label.clone()),
            ),
            (long_name.as_str(), DomainError::TooLong),
        ] {
            assert_eq!(Domain::parse(bad), Err(why), "{bad:?}");
        }
    }

    #[test]
    fn refuses_what_browsers_read_as_an_ipv4_address() {
        for ip in [
            "127.1",
            "0x7f.1",
            "2130706433",
            "0x7f000001",
            "0177.0.0.1",
            "1.2.3.4.5",
            "example.0x",
            "example.0XfF",
            "example.08",
        ] {
            assert_eq!(
                Domain::parse(ip),
                Err(DomainError::IpAddress(ip.into())),
                "{ip}"
            );
        }
        for name in [
            "1.example",
            "example.1a",
            "0x7f.com",
            "example.0xg",
            "x0.1x",
        ] {
            assert!(Domain::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn host_header_port_and_case_ignored() {
        let want = Domain::parse("example.com").unwrap();
        for host in [
            "example.com",
            "EXAMPLE.com:8080",
            "example.com.",
            "Example.Com.:80",
        ] {
            assert_eq!(Domain::from_host(host), Some(want.clone()), "{host}");
        }
        for host in [
            "[::1]:80",
            "127.0.0.1:80",
            "example.com:http",
            "example.com:",
            "example.com:65536",
            "",
            "exa mple.com",
        ] {
            assert_eq!(Domain::from_host(host), None, "{host}");
        }
    }

    #[test]
    fn a_host_field_is_a_name_or_address_and_an_optional_port() {
        for host in [
            "example.com",
            "Example.COM.:8080",
            "example.com:",
            "a_b~c.example",
            "127.0.0.1:80",
            "a.example:65535",
            "[::1]",
            "[2001:db8::1]:443",
            "[::ffff:192.0.2.1]",
        ] {
            assert!(is_host_field(host.as_bytes()), "{host}");
        }
        for host in [
            "",
            ":80",
            "a.example, b.example",
            "u@a.example",
            "u:p@a.example",
            "a.example/x",
            "a .example",
            "a.example:abc",
            "a.example:80:81",
            "a.example:65536",
            "a.example:+80",
            "a%2eexample",
            "[]",
            "[::1",
            "[::1]x",
            "[::1]:x",
            "[v1.x]",
        ] {
            assert!(!is_host_field(host.as_bytes()), "{host}");
        }
    }

    #[test]
    fn deserialising_validates() {
        assert!(serde_json::from_str::<Domain>("\"Ok.Example\"").is_ok());
        assert!(serde_json::from_str::<Domain>("\"not ok\"").is_err());
    }
}
