//! The publishing side: paced, pipelined HTTP requests (or Redis commands) that carry a
//! send-time timestamp and a per-stream sequence number in the payload.
//!
//! Publication g (0-based, all streams together) goes to stream g mod S as its number g / S,
//! is due at `start + (g / burst) * burst / rate`, and is sent by publisher connection g mod P.
//! Each connection writes every due request at once (one write) and reads the answers on its own
//! task, with at most `--pipeline` requests in flight. A publisher that falls behind its schedule
//! sends at once (the achieved rate is reported). Every publisher connection runs on a thread
//! of its own and waits on the OS timer, which keeps sub-millisecond schedules.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{Config, PublishVia, Scenario, Target};

/// Nanoseconds since the Unix epoch (the clock every process of the generator shares).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The publication's `data`: `{"lgts":<ns>,"lgn":<n>,"pad":"xx.."}`, padded to `size` bytes.
pub fn payload(size: usize, n: u64) -> String {
    let mut s = format!(r#"{{"lgts":{},"lgn":{n},"pad":""#, now_ns());
    let pad = size.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

#[derive(Default)]
pub struct PublishStats {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub first_error: std::sync::Mutex<Option<String>>,
    /// When the last publication was written (ns since the epoch).
    pub last_sent_ns: AtomicU64,
    pub sent: AtomicU64,
}

impl PublishStats {
    fn error(&self, what: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// Appends the request that sends publication `g`.
fn encode(cfg: &Config, g: u64, host: &str, out: &mut Vec<u8>) {
    let streams = cfg.streams() as u64;
    let (s, n) = ((g % streams) as usize, g / streams);
    let name = cfg.stream_name(s);
    let data = payload(cfg.size, n);
    match cfg.publish {
        PublishVia::Http => {
            let (path, body) = match (cfg.target, cfg.scenario) {
                (Target::Wsgate, Scenario::Users) => (
                    "/api/ws/send".to_string(),
                    format!(r#"{{"type":"lg","to":"{name}","data":{data}}}"#),
                ),
                (Target::Wsgate, _) => (
                    "/api/publish".to_string(),
                    format!(r#"{{"topic":"{name}","type":"lg","data":{data}}}"#),
                ),
                (Target::Socketio, Scenario::Users) => (
                    "/send".to_string(),
                    format!(r#"{{"to":"{name}","data":{data}}}"#),
                ),
                (Target::Socketio, _) => (
                    "/publish".to_string(),
                    format!(r#"{{"topic":"{name}","data":{data}}}"#),
                ),
                (Target::Nchan, _) => (format!("/pub/{name}"), data),
            };
            out.extend_from_slice(
                format!(
                    "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(body.as_bytes());
        }
        PublishVia::Redis => {
            let (channel, msg) = match cfg.scenario {
                Scenario::Users => (
                    format!("wsgate:u:{{{name}}}"),
                    format!(r#"{{"type":"lg","data":{data}}}"#),
                ),
                _ => (
                    format!("wsgate:t:{{{name}}}"),
                    format!(r#"{{"type":"lg","data":{data}}}"#),
                ),
            };
            resp(out, &["PUBLISH", &channel, &msg]);
        }
        PublishVia::Fcall => {
            let key = format!("wsgate:t:{{{name}}}");
            resp(out, &["FCALL", "wsgate_publish", "1", &key, "lg", &data]);
        }
    }
}

fn resp(out: &mut Vec<u8>, args: &[&str]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one answer at the front of `buf`: `Some((consumed, ok, text))`, `None` if incomplete.
fn parse_answer(via: PublishVia, buf: &[u8]) -> Option<(usize, bool, String)> {
    match via {
        PublishVia::Http => parse_http(buf),
        PublishVia::Redis | PublishVia::Fcall => {
            let used = resp_value(buf)?;
            // PUBLISH answers how many subscribers got the message: 0 means no node was
            // subscribed to the channel at that moment (counted as an error: it is lost).
            let nobody = via == PublishVia::Redis && &buf[..used] == b":0\r\n";
            let ok = buf[0] != b'-' && !nobody;
            let text = if nobody {
                "PUBLISH reached no subscriber (:0)".to_string()
            } else {
                String::from_utf8_lossy(&buf[..used]).into_owned()
            };
            Some((used, ok, text))
        }
    }
}

fn parse_http(buf: &[u8]) -> Option<(usize, bool, String)> {
    let head_end = memchr::memmem::find(buf, b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let mut length = None;
    let mut chunked = false;
    for line in head.lines() {
        if let Some((name, value)) = line.split_once(':') {
            let name = name.trim().to_ascii_lowercase();
            if name == "content-length" {
                length = value.trim().parse::<usize>().ok();
            } else if name == "transfer-encoding" && value.to_ascii_lowercase().contains("chunked")
            {
                chunked = true;
            }
        }
    }
    let end = if chunked {
        head_end + memchr::memmem::find(&buf[head_end..], b"0\r\n\r\n")? + 5
    } else {
        let end = head_end + length.unwrap_or(0);
        if buf.len() < end {
            return None;
        }
        end
    };
    let ok = (200..300).contains(&status);
    let text = if ok {
        String::new()
    } else {
        String::from_utf8_lossy(&buf[..end.min(head_end + 300)]).into_owned()
    };
    Some((end, ok, text))
}

/// Length of one RESP value at the front of `buf`.
fn resp_value(buf: &[u8]) -> Option<usize> {
    let line_end = memchr::memmem::find(buf, b"\r\n")?;
    let line = std::str::from_utf8(&buf[1..line_end]).ok()?;
    let after = line_end + 2;
    match buf.first()? {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' => Some(after),
        b'$' => {
            let n: i64 = line.parse().ok()?;
            if n < 0 {
                return Some(after);
            }
            let end = after + n as usize + 2;
            (buf.len() >= end).then_some(end)
        }
        b'*' => {
            let n: i64 = line.parse().ok()?;
            let mut at = after;
            for _ in 0..n.max(0) {
                at += resp_value(&buf[at..])?;
            }
            Some(at)
        }
        _ => Some(after),
    }
}

/// Waits for `due` on the OS timer, then lets the connection's reader task run. tokio's timer
/// has a resolution of 1 ms: at 5,000 publications/s it would send five back to back every
/// millisecond instead of one every 200 us, a burstier load than asked for. Blocking is fine
/// here: the publisher's runtime is its own thread's, with only its reader on it.
async fn wait_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        std::thread::sleep(due - now);
        tokio::task::yield_now().await;
    }
}

/// Publishes every publication of the run on schedule; returns when all are answered.
pub async fn run(cfg: Arc<Config>, stats: Arc<PublishStats>) {
    let total = cfg.total_publications();
    let conns = cfg.publishers.max(1);
    let addrs: Vec<String> = match cfg.publish {
        PublishVia::Http => cfg.http_addrs().to_vec(),
        _ => vec![cfg.redis.clone()],
    };
    let start = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..conns {
        let addr = addrs[k % addrs.len()].clone();
        let (cfg, stats) = (Arc::clone(&cfg), Arc::clone(&stats));
        // Each publisher connection on a thread of its own, so that it can pace on the OS timer
        // (see `wait_until`) without holding up anything else.
        tasks.push(tokio::task::spawn_blocking(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return stats.error(format!("publisher {k}: runtime: {e}")),
            };
            let result = runtime.block_on(publisher(k, conns, total, start, &addr, &cfg, &stats));
            if let Err(e) = result {
                stats.error(format!("publisher {k} ({addr}): {e}"));
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn publisher(
    k: usize,
    conns: usize,
    total: u64,
    start: Instant,
    addr: &str,
    cfg: &Config,
    stats: &PublishStats,
) -> std::io::Result<()> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let window = Arc::new(Semaphore::new(cfg.pipeline.max(1)));
    let via = cfg.publish;
    let mine: u64 = (k as u64..total).step_by(conns).count() as u64;
    // The reader: counts answers until every request of this connection has one.
    let reader = {
        let window = Arc::clone(&window);
        async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            let mut got = 0u64;
            let mut chunk = vec![0u8; 64 * 1024];
            while got < mine {
                let n = rd.read(&mut chunk).await?;
                if n == 0 {
                    return Err(std::io::Error::other(format!(
                        "closed after {got} of {mine} answers"
                    )));
                }
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some((used, ok, text)) = parse_answer(via, &buf[at..]) {
                    at += used;
                    got += 1;
                    if ok {
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.error(text);
                    }
                    window.add_permits(1);
                }
                buf.drain(..at);
            }
            Ok::<(), std::io::Error>(())
        }
    };
    let writer = async {
        let per_tick = cfg.burst.max(1) as u64;
        let tick = Duration::from_secs_f64(per_tick as f64 / cfg.rate.max(1e-9));
        let mut g = k as u64;
        let mut out = Vec::with_capacity(64 * 1024);
        while g < total {
            let due = start + tick.mul_f64((g / per_tick) as f64);
            wait_until(due).await;
            // Everything due now (within the window), in one write.
            let now = Instant::now();
            let first = g;
            out.clear();
            let permit = window.acquire().await.expect("open");
            permit.forget();
            encode(cfg, g, addr, &mut out);
            g += conns as u64;
            while g < total
                && start + tick.mul_f64((g / per_tick) as f64) <= now
                && out.len() < 256 * 1024
            {
                match window.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => break,
                }
                encode(cfg, g, addr, &mut out);
                g += conns as u64;
            }
            wr.write_all(&out).await?;
            stats
                .sent
                .fetch_add((g - first) / conns as u64, Ordering::Relaxed);
            stats.last_sent_ns.fetch_max(now_ns(), Ordering::Relaxed);
        }
        Ok::<(), std::io::Error>(())
    };
    let (r, w) = tokio::join!(reader, writer);
    w?;
    r?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_requested_size_and_markers() {
        for size in [60, 100, 1000] {
            let p = payload(size, 42);
            assert_eq!(p.len(), size, "{p}");
            let v: serde_json::Value = serde_json::from_str(&p).expect("JSON");
            assert_eq!(v["lgn"], 42);
            assert!(v["lgts"].as_u64().expect("ts") > 1_600_000_000_000_000_000);
        }
    }

    #[test]
    fn http_answers_by_length_and_chunked() {
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 503 X\r\n";
        let (used, ok, _) = parse_http(a).expect("complete");
        assert_eq!((used, ok), (40, true));
        assert!(parse_http(&a[used..]).is_none(), "incomplete");
        let c = b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n";
        let (used, ok, text) = parse_http(c).expect("complete");
        assert_eq!((used, ok), (c.len(), false));
        assert!(text.contains("400"));
    }

    #[test]
    fn resp_values() {
        assert_eq!(resp_value(b":1\r\n"), Some(4));
        assert_eq!(resp_value(b"*3\r\n:7\r\n$3\r\nabc\r\n:0\r\n"), Some(21));
        assert_eq!(resp_value(b"*3\r\n:7\r\n$3\r\nab"), None);
        assert_eq!(
            parse_answer(PublishVia::Redis, b":0\r\n").map(|a| a.1),
            Some(false)
        );
        assert_eq!(
            parse_answer(PublishVia::Fcall, b"-ERR x\r\n").map(|a| a.1),
            Some(false)
        );
    }
}
