//! An app's HTTP/1.1 response body, taken out of the bytes read from its connection as they
//! come (see `app_exchange`): delimited by its length, chunked (decoded: chunk extensions are
//! dropped, and trailers too unless kept for a client that takes them), or by the end of the
//! connection (RFC 9112 §6.3, §7.1).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;

use crate::hop_by_hop::is_hop_by_hop;

/// The longest line of a chunked body (a chunk's size and extensions, or a trailer field).
const MAX_CHUNK_LINE: usize = 16 * 1024;

/// The most bytes of trailer field lines kept, and the most fields (hyper's client takes as
/// many of each).
const MAX_TRAILERS: usize = 16 * 1024;
const MAX_TRAILER_FIELDS: usize = 100;

/// How an app's response body is delimited (RFC 9112 §6.3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Why a body could not be taken whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the response body ended after {sent} of its {length} bytes")]
    Short { sent: u64, length: u64 },
    #[error("the response body broke off: {0}")]
    Broken(String),
}

/// Whether `bytes` are what `http` takes in a header value: no control byte but tab (httparse
/// lets DEL through).
pub fn is_field_text(bytes: &[u8]) -> bool {
    !bytes.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f)
}

/// Takes a body's pieces out of what is read of the app's connection.
pub struct Decoder {
    body: Body,
    /// Of a body of known length, what has not come yet.
    left: u64,
    chunks: Chunks,
    /// Whether a chunked body's trailer fields are kept, and those so far (boxed: most
    /// bodies have none, and a body's size is in every future that holds one).
    keep_trailers: bool,
    trailers: Option<Box<HeaderMap>>,
    ended: bool,
}

impl Decoder {
    /// A decoder that drops a chunked body's trailers.
    pub fn new(body: Body) -> Self {
        let left = match body {
            Body::Length(length) => length,
            _ => 0,
        };
        Decoder {
            body,
            left,
            chunks: Chunks::Size,
            keep_trailers: false,
            trailers: None,
            ended: false,
        }
    }

    /// A decoder that passes a chunked body's trailers on ([`Piece::Trailers`]).
    pub fn keeping_trailers(body: Body) -> Self {
        Decoder {
            keep_trailers: true,
            ..Decoder::new(body)
        }
    }

    /// Whether the body has ended: [`Piece::End`] or [`Piece::Trailers`] was taken, or there
    /// was no body.
    pub fn ended(&self) -> bool {
        self.ended
            || self.body == Body::None
            || (matches!(self.body, Body::Length(_)) && self.left == 0)
    }

    /// Of a body of known length, what has not come yet.
    pub fn left(&self) -> Option<u64> {
        matches!(self.body, Body::Length(_) | Body::None).then_some(self.left)
    }

    /// The next piece of the body from `buffer` (taken out of it); `None` if more bytes are
    /// needed first (or, for a body that ends with the connection, that end).
    pub fn next(&mut self, buffer: &mut BytesMut) -> Result<Option<Piece>, BodyError> {
        let piece = self.piece(buffer);
        // Trailers are the last piece: a reader may stop at them, as hyper does.
        self.ended |= matches!(piece, Ok(Some(Piece::End | Piece::Trailers(_))));
        piece
    }

    fn piece(&mut self, buffer: &mut BytesMut) -> Result<Option<Piece>, BodyError> {
        match self.body {
            Body::None => Ok(Some(Piece::End)),
            Body::Length(_) if self.left == 0 => Ok(Some(Piece::End)),
            Body::Length(_) | Body::UntilClose if buffer.is_empty() => Ok(None),
            Body::Length(_) => {
                let data = buffer
                    .split_to(buffer.len().min(self.left as usize))
                    .freeze();
                self.left -= data.len() as u64;
                Ok(Some(Piece::Data(data)))
            }
            Body::UntilClose => Ok(Some(Piece::Data(buffer.split().freeze()))),
            Body::Chunked => {
                let trailers = self.keep_trailers.then_some(&mut self.trailers);
                self.chunks.next(buffer, trailers)
            }
        }
    }

    /// The app closed its connection before the body's end: whether that is its end (a body
    /// delimited by it), or an error (the client must see the body cut short).
    pub fn closed(&self) -> Result<(), BodyError> {
        match self.body {
            Body::None | Body::UntilClose => Ok(()),
            Body::Length(length) => Err(BodyError::Short {
                sent: length - self.left,
                length,
            }),
            Body::Chunked => Err(BodyError::Broken("the app closed mid-chunk".into())),
        }
    }
}

