//! The command line, as the design's "Command line (supervisor)" contract states it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use core_server_proto::command::DEFAULT_UDP_PORT;

/// Let's Encrypt's production directory.
const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

#[derive(Parser, Debug)]
#[command(
    name = "core-server",
    version,
    about = "Many web apps, one machine's ports 80 and 443.",
    long_about = "Many web apps, one machine's ports 80 and 443.\n\n\
        Without a subcommand, runs the server: binds the ports once, starts the unprivileged \
        worker and routes each Host to the local port an app claimed with \
        `add DOMAIN PORT` (a UDP datagram to --udp-port from this machine). If an instance \
        already runs for the same --udp-port, takes over from it without losing a request."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub server: ServerOptions,

    /// UDP port for commands (also where `add` and `remove` send theirs)
    #[arg(long, global = true, default_value_t = DEFAULT_UDP_PORT, value_name = "PORT")]
    pub udp_port: u16,
}

#[derive(clap::Args, Debug, Clone)]
pub struct ServerOptions {
    /// TCP port for plain HTTP
    #[arg(long, default_value_t = 80, value_name = "PORT")]
    pub http_port: u16,

    /// TCP port for HTTPS
    #[arg(long, default_value_t = 443, value_name = "PORT")]
    pub https_port: u16,

    /// Directory for everything the server writes (routes state, later certificates and logs);
    /// default: /var/lib/core-server when started as root, else the current directory; on a
    /// rerun the running instance's
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// When started as root: the unprivileged user the children run as
    #[arg(long, default_value = "nobody", value_name = "NAME")]
    pub user: String,

    /// Time a client has to send a request header; also closes idle keep-alive connections
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_timeout: Duration,

    /// Time a client connection may go with no request in flight before it is closed (HTTP/2 PINGs do not count; HTTP/1 idles end at --header-timeout)
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub idle_timeout: Duration,

    /// The most client connections the worker keeps open; at the cap idle ones are closed to
    /// make room, else new clients wait (default: half the worker's open-file limit after a
    /// reserve of 256, one backend descriptor per client)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub max_connections: Option<u32>,

    /// Time a backend has to answer with a response header before the client gets 504; also
    /// the longest a backend may pause its body, a client its upload, and a client take
    /// nothing of its response (then it is cut off)
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub backend_timeout: Duration,

    /// local: attached, logs on stderr. release: detached, logs in DIR/logs/core.log
    /// (default: release in release builds, local otherwise)
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<Mode>,

    /// In release mode, stay attached (for systemd and tests); logs still go to the log file
    #[arg(long)]
    pub foreground: bool,

    /// The most all log files together may take, in bytes (release mode)
    #[arg(long, default_value_t = 200 * 1000 * 1000, hide = true)]
    pub log_cap: u64,

    /// Internal: the descriptor on which a detached instance reports that it serves
    #[arg(long, hide = true, value_name = "FD")]
    pub ready_fd: Option<i32>,

    /// Release mode: the ACME CA's directory URL
    #[arg(long, default_value = LETS_ENCRYPT, value_name = "URL")]
    pub acme_directory: String,

    /// Release mode: the contact address given to the ACME CA (for expiry notices)
    #[arg(long, value_name = "ADDR")]
    pub acme_email: Option<String>,

    /// Release mode: a PEM file of roots to trust for the ACME CA's own HTTPS (a test CA)
    #[arg(long, value_name = "PEM")]
    pub acme_ca_root: Option<PathBuf>,

    /// How long a handshake for a name without a certificate waits for one to be issued (the
    /// order goes on past it, so the next handshake is fast)
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub acme_wait: Duration,

    /// How long a request for a tunnel domain with no agent connected waits for one to
    /// (re)connect before it is answered 503
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub tunnel_wait: Duration,

    /// On SIGTERM or SIGINT: how long in-flight requests may take to finish
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub grace: Duration,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Route DOMAIN to 127.0.0.1:PORT on the running server (prints its reply)
    Add { domain: String, port: String },
    /// Stop routing DOMAIN on the running server (prints its reply)
    Remove { domain: String },
    /// Show the running server's processes, ports and routes
    Status,
    /// Stop the running server: in-flight requests finish, then it exits
    Stop,
    /// Reverse tunnels: domains served by a `core-agent` that dials in from elsewhere
    Tunnel {
        #[command(subcommand)]
        command: TunnelCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum TunnelCommand {
    /// Make DOMAIN a tunnel and print a new token for its agents, alone on stdout (`> FILE`
    /// keeps it); run again for another token
    Allow { domain: String },
    /// Drop every token of DOMAIN and disconnect its agents (it answers 503 until the next
    /// `allow`)
    Revoke { domain: String },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Local,
    Release,
}

impl Mode {
    /// The mode a build runs in when `--mode` is not given.
    pub fn of_this_build() -> Mode {
        if cfg!(feature = "release") {
            Mode::Release
        } else {
            Mode::Local
        }
    }
}
