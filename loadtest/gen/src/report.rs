//! A run's result: JSON (`--json`), a table, and the side-by-side comparison of several results.

use std::fmt::Write;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::timeline::{self, Summary, WindowFigures};
use crate::worker::{new_histogram, WorkerResult};

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Connections {
    pub requested: usize,
    pub connected: u64,
    pub failed: u64,
    pub deflate_negotiated: u64,
    pub deflate_refused: u64,
    /// From the first connect started to the last one subscribed.
    pub seconds: f64,
    pub per_second: f64,
    /// Connect + upgrade + subscribe acknowledged, milliseconds.
    pub handshake_ms: Percentiles,
    pub errors: std::collections::BTreeMap<String, u64>,
    /// How connections ended before the end of the run (close codes, errors).
    pub closed: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Publish {
    pub requested: u64,
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    pub rate: f64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Deliveries {
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicated: u64,
    /// Numbers beyond what the stream was sent (stale messages from another run).
    pub unexpected: u64,
    pub connections_with_missing: u64,
    pub connections_with_duplicates: u64,
    /// Some (connection, publication number) pairs that never arrived (the first missing
    /// number of up to 20 connections per worker).
    pub missing_sample: Vec<(usize, u64)>,
    /// From the first publication to the last delivery.
    pub seconds: f64,
    pub per_second: f64,
    /// Messages without the markers (server notices, engine.io pings are not counted).
    pub other_messages: u64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Server {
    pub pids: Vec<u32>,
    pub cpu_user_seconds: f64,
    pub cpu_sys_seconds: f64,
    pub cpu_seconds: f64,
    pub us_per_delivery: f64,
    pub deliveries_per_cpu_second: f64,
    pub connect_cpu_seconds: f64,
    pub us_per_connect: f64,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_peak_kib: u64,
    pub rss_end_kib: u64,
    /// (RSS with every connection up - RSS before) / connections.
    pub rss_per_connection_kib: f64,
    /// CPU of `--aux-pid` (Redis) over the publishing window.
    pub aux_cpu_seconds: f64,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub target: String,
    pub scenario: String,
    pub compression: bool,
    pub payload_bytes: usize,
    pub streams: usize,
    pub worker_processes: usize,
    pub connect_phase_seconds: f64,
    pub connections: Connections,
    pub publish: Publish,
    pub deliveries: Deliveries,
    pub latency_ms: Percentiles,
    /// Publish send -> the kernel's receive timestamp of the data on the generator's socket: the
    /// latency without the generator's own wait to run (on a shared machine it waits behind
    /// the server and Redis for a CPU).
    #[serde(default)]
    pub arrival_ms: Percentiles,
    /// The same publications read straight off Redis by one plain subscriber (`probe`): the
    /// baseline under the gateway's latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_probe_ms: Option<Percentiles>,
    /// The latencies by window of send time (see `timeline.rs`): whether the tail is spread
    /// over the run or made of a few stalls.
    #[serde(default)]
    pub timeline: Vec<WindowFigures>,
    #[serde(default)]
    pub timeline_summary: Summary,
    pub server: Server,
    /// CPU (user + sys) of the generator itself (coordinator, publisher and workers) over the
    /// publishing window: on a shared machine its share of the CPUs is what the servers and
    /// Redis did not get.
    #[serde(default)]
    pub generator_cpu_seconds: f64,
    /// The part of it spent by the worker processes, which read the sockets (the rest is the
    /// publisher and the Redis probe).
    #[serde(default)]
    pub generator_reading_cpu_seconds: f64,
    /// How the workers read: "io_uring", "epoll" (or both, "+"-joined, if workers differed).
    #[serde(default)]
    pub generator_receive: String,
    pub config: Option<Config>,
}

fn percentiles(pairs: impl Iterator<Item = (u64, u64)>, scale: f64) -> Percentiles {
    let mut h = new_histogram();
    for (v, c) in pairs {
        let _ = h.record_n(v.max(1), c);
    }
    of_histogram(&h, scale)
}

/// The percentiles of `h`, its values multiplied by `scale`.
pub fn of_histogram(h: &Histogram<u64>, scale: f64) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5) as f64 * scale,
        p99: h.value_at_quantile(0.99) as f64 * scale,
        p999: h.value_at_quantile(0.999) as f64 * scale,
        max: h.max() as f64 * scale,
    }
}

