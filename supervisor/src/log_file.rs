//! Where logs go: stderr in local mode; in release mode `<dir>/logs/core.log`, rotated by size
//! with all files together held under the cap.
//!
//! In release mode the supervisor's own lines and its children's (see `child_logs`) go through one non-blocking writer (tracing-appender: a
//! slow disk never stalls the supervisor) into a size-rotating file (file-rotate):
//! `core.log`, then `core.log.1` (newest) to `core.log.9`, each under a tenth of the cap.

use std::path::{Path, PathBuf};

use anyhow::Context;
use file_rotate::compression::Compression;
use file_rotate::suffix::AppendCount;
use file_rotate::{ContentLimit, FileRotate};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

/// How many files share the cap: the live one and the rotated ones.
const FILES: usize = 10;
/// A file is rotated after the write that takes it past its limit, so each limit leaves room
/// for one more line (a longer line from a child is cut to this).
pub const MAX_LINE: u64 = 4 * 1024;

/// The open log file: its writer (to hand to tracing and to `ChildLogs`) and the guard that
/// flushes it when dropped.
pub struct LogFile {
    pub writer: NonBlocking,
    pub path: PathBuf,
    _flush_on_drop: WorkerGuard,
}

impl LogFile {
    pub fn open(dir: &Path, cap: u64) -> anyhow::Result<LogFile> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("cannot create {}", logs.display()))?;
        let path = logs.join("core.log");
        let per_file = (cap / FILES as u64).saturating_sub(MAX_LINE).max(4096) as usize;
        let file = FileRotate::new(
            &path,
            AppendCount::new(FILES - 1),
            ContentLimit::BytesSurpassed(per_file),
            Compression::None,
            None,
        );
        let (writer, guard) = tracing_appender::non_blocking(file);
        Ok(LogFile {
            writer,
            path,
            _flush_on_drop: guard,
        })
    }
}
