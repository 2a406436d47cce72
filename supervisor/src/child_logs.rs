//! Where a child's stderr goes: always into a pipe that the supervisor reads, line by line, and
//! hands to the supervisor's own non-blocking log writer (stderr in local mode, the log file in
//! release mode; see `log_file`). So a child shares
//! no descriptor with the operator's terminal nor with the log file (an unprivileged child
//! cannot open the file, and a shared descriptor would keep writing to a rotated-away file).
//!
//! Each line is tagged with the child it came from (`worker[1234]: `), its control characters
//! are escaped (no escape sequence of a child reaches the operator's terminal), and it is cut
//! at [`MAX_LINE`] bytes: a child that never writes a newline costs one fixed buffer.

use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::process::Stdio;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tracing_appender::non_blocking::NonBlocking;

use crate::log_file::MAX_LINE;

/// How much of the pipe is read at once.
const READ_SIZE: usize = 16 * 1024;
/// Ends a line that was cut; the rest of it, up to its newline, is dropped.
const CUT_MARKER: &[u8] = b" [cut: line too long]";

/// Where children's stderr lines go: the supervisor's own log writer.
#[derive(Clone)]
pub struct ChildLogs(pub NonBlocking);

impl ChildLogs {
    /// A pipe for a new child's stderr, to give to [`crate::child::spawn`].
    pub fn stderr(&self) -> io::Result<ChildStderr> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        Ok(ChildStderr {
            read: pipe::Receiver::from_owned_fd(read)?,
            write,
            logs: self.clone(),
        })
    }

    /// Writes one whole line (newline included) in one call, so lines of several children and
    /// our own never interleave within a line.
    fn write_line(&mut self, line: &[u8]) {
        let _ = self.0.write_all(line);
    }
}

/// A child's stderr pipe, before the child runs.
pub struct ChildStderr {
    read: pipe::Receiver,
    write: OwnedFd,
    logs: ChildLogs,
}

impl ChildStderr {
    /// The child's end (its stderr), and ours, to read once the child runs.
    pub fn split(self) -> (Stdio, StderrReader) {
        let reader = StderrReader {
            read: self.read,
            logs: self.logs,
        };
        (Stdio::from(self.write), reader)
    }
}

/// Our end of a child's stderr pipe.
pub struct StderrReader {
    read: pipe::Receiver,
    logs: ChildLogs,
}

impl StderrReader {
    /// Copies the child's lines, each starting with `tag`, until every copy of the pipe's write
    /// end is closed (the child has exited). The task ends then.
    pub fn forward(self, tag: String) -> JoinHandle<()> {
        let StderrReader { mut read, mut logs } = self;
        tokio::spawn(async move {
            let mut line = Line::new(&tag);
            let mut buf = vec![0; READ_SIZE];
            while let Ok(n @ 1..) = read.read(&mut buf).await {
                line.feed(&buf[..n], |l| logs.write_line(l));
            }
            line.flush(|l| logs.write_line(l));
        })
    }
}

/// The line being assembled: the tag, then the child's bytes with control characters escaped,
/// never longer than [`MAX_LINE`] with its newline.
struct Line {
    text: Vec<u8>,
    tag_len: usize,
    /// Whether the line was cut: what follows, up to the newline, is dropped.
    cut: bool,
}

impl Line {
    fn new(tag: &str) -> Line {
        let mut text = Vec::with_capacity(MAX_LINE as usize);
        text.extend_from_slice(tag.as_bytes());
        Line {
            tag_len: text.len(),
            text,
            cut: false,
        }
    }

    /// Takes `bytes` read from the pipe; hands each line they complete to `write`.
    fn feed(&mut self, bytes: &[u8], mut write: impl FnMut(&[u8])) {
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            match piece.strip_suffix(b"\n") {
                Some(end) => {
                    self.push(end);
                    self.end(&mut write);
                }
                None => self.push(piece),
            }
        }
    }

    /// Hands an unfinished last line (the child exited without a newline) to `write`.
    fn flush(&mut self, write: impl FnMut(&[u8])) {
        if self.text.len() > self.tag_len {
            self.end(write);
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.cut {
            return;
        }
        let room = MAX_LINE as usize - CUT_MARKER.len() - 1;
        for &byte in bytes {
            let control = (byte < 0x20 && byte != b'\t') || byte == 0x7f;
            let len = if control { 4 } else { 1 };
            if self.text.len() + len > room {
                self.text.extend_from_slice(CUT_MARKER);
                self.cut = true;
                return;
            }
            if control {
                let _ = write!(self.text, "\\x{byte:02x}");
            } else {
                self.text.push(byte);
            }
        }
    }

    fn end(&mut self, mut write: impl FnMut(&[u8])) {
        self.text.push(b'\n');
        write(&self.text);
        self.text.truncate(self.tag_len);
        self.cut = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(reads: &[&[u8]]) -> Vec<String> {
        let mut line = Line::new("worker[7]: ");
        let mut out = Vec::new();
        let mut collect = |l: &[u8]| out.push(String::from_utf8_lossy(l).into_owned());
        for bytes in reads {
            line.feed(bytes, &mut collect);
        }
        line.flush(&mut collect);
        out
    }

    #[test]
    fn lines_are_tagged_and_joined_across_reads() {
        assert_eq!(
            lines(&[b"one\ntw", b"o\n", b"\n", b"last"]),
            [
                "worker[7]: one\n",
                "worker[7]: two\n",
                "worker[7]: \n",
                "worker[7]: last\n"
            ]
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            lines(&[b"\x1b[2Jred\ttab\r\n"]),
            ["worker[7]: \\x1b[2Jred\ttab\\x0d\n"]
        );
    }

    #[test]
    fn a_long_line_is_cut_and_the_next_one_is_whole() {
        let long = vec![b'x'; 3 * MAX_LINE as usize];
        let out = lines(&[&long, &long, b"\nnext\n"]);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].len(), MAX_LINE as usize, "newline included");
        assert!(out[0].starts_with("worker[7]: xxx"));
        assert!(out[0].ends_with("x [cut: line too long]\n"));
        assert_eq!(out[1], "worker[7]: next\n");
    }

    #[test]
    fn escapes_are_never_split_by_a_cut() {
        let long = vec![0x1b; MAX_LINE as usize];
        let out = lines(&[&long]);
        assert!(
            out[0].ends_with("\\x1b [cut: line too long]\n"),
            "{}",
            out[0]
        );
        assert!(out[0].len() <= MAX_LINE as usize);
    }
}
