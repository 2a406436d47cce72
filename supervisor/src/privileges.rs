//! Dropping privilege for the children: the one place core-server gives it up.
//!
//! What to become is decided in the parent ([`Unprivileged::for_user`]: looking a user up reads
//! /etc/passwd and allocates, which a forked child must not do). [`Unprivileged::apply`] then
//! runs in the child between fork and exec, before a line of the child's own code:
//!
//! 1. started as root: supplementary groups dropped, then gid, then uid set to `--user`;
//! 2. always: ambient, inheritable, permitted and effective capabilities cleared;
//! 3. always: `PR_SET_NO_NEW_PRIVS`, so no later exec (setuid binary, file capabilities) can
//!    give anything back.
//!
//! The child binaries carry no file capabilities, so after exec their permitted and effective
//! sets are empty whether the supervisor was root or a `setcap`'d ordinary user.
//!
//! The supervisor itself is made non-dumpable ([`protect_supervisor`]): a process of the same
//! uid (a worker, when the supervisor runs as an ordinary user) can then neither ptrace it nor
//! read its memory or environment through /proc.

use std::io;

use anyhow::{bail, Context};
use caps::CapSet;
use nix::unistd::{setgid, setgroups, setuid, Gid, Uid, User};

/// Makes this process non-dumpable (`PR_SET_DUMPABLE` 0): no core dump, no ptrace and no
/// /proc/<pid>/{mem,environ,fd} for anyone without `CAP_SYS_PTRACE`. Our children get their
/// own setting at exec.
pub fn protect_supervisor() -> anyhow::Result<()> {
    nix::sys::prctl::set_dumpable(false).context("cannot make the supervisor non-dumpable")
}

#[derive(Debug, Clone, Copy)]
pub struct Unprivileged {
    /// `Some` when started as root: the uid and gid to switch to.
    ids: Option<(Uid, Gid)>,
}

impl Unprivileged {
    /// Children become `user` if we are root, and stay our (unprivileged) user otherwise.
    pub fn for_user(user: &str) -> anyhow::Result<Self> {
        if !Uid::effective().is_root() {
            return Ok(Unprivileged { ids: None });
        }
        let entry = User::from_name(user)
            .with_context(|| format!("cannot look up user '{user}'"))?
            .with_context(|| format!("no user '{user}' on this system (see --user)"))?;
        if entry.uid.is_root() || entry.gid.as_raw() == 0 {
            bail!("--user {user} has uid or gid 0: the children must run unprivileged");
        }
        Ok(Unprivileged {
            ids: Some((entry.uid, entry.gid)),
        })
    }

    /// The uid and gid children switch to (`None`: they keep ours).
    pub fn ids(&self) -> Option<(Uid, Gid)> {
        self.ids
    }

    /// The uid children run as.
    pub fn uid(&self) -> Uid {
        self.ids.map_or_else(Uid::effective, |(uid, _)| uid)
    }

    /// Drops every privilege of the calling process. Only async-signal-safe system calls on
    /// success (it runs between fork and exec); an error allocates its message, which glibc's
    /// fork-safe malloc allows, and the child then never runs.
    pub fn apply(&self) -> io::Result<()> {
        if let Some((uid, gid)) = self.ids {
            setgroups(&[])?;
            setgid(gid)?;
            setuid(uid)?;
            // The kernel clears the capability sets on this uid change; check that root cannot
            // be regained, as OpenBSD's daemons do.
            if setuid(Uid::from_raw(0)).is_ok() {
                return Err(io::Error::other(
                    "still able to become root after dropping privilege",
                ));
            }
        }
        for set in [CapSet::Ambient, CapSet::Inheritable, CapSet::Permitted] {
            caps::clear(None, set).map_err(|e| io::Error::other(e.to_string()))?;
        }
        nix::sys::prctl::set_no_new_privs()?;
        Ok(())
    }
}