impl Report {
    pub fn new(cfg: &Config, procs: usize, pids: &[u32]) -> Report {
        Report {
            label: cfg.label.clone(),
            target: format!("{:?}", cfg.target).to_lowercase(),
            scenario: format!("{:?}", cfg.scenario).to_lowercase(),
            compression: cfg.compression,
            payload_bytes: cfg.size,
            streams: cfg.streams(),
            worker_processes: procs,
            server: Server {
                pids: pids.to_vec(),
                ..Server::default()
            },
            config: Some(cfg.clone()),
            ..Report::default()
        }
    }

    pub fn fill(
        &mut self,
        cfg: &Config,
        results: &[WorkerResult],
        window_seconds: f64,
        cpu: (f64, f64),
        aux_cpu: f64,
    ) {
        let mut receive: Vec<&str> = results.iter().map(|r| r.receive.as_str()).collect();
        receive.sort_unstable();
        receive.dedup();
        self.generator_receive = receive.join("+");
        let c = &mut self.connections;
        c.requested = cfg.connections;
        let d = &mut self.deliveries;
        let mut first = u64::MAX;
        let mut last = 0;
        for r in results {
            c.connected += r.connected;
            c.failed += r.failed;
            c.deflate_negotiated += r.negotiated;
            c.deflate_refused += r.not_negotiated;
            for (k, v) in &r.errors {
                *c.errors.entry(k.clone()).or_default() += v;
            }
            for (k, v) in &r.closes {
                *c.closed.entry(k.clone()).or_default() += v;
            }
            d.expected += r.expected;
            d.received += r.received;
            d.missing += r.missing;
            d.duplicated += r.duplicated;
            d.unexpected += r.unexpected;
            d.connections_with_missing += r.conns_with_missing;
            d.connections_with_duplicates += r.conns_with_duplicates;
            d.missing_sample.extend(r.missing_sample.iter().copied());
            d.other_messages += r.unmarked;
            first = first.min(r.first_start_ns);
            last = last.max(r.last_done_ns);
        }
        if last > first {
            c.seconds = (last - first) as f64 / 1e9;
            c.per_second = c.connected as f64 / c.seconds;
        }
        c.handshake_ms = percentiles(
            results.iter().flat_map(|r| r.connect_us.iter().copied()),
            1e-3,
        );
        self.latency_ms = percentiles(
            results.iter().flat_map(|r| r.latency_us.iter().copied()),
            1e-3,
        );
        self.arrival_ms = percentiles(
            results.iter().flat_map(|r| r.arrival_us.iter().copied()),
            1e-3,
        );
        // The workers' windows are as wide as this (the same function of the same config).
        let width_ns = timeline::width_ns(cfg.duration);
        self.timeline = timeline::merge(results.iter().flat_map(|r| r.timeline.iter()), width_ns);
        self.timeline_summary = timeline::summary(&self.timeline, width_ns);
        d.seconds = window_seconds;
        if window_seconds > 0.0 {
            d.per_second = d.received as f64 / window_seconds;
        }
        if self.publish.seconds > 0.0 {
            self.publish.rate = self.publish.ok as f64 / self.publish.seconds;
        }
        let s = &mut self.server;
        s.cpu_user_seconds = cpu.0;
        s.cpu_sys_seconds = cpu.1;
        s.cpu_seconds = cpu.0 + cpu.1;
        s.aux_cpu_seconds = aux_cpu;
        if d.received > 0 && s.cpu_seconds > 0.0 {
            s.us_per_delivery = s.cpu_seconds / d.received as f64 * 1e6;
            s.deliveries_per_cpu_second = d.received as f64 / s.cpu_seconds;
        }
        if c.connected > 0 {
            s.us_per_connect = s.connect_cpu_seconds / c.connected as f64 * 1e6;
            s.rss_per_connection_kib =
                s.rss_connected_kib.saturating_sub(s.rss_before_kib) as f64 / c.connected as f64;
        }
    }