/// A piece of a body, decoded.
#[derive(Debug, PartialEq)]
pub enum Piece {
    Data(Bytes),
    /// A chunked body's trailer fields, if kept and any came: the last piece before its end.
    Trailers(HeaderMap),
    /// The body is whole (of a chunked one, the last chunk and the trailers are through).
    End,
}

/// Where a chunked body's decoder is (RFC 9112 §7.1).
#[derive(Debug)]
enum Chunks {
    /// At a chunk's size line.
    Size,
    /// Within a chunk's data, with this much of it left.
    Data(u64),
    /// At the line end after a chunk's data.
    DataEnd,
    /// After the last chunk, at a trailer field or the blank line that ends the body, with
    /// this many bytes of trailer fields kept so far.
    Trailers(usize),
    /// After the trailers, passed on.
    Done,
}

impl Chunks {
    /// The next piece of the body from `buffer` (taken out of it); `None` if more bytes are
    /// needed first. Trailer fields go into `trailers` if they are kept.
    fn next(
        &mut self,
        buffer: &mut BytesMut,
        mut trailers: Option<&mut Option<Box<HeaderMap>>>,
    ) -> Result<Option<Piece>, BodyError> {
        let broken =
            |why: &str| BodyError::Broken(format!("the app's chunked body is malformed: {why}"));
        loop {
            match self {
                Chunks::Size => {
                    let Some(line) = take_line(buffer)? else {
                        return Ok(None);
                    };
                    // Extensions are ignored, as by hyper, but must be visible text.
                    if !is_field_text(&line) {
                        return Err(broken("a control byte in a chunk's size line"));
                    }
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let digits = digits.trim_ascii_end(); // spaces and tabs, as checked above
                    let size =
                        parse_chunk_size(digits).ok_or_else(|| broken("a bad chunk size"))?;
                    *self = if size == 0 {
                        Chunks::Trailers(0)
                    } else {
                        Chunks::Data(size)
                    };
                }
                Chunks::Data(left) => {
                    if buffer.is_empty() {
                        return Ok(None);
                    }
                    let data = buffer.split_to(buffer.len().min(*left as usize)).freeze();
                    *left -= data.len() as u64;
                    if *left == 0 {
                        *self = Chunks::DataEnd;
                    }
                    return Ok(Some(Piece::Data(data)));
                }
                Chunks::DataEnd => {
                    if buffer.len() < 2 {
                        return Ok(None);
                    }
                    if &buffer[..2] != b"\r\n" {
                        return Err(broken("no line end after a chunk"));
                    }
                    buffer.advance(2);
                    *self = Chunks::Size;
                }
                Chunks::Trailers(kept) => {
                    let Some(line) = take_line(buffer)? else {
                        return Ok(None);
                    };
                    if line.is_empty() {
                        *self = Chunks::Done;
                        let fields = trailers.and_then(Option::take).filter(|t| !t.is_empty());
                        return Ok(Some(match fields {
                            Some(fields) => Piece::Trailers(*fields),
                            None => Piece::End,
                        }));
                    }
                    if let Some(fields) = trailers.as_mut() {
                        let fields = fields.get_or_insert_with(Box::default);
                        *kept += line.len();
                        if *kept > MAX_TRAILERS || fields.len() >= MAX_TRAILER_FIELDS {
                            return Err(broken("more trailer fields than 100 or 16 KiB"));
                        }
                        let (name, value) = trailer_field(&line)
                            .ok_or_else(|| broken("a malformed trailer field"))?;
                        // A hop's own fields are not passed on (HTTP/2 refuses them).
                        if !is_hop_by_hop(name.as_str().as_bytes()) {
                            fields.append(name, value);
                        }
                    }
                }
                Chunks::Done => return Ok(Some(Piece::End)),
            }
        }
    }
}

/// A trailer field's line, `name: value` (RFC 9112 §5, §7.1.2).
fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
    Some((name, value))
}

/// A chunk's size: hexadecimal digits, of a value below 2^60.
fn parse_chunk_size(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let start = digits
        .iter()
        .position(|&b| b != b'0')
        .unwrap_or(digits.len());
    let significant = std::str::from_utf8(&digits[start..]).ok()?;
    match significant.len() {
        0 => Some(0),
        1..=15 => u64::from_str_radix(significant, 16).ok(),
        _ => None,
    }
}

