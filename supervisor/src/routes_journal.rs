//! The routes journal, `<dir>/routes.log`: every change to the table since `routes.json` (the
//! snapshot, `routes_file.rs`) was written, appended and fsync'd before it is acknowledged, so
//! that a change costs one short write instead of a rewrite of the whole table.
//!
//! A text file, mode 0600 (the supervisor alone reads it). The first line names the snapshot
//! it continues by that snapshot's journal id: 128 random bits, drawn anew at each compaction
//! and written into `routes.json` (as `"journal"`) with the table. Not a hash of the snapshot's
//! bytes: a snapshot rewritten by a version that knows no journal (after a rollback) can come
//! back byte for byte as it was (a route added, then removed), and would make a journal of
//! changes since undone look current. Such a version drops the key it does not know, so every
//! journal before is stale. Then one line per change, its checksum (the first 8 bytes of the
//! line's JSON's SHA-256, in hex) before it:
//!
//! ```text
//! core-server routes journal v1 snapshot 5f0c…
//! 3b1f2a0c9d8e7f60 {"Set":{"domain":"example.com","port":5665}}
//! ```
//!
//! Reading it back:
//! - A last line that is cut short (no newline), or nothing but zero bytes (a file extended
//!   whose data never reached the disk), is the tail of a write a kill (or power loss)
//!   interrupted: it was never acknowledged, and is dropped.
//! - Any other bad line, the last one too (a write cannot end in its newline unless all of
//!   it was written), is corruption: it is skipped and the others replayed (the
//!   journal holds changes of port routes alone, each absolute, setting or removing one
//!   domain's route: a line skipped leaves only its own domain as it was before), and the file
//!   is set aside by the caller and reported by name.
//! - A journal naming another snapshot than the one there (or found beside a snapshot with no
//!   journal id) is stale: written before that snapshot replaced the one it continued (a
//!   compaction interrupted between its two steps, or a version without a journal saving
//!   `routes.json` since), and the snapshot holds all of it.
//!
//! A new journal (header only) replaces the old one atomically; appends then go to its end.

use std::fs::File;
use std::io::{self, Write};

use core_server_proto::random;
use core_server_proto::routes::RouteChange;
use sha2::{Digest, Sha256};

use crate::state_dir::StateDir;

pub const FILE_NAME: &str = "routes.log";
const MAGIC: &str = "core-server routes journal v";
/// The version this one writes, and the newest it reads.
const VERSION: u32 = 1;
/// No secret is in it (tunnel changes go to the snapshot), but no one else needs it either.
const MODE: u32 = 0o600;

/// A new journal id, for a snapshot and the journal that continues it (see the module comment).
pub fn new_id() -> io::Result<String> {
    random::hex_id()
}

/// A journal file as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Contents {
    Missing,
    /// It continues another snapshot than the one there (see the module comment).
    Stale,
    /// Written by a newer core-server, in this format version.
    Newer(u32),
    /// The changes in it, in order, and what was wrong with the rest (if anything).
    Changes {
        changes: Vec<RouteChange>,
        /// Bytes of an interrupted write dropped from the end.
        torn: usize,
        /// Which lines in the middle are bad, and why (the changes are those of the others).
        corrupt: Option<String>,
    },
}

/// Reads `dir`'s journal, as a continuation of the snapshot with journal id `snapshot_id`
/// (`None`: a snapshot without one, or none at all).
pub fn read(dir: &StateDir, snapshot_id: Option<&str>) -> io::Result<Contents> {
    Ok(match dir.read(FILE_NAME)? {
        None => Contents::Missing,
        Some(bytes) => parse(&bytes, snapshot_id),
    })
}

