//! The Redis probe: one plain Redis subscriber that reads the run's publications straight off
//! Redis, the latency baseline measured beside the gateway's.
//!
//! Every publication a wsgate node fans out crosses Redis pub/sub (published there by the
//! generator, or by the node's `wsgate_publish` function for HTTP publishing). A subscriber on
//! Redis itself sees each one after a single hop, on the same loaded machine: its latency is the
//! part no gateway behind Redis can take away, and the gateway's own share is the difference.
//! It `PSUBSCRIBE`s to the run's channels and records the send timestamp in each payload against
//! its arrival, in the same units as the workers' histogram.

use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::config::{Config, Scenario};
use crate::publish::now_ns;
use crate::worker::{new_histogram, parse_u64_after};

/// The payload's timestamp key (`"lgts":<ns>`). The quotes around it may arrive escaped, when a
/// Redis function put the data in a JSON string, so the search is for the bare word.
const MARKER: &[u8] = b"lgts";

/// A running probe: `stop` ends it and returns its histogram (microseconds).
pub struct Probe {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Histogram<u64>>,
}

impl Probe {
    /// Subscribes to the run's channels on `cfg.redis`; returns once Redis has confirmed the
    /// subscription, so that no publication of the run goes by unseen. `None` (with a note on
    /// stderr) when Redis cannot be reached: the probe is a baseline, not part of the run.
    pub async fn start(cfg: &Config) -> Option<Probe> {
        let kind = if cfg.scenario == Scenario::Users {
            "u"
        } else {
            "t"
        };
        let pattern = format!("wsgate:{kind}:{{{}-{kind}*", cfg.prefix());
        match tokio::time::timeout(Duration::from_secs(5), subscribe(&cfg.redis, &pattern)).await {
            Ok(Ok(stream)) => {
                let (stop, stopped) = oneshot::channel();
                let task = tokio::spawn(record(stream, stopped));
                Some(Probe { stop, task })
            }
            Ok(Err(e)) => {
                eprintln!("note: no Redis probe ({}): {e}", cfg.redis);
                None
            }
            Err(_) => {
                eprintln!(
                    "note: no Redis probe ({}): no answer to PSUBSCRIBE",
                    cfg.redis
                );
                None
            }
        }
    }

    /// Ends the probe: the histogram of what it received.
    pub async fn stop(self) -> Histogram<u64> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_else(|_| new_histogram())
    }
}

async fn subscribe(addr: &str, pattern: &str) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let command = format!(
        "*2\r\n$10\r\nPSUBSCRIBE\r\n${}\r\n{pattern}\r\n",
        pattern.len()
    );
    stream.write_all(command.as_bytes()).await?;
    // The confirmation: `*3 $10 psubscribe $<n> <pattern> :1`, ending in the count line.
    let mut got = Vec::new();
    let mut chunk = [0u8; 512];
    while !got.ends_with(b":1\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before confirming"));
        }
        got.extend_from_slice(&chunk[..n]);
        if got.starts_with(b"-") {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&got).trim().to_string(),
            ));
        }
        if got.len() > 4096 {
            return Err(std::io::Error::other("unexpected answer to PSUBSCRIBE"));
        }
    }
    Ok(stream)
}

async fn record(mut stream: TcpStream, mut stopped: oneshot::Receiver<()>) -> Histogram<u64> {
    let mut hist = new_histogram();
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = &mut stopped => return hist,
            r = stream.read(&mut chunk) => match r {
                Ok(0) | Err(_) => return hist,
                Ok(n) => {
                    let now = now_ns();
                    buf.extend_from_slice(&chunk[..n]);
                    let used = scan(&buf, |sent| {
                        let _ = hist.record((now.saturating_sub(sent) / 1000).max(1));
                    });
                    buf.drain(..used);
                }
            },
        }
    }
}

/// Calls `found` with every complete timestamp in `buf`; returns how many bytes are done with
/// (a marker or number cut off at the end stays for the next read).
fn scan(buf: &[u8], mut found: impl FnMut(u64)) -> usize {
    let mut at = 0;
    while let Some(i) = memchr::memmem::find(&buf[at..], MARKER) {
        let start = at + i + MARKER.len();
        let digits = buf[start..]
            .iter()
            .position(|b| !matches!(b, b'"' | b'\\' | b':'))
            .map(|skip| start + skip);
        let Some(first) = digits else {
            return at + i;
        };
        let len = buf[first..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if first + len == buf.len() {
            return at + i; // the number may go on in the next read
        }
        if let Some(sent) = parse_u64_after(buf, first) {
            found(sent);
        }
        at = first + len;
    }
    // Keep a tail that could be the start of a marker.
    buf.len().saturating_sub(MARKER.len() - 1).max(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(buf: &[u8]) -> (Vec<u64>, usize) {
        let mut got = Vec::new();
        let used = scan(buf, |t| got.push(t));
        (got, used)
    }

    #[test]
    fn finds_plain_and_escaped_timestamps() {
        let buf =
            br#"$40\r\n{"type":"lg","data":{"lgts":123,"lgn":0}}\r\n"x\":{\"lgts\":456,\"lgn\":1}"#;
        let (got, used) = all(buf);
        assert_eq!(got, vec![123, 456]);
        assert!(used > buf.len() - MARKER.len());
    }

    #[test]
    fn keeps_a_number_or_marker_cut_off_at_the_end() {
        let buf = br#"{"lgts":123,"lgn":0} {"lgts":45"#;
        let (got, used) = all(buf);
        assert_eq!(got, vec![123]);
        assert_eq!(&buf[used..], br#"lgts":45"#);
        let buf = br#"{"lgts":123} {"lg"#;
        let (got, used) = all(buf);
        assert_eq!(got, vec![123]);
        assert_eq!(&buf[used..], b"\"lg");
    }
}
