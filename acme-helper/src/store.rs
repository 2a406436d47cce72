//! The certificate store: the directory the supervisor hands over (`DIR/acme`), every file in
//! it reached relative to that descriptor (never by a path from `/`, never through a link).
//!
//! ```text
//! lock               flock'd while ordering or writing: in a rerun, the old and the new helper
//!                    run side by side for a moment, and must not order the same name twice
//! account.json       the ACME account, with its private key (0600)
//! certs/<name>.pem   the private key and the chain (leaf first) in ONE file, so a renewal
//!                    replaces the pair at once (0600)
//! names/<name>.json  failed attempts (the backoff) and whether the name was forgotten
//! challenges/<id>.json
//!                    the challenges being answered (0600): after a rerun the CA reaches the
//!                    new worker, and the new helper has it answer the old one's
//! tmp/               scratch directories for mkcert's output
//! ```
//!
//! Reads take no lock: every file is replaced whole, by a rename (`atomic_file::write`).
//!
//! A file name too long for that (longer than [`atomic_file::MAX_NAME_LEN`], 233 bytes: for
//! names of 229 bytes and more in `names/`, 230 in `certs/`, up to the 253 DNS allows) is the
//! SHA-256 of the name instead, in hex:
//! `certs/<sha256>.pem`, `names/<sha256>.json` (see [`file_name`]). Listing reads the name of
//! such a file from inside it: the certificate's, or the record's `name`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use core_server_proto::acme_ipc::AcmeToWorker;
use core_server_proto::atomic_file;
use core_server_proto::domain::Domain;
use rustix::fs::{AtFlags, FileType, FlockOperation, Mode, OFlags};
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::certificate;
use crate::names::checked;

const LOCK: &str = "lock";
const ACCOUNT: &str = "account.json";
const CERTS: &str = "certs";
const NAMES: &str = "names";
const CHALLENGES: &str = "challenges";
const TMP: &str = "tmp";
const PEM: &str = ".pem";
const JSON: &str = ".json";
/// No file of the store is anywhere near this; a larger one is not ours.
const MAX_FILE_LEN: u64 = 1 << 20;
/// How often a helper waiting for the other one's lock tries again.
const LOCK_RETRY: Duration = Duration::from_millis(10);

/// What the store remembers about a name besides its certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameState {
    #[serde(default)]
    pub backoff: Backoff,
    /// The worker no longer routes it: not renewed (its files stay for a later `add`).
    #[serde(default)]
    pub forgotten: bool,
}

pub struct Store {
    dir: OwnedFd,
    certs: OwnedFd,
    names: OwnedFd,
    challenges: OwnedFd,
    tmp: OwnedFd,
    lock: Arc<StoreLock>,
}

