//! The first thing each child does: make itself non-dumpable.
//!
//! `exec` makes a process dumpable again after the supervisor dropped its privileges, so any
//! other process of the children's user (other daemons running as `nobody`) could otherwise
//! ptrace a child, read its memory (served keys, the ticket key) or open its descriptors
//! through `/proc/<pid>/fd` (the certificate store). Non-dumpable, only root may.

pub fn forbid() -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| std::io::Error::other(format!("cannot make this process non-dumpable: {e}")))
}
