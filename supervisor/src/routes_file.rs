//! The routes table on disk: `<dir>/routes.json`, written atomically after every change.
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

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use core_server_proto::routes::{keep_routable, Routable, Route, RouteChange, Routes};
use core_server_proto::tunnel::TokenHash;
use serde::{Deserialize, Serialize};

use crate::state_dir::StateDir;

const FILE_NAME: &str = "routes.json";
/// The newest version this one reads, and writes when there are tunnel routes.
const VERSION: u32 = 2;
/// What it writes without tunnel routes (as earlier versions did).
const VERSION_WITHOUT_TUNNELS: u32 = 1;

#[derive(Serialize)]
struct Contents<'a> {
    version: u32,
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

    /// The saved table; empty if there is none yet, or if it was corrupt (and moved aside).
    /// For start-up only: it also removes what an interrupted save left.
    pub fn load(&self) -> anyhow::Result<Routes> {
        match self.dir.remove_leftovers(FILE_NAME) {
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
        let bytes = match self.dir.read(FILE_NAME) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(Routes::default()),
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
            let aside = self.keep_aside("refused")?;
            for (name, why) in &refused {
                tracing::error!(
                    "{}: left out the route for '{name}': {why} (the file as it was is kept as {aside})",
                    self.path().display()
                );
            }
            self.save(&routes)
                .with_context(|| format!("cannot save {}", self.path().display()))?;
        }
        Ok(routes)
    }

    pub fn save(&self, routes: &Routes) -> io::Result<()> {
        let tunnels = routes.has_tunnels();
        let contents = Contents {
            version: if tunnels {
                VERSION
            } else {
                VERSION_WITHOUT_TUNNELS
            },
            routes: (routes.iter())
                .map(|(domain, route)| (domain.as_str(), Stored::of(route)))
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&contents).map_err(io::Error::other)?;
        json.push(b'\n');
        // Token hashes are no secret, but who may connect is no one else's business.
        self.dir
            .replace(FILE_NAME, &json, if tunnels { 0o600 } else { 0o644 })
    }

    fn set_aside(&self, why: &str) -> anyhow::Result<Routes> {
        let aside = self
            .keep_aside("corrupt")
            .with_context(|| format!("{} is corrupt ({why})", self.path().display()))?;
        tracing::error!(
            "routes file {} is corrupt ({why}); moved it to {aside} and starting with no routes",
            self.path().display(),
        );
        Ok(Routes::default())
    }

    /// Moves the file to `routes.json.<what>-<time>` (never over an earlier one); its path.
    fn keep_aside(&self, what: &str) -> anyhow::Result<String> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let aside = self
            .dir
            .rename_to_new(FILE_NAME, &format!("{FILE_NAME}.{what}-{stamp}"))
            .with_context(|| format!("cannot move {} aside", self.path().display()))?;
        Ok(self.dir.path().join(aside).display().to_string())
    }
}

/// The supervisor's copy of the table, the file it is kept in, and whether the two differ.
pub struct SavedRoutes {
    routes: Routes,
    file: RoutesFile,
    dirty: bool,
}

impl SavedRoutes {
    /// `routes` as they are in `file` (or are about to be, once saved).
    pub fn new(routes: Routes, file: RoutesFile) -> Self {
        SavedRoutes {
            routes,
            file,
            dirty: false,
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
        match self.routes.apply(change) {
            Ok(changed) => self.dirty |= changed,
            Err(e) => tracing::warn!("worker reported a change that does not apply: {e}"),
        }
    }

    /// Writes the table if it changed since the last successful save (a failed one is retried
    /// at the next). The error is worded for the command's sender.
    pub fn save(&mut self) -> Result<(), String> {
        if !self.dirty {
            return Ok(());
        }
        match self.file.save(&self.routes) {
            Ok(()) => {
                self.dirty = false;
                Ok(())
            }
            Err(e) => {
                let e = format!("cannot save {}: {e}", self.file.path().display());
                tracing::error!("{e}");
                Err(e)
            }
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

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        assert!(file.load().unwrap().is_empty());
        let routes: Routes = [(Domain::parse("a.example").unwrap(), 8080)]
            .into_iter()
            .collect();
        file.save(&routes).unwrap();
        assert_eq!(file.load().unwrap(), routes);
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
            assert!(file.load().unwrap().is_empty());
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
        let routes = file.load().unwrap();
        let names: Vec<_> = routes.iter().map(|(d, r)| (d.as_str(), r)).collect();
        assert_eq!(names, [("kept.example", &Route::Port(80))]);
        // The file now holds what is served; the old one is kept aside as it was.
        assert_eq!(file.load().unwrap(), routes);
        let aside: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".refused-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        assert_eq!(fs::read(&aside[0]).unwrap(), old);
    }

    #[test]
    fn saved_routes_write_only_when_the_table_changed() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        let path = file.path().to_path_buf();
        let mut saved = SavedRoutes::new(Routes::default(), file);
        let set = |port| RouteChange::Set {
            domain: Domain::parse("a.example").unwrap(),
            port,
        };

        saved.apply(&set(1));
        saved.save().unwrap();
        assert!(path.exists());
        fs::remove_file(&path).unwrap();
        saved.apply(&set(1)); // the same port again: nothing to write
        saved.save().unwrap();
        assert!(!path.exists());
        saved.apply(&set(2));
        saved.save().unwrap();
        assert_eq!(
            in_tempdir(&dir)
                .load()
                .unwrap()
                .get(&Domain::parse("a.example").unwrap()),
            Some(&Route::Port(2))
        );
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
        assert_eq!(file.load().unwrap(), routes);

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
        assert!(file.load().unwrap().is_empty(), "a bad hash is corruption");
        let too_many: Vec<_> = (0..=MAX_TOKENS_PER_DOMAIN)
            .map(|n| format!("\"{n:064x}\""))
            .collect();
        let json = format!(
            "{{\"version\":2,\"routes\":{{\"a.example\":{{\"tunnel\":[{}]}}}}}}",
            too_many.join(",")
        );
        fs::write(file.path(), json).unwrap();
        assert!(
            file.load().unwrap().is_empty(),
            "more tokens than allowed is corruption"
        );
    }

    #[test]
    fn newer_format_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        fs::write(file.path(), b"{\"version\":3,\"routes\":{},\"more\":1}").unwrap();
        let err = file.load().unwrap_err().to_string();
        assert!(err.contains("newer core-server"), "{err}");
        assert!(file.path().exists());
    }

    #[test]
    fn corrupt_files_set_aside_in_the_same_second_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = in_tempdir(&dir);
        for garbage in ["{first", "{second", "{third"] {
            fs::write(file.path(), garbage).unwrap();
            assert!(file.load().unwrap().is_empty());
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
        fs::write(
            dir.path().join(".routes.json.tmp-00c0ffee00c0ffee"),
            b"{torn",
        )
        .unwrap();
        assert_eq!(file.load().unwrap(), routes);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["routes.json"]);
    }
}
