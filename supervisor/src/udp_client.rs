//! `core-server add DOMAIN PORT` and `core-server remove DOMAIN`: send the UDP command to the
//! local instance, as any app would, and print its one-line reply.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use core_server_proto::command::{Command, Reply, MAX_COMMAND_LEN};

/// Long enough for a worker that is being restarted to come back and answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `words` as one command and prints the reply; failure on `error:` or no reply.
pub fn run(udp_port: u16, words: &[&str]) -> anyhow::Result<ExitCode> {
    let text = words.join(" ");
    // Same grammar as the server: a typo is caught here, before anything is sent, and told
    // in the same words the server would reply.
    let command = match Command::parse(text.as_bytes()) {
        Ok(command) => command,
        Err(e) => {
            println!("{}", Reply::Error(e.to_string()));
            return Ok(ExitCode::FAILURE);
        }
    };

    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot open a UDP socket")?;
    socket.connect((Ipv4Addr::LOCALHOST, udp_port))?;
    socket.set_read_timeout(Some(REPLY_TIMEOUT))?;
    socket.send(command.to_string().as_bytes())?;

    let mut reply = [0u8; MAX_COMMAND_LEN];
    let len = match socket.recv(&mut reply) {
        Ok(len) => len,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            bail!("no core-server is listening on UDP port {udp_port} (is it running? see --udp-port)")
        }
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            bail!(
                "no reply from UDP port {udp_port} within {}s",
                REPLY_TIMEOUT.as_secs()
            )
        }
        Err(e) => return Err(e).context("cannot read the reply"),
    };
    let reply = String::from_utf8_lossy(&reply[..len]);
    let reply = reply.trim_end();
    println!("{reply}");
    Ok(if reply == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