impl Store {
    /// Opens the store in `dir`, making its subdirectories (0700) where missing.
    pub fn open(dir: OwnedFd) -> io::Result<Store> {
        let certs = subdir(&dir, CERTS)?;
        let names = subdir(&dir, NAMES)?;
        let challenges = subdir(&dir, CHALLENGES)?;
        let tmp = subdir(&dir, TMP)?;
        let lock = rustix::fs::openat(
            &dir,
            LOCK,
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| context(e.into(), LOCK))?;
        Ok(Store {
            dir,
            certs,
            names,
            challenges,
            tmp,
            lock: Arc::new(StoreLock {
                fd: lock,
                holders: Mutex::new(0),
                acquiring: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Where `name`'s certificate is kept (`certs/<name>.pem`), for messages.
    pub fn certificate_path(name: &Domain) -> String {
        format!("{CERTS}/{}", file_name(name.as_str(), PEM))
    }

    /// `certs/<name>.pem`, if there is one.
    pub fn read_certificate(&self, name: &Domain) -> io::Result<Option<Vec<u8>>> {
        read(&self.certs, &file_name(checked(name)?, PEM))
    }

    pub fn write_certificate(&self, _: &LockGuard, name: &Domain, pem: &[u8]) -> io::Result<()> {
        let file = file_name(checked(name)?, PEM);
        atomic_file::write(self.certs.as_fd(), &file, pem, 0o600)
            .map_err(|e| context(e, &format!("{CERTS}/{file}")))
    }

    /// Renames `certs/<name>.pem` to `certs/<name>.pem.unusable-<seconds>`; the new name.
    pub fn set_aside_certificate(&self, _: &LockGuard, name: &Domain) -> io::Result<String> {
        let file = file_name(checked(name)?, PEM);
        let aside = format!("{file}.unusable-{}", crate::clock::now());
        rustix::fs::renameat(&self.certs, &*file, &self.certs, &*aside)?;
        rustix::fs::fsync(&self.certs)?;
        Ok(format!("{CERTS}/{aside}"))
    }

    /// `names/<name>.json`; a missing file is a name without history. A corrupt one is set
    /// aside (`.corrupt-<seconds>`, for the operator) and replaced at once by a record that
    /// backs off for an hour: the failures it held are unknown, and must not be forgotten.
    pub fn read_state(&self, name: &Domain) -> io::Result<NameState> {
        let file = file_name(checked(name)?, JSON);
        let Some(bytes) = read(&self.names, &file)? else {
            return Ok(NameState::default());
        };
        let e = match serde_json::from_slice(&bytes) {
            Ok(state) => return Ok(state),
            Err(e) => e,
        };
        let now = crate::clock::now();
        let aside = format!("{file}.corrupt-{now}");
        // Each step is atomic and leaves a record at least as cautious: no lock needed.
        rustix::fs::renameat(&self.names, &*file, &self.names, &*aside)
            .map_err(|err| context(err.into(), &format!("{NAMES}/{file}")))?;
        let why = format!("{NAMES}/{file} was corrupt ({e}), set aside as {NAMES}/{aside}");
        tracing::warn!("{why}; {name} backs off for an hour");
        let state = NameState {
            backoff: Backoff::assume_worst(now, why),
            forgotten: false,
        };
        self.write_state_unlocked(name, &state)?;
        Ok(state)
    }

    pub fn write_state(&self, _: &LockGuard, name: &Domain, state: &NameState) -> io::Result<()> {
        self.write_state_unlocked(name, state)
    }

    fn write_state_unlocked(&self, name: &Domain, state: &NameState) -> io::Result<()> {
        let file = file_name(checked(name)?, JSON);
        let record = Record { name, state };
        let bytes = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;
        atomic_file::write(self.names.as_fd(), &file, &bytes, 0o600)
            .map_err(|e| context(e, &format!("{NAMES}/{file}")))
    }

    /// Every name the store knows: with a certificate or a history.
    pub fn names(&self) -> io::Result<BTreeSet<Domain>> {
        let mut names = BTreeSet::new();
        let kinds: [(_, _, NamesInside); 2] = [
            (&self.certs, PEM, certificate::leaf_names),
            (&self.names, JSON, record_name),
        ];
        for (dir, suffix, names_inside) in kinds {
            for entry in rustix::fs::Dir::read_from(dir)? {
                let entry = entry?;
                let Ok(file) = entry.file_name().to_str() else {
                    continue;
                };
                // Temp files start with a dot, which no domain does.
                let Some(stem) = file.strip_suffix(suffix) else {
                    continue;
                };
                // Only names as we write them: validated and already normalised, or hashed
                // (64 hex digits: one label too long to be a name) with the name inside.
                let name = match Domain::parse(stem) {
                    Ok(name) if name.as_str() == stem => Some(name),
                    Ok(_) => None,
                    Err(_) => hashed_name(dir, file, stem, names_inside),
                };
                names.extend(name);
            }
        }
        Ok(names)
    }

    /// Keeps `challenge` (a challenge message for the worker) as `challenges/<id>.json` while
    /// it is answered. No lock: the file is this challenge's alone, by its random id.
    pub fn write_challenge(&self, id: u64, challenge: &AcmeToWorker) -> io::Result<()> {
        let file = format!("{id}.json");
        let bytes = serde_json::to_vec(challenge).map_err(io::Error::other)?;
        atomic_file::write(self.challenges.as_fd(), &file, &bytes, 0o600)
            .map_err(|e| context(e, &format!("{CHALLENGES}/{file}")))
    }

    pub fn remove_challenge(&self, id: u64) -> io::Result<()> {
        let file = format!("{id}.json");
        match rustix::fs::unlinkat(&self.challenges, &*file, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(context(e.into(), &format!("{CHALLENGES}/{file}"))),
        }
    }

    /// The challenges kept, by id (a file that does not read as one is skipped).
    pub fn challenges(&self) -> io::Result<Vec<(u64, AcmeToWorker)>> {
        let mut challenges = Vec::new();
        for entry in rustix::fs::Dir::read_from(&self.challenges)? {
            let entry = entry?;
            let Ok(file) = entry.file_name().to_str() else {
                continue;
            };
            // Temp files start with a dot, which no id does.
            let Some(Ok(id)) = file.strip_suffix(".json").map(str::parse) else {
                continue;
            };
            // Removed meanwhile: over.
            let Some(bytes) = read(&self.challenges, file)? else {
                continue;
            };
            // Only a challenge, and the one its name says, is sent on to the worker.
            match serde_json::from_slice(&bytes) {
                Ok(
                    challenge @ (AcmeToWorker::HttpChallenge { id: said, .. }
                    | AcmeToWorker::TlsAlpnChallenge { id: said, .. }),
                ) if said == id => challenges.push((id, challenge)),
                Ok(_) => tracing::debug!("{CHALLENGES}/{file} is not that challenge"),
                Err(e) => tracing::debug!("{CHALLENGES}/{file} is not a challenge ({e})"),
            }
        }
        Ok(challenges)
    }

    pub fn read_account(&self) -> io::Result<Option<Vec<u8>>> {
        read(&self.dir, ACCOUNT)
    }

    pub fn write_account(&self, _: &LockGuard, bytes: &[u8]) -> io::Result<()> {
        atomic_file::write(self.dir.as_fd(), ACCOUNT, bytes, 0o600).map_err(|e| context(e, ACCOUNT))
    }

    /// A new private directory under `tmp/`, removed with what is in it when dropped.
    pub fn scratch_dir(&self) -> io::Result<ScratchDir> {
        let mut random = [0u8; 8];
        rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
        let name = format!("{:016x}", u64::from_ne_bytes(random));
        rustix::fs::mkdirat(&self.tmp, &*name, Mode::from_raw_mode(0o700))?;
        let fd = open_dir(&self.tmp, &name)?;
        Ok(ScratchDir {
            parent: self.tmp.try_clone()?,
            fd,
            name,
        })
    }

    /// Removes what writes and mkcert runs cut short by a kill left behind: temp files
    /// (`.<file>.tmp-*`) and scratch directories. Under the lock, so that nothing of the
    /// other helper's (in a rerun) is in progress. The names of what was removed.
    pub fn remove_leftovers(&self, _: &LockGuard) -> io::Result<Vec<String>> {
        let mut removed = Vec::new();
        for (dir, path) in [
            (&self.dir, ""),
            (&self.certs, "certs/"),
            (&self.names, "names/"),
            (&self.challenges, "challenges/"),
        ] {
            for file in atomic_file::remove_all_leftovers(dir.as_fd())? {
                removed.push(format!("{path}{file}"));
            }
        }
        for entry in rustix::fs::Dir::read_from(&self.tmp)? {
            let entry = entry?;
            let Ok(name) = entry.file_name().to_str() else {
                continue;
            };
            if name != "." && name != ".." {
                // Dropping it removes it and the files in it.
                drop(ScratchDir {
                    parent: self.tmp.try_clone()?,
                    fd: open_dir(&self.tmp, name)?,
                    name: name.to_owned(),
                });
                removed.push(format!("{TMP}/{name}"));
            }
        }
        Ok(removed)
    }

    /// Takes the store's lock: held by this process while any of its guards lives.
    pub async fn lock(&self) -> io::Result<LockGuard> {
        self.lock.clone().acquire().await
    }
}

/// A directory under `tmp/` for one run of mkcert.
pub struct ScratchDir {
    parent: OwnedFd,
    fd: OwnedFd,
    name: String,
}

impl ScratchDir {
    /// Its path relative to the store (the helper's working directory).
    pub fn path(&self) -> String {
        format!("{TMP}/{}", self.name)
    }

    pub fn read(&self, file: &str) -> io::Result<Vec<u8>> {
        read(&self.fd, file)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{}/{file}", self.path()))
        })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Ok(dir) = rustix::fs::Dir::read_from(&self.fd) {
            for entry in dir.flatten() {
                let name = entry.file_name();
                if name.to_bytes() != b"." && name.to_bytes() != b".." {
                    let _ = rustix::fs::unlinkat(&self.fd, name, AtFlags::empty());
                }
            }
        }
        let _ = rustix::fs::unlinkat(&self.parent, &*self.name, AtFlags::REMOVEDIR);
    }
}

/// The `lock` file's flock, shared by all the orders and writes of this process: taken when
/// the first begins, released when the last ends.
struct StoreLock {
    fd: OwnedFd,
    holders: Mutex<usize>,
    /// One acquirer waits for the other process at a time.
    acquiring: tokio::sync::Mutex<()>,
}

impl StoreLock {
    async fn acquire(self: Arc<Self>) -> io::Result<LockGuard> {
        let _one = self.acquiring.lock().await;
        {
            let mut holders = self.holders.lock().unwrap();
            if *holders > 0 {
                *holders += 1;
                return Ok(LockGuard(self.clone()));
            }
        }
        // Nobody here holds it, and only we may take it now: wait for the other helper.
        loop {
            match rustix::fs::flock(&self.fd, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => break,
                Err(rustix::io::Errno::WOULDBLOCK) => tokio::time::sleep(LOCK_RETRY).await,
                Err(e) => return Err(context(e.into(), LOCK)),
            }
        }
        *self.holders.lock().unwrap() = 1;
        Ok(LockGuard(self.clone()))
    }
}

/// Proof that the store's lock is held, for the writes that need it.
pub struct LockGuard(Arc<StoreLock>);

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut holders = self.0.holders.lock().unwrap();
        *holders -= 1;
        if *holders == 0 {
            let _ = rustix::fs::flock(&self.0.fd, FlockOperation::Unlock);
        }
    }
}

/// The file of `name` in `certs/` or `names/` (`ext`: `.pem` or `.json`): `<name><ext>`
/// where [`atomic_file::write`] can write a name that long, as all stores had it; else, for
/// names near DNS's 253 bytes, whose temp file's name would not fit in a directory entry,
/// `<sha256 of name, in hex><ext>`: 64 hex digits, which no domain name is (a label is at
/// most 63 bytes), so the two kinds never meet.
fn file_name(name: &str, ext: &str) -> String {
    let readable = format!("{name}{ext}");
    if readable.len() <= atomic_file::MAX_NAME_LEN {
        readable
    } else {
        format!("{}{ext}", sha256_hex(name))
    }
}

/// The names a store file says it is for: [`certificate::leaf_names`], [`record_name`].
type NamesInside = fn(&[u8]) -> Vec<String>;

/// The name whose hash names `file` (`stem` without its extension), if one of the names
/// `names_inside` finds in it has that hash.
fn hashed_name(dir: &OwnedFd, file: &str, stem: &str, names_inside: NamesInside) -> Option<Domain> {
    if stem.len() != 64 || !stem.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    // Removed meanwhile, or unreadable: known by its other file, if at all.
    let bytes = read(dir, file).ok()??;
    names_inside(&bytes)
        .into_iter()
        .filter_map(|name| Domain::parse(&name).ok())
        .find(|name| sha256_hex(name.as_str()) == stem)
}

fn sha256_hex(name: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, name.as_bytes());
    core_server_proto::random::hex(digest.as_ref())
}

