//! Criterion benchmark of the hot-path pieces `hot_path.rs` and `deflate_fanout.rs` do not time
//! on their own: hub lookups among many topics and users, queueing into a connection's
//! [`Outbound`] (alone, and through the writer task onto a real loopback socket), filter
//! evaluation (and the per-publication data tree it needs), server frame encoding, and
//! permessage-deflate on small payloads and on the inbound (inflate) side.
//!
//! Groups:
//! - `hub_lookup`: [`Hub::deliver`] of a publication to one of 10,000 topics that have one
//!   subscriber each (the topic map lookup plus one queue push), to a topic nobody holds (the
//!   lookup alone), and [`Hub::deliver_to_user`] to one of 10,000 users. Per operation.
//! - `queueing`: [`Outbound::push`] of a shared frame (64 pushes per iteration into a fresh
//!   queue); and `push_write_loopback/batch_N`: N frames pushed, then the connection's writer
//!   task ([`writer::run`], on a current-thread runtime) writes them to a loopback TCP socket
//!   drained by a reader thread, until every byte has arrived. Per frame; the second includes
//!   the kernel's work, so it is the one to compare against `loadtest/` figures.
//! - `filter_eval`: [`Filter::matches`] on a parsed `data` (one field passing, one rejecting,
//!   three fields, a dotted path), and `data_tree`: the simd-json tree of a 101 B and a 1001 B
//!   `data`, built once per publication when any subscriber filters.
//! - `frame_encode`: a server reply (`ack`) serialized into a text frame, and a plain frame
//!   around 101 bytes.
//! - `deflate_small`: level-1 compression of a 101 B and a 1001 B frame payload, and inflation of
//!   the compressed 1001 B one (what a client's compressed message costs the gateway).
//!
//! Run: `cargo bench --bench hot_parts` (shorter: `-- --warm-up-time 1 --measurement-time 3`;
//! one group: `cargo bench --bench hot_parts -- queueing`).

mod common;

use std::hint::black_box;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};

use wsgate::hub::{Hub, Publication, SharedFrame};
use wsgate::protocol::filter::{options_per_topic, Filter};
use wsgate::ws::flusher::Flushers;
use wsgate::ws::writer::{self, Outbound};
use wsgate::ws::{deflate, frame};

const TOPICS: usize = 10_000;

fn hub_lookup(c: &mut Criterion) {
    let hub = Hub::new();
    let names: Vec<String> = (0..TOPICS).map(|i| format!("routes:eu-{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let conn = common::connection(&hub, i, None);
        hub.register(Arc::clone(&conn));
        hub.subscribe(&Arc::from(name.as_str()), &conn, &Default::default());
    }
    let data = common::raw(common::DATA_101B);
    let publications: Vec<Publication> = names
        .iter()
        .map(|t| Publication::encode(t, "route_update", 1, "e-1", &data))
        .collect();
    let nobody = Publication::encode("routes:nobody", "route_update", 1, "e-1", &data);
    let user_frame = SharedFrame::new(frame::frame(frame::OpCode::Text, &[b'x'; 150]));
    let users: Vec<String> = (0..TOPICS).map(|i| format!("user-{i}")).collect();

    let mut group = c.benchmark_group("hub_lookup");
    group.throughput(Throughput::Elements(1));
    let mut k = 0;
    group.bench_function("deliver_one_of_10000_topics", |b| {
        b.iter(|| {
            k = (k + 1) % TOPICS;
            black_box(hub.deliver(black_box(&publications[k])))
        })
    });
    group.bench_function("deliver_topic_without_subscribers", |b| {
        b.iter(|| black_box(hub.deliver(black_box(&nobody))))
    });
    group.bench_function("deliver_to_one_of_10000_users", |b| {
        b.iter(|| {
            k = (k + 1) % TOPICS;
            black_box(hub.deliver_to_user(black_box(&users[k]), &user_frame))
        })
    });
    group.finish();
}

/// A reader thread that drains a loopback socket and counts the bytes.
fn loopback_pair(
    rt: &tokio::runtime::Runtime,
) -> (tokio::net::tcp::OwnedWriteHalf, Arc<AtomicU64>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&got);
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                return;
            }
            counter.fetch_add(n as u64, Ordering::Release);
        }
    });
    let stream = rt.block_on(async {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s
    });
    let (_read, write) = stream.into_split();
    // The read half must outlive the writer: leak it (one per bench case).
    std::mem::forget(_read);
    (write, got)
}

