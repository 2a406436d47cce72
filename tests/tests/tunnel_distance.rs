//! A distant agent: each end of a tunnel measures its round trip as the tunnel is set up (the
//! agent from its upgrade request to the `101`, the worker from the `101` to the agent's first
//! bytes) and sizes its streams' receive windows for it, so that an agent far away is not held
//! to 512 KiB per round trip (a near one keeps that). The distance is a `DelayLink`: 100 ms
//! there and back.

use std::time::Duration;

use bytes::Bytes;
use core_server_tests::agent::Agent;
use core_server_tests::delay_link::DelayLink;
use core_server_tests::http::send;
use core_server_tests::{Backend, CoreServer};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};

const APP: &str = "app.example";
const ONE_WAY: Duration = Duration::from_millis(50);

/// The window a log gives the streams of the connection whose line holds `who`, in KiB, and
/// the round trip it measured, from "(round trip 101.3ms: a stream's window is 4096 KiB)".
fn measured(log: &str, who: &str) -> (Duration, u32) {
    let line = log
        .lines()
        .find(|line| line.contains(who) && line.contains("round trip"))
        .unwrap_or_else(|| panic!("no round trip logged for {who}:\n{log}"));
    let field = |after: &str, until: char| line.split(after).nth(1)?.split(until).next();
    let rtt = field("round trip ", ':').unwrap_or_else(|| panic!("{line}"));
    // As `Debug` writes a duration: "101.3ms", "850.0µs", "1.2s".
    let unit = rtt.find(|c: char| c.is_alphabetic()).unwrap();
    let (value, unit) = (rtt[..unit].parse::<f64>().unwrap(), &rtt[unit..]);
    let seconds = match unit {
        "s" => value,
        "ms" => value / 1e3,
        "µs" => value / 1e6,
        "ns" => value / 1e9,
        _ => panic!("{line}: unit {unit}"),
    };
    let window = field("window is ", ' ').unwrap_or_else(|| panic!("{line}"));
    (Duration::from_secs_f64(seconds), window.parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_distant_agent_gets_windows_for_its_round_trip_larger_than_a_near_ones() {
    let server = CoreServer::start();
    let token = server.tunnel_allow(APP);
    // Sends back what it receives, as it receives it.
    let echo = Backend::start(|request| async move {
        Response::new(request.into_body().map_err(std::io::Error::other).boxed())
    })
    .await;
    let to = format!("127.0.0.1:{}", echo.port);
    let link = DelayLink::start(([127, 0, 0, 1], server.http_port).into(), ONE_WAY)
        .await
        .unwrap();
    let connect = format!("127.0.0.1:{}", link.port);
    let far = Agent::spawn(
        &[],
        APP,
        &token,
        &to,
        &[
            "--connect",
            &connect,
            "--insecure-plaintext",
            "--connections",
            "1",
        ],
    );
    far.wait_connected(&server, 1);

    // 8 MiB each way, whole; each end let the other send more than 512 KiB ahead (HTTP/2 flow
    // control holds a stream's bytes in flight to its window: the link saw the windows used).
    let body: String = (0..8 << 20)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let request = Request::post(format!("http://127.0.0.1:{}/echo", server.http_port))
        .header("host", APP)
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let reply = send(request).await;
    assert_eq!(reply.status, 200);
    assert!(reply.body == body, "{} bytes came back", reply.body.len());
    let (responses, requests) = link.peaks();
    for (way, peak) in [
        ("agent to worker", responses),
        ("worker to agent", requests),
    ] {
        assert!(peak > 1 << 20, "{way}: at most {peak} bytes in flight");
    }

    let near = Agent::start(&server, APP, &token, &to, &["--connections", "1"]);
    near.wait_connected(&server, 1);
    // Each end sized the far agent's windows for 100 ms, the near one's for less.
    let far_label = format!("{:?}", far.label);
    for (log, who) in [
        (server_log(&server, &far_label), far_label),
        (far.log(), APP.into()),
    ] {
        let (rtt, window) = measured(&log, &who);
        assert!(rtt > ONE_WAY, "{who}: {rtt:?}");
        assert_eq!(window, 4096, "{who}: 4 MiB from a 21 ms round trip on");
    }
    let near_label = format!("{:?}", near.label);
    for (log, who) in [
        (server_log(&server, &near_label), near_label),
        (near.log(), APP.into()),
    ] {
        let (rtt, window) = measured(&log, &who);
        assert!(rtt < 2 * ONE_WAY, "{who}: {rtt:?}");
        // 512 KiB on an idle machine; a busy one can take some milliseconds to answer.
        assert!(window < 4096, "{who}: {window} KiB");
    }
}

/// The server's log once it holds the worker's line for the agent labelled `who` (written just
/// after the agent shows in `status`), within 10 s.
fn server_log(server: &CoreServer, who: &str) -> String {
    for _ in 0..100 {
        let log = server.log();
        if log
            .lines()
            .any(|l| l.contains(who) && l.contains("round trip"))
        {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    server.log()
}
