//! The tunnel agent, for apps that are not on core-server's machine (behind NAT, on a laptop,
//! in another network). It dials out to core-server, proves with its token that it may serve
//! a domain, and serves that domain's requests over the reversed HTTP/2 connection: no inbound
//! port anywhere. The `core-agent` binary forwards them to a local app ([`forward_to`]); a Rust
//! program can instead serve its own hyper service in-process, with no local port at all:
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use core_agent::{serve, sigterm_or_sigint, AgentConfig, Tls, Token};
//! use http_body_util::Full;
//! use hyper::{body::Incoming, service::service_fn, Request, Response};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let token = Token::parse(&std::env::var("CORE_AGENT_TOKEN")?)?;
//! let mut config = AgentConfig::new("app.example.com", token);
//! config.tls = Tls::SystemRoots; // the default; `CaPem` for a test CA
//! let hello = service_fn(|_: Request<Incoming>| async {
//!     Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("hello from in-process\n"))))
//! });
//! serve(config, hello, sigterm_or_sigint()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! `agent/examples/in_process.rs` is this example, runnable. [`serve`] keeps
//! [`AgentConfig::connections`] connections up, reconnecting forever with backoff, and when
//! `shutdown` resolves it drains them: no request in flight fails.

mod app_pool;
mod backoff;
mod config;
mod connection;
mod control;
mod dial;
mod forward;
mod pool;
mod shutdown;

use std::future::Future;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper::service::Service;
use tracing::{info, warn};

pub use app_pool::AppBody;
pub use config::{read_token, AgentConfig, ConfigError, Tls, TOKEN_ENV};
pub use core_server_proto::tunnel::Token;
pub use forward::{forward_to, ForwardBody, ForwardService};
pub use shutdown::sigterm_or_sigint;

/// Why [`serve`] could not run. Once running it never fails: it reconnects until `shutdown`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Serves `service` for `config.domain` through core-server until `shutdown` resolves, then
/// drains (see the crate's documentation).
pub async fn serve<S, B>(
    config: AgentConfig,
    service: S,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let settings = config.check()?;
    if settings.tls.is_none() {
        warn!("WARNING: insecure plaintext (--insecure-plaintext): the token and every request cross the network unencrypted; use it only with core-server in local mode on a network you trust");
    }
    let grace = settings.grace;
    let pool = Arc::new(pool::Pool {
        builder: connection::http2_builder(settings.max_streams),
        settings,
        service,
        shutdown: shutdown::Shutdown::default(),
    });
    pool.clone().start();
    shutdown.await;
    info!("draining the tunnel connections (at most {grace:?})");
    pool.shutdown.drain(grace).await;
    info!("stopped");
    Ok(())
}