    /// Whether the run went as asked: every connection up (and deflate where offered), every
    /// publication accepted and delivered exactly once.
    pub fn ok(&self) -> bool {
        let c = &self.connections;
        let d = &self.deliveries;
        c.failed == 0
            && c.deflate_refused == 0
            && self.publish.errors == 0
            && d.missing == 0
            && d.duplicated == 0
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let c = &self.connections;
        let d = &self.deliveries;
        let s = &self.server;
        let l = &self.latency_ms;
        let _ = writeln!(
            t,
            "== {} / {} / compression {} / {}-byte data / {} stream(s) / {} worker process(es)",
            self.label,
            self.scenario,
            if self.compression { "on" } else { "off" },
            self.payload_bytes,
            self.streams,
            self.worker_processes
        );
        let _ = writeln!(
            t,
            "connections        {} of {} (failed {}, deflate negotiated {}, refused {})",
            c.connected, c.requested, c.failed, c.deflate_negotiated, c.deflate_refused
        );
        let _ = writeln!(
            t,
            "connects           {:.0}/s over {:.2} s; connect+subscribe p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            c.per_second, c.seconds, c.handshake_ms.p50, c.handshake_ms.p99, c.handshake_ms.max
        );
        for (e, n) in &c.errors {
            let _ = writeln!(t, "  connect error x{n}: {e}");
        }
        for (e, n) in &c.closed {
            let _ = writeln!(t, "  ended early x{n}: {e}");
        }
        if self.publish.requested > 0 {
            let p = &self.publish;
            let _ = writeln!(
                t,
                "publications       {} of {} accepted ({} errors) in {:.2} s = {:.1}/s",
                p.ok, p.requested, p.errors, p.seconds, p.rate
            );
            if let Some(e) = &p.first_error {
                let _ = writeln!(t, "  first publish error: {}", e.replace("\r\n", " | "));
            }
            let _ = writeln!(
                t,
                "deliveries         {} of {} in {:.2} s = {:.0}/s; missing {} ({} connections), duplicated {} ({} connections), unexpected {}",
                d.received,
                d.expected,
                d.seconds,
                d.per_second,
                d.missing,
                d.connections_with_missing,
                d.duplicated,
                d.connections_with_duplicates,
                d.unexpected
            );
            if !d.missing_sample.is_empty() {
                let sample: Vec<String> = d
                    .missing_sample
                    .iter()
                    .take(10)
                    .map(|(c, n)| format!("conn {c} #{n}"))
                    .collect();
                let _ = writeln!(t, "  first missing: {}", sample.join(", "));
            }
            let _ = writeln!(
                t,
                "latency (ms)       p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (publish send -> receive, {} samples)",
                l.p50, l.p99, l.p999, l.max, l.count
            );
            let a = &self.arrival_ms;
            if a.count > 0 {
                let _ = writeln!(
                    t,
                    "  at the socket    p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (publish send -> kernel receive timestamp, before the generator runs)",
                    a.p50, a.p99, a.p999, a.max
                );
            }
            let w = &self.timeline_summary;
            if w.windows > 0 {
                let _ = writeln!(
                    t,
                    "  by window        {} windows of {:.0} ms: p99 over {} ms in {} (at the socket in {}); median window p99 {:.3}, worst {:.3} (at {:.1} s)",
                    w.windows,
                    w.width_s * 1e3,
                    timeline::OVER_MS,
                    w.over,
                    w.socket_over,
                    w.median_p99_ms,
                    w.worst_p99_ms,
                    w.worst_at_s
                );
            }
            if let Some(r) = self.redis_probe_ms.as_ref().filter(|r| r.count > 0) {
                let _ = writeln!(
                    t,
                    "redis subscriber   p50 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (the same publications read straight off Redis, {} samples)",
                    r.p50, r.p99, r.p999, r.max, r.count
                );
            }
            let _ = writeln!(
                t,
                "server CPU         {:.2} s (user {:.2}, sys {:.2}) = {:.3} us per delivery, {:.0} deliveries per CPU-second",
                s.cpu_seconds, s.cpu_user_seconds, s.cpu_sys_seconds, s.us_per_delivery, s.deliveries_per_cpu_second
            );
            if s.aux_cpu_seconds > 0.0 {
                let _ = writeln!(t, "redis CPU          {:.2} s", s.aux_cpu_seconds);
            }
            if self.generator_cpu_seconds > 0.0 {
                let _ = writeln!(
                    t,
                    "generator CPU      {:.2} s (the load generator's own, same window): reading {:.2} s with {}, publishing and probing {:.2} s",
                    self.generator_cpu_seconds,
                    self.generator_reading_cpu_seconds,
                    self.generator_receive,
                    self.generator_cpu_seconds - self.generator_reading_cpu_seconds,
                );
            }
        }
        let _ = writeln!(
            t,
            "server connect CPU {:.2} s = {:.1} us per connect",
            s.connect_cpu_seconds, s.us_per_connect
        );
        let _ = writeln!(
            t,
            "server RSS (KiB)   before {}, all connected {}, peak {}, end {}; {:.2} KiB per connection",
            s.rss_before_kib, s.rss_connected_kib, s.rss_peak_kib, s.rss_end_kib, s.rss_per_connection_kib
        );
        t
    }
}

