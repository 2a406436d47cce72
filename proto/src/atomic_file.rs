//! Writing a file so that a crash at any instant leaves the old version or the new one,
//! never a torn mix: temp file beside it, fsync, rename over, fsync the directory.
//!
//! Everything happens relative to a descriptor of the directory, one name at a time, so no
//! path is resolved twice and no link is followed. The temp file's name is unpredictable and
//! it is created with `O_EXCL | O_NOFOLLOW`: a name planted in the directory (say, a symlink
//! to /etc/shadow) makes the write fail instead of redirecting it. The rename replaces the
//! entry itself, never what a link there points to.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::BorrowedFd;

use rustix::fs::{AtFlags, Mode, OFlags};

/// The longest file name [`write`] can write: its temp file's name (`.<name>.tmp-` and 16
/// hex digits) must fit in the 255 bytes a directory entry holds (Linux's `NAME_MAX`).
pub const MAX_NAME_LEN: usize = 255 - ".".len() - TEMP_MARK.len() - 16;

/// Replaces `name` in `dir` with `bytes`; the file gets `mode` (e.g. 0o600 for secrets).
/// `name` is at most [`MAX_NAME_LEN`] bytes long.
pub fn write(dir: BorrowedFd, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    if name.len() > MAX_NAME_LEN {
        // Said plainly, not as the kernel's "File name too long" of a name that fits.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name}: longer than the {MAX_NAME_LEN} bytes of a file written atomically"),
        ));
    }
    let tmp = format!("{}{:016x}", temp_prefix(name), random_u64()?);
    let fd = rustix::fs::openat(
        dir,
        &*tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    let result = (|| {
        let mut file = File::from(fd);
        file.write_all(bytes)?;
        file.sync_all()?;
        rustix::fs::renameat(dir, &*tmp, dir, name)?;
        rustix::fs::fsync(dir)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, &*tmp, AtFlags::empty());
    }
    result
}

/// Removes the temp files of `name` that a write cut short (by a kill) left in `dir`; their
/// names. Only for a directory nothing else writes `name` in at the time (at start-up).
pub fn remove_leftovers(dir: BorrowedFd, name: &str) -> io::Result<Vec<String>> {
    let prefix = temp_prefix(name);
    remove_temp_files(dir, |entry| entry.starts_with(&prefix))
}

/// Removes the temp files of every name that writes cut short left in `dir`; their names.
/// Only for a directory nothing else writes in at the time.
pub fn remove_all_leftovers(dir: BorrowedFd) -> io::Result<Vec<String>> {
    remove_temp_files(dir, |entry| {
        entry
            .strip_prefix('.')
            .is_some_and(|rest| rest.contains(TEMP_MARK))
    })
}

fn remove_temp_files(dir: BorrowedFd, is_temp: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let Ok(entry_name) = entry.file_name().to_str() else {
            continue;
        };
        if is_temp(entry_name) {
            // unlinkat removes a link itself, never its target.
            rustix::fs::unlinkat(dir, entry_name, AtFlags::empty())?;
            removed.push(entry_name.to_owned());
        }
    }
    Ok(removed)
}

const TEMP_MARK: &str = ".tmp-";

/// Temp files of `name` start with this (older versions used the pid after it).
fn temp_prefix(name: &str) -> String {
    format!(".{name}{TEMP_MARK}")
}

fn random_u64() -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    rustix::rand::getrandom(&mut bytes, rustix::rand::GetRandomFlags::empty())?;
    Ok(u64::from_ne_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn open(dir: &Path) -> File {
        File::open(dir).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn replaces_whole_files_with_the_given_mode() {
        let dir = tempfile::tempdir().unwrap();
        let fd = open(dir.path());
        let path = dir.path().join("state.json");
        super::write(fd.as_fd(), "state.json", b"first", 0o600).unwrap();
        super::write(fd.as_fd(), "state.json", b"second", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            names(dir.path()),
            ["state.json"],
            "no temp file left behind"
        );
    }

    #[test]
    fn the_longest_name_is_written_and_a_longer_one_refused_plainly() {
        let dir = tempfile::tempdir().unwrap();
        let fd = open(dir.path());
        let longest = "x".repeat(super::MAX_NAME_LEN);
        super::write(fd.as_fd(), &longest, b"fits", 0o600).unwrap();
        assert_eq!(std::fs::read(dir.path().join(&longest)).unwrap(), b"fits");
        let longer = format!("{longest}x");
        let error = super::write(fd.as_fd(), &longer, b"", 0o600).unwrap_err();
        assert!(error.to_string().contains("written atomically"), "{error}");
        assert_eq!(names(dir.path()), [longest], "no temp file left behind");
    }

    #[test]
    fn a_symlink_at_the_name_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"precious").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("state.json")).unwrap();
        super::write(open(dir.path()).as_fd(), "state.json", b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(dir.path().join("state.json")).unwrap();
        assert!(meta.is_file());
    }

    #[test]
    fn leftover_temp_files_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            ".state.json.tmp-1234",
            ".state.json.tmp-0123456789abcdef",
            "state.json",
            ".other.json.tmp-1",
        ] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join(".state.json.tmp-link"))
            .unwrap();
        let mut removed = super::remove_leftovers(open(dir.path()).as_fd(), "state.json").unwrap();
        removed.sort();
        assert_eq!(
            removed,
            [
                ".state.json.tmp-0123456789abcdef",
                ".state.json.tmp-1234",
                ".state.json.tmp-link"
            ]
        );
        assert_eq!(names(dir.path()), [".other.json.tmp-1", "state.json"]);
        assert!(outside.path().exists(), "a link's target is left alone");
    }
}
