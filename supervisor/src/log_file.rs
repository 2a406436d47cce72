//! Where logs go: stderr in local mode; in release mode `<dir>/logs/core.log`, rotated by size
//! with all files together held under the cap.
//!
//! The supervisor's own lines and its children's (see `child_logs`) go through one non-blocking
//! writer (tracing-appender): a slow disk, or a terminal that stops reading (Ctrl-S, a paused
//! pager), drops lines past a bounded queue instead of stalling the supervisor. In release
//! mode it writes into a size-rotating file: `core.log`, then `core.log.1` (newest) to `core.log.9`, each under a
//! tenth of the cap. The files are reached through the `logs` directory's descriptor (see
//! `state_dir`): `core.log` is opened without following a link, and rotated files are only
//! ever renamed, which moves or replaces a link there, never writes through it.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context;
use tracing_appender::non_blocking::{NonBlocking, NonBlockingBuilder, WorkerGuard};

use crate::state_dir::StateDir;

/// How many files share the cap: the live one and the rotated ones.
const FILES: usize = 10;
/// A file is rotated after the write that takes it past its limit, so each limit leaves room
/// for one more line (a longer line from a child is cut to this).
pub const MAX_LINE: u64 = 4 * 1024;
const NAME: &str = "core.log";
/// Logs may tell more than the routes file; only the owner reads them.
const MODE: u32 = 0o600;

/// The open log: its writer (to hand to tracing and to `ChildLogs`), the file it writes to
/// (`None`: stderr) and the guard that flushes it when dropped.
pub struct LogFile {
    pub writer: NonBlocking,
    pub path: Option<PathBuf>,
    _flush_on_drop: WorkerGuard,
}

impl LogFile {
    /// Our stderr (local mode).
    pub fn stderr() -> LogFile {
        let (writer, guard) = non_blocking(io::stderr());
        LogFile {
            writer,
            path: None,
            _flush_on_drop: guard,
        }
    }

    /// `logs/core.log` in `dir`, rotated (release mode).
    pub fn open(dir: &StateDir, cap: u64) -> anyhow::Result<LogFile> {
        let logs = dir.subdir("logs")?;
        let path = logs.path().join(NAME);
        let per_file = (cap / FILES as u64).saturating_sub(MAX_LINE).max(4096);
        let file = RotatingFile::open(logs, per_file)
            .with_context(|| format!("cannot open the log file {}", path.display()))?;
        let (writer, guard) = non_blocking(file);
        Ok(LogFile {
            writer,
            path: Some(path),
            _flush_on_drop: guard,
        })
    }
}

/// Lines waiting for a slow sink: past this many, new ones are dropped. At most a few MiB
/// (child lines are cut at [`MAX_LINE`]); tracing-appender's default, 128,000, could hold
/// half a GiB of a flooding child's lines in the supervisor.
const QUEUED_LINES: usize = 1024;

/// A writer that hands lines to a thread writing them into `sink`, so that a slow sink never
/// stalls the supervisor; lines past [`QUEUED_LINES`] are lost instead.
fn non_blocking<W: Write + Send + 'static>(sink: W) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .finish(sink)
}

/// `core.log` in `logs`, rotated once it has passed `limit` bytes.
struct RotatingFile {
    logs: StateDir,
    /// `None` after a rotation, or after the file could not be opened: the next write opens it.
    file: Option<File>,
    written: u64,
    limit: u64,
}

impl RotatingFile {
    fn open(logs: StateDir, limit: u64) -> io::Result<RotatingFile> {
        let mut file = RotatingFile {
            logs,
            file: None,
            written: 0,
            limit,
        };
        file.current()?;
        Ok(file)
    }

