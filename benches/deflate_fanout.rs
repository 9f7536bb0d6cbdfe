//! Criterion benchmark: what permessage-deflate adds to fan-out. One publication with a ~1 KB
//! compressible JSON `data` is fanned out by [`Hub::deliver`] to 10,000 local connections that
//! all negotiated deflate (`Connection::deflate = Some(level 1, threshold 256)`, the defaults),
//! against the same fan-out to 10,000 plain connections, same payload, same run.
//!
//! Every delivered publication is a fresh [`Publication`] (encoded outside the timing, the same
//! way for both cases), so the compressed case pays its one compression per publication inside
//! the timed `deliver`: the first deflate recipient compresses, the other 9,999 share the result.
//! One iteration is one whole fan-out; throughput is in deliveries (10,000 per iteration), so
//! `time / 10,000` is the cost per delivery. Time is the benchmark thread's CPU time
//! (`CLOCK_THREAD_CPUTIME_ID` on Linux), not wall time: on a small shared machine a preempted
//! fan-out would otherwise count other processes' work. Like `hot_path`'s `hub_fanout`, no writer runs:
//! this is the producer side only (queues start empty and regrow; hubs are rebuilt every
//! `DELIVERIES_PER_HUB` fan-outs outside the timing). What compression saves later (fewer bytes
//! for the writer's `writev` and the kernel) is not in here; `loadtest/cpu_per_delivery.sh`
//! measures the whole gateway process over real sockets.
//!
//! Groups:
//! - `deflate_fanout/deliver_10000`: `plain`, `deflate`, and `mixed` (every second connection
//!   negotiated deflate).
//! - `deflate_fanout/compress_once`: the one-time cost by itself: the compressed frame of a
//!   fresh publication ([`SharedFrame::for_recipient`] on a new frame).
//!
//! After criterion's report (in a `--bench` run whose name filter can select
//! `deflate_fanout/deliver_10000`), a plain timing loop prints the median ns per delivery of
//! both cases, interleaved round by round, and their ratio: `ratio compressed/plain: X.XX`.
//!
//! Run: `cargo bench --bench deflate_fanout` (shorter: `cargo bench --bench deflate_fanout --
//! --warm-up-time 1 --measurement-time 3`).

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;

use wsgate::hub::{DeflateParams, Delivery, Hub, Publication};
use wsgate::protocol::filter::SubscriptionOptions;
use wsgate::ws::frame;

/// A 1001-byte publication `data`, the kind of JSON that compresses to about half.
const DATA: &str = common::ROUTE_UPDATE_1001B;

/// Local connections per hub.
const FANOUT: usize = 10_000;
/// Fan-outs into one hub's queues before it is rebuilt with empty ones (outside the timing); see
/// `hot_path.rs` for why (nothing drains the queues).
const DELIVERIES_PER_HUB: u64 = 64;
const TOPIC: &str = "routes:eu-west-1";
/// The node's default compression settings.
const DEFLATE: DeflateParams = DeflateParams {
    level: 1,
    threshold: 256,
    window_bits: 15,
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// No connection negotiated deflate.
    Plain,
    /// Every connection negotiated deflate.
    Deflate,
    /// Every second connection negotiated deflate.
    Mixed,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Plain => "plain",
            Mode::Deflate => "deflate",
            Mode::Mixed => "mixed",
        }
    }
}

fn build_hub(mode: Mode) -> Arc<Hub> {
    let topic: Arc<str> = Arc::from(TOPIC);
    let options = SubscriptionOptions::default();
    let hub = Hub::new();
    for i in 0..FANOUT {
        let deflate = match mode {
            Mode::Plain => None,
            Mode::Deflate => Some(DEFLATE),
            Mode::Mixed => (i % 2 == 0).then_some(DEFLATE),
        };
        let conn = common::connection(&hub, i, deflate);
        hub.register(Arc::clone(&conn));
        hub.subscribe(&topic, &conn, &options);
    }
    hub
}

fn data() -> Box<RawValue> {
    RawValue::from_string(DATA.to_owned()).expect("valid JSON")
}

