//! A test host of our own: a network namespace joined to the test's by a veth pair, so a
//! datagram can come from a real non-loopback address. Link-local addresses, on links that
//! exist only while the test runs: no traffic leaves this machine. Needs root and `ip`.

use std::net::Ipv4Addr;
use std::process::Command;

/// The address on the test's side of the link.
pub const OUTSIDE: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 1);
/// The address inside the namespace.
pub const INSIDE: Ipv4Addr = Ipv4Addr::new(169, 254, 77, 2);

/// A network namespace with loopback up and a veth link to ours; removed on drop.
pub struct TestHost {
    pub name: String,
    outside_link: String,
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("ip (iproute2) is installed");
    assert!(status.success(), "ip {}", args.join(" "));
}

impl TestHost {
    pub fn create() -> Self {
        let id = std::process::id();
        let host = TestHost {
            name: format!("cstest{id}"),
            outside_link: format!("csa{id}"),
        };
        let inside_link = format!("csb{id}");
        ip(&["netns", "add", &host.name]);
        ip(&[
            "link",
            "add",
            &host.outside_link,
            "type",
            "veth",
            "peer",
            "name",
            &inside_link,
        ]);
        ip(&["link", "set", &inside_link, "netns", &host.name]);
        ip(&[
            "addr",
            "add",
            &format!("{OUTSIDE}/30"),
            "dev",
            &host.outside_link,
        ]);
        ip(&["link", "set", &host.outside_link, "up"]);
        let inside = |args: &[&str]| ip(&[&["netns", "exec", &host.name, "ip"], args].concat());
        inside(&["addr", "add", &format!("{INSIDE}/30"), "dev", &inside_link]);
        inside(&["link", "set", &inside_link, "up"]);
        inside(&["link", "set", "lo", "up"]);
        host
    }
}

impl TestHost {
    /// Takes our end of the link down (`up == false`), as a pulled cable: the namespace's
    /// peers get no FIN and no RST, their packets just stop arriving; or brings it back up.
    pub fn set_link(&self, up: bool) {
        ip(&[
            "link",
            "set",
            &self.outside_link,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.outside_link])
            .status();
    }
}

/// Runs `f` with its sockets in network namespace `netns` (in a thread of its own, since
/// `setns` changes only the calling thread), or right here when `netns` is `None`.
pub fn run_in<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> T {
    let Some(netns) = netns else { return f() };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file =
                    std::fs::File::open(format!("/run/netns/{netns}")).expect("namespace exists");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("no panic in the namespace thread")
    })
}
