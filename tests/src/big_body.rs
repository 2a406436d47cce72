//! Gigabyte bodies for the streaming tests, made and read as they flow, and the peak memory
//! of the process that carried them.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::backend::Body;
use crate::server::proc_status;

pub const GIB: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// What a process carrying such bodies may use at its peak, whatever their sizes: a proxy
/// that buffered them would need far more.
pub const PEAK_LIMIT_KIB: u64 = 96 * 1024;

/// A body of `total` zero bytes (a multiple of 64 KiB), produced as it is read.
pub fn zeros(total: u64) -> Body {
    let chunk = Bytes::from(vec![0u8; CHUNK]);
    let frames =
        stream::iter((0..total / CHUNK as u64).map(move |_| Ok(Frame::data(chunk.clone()))));
    BodyExt::boxed(StreamBody::new(frames))
}

/// Reads `body` to the end, pausing `pause` after the first 16 MiB (a buffering hop would
/// swallow the rest meanwhile); how many bytes it had.
pub async fn drain<B>(mut body: B, pause: Duration) -> u64
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut total = 0u64;
    let mut paused = false;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("body intact").into_data() {
            total += data.len() as u64;
        }
        if !paused && total >= 16 << 20 {
            paused = true;
            tokio::time::sleep(pause).await;
        }
    }
    total
}

/// The peak resident memory of process `pid` so far, in KiB.
pub fn peak_kib(pid: u32) -> u64 {
    proc_status(pid, "VmHWM")
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}
