//! The live routes table, and the path by which every change reaches the supervisor's disk.
//!
//! A change applies at once (the next request sees it) and is reported to the supervisor with a
//! sequence number. The command's sender is answered `ok` only once the supervisor says every
//! change up to that number is saved, so `ok` means the route survives a restart.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use core_server_proto::channel::Channel;
use core_server_proto::command::Reply;
use core_server_proto::domain::Domain;
use core_server_proto::ipc::{FromWorker, ToWorker};
use core_server_proto::routes::{RouteChange, RouteError, Routes};
use tokio::sync::watch;

pub type SupervisorChannel = Channel<FromWorker, ToWorker>;

pub struct RouteTable {
    routes: RwLock<Routes>,
    supervisor: Arc<SupervisorChannel>,
    last_seq: AtomicU64,
    saved: watch::Sender<Saved>,
}

/// The supervisor's latest acknowledgement.
#[derive(Debug, Clone, Default)]
struct Saved {
    upto: u64,
    error: Option<String>,
}

impl RouteTable {
    pub fn new(routes: Routes, supervisor: Arc<SupervisorChannel>) -> Self {
        RouteTable {
            routes: RwLock::new(routes),
            supervisor,
            last_seq: AtomicU64::new(0),
            saved: watch::Sender::new(Saved::default()),
        }
    }

    pub fn port(&self, domain: &Domain) -> Option<u16> {
        self.routes
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .port(domain)
    }

    /// Applies `change` and reports it. Resolves to the reply for the command's sender once the
    /// change is saved. Changes must be made one at a time (the UDP loop does), so they reach
    /// the supervisor in the order they were applied.
    pub async fn change(
        &self,
        change: RouteChange,
    ) -> Result<impl Future<Output = Reply>, RouteError> {
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(&change)?;
        let seq = self.last_seq.fetch_add(1, Ordering::Relaxed) + 1;
        let sent = self
            .supervisor
            .send(&FromWorker::RouteChanged { seq, change }, &[])
            .await;
        let mut saved = self.saved.subscribe();
        Ok(async move {
            if let Err(e) = sent {
                return not_saved(&format!("cannot reach the supervisor: {e}"));
            }
            match saved.wait_for(|s| s.upto >= seq).await {
                Ok(s) => s.error.as_deref().map_or(Reply::Ok, not_saved),
                Err(_) => not_saved("the worker is stopping"),
            }
        })
    }

    /// The supervisor saved every change up to `upto` (or failed to: `error`).
    pub fn saved(&self, upto: u64, error: Option<String>) {
        self.saved.send_replace(Saved { upto, error });
    }

    /// The supervisor is gone: nothing waiting will ever be saved.
    pub fn supervisor_gone(&self) {
        self.saved(u64::MAX, Some("the supervisor is gone".into()));
    }
}

fn not_saved(why: &str) -> Reply {
    Reply::Error(format!("route applied but not saved: {why}"))
}
