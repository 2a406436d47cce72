//! The routes table on disk: `<dir>/routes.json`, replaced atomically (for a large table, with a
//! journal of the changes since beside it: see below).
//!
//! ```json
//! {"version":1,"routes":{"example.com":5665}}
//! ```
//!
//! With a tunnel route, the file is version 2 and readable by root alone (0600), and a tunnel
//! route holds the SHA-256 of each token that may connect (never a token):
//!
//! ```json
//! {"version":2,"routes":{"example.com":5665,"app.example.com":{"tunnel":["9f86d08…"]}}}
//! ```
//!
//! Without one, it stays version 1, byte for byte what earlier versions wrote, so that they
//! can still read it after a downgrade.
//!
//! A file that cannot be read as this format is moved aside to `routes.json.corrupt-<time>`
//! (`-2`, `-3`... after it if that name is taken; kept for the operator, never deleted) and
//! reported by name; the server then starts with an empty table instead of refusing to serve
//! at all. A file from a newer core-server is not touched: this one refuses to start rather
//! than lose what it cannot read. A file from an older core-server may hold names this one
//! refuses (its rules for names were looser): those routes are left out, each named in the
//! log, and the file as it was is kept aside as `routes.json.refused-<time>`. A temp file that
//! a kill during a save left behind is removed at the next start.
//!
//! A large table is not rewritten for every change: once `routes.json` is past [`SMALL`]
//! (some 2,000 routes), it is a snapshot, and the changes made since are in a journal beside
//! it, `routes.log` (`routes_journal.rs`); [`SavedRoutes`] keeps the two. A change is appended
//! to the journal and fsync'd before it is acknowledged; when the journal has grown past the
//! snapshot, the table is compacted: a new snapshot is written (atomically, as ever), then a
//! new, empty journal replaces the old one. The two are linked by a random journal id, drawn
//! anew at each compaction and written into `routes.json` (`"journal": "…"`, only when a
//! journal is in use) and into the journal's first line. A kill between the two steps leaves
//! a journal that names the snapshot before, so it is known stale and dropped: the new
//! snapshot holds all of it. A version that knows no journal drops the id when it rewrites
//! `routes.json`, so a journal from before is stale then too. A corrupt journal is kept as
//! `routes.log.corrupt-<time>` (a second name, made durable) before the compaction that replaces
//! it, so a kill between loses none of its whole changes; a journal found without
//! `routes.json` is moved to `routes.log.orphan-<time>`, not replayed; both are reported.
//! At start-up the journal is replayed over the snapshot and, if it held anything, the table is
//! compacted; on a clean stop too. A small table, and any change to a tunnel route (rare, and
//! what makes the file version 2 and private, or version 1 again), are written whole as
//! before: `routes.json` alone then holds every route, for an operator reading it or a version
//! that knows no journal, and token hashes are never in the journal.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use core_server_proto::routes::{keep_routable, Routable, Route, RouteChange, Routes};
use core_server_proto::tunnel::TokenHash;
use serde::{Deserialize, Serialize};

use crate::routes_journal::{self, Journal};
use crate::state_dir::StateDir;

const FILE_NAME: &str = "routes.json";
/// The newest version this one reads, and writes when there are tunnel routes.
const VERSION: u32 = 2;
/// What it writes without tunnel routes (as earlier versions did).
const VERSION_WITHOUT_TUNNELS: u32 = 1;
/// A snapshot smaller than this is rewritten for every change, as cheap as an append (its
/// write is; the cost is in the fsyncs); past it, changes go to the journal, which is
/// compacted once larger than the snapshot.
pub const SMALL: u64 = 64 * 1024;

#[derive(Serialize)]
struct Contents<'a> {
    version: u32,
    /// The id of the journal that continues it, if one does (see `routes_journal.rs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    journal: Option<&'a str>,
    routes: BTreeMap<&'a str, Stored>,
}

/// A route as stored.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Stored {
    Port(u16),
    /// Hex SHA-256 of each token.
    Tunnel {
        tunnel: Vec<String>,
    },
}

/// The file as read: names as they are, judged afterwards (see the module comment).
#[derive(Deserialize)]
struct Read {
    version: u32,
    #[serde(default)]
    journal: Option<String>,
    routes: BTreeMap<String, Stored>,
}