/// Side by side: one column per result, each figure with its ratio to the first column.
pub fn compare(reports: &[Report], ratios: bool) -> String {
    let mut t = String::new();
    let Some(base) = reports.first() else {
        return t;
    };
    type Get = fn(&Report) -> f64;
    let rows: [(&str, Get, &str); 23] = [
        ("connections", |r| r.connections.connected as f64, ""),
        ("payload bytes", |r| r.payload_bytes as f64, ""),
        (
            "connects/s",
            |r| r.connections.per_second,
            "higher is better",
        ),
        (
            "connect+subscribe p99 (ms)",
            |r| r.connections.handshake_ms.p99,
            "lower is better",
        ),
        (
            "server CPU per connect (us)",
            |r| r.server.us_per_connect,
            "lower is better",
        ),
        (
            "deliveries/s",
            |r| r.deliveries.per_second,
            "higher is better",
        ),
        ("latency p50 (ms)", |r| r.latency_ms.p50, "lower is better"),
        ("latency p99 (ms)", |r| r.latency_ms.p99, "lower is better"),
        (
            "latency p99.9 (ms)",
            |r| r.latency_ms.p999,
            "lower is better",
        ),
        ("latency max (ms)", |r| r.latency_ms.max, "lower is better"),
        (
            "latency p99 at the socket (ms)",
            |r| r.arrival_ms.p99,
            "lower is better",
        ),
        (
            timeline::OVER_ROW,
            |r| r.timeline_summary.over as f64,
            "lower is better",
        ),
        (
            "median window p99 (ms)",
            |r| r.timeline_summary.median_p99_ms,
            "lower is better",
        ),
        (
            "Redis subscriber p99 (ms)",
            |r| r.redis_probe_ms.as_ref().map_or(0.0, |p| p.p99),
            "lower is better",
        ),
        (
            "server CPU per delivery (us)",
            |r| r.server.us_per_delivery,
            "lower is better",
        ),
        (
            "deliveries per server CPU-second",
            |r| r.server.deliveries_per_cpu_second,
            "higher is better",
        ),
        (
            "server RSS per connection (KiB)",
            |r| r.server.rss_per_connection_kib,
            "lower is better",
        ),
        ("missing", |r| r.deliveries.missing as f64, ""),
        ("duplicated", |r| r.deliveries.duplicated as f64, ""),
        ("redis CPU (s)", |r| r.server.aux_cpu_seconds, ""),
        ("generator CPU (s)", |r| r.generator_cpu_seconds, ""),
        (
            "generator reading CPU (s)",
            |r| r.generator_reading_cpu_seconds,
            "",
        ),
        ("publications accepted", |r| r.publish.ok as f64, ""),
    ];
    let _ = write!(t, "| figure |");
    for r in reports {
        let _ = write!(t, " {} |", r.label);
    }
    let _ = writeln!(t);
    let _ = write!(t, "|---|");
    for _ in reports {
        let _ = write!(t, "---|");
    }
    let _ = writeln!(t);
    for (name, get, _) in rows {
        let _ = write!(t, "| {name} |");
        let b = get(base);
        for (i, r) in reports.iter().enumerate() {
            let v = get(r);
            let num = if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            };
            if i == 0 || b == 0.0 || !ratios {
                let _ = write!(t, " {num} |");
            } else {
                let _ = write!(t, " {num} ({:.2}x) |", v / b);
            }
        }
        let _ = writeln!(t);
    }
    t
}
