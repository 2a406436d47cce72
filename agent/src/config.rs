//! What an agent is told ([`AgentConfig`]), where its token comes from, and the checks that turn
//! a configuration into the settings the agent runs with, so that a mistake is reported once, at
//! start, rather than on every dial.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use core_server_proto::domain::Domain;
use core_server_proto::tunnel::{Token, MAX_LABEL_LEN};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;

/// The environment variable the token is read from when neither `--token` nor `--token-file`
/// is given.
pub const TOKEN_ENV: &str = "CORE_AGENT_TOKEN";

/// How an agent reaches core-server and what it serves there.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The tunnel domain: TLS server name, `Host` of the handshake, and what the token allows.
    pub domain: String,
    /// As `core-server tunnel allow DOMAIN` printed it.
    pub token: Token,
    /// `HOST:PORT` of core-server; `None` is the domain on port 443 (80 in plaintext).
    pub connect: Option<String>,
    pub tls: Tls,
    /// Connections kept open at once (the worker balances requests over all of them).
    pub connections: usize,
    /// Requests in flight at once on one connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams: u32,
    /// How long a stopping agent waits for the requests in flight.
    pub grace: Duration,
    /// Shown by `core-server status`; `None` is `hostname/pid`.
    pub label: Option<String>,
}

impl AgentConfig {
    /// The defaults of `core-agent`: TLS with the web's roots, to the domain on port 443, two
    /// connections of up to 4096 streams, 30 s of grace, labelled `hostname/pid`.
    pub fn new(domain: impl Into<String>, token: Token) -> AgentConfig {
        AgentConfig {
            domain: domain.into(),
            token,
            connect: None,
            tls: Tls::SystemRoots,
            connections: 2,
            max_streams: 4096,
            grace: Duration::from_secs(30),
            label: None,
        }
    }
}

/// How the connection to core-server is secured.
#[derive(Clone)]
pub enum Tls {
    /// TLS, trusting the web PKI's roots (Mozilla's, from `webpki-roots`).
    SystemRoots,
    /// TLS, trusting only the certificates of this PEM (a test or mkcert CA).
    CaPem(Vec<u8>),
    /// No TLS: the token and every request cross the network in clear. For core-server in
    /// local mode on this machine or a trusted network only.
    InsecurePlaintext,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Tls::SystemRoots => "SystemRoots",
            Tls::CaPem(_) => "CaPem(…)",
            Tls::InsecurePlaintext => "InsecurePlaintext",
        })
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no tunnel token: pass --token-file FILE or set {TOKEN_ENV} (as `core-server tunnel allow DOMAIN` printed it)")]
    NoToken,
    #[error("the tunnel token {source_name}: {error}")]
    BadToken {
        source_name: String,
        error: core_server_proto::tunnel::TokenError,
    },
    #[error("cannot read the token file {path}: {error}")]
    TokenFile { path: String, error: std::io::Error },
    #[error("'{domain}' is not a domain name core-server can serve: {error}")]
    Domain {
        domain: String,
        error: core_server_proto::domain::DomainError,
    },
    #[error("--connect '{0}' is not HOST:PORT")]
    Connect(String),
    #[error("--connections must be between 1 and 64, not {0}")]
    Connections(usize),
    #[error("--max-streams must be at least 1")]
    MaxStreams,
    #[error("--label must be 1 to {MAX_LABEL_LEN} printable ASCII characters, without spaces")]
    Label,
    #[error("the CA certificate PEM: {0}")]
    CaPem(String),
    #[error("TLS set-up: {0}")]
    Tls(#[from] rustls::Error),
}

/// The token from `--token`, else from `--token-file`, else from `$CORE_AGENT_TOKEN`. An error
/// names the source, never the token.
pub fn read_token(
    flag: Option<&str>,
    file: Option<&Path>,
    env: Option<String>,
) -> Result<Token, ConfigError> {
    let (text, source_name) = match (flag, file, env) {
        (Some(token), _, _) => (token.to_owned(), "given with --token".to_owned()),
        (None, Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|error| ConfigError::TokenFile {
                path: path.display().to_string(),
                error,
            })?;
            warn_if_others_may_read(path);
            (text, format!("in {}", path.display()))
        }
        (None, None, Some(token)) => (token, format!("in ${TOKEN_ENV}")),
        (None, None, None) => return Err(ConfigError::NoToken),
    };
    Token::parse(&text).map_err(|error| ConfigError::BadToken { source_name, error })
}

/// A token file others may read is a token others may have: say so (as ssh does of keys).
fn warn_if_others_may_read(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{} is readable by others (mode {:o}): whoever reads it can serve this domain; \
                 chmod 600 it",
                path.display(),
                mode & 0o777
            );
        }
    }
}

/// A checked configuration, as the dialer and the connections use it.
pub(crate) struct Settings {
    pub domain: Domain,
    pub token: Token,
    /// `HOST:PORT`.
    pub connect: String,
    /// `None` in plaintext.
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    pub connections: usize,
    pub max_streams: u32,
    pub grace: Duration,
    pub label: String,
}