impl Stored {
    fn of(route: &Route) -> Stored {
        match route {
            Route::Port(port) => Stored::Port(*port),
            Route::Tunnel { tokens } => Stored::Tunnel {
                tunnel: tokens.iter().map(TokenHash::to_hex).collect(),
            },
        }
    }

    fn route(self) -> Result<Route, String> {
        match self {
            Stored::Port(port) => Ok(Route::Port(port)),
            Stored::Tunnel { tunnel } => (tunnel.iter())
                .map(|hex| {
                    TokenHash::from_hex(hex).ok_or_else(|| format!("bad token hash '{hex}'"))
                })
                .collect::<Result<_, _>>()
                .and_then(Route::tunnel),
        }
    }
}

pub struct RoutesFile {
    dir: StateDir,
}

impl RoutesFile {
    pub fn in_dir(dir: &StateDir) -> Self {
        RoutesFile { dir: dir.clone() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join(FILE_NAME)
    }

    /// The state directory the file is in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The snapshot; empty if there is none yet, or if it was corrupt (and moved aside).
    /// For start-up only: it also removes what an interrupted save left.
    fn load(&self) -> anyhow::Result<Snapshot> {
        for name in [FILE_NAME, routes_journal::FILE_NAME] {
            match self.dir.remove_leftovers(name) {
                Ok(removed) => {
                    for name in removed {
                        tracing::info!("removed {name}, left by a save that was interrupted");
                    }
                }
                Err(e) => tracing::warn!(
                    "cannot remove temp files left in {}: {e}",
                    self.dir.display()
                ),
            }
        }
        let bytes = match self.dir.read(FILE_NAME) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(Snapshot::default()),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", self.path().display()))
            }
        };
        // Read the version alone first, so a newer format is told apart from corruption.
        #[derive(Deserialize)]
        struct Version {
            version: u32,
        }
        match serde_json::from_slice::<Version>(&bytes) {
            Ok(Version { version }) if version > VERSION => bail!(
                "{} has format version {version}, written by a newer core-server; this one reads \
                 version {VERSION}. Run the newer core-server, or move the file away to start empty",
                self.path().display()
            ),
            _ => {}
        }
        let read = match serde_json::from_slice::<Read>(&bytes) {
            Ok(read) if (VERSION_WITHOUT_TUNNELS..=VERSION).contains(&read.version) => read,
            Ok(read) => return self.set_aside(&format!("unknown format version {}", read.version)),
            Err(e) => return self.set_aside(&e.to_string()),
        };
        let stored: Result<BTreeMap<_, _>, String> = (read.routes.into_iter())
            .map(|(name, stored)| Ok((name, stored.route()?)))
            .collect();
        let stored = match stored {
            Ok(stored) => stored,
            Err(e) => return self.set_aside(&e),
        };
        let Routable { kept, refused } = keep_routable(stored);
        let routes: Routes = kept.into_iter().collect();
        if !refused.is_empty() {
            let aside = self.keep_aside(FILE_NAME, "refused")?;
            for (name, why) in &refused {
                tracing::error!(
                    "{}: left out the route for '{name}': {why} (the file as it was is kept as {aside})",
                    self.path().display()
                );
            }
        }
        Ok(Snapshot {
            routes,
            journal: read.journal,
            len: bytes.len() as u64,
            rewrite: !refused.is_empty(),
            found: true,
            set_aside: false,
        })
    }

    /// Writes `routes` as the snapshot; the journal id written in it if the table is not small
    /// (a journal is to continue it), and its size.
    fn save(&self, routes: &Routes) -> io::Result<(Option<String>, u64)> {
        let tunnels = routes.has_tunnels();
        let id = routes_journal::new_id()?;
        let mut contents = Contents {
            version: if tunnels {
                VERSION
            } else {
                VERSION_WITHOUT_TUNNELS
            },
            journal: Some(&id),
            routes: (routes.iter())
                .map(|(domain, route)| (domain.as_str(), Stored::of(route)))
                .collect(),
        };
        let to_json = |contents: &Contents| -> io::Result<Vec<u8>> {
            let mut json = serde_json::to_vec_pretty(contents).map_err(io::Error::other)?;
            json.push(b'\n');
            Ok(json)
        };
        let mut json = to_json(&contents)?;
        // A small table needs no journal: written without the id, byte for byte what earlier
        // versions wrote (again, but small, so cheap; a large one is serialised once).
        if json.len() < SMALL as usize {
            contents.journal = None;
            json = to_json(&contents)?;
        }
        // Token hashes are no secret, but who may connect is no one else's business.
        self.dir
            .replace(FILE_NAME, &json, if tunnels { 0o600 } else { 0o644 })?;
        let id = contents.journal.map(str::to_owned);
        Ok((id, json.len() as u64))
    }

    fn set_aside(&self, why: &str) -> anyhow::Result<Snapshot> {
        let aside = self
            .keep_aside(FILE_NAME, "corrupt")
            .with_context(|| format!("{} is corrupt ({why})", self.path().display()))?;
        tracing::error!(
            "routes file {} is corrupt ({why}); moved it to {aside} and starting with no routes",
            self.path().display(),
        );
        Ok(Snapshot {
            set_aside: true,
            ..Snapshot::default()
        })
    }

    /// Moves file `name` to `<name>.<what>-<time>` (never over an earlier one); its path.
    fn keep_aside(&self, name: &str, what: &str) -> anyhow::Result<String> {
        let aside = self.dir.rename_to_new(name, &aside_name(name, what));
        self.aside_path(name, aside)
    }

    /// Keeps file `name` as `<name>.<what>-<time>` too (never over an earlier one), durably,
    /// while it stays where it is until replaced; its new path.
    fn link_aside(&self, name: &str, what: &str) -> anyhow::Result<String> {
        let aside = self.dir.link_to_new(name, &aside_name(name, what));
        self.aside_path(name, aside)
    }

    fn aside_path(&self, name: &str, aside: io::Result<String>) -> anyhow::Result<String> {
        let aside = aside.with_context(|| {
            format!("cannot keep {} aside", self.dir.path().join(name).display())
        })?;
        Ok(self.dir.path().join(aside).display().to_string())
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.path().join(routes_journal::FILE_NAME)
    }
}