/// What `bytes`, a journal, holds as a continuation of the snapshot with journal id `snapshot_id`.
fn parse(bytes: &[u8], snapshot_id: Option<&str>) -> Contents {
    let corrupt = |why: String| Contents::Changes {
        changes: Vec::new(),
        torn: 0,
        corrupt: Some(why),
    };
    let Some(header_end) = bytes.iter().position(|&b| b == b'\n') else {
        return corrupt("no header line".to_owned());
    };
    let header = String::from_utf8_lossy(&bytes[..header_end]);
    let Some((version, continues)) = (header.strip_prefix(MAGIC))
        .and_then(|rest| rest.split_once(" snapshot "))
        .and_then(|(version, id)| Some((version.parse::<u32>().ok()?, id)))
    else {
        return corrupt(format!("line 1 is no journal header: '{header}'"));
    };
    if version > VERSION {
        return Contents::Newer(version);
    }
    if Some(continues) != snapshot_id {
        return Contents::Stale;
    }
    let mut changes = Vec::new();
    let mut bad = Vec::new();
    let mut rest = &bytes[header_end + 1..];
    let mut line_number = 1;
    let mut torn = 0;
    while !rest.is_empty() {
        line_number += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            // Cut short: the last write did not finish.
            torn = rest.len();
            break;
        };
        let (line, after) = (&rest[..end], &rest[end + 1..]);
        match decode(line) {
            Ok(change) => changes.push(change),
            // Zeros, with nothing after them: the last write too (power lost mid-way).
            Err(_) if after.is_empty() && line.iter().all(|&b| b == 0) => torn = rest.len(),
            Err(why) => bad.push(format!("line {line_number}: {why}")),
        }
        rest = after;
    }
    let corrupt = match bad.len() {
        0 => None,
        1..=3 => Some(bad.join("; ")),
        n => Some(format!(
            "{}; and {} more bad lines",
            bad[..3].join("; "),
            n - 3
        )),
    };
    Contents::Changes {
        changes,
        torn,
        corrupt,
    }
}

/// One change as a line, newline included.
fn encode(change: &RouteChange, into: &mut Vec<u8>) {
    let json = serde_json::to_string(change).expect("a RouteChange serialises");
    into.extend_from_slice(checksum(json.as_bytes()).as_bytes());
    into.push(b' ');
    into.extend_from_slice(json.as_bytes());
    into.push(b'\n');
}

fn decode(line: &[u8]) -> Result<RouteChange, String> {
    let line = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned())?;
    let (sum, json) = line
        .split_once(' ')
        .ok_or_else(|| "no checksum".to_owned())?;
    if sum != checksum(json.as_bytes()) {
        return Err("checksum mismatch".to_owned());
    }
    serde_json::from_str(json).map_err(|e| e.to_string())
}

fn checksum(bytes: &[u8]) -> String {
    random::hex(&Sha256::digest(bytes)[..8])
}

/// Removes `dir`'s journal, if there is one (a small table needs none). Not made durable:
/// should it come back after a crash, it is stale (the snapshot written before has no journal id).
pub fn remove(dir: &StateDir) -> io::Result<()> {
    dir.remove(FILE_NAME)
}

/// An open journal, appended to.
pub struct Journal {
    file: File,
    len: u64,
    /// Its size with no change in it yet.
    header_len: u64,
}

impl Journal {
    /// Replaces `dir`'s journal with an empty one continuing the snapshot with journal id
    /// `snapshot_id`.
    pub fn start(dir: &StateDir, snapshot_id: &str) -> io::Result<Journal> {
        let header = format!("{MAGIC}{VERSION} snapshot {snapshot_id}\n");
        dir.replace(FILE_NAME, header.as_bytes(), MODE)?;
        Ok(Journal {
            file: dir.append(FILE_NAME, MODE)?,
            len: header.len() as u64,
            header_len: header.len() as u64,
        })
    }

    /// Continues `dir`'s journal as it is: only one that [`read`] found whole (no torn tail,
    /// nothing corrupt), since what is appended must follow a whole line.
    pub fn reopen(dir: &StateDir) -> io::Result<Journal> {
        let file = dir.append(FILE_NAME, MODE)?;
        let len = file.metadata()?.len();
        Ok(Journal {
            file,
            len,
            header_len: len,
        })
    }

