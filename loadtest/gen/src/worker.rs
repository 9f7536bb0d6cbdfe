//! A worker process: holds its share of the connections (connection i belongs to worker
//! i mod procs), one tokio task each on a single-threaded runtime, and records what arrives.
//!
//! Talks to the coordinator by lines: on stdout `READY {json}` once every connect has finished
//! (or failed), `P <received>` every 100 ms, and `R {json}` (its result) after it reads `STOP`
//! on stdin; then it exits without closing its sockets politely (the kernel does).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::rc::Rc;
use std::time::Duration;

use flate2::Decompress;
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{self, Deflate, Event, WsClient};
use crate::config::{Config, Receive, Scenario, Target};
use crate::publish::now_ns;
use crate::timeline::{self, Timeline, WindowResult};
use crate::uring::{self, Happened, Next, Ring};

/// Per-connection bookkeeping: which publication numbers of its stream arrived.
struct Track {
    seen: Vec<u64>,
    expected: u64,
    dups: u64,
    unexpected: u64,
    connected: bool,
}

impl Track {
    fn record(&mut self, n: u64) {
        if n >= self.expected {
            self.unexpected += 1;
            return;
        }
        let (w, b) = ((n / 64) as usize, n % 64);
        if self.seen[w] & (1 << b) != 0 {
            self.dups += 1;
        } else {
            self.seen[w] |= 1 << b;
        }
    }