/// `<name>.<what>-<time>`: a name to keep file `name` under, for the operator.
fn aside_name(name: &str, what: &str) -> String {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!("{name}.{what}-{stamp}")
}

/// The snapshot as loaded.
#[derive(Default)]
struct Snapshot {
    routes: Routes,
    /// The id of the journal that continues it, if one does.
    journal: Option<String>,
    len: u64,
    /// It holds routes left out: it is to be written again as loaded.
    rewrite: bool,
    /// There was one (else the table starts empty).
    found: bool,
    /// It was corrupt, and moved aside.
    set_aside: bool,
}

/// The supervisor's copy of the table, and the snapshot and journal it is kept in.
pub struct SavedRoutes {
    routes: Routes,
    file: RoutesFile,
    /// Where changes go; `None`: the next save writes the snapshot (the table is small, or
    /// the journal is yet to be started after it: for a taker, or after a failed write).
    journal: Option<Journal>,
    snapshot_len: u64,
    /// The table differs from what is on disk.
    dirty: bool,
    /// Changes applied but not yet saved.
    unsaved: Vec<RouteChange>,
    /// One of them changed a tunnel route: the next save writes the snapshot.
    tunnel_changed: bool,
}

impl SavedRoutes {
    /// The table in `file`'s snapshot and journal, compacted if the journal held anything (a
    /// failure to is logged: the next save tries again). For start-up only.
    pub fn load(file: RoutesFile) -> anyhow::Result<Self> {
        let snapshot = file.load()?;
        let journal_path = file.journal_path();
        let mut saved = SavedRoutes {
            routes: snapshot.routes,
            file,
            journal: None,
            snapshot_len: snapshot.len,
            dirty: false,
            unsaved: Vec::new(),
            tunnel_changed: false,
        };
        let contents = routes_journal::read(&saved.file.dir, snapshot.journal.as_deref())
            .with_context(|| format!("cannot read {}", journal_path.display()))?;
        // Whether to go on with it as it is; else whether to compact now (with nothing in
        // it, or a stale one, the first save does).
        let (whole, compact) = match contents {
            routes_journal::Contents::Missing => (false, false),
            // The changes it holds were made to what is no longer there.
            _ if snapshot.set_aside => {
                let aside = saved.file.keep_aside(routes_journal::FILE_NAME, "corrupt")?;
                tracing::error!(
                    "moved the routes journal {} to {aside}, with the routes file it continues",
                    journal_path.display()
                );
                (false, false)
            }
            // Its snapshot is gone (moved away by the operator, say): what its changes were
            // made to is unknown, so they are not replayed, but the file is kept.
            _ if !snapshot.found => {
                let aside = saved.file.keep_aside(routes_journal::FILE_NAME, "orphan")?;
                tracing::error!(
                    "found the routes journal {} without {FILE_NAME}, the snapshot it continues; \
                     moved it to {aside} and starting with no routes",
                    journal_path.display()
                );
                (false, false)
            }
            routes_journal::Contents::Stale => {
                // Superseded (see the module comment): the next compaction would replace it.
                match routes_journal::remove(&saved.file.dir) {
                    Ok(()) => tracing::info!(
                        "removed {}: it continued an earlier {FILE_NAME}, which holds all it had",
                        journal_path.display()
                    ),
                    Err(e) => tracing::warn!("cannot remove {}: {e}", journal_path.display()),
                }
                (false, false)
            }
            routes_journal::Contents::Newer(version) => bail!(
                "{} has format version {version}, written by a newer core-server; this one reads \
                 version 1. Run the newer core-server, or move it and {FILE_NAME} away to start empty",
                journal_path.display()
            ),
            routes_journal::Contents::Changes { changes, torn, corrupt } => {
                for change in &changes {
                    // As the worker applied them: one that did not apply then does not now.
                    let _ = saved.routes.apply(change);
                }
                if !changes.is_empty() {
                    tracing::info!(
                        "{}: replayed {} changes over {FILE_NAME}",
                        journal_path.display(),
                        changes.len()
                    );
                }
                if torn > 0 {
                    tracing::warn!(
                        "{}: dropped the last {torn} bytes, a change being written when core-server \
                         was stopped short (it was never acknowledged)",
                        journal_path.display()
                    );
                }
                if let Some(why) = &corrupt {
                    // Kept under a new name as well, not moved: until the compaction below
                    // replaces it, it is where its whole changes are.
                    let aside = saved.file.link_aside(routes_journal::FILE_NAME, "corrupt")?;
                    tracing::error!(
                        "routes journal {} is corrupt ({why}); kept it as {aside}, keeping the {} \
                         changes in it that are whole",
                        journal_path.display(),
                        changes.len()
                    );
                }
                let whole = changes.is_empty() && torn == 0 && corrupt.is_none();
                (whole, !whole)
            }
        };
        if compact || snapshot.rewrite {
            saved.dirty = true;
            let _ = saved.compact();
        } else if whole && snapshot.len >= SMALL {
            match Journal::reopen(&saved.file.dir) {
                Ok(journal) => saved.journal = Some(journal),
                Err(e) => tracing::warn!("cannot open {}: {e}", journal_path.display()),
            }
        }
        Ok(saved)
    }

