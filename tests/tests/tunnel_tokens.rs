//! Who may serve a tunnel domain: `core-server tunnel allow` prints a token, and only its hash
//! is kept (routes.json version 2, 0600, across a restart and a `kill -9`); a wrong token gets
//! 401 and no tunnel; the 11th failure from one address for one domain gets 429, but the right
//! token gets in;
//! `revoke` closes the agents at once, and the requests they had and later ones get 503; a UDP
//! `add` replaces a tunnel route (version 1 again) and `remove` removes it. Also what
//! `core-server status` shows.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use core_server_proto::tunnel::{Token, TUNNEL_PATH, UPGRADE_PROTOCOL};
use core_server_tests::agent::{connections_of, Agent};
use core_server_tests::backend::saying;
use core_server_tests::http::{get, send_raw};
use core_server_tests::{Backend, CoreServer};
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;

const APP: &str = "app.example";

/// A server whose requests for an agentless tunnel wait 2 s, not 5, before their 503.
fn server() -> CoreServer {
    CoreServer::start_with(&["--tunnel-wait", "2s"])
}

/// The tunnel handshake an agent makes, by hand, presenting `token` for `domain`: the answer's
/// head (a refusal's body too, as the server closes after it; a `101` is followed by nothing).
async fn upgrade(server: &CoreServer, domain: &str, token: &str) -> String {
    let request = format!(
        "GET {TUNNEL_PATH} HTTP/1.1\r\nHost: {domain}\r\nConnection: Upgrade\r\n\
         Upgrade: {UPGRADE_PROTOCOL}\r\nAuthorization: Bearer {token}\r\ncore-agent: by-hand\r\n\r\n"
    );
    let mut stream = send_raw(server, request.as_bytes()).await;
    let mut answer = Vec::new();
    let mut piece = [0; 4096];
    while !answer.starts_with(b"HTTP/1.1 101") || !answer.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut piece));
        match read.await.expect("an answer within 10s").unwrap() {
            0 => break,
            n => answer.extend_from_slice(&piece[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

fn routes_file(server: &CoreServer) -> (u32, serde_json::Value, String) {
    let path = server.dir.join("routes.json");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    let text = std::fs::read_to_string(&path).unwrap();
    (mode, serde_json::from_str(&text).unwrap(), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_gets_401_and_no_tunnel() {
    let server = server();
    let backend = saying("from the agent").await;
    let to = format!("127.0.0.1:{}", backend.port);
    let right = server.tunnel_allow(APP);
    let wrong = server.tunnel_allow("other.example");

    // The right token makes a tunnel (so that the refusals below are the token's doing).
    let agent = Agent::start(&server, APP, &right, &to, &[]);
    agent.wait_connected(&server, 2);
    agent.signal(Signal::SIGKILL);
    agent.wait_connected(&server, 0);
    drop(agent);

    let answer = upgrade(&server, APP, &wrong).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // The real agent with another domain's token: refused, no tunnel, the domain has no one
    // to serve it.
    let agent = Agent::start(&server, APP, &wrong, &to, &[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let status = server.status();
    assert_eq!(connections_of(&status, APP), 0, "{status}\n{}", agent.log());
    assert_eq!(agent.connections(&server), 0);
    let reply = get(&server.url("/"), APP).await;
    assert_eq!(reply.status, 503, "{reply:?}");
}

/// The limit holds wrong tokens back, not the right one: an agent left running with a revoked
/// token must not lock out its replacement on the same machine.
#[tokio::test(flavor = "multi_thread")]
async fn the_eleventh_failure_gets_429_and_the_right_token_still_gets_in() {
    let server = server();
    let right = server.tunnel_allow(APP);
    let wrong = server.tunnel_allow("other.example");
    for attempt in 1..=10 {
        let answer = upgrade(&server, APP, &wrong).await;
        assert!(
            answer.starts_with("HTTP/1.1 401"),
            "attempt {attempt}: {answer}"
        );
    }
    for _ in 0..3 {
        let answer = upgrade(&server, APP, &wrong).await;
        assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("\r\nretry-after: "),
            "{answer}"
        );
    }
    let answer = upgrade(&server, APP, &right).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // The right token lifts nothing for wrong ones.
    let answer = upgrade(&server, APP, &wrong).await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    // Logged once, not once per refusal (any second line would have had time to come).
    server
        .wait_logged_async("failed lately", Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = server.log();
    assert_eq!(log.matches("failed lately").count(), 1, "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_tunnels_and_revoke_closes_the_agents_and_later_requests_get_503() {
    let server = server();
    let backend = saying("from the agent").await;
    let to = format!("127.0.0.1:{}", backend.port);
    // Two tokens for one domain (one per machine), both good.
    let first = server.tunnel_allow(APP);
    let second = server.tunnel_allow(APP);
    assert_ne!(first, second);
    let agents = [
        Agent::start(&server, APP, &first, &to, &[]),
        Agent::start(&server, APP, &second, &to, &["--connections", "1"]),
    ];
    agents[0].wait_connected(&server, 2);
    agents[1].wait_connected(&server, 1);
    let reply = get(&server.url("/"), APP).await;
    assert_eq!(
        (reply.status.as_u16(), &*reply.body),
        (200, "from the agent")
    );

    let status = server.status();
    assert!(
        status.contains(&format!("\n  {APP} -> tunnel (2 tokens)\n")),
        "{status}"
    );
    assert!(status.contains("\ntunnels (1):\n"), "{status}");
    assert!(
        status.contains(&format!("\n  {APP}  2 tokens  3 agent connections\n")),
        "{status}"
    );
    for agent in &agents {
        let line = status
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{}  ", agent.label)))
            .unwrap_or_else(|| panic!("a line for {} in:\n{status}", agent.label));
        for part in [
            "  from 127.0.0.1:",
            "  since 20",
            "Z  in flight ",
            "  served ",
        ] {
            assert!(line.contains(part), "{part:?} in {line:?}");
        }
    }

    server.tunnel_revoke(APP);
    for agent in &agents {
        agent.wait_connected(&server, 0);
    }
    let reply = get(&server.url("/"), APP).await;
    assert_eq!(reply.status, 503, "{reply:?}");
    // The agents keep trying, and are refused.
    let status = server.status();
    assert_eq!(connections_of(&status, APP), 0, "{status}");
}

/// A request in flight when its domain is revoked is cut with the agents, and answered as the
/// requests after it are: 503, saying why, not blamed on the agent or the app.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_in_flight_when_the_tunnel_is_revoked_gets_503_saying_so() {
    let server = server();
    let token = server.tunnel_allow(APP);
    let backend = Backend::slow(Duration::from_secs(10)).await;
    let to = format!("127.0.0.1:{}", backend.port);
    let agent = Agent::start(&server, APP, &token, &to, &["--connections", "1"]);
    agent.wait_connected(&server, 1);
    let url = server.url("/");
    let in_flight = tokio::spawn(async move { get(&url, APP).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.status().contains("in flight 1") {
        assert!(Instant::now() < deadline, "{}", server.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server.tunnel_revoke(APP);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("revoked"), "{reply:?}");
    let log = server.log();
    assert!(
        !log.contains(&format!("the agent of {APP} failed")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn only_hashes_are_kept_across_restarts_and_a_port_route_makes_it_version_1_again() {
    let mut server = server();
    let tunnel_backend = saying("from the agent").await;
    let direct_backend = saying("direct").await;
    let token = server.tunnel_allow(APP);
    let hash = Token::parse(&token).unwrap().hash().to_hex();

    let (mode, json, text) = routes_file(&server);
    assert_eq!(mode, 0o600, "{text}");
    assert_eq!(json["version"], 2, "{text}");
    assert_eq!(
        json["routes"][APP]["tunnel"],
        serde_json::json!([hash]),
        "{text}"
    );
    assert!(
        !text.contains(&token[5..]),
        "the token itself is on disk: {text}"
    );

    let agent = Agent::start(
        &server,
        APP,
        &token,
        &format!("127.0.0.1:{}", tunnel_backend.port),
        &[],
    );
    agent.wait_connected(&server, 2);
    assert_eq!(get(&server.url("/"), APP).await.body, "from the agent");

    // A clean restart, then a crash: the tunnel route and its token survive both, and the
    // agent, dialing again on its own, serves again.
    server.stop();
    server.launch();
    agent.wait_connected(&server, 2);
    assert_eq!(get(&server.url("/"), APP).await.body, "from the agent");
    server.crash();
    server.launch();
    agent.wait_connected(&server, 2);
    assert_eq!(get(&server.url("/"), APP).await.body, "from the agent");

    // A UDP `add` replaces the tunnel route (its agents disconnect); the file is version 1,
    // readable by all, as before tunnels existed.
    server.add(APP, direct_backend.port);
    agent.wait_connected(&server, 0);
    assert_eq!(get(&server.url("/"), APP).await.body, "direct");
    let (mode, json, text) = routes_file(&server);
    assert_eq!(
        (mode, &json["version"]),
        (0o644, &serde_json::json!(1)),
        "{text}"
    );
    assert_eq!(json["routes"][APP], direct_backend.port, "{text}");

    // `remove` removes a tunnel route too.
    server.tunnel_allow(APP);
    assert_eq!(routes_file(&server).1["version"], 2);
    assert_eq!(server.udp(&format!("remove {APP}")), "ok");
    let (_, json, text) = routes_file(&server);
    assert!(json["routes"].get(APP).is_none(), "{text}");
    let status = server.status();
    assert!(!status.contains(APP), "{status}");
}

/// An agent refused for another reason than its token (here: its domain has all the agent
/// connections it may have) is told why, in its log.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_refused_for_lack_of_room_is_told_why() {
    let server = server();
    let backend = saying("from the agent").await;
    let token = server.tunnel_allow(APP);
    let to = format!("127.0.0.1:{}", backend.port);
    let first = Agent::start(&server, APP, &token, &to, &["--connections", "64"]);
    first.wait_connected(&server, 64);
    let second = Agent::start(&server, APP, &token, &to, &["--connections", "1"]);
    let reason = "this domain has 64 agent connections already";
    second
        .wait_logged_async(reason, Duration::from_secs(10))
        .await;
}

/// A token file others may read is used, with a warning saying so (as ssh warns of keys).
#[tokio::test(flavor = "multi_thread")]
async fn a_token_file_others_may_read_is_warned_of() {
    let server = server();
    let backend = saying("from the agent").await;
    let token = server.tunnel_allow(APP);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let to = format!("127.0.0.1:{}", backend.port);
    let file = ["--token-file", path.to_str().unwrap(), "--connections", "1"];
    // The file wins over the environment's token.
    let agent = Agent::start(&server, APP, "not-the-token", &to, &file);
    agent.wait_connected(&server, 1);
    let log = agent.log();
    assert!(log.contains("is readable by others (mode 644)"), "{log}");
}
