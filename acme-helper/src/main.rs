//! `core-server-acme`: the ACME helper. Started by the supervisor with no privilege left, it
//! owns the certificate store (`DIR/acme`, handed over as a descriptor) and the ACME account,
//! and hands the worker the certificates of the names it serves: from the store, from an
//! ACME CA (release mode) or from mkcert (local mode).
//!
//! Like OpenBSD's acme-client: one process for one job, small typed messages, and confined
//! (see `sandbox.rs`) before it reads anything but `Start`. It has no listening socket.

mod account;
mod backoff;
mod certificate;
mod clock;
mod issuer;
mod mkcert;
mod names;
mod order;
mod renewal;
mod sandbox;
mod store;
mod supervisor_link;
mod worker_link;

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use core_server_proto::acme_ipc::CertificateSource;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::account::AcmeAccount;
use crate::issuer::{Issuer, Source};
use crate::store::Store;
use crate::supervisor_link::SupervisorLink;
use crate::worker_link::WorkerLink;

/// How long the orders under way may take to finish once the supervisor says `Shutdown`:
/// a little more than a handshake waits for its certificate (`--acme-wait`, 10 s), which
/// is what a rerun's old worker waits for. Past it they are abandoned, and each counts as
/// failed in its name's backoff.
const FINISH_WAIT: Duration = Duration::from_secs(15);

fn main() -> ExitCode {
    core_server_proto::logging::init();
    // One thread: the sandbox, applied after `Start`, then covers every thread there will be.
    let result = core_server_proto::dumpable::forbid()
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")
        })
        .and_then(|runtime| {
            let result = runtime.block_on(run());
            // The orders are done or abandoned: no waiting for a DNS lookup in a blocking
            // thread.
            runtime.shutdown_background();
            result
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    // One TLS provider for the whole process, whatever features other crates turn on.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let supervisor = Arc::new(SupervisorLink::inherited()?);
    let (settings, store_dir) = supervisor.receive_start().await?;
    // mkcert runs here, with paths relative to the store: never outside it.
    rustix::process::fchdir(&store_dir).context("cannot enter the store directory")?;
    let mkcert = match settings.source {
        CertificateSource::Mkcert => settings.mkcert.clone(),
        CertificateSource::Acme => None,
    };
    sandbox::apply(store_dir.as_fd(), mkcert.as_ref()).context("cannot sandbox the helper")?;
    let store = Arc::new(Store::open(store_dir).context("cannot open the certificate store")?);

    let source = match (settings.source, mkcert) {
        (CertificateSource::Mkcert, Some(mkcert)) => {
            info!(
                "local mode: certificates from {} (CAROOT {})",
                mkcert.binary.display(),
                mkcert.caroot.display()
            );
            Source::Mkcert(mkcert)
        }
        (CertificateSource::Mkcert, None) => {
            warn!("{}", issuer::NO_MKCERT);
            Source::NoMkcert
        }
        (CertificateSource::Acme, _) => {
            info!("release mode: certificates from {}", settings.directory);
            Source::Acme(AcmeAccount::new(settings))
        }
    };
    let (requests, mut incoming) = mpsc::unbounded_channel();
    let link = WorkerLink::new(requests, store.clone())?;
    let issuer = Issuer::new(store, link.clone(), supervisor.clone(), source);
    supervisor.ready().await?;
    issuer.report_all().await;

    tokio::spawn(issuer.clone().answer_for_the_other_helper());
    tokio::spawn(issuer.clone().prepare());
    tokio::spawn(renewal::run(issuer.clone()));
    {
        let issuer = issuer.clone();
        tokio::spawn(async move {
            while let Some(request) = incoming.recv().await {
                issuer.handle(request);
            }
        });
    }
    supervisor.follow(|fd| link.replace(fd)).await;
    // For a worker still serving (a rerun's old one: its handshakes wait for them). With the
    // worker gone (a stop), no one could answer the CA's validations: no wait.
    if link.has_worker()
        && tokio::time::timeout(FINISH_WAIT, issuer.finish())
            .await
            .is_err()
    {
        warn!("orders still under way after {FINISH_WAIT:?}: abandoned");
    }
    Ok(())
}