fn publication(data: &RawValue, seq: u64) -> Publication {
    Publication::encode(TOPIC, "route_update", seq, "e-3f9a1c", data)
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`): unlike wall time it leaves out
/// the time the thread spent preempted, which matters on a 2-core machine shared with other work.
#[cfg(all(target_os = "linux", target_pointer_width = "64"))]
fn thread_cpu_time() -> Duration {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec (two 64-bit fields on 64-bit Linux), and the
    // clock id is Linux's CLOCK_THREAD_CPUTIME_ID.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Elsewhere: wall time (`Instant`), measured from the first call.
#[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
fn thread_cpu_time() -> Duration {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed()
}

/// Wall time and thread CPU time of some fan-outs.
#[derive(Default, Clone, Copy)]
struct Timing {
    wall: Duration,
    cpu: Duration,
}

/// Times `iters` fan-outs of fresh publications, rebuilding the hub every `DELIVERIES_PER_HUB`
/// outside the timing. Publications are encoded outside the timing too, so both modes time the
/// same thing but for what deflate adds (its compression, in the first `for_recipient`).
fn timed_fanouts(mode: Mode, data: &RawValue, iters: u64) -> Timing {
    let mut total = Timing::default();
    let mut left = iters;
    let mut seq = 0;
    while left > 0 {
        let n = left.min(DELIVERIES_PER_HUB);
        let hub = build_hub(mode);
        let publications: Vec<Publication> = (0..n)
            .map(|_| {
                seq += 1;
                publication(data, seq)
            })
            .collect();
        let start = Instant::now();
        let cpu_start = thread_cpu_time();
        let mut delivery = Delivery::default();
        for p in &publications {
            delivery = black_box(hub.deliver(black_box(p)));
        }
        total.cpu += thread_cpu_time() - cpu_start;
        total.wall += start.elapsed();
        // Every recipient got its frame, and deflate recipients got the compressed one.
        assert_eq!((delivery.delivered, delivery.dropped), (FANOUT, 0));
        let last = publications.last().expect("at least one");
        if mode != Mode::Plain {
            let compressed = last.frame.for_recipient(Some(DEFLATE));
            assert_eq!(compressed[0] & 0x40, 0x40, "RSV1: the frame is compressed");
            assert!(compressed.len() < last.frame.plain().len());
        }
        drop(hub);
        left -= n;
    }
    total
}

fn deliver_group(c: &mut Criterion) {
    let data = data();
    let mut group = c.benchmark_group("deflate_fanout");
    group.throughput(Throughput::Elements(FANOUT as u64));
    group.sample_size(30);
    for mode in [Mode::Plain, Mode::Deflate, Mode::Mixed] {
        group.bench_function(BenchmarkId::new("deliver_10000", mode.label()), |b| {
            b.iter_custom(|iters| timed_fanouts(mode, &data, iters).cpu)
        });
    }
    group.finish();
}

fn compress_group(c: &mut Criterion) {
    let data = data();
    let p = publication(&data, 1);
    let plain_len = frame::payload_of(p.frame.plain()).len();
    let compressed_len = frame::payload_of(&p.frame.for_recipient(Some(DEFLATE))).len();
    println!(
        "publication frame payload: {plain_len} bytes plain, {compressed_len} bytes compressed \
         (level {}, {:.0}%)",
        DEFLATE.level,
        100.0 * compressed_len as f64 / plain_len as f64
    );
    let mut group = c.benchmark_group("deflate_fanout");
    group.throughput(Throughput::Bytes(plain_len as u64));
    group.bench_function("compress_once", |b| {
        b.iter_batched(
            || publication(&data, 1),
            |p| black_box(p.frame.for_recipient(Some(DEFLATE))),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// Plain and compressed fan-outs, interleaved round by round so that both see the same machine
/// state; prints the medians in ns (thread CPU time) per delivery and the ratio.
fn print_summary() {
    const ROUNDS: usize = 31;
    let data = data();
    let per_delivery =
        |d: Duration| d.as_nanos() as f64 / (DELIVERIES_PER_HUB as f64 * FANOUT as f64);
    let mut plain = Vec::with_capacity(ROUNDS);
    let mut deflate = Vec::with_capacity(ROUNDS);
    let mut ratios = Vec::with_capacity(ROUNDS);
    let (mut wall_plain, mut wall_deflate) = (Duration::ZERO, Duration::ZERO);
    for round in 0..ROUNDS {
        // Alternate which mode goes first.
        let (tp, td) = if round % 2 == 0 {
            let tp = timed_fanouts(Mode::Plain, &data, DELIVERIES_PER_HUB);
            (tp, timed_fanouts(Mode::Deflate, &data, DELIVERIES_PER_HUB))
        } else {
            let td = timed_fanouts(Mode::Deflate, &data, DELIVERIES_PER_HUB);
            (timed_fanouts(Mode::Plain, &data, DELIVERIES_PER_HUB), td)
        };
        wall_plain += tp.wall;
        wall_deflate += td.wall;
        let (p, d) = (per_delivery(tp.cpu), per_delivery(td.cpu));
        plain.push(p);
        deflate.push(d);
        ratios.push(d / p);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[ROUNDS / 2], v[0], v[ROUNDS - 1])
    };
    let (p, pmin, pmax) = median(&mut plain);
    let (d, dmin, dmax) = median(&mut deflate);
    let (r, rmin, rmax) = median(&mut ratios);
    println!(
        "fanout plain:   {p:.1} ns per delivery ({FANOUT} connections; thread CPU time, median \
         of {ROUNDS} rounds of {DELIVERIES_PER_HUB} fan-outs, min {pmin:.1}, max {pmax:.1})"
    );
    println!(
        "fanout deflate: {d:.1} ns per delivery (one level-{} compression per publication \
         included; min {dmin:.1}, max {dmax:.1})",
        DEFLATE.level
    );
    println!(
        "ratio compressed/plain: {:.2} (median of per-round ratios {r:.2}, min {rmin:.2}, max \
         {rmax:.2}; goal at most 1.2)",
        d / p
    );
    println!(
        "wall time, all rounds: plain {:.1} ns, deflate {:.1} ns per delivery (ratio {:.2})",
        per_delivery(wall_plain) / ROUNDS as f64,
        per_delivery(wall_deflate) / ROUNDS as f64,
        wall_deflate.as_secs_f64() / wall_plain.as_secs_f64()
    );
}

/// `DEFLATE_FANOUT_FIXED=MODE:N` (MODE `plain`, `deflate` or `mixed`): run exactly N fan-outs of
/// fresh publications and exit, without criterion: a fixed amount of work for an instruction
/// count, e.g. `valgrind --tool=callgrind --toggle-collect='*Hub::deliver*' BENCH_BINARY` (see
/// `loadtest/README.md`).
fn fixed_run_requested() -> Option<(Mode, u64)> {
    let spec = std::env::var("DEFLATE_FANOUT_FIXED").ok()?;
    let (mode, n) = spec.split_once(':').unwrap_or((spec.as_str(), "64"));
    let mode = match mode {
        "plain" => Mode::Plain,
        "deflate" => Mode::Deflate,
        "mixed" => Mode::Mixed,
        other => panic!("DEFLATE_FANOUT_FIXED: unknown mode {other:?}"),
    };
    Some((
        mode,
        n.parse().expect("DEFLATE_FANOUT_FIXED: N is a number"),
    ))
}

fn main() {
    if let Some((mode, n)) = fixed_run_requested() {
        let t = timed_fanouts(mode, &data(), n);
        println!(
            "{}: {n} fan-outs to {FANOUT} connections, {:.1} ns (thread CPU) per delivery",
            mode.label(),
            t.cpu.as_nanos() as f64 / (n as f64 * FANOUT as f64)
        );
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    deliver_group(&mut c);
    compress_group(&mut c);
    c.final_summary();
    if common::run_selects("deflate_fanout/deliver_10000") {
        print_summary();
    }
}
