//! A throwaway mkcert CA for local-mode tests: a `CAROOT` in a temporary directory (never the
//! user's own), created by running the real mkcert once, and the environment that makes a
//! core-server use it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;

/// A mkcert CA of its own, removed on drop.
pub struct MkcertCa {
    dir: tempfile::TempDir,
}

impl MkcertCa {
    /// Creates the CA: mkcert makes one in an empty `CAROOT` the first time it issues a
    /// certificate (a throwaway one here). When the tests run as root the children run as
    /// `nobody`, and the helper runs mkcert as that user: the CA is handed to it.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = MkcertCa { dir };
        let output = Command::new("mkcert")
            .env("CAROOT", ca.caroot())
            .current_dir(ca.dir.path())
            .args([
                "-cert-file",
                "throwaway.pem",
                "-key-file",
                "throwaway-key.pem",
            ])
            .arg("localhost")
            .output()
            .expect("run mkcert (scripts/test.sh installs it)");
        assert!(
            output.status.success() && ca.root_pem().is_file(),
            "mkcert made no CA in {}: {}",
            ca.caroot().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        if nix::unistd::Uid::effective().is_root() {
            let nobody = nix::unistd::User::from_name("nobody")
                .unwrap()
                .expect("a user nobody");
            for entry in [
                ca.caroot(),
                ca.root_pem(),
                ca.caroot().join("rootCA-key.pem"),
            ] {
                nix::unistd::chown(&entry, Some(nobody.uid), Some(nobody.gid)).unwrap();
            }
        }
        ca
    }

    /// The `CAROOT` directory (`rootCA.pem`, `rootCA-key.pem`).
    pub fn caroot(&self) -> PathBuf {
        self.dir.path().join("caroot")
    }

    /// The CA's root certificate (PEM): what a client trusts to accept mkcert's certificates.
    pub fn root_pem(&self) -> PathBuf {
        self.caroot().join("rootCA.pem")
    }

    /// The environment to give a core-server so that it finds this CA and mkcert: `CAROOT`,
    /// and a `PATH` holding mkcert's directory.
    pub fn env(&self) -> Vec<(String, String)> {
        let mkcert = crate::which("mkcert").expect("mkcert on PATH (scripts/test.sh installs it)");
        let mut path = mkcert.parent().unwrap().as_os_str().to_owned();
        if let Some(rest) = std::env::var_os("PATH") {
            path.push(":");
            path.push(rest);
        }
        vec![
            (
                "CAROOT".to_owned(),
                self.caroot().to_string_lossy().into_owned(),
            ),
            ("PATH".to_owned(), path.to_string_lossy().into_owned()),
        ]
    }
}

impl Default for MkcertCa {
    fn default() -> Self {
        Self::new()
    }
}