/// A `names/` file as written: the name (so that a hashed file tells whose it is), then the
/// state.
#[derive(Serialize)]
struct Record<'a> {
    name: &'a Domain,
    #[serde(flatten)]
    state: &'a NameState,
}

/// The name in a `names/` file, if it says one (older ones do not, but none of them is hashed).
fn record_name(bytes: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct Named {
        name: String,
    }
    serde_json::from_slice::<Named>(bytes)
        .map(|record| vec![record.name])
        .unwrap_or_default()
}

/// `name` in `dir`, made (0700) where missing; one found there must be ours and private,
/// since the keys are in it.
fn subdir(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(context(e.into(), name)),
    }
    let fd = open_dir(dir, name)?;
    let stat = rustix::fs::fstat(&fd).map_err(|e| context(e.into(), name))?;
    let uid = rustix::process::geteuid().as_raw();
    let mode = stat.st_mode & 0o7777;
    if stat.st_uid != uid || mode != 0o700 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{name} in the store is owned by uid {} with mode {mode:o}, where uid {uid} and 0700 are expected",
                stat.st_uid
            ),
        ));
    }
    Ok(fd)
}

fn open_dir(dir: &OwnedFd, name: &str) -> io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| context(e.into(), name))
}

/// The whole of `name` in `dir`, if it exists; a link or anything but a regular file there
/// is refused, not followed.
fn read(dir: &OwnedFd, name: &str) -> io::Result<Option<Vec<u8>>> {
    // O_NONBLOCK: a FIFO planted there must not block the helper's only thread at the open.
    let fd = match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(context(e.into(), name)),
    };
    let stat = rustix::fs::fstat(&fd).map_err(|e| context(e.into(), name))?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} in the store is not a regular file"),
        ));
    }
    let mut bytes = Vec::new();
    File::from(fd)
        .take(MAX_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| context(e, name))?;
    if bytes.len() as u64 > MAX_FILE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{name} is larger than {MAX_FILE_LEN} bytes"),
        ));
    }
    Ok(Some(bytes))
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what} in the store: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn store(dir: &Path) -> Store {
        Store::open(File::open(dir).unwrap().into()).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn certificates_and_states_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let name = Domain::parse("a.example").unwrap();
        assert_eq!(store.read_certificate(&name).unwrap(), None);
        assert_eq!(store.read_state(&name).unwrap(), NameState::default());

        let lock = store.lock().await.unwrap();
        store.write_certificate(&lock, &name, b"first").unwrap();
        store.write_certificate(&lock, &name, b"second").unwrap();
        let state = NameState {
            forgotten: true,
            ..NameState::default()
        };
        store.write_state(&lock, &name, &state).unwrap();
        drop(lock);

        assert_eq!(store.read_certificate(&name).unwrap().unwrap(), b"second");
        assert_eq!(store.read_state(&name).unwrap(), state);
        for sub in ["certs", "names", "challenges", "tmp"] {
            assert_eq!(mode(&dir.path().join(sub)), 0o700, "{sub}");
        }
        assert_eq!(mode(&dir.path().join("certs/a.example.pem")), 0o600);
        assert_eq!(mode(&dir.path().join("names/a.example.json")), 0o600);
        let files: Vec<_> = std::fs::read_dir(dir.path().join("certs"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(files, ["a.example.pem"], "no temp file left behind");
        assert_eq!(
            store.names().unwrap().into_iter().collect::<Vec<_>>(),
            [name]
        );
    }

    /// A name of `len` bytes: labels of 63 bytes, and what remains.
    fn long_name(len: usize) -> Domain {
        let full = (len - 1) / 64;
        let name = format!("{}.", "x".repeat(63)).repeat(full) + &"y".repeat(len - 64 * full);
        Domain::parse(&name).unwrap()
    }

    fn files(dir: &Path) -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    /// DNS allows names up to 253 bytes; `<name>.json` with a temp suffix fits in a directory
    /// entry (255 bytes) up to 228: longer ones are kept under their hash, and listed.
    #[tokio::test]
    async fn names_up_to_253_bytes_are_stored_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let readable = long_name(228);
        // A certificate, but no record yet (a kill between the two writes).
        let certified = long_name(240);
        let recorded = long_name(253);
        let lock = store.lock().await.unwrap();
        let state = NameState {
            forgotten: true,
            ..NameState::default()
        };
        let pem = |name: &Domain| {
            let (key, leaf) = crate::certificate::tests::make(&[name.as_str()], 0, 4_000_000_000);
            crate::certificate::Certificate::new(name, None, key, vec![leaf])
                .unwrap()
                .to_pem()
        };
        for name in [&readable, &certified] {
            store.write_certificate(&lock, name, &pem(name)).unwrap();
        }
        for name in [&readable, &recorded] {
            store.write_state(&lock, name, &state).unwrap();
        }
        drop(lock);

        for name in [&readable, &certified] {
            let stored = store.read_certificate(name).unwrap().unwrap();
            crate::certificate::Certificate::from_pem(name, &stored).unwrap();
        }
        assert_eq!(store.read_state(&recorded).unwrap(), state);
        assert_eq!(store.read_state(&readable).unwrap(), state);
        assert_eq!(store.read_state(&certified).unwrap(), NameState::default());
        let hash = |name: &Domain| sha256_hex(name.as_str());
        assert_eq!(
            files(&dir.path().join("certs")),
            BTreeSet::from([
                format!("{readable}.pem"),
                format!("{}.pem", hash(&certified))
            ])
        );
        assert_eq!(
            files(&dir.path().join("names")),
            BTreeSet::from([
                format!("{readable}.json"),
                format!("{}.json", hash(&recorded))
            ])
        );
        assert_eq!(
            store.names().unwrap(),
            BTreeSet::from([readable, certified.clone(), recorded.clone()])
        );

        // A hashed file is listed only as the name whose hash it has.
        let misplaced = format!("{}.pem", hash(&long_name(250)));
        std::fs::copy(
            dir.path()
                .join("certs")
                .join(format!("{}.pem", hash(&certified))),
            dir.path().join("certs").join(misplaced),
        )
        .unwrap();
        assert_eq!(store.names().unwrap().len(), 3);

        // Set aside, a hashed certificate is gone from the listing and its record stays.
        let lock = store.lock().await.unwrap();
        let aside = store.set_aside_certificate(&lock, &certified).unwrap();
        assert!(aside.starts_with(&format!("certs/{}.pem.unusable-", hash(&certified))));
        assert_eq!(store.read_certificate(&certified).unwrap(), None);
        assert!(!store.names().unwrap().contains(&certified));
        assert!(store.names().unwrap().contains(&recorded));
    }

    #[test]
    fn a_link_in_the_store_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), b"secret").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("certs/b.example.pem")).unwrap();
        let name = Domain::parse("b.example").unwrap();
        assert!(store.read_certificate(&name).is_err());
    }

    #[test]
    fn a_fifo_in_the_store_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let fifo = dir.path().join("certs/f.example.pem");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, Mode::from_raw_mode(0o600)).unwrap();
        let name = Domain::parse("f.example").unwrap();
        let error = store.read_certificate(&name).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
    }

    #[test]
    fn a_subdirectory_open_to_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(store(dir.path()));
        let names = dir.path().join("names");
        std::fs::set_permissions(&names, std::fs::Permissions::from_mode(0o755)).unwrap();
        let error = Store::open(File::open(dir.path()).unwrap().into())
            .err()
            .unwrap();
        assert!(error.to_string().contains("mode 755"), "{error}");
    }

    #[test]
    fn other_files_are_not_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        for file in [
            "certs/.a.example.pem.tmp-0123",
            "certs/UPPER.example.pem",
            "certs/notes.txt",
            "names/c.example.json",
        ] {
            std::fs::write(dir.path().join(file), b"x").unwrap();
        }
        let names: Vec<_> = store.names().unwrap().into_iter().collect();
        assert_eq!(names, [Domain::parse("c.example").unwrap()]);
    }

    #[tokio::test]
    async fn an_unusable_certificate_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let name = Domain::parse("d.example").unwrap();
        let lock = store.lock().await.unwrap();
        store.write_certificate(&lock, &name, b"garbage").unwrap();
        let aside = store.set_aside_certificate(&lock, &name).unwrap();
        assert!(
            aside.starts_with("certs/d.example.pem.unusable-"),
            "{aside}"
        );
        assert_eq!(std::fs::read(dir.path().join(&aside)).unwrap(), b"garbage");
        assert_eq!(store.read_certificate(&name).unwrap(), None);
        assert!(store.names().unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_record_is_set_aside_and_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let name = Domain::parse("e.example").unwrap();
        std::fs::write(dir.path().join("names/e.example.json"), b"{not json").unwrap();
        let state = store.read_state(&name).unwrap();
        let now = crate::clock::now();
        assert!(state
            .backoff
            .waiting_until(now)
            .is_some_and(|t| t >= now + 3500));
        assert_eq!(store.read_state(&name).unwrap(), state, "kept in the store");
        let aside: Vec<_> = std::fs::read_dir(dir.path().join("names"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.starts_with("e.example.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        let kept = std::fs::read(dir.path().join("names").join(&aside[0])).unwrap();
        assert_eq!(kept, b"{not json");
    }

    #[test]
    fn a_scratch_dir_goes_with_its_contents() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let scratch = store.scratch_dir().unwrap();
        let path = dir.path().join(scratch.path());
        assert_eq!(mode(&path), 0o700);
        std::fs::write(path.join("key.pem"), b"k").unwrap();
        assert_eq!(scratch.read("key.pem").unwrap(), b"k");
        drop(scratch);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn leftovers_of_a_kill_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let scratch = store.scratch_dir().unwrap();
        let scratch_path = dir.path().join(scratch.path());
        std::fs::write(scratch_path.join("key.pem"), b"k").unwrap();
        std::mem::forget(scratch); // as a kill would leave it
        for file in [
            "certs/.a.example.pem.tmp-0123456789abcdef",
            "certs/a.example.pem",
            "names/.a.example.json.tmp-1",
            "challenges/.7.json.tmp-3",
            ".account.json.tmp-2",
            "account.json",
        ] {
            std::fs::write(dir.path().join(file), b"x").unwrap();
        }
        let lock = store.lock().await.unwrap();
        let mut removed = store.remove_leftovers(&lock).unwrap();
        removed.sort();
        assert_eq!(removed.len(), 5, "{removed:?}");
        assert!(!scratch_path.exists());
        assert!(dir.path().join("certs/a.example.pem").exists());
        assert!(dir.path().join("account.json").exists());
        assert!(!dir.path().join(".account.json.tmp-2").exists());
    }

    #[test]
    fn challenges_are_kept_until_removed_and_other_files_are_not_challenges() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let challenge = |id| AcmeToWorker::HttpChallenge {
            id,
            name: Domain::parse("c.example").unwrap(),
            token: "t".into(),
            key_authorization: "t.k".into(),
        };
        store.write_challenge(7, &challenge(7)).unwrap();
        for file in [".8.json.tmp-1", "9.json", "notes.txt"] {
            std::fs::write(dir.path().join("challenges").join(file), b"x").unwrap();
        }
        assert_eq!(store.challenges().unwrap(), [(7, challenge(7))]);
        assert_eq!(mode(&dir.path().join("challenges/7.json")), 0o600);
        store.remove_challenge(7).unwrap();
        store.remove_challenge(7).unwrap();
        assert_eq!(store.challenges().unwrap(), []);
    }

    #[tokio::test]
    async fn the_lock_excludes_another_process_until_the_last_guard_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let first = store.lock().await.unwrap();
        let second = store.lock().await.unwrap();
        // Another open file description stands for the other helper.
        let other = File::open(dir.path().join("lock")).unwrap();
        let try_other = || rustix::fs::flock(&other, FlockOperation::NonBlockingLockExclusive);
        assert!(try_other().is_err());
        drop(first);
        assert!(try_other().is_err(), "still held by the second guard");
        drop(second);
        try_other().unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(100), store.lock()).await;
        assert!(waiting.is_err(), "waits while the other process holds it");
        rustix::fs::flock(&other, FlockOperation::Unlock).unwrap();
        store.lock().await.unwrap();
    }
}
