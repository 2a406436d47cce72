//! Wall-clock time as certificates, the CA and the store count it: seconds since the epoch.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now() -> u64 {
    secs(SystemTime::now())
}

pub fn secs(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `secs` for people: `2026-11-25T20:00:00Z`.
pub fn show(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}