fn queueing(c: &mut Criterion) {
    let data = common::raw(common::DATA_101B);
    let p = Publication::encode("routes:eu-west-1", "route_update", 1, "e-1", &data);
    let frame = p.frame.plain().clone();
    let mut group = c.benchmark_group("queueing");
    group.throughput(Throughput::Elements(64));
    group.bench_function("push_64", |b| {
        b.iter_batched(
            || Outbound::new(1 << 40),
            |q| {
                for _ in 0..64 {
                    q.push(black_box(frame.clone())).expect("queued");
                }
                q
            },
            BatchSize::SmallInput,
        )
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // The node's flushers write on the fast path; the writer task takes a full socket.
    let flushers = rt.block_on(async { Flushers::start() });
    for batch in [1u64, 32] {
        let (socket, got) = loopback_pair(&rt);
        let q = Outbound::for_socket(1 << 40, socket, flushers.assign());
        let writer = rt.spawn(writer::run(
            Arc::clone(&q),
            Duration::from_secs(10),
            Some(Duration::from_secs(25)),
        ));
        let mut sent = 0u64;
        group.throughput(Throughput::Elements(batch));
        group.bench_function(BenchmarkId::new("push_write_loopback", batch), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        for _ in 0..batch {
                            q.push(frame.clone()).expect("queued");
                        }
                        sent += batch * frame.len() as u64;
                        while got.load(Ordering::Acquire) < sent {
                            tokio::task::yield_now().await;
                        }
                    }
                    start.elapsed()
                })
            })
        });
        q.abort();
        let _ = rt.block_on(writer);
    }
    group.finish();
}

fn filter(json: serde_json::Value) -> Arc<Filter> {
    let topics = ["t".to_owned()];
    options_per_topic(Some(&json), &topics, None)
        .expect("valid filter")
        .remove("t")
        .and_then(|o| o.filter)
        .expect("a filter")
}

fn filter_eval(c: &mut Criterion) {
    let mut copy = common::DATA_101B.as_bytes().to_vec();
    let small = simd_json::to_borrowed_value(&mut copy).expect("parses");
    let mut copy = common::ROUTE_UPDATE_1001B.as_bytes().to_vec();
    let large = simd_json::to_borrowed_value(&mut copy).expect("parses");
    let cases = [
        (
            "one_field_pass",
            filter(serde_json::json!({"status": ["ACTIVE", "PENDING"]})),
            &small,
            true,
        ),
        (
            "one_field_reject",
            filter(serde_json::json!({"status": ["DELETED"]})),
            &small,
            false,
        ),
        (
            "three_fields_pass",
            filter(
                serde_json::json!({"status": "ACTIVE", "stop": [1, 2, 3], "driver": "drv-1093"}),
            ),
            &small,
            true,
        ),
        (
            "dotted_path_pass",
            filter(serde_json::json!({"driver.vehicle.electric": true})),
            &large,
            true,
        ),
    ];
    let mut group = c.benchmark_group("filter_eval");
    group.throughput(Throughput::Elements(1));
    for (name, f, data, expect) in &cases {
        assert_eq!(f.matches(data), *expect, "{name}");
        group.bench_function(*name, |b| b.iter(|| black_box(f.matches(black_box(data)))));
    }
    for (name, text) in [
        ("data_tree_101B", common::DATA_101B),
        ("data_tree_1001B", common::ROUTE_UPDATE_1001B),
    ] {
        let mut scratch = Vec::with_capacity(text.len());
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                scratch.clear();
                scratch.extend_from_slice(black_box(text).as_bytes());
                let v = simd_json::to_borrowed_value(&mut scratch).expect("parses");
                black_box(&v);
            })
        });
    }
    group.finish();
}

fn frame_encode(c: &mut Criterion) {
    #[derive(serde::Serialize)]
    struct Ack<'a> {
        #[serde(rename = "type")]
        kind: &'a str,
        id: &'a str,
        data: AckData<'a>,
    }
    #[derive(serde::Serialize)]
    struct AckData<'a> {
        action: &'a str,
        topics: [&'a str; 1],
    }
    let payload = [b'x'; 101];
    let mut group = c.benchmark_group("frame_encode");
    group.throughput(Throughput::Elements(1));
    group.bench_function("ack_json_text", |b| {
        b.iter(|| {
            frame::json_text(black_box(&Ack {
                kind: "ack",
                id: "r1",
                data: AckData {
                    action: "subscribe",
                    topics: ["routes:eu-west-1"],
                },
            }))
        })
    });
    group.bench_function("plain_frame_101B", |b| {
        b.iter(|| frame::frame(frame::OpCode::Text, black_box(&payload)))
    });
    group.finish();
}

fn deflate_small(c: &mut Criterion) {
    let data = common::raw(common::DATA_101B);
    let small = Publication::encode("routes:eu-west-1", "route_update", 1, "e-1", &data);
    let data = common::raw(common::ROUTE_UPDATE_1001B);
    let large = Publication::encode("routes:eu-west-1", "route_update", 1, "e-1", &data);
    let small_payload: Bytes = Bytes::copy_from_slice(frame::payload_of(small.frame.plain()));
    let large_payload: Bytes = Bytes::copy_from_slice(frame::payload_of(large.frame.plain()));
    let compressed = deflate::compress(&large_payload, 1);
    let mut group = c.benchmark_group("deflate_small");
    for (name, payload) in [
        ("compress_frame_payload_small", &small_payload),
        ("compress_frame_payload_1KB", &large_payload),
    ] {
        group.throughput(Throughput::Bytes(payload.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| deflate::compress(black_box(payload), 1))
        });
    }
    group.throughput(Throughput::Bytes(large_payload.len() as u64));
    group.bench_function("inflate_1KB", |b| {
        b.iter(|| deflate::inflate(black_box(&compressed), 1 << 20).expect("inflates"))
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    hub_lookup(&mut c);
    queueing(&mut c);
    filter_eval(&mut c);
    frame_encode(&mut c);
    deflate_small(&mut c);
    c.final_summary();
}