    /// `routes` as another instance handed them over: nothing is written until
    /// [`SavedRoutes::compact`] (or the first save) writes them all.
    pub fn new(routes: Routes, file: RoutesFile) -> Self {
        SavedRoutes {
            routes,
            file,
            journal: None,
            snapshot_len: 0,
            dirty: true,
            unsaved: Vec::new(),
            tunnel_changed: false,
        }
    }

    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The state directory the file is in.
    pub fn dir(&self) -> &Path {
        self.file.dir()
    }

    /// Applies a change the worker made to its live table.
    pub fn apply(&mut self, change: &RouteChange) {
        let was_tunnel = matches!(self.routes.get(change.domain()), Some(Route::Tunnel { .. }));
        match self.routes.apply(change) {
            Ok(true) => {
                self.dirty = true;
                self.tunnel_changed |= was_tunnel
                    || matches!(
                        change,
                        RouteChange::AllowTunnel { .. } | RouteChange::RevokeTunnel { .. }
                    );
                self.unsaved.push(change.clone());
            }
            Ok(false) => {}
            Err(e) => tracing::warn!("worker reported a change that does not apply: {e}"),
        }
    }

    /// Makes every change applied so far durable: one append and fsync for all of them, or a
    /// write of the snapshot (see the module comment). A failed save is retried at the next.
    /// The error is worded for the command's sender.
    pub fn save(&mut self) -> Result<(), String> {
        if !self.dirty {
            return Ok(());
        }
        let journal = match &mut self.journal {
            Some(journal) if !self.tunnel_changed => journal,
            _ => return self.compact(),
        };
        match journal.append(&self.unsaved) {
            Ok(()) => {
                self.unsaved.clear();
                self.dirty = false;
                Ok(())
            }
            Err(e) => {
                // Where its end is, no one knows: the next save writes a snapshot instead.
                self.journal = None;
                let e = format!("cannot save {}: {e}", self.file.journal_path().display());
                tracing::error!("{e}");
                Err(e)
            }
        }
    }

