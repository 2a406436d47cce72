//! The state directory (`--dir`): opened once, checked, and the only way to the files in it.
//!
//! Every file is reached relative to the directory's descriptor, by one name, with `O_NOFOLLOW`:
//! a symlink planted at any name makes that one operation fail with an error saying so; it
//! never redirects a write. Running as root, a directory (the state directory, or one kept in
//! it, such as `logs/`) or a file opened in it that another user owns or that group or others
//! may write is refused: whoever may write there could swap names under us. The directory's
//! ancestors are the operator's business, so `--dir` itself may be reached through a symlink.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use core_server_proto::atomic_file;
use nix::unistd::{Gid, Uid};
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags, RenameFlags, Stat};
use rustix::io::Errno;

/// Where a root instance keeps its state when not told (`--dir`).
pub const ROOT_DEFAULT: &str = "/var/lib/core-server";

/// An open, checked directory; clones share the descriptor.
#[derive(Clone)]
pub struct StateDir {
    fd: Arc<OwnedFd>,
    path: PathBuf,
}

impl StateDir {
    /// Opens `path` (created with mode 0700 if missing) and checks it.
    pub fn open(path: &Path) -> anyhow::Result<StateDir> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .with_context(|| format!("cannot create --dir {}", path.display()))?;
        // Absolute: a rerun from elsewhere is told this path.
        let path = std::path::absolute(path)?;
        let fd = rustix::fs::open(&path, dir_flags(), Mode::empty())
            .with_context(|| format!("cannot open --dir {}", path.display()))?;
        let dir = StateDir {
            fd: Arc::new(fd),
            path,
        };
        check(&dir.fd, &dir.path)?;
        Ok(dir)
    }

    /// The directory `name` in this one, created (mode 0700) if missing, and checked.
    pub fn subdir(&self, name: &str) -> anyhow::Result<StateDir> {
        let path = self.path.join(name);
        match rustix::fs::mkdirat(self.fd(), name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("cannot create {}", path.display()))
            }
        }
        let fd = self.open_dir(name)?;
        check(&fd, &path)?;
        Ok(StateDir {
            fd: Arc::new(fd),
            path,
        })
    }

    /// The directory `name` in this one for a child running as `owner` (uid, gid; `None`:
    /// our own user), opened without following a link, for the child to work beneath. Made
    /// (mode 0700) and given to it if missing; one that exists must be the child's already
    /// (or ours and empty: a start cut short between making and giving it), mode 0700.
    pub fn child_dir(&self, name: &str, owner: Option<(Uid, Gid)>) -> anyhow::Result<OwnedFd> {
        let path = self.path.join(name);
        let made = match rustix::fs::mkdirat(self.fd(), name, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => {
                return Err(io::Error::from(e))
                    .with_context(|| format!("cannot create {}", path.display()))
            }
        };
        let fd = self.open_dir(name)?;
        let ours = nix::unistd::geteuid();
        let (uid, gid) = owner.unwrap_or((ours, nix::unistd::getegid()));
        let stat = rustix::fs::fstat(&fd)?;
        if stat.st_uid != uid.as_raw() {
            // Only a directory we made is given away: never one of someone else's (another
            // root service's store, with --dir /var/lib).
            if stat.st_uid != ours.as_raw() || !(made || is_empty(&fd)?) {
                anyhow::bail!(
                    "refusing {}: it is owned by uid {}, not by uid {uid} that the children run \
                     as (if it is core-server's store: chown -R {uid}:{gid} {})",
                    path.display(),
                    stat.st_uid,
                    path.display()
                );
            }
            nix::unistd::fchown(&fd, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
        }
        if stat.st_mode & 0o7777 != 0o700 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))
                .with_context(|| format!("cannot chmod 700 {}", path.display()))?;
        }
        Ok(fd)
    }

    /// Directory `name` in this one, opened without following a link.
    fn open_dir(&self, name: &str) -> anyhow::Result<OwnedFd> {
        let path = self.path.join(name);
        rustix::fs::openat(
            self.fd(),
            name,
            dir_flags() | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| {
            // With O_DIRECTORY, a link fails as "not a directory": say which it is.
            let link = rustix::fs::statat(self.fd(), name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink);
            explain(if link { Errno::LOOP } else { e }, &path)
        })
        .with_context(|| format!("cannot open {}", path.display()))
    }

    /// Takes the directory for this instance (an exclusive `flock`, held until we exit), so
    /// that two instances never share one directory: each would overwrite the other's routes
    /// and remove its temporary files. Fails at once if another instance holds it.
    pub fn claim(&self) -> anyhow::Result<()> {
        match rustix::fs::flock(self.fd(), FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(()),
            Err(Errno::WOULDBLOCK) => anyhow::bail!(
                "another core-server (with another --udp-port) uses --dir {}: give each \
                 instance a directory of its own",
                self.display()
            ),
            Err(e) => Err(io::Error::from(e))
                .with_context(|| format!("cannot lock --dir {}", self.display())),
        }
    }

    /// Takes the directory once the instance we take over from, which holds it until it exits,
    /// is gone (in a thread of its own: that may be a drain's length away).
    pub fn claim_when_free(&self) {
        let fd = self.fd.clone();
        std::thread::spawn(move || {
            if let Err(e) = rustix::fs::flock(&*fd, FlockOperation::LockExclusive) {
                tracing::warn!("cannot lock the state directory: {e}");
            }
        });
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path, for messages.
    pub fn display(&self) -> std::path::Display<'_> {
        self.path.display()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The contents of file `name`; `None` if there is none.
    pub fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.read_checked(name, |_| Ok(()))
    }

    /// The contents of secret file `name` (`None` if there is none), refused if anyone but
    /// its owner may read it or it has other links: then it may have been read already.
    pub fn read_secret(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.read_checked(name, |stat| {
            if stat.st_mode & 0o077 == 0 && stat.st_nlink == 1 {
                return Ok(());
            }
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "refusing {}: a secret, yet others may read it (mode {:o}) or it has other \
                     links; take it as exposed: remove it, and a new one is made",
                    self.path.join(name).display(),
                    stat.st_mode & 0o7777
                ),
            ))
        })
    }

    fn read_checked(
        &self,
        name: &str,
        check: impl FnOnce(&Stat) -> io::Result<()>,
    ) -> io::Result<Option<Vec<u8>>> {
        let fd = match self.open_file(name, OFlags::RDONLY, 0) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        check(&rustix::fs::fstat(&fd)?)?;
        let mut bytes = Vec::new();
        File::from(fd).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Replaces file `name` atomically (see [`atomic_file`]).
    pub fn replace(&self, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
        atomic_file::write(self.fd(), name, bytes, mode)
    }

    /// Removes what a replacement of `name` cut short by a kill left behind; their names.
    pub fn remove_leftovers(&self, name: &str) -> io::Result<Vec<String>> {
        atomic_file::remove_leftovers(self.fd(), name)
    }

    /// Removes file `name`, if it is there (a link is removed, never followed). Not durable:
    /// the directory is not fsync'd.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(self.fd(), name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// File `name` opened for appending, created with `mode` if missing.
    pub fn append(&self, name: &str, mode: u32) -> io::Result<File> {
        self.open_file(name, OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE, mode)
            .map(File::from)
    }

    /// Renames `from` to `to` (replacing it); a link is moved or replaced, never followed.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(self.fd(), from, self.fd(), to)?)
    }

    /// Renames `from` to `to`, or to `to-2`, `to-3`... if taken: never over an existing name.
    /// The name given.
    pub fn rename_to_new(&self, from: &str, to: &str) -> io::Result<String> {
        to_new(to, |candidate| {
            rustix::fs::renameat_with(
                self.fd(),
                from,
                self.fd(),
                candidate,
                RenameFlags::NOREPLACE,
            )
        })
    }

    /// Gives file `from` a second name, `to` (or `to-2`, `to-3`... if taken: never over an
    /// existing name), durably (the directory is fsync'd): `from` can then be replaced with
    /// its contents kept under the new name whatever happens. The name given.
    pub fn link_to_new(&self, from: &str, to: &str) -> io::Result<String> {
        let name = to_new(to, |candidate| {
            rustix::fs::linkat(self.fd(), from, self.fd(), candidate, AtFlags::empty())
        })?;
        rustix::fs::fsync(self.fd())?;
        Ok(name)
    }

    /// Opens file `name` without following a link, and checks it is a regular file that only
    /// we may write. `O_NONBLOCK`: a FIFO planted there cannot block the open.
    fn open_file(&self, name: &str, flags: OFlags, mode: u32) -> io::Result<OwnedFd> {
        let path = self.path.join(name);
        let flags = flags | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.fd(), name, flags, Mode::from_raw_mode(mode))
            .map_err(|e| explain(e, &path))?;
        let stat = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
            return Err(io::Error::other(format!(
                "{} is not a regular file; core-server only reads and writes regular files here",
                path.display()
            )));
        }
        if stat.st_nlink > 1 && flags.contains(OFlags::WRONLY) {
            return Err(io::Error::other(format!(
                "{} has other hard links; core-server does not write to a file that is also \
                 elsewhere (remove it)",
                path.display()
            )));
        }
        match refusal(&stat, &path) {
            Some(why) => Err(io::Error::new(io::ErrorKind::PermissionDenied, why)),
            None => Ok(fd),
        }
    }
}

