//! The UDP command grammar: one command per datagram, one line of reply.
//!
//! ```text
//! add <domain> <port>     route Host <domain> to 127.0.0.1:<port>
//! remove <domain>
//! ```
//!
//! Words are separated by spaces or tabs; whitespace around the command (a trailing newline)
//! is ignored. The reply is `ok` or `error: <reason>`. Parsing is total: any bytes give either
//! a [`Command`] or a [`CommandError`] that explains itself.

use std::fmt;

use crate::domain::{Domain, DomainError};

/// The longest datagram read as a command. Real commands are under 300 bytes; anything
/// longer is refused unread so a flood of large datagrams costs nothing to parse.
pub const MAX_COMMAND_LEN: usize = 1024;

/// The default UDP port, as in the original go-core-server.
pub const DEFAULT_UDP_PORT: u16 = 40608;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Add { domain: Domain, port: u16 },
    Remove { domain: Domain },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command (expected 'add <domain> <port>' or 'remove <domain>')")]
    Empty,
    #[error("command longer than {MAX_COMMAND_LEN} bytes")]
    TooLong,
    #[error("command is not UTF-8 text")]
    NotUtf8,
    #[error("unknown command '{0}' (expected 'add' or 'remove')")]
    UnknownVerb(String),
    #[error("usage: {0}")]
    Usage(&'static str),
    #[error("bad domain '{name}': {why}")]
    Domain { name: String, why: DomainError },
    #[error("bad port '{0}' (expected a number from 1 to 65535)")]
    Port(String),
}

const ADD_USAGE: &str = "add <domain> <port>";
const REMOVE_USAGE: &str = "remove <domain>";

impl Command {
    /// Parses one datagram.
    pub fn parse(datagram: &[u8]) -> Result<Command, CommandError> {
        if datagram.len() > MAX_COMMAND_LEN {
            return Err(CommandError::TooLong);
        }
        let text = std::str::from_utf8(datagram).map_err(|_| CommandError::NotUtf8)?;
        // Words are split on spaces and tabs only: `add a.com\n80` is not a command.
        let words: Vec<&str> = text
            .trim_ascii()
            .split([' ', '\t'])
            .filter(|word| !word.is_empty())
            .collect();
        match words.as_slice() {
            [] => Err(CommandError::Empty),
            ["add", domain, port] => Ok(Command::Add {
                domain: parse_domain(domain)?,
                port: parse_port(port)?,
            }),
            ["add", ..] => Err(CommandError::Usage(ADD_USAGE)),
            ["remove", domain] => Ok(Command::Remove {
                domain: parse_domain(domain)?,
            }),
            ["remove", ..] => Err(CommandError::Usage(REMOVE_USAGE)),
            [verb, ..] => Err(CommandError::UnknownVerb(truncate(verb))),
        }
    }
}

/// The command as it travels: `add example.com 5665`.
impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Add { domain, port } => write!(f, "add {domain} {port}"),
            Command::Remove { domain } => write!(f, "remove {domain}"),
        }
    }
}

fn parse_domain(word: &str) -> Result<Domain, CommandError> {
    Domain::parse(word).map_err(|why| CommandError::Domain {
        name: truncate(word),
        why,
    })
}

fn parse_port(word: &str) -> Result<u16, CommandError> {
    // `u16::from_str` takes a leading '+', which is not part of the grammar.
    match word.parse::<u16>() {
        Ok(port) if port != 0 && word.bytes().all(|b| b.is_ascii_digit()) => Ok(port),
        _ => Err(CommandError::Port(truncate(word))),
    }
}

/// Echoed input is cut short so a reply always fits in one small datagram.
fn truncate(word: &str) -> String {
    match word.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &word[..end]),
        None => word.to_owned(),
    }
}

/// The one-line reply to a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error(String),
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reply::Ok => f.write_str("ok"),
            Reply::Error(why) => write!(f, "error: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(s: &str) -> Domain {
        Domain::parse(s).unwrap()
    }

    #[test]
    fn parses_the_two_commands() {
        let add = Command::Add {
            domain: domain("example.com"),
            port: 5665,
        };
        assert_eq!(Command::parse(b"add example.com 5665"), Ok(add.clone()));
        assert_eq!(
            Command::parse(b"  add\tExample.com.  5665\n"),
            Ok(add.clone())
        );
        assert_eq!(add.to_string(), "add example.com 5665");
        let remove = Command::Remove {
            domain: domain("example.com"),
        };
        assert_eq!(
            Command::parse(b"remove example.com\r\n"),
            Ok(remove.clone())
        );
        assert_eq!(remove.to_string(), "remove example.com");
    }

    #[test]
    fn refuses_everything_else() {
        let long = vec![b'a'; MAX_COMMAND_LEN + 1];
        for bad in [
            &b""[..],
            b"   \n",
            b"add",
            b"add example.com",
            b"add example.com 80 90",
            b"add example.com 0",
            b"add example.com 65536",
            b"add example.com +80",
            b"add example.com -1",
            b"add example.com http",
            b"add exa_mple.com 80",
            b"add 127.0.0.1 80",
            b"remove",
            b"remove a b",
            b"ADD example.com 80",
            b"delete example.com",
            b"add example.com 80\nadd other.com 81",
            b"add example.com\n80",
            b"add example.com\r80",
            b"add\x0cexample.com 80",
            b"add 127.1 80",
            b"\xff\xfe add",
            &long,
        ] {
            let err = Command::parse(bad).unwrap_err();
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn replies_are_one_line() {
        assert_eq!(Reply::Ok.to_string(), "ok");
        let why = Command::parse(b"frobnicate").unwrap_err().to_string();
        assert_eq!(
            Reply::Error(why).to_string(),
            "error: unknown command 'frobnicate' (expected 'add' or 'remove')"
        );
        let long_verb = "x".repeat(500);
        assert!(
            Command::parse(long_verb.as_bytes())
                .unwrap_err()
                .to_string()
                .len()
                < 200
        );
    }
}
