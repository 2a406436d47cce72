//! Serving a Rust program's own hyper service through a core-server tunnel, in-process, with
//! no local port: every request to the tunnel domain is answered "hello from in-process".
//!
//! ```text
//! CORE_AGENT_DOMAIN=app.example.com CORE_AGENT_TOKEN=$(cat app.token) \
//!     cargo run -p core-agent --example in_process
//! ```
//!
//! `CORE_AGENT_CONNECT` (HOST:PORT) overrides where core-server is; `CORE_AGENT_CA` names a PEM
//! file of CA certificates to trust instead of the web's roots (mkcert's `rootCA.pem`), and
//! `CORE_AGENT_INSECURE_PLAINTEXT=1` speaks plain HTTP (core-server in local mode only).

use std::convert::Infallible;
use std::process::ExitCode;

use bytes::Bytes;
use core_agent::{read_token, serve, sigterm_or_sigint, AgentConfig, Tls, TOKEN_ENV};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};

#[tokio::main]
async fn main() -> ExitCode {
    core_server_proto::logging::init();
    let config = match config_from_env() {
        Ok(config) => config,
        Err(message) => {
            eprintln!("in_process: {message}");
            return ExitCode::from(2);
        }
    };
    let hello = service_fn(|_: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            b"hello from in-process\n",
        ))))
    });
    match serve(config, hello, sigterm_or_sigint()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("in_process: {e}");
            ExitCode::from(2)
        }
    }
}

fn config_from_env() -> Result<AgentConfig, String> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let domain = var("CORE_AGENT_DOMAIN").ok_or("set CORE_AGENT_DOMAIN to the tunnel domain")?;
    let token = read_token(None, None, var(TOKEN_ENV)).map_err(|e| e.to_string())?;
    let mut config = AgentConfig::new(domain, token);
    config.connect = var("CORE_AGENT_CONNECT");
    if var("CORE_AGENT_INSECURE_PLAINTEXT").as_deref() == Some("1") {
        config.tls = Tls::InsecurePlaintext;
    } else if let Some(path) = var("CORE_AGENT_CA") {
        config.tls =
            Tls::CaPem(std::fs::read(&path).map_err(|e| format!("CORE_AGENT_CA {path}: {e}"))?);
    }
    Ok(config)
}
