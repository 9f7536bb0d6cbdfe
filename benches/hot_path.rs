//! Criterion benchmark of wsgate's hot path: what a message costs between its frame arriving and
//! its frame bytes sitting in every subscriber's send queue.
//!
//! Groups:
//! - `envelope_parse`: a client envelope (83 B small publish, 1.7 KB publish with a nested
//!   `data` object) parsed by wsgate's [`Inbound::parse`] (serde_json, `RawValue`, borrowing),
//!   by simd-json into an equivalent struct (`simd_json::serde::from_slice`, with and without
//!   reused `Buffers`), into a simd-json `BorrowedValue` tree (`to_borrowed_value`), and into a
//!   serde_json `Value` tree. Throughput in input bytes. The simd-json timings include the
//!   mutable copy of the input that in-place parsing needs.
//! - `publication_encode`: [`Publication::encode`] (message id, timestamp, JSON serialization
//!   into a complete text frame, copy of `data`) for a 101 B and a 1001 B `data`. Throughput in
//!   `data` bytes.
//! - `hub_fanout`: [`Hub::deliver`] of one publication to 10,000 local connections subscribed to
//!   one topic, each with its own unbounded-in-practice [`Outbound`] queue; once with no filters,
//!   once with every second subscriber filtered (the filter passes), once with every second
//!   subscriber filtered out (the filter rejects). One iteration is one whole fan-out;
//!   throughput is in deliveries (10,000 per iteration), so `thrpt` reads as deliveries/s and
//!   `time / 10,000` is the cost per delivery. No writer runs: this is the producer side only,
//!   and an upper bound (the queues start empty and regrow; see `DELIVERIES_PER_HUB`).
//!
//! After criterion's report, a short manual timing loop prints `fanout: X ns per delivery` lines
//! (skipped when a name filter is given that cannot match `hub_fanout`).
//!
//! Run: `cargo bench --bench hot_path` (shorter: `cargo bench --bench hot_path -- --warm-up-time 1
//! --measurement-time 3`; one group: `cargo bench --bench hot_path -- hub_fanout`).

mod common;

use std::borrow::Cow;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use serde::Deserialize;
use serde_json::value::RawValue;
use simd_json::BorrowedValue;

use wsgate::hub::{Hub, Publication};
use wsgate::protocol::envelope::Inbound;
use wsgate::protocol::filter::{options_per_topic, SubscriptionOptions};

/// A small client publish (the shape of a chat message).
const SMALL_ENVELOPE: &str =
    r#"{"type":"publish","id":"r1","data":{"topic":"chat:1","type":"m","data":{"t":"hi"}}}"#;

/// A 1.7 KB client publish: a route update with nested objects, arrays, numbers, `\u` escapes
/// and an escaped quote.
const LARGE_ENVELOPE: &str = concat!(
    r#"{"type":"publish","id":"req-7f3a91c2","topic":"routes:eu-west-1""#,
    r#","data":{"type":"route_update","routeId":"rt-5f2c9a0e","status":"ACTIVE","version":42"#,
    r#","updatedAt":"2026-11-23T10:15:32.123Z","driver":{"id":"drv-1093""#,
    r#","name":"Ana M\u00fcller","phone":"+49 30 1234567","vehicle":{"plate":"B-WS 4711""#,
    r#","model":"eSprinter","capacityKg":1200,"electric":true}},"stops":[{"seq":1,"id":"st-001""#,
    r#","name":"Depot Nord","lat":52.5561,"lon":13.3472,"eta":"2026-11-23T10:30:00Z""#,
    r#","status":"DONE","parcels":12},{"seq":2,"id":"st-002","name":"Friedrichstra\u00dfe 44""#,
    r#","lat":52.5079,"lon":13.3904,"eta":"2026-11-23T10:52:00Z","status":"DONE","parcels":3}"#,
    r#",{"seq":3,"id":"st-003","name":"Alexanderplatz 1","lat":52.5219,"lon":13.4132"#,
    r#","eta":"2026-11-23T11:10:00Z","status":"PENDING","parcels":5,"note":"Ring twice"#,
    r#", \"Lieferung\" at reception"},{"seq":4,"id":"st-004","name":"Warschauer Str. 70""#,
    r#","lat":52.5058,"lon":13.4491,"eta":"2026-11-23T11:34:00Z","status":"PENDING""#,
    r#","parcels":1},{"seq":5,"id":"st-005","name":"Depot Nord","lat":52.5561,"lon":13.3472"#,
    r#","eta":"2026-11-23T12:05:00Z","status":"PENDING","parcels":0}],"tags":["express""#,
    r#","cold-chain","priority:high","zone:mitte"],"metrics":{"distanceKm":38.7"#,
    r#","durationMin":95,"co2Kg":0.0,"onTimeRate":0.97,"delays":[{"stop":"st-002","minutes":4"#,
    r#","reason":"traffic"}]},"customer":{"id":"cus-2231","name":"Kaffeer\u00f6sterei GmbH""#,
    r#","contact":{"email":"ops@example.com","phone":"+49 30 7654321"}"#,
    r#","sla":{"windowStart":"10:00","windowEnd":"13:00","penaltyEurPerMin":1.5}}"#,
    r#","history":[{"at":"2026-11-23T09:58:02.417Z","by":"dispatch","event":"assigned"}"#,
    r#",{"at":"2026-11-23T10:02:44.005Z","by":"drv-1093","event":"started"}"#,
    r#",{"at":"2026-11-23T10:29:51.880Z","by":"drv-1093","event":"stop_done""#,
    r#","stop":"st-001"}]}}"#,
);