    /// Compacts if the journal has outgrown the snapshot (after a save, once its changes are
    /// acknowledged: the cost falls on no one waiting).
    pub fn compact_if_due(&mut self) {
        if let Some(journal) = &self.journal {
            if journal.len() > self.snapshot_len.max(SMALL) {
                let _ = self.compact();
            }
        }
    }

    /// Writes the whole table as the snapshot, then starts a new journal after it if the
    /// table is not small, else removes the journal (see the module comment for why a kill
    /// between the two loses nothing).
    pub fn compact(&mut self) -> Result<(), String> {
        // Whatever happens now, the old journal is appended to no more.
        self.journal = None;
        let written = self.file.save(&self.routes).and_then(|(id, len)| {
            self.snapshot_len = len;
            match id {
                None => routes_journal::remove(&self.file.dir).map(|()| None),
                Some(id) => Journal::start(&self.file.dir, &id).map(Some),
            }
        });
        match written {
            Ok(journal) => {
                self.journal = journal;
                self.dirty = false;
                self.unsaved.clear();
                self.tunnel_changed = false;
                Ok(())
            }
            Err(e) => {
                let e = format!("cannot save {}: {e}", self.file.path().display());
                tracing::error!("{e}");
                Err(e)
            }
        }
    }

    /// Leaves every route in the snapshot, where a version without a journal reads them (on
    /// a clean stop).
    pub fn compact_for_stop(&mut self) {
        if self.dirty || self.journal.as_ref().is_some_and(|j| !j.is_empty()) {
            let _ = self.compact();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_server_proto::domain::Domain;
    use std::fs;

    fn in_tempdir(dir: &tempfile::TempDir) -> RoutesFile {
        RoutesFile::in_dir(&StateDir::open(dir.path()).unwrap())
    }

    /// The table a start-up in `dir` finds.
    fn loaded(dir: &tempfile::TempDir) -> Routes {
        SavedRoutes::load(in_tempdir(dir)).unwrap().routes
    }

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        assert!(loaded(&dir).is_empty());
        let routes: Routes = [(Domain::parse("a.example").unwrap(), 8080)]
            .into_iter()
            .collect();
        file.save(&routes).unwrap();
        assert_eq!(loaded(&dir), routes);
    }

    #[test]
    fn corrupt_file_is_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        for garbage in [
            &b"{not json"[..],
            b"{\"version\":1,\"routes\":{\"a.example\":\"eighty\"}}",
            b"{\"version\":0,\"routes\":{}}",
        ] {
            fs::write(file.path(), garbage).unwrap();
            assert!(loaded(&dir).is_empty());
            assert!(!file.path().exists());
            let aside: Vec<_> = fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            assert_eq!(aside.len(), 1, "{aside:?}");
            assert_eq!(fs::read(&aside[0]).unwrap(), garbage);
            fs::remove_file(&aside[0]).unwrap();
        }
    }

