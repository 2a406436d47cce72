//! The open-file limit: raised from the soft limit (often 1024) to the hard one at start, so the
//! worker, which inherits it, can hold as many connections as the system allows its user.

use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tracing::{info, warn};

/// Raises our soft `RLIMIT_NOFILE` to the hard limit (children inherit it) and logs the value.
pub fn raise() {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return warn!("cannot read the open-file limit: {e}"),
    };
    if soft >= hard {
        return info!("open-file limit: {soft}");
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => info!("open-file limit: {hard} (raised from {soft})"),
        Err(e) => {
            warn!("cannot raise the open-file limit from {soft} to {hard} ({e}); keeping {soft}")
        }
    }
}