    fn unique(&self) -> u64 {
        self.seen.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

struct Shared {
    cfg: Config,
    index: usize,
    procs: usize,
    latency: RefCell<Histogram<u64>>,
    /// Publish send -> the kernel's receive timestamp on this host (before the generator ran).
    arrival: RefCell<Histogram<u64>>,
    timeline: RefCell<Timeline>,
    connect: RefCell<Histogram<u64>>,
    tracks: RefCell<Vec<Track>>,
    inflater: RefCell<Decompress>,
    received: Cell<u64>,
    unmarked: Cell<u64>,
    connected: Cell<u64>,
    failed: Cell<u64>,
    negotiated: Cell<u64>,
    not_negotiated: Cell<u64>,
    done: Cell<usize>,
    first_start_ns: Cell<u64>,
    last_done_ns: Cell<u64>,
    errors: RefCell<BTreeMap<String, u64>>,
    closes: RefCell<BTreeMap<String, u64>>,
    ts_finder: Finder<'static>,
    n_finder: Finder<'static>,
    /// Set when the io_uring loop reads the sockets: connections are handed over here once
    /// subscribed, instead of each task reading its own.
    uring: bool,
    handed: RefCell<Vec<uring::Conn>>,
}

/// What a worker reports at `STOP`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WorkerResult {
    pub connected: u64,
    pub failed: u64,
    pub negotiated: u64,
    pub not_negotiated: u64,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    pub received: u64,
    pub unmarked: u64,
    pub expected: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub conns_with_missing: u64,
    pub conns_with_duplicates: u64,
    /// Up to 20 (connection, publication number) pairs that never arrived.
    pub missing_sample: Vec<(usize, u64)>,
    pub first_start_ns: u64,
    pub last_done_ns: u64,
    /// (value in microseconds, count)
    pub latency_us: Vec<(u64, u64)>,
    /// (value in microseconds, count) of publish send -> socket arrival.
    #[serde(default)]
    pub arrival_us: Vec<(u64, u64)>,
    pub connect_us: Vec<(u64, u64)>,
    /// The latencies by window of send time (see `timeline.rs`).
    #[serde(default)]
    pub timeline: Vec<WindowResult>,
    /// How the sockets were read: "io_uring" or "epoll".
    #[serde(default)]
    pub receive: String,
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// The decimal number that starts at `hay[at]`, if one does.
pub fn parse_u64_after(hay: &[u8], at: usize) -> Option<u64> {
    let digits = hay[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&hay[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

impl Shared {
    /// The send timestamp and number of a publication, if `m` is one.
    fn markers(&self, m: &[u8]) -> Option<(u64, u64)> {
        let t = self.ts_finder.find(m)? + 7;
        let ts = parse_u64_after(m, t)?;
        let n = self.n_finder.find(&m[t..])? + t + 6;
        Some((ts, parse_u64_after(m, n)?))
    }

    fn error(&self, map: &RefCell<BTreeMap<String, u64>>, what: String) {
        // Numbers make every message distinct; keep the shape.
        let key: String = what
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(160)
            .collect();
        *map.borrow_mut().entry(key).or_default() += 1;
    }
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

pub fn main(cfg: Config, index: usize, procs: usize) -> ! {
    crate::raise_nofile();
    let mine = cfg.connections.div_ceil(procs.max(1));
    let ring = match (cfg.receive, cfg.scenario) {
        (Receive::Uring, scenario) if scenario != Scenario::Storm => match Ring::new(mine) {
            Ok(ring) => Some(ring),
            Err(e) => {
                eprintln!("worker {index}: io_uring unavailable ({e}); reading with epoll");
                None
            }
        },
        _ => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(cfg, index, procs, ring));
    std::process::exit(0);
}

async fn run(cfg: Config, index: usize, procs: usize, ring: Option<Ring>) {
    let mine: Vec<usize> = (index..cfg.connections).step_by(procs).collect();
    let tracks = mine
        .iter()
        .map(|&i| {
            let expected = if cfg.publishes() {
                cfg.per_stream(i % cfg.streams())
            } else {
                0
            };
            Track {
                seen: vec![0; expected.div_ceil(64) as usize],
                expected,
                dups: 0,
                unexpected: 0,
                connected: false,
            }
        })
        .collect();
    let window_ns = timeline::width_ns(cfg.duration);
    let shared = Rc::new(Shared {
        cfg,
        index,
        procs,
        latency: RefCell::new(new_histogram()),
        arrival: RefCell::new(new_histogram()),
        connect: RefCell::new(new_histogram()),
        timeline: RefCell::new(Timeline::new(window_ns)),
        tracks: RefCell::new(tracks),
        inflater: RefCell::new(Decompress::new(false)),
        received: Cell::new(0),
        unmarked: Cell::new(0),
        connected: Cell::new(0),
        failed: Cell::new(0),
        negotiated: Cell::new(0),
        not_negotiated: Cell::new(0),
        done: Cell::new(0),
        first_start_ns: Cell::new(u64::MAX),
        last_done_ns: Cell::new(0),
        errors: RefCell::new(BTreeMap::new()),
        closes: RefCell::new(BTreeMap::new()),
        ts_finder: Finder::new(b"\"lgts\":"),
        n_finder: Finder::new(b"\"lgn\":"),
        uring: ring.is_some(),
        handed: RefCell::new(Vec::new()),
    });
    let dests: Vec<(SocketAddr, String)> = shared
        .cfg
        .ws
        .iter()
        .map(|a| {
            let addr = a
                .to_socket_addrs()
                .ok()
                .and_then(|mut it| it.find(SocketAddr::is_ipv4))
                .unwrap_or_else(|| panic!("--ws {a}: not an IPv4 HOST:PORT"));
            (addr, a.clone())
        })
        .collect();
    let dests = Rc::new(dests);
    let gate = Rc::new(Semaphore::new(shared.cfg.connect_concurrency.max(1)));
    let total = mine.len();
    for (j, &i) in mine.iter().enumerate() {
        let (shared, dests, gate) = (Rc::clone(&shared), Rc::clone(&dests), Rc::clone(&gate));
        tokio::task::spawn_local(async move {
            connection(j, i, &shared, &dests, &gate).await;
        });
    }
    // READY once every connect has finished.
    while shared.done.get() < total {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let expected: u64 = shared
        .tracks
        .borrow()
        .iter()
        .filter(|t| t.connected)
        .map(|t| t.expected)
        .sum();
    say(&format!(
        "READY {}",
        serde_json::json!({
            "connected": shared.connected.get(),
            "failed": shared.failed.get(),
            "expected": expected,
        })
    ));
    match ring {
        Some(ring) => read_with_uring(&shared, ring),
        None => {
            let shared = Rc::clone(&shared);
            tokio::task::spawn_local(async move {
                let mut last = u64::MAX;
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let r = shared.received.get();
                    if r != last {
                        say(&format!("P {r}"));
                        last = r;
                    }
                }
            });
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.trim() == "STOP" {
                    break;
                }
            }
        }
    }
    let result = result(&shared);
    say(&format!(
        "R {}",
        serde_json::to_string(&result).expect("serializes")
    ));
}

fn result(shared: &Shared) -> WorkerResult {
    let tracks = shared.tracks.borrow();
    let mut r = WorkerResult {
        connected: shared.connected.get(),
        failed: shared.failed.get(),
        negotiated: shared.negotiated.get(),
        not_negotiated: shared.not_negotiated.get(),
        errors: shared.errors.borrow().clone(),
        closes: shared.closes.borrow().clone(),
        received: shared.received.get(),
        unmarked: shared.unmarked.get(),
        first_start_ns: shared.first_start_ns.get(),
        last_done_ns: shared.last_done_ns.get(),
        receive: if shared.uring { "io_uring" } else { "epoll" }.into(),
        ..WorkerResult::default()
    };
    let procs = shared.procs;
    for (j, t) in tracks.iter().enumerate().filter(|(_, t)| t.connected) {
        let missing = t.expected - t.unique();
        if missing > 0 && r.missing_sample.len() < 20 {
            if let Some(n) =
                (0..t.expected).find(|n| t.seen[(n / 64) as usize] & (1 << (n % 64)) == 0)
            {
                r.missing_sample.push((shared.index + j * procs, n));
            }
        }
        r.expected += t.expected;
        r.missing += missing;
        r.duplicated += t.dups;
        r.unexpected += t.unexpected;
        r.conns_with_missing += u64::from(missing > 0);
        r.conns_with_duplicates += u64::from(t.dups > 0);
    }
    r.latency_us = recorded(&shared.latency.borrow());
    r.arrival_us = recorded(&shared.arrival.borrow());
    r.connect_us = recorded(&shared.connect.borrow());
    r.timeline = shared.timeline.borrow().results();
    r
}

/// A histogram's recorded (value, count) pairs, as the worker hands them to the parent.
pub fn recorded<C: hdrhistogram::Counter>(h: &Histogram<C>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value().as_u64()))
        .collect()
}

async fn connection(
    j: usize,
    i: usize,
    shared: &Shared,
    dests: &[(SocketAddr, String)],
    gate: &Semaphore,
) {
    let cfg = &shared.cfg;
    let permit = gate.acquire().await.expect("open");
    let start = Instant::now();
    shared
        .first_start_ns
        .set(shared.first_start_ns.get().min(now_ns()));
    let (dest, host) = &dests[i % dests.len()];
    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % cfg.source_ips.clamp(1, 254)) as u8);
    let opened = async {
        let token = cfg
            .jwt_secret
            .as_deref()
            .map(|secret| client::jwt(secret, &cfg.user_of(i)));
        let stream = client::tcp_connect(source, *dest).await?;
        let path = client::ws_path(cfg, i, token.as_deref());
        let mut ws = WsClient::handshake(stream, host, &path, cfg.compression).await?;
        client::subscribe(&mut ws, cfg, i, &shared.inflater).await?;
        Ok::<WsClient, client::ClientError>(ws)
    }
    .await;
    let now = now_ns();
    shared.last_done_ns.set(shared.last_done_ns.get().max(now));
    drop(permit);
    let mut ws = match opened {
        Ok(ws) => ws,
        Err(e) => {
            shared.failed.set(shared.failed.get() + 1);
            shared.error(&shared.errors, e.0);
            shared.done.set(shared.done.get() + 1);
            return;
        }
    };
    let us = start.elapsed().as_micros() as u64;
    let _ = shared.connect.borrow_mut().record(us.max(1));
    shared.connected.set(shared.connected.get() + 1);
    if ws.frames.deflate != Deflate::Off {
        shared.negotiated.set(shared.negotiated.get() + 1);
    } else if cfg.compression {
        shared.not_negotiated.set(shared.not_negotiated.get() + 1);
    }
    shared.tracks.borrow_mut()[j].connected = true;
    shared.done.set(shared.done.get() + 1);
    if cfg.scenario == Scenario::Storm {
        // Held until the worker exits; nothing more to read (pings are answered by nobody,
        // which is fine for the few seconds a storm lasts).
        std::future::pending::<()>().await;
    }
    if shared.uring {
        match ws.into_parts() {
            Ok((stream, frames)) => {
                shared
                    .handed
                    .borrow_mut()
                    .push(uring::Conn { j, stream, frames })
            }
            Err(e) => shared.error(&shared.closes, format!("hand-over: {e}")),
        }
        return;
    }
    loop {
        let answer_ping = match ws.next(&shared.inflater).await {
            Ok(Event::Message(m, arrived)) => shared.on_message(j, m, arrived),
            Ok(Event::Closed(code)) => return shared.on_closed(code),
            Err(e) => return shared.error(&shared.closes, e.0),
        };
        if answer_ping && ws.send_text(b"3").await.is_err() {
            return shared.on_write_failed();
        }
    }
}

/// After READY: the io_uring loop reads every handed-over connection until `STOP` (or the end
/// of stdin, read on a thread of its own), printing progress every 100 ms.
fn read_with_uring(shared: &Shared, ring: Ring) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::stdin().lock().lines() {
                match line {
                    Ok(line) if line.trim() != "STOP" => continue,
                    _ => break,
                }
            }
            stop.store(true, std::sync::atomic::Ordering::Release);
        });
    }
    let conns = shared.handed.take();
    let mut last = u64::MAX;
    let ran = ring.run(
        conns,
        &shared.inflater,
        |j, happened| match happened {
            Happened::Message(m, arrived) => {
                if shared.on_message(j, m, arrived) {
                    let mut f = Vec::with_capacity(8);
                    client::encode_frame(&mut f, 0x1, b"3");
                    Next::Reply(f)
                } else {
                    Next::Continue
                }
            }
            Happened::Closed(code) => {
                shared.on_closed(code);
                Next::Done
            }
            Happened::Failed(e) => {
                shared.error(&shared.closes, e);
                Next::Done
            }
        },
        || {
            let r = shared.received.get();
            if r != last {
                say(&format!("P {r}"));
                last = r;
            }
            !stop.load(std::sync::atomic::Ordering::Acquire)
        },
        Duration::from_millis(100),
    );
    if let Err(e) = ran {
        shared.error(&shared.closes, format!("io_uring: {e}"));
    }
}