    /// Appends `changes` and waits until they are on disk: one write, one fsync. After an
    /// error the journal's end is unknown: drop it and start a new one.
    pub fn append(&mut self, changes: &[RouteChange]) -> io::Result<()> {
        let mut lines = Vec::with_capacity(changes.len() * 64);
        for change in changes {
            encode(change, &mut lines);
        }
        self.file.write_all(&lines)?;
        self.file.sync_data()?;
        self.len += lines.len() as u64;
        Ok(())
    }

    /// Its size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no change was appended since it was started or reopened.
    pub fn is_empty(&self) -> bool {
        self.len == self.header_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::domain::Domain;
    use core_server_proto::tunnel::TokenHash;

    fn set(name: &str, port: u16) -> RouteChange {
        RouteChange::Set {
            domain: Domain::parse(name).unwrap(),
            port,
        }
    }

    fn changes() -> Vec<RouteChange> {
        let domain = Domain::parse("t.example").unwrap();
        vec![
            set("a.example", 1),
            RouteChange::AllowTunnel {
                domain: domain.clone(),
                token: TokenHash([7; 32]),
            },
            RouteChange::RevokeTunnel { domain },
            RouteChange::Remove {
                domain: Domain::parse("a.example").unwrap(),
            },
            set("b.example", 2),
        ]
    }

    /// A journal of `changes()` continuing snapshot "s1", as written.
    fn written() -> (tempfile::TempDir, StateDir, Vec<u8>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        let mut journal = Journal::start(&dir, "s1").unwrap();
        journal.append(&changes()[..2]).unwrap();
        journal.append(&changes()[2..]).unwrap();
        let bytes = dir.read(FILE_NAME).unwrap().unwrap();
        assert_eq!(journal.len(), bytes.len() as u64);
        (tmp, dir, bytes)
    }

    fn whole(changes: Vec<RouteChange>) -> Contents {
        Contents::Changes {
            changes,
            torn: 0,
            corrupt: None,
        }
    }

    #[test]
    fn what_is_appended_is_read_back_in_order_and_the_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let (tmp, dir, bytes) = written();
        assert_eq!(read(&dir, Some("s1")).unwrap(), whole(changes()));
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("core-server routes journal v1 snapshot s1\n"));
        assert!(text.contains(" {\"Set\":{\"domain\":\"b.example\",\"port\":2}}\n"));
        let mode = std::fs::metadata(tmp.path().join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Reopened as it is, it goes on after its last line.
        let mut again = Journal::reopen(&dir).unwrap();
        assert_eq!(again.len(), text.len() as u64);
        again.append(&[set("c.example", 3)]).unwrap();
        let mut expected = changes();
        expected.push(set("c.example", 3));
        assert_eq!(read(&dir, Some("s1")).unwrap(), whole(expected));
    }

