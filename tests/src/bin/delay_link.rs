//! `delay_link`: a long network path on loopback for `bench/` (see `delay_link` in the test
//! harness): forwards each connection to TO, holding each direction ONE_WAY_MS milliseconds.
//! Prints the port it listens on (127.0.0.1), then forwards until killed.
//!
//!     delay_link TO ONE_WAY_MS

use std::time::Duration;

use core_server_tests::delay_link::DelayLink;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [to, one_way] = args.as_slice() else {
        return Err("usage: delay_link TO ONE_WAY_MS".into());
    };
    let link = DelayLink::start(to.parse()?, Duration::from_millis(one_way.parse()?)).await?;
    println!("{}", link.port);
    std::future::pending::<()>().await;
    Ok(())
}
