//! The run's latency over time: one small histogram per window of publish send time (100 ms,
//! wider for long runs), for the publish-to-read and publish-to-socket latencies.
//!
//! Why: a p99 over the whole run does not say whether the tail is spread evenly (every
//! publication a little late: the servers are short of CPU) or made of a few stalls (a few
//! hundred milliseconds in which everything queues: something else took the machine). The two
//! call for different fixes, and on a shared machine the second is common: in one session a
//! sampler started every 3 s by hand stalled the whole pipeline for 300 ms each time and put the
//! run's p99 at 36 ms, where the windows between the stalls had a p99 of 0.2 ms.
//!
//! Workers record into a [`Timeline`] and hand its windows to the parent as [`WindowResult`]s
//! (windows start on multiples of the width on the shared clock, so the parent merges them by
//! start; the width is [`width_ns`] of the run's duration on both sides); the parent turns the
//! merged windows into [`WindowFigures`] and a [`Summary`] for the report.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::worker::recorded;

/// The narrowest window.
const MIN_WIDTH_NS: u64 = 100_000_000;
/// Windows per run at most (wider windows for runs longer than 30 s), which bounds the memory:
/// two histograms of a few KiB per window.
const MAX_WINDOWS: f64 = 300.0;
/// The latency the target names: windows whose p99 is above it are counted.
pub const OVER_MS: f64 = 2.0;
/// The `compare` row of [`Summary::over`]; it names [`OVER_MS`] (a test keeps the two together).
pub const OVER_ROW: &str = "windows with p99 over 2 ms";

/// The window width for a run that publishes for `seconds`.
pub fn width_ns(seconds: f64) -> u64 {
    MIN_WIDTH_NS.max((seconds.max(0.0) * 1e9 / MAX_WINDOWS) as u64)
}

/// Histograms of microseconds, 2 significant figures (p99 per window, not per sample), up to
/// a minute.
fn histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds")
}

/// A worker's windows while it runs.
pub struct Timeline {
    width_ns: u64,
    windows: BTreeMap<u64, (Histogram<u32>, Histogram<u32>)>,
}

impl Timeline {
    pub fn new(width_ns: u64) -> Timeline {
        Timeline {
            width_ns: width_ns.max(1),
            windows: BTreeMap::new(),
        }
    }

    /// One delivery of a publication sent at `sent_ns`, read `read_us` later, that reached the
    /// socket `socket_us` after it was sent (the kernel's stamp, where there is one).
    pub fn record(&mut self, sent_ns: u64, read_us: u64, socket_us: Option<u64>) {
        let (read, socket) = self
            .windows
            .entry(sent_ns / self.width_ns)
            .or_insert_with(|| (histogram(), histogram()));
        read.saturating_record(read_us);
        if let Some(us) = socket_us {
            socket.saturating_record(us);
        }
    }

    pub fn results(&self) -> Vec<WindowResult> {
        self.windows
            .iter()
            .map(|(&index, (read, socket))| WindowResult {
                start_ns: index * self.width_ns,
                read_us: recorded(read),
                socket_us: recorded(socket),
            })
            .collect()
    }
}

/// One window as a worker hands it over: (microseconds, count) pairs.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WindowResult {
    pub start_ns: u64,
    pub read_us: Vec<(u64, u64)>,
    pub socket_us: Vec<(u64, u64)>,
}

/// One window of the whole run, as reported.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct WindowFigures {
    /// Seconds from the first window's start.
    pub at_s: f64,
    pub deliveries: u64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// At the socket; 0 where the kernel gave no receive timestamps.
    pub socket_p99_ms: f64,
    pub socket_max_ms: f64,
}

/// Merges the workers' windows of `width_ns` (by start time) into the run's.
pub fn merge<'a>(
    results: impl Iterator<Item = &'a WindowResult>,
    width_ns: u64,
) -> Vec<WindowFigures> {
    let mut merged: BTreeMap<u64, (Histogram<u32>, Histogram<u32>)> = BTreeMap::new();
    for w in results {
        let (read, socket) = merged
            .entry(w.start_ns / width_ns.max(1))
            .or_insert_with(|| (histogram(), histogram()));
        for &(v, n) in &w.read_us {
            let _ = read.record_n(v.max(1), n.min(u32::MAX as u64) as u32);
        }
        for &(v, n) in &w.socket_us {
            let _ = socket.record_n(v.max(1), n.min(u32::MAX as u64) as u32);
        }
    }
    let first = merged.keys().next().copied().unwrap_or(0);
    merged
        .into_iter()
        .map(|(index, (read, socket))| WindowFigures {
            at_s: ((index - first) * width_ns) as f64 / 1e9,
            deliveries: read.len(),
            p99_ms: read.value_at_quantile(0.99) as f64 / 1e3,
            max_ms: read.max() as f64 / 1e3,
            socket_p99_ms: socket.value_at_quantile(0.99) as f64 / 1e3,
            socket_max_ms: socket.max() as f64 / 1e3,
        })
        .collect()
}