    #[test]
    fn a_tail_cut_anywhere_is_dropped_and_every_whole_line_before_it_kept() {
        let (_tmp, _dir, bytes) = written();
        let line_ends: Vec<_> = (bytes.iter().enumerate())
            .filter(|(_, &b)| b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        for cut in line_ends[0]..bytes.len() {
            let whole_lines = line_ends.iter().filter(|&&end| end <= cut).count() - 1;
            let last_end = line_ends[whole_lines];
            let expected = Contents::Changes {
                changes: changes()[..whole_lines].to_vec(),
                torn: cut - last_end,
                corrupt: None,
            };
            assert_eq!(parse(&bytes[..cut], Some("s1")), expected, "cut at {cut}");
        }
        // Zeros where the tail should be (a file extended, its data never written), with or
        // without a newline after them.
        for (zero_bytes, newline) in [(100, &b""[..]), (99, b"\n")] {
            let mut zeros = bytes[..line_ends[3]].to_vec();
            zeros.extend(vec![0; zero_bytes]);
            zeros.extend(newline);
            assert_eq!(
                parse(&zeros, Some("s1")),
                Contents::Changes {
                    changes: changes()[..3].to_vec(),
                    torn: 100,
                    corrupt: None
                }
            );
        }
    }

    #[test]
    fn a_whole_last_line_that_fails_its_checksum_is_corruption_not_a_torn_tail() {
        // A kill cannot leave a line's newline written without the line before it.
        let (_tmp, _dir, bytes) = written();
        let last_line = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        let mut garbled = bytes.clone();
        garbled[last_line + 3] ^= 1;
        assert_eq!(
            parse(&garbled, Some("s1")),
            Contents::Changes {
                changes: changes()[..4].to_vec(),
                torn: 0,
                corrupt: Some("line 6: checksum mismatch".to_owned()),
            }
        );
    }

    #[test]
    fn a_bad_line_with_more_after_it_is_corruption_skipped_and_the_other_lines_kept() {
        let (_tmp, _dir, bytes) = written();
        let second_line = bytes.iter().position(|&b| b == b'\n').unwrap() + 1;
        let third_line = second_line
            + bytes[second_line..]
                .iter()
                .position(|&b| b == b'\n')
                .unwrap()
            + 1;
        for (at, why) in [
            (third_line + 20, "checksum mismatch"),
            (third_line + 2, "checksum mismatch"),
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x20;
            let Contents::Changes {
                changes: c,
                torn: 0,
                corrupt: Some(corrupt),
            } = parse(&bad, Some("s1"))
            else {
                panic!("a bad line in the middle is corruption");
            };
            let mut others = changes();
            others.remove(1);
            assert_eq!(c, others);
            assert_eq!(corrupt, format!("line 3: {why}"));
        }
        // Many bad lines: the first three named, the rest counted.
        let mut many = bytes[..second_line].to_vec();
        for _ in 0..5 {
            many.extend(b"0000000000000000 {}\n");
        }
        many.extend(&bytes[second_line..]);
        let Contents::Changes {
            changes: c,
            corrupt: Some(corrupt),
            ..
        } = parse(&many, Some("s1"))
        else {
            panic!("bad lines are corruption");
        };
        assert_eq!(c, changes());
        assert!(
            corrupt.starts_with("line 2: checksum mismatch; line 3: "),
            "{corrupt}"
        );
        assert!(corrupt.ends_with("; and 2 more bad lines"), "{corrupt}");
        for header in [
            &b"garbage\n"[..],
            b"",
            b"core-server routes journal vX snapshot s1\n",
        ] {
            let mut bad = header.to_vec();
            bad.extend(&bytes[second_line..]);
            assert!(
                matches!(
                    parse(&bad, Some("s1")),
                    Contents::Changes {
                        corrupt: Some(_),
                        ..
                    }
                ),
                "{}",
                String::from_utf8_lossy(header)
            );
        }
    }

    #[test]
    fn another_snapshot_makes_it_stale_and_a_newer_version_is_told_apart() {
        let (_tmp, dir, bytes) = written();
        assert_eq!(read(&dir, Some("s2")).unwrap(), Contents::Stale);
        let newer = String::from_utf8(bytes)
            .unwrap()
            .replacen(" v1 ", " v2 ", 1);
        assert_eq!(parse(newer.as_bytes(), Some("s1")), Contents::Newer(2));
        let empty = tempfile::tempdir().unwrap();
        let empty = StateDir::open(empty.path()).unwrap();
        assert_eq!(read(&empty, Some("s1")).unwrap(), Contents::Missing);
        // A snapshot without a journal id: every journal beside it is stale.
        assert_eq!(read(&dir, None).unwrap(), Contents::Stale);
        let (a, b) = (new_id().unwrap(), new_id().unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