impl AgentConfig {
    pub(crate) fn check(self) -> Result<Settings, ConfigError> {
        let domain = Domain::parse(&self.domain).map_err(|error| ConfigError::Domain {
            domain: self.domain.clone(),
            error,
        })?;
        let default_port = match self.tls {
            Tls::InsecurePlaintext => 80,
            _ => 443,
        };
        let connect = match self.connect {
            Some(connect) => check_host_port(&connect)
                .then_some(connect.clone())
                .ok_or(ConfigError::Connect(connect))?,
            None => format!("{}:{default_port}", domain.as_str()),
        };
        if !(1..=64).contains(&self.connections) {
            return Err(ConfigError::Connections(self.connections));
        }
        if self.max_streams == 0 {
            return Err(ConfigError::MaxStreams);
        }
        let label = match self.label {
            Some(label) if is_label(&label) => label,
            Some(_) => return Err(ConfigError::Label),
            None => default_label(),
        };
        let tls = match self.tls {
            Tls::InsecurePlaintext => None,
            Tls::SystemRoots => {
                let roots = rustls::RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                };
                Some(connector(roots)?)
            }
            Tls::CaPem(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| ConfigError::CaPem(e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| ConfigError::CaPem(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(ConfigError::CaPem("no CERTIFICATE in it".into()));
                }
                Some(connector(roots)?)
            }
        };
        let tls = tls.map(|connector| {
            let name = ServerName::try_from(domain.as_str().to_owned())
                .expect("a checked domain is a DNS name");
            (connector, name)
        });
        Ok(Settings {
            domain,
            token: self.token,
            connect,
            tls,
            connections: self.connections,
            max_streams: self.max_streams,
            grace: self.grace,
            label,
        })
    }
}

/// TLS 1.2 or 1.3 with aws-lc-rs (as the worker), offering only `http/1.1`: the handshake is an
/// HTTP/1.1 upgrade, which `h2` would rule out.
fn connector(roots: rustls::RootCertStore) -> Result<TlsConnector, ConfigError> {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `host:port` or `[v6]:port`, with a numeric port.
fn check_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p != 0)
        }
        None => false,
    }
}

fn is_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len()) && label.bytes().all(|b| b.is_ascii_graphic())
}

/// `hostname/pid`, which tells apart both machines and several agents on one machine.
fn default_label() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "agent".to_owned());
    let pid = format!("/{}", std::process::id());
    let keep = host.len().min(MAX_LABEL_LEN - pid.len());
    format!("{}{pid}", &host[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        Token::generate().unwrap()
    }

    #[test]
    fn the_token_comes_from_the_flag_then_the_file_then_the_environment() {
        let (flag, file, env) = (token(), token(), token());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.token");
        std::fs::write(&path, format!("{}\n", file.as_str())).unwrap();
        let env = Some(env.as_str().to_owned());
        assert_eq!(
            read_token(Some(flag.as_str()), None, env.clone()).unwrap(),
            flag
        );
        assert_eq!(read_token(None, Some(&path), env.clone()).unwrap(), file);
        assert_eq!(
            read_token(None, None, env.clone()).unwrap(),
            Token::parse(env.as_deref().unwrap()).unwrap()
        );
        assert!(matches!(
            read_token(None, None, None),
            Err(ConfigError::NoToken)
        ));
    }

    #[test]
    fn a_bad_token_names_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.token");
        std::fs::write(&path, "not a token").unwrap();
        let error = read_token(None, Some(&path), None).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("cst1_"), "{error}");
        let error = read_token(None, None, Some("cst1_short".into()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("$CORE_AGENT_TOKEN"), "{error}");
        let missing = dir.path().join("missing");
        let error = read_token(None, Some(&missing), None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot read the token file"), "{error}");
    }

    #[test]
    fn the_connect_address_defaults_to_the_domain_on_the_https_or_http_port() {
        let settings = AgentConfig::new("App.Example.com", token())
            .check()
            .unwrap();
        assert_eq!(settings.connect, "app.example.com:443");
        assert!(settings.tls.is_some());
        let mut config = AgentConfig::new("app.example.com", token());
        config.tls = Tls::InsecurePlaintext;
        let settings = config.check().unwrap();
        assert_eq!(settings.connect, "app.example.com:80");
        assert!(settings.tls.is_none());
        assert!(settings
            .label
            .ends_with(&format!("/{}", std::process::id())));
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        let refused = |change: &dyn Fn(&mut AgentConfig)| {
            let mut config = AgentConfig::new("app.example.com", token());
            change(&mut config);
            config.check().err().expect("refused").to_string()
        };
        assert!(refused(&|c| c.domain = "127.0.0.1".into()).contains("IP address"));
        assert!(refused(&|c| c.connect = Some("proxy.example".into())).contains("HOST:PORT"));
        assert!(refused(&|c| c.connect = Some("proxy.example:http".into())).contains("HOST:PORT"));
        assert!(refused(&|c| c.connections = 0).contains("--connections"));
        assert!(refused(&|c| c.max_streams = 0).contains("--max-streams"));
        assert!(refused(&|c| c.label = Some("a b".into())).contains("--label"));
        assert!(refused(&|c| c.tls = Tls::CaPem(b"hello".to_vec())).contains("no CERTIFICATE"));
        let mut config = AgentConfig::new("app.example.com", token());
        config.connect = Some("[::1]:8443".into());
        assert_eq!(config.check().unwrap().connect, "[::1]:8443");
    }
}
