//! Local mode: a certificate for a name from `mkcert` (ECDSA), with the CA in `CAROOT`.
//!
//! mkcert writes its two files itself, not atomically, so it writes them into a private
//! scratch directory in the store (its working directory is the store: the paths given to it
//! are relative and beneath it); they are read back, checked, and stored as one file by the
//! issuer. It runs with `CAROOT` as its whole environment, and the name, checked once more,
//! after `--`, so nothing in it can be read as an option.

use std::process::Stdio;
use std::time::Duration;

use core_server_proto::acme_ipc::Mkcert;
use core_server_proto::domain::Domain;
use tokio::process::Command;

use crate::certificate::Certificate;
use crate::names::checked;
use crate::store::Store;

/// mkcert takes a few milliseconds; this bounds a hung one.
const TIMEOUT: Duration = Duration::from_secs(30);

/// One mkcert at a time: the first run makes the CA, and a second one at the same moment
/// would make another and overwrite it.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The source line of mkcert's certificates: a change of CA means new certificates.
pub fn source(mkcert: &Mkcert) -> String {
    format!("mkcert {}", mkcert.caroot.display())
}

pub async fn issue(mkcert: &Mkcert, store: &Store, name: &Domain) -> Result<Certificate, String> {
    let arg = checked(name).map_err(|e| e.to_string())?;
    let scratch = store
        .scratch_dir()
        .map_err(|e| format!("cannot make a scratch directory: {e}"))?;
    let (cert_file, key_file) = ("cert.pem", "key.pem");
    let mut command = Command::new(&mkcert.binary);
    command
        .env_clear()
        .env("CAROOT", &mkcert.caroot)
        .arg("-ecdsa")
        .arg("-cert-file")
        .arg(format!("{}/{cert_file}", scratch.path()))
        .arg("-key-file")
        .arg(format!("{}/{key_file}", scratch.path()))
        .arg("--")
        .arg(arg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let _turn = ONE_AT_A_TIME.lock().await;
    let run = command.output();
    let output = match tokio::time::timeout(TIMEOUT, run).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => return Err(format!("cannot run {}: {e}", mkcert.binary.display())),
        Err(_) => return Err(format!("mkcert took more than {TIMEOUT:?}")),
    };
    if !output.status.success() {
        let said = String::from_utf8_lossy(&output.stderr);
        let said = said
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "mkcert failed ({}) with CAROOT={}: {said}",
            output.status,
            mkcert.caroot.display()
        ));
    }
    let mut pem = scratch
        .read(key_file)
        .map_err(|e| format!("mkcert wrote no key: {e}"))?;
    pem.extend(
        scratch
            .read(cert_file)
            .map_err(|e| format!("mkcert wrote no certificate: {e}"))?,
    );
    let mut certificate =
        Certificate::from_pem(name, &pem).map_err(|e| format!("mkcert's certificate: {e}"))?;
    certificate.source = Some(source(mkcert));
    Ok(certificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// With the real mkcert, when installed (the integration tests require it).
    #[tokio::test]
    async fn makes_a_checked_certificate_inside_the_store() {
        let Ok(binary) = which("mkcert") else {
            assert!(std::env::var_os("CI").is_none(), "mkcert is not installed");
            eprintln!("mkcert not installed; skipped");
            return;
        };
        let caroot = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(File::open(dir.path()).unwrap().into()).unwrap();
        // Relative paths are beneath the store, as in the helper (which changes directory
        // to it); this test process instead runs mkcert from the store's path.
        let mkcert = Mkcert {
            binary,
            caroot: caroot.path().to_owned(),
        };
        std::env::set_current_dir(dir.path()).unwrap();
        let name = Domain::parse("local.example").unwrap();
        let cert = issue(&mkcert, &store, &name).await.unwrap();
        assert!(cert.issuer.starts_with("mkcert"), "{}", cert.issuer);
        assert_eq!(cert.chain.len(), 1);
        assert_eq!(cert.source, Some(source(&mkcert)));
        let tmp: Vec<_> = std::fs::read_dir(dir.path().join("tmp")).unwrap().collect();
        assert!(tmp.is_empty(), "scratch directory removed: {tmp:?}");
    }

    fn which(program: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
            .ok_or(())
    }
}