/// Tries `make` with `to`, then `to-2`, `to-3`... while it finds the name taken; the name it
/// made.
fn to_new(to: &str, mut make: impl FnMut(&str) -> Result<(), Errno>) -> io::Result<String> {
    for n in 1..=1000 {
        let candidate = match n {
            1 => to.to_owned(),
            n => format!("{to}-{n}"),
        };
        match make(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(Errno::EXIST) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{to} and 999 numbered names after it are all taken"),
    ))
}

/// Refuses a directory as [`refusal`] says.
fn check(fd: &OwnedFd, path: &Path) -> anyhow::Result<()> {
    let stat = rustix::fs::fstat(fd)?;
    match refusal(&stat, path) {
        Some(why) => anyhow::bail!(why),
        None => Ok(()),
    }
}

/// Whether the directory `fd` has no entries.
fn is_empty(fd: &OwnedFd) -> io::Result<bool> {
    let mut dir = rustix::fs::Dir::read_from(fd)?;
    while let Some(entry) = dir.read() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Running as root: why what `stat` describes may not be used (another user owns it, or
/// group or others may write it). `None` when it may, and always when not root.
fn refusal(stat: &Stat, path: &Path) -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let what = path.display();
    let mode = stat.st_mode & 0o7777;
    if stat.st_uid != 0 {
        Some(format!(
            "refusing {what}: it is owned by uid {}, and core-server running as root only uses \
             what root owns (chown root {what}, or choose another --dir)",
            stat.st_uid
        ))
    } else if mode & 0o022 != 0 {
        Some(format!(
            "refusing {what}: group or others may write to it (mode {mode:o}), and core-server \
             running as root only uses what no one else may change (chmod go-w {what})"
        ))
    } else {
        None
    }
}

/// `ELOOP` from `O_NOFOLLOW` says little; say what it means here.
fn explain(e: Errno, path: &Path) -> io::Error {
    match e {
        Errno::LOOP => io::Error::other(format!(
            "{} is a symbolic link, and core-server never follows one in its directory \
             (remove it)",
            path.display()
        )),
        e => io::Error::from(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_link_at_any_name_is_refused_and_its_target_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::create_dir(tmp.path().join("outside-dir")).unwrap();
        symlink(&outside, dir.path().join("file")).unwrap();
        symlink(tmp.path().join("outside-dir"), dir.path().join("sub")).unwrap();

        for e in [
            dir.read("file").unwrap_err(),
            dir.append("file", 0o600).unwrap_err(),
        ] {
            assert!(e.to_string().contains("file is a symbolic link"), "{e}");
        }
        let e = dir.subdir("sub").err().unwrap();
        assert!(format!("{e:#}").contains("sub is a symbolic link"), "{e:#}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
        assert_eq!(
            std::fs::read_dir(tmp.path().join("outside-dir"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn renaming_to_a_new_name_never_replaces_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        for content in ["one", "two", "three"] {
            std::fs::write(tmp.path().join("f"), content).unwrap();
            dir.rename_to_new("f", "f.aside").unwrap();
        }
        for (name, content) in [
            ("f.aside", "one"),
            ("f.aside-2", "two"),
            ("f.aside-3", "three"),
        ] {
            assert_eq!(
                std::fs::read_to_string(tmp.path().join(name)).unwrap(),
                content
            );
        }
    }

    #[test]
    fn linking_to_a_new_name_keeps_the_file_and_never_replaces_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(tmp.path()).unwrap();
        std::fs::write(tmp.path().join("f.aside"), "earlier").unwrap();
        std::fs::write(tmp.path().join("f"), "one").unwrap();
        assert_eq!(dir.link_to_new("f", "f.aside").unwrap(), "f.aside-2");
        // Replacing `f` leaves what the new name holds as it was.
        dir.replace("f", b"two", 0o600).unwrap();
        for (name, content) in [("f", "two"), ("f.aside", "earlier"), ("f.aside-2", "one")] {
            assert_eq!(
                std::fs::read_to_string(tmp.path().join(name)).unwrap(),
                content
            );
        }
    }

    #[test]
    fn hard_links_and_special_files_are_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"precious").unwrap();
        std::fs::hard_link(&outside, dir.path().join("linked")).unwrap();
        let e = dir.append("linked", 0o600).unwrap_err();
        assert!(e.to_string().contains("other hard links"), "{e}");
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = dir.read("fifo").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"precious");
    }

    #[test]
    fn as_root_a_directory_others_may_write_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = StateDir::open(tmp.path()).err().unwrap().to_string();
        assert!(
            e.contains("group or others may write to it (mode 770)"),
            "{e}"
        );
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(tmp.path(), Some(65534), None).unwrap();
        let e = StateDir::open(tmp.path()).err().unwrap().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn a_childs_dir_is_made_and_given_but_never_someone_elses() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to give a directory away");
            return;
        }
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        let nobody = Some((Uid::from_raw(65534), Gid::from_raw(65534)));

        dir.child_dir("made", nobody).unwrap();
        let made = std::fs::metadata(dir.path().join("made")).unwrap();
        assert_eq!((made.uid(), made.mode() & 0o7777), (65534, 0o700));
        // Its own, left too open: closed again.
        std::fs::set_permissions(
            dir.path().join("made"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        dir.child_dir("made", nobody).unwrap();
        let mode = std::fs::metadata(dir.path().join("made")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o700);

        // Root's, with something in it: another service's, refused and left as it was.
        std::fs::create_dir(dir.path().join("theirs")).unwrap();
        std::fs::write(dir.path().join("theirs/key"), "secret").unwrap();
        let e = dir.child_dir("theirs", nobody).unwrap_err().to_string();
        assert!(e.contains("owned by uid 0, not by uid 65534"), "{e}");
        assert_eq!(
            std::fs::metadata(dir.path().join("theirs")).unwrap().uid(),
            0
        );

        symlink(tmp.path(), dir.path().join("link")).unwrap();
        let e = format!("{:#}", dir.child_dir("link", nobody).unwrap_err());
        assert!(e.contains("link is a symbolic link"), "{e}");
    }

    #[test]
    fn a_secret_others_may_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::open(&tmp.path().join("state")).unwrap();
        dir.replace("key", b"k", 0o600).unwrap();
        assert_eq!(dir.read_secret("key").unwrap().unwrap(), b"k");
        std::fs::set_permissions(
            dir.path().join("key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = dir.read_secret("key").unwrap_err().to_string();
        assert!(e.contains("others may read it (mode 644)"), "{e}");
        assert!(dir.read_secret("missing").unwrap().is_none());
    }
}