/// A 101-byte publication `data` (also the fan-out payload; `status` is what filters look at).
const SMALL_DATA: &str = common::DATA_101B;

/// A 1001-byte publication `data`.
const LARGE_DATA: &str = common::ROUTE_UPDATE_1001B;

/// The same envelope shape as wsgate's `Inbound`, for simd-json. simd-json's serde deserializer
/// has no `RawValue`, and it unescapes strings in place, so the original text of `data` cannot
/// be kept: the closest equivalent borrows a `BorrowedValue` tree for `id`, `data`, `content`.
/// (Forwarding would then also need a re-serialization of `data`, which is not measured here.)
#[derive(Deserialize)]
// simd-json's `BorrowedValue<'a>` deserializes only from exactly `'a` input.
#[serde(bound(deserialize = "'a: 'de"))]
#[allow(dead_code)] // fields are only read through black_box
struct SimdInbound<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<BorrowedValue<'a>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<BorrowedValue<'a>>,
    #[serde(borrow, default)]
    topic: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<BorrowedValue<'a>>,
    #[serde(borrow, default)]
    content: Option<BorrowedValue<'a>>,
}

fn envelope_parse(c: &mut Criterion) {
    assert_eq!(SMALL_ENVELOPE.len(), 83);
    assert!(
        (1_600..1_800).contains(&LARGE_ENVELOPE.len()),
        "{}",
        LARGE_ENVELOPE.len()
    );
    // Every parser must accept both inputs (and agree on the payload being there).
    for input in [SMALL_ENVELOPE, LARGE_ENVELOPE] {
        let m = Inbound::parse(input).expect("wsgate parses");
        assert_eq!(m.kind(), "publish");
        assert!(m.payload().is_some());
        let mut copy = input.as_bytes().to_vec();
        let s: SimdInbound<'_> = simd_json::serde::from_slice(&mut copy).expect("simd-json parses");
        assert_eq!(s.kind.as_deref(), Some("publish"));
        assert!(s.data.is_some());
    }

    let mut group = c.benchmark_group("envelope_parse");
    for (size, input) in [
        ("small_83B", SMALL_ENVELOPE),
        ("large_1725B", LARGE_ENVELOPE),
    ] {
        group.throughput(Throughput::Bytes(input.len() as u64));

        // (a) What the gateway does: borrow `id`/`data` as raw JSON text, build no tree.
        // Input is `&str`: fastwebsockets has already validated the text frame's UTF-8.
        group.bench_with_input(
            BenchmarkId::new("wsgate_inbound_serde_json", size),
            input,
            |b, input| {
                b.iter(|| {
                    let m = Inbound::parse(black_box(input)).expect("parses");
                    black_box(&m);
                })
            },
        );

        // simd-json parses in place (it unescapes strings into the input), so every parse needs
        // a mutable copy of the frame bytes. That copy stays INSIDE the measured section: the
        // gateway would have to make it too (the frame text must survive for forwarding and
        // for error replies), so it is part of what simd-json costs here. The copy goes into a
        // reused scratch buffer (memcpy, no allocation), as a session would do; simd-json also
        // validates UTF-8 itself, which serde_json on `&str` does not.
        let mut scratch: Vec<u8> = Vec::with_capacity(input.len());

        // (b) Same envelope shape, simd-json serde, fresh internal buffers per parse.
        group.bench_with_input(
            BenchmarkId::new("simd_json_struct", size),
            input,
            |b, input| {
                b.iter(|| {
                    scratch.clear();
                    scratch.extend_from_slice(black_box(input).as_bytes());
                    let m: SimdInbound<'_> =
                        simd_json::serde::from_slice(&mut scratch).expect("parses");
                    black_box(&m);
                })
            },
        );

        // (b') The same with simd-json's parser buffers kept between parses (its best case).
        let mut buffers = simd_json::Buffers::new(input.len());
        group.bench_with_input(
            BenchmarkId::new("simd_json_struct_reused_buffers", size),
            input,
            |b, input| {
                b.iter(|| {
                    scratch.clear();
                    scratch.extend_from_slice(black_box(input).as_bytes());
                    let m: SimdInbound<'_> =
                        simd_json::serde::from_slice_with_buffers(&mut scratch, &mut buffers)
                            .expect("parses");
                    black_box(&m);
                })
            },
        );

        // (c) Full value trees: simd-json BorrowedValue vs serde_json Value (what a filter needs).
        group.bench_with_input(
            BenchmarkId::new("simd_json_borrowed_value", size),
            input,
            |b, input| {
                b.iter(|| {
                    scratch.clear();
                    scratch.extend_from_slice(black_box(input).as_bytes());
                    let v = simd_json::to_borrowed_value(&mut scratch).expect("parses");
                    black_box(&v);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("simd_json_borrowed_value_reused_buffers", size),
            input,
            |b, input| {
                b.iter(|| {
                    scratch.clear();
                    scratch.extend_from_slice(black_box(input).as_bytes());
                    let v = simd_json::to_borrowed_value_with_buffers(&mut scratch, &mut buffers)
                        .expect("parses");
                    black_box(&v);
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", size),
            input,
            |b, input| {
                b.iter(|| {
                    let v: serde_json::Value =
                        serde_json::from_str(black_box(input)).expect("parses");
                    black_box(&v);
                })
            },
        );
    }
    group.finish();
}

fn raw(json: &str) -> Box<RawValue> {
    common::raw(json)
}

fn publication_encode(c: &mut Criterion) {
    assert_eq!(SMALL_DATA.len(), 101);
    assert_eq!(LARGE_DATA.len(), 1001);
    let mut group = c.benchmark_group("publication_encode");
    for (size, data) in [("data_101B", SMALL_DATA), ("data_1001B", LARGE_DATA)] {
        let data = raw(data);
        group.throughput(Throughput::Bytes(data.get().len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &data, |b, data| {
            b.iter(|| {
                Publication::encode(
                    black_box("routes:eu-west-1"),
                    black_box("route_update"),
                    black_box(42),
                    black_box("e-3f9a1c"),
                    black_box(data),
                )
            })
        });
    }
    group.finish();
}

/// Local connections in the fan-out benchmark.
const FANOUT: usize = 10_000;
/// Deliveries into one hub's queues before it is rebuilt with empty ones (outside the timing).
///
/// Nothing drains the queues (no writer runs, and `Outbound` has no public way to take frames
/// out), so each queue grows by one 32-byte `Bytes` per delivery. Rebuilding the hub (10,000
/// connections, registered and subscribed) in the untimed part of `iter_custom` bounds memory
/// (10,000 x 64 x 32 B = 20 MB of queue slots) and keeps the per-queue footprint closer to a
/// drained queue's than a long run would. The price: fresh queues start with no capacity, so
/// each `VecDeque` regrows (4, 8, 16, 32, 64) inside the timing, whereas a live writer drains
/// but keeps the capacity. The figures are therefore an upper bound; a standalone test of
/// 10,000 `VecDeque`s of 32-byte items on the 2-core machine put regrowth at roughly 15-25 ns
/// per push (fresh vs pre-sized queues).
const DELIVERIES_PER_HUB: u64 = 64;
const FANOUT_TOPIC: &str = "routes:eu-west-1";

#[derive(Clone, Copy)]
enum Filtering {
    /// No subscriber filters.
    None,
    /// Every second subscriber has a filter that the publication passes.
    HalfPass,
    /// Every second subscriber has a filter that the publication fails.
    HalfReject,
}

impl Filtering {
    fn label(self) -> &'static str {
        match self {
            Filtering::None => "no_filter",
            Filtering::HalfPass => "half_filtered_pass",
            Filtering::HalfReject => "half_filtered_reject",
        }
    }
}

/// A hub with `FANOUT` registered connections, all subscribed to `FANOUT_TOPIC`.
fn build_hub(filtering: Filtering) -> Arc<Hub> {
    let topic: Arc<str> = Arc::from(FANOUT_TOPIC);
    let topics = [FANOUT_TOPIC.to_owned()];
    let filters = match filtering {
        Filtering::None => None,
        Filtering::HalfPass => Some(serde_json::json!({"status": ["ACTIVE", "PENDING"]})),
        Filtering::HalfReject => Some(serde_json::json!({"status": ["DELETED"]})),
    };
    let filtered = match &filters {
        Some(f) => options_per_topic(Some(f), &topics, None)
            .expect("valid filters")
            .remove(FANOUT_TOPIC)
            .expect("options for the topic"),
        None => SubscriptionOptions::default(),
    };
    let plain = SubscriptionOptions::default();
    let hub = Hub::new();
    for i in 0..FANOUT {
        let conn = common::connection(&hub, i, None);
        hub.register(Arc::clone(&conn));
        let options = if i % 2 == 1 { &filtered } else { &plain };
        hub.subscribe(&topic, &conn, options);
    }
    hub
}

fn fanout_publication() -> Publication {
    Publication::encode(
        FANOUT_TOPIC,
        "route_update",
        1,
        "e-3f9a1c",
        &raw(SMALL_DATA),
    )
}

/// Times `iters` fan-outs, rebuilding the hub every `DELIVERIES_PER_HUB` outside the timing.
fn timed_fanouts(filtering: Filtering, publication: &Publication, iters: u64) -> Duration {
    let expected_delivered = match filtering {
        Filtering::None | Filtering::HalfPass => FANOUT,
        Filtering::HalfReject => FANOUT / 2,
    };
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let n = left.min(DELIVERIES_PER_HUB);
        let hub = build_hub(filtering);
        let start = Instant::now();
        for _ in 0..n {
            black_box(hub.deliver(black_box(publication)));
        }
        total += start.elapsed();
        let last = hub.deliver(publication);
        assert_eq!((last.delivered, last.dropped), (expected_delivered, 0));
        drop(hub);
        left -= n;
    }
    total
}

fn hub_fanout(c: &mut Criterion) {
    let publication = fanout_publication();
    let mut group = c.benchmark_group("hub_fanout");
    group.throughput(Throughput::Elements(FANOUT as u64));
    group.sample_size(30);
    for filtering in [Filtering::None, Filtering::HalfPass, Filtering::HalfReject] {
        group.bench_function(
            BenchmarkId::new("deliver_10000_subscribers", filtering.label()),
            |b| b.iter_custom(|iters| timed_fanouts(filtering, &publication, iters)),
        );
    }
    group.finish();
}

/// A plain timing loop, independent of criterion's statistics: the median of several rounds of
/// `DELIVERIES_PER_HUB` fan-outs, in nanoseconds per delivery.
fn print_fanout_summary() {
    let publication = fanout_publication();
    const ROUNDS: usize = 15;
    for filtering in [Filtering::None, Filtering::HalfPass, Filtering::HalfReject] {
        let mut per_delivery: Vec<f64> = (0..ROUNDS)
            .map(|_| {
                let t = timed_fanouts(filtering, &publication, DELIVERIES_PER_HUB);
                t.as_nanos() as f64 / (DELIVERIES_PER_HUB as f64 * FANOUT as f64)
            })
            .collect();
        per_delivery.sort_by(f64::total_cmp);
        let median = per_delivery[ROUNDS / 2];
        let (min, max) = (per_delivery[0], per_delivery[ROUNDS - 1]);
        match filtering {
            Filtering::None => println!(
                "fanout: {median:.1} ns per delivery ({FANOUT} subscribers, no filters; median of \
                 {ROUNDS} rounds of {DELIVERIES_PER_HUB} fan-outs, min {min:.1}, max {max:.1})"
            ),
            other => println!(
                "fanout ({}): {median:.1} ns per subscriber ({FANOUT} subscribers, every second \
                 one filtered; min {min:.1}, max {max:.1})",
                other.label()
            ),
        }
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    envelope_parse(&mut c);
    publication_encode(&mut c);
    hub_fanout(&mut c);
    c.final_summary();
    if common::run_selects("hub_fanout/deliver_10000_subscribers") {
        print_fanout_summary();
    }
}
