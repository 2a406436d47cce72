//! The signals that stop the instance cleanly.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// The signals that ask for a clean stop: SIGTERM, SIGINT (Ctrl-C), and SIGHUP (the terminal
/// of a foreground instance went away), whose default action would skip the drain. Caught
/// from the start, so one arriving while the instance starts is a clean stop too.
pub struct StopSignals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl StopSignals {
    pub fn new() -> std::io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
            _ = self.hup.recv() => "SIGHUP",
        }
    }
}
