//! An app adding routes while something happens to the server (a rerun, a frozen process),
//! to check afterwards that every route acknowledged `ok` is there.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// An app adding routes throughout, one at a time, waiting up to 30 s for each reply (commands
/// wait in the kernel's queue while a takeover pauses their reading, or a process is frozen).
pub struct Adder {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<String>>,
}

impl Adder {
    /// Adds `<tag>-<n>.example` one after another, `pause` apart.
    pub fn start(udp_port: u16, tag: &str, pause: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tag = tag.to_owned();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut acknowledged = Vec::new();
            for i in 0..10_000 {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                let domain = format!("{tag}-{i}.example");
                let command = format!("add {domain} 9");
                socket
                    .send_to(command.as_bytes(), ("127.0.0.1", udp_port))
                    .unwrap();
                let mut reply = [0u8; 256];
                let len = socket
                    .recv(&mut reply)
                    .unwrap_or_else(|e| panic!("{command}: no reply: {e}"));
                let reply = String::from_utf8_lossy(&reply[..len]);
                assert_eq!(reply, "ok", "{command}");
                acknowledged.push(domain);
                std::thread::sleep(pause);
            }
            acknowledged
        });
        Adder { stop, thread }
    }

    /// The domains acknowledged `ok`.
    pub fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