impl Shared {
    /// Records one message of connection `j`; true if it was engine.io's ping (answer "3").
    fn on_message(&self, j: usize, m: &[u8], arrived: Option<u64>) -> bool {
        if let Some((ts, n)) = self.markers(m) {
            let read_us = (now_ns().saturating_sub(ts) / 1000).max(1);
            let _ = self.latency.borrow_mut().record(read_us);
            let socket_us = arrived.map(|at| (at.saturating_sub(ts) / 1000).max(1));
            if let Some(us) = socket_us {
                let _ = self.arrival.borrow_mut().record(us);
            }
            self.timeline.borrow_mut().record(ts, read_us, socket_us);
            self.received.set(self.received.get() + 1);
            self.tracks.borrow_mut()[j].record(n);
            false
        } else if self.cfg.target == Target::Socketio && m == b"2" {
            true
        } else {
            self.unmarked.set(self.unmarked.get() + 1);
            false
        }
    }

    fn on_closed(&self, code: Option<u16>) {
        let what = match code {
            Some(c) => format!("close {c}"),
            None => "connection ended".to_string(),
        };
        *self.closes.borrow_mut().entry(what).or_default() += 1;
    }

    fn on_write_failed(&self) {
        *self
            .closes
            .borrow_mut()
            .entry("write failed".into())
            .or_default() += 1;
    }
}