/// What the table says about the windows.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub windows: usize,
    pub width_s: f64,
    /// Windows whose p99 (read) was over [`OVER_MS`].
    pub over: usize,
    /// The same at the socket.
    pub socket_over: usize,
    /// The median of the windows' p99 (read).
    pub median_p99_ms: f64,
    /// The worst window's p99 (read) and where it started.
    pub worst_p99_ms: f64,
    pub worst_at_s: f64,
}

/// Only windows with a fair number of deliveries count (an edge window with a handful of
/// deliveries has no meaningful p99): more than a tenth of the average window's.
pub fn summary(windows: &[WindowFigures], width_ns: u64) -> Summary {
    let total: u64 = windows.iter().map(|w| w.deliveries).sum();
    let floor = total / (windows.len().max(1) as u64 * 10);
    let full: Vec<&WindowFigures> = windows.iter().filter(|w| w.deliveries > floor).collect();
    if full.is_empty() {
        return Summary::default();
    }
    let mut p99s: Vec<f64> = full.iter().map(|w| w.p99_ms).collect();
    p99s.sort_by(f64::total_cmp);
    let worst = full
        .iter()
        .max_by(|a, b| a.p99_ms.total_cmp(&b.p99_ms))
        .expect("not empty");
    Summary {
        windows: full.len(),
        width_s: width_ns as f64 / 1e9,
        over: full.iter().filter(|w| w.p99_ms > OVER_MS).count(),
        socket_over: full.iter().filter(|w| w.socket_p99_ms > OVER_MS).count(),
        median_p99_ms: p99s[p99s.len() / 2],
        worst_p99_ms: worst.p99_ms,
        worst_at_s: worst.at_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn a_stall_shows_as_its_windows_and_workers_merge_by_start() {
        // Two workers, 10 windows of 100 ms, 100 deliveries per window each: 0.2 ms late,
        // except window 4, where worker b's deliveries are 50 ms late.
        let width = width_ns(1.0);
        let (mut a, mut b) = (Timeline::new(width), Timeline::new(width));
        let t0 = 1_700_000_000_000 * MS;
        for w in 0..10u64 {
            for k in 0..100u64 {
                let sent = t0 + w * 100 * MS + k * MS;
                a.record(sent, 200, Some(100));
                let late_us = if w == 4 { 50_000 } else { 200 };
                b.record(sent, late_us, Some(late_us - 100));
            }
        }
        let windows = merge(a.results().iter().chain(b.results().iter()), width);
        assert_eq!(windows.len(), 10);
        assert!(windows.iter().all(|w| w.deliveries == 200));
        assert_eq!(windows[4].at_s, 0.4);
        assert!(
            (49.0..51.0).contains(&windows[4].p99_ms),
            "{:?}",
            windows[4]
        );
        assert!(
            (0.19..0.21).contains(&windows[3].p99_ms),
            "{:?}",
            windows[3]
        );
        let s = summary(&windows, width);
        assert_eq!((s.windows, s.over, s.socket_over), (10, 1, 1));
        assert_eq!(s.worst_at_s, 0.4);
        assert!((0.19..0.21).contains(&s.median_p99_ms), "{s:?}");
    }

    #[test]
    fn long_runs_get_wider_windows_and_sparse_edges_do_not_count() {
        assert_eq!(width_ns(10.0), 100 * MS);
        assert_eq!(width_ns(30.0), 100 * MS);
        assert_eq!(width_ns(60.0), 200 * MS);
        let mut t = Timeline::new(100 * MS);
        for w in 0..5u64 {
            for _ in 0..1000 {
                t.record(w * 100 * MS, 500, None);
            }
        }
        // One straggler window with a single, very late delivery.
        t.record(5 * 100 * MS, 900_000, None);
        let windows = merge(t.results().iter(), 100 * MS);
        assert_eq!(windows.len(), 6);
        let s = summary(&windows, 100 * MS);
        assert_eq!((s.windows, s.over, s.socket_over), (5, 0, 0));
        assert!(s.worst_p99_ms < 1.0, "{s:?}");
    }

    /// The two limits of `summary` at their edges: a window counts with more than a tenth of
    /// the average window's deliveries, and is over with a p99 above `OVER_MS`, not at it.
    #[test]
    fn summary_limits_at_their_edges() {
        let window = |deliveries, p99_ms| WindowFigures {
            deliveries,
            p99_ms,
            ..WindowFigures::default()
        };
        // Four windows of 100 and one of x: the floor is (400 + x) / 50, 8 for x = 8 and 9.
        let with = |x| {
            let mut w = vec![window(100, 0.5); 4];
            w.push(window(x, 0.5));
            summary(&w, 100 * MS).windows
        };
        assert_eq!(with(8), 4, "8 deliveries is not more than the floor of 8");
        assert_eq!(with(9), 5, "9 is");
        let s = summary(
            &[window(100, OVER_MS), window(100, OVER_MS + 0.001)],
            100 * MS,
        );
        assert_eq!(s.over, 1, "{s:?}");
        assert_eq!(s.width_s, 0.1);
    }

    #[test]
    fn the_compare_row_names_the_threshold() {
        assert_eq!(OVER_ROW, format!("windows with p99 over {OVER_MS} ms"));
    }
}