    /// `core.log`, opened (appending to what is there) if it is not yet.
    fn current(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let file = self.logs.append(NAME, MODE)?;
            self.written = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// `core.log.8` to `core.log.9` (replacing the oldest), ..., `core.log` to `core.log.1`;
    /// the next write starts a new `core.log`.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        for n in (0..FILES - 1).rev() {
            let from = match n {
                0 => NAME.to_owned(),
                n => format!("{NAME}.{n}"),
            };
            match self.logs.rename(&from, &format!("{NAME}.{}", n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > self.limit && self.rotate().is_err() {
            // The line still goes into `core.log` (reopened: rotating closed it), and the
            // rotation is tried again a file's worth of lines later: a rename that fails
            // never silences the log.
            self.written = 0;
        }
        let n = self.current()?.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), |file| file.flush())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sizes(logs: &std::path::Path) -> Vec<(String, u64)> {
        let mut files: Vec<_> = std::fs::read_dir(logs)
            .unwrap()
            .map(|e| e.unwrap())
            .map(|e| {
                let name = e.file_name().into_string().unwrap();
                (name, e.metadata().unwrap().len())
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn rotates_into_ten_files_each_under_its_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let logs = StateDir::open(tmp.path()).unwrap();
        let mut file = RotatingFile::open(logs, 1000).unwrap();
        let line = [b'x'; 99];
        for _ in 0..500 {
            file.write_all(&line).unwrap();
            file.write_all(b"\n").unwrap();
        }
        let files = sizes(tmp.path());
        let names: Vec<_> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "core.log",
                "core.log.1",
                "core.log.2",
                "core.log.3",
                "core.log.4",
                "core.log.5",
                "core.log.6",
                "core.log.7",
                "core.log.8",
                "core.log.9"
            ]
        );
        for (name, size) in files {
            assert!(size <= 1000 + 100, "{name}: {size} bytes");
        }
    }

    #[test]
    fn reopening_appends_and_counts_what_is_there() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(NAME), [b'x'; 900]).unwrap();
        let logs = StateDir::open(tmp.path()).unwrap();
        let mut file = RotatingFile::open(logs, 1000).unwrap();
        file.write_all(&[b'y'; 200]).unwrap(); // takes it past the limit
        file.write_all(b"next").unwrap(); // so this goes to a new file
        assert_eq!(
            sizes(tmp.path()),
            [("core.log".into(), 4), ("core.log.1".into(), 1100)]
        );
    }

    #[test]
    fn links_at_the_log_names_are_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        let dir = StateDir::open(&state).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::create_dir(state.join("logs")).unwrap();
        symlink(&outside, state.join("logs/core.log")).unwrap();
        let e = LogFile::open(&dir, 100_000).err().unwrap();
        assert!(
            format!("{e:#}").contains("core.log is a symbolic link"),
            "{e:#}"
        );

        // Rotated names are only renamed: links there move along and fall off the end.
        std::fs::remove_file(state.join("logs/core.log")).unwrap();
        for n in 1..FILES {
            symlink(&outside, state.join(format!("logs/core.log.{n}"))).unwrap();
        }
        let mut file = RotatingFile::open(dir.subdir("logs").unwrap(), 1000).unwrap();
        for _ in 0..300 {
            file.write_all(&[b'z'; 100]).unwrap();
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    }

    #[test]
    fn a_rotation_that_fails_loses_no_line() {
        let tmp = tempfile::tempdir().unwrap();
        // core.log.8 can never be renamed onto core.log.9, a directory that is not empty: the
        // first step of every rotation fails.
        std::fs::create_dir(tmp.path().join("core.log.9")).unwrap();
        std::fs::write(tmp.path().join("core.log.9/x"), b"").unwrap();
        std::fs::write(tmp.path().join("core.log.8"), b"").unwrap();
        let logs = StateDir::open(tmp.path()).unwrap();
        let mut file = RotatingFile::open(logs, 1000).unwrap();
        for _ in 0..30 {
            file.write_all(&[b'x'; 100]).unwrap();
        }
        let log = std::fs::read(tmp.path().join(NAME)).unwrap();
        assert_eq!(log.len(), 3000, "every line is in core.log");
    }
}