    #[test]
    fn names_an_older_version_accepted_are_left_out_and_the_file_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        let old = b"{\"version\":1,\"routes\":{\"127.1\":81,\"kept.example\":80}}";
        fs::write(file.path(), old).unwrap();
        let routes = loaded(&dir);
        let names: Vec<_> = routes.iter().map(|(d, r)| (d.as_str(), r)).collect();
        assert_eq!(names, [("kept.example", &Route::Port(80))]);
        // The file now holds what is served; the old one is kept aside as it was.
        assert_eq!(file.load().unwrap().routes, routes);
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".refused-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(fs::read(&aside[0]).unwrap(), old);
    }

    fn set(name: &str, port: u16) -> RouteChange {
        RouteChange::Set {
            domain: Domain::parse(name).unwrap(),
            port,
        }
    }

    fn journal_len(dir: &tempfile::TempDir) -> u64 {
        fs::metadata(dir.path().join(routes_journal::FILE_NAME))
            .unwrap()
            .len()
    }

    #[test]
    fn saved_routes_write_only_when_the_table_changed() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        let path = file.path().to_path_buf();
        let mut saved = SavedRoutes::new(Routes::default(), file);

        saved.apply(&set("a.example", 1));
        saved.save().unwrap();
        assert!(path.exists());
        fs::remove_file(&path).unwrap();
        saved.apply(&set("a.example", 1)); // the same port again: nothing to write
        saved.save().unwrap();
        assert!(!path.exists());
        saved.apply(&set("a.example", 2));
        saved.save().unwrap();
        assert_eq!(
            loaded(&dir).get(&Domain::parse("a.example").unwrap()),
            Some(&Route::Port(2))
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["routes.json"], "a small table needs no journal");
    }

    #[test]
    fn tunnels_make_it_version_2_and_private_and_without_them_it_is_version_1_again() {
        use core_server_proto::tunnel::MAX_TOKENS_PER_DOMAIN;
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        let mode = || fs::metadata(file.path()).unwrap().permissions().mode() & 0o777;
        let [app, port] = ["app.example", "port.example"].map(|n| Domain::parse(n).unwrap());
        let hash = TokenHash([0xab; 32]);
        let mut routes: Routes = [(port.clone(), 80)].into_iter().collect();
        routes.insert(app.clone(), Route::Tunnel { tokens: vec![hash] });
        file.save(&routes).unwrap();
        let json = fs::read_to_string(file.path()).unwrap();
        assert!(json.contains("\"version\": 2"), "{json}");
        assert!(json.contains(&"ab".repeat(32)), "{json}");
        assert_eq!(mode(), 0o600);
        assert_eq!(loaded(&dir), routes);

        routes.insert(app, Route::Port(81));
        file.save(&routes).unwrap();
        let json = fs::read_to_string(file.path()).unwrap();
        assert_eq!(
            json,
            "{\n  \"version\": 1,\n  \"routes\": {\n    \"app.example\": 81,\n    \"port.example\": 80\n  }\n}\n"
        );
        assert_eq!(mode(), 0o644);

        fs::write(
            file.path(),
            b"{\"version\":2,\"routes\":{\"a.example\":{\"tunnel\":[\"xyz\"]}}}",
        )
        .unwrap();
        assert!(loaded(&dir).is_empty(), "a bad hash is corruption");
        let too_many: Vec<_> = (0..=MAX_TOKENS_PER_DOMAIN)
            .map(|n| format!("\"{n:064x}\""))
            .collect();
        let json = format!(
            "{{\"version\":2,\"routes\":{{\"a.example\":{{\"tunnel\":[{}]}}}}}}",
            too_many.join(",")
        );
        fs::write(file.path(), json).unwrap();
        assert!(
            loaded(&dir).is_empty(),
            "more tokens than allowed is corruption"
        );
    }

    #[test]
    fn newer_format_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        fs::write(file.path(), b"{\"version\":3,\"routes\":{},\"more\":1}").unwrap();
        let Err(err) = SavedRoutes::load(in_tempdir(&dir)) else {
            panic!("a newer format loads");
        };
        let err = err.to_string();
        assert!(err.contains("newer core-server"), "{err}");
        assert!(file.path().exists());
    }

    #[test]
    fn corrupt_files_set_aside_in_the_same_second_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        for garbage in ["{first", "{second", "{third"] {
            fs::write(file.path(), garbage).unwrap();
            assert!(loaded(&dir).is_empty());
        }
        let mut kept: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, ["{first", "{second", "{third"]);
    }

    #[test]
    fn loading_removes_temp_files_left_by_an_interrupted_save() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        let routes: Routes = [(Domain::parse("a.example").unwrap(), 8080)]
            .into_iter()
            .collect();
        file.save(&routes).unwrap();
        for leftover in [
            ".routes.json.tmp-00c0ffee00c0ffee",
            ".routes.log.tmp-00c0ffee00c0ffee",
        ] {
            fs::write(dir.path().join(leftover), b"{torn").unwrap();
        }
        assert_eq!(loaded(&dir), routes);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["routes.json"]);
    }

    /// Routes enough for a snapshot past [`SMALL`].
    fn many() -> Vec<RouteChange> {
        (0..2000)
            .map(|i| set(&format!("route-number-{i}.example"), 1000))
            .collect()
    }

    /// A large table saved in `dir` (its snapshot), then changes saved one by one (its
    /// journal): `r0`...`r4` added, `r0` re-pointed, `r1` removed. As an instance leaves it
    /// when killed: no compaction since.
    fn saved_with_journal(dir: &tempfile::TempDir) -> Routes {
        let mut saved = SavedRoutes::load(in_tempdir(dir)).unwrap();
        many().iter().for_each(|change| saved.apply(change));
        saved.save().unwrap();
        assert!(saved.snapshot_len >= SMALL);
        let mut changes: Vec<_> = (0..5).map(|i| set(&format!("r{i}.example"), 1)).collect();
        changes.push(set("r0.example", 2));
        changes.push(RouteChange::Remove {
            domain: Domain::parse("r1.example").unwrap(),
        });
        for change in &changes {
            saved.apply(change);
            saved.save().unwrap();
        }
        saved.routes
    }

    fn snapshot(dir: &tempfile::TempDir) -> Routes {
        in_tempdir(dir).load().unwrap().routes
    }

    #[test]
    fn changes_to_a_large_table_are_journaled_and_replayed_then_compacted_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let routes = saved_with_journal(&dir);
        assert_eq!(snapshot(&dir).len(), 2000, "the changes are in the journal");
        assert!(journal_len(&dir) > 300);
        assert_eq!(loaded(&dir), routes);
        // Loading compacted: the snapshot holds it all, the journal is empty again.
        assert_eq!(snapshot(&dir), routes);
        let empty = journal_len(&dir);
        assert!(empty < 200, "{empty} bytes");
        assert_eq!(loaded(&dir), routes);
        assert_eq!(
            journal_len(&dir),
            empty,
            "an empty journal is reopened as it is"
        );
    }

    #[test]
    fn a_kill_during_an_append_loses_only_the_change_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let routes = saved_with_journal(&dir);
        let path = dir.path().join(routes_journal::FILE_NAME);
        let mut journal = fs::read(&path).unwrap();
        journal.extend_from_slice(b"0123456789abcdef {\"Set\":{\"domain\":\"torn.exa");
        fs::write(&path, &journal).unwrap();
        let mut saved = SavedRoutes::load(in_tempdir(&dir)).unwrap();
        assert_eq!(saved.routes, routes);
        // The torn tail is gone: what is appended next is read back.
        saved.apply(&set("after.example", 9));
        saved.save().unwrap();
        assert!(journal_len(&dir) > 100, "appended");
        assert_eq!(
            loaded(&dir).get(&Domain::parse("after.example").unwrap()),
            Some(&Route::Port(9))
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "nothing set aside: {names:?}");
    }

    #[test]
    fn a_corrupt_journal_is_set_aside_and_its_whole_changes_kept() {
        let dir = tempfile::tempdir().unwrap();
        saved_with_journal(&dir);
        let path = dir.path().join(routes_journal::FILE_NAME);
        let journal = fs::read_to_string(&path).unwrap();
        // Damage the third change (r2): only it is lost.
        let damaged = journal.replacen("r2.example", "r2.exbmple", 1);
        fs::write(&path, &damaged).unwrap();
        let routes = loaded(&dir);
        let added: Vec<_> = (routes.iter())
            .map(|(d, _)| d.as_str())
            .filter(|d| !d.starts_with("route-number-"))
            .collect();
        assert_eq!(added, ["r0.example", "r3.example", "r4.example"]);
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains("routes.log.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(fs::read_to_string(&aside[0]).unwrap(), damaged);
        assert_eq!(loaded(&dir), routes, "compacted: the new journal is whole");
    }

    #[test]
    fn a_journal_without_its_snapshot_is_kept_aside_and_not_replayed() {
        let dir = tempfile::tempdir().unwrap();
        saved_with_journal(&dir);
        let journal = fs::read(dir.path().join("routes.log")).unwrap();
        fs::remove_file(dir.path().join("routes.json")).unwrap();
        assert!(loaded(&dir).is_empty());
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("routes.log.orphan-"), "{names:?}");
        assert_eq!(fs::read(dir.path().join(&names[0])).unwrap(), journal);
    }

    #[test]
    fn a_kill_at_any_step_of_a_compaction_leaves_the_same_routes() {
        let dir = tempfile::tempdir().unwrap();
        let routes = saved_with_journal(&dir);
        let old_snapshot = fs::read(dir.path().join("routes.json")).unwrap();
        let old_journal = fs::read(dir.path().join("routes.log")).unwrap();
        // Before the snapshot is replaced: the old one and its journal (as above). After it is
        // replaced, before the new journal: the old journal is stale...
        in_tempdir(&dir).save(&routes).unwrap();
        // ...and replaying it anyway would do no harm either (its changes are absolute).
        let state = StateDir::open(dir.path()).unwrap();
        let id = serde_json::from_slice::<Read>(&old_snapshot)
            .unwrap()
            .journal;
        let routes_journal::Contents::Changes { changes, .. } =
            routes_journal::read(&state, id.as_deref()).unwrap()
        else {
            panic!("the journal reads");
        };
        let mut replayed = routes.clone();
        for change in &changes {
            let _ = replayed.apply(change);
        }
        assert_eq!(replayed, routes);
        assert_eq!(loaded(&dir), routes);
        // A version without a journal that saved routes.json since makes the journal stale too.
        fs::write(dir.path().join("routes.log"), &old_journal).unwrap();
        let older: Routes = [(Domain::parse("older.example").unwrap(), 7)]
            .into_iter()
            .collect();
        in_tempdir(&dir).save(&older).unwrap();
        assert_eq!(loaded(&dir), older);
        assert!(
            !dir.path().join("routes.log").exists(),
            "a small table needs no journal: the stale one is gone"
        );
    }

    #[test]
    fn a_snapshot_rewritten_without_its_journal_id_makes_the_journal_stale_even_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        saved_with_journal(&dir);
        let path = dir.path().join("routes.json");
        let with_id = fs::read_to_string(&path).unwrap();
        let snapshot_routes = snapshot(&dir);
        assert!(
            with_id.contains("\n  \"journal\": \""),
            "{}",
            &with_id[..100]
        );
        // An older version, after a rollback, rewrites the same routes (say, one added, then
        // removed): the same bytes as this one would, but for the id it does not know.
        let older: String = (with_id.lines())
            .filter(|line| !line.starts_with("  \"journal\": "))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(older.len() + 49, with_id.len());
        fs::write(&path, &older).unwrap();
        // The journal's changes (r0... added, r1 removed) came after this snapshot and were
        // undone by the rollback: not replayed, and the journal is gone.
        assert_eq!(loaded(&dir), snapshot_routes);
        assert!(snapshot_routes
            .get(&Domain::parse("r0.example").unwrap())
            .is_none());
        assert!(!dir.path().join("routes.log").exists());
    }

    #[test]
    fn the_journal_is_compacted_once_larger_than_the_snapshot_and_on_a_clean_stop() {
        let dir = tempfile::tempdir().unwrap();
        let mut saved = SavedRoutes::load(in_tempdir(&dir)).unwrap();
        many().iter().for_each(|change| saved.apply(change));
        saved.save().unwrap();
        let mut compactions = 0;
        for i in 0..3000 {
            saved.apply(&set(&format!("r{i}.example"), 1000));
            saved.save().unwrap();
            let before = journal_len(&dir);
            saved.compact_if_due();
            compactions += usize::from(journal_len(&dir) < before);
            assert!(journal_len(&dir) <= saved.snapshot_len.max(SMALL) + 100);
        }
        assert!((1..5).contains(&compactions), "{compactions} compactions");
        assert_eq!(loaded(&dir), saved.routes);
        saved.apply(&set("last.example", 1));
        saved.save().unwrap();
        saved.compact_for_stop();
        assert_eq!(snapshot(&dir), saved.routes, "all in routes.json");
    }

    #[test]
    fn a_tunnel_change_writes_the_snapshot_and_no_token_hash_goes_to_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let routes = saved_with_journal(&dir);
        let mut saved = SavedRoutes::load(in_tempdir(&dir)).unwrap();
        assert_eq!(saved.routes, routes);
        let domain = Domain::parse("t.example").unwrap();
        let hash = TokenHash([0xcd; 32]);
        saved.apply(&RouteChange::AllowTunnel {
            domain: domain.clone(),
            token: hash,
        });
        saved.save().unwrap();
        let mut with_tunnel = routes.clone();
        with_tunnel.insert(domain.clone(), Route::Tunnel { tokens: vec![hash] });
        assert_eq!(snapshot(&dir), with_tunnel);
        saved.apply(&set("port.example", 1));
        saved.save().unwrap();
        saved.apply(&set("t.example", 2)); // the tunnel replaced: written whole again
        saved.save().unwrap();
        assert_eq!(snapshot(&dir).get(&domain), Some(&Route::Port(2)));
        let journal = fs::read_to_string(dir.path().join("routes.log")).unwrap();
        assert!(!journal.contains("Tunnel"), "{journal}");
        assert_eq!(loaded(&dir), saved.routes);
    }
}
