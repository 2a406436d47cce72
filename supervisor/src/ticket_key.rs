//! The TLS session-ticket key: made once, kept in `DIR/tls-ticket-key` (0600), handed to every
//! worker. A client's ticket then still resumes after a worker restart or a rerun, as with
//! nginx's `ssl_session_ticket_key` file. Workers derive rotating keys from it (see the
//! worker's `session_tickets.rs`), so this one never encrypts a ticket itself.

use anyhow::{bail, Context};
use core_server_proto::acme_ipc::{Secret, TICKET_KEY_FILE};

use crate::state_dir::StateDir;

const KEY_LEN: usize = 32;

/// The key in `dir`, made if there is none yet.
pub fn load_or_create(dir: &StateDir) -> anyhow::Result<Secret> {
    let path = dir.path().join(TICKET_KEY_FILE);
    // What a kill during the first start's write left (the key itself is whole or absent).
    dir.remove_leftovers(TICKET_KEY_FILE)
        .with_context(|| format!("cannot clean up next to {}", path.display()))?;
    if let Some(key) = dir
        .read_secret(TICKET_KEY_FILE)
        .with_context(|| format!("cannot read the session-ticket key {}", path.display()))?
    {
        if key.len() != KEY_LEN {
            bail!(
                "{} holds {} bytes, not {KEY_LEN}: remove it and a new key is made (clients \
                 then make full handshakes once)",
                path.display(),
                key.len()
            );
        }
        return Ok(Secret(key));
    }
    let mut key = vec![0; KEY_LEN];
    rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty())
        .context("cannot get random bytes for the session-ticket key")?;
    dir.replace(TICKET_KEY_FILE, &key, 0o600)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Secret(key))
}
