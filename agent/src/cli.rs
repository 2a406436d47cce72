//! `core-agent`'s command line, turned into an [`AgentConfig`] and the app's address.

use std::net::{SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use core_agent::{read_token, AgentConfig, Tls, TOKEN_ENV};

/// Serve DOMAIN's requests, from core-server, by the local app at --to: the agent dials out to
/// core-server (TLS on port 443 by default) and the connection is reversed, so the app needs no
/// inbound port. The token comes from `core-server tunnel allow DOMAIN`.
#[derive(Parser, Debug)]
#[command(name = "core-agent", version)]
struct Cli {
    /// The tunnel domain (as allowed by `core-server tunnel allow`).
    domain: String,
    /// The local app, HOST:PORT (plain HTTP/1.1).
    #[arg(long, value_name = "HOST:PORT")]
    to: String,
    /// The token (visible in `ps`: prefer --token-file or $CORE_AGENT_TOKEN).
    #[arg(long, value_name = "T", conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token.
    #[arg(long, value_name = "F")]
    token_file: Option<PathBuf>,
    /// core-server's address [default: DOMAIN:443, or DOMAIN:80 with --insecure-plaintext].
    #[arg(long, value_name = "HOST:PORT")]
    connect: Option<String>,
    /// Trust only the CA certificates of this PEM file (a test or mkcert CA).
    #[arg(long, value_name = "PEM", conflicts_with = "insecure_plaintext")]
    ca: Option<PathBuf>,
    /// Speak plain HTTP to core-server (local mode only): the token and all traffic unencrypted.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Connections to keep open.
    #[arg(long, value_name = "N", default_value_t = 2)]
    connections: usize,
    /// Shown by `core-server status` [default: hostname/pid].
    #[arg(long, value_name = "L")]
    label: Option<String>,
    /// How long a stopping agent waits for requests in flight (e.g. 30s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Requests in flight at once per connection.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_streams: u32,
    /// Threads serving the connections. One suits an agent sharing a small machine with its
    /// app: its work per request is small, and threads waking each other cost more than they
    /// give (bench/tunnel.sh: about a quarter less CPU per request). Raise it when the agent
    /// needs more than one core.
    #[arg(long, value_name = "N", default_value = "1")]
    threads: NonZeroUsize,
}

/// What the command line asks for.
#[derive(Debug)]
pub struct Parsed {
    pub config: AgentConfig,
    /// The app's address (`--to`).
    pub app: SocketAddr,
    /// `--threads`.
    pub threads: NonZeroUsize,
}

/// The configuration and the app's address, or why the command line cannot work (clap's own
/// errors, and `--help`, exit by themselves, with status 2 and 0).
pub fn parse() -> Result<Parsed, String> {
    from_args(std::env::args_os(), std::env::var(TOKEN_ENV).ok())
}

fn from_args(
    args: impl IntoIterator<Item = std::ffi::OsString>,
    env_token: Option<String>,
) -> Result<Parsed, String> {
    let cli = Cli::parse_from(args);
    let token = read_token(cli.token.as_deref(), cli.token_file.as_deref(), env_token)
        .map_err(|e| e.to_string())?;
    if cli.token.is_some() {
        eprintln!("core-agent: WARNING: --token shows in `ps` to every user of this machine: prefer --token-file or ${TOKEN_ENV}");
    }
    let app = cli
        .to
        .to_socket_addrs()
        .map_err(|e| format!("--to {}: {e}", cli.to))?
        .next()
        .ok_or_else(|| format!("--to {}: no address", cli.to))?;
    let tls = match (cli.ca, cli.insecure_plaintext) {
        (_, true) => Tls::InsecurePlaintext,
        (Some(path), false) => {
            Tls::CaPem(std::fs::read(&path).map_err(|e| format!("--ca {}: {e}", path.display()))?)
        }
        (None, false) => Tls::SystemRoots,
    };
    let mut config = AgentConfig::new(cli.domain, token);
    config.connect = cli.connect;
    config.tls = tls;
    config.connections = cli.connections;
    config.label = cli.label;
    config.grace = cli.grace;
    config.max_streams = cli.max_streams;
    Ok(Parsed {
        config,
        app,
        threads: cli.threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use core_agent::Token;

    fn args(list: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("core-agent")
            .chain(list.iter().copied())
            .map(Into::into)
            .collect()
    }

    #[test]
    fn the_defaults_and_the_environments_token() {
        let token = Token::generate().unwrap();
        let Parsed {
            config,
            app,
            threads,
        } = from_args(
            args(&["app.example.com", "--to", "127.0.0.1:3000"]),
            Some(token.as_str().to_owned()),
        )
        .unwrap();
        assert_eq!(threads.get(), 1);
        assert_eq!(app, "127.0.0.1:3000".parse().unwrap());
        assert_eq!(config.token, token);
        assert_eq!(config.connections, 2);
        assert_eq!(config.max_streams, 4096);
        assert_eq!(config.grace, Duration::from_secs(30));
        assert!(matches!(config.tls, Tls::SystemRoots));
    }

    #[test]
    fn every_option() {
        let token = Token::generate().unwrap();
        let Parsed {
            config, threads, ..
        } = from_args(
            args(&[
                "app.example.com",
                "--to",
                "127.0.0.1:3000",
                "--token",
                token.as_str(),
                "--connect",
                "127.0.0.1:8080",
                "--insecure-plaintext",
                "--connections",
                "3",
                "--label",
                "laptop",
                "--grace",
                "2s",
                "--max-streams",
                "10",
                "--threads",
                "4",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(config.connect.as_deref(), Some("127.0.0.1:8080"));
        assert!(matches!(config.tls, Tls::InsecurePlaintext));
        assert_eq!(
            (config.connections, config.grace, config.max_streams),
            (3, Duration::from_secs(2), 10)
        );
        assert_eq!(config.label.as_deref(), Some("laptop"));
        assert_eq!(threads.get(), 4);
    }

    #[test]
    fn a_missing_token_or_ca_file_is_explained() {
        let error =
            from_args(args(&["app.example.com", "--to", "127.0.0.1:3000"]), None).unwrap_err();
        assert!(error.contains("--token-file"), "{error}");
        let token = Token::generate().unwrap();
        let error = from_args(
            args(&[
                "app.example.com",
                "--to",
                "127.0.0.1:3000",
                "--ca",
                "/nonexistent.pem",
            ]),
            Some(token.as_str().to_owned()),
        )
        .unwrap_err();
        assert!(error.contains("--ca /nonexistent.pem"), "{error}");
    }
}