/// The next `\r\n`-ended line of `buffer` (taken out, without its end); `None` if not whole
/// yet.
fn take_line(buffer: &mut BytesMut) -> Result<Option<Bytes>, BodyError> {
    match buffer.windows(2).position(|pair| pair == b"\r\n") {
        Some(at) => {
            let line = buffer.split_to(at).freeze();
            buffer.advance(2);
            Ok(Some(line))
        }
        None if buffer.len() > MAX_CHUNK_LINE => Err(BodyError::Broken(format!(
            "the app's chunked body has a line longer than {MAX_CHUNK_LINE} bytes"
        ))),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `body` fed to a chunked decoder `step` bytes at a time: the data, and whether it ended.
    fn decoded(body: &str, step: usize) -> Result<(String, bool), String> {
        let (mut chunks, mut buffer) = (Chunks::Size, BytesMut::new());
        let mut data = String::new();
        for piece in body.as_bytes().chunks(step) {
            buffer.extend_from_slice(piece);
            loop {
                match chunks.next(&mut buffer, None).map_err(|e| e.to_string())? {
                    Some(Piece::Data(bytes)) => data.push_str(std::str::from_utf8(&bytes).unwrap()),
                    Some(Piece::End) => return Ok((data, buffer.is_empty())),
                    Some(Piece::Trailers(_)) => unreachable!("trailers are not kept here"),
                    None => break,
                }
            }
        }
        Ok((data, false))
    }

    #[test]
    fn chunks_decode_whatever_the_reads_with_extensions_and_trailers() {
        let body =
            "3;name=value\r\nabc\r\n00000000000000000A \r\n0123456789\r\n0\r\nX-Sum: 13\r\n\r\n";
        for step in [1, 2, 5, body.len()] {
            assert_eq!(
                decoded(body, step),
                Ok(("abc0123456789".into(), true)),
                "step {step}"
            );
        }
        assert_eq!(decoded("3\r\nabc\r\n", 100), Ok(("abc".into(), false)));
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for bad in [
            "g\r\n",
            "\r\n",
            "3\r\nabcX\r\n",
            "3\n\r\nabc\r\n",
            "3;a\x0bb\r\nabc\r\n",
            "1000000000000000\r\n",
            &format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE)),
        ] {
            assert!(decoded(bad, 7).is_err(), "{bad:.40}");
        }
    }

    #[test]
    fn trailers_kept_come_as_the_last_piece_and_malformed_ones_are_errors() {
        let pieces = |body: &str| {
            let mut decoder = Decoder::keeping_trailers(Body::Chunked);
            let mut buffer = BytesMut::from(body);
            let mut pieces = Vec::new();
            while !decoder.ended() {
                match decoder.next(&mut buffer) {
                    Ok(Some(piece)) => pieces.push(piece),
                    Ok(None) => return Err("more bytes wanted".to_owned()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(pieces)
        };
        let mut fields = HeaderMap::new();
        fields.insert("x-sum", HeaderValue::from_static("3"));
        fields.append("x-sum", HeaderValue::from_static("4"));
        assert_eq!(
            pieces("3\r\nabc\r\n0\r\nX-Sum: 3\r\nConnection: close\r\nx-sum:4 \r\n\r\n"),
            Ok(vec![Piece::Data("abc".into()), Piece::Trailers(fields)]),
            "the body has ended with its trailers, a hop's own left out"
        );
        assert_eq!(pieces("0\r\n\r\n"), Ok(vec![Piece::End]), "none came");
        let hop = pieces("0\r\nConnection: x\r\n\r\n");
        assert_eq!(hop, Ok(vec![Piece::End]), "none kept");
        for bad in ["no colon", "bad name: v", "x: a\x01b"] {
            assert!(pieces(&format!("0\r\n{bad}\r\n\r\n")).is_err(), "{bad}");
        }
        let many = format!("x: {}\r\n", "v".repeat(1000)).repeat(17);
        assert!(pieces(&format!("0\r\n{many}\r\n")).is_err(), "over 16 KiB");
    }

    #[test]
    fn a_body_of_known_length_ends_at_it_and_leaves_what_follows() {
        let mut decoder = Decoder::new(Body::Length(5));
        let mut buffer = BytesMut::from("abc");
        assert_eq!(
            decoder.next(&mut buffer).unwrap(),
            Some(Piece::Data("abc".into()))
        );
        assert_eq!(decoder.next(&mut buffer).unwrap(), None);
        assert!(matches!(
            decoder.closed(),
            Err(BodyError::Short { sent: 3, length: 5 })
        ));
        buffer.extend_from_slice(b"deXTRA");
        assert_eq!(
            decoder.next(&mut buffer).unwrap(),
            Some(Piece::Data("de".into()))
        );
        assert_eq!(decoder.next(&mut buffer).unwrap(), Some(Piece::End));
        assert_eq!(buffer, "XTRA");
    }
}
