//! History and recovery: a client that reconnects with `since` gets exactly what it missed, in
//! order, then live publications, none twice; a node whose Redis subscription dies mid-stream
//! fills the gap from history; trimmed history and a new epoch say `recovered: false`; an
//! idempotency key is published once; backends publish through `FCALL wsgate_publish`.
//!
//! Real `redis-server` processes and several nodes; the in-process broker where noted.

mod common;
use common::cluster::*;
use common::redis::RedisServer;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate::config::{HistorySettings, NamespaceSettings, Settings};

/// Publishes `n` messages `{"n": from..}` to `topic` through `addr`; returns the last seq.
async fn publish_many(addr: SocketAddr, topic: &str, from: u64, n: u64) -> u64 {
    let mut last = 0;
    for i in from..from + n {
        let body = http_publish(addr, topic, "tick", json!({"n": i})).await;
        last = body["seq"].as_u64().expect("seq");
    }
    last
}

/// Reads publications of `topic` until `count` arrived; panics on anything out of order.
/// Returns their seqs.
async fn read_publications(client: &mut Client, topic: &str, count: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(count);
    while seqs.len() < count {
        let m = client.recv_json().await;
        if m["topic"] != topic {
            continue;
        }
        seqs.push(m["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {m}")));
    }
    seqs
}

/// Sends a recovering subscribe and returns its ack (the first message after the request:
/// the ack comes before anything replayed).
async fn subscribe_since(client: &mut Client, topic: &str, seq: u64, epoch: &str) -> Value {
    client
        .send_json(json!({"type":"subscribe","id":"rec","data":{
            "topics":[topic], "since": {"seq": seq, "epoch": epoch}}}))
        .await;
    let ack = client.recv_json().await;
    assert_eq!(ack["type"], "ack", "the ack comes first: {ack}");
    assert_eq!(ack["data"]["requestId"], "rec", "{ack}");
    ack
}

fn contiguous(seqs: &[u64], first: u64) {
    let expected: Vec<u64> = (first..first + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "in order, no gap, no duplicate");
}

#[tokio::test]
async fn memory_broker_recovers_what_a_client_missed() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws?user_id=u").await;
    subscribe(&mut c, &["feed"]).await;
    let first = http_publish(addr, "feed", "tick", json!({"n": 0})).await;
    let seen = c.recv_json().await;
    assert_eq!(
        seen["id"],
        format!("{}:{}", first["epoch"].as_str().unwrap_or(""), 1)
    );
    c.close().await;

    let last = publish_many(addr, "feed", 1, 30).await;
    assert_eq!(last, 31);
    let epoch = first["epoch"].as_str().expect("epoch");
    let (mut c, _) = connect(addr, "/ws?user_id=u").await;
    let ack = subscribe_since(&mut c, "feed", 1, epoch).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(
        ack["data"]["recovery"]["feed"]["position"]["seq"], 31,
        "{ack}"
    );
    contiguous(&read_publications(&mut c, "feed", 30).await, 2);
    http_publish(addr, "feed", "tick", json!({"n": 31})).await;
    contiguous(&read_publications(&mut c, "feed", 1).await, 32);
    c.expect_silence().await;
}

/// The issue's first scenario: disconnect, 100 publications, reconnect to another node with
/// `since`, and more publications racing the recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_to_another_node_with_since_gets_exactly_the_missed_then_live() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    // Room for the 100 missed and the 40 racing the recovery (the default keeps 100).
    let roomy = |s: &mut Settings| s.default_namespace.history.size = 1000;
    let [a, b] = two_nodes_with(&urls, roomy).await;
    let (mut c, _) = connect(a.local_addr, "/ws?user_id=u").await;
    subscribe(&mut c, &["feed"]).await;
    wait_numsub(&redis, "wsgate:t:{feed}", 1).await;
    let first = http_publish(a.local_addr, "feed", "tick", json!({"n": 0})).await;
    let seen = c.recv_json().await;
    let (seq, epoch) = (
        seen["seq"].as_u64().expect("seq"),
        seen["epoch"].as_str().expect("epoch").to_string(),
    );
    assert_eq!((seq, &first["epoch"]), (1, &seen["epoch"]));
    c.close().await;

    publish_many(a.local_addr, "feed", 1, 100).await;

    // Reconnect to node b (which holds nothing of `feed` yet) while a publisher keeps going.
    let publisher = tokio::spawn(async move {
        let addr = a.local_addr;
        publish_many(addr, "feed", 101, 40).await;
        a
    });
    let (mut c, _) = connect(b.local_addr, "/ws?user_id=u").await;
    let ack = subscribe_since(&mut c, "feed", seq, &epoch).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(ack["data"]["recovery"]["feed"]["recovered"], true, "{ack}");
    let got = read_publications(&mut c, "feed", 140).await;
    contiguous(&got, 2);
    let _a = publisher.await.expect("publisher");
    // Live after the recovery, and nothing twice.
    http_publish(b.local_addr, "feed", "tick", json!({"n": 141})).await;
    contiguous(&read_publications(&mut c, "feed", 1).await, 142);
    c.expect_silence().await;
}

/// The issue's second scenario: the nodes' subscription connections are killed in the middle
/// of a steady stream; every client still gets every message, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_pubsub_connections_mid_stream_loses_nothing() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let [a, b] = two_nodes_with(&urls, |_| {}).await;
    let (mut on_a, _) = connect(a.local_addr, "/ws?user_id=x").await;
    let (mut on_b, _) = connect(b.local_addr, "/ws?user_id=y").await;
    subscribe(&mut on_a, &["stream"]).await;
    subscribe(&mut on_b, &["stream"]).await;
    wait_numsub(&redis, "wsgate:t:{stream}", 2).await;

    const STEADY: u64 = 200;
    const BURST: u64 = 20;
    let publish_addr = a.local_addr;
    let publisher = tokio::spawn(async move {
        for i in 0..STEADY {
            http_publish(publish_addr, "stream", "tick", json!({"n": i})).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    // Kill both nodes' subscription connections and, in the same breath (before either can
    // reconnect and resubscribe), publish a burst through the Redis Function: pub/sub never
    // carries these to the nodes, only history has them.
    let mut script = String::from("CLIENT KILL TYPE pubsub\n");
    for i in 0..BURST {
        script.push_str(&format!(
            "FCALL wsgate_publish 1 wsgate:t:{{stream}} burst {i}\n"
        ));
    }
    let out = redis.cli_script(&script);
    let killed = out.lines().next().unwrap_or_default().to_string();
    assert!(
        killed.trim().parse::<u64>().unwrap_or(0) >= 2,
        "both subscription connections were killed: {out}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_again = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    publisher.await.expect("publisher");

    const TOTAL: u64 = STEADY + BURST;
    contiguous(
        &read_publications(&mut on_a, "stream", TOTAL as usize).await,
        1,
    );
    contiguous(
        &read_publications(&mut on_b, "stream", TOTAL as usize).await,
        1,
    );
    on_a.expect_silence().await;
    on_b.expect_silence().await;
    // The gap really happened and was filled from history (not just a lucky reconnect).
    // (Counters are process-wide: both nodes of this test count into them.)
    let (_, metrics) = http_raw(a.local_addr, "GET", "/metrics", b"", &[]).await;
    let text = String::from_utf8_lossy(&metrics);
    let backfilled: f64 = text
        .lines()
        .filter(|l| l.starts_with("wsgate_history_backfilled_total"))
        .find_map(|l| l.split_whitespace().last())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    println!("pubsub kills: {killed} then {killed_again}; backfilled (both nodes): {backfilled}");
    assert!(
        backfilled > 0.0,
        "a node filled a gap from history: {:?}",
        text.lines()
            .filter(|l| l.contains("history") || l.contains("duplicate"))
            .collect::<Vec<_>>()
    );
}

fn small_history(size: usize) -> impl Fn(&mut Settings) + Clone {
    move |s: &mut Settings| {
        s.namespaces.insert(
            "short".into(),
            NamespaceSettings {
                history: HistorySettings {
                    size,
                    ttl: Duration::from_secs(60),
                },
                ..NamespaceSettings::default()
            },
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_and_a_new_epoch_are_not_recovered() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let a = cluster_node_with(&urls, "a", small_history(5)).await;
    wait_ready(a.local_addr).await;
    let addr = a.local_addr;
    let first = http_publish(addr, "short:t", "tick", json!({"n": 0})).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    publish_many(addr, "short:t", 1, 9).await;

    // Position 4: seqs 5..=10 are needed, but only 6..=10 are kept.
    let (mut c, _) = connect(addr, "/ws?user_id=u").await;
    let ack = subscribe_since(&mut c, "short:t", 4, &epoch).await;
    assert_eq!(ack["data"]["recovered"], false, "{ack}");
    assert_eq!(
        ack["data"]["recovery"]["short:t"]["position"]["seq"], 10,
        "{ack}"
    );
    c.expect_silence().await;
    // Position 5 is still recoverable, exactly at the edge.
    let (mut edge, _) = connect(addr, "/ws?user_id=u").await;
    let ack = subscribe_since(&mut edge, "short:t", 5, &epoch).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    contiguous(&read_publications(&mut edge, "short:t", 5).await, 6);
    // Live publications still flow to the unrecovered subscription.
    http_publish(addr, "short:t", "tick", json!({"n": 10})).await;
    contiguous(&read_publications(&mut c, "short:t", 1).await, 11);

    // The counter starts over (its keys were lost): a new epoch.
    redis.cli(&["DEL", "wsgate:t:{short:t}:seq", "wsgate:t:{short:t}:epoch"]);
    let fresh = http_publish(addr, "short:t", "tick", json!({"n": 0})).await;
    assert_eq!(fresh["seq"], 1);
    assert_ne!(fresh["epoch"], epoch.as_str());
    // The node delivers the new epoch's first publication to the live subscription.
    let m = c.recv_json().await;
    assert_eq!(
        (&m["seq"], &m["epoch"]),
        (&json!(1), &fresh["epoch"]),
        "{m}"
    );
    let (mut late, _) = connect(addr, "/ws?user_id=u").await;
    let ack = subscribe_since(&mut late, "short:t", 11, &epoch).await;
    assert_eq!(ack["data"]["recovered"], false, "{ack}");
    assert_eq!(
        ack["data"]["recovery"]["short:t"]["position"]["epoch"], fresh["epoch"],
        "{ack}"
    );
    late.expect_silence().await;
}

/// `recover: true` without `since` asks for the topic's current position only (the place to
/// recover from after a later disconnect), with live publications held meanwhile.
#[tokio::test]
async fn recover_without_since_reports_the_position() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    publish_many(addr, "pos", 0, 3).await;
    let (mut c, _) = connect(addr, "/ws").await;
    c.send_json(json!({"type":"subscribe","id":"p","data":{"topic":"pos","recover":true}}))
        .await;
    let ack = c.expect_type("ack").await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    assert_eq!(
        ack["data"]["recovery"]["pos"]["position"]["seq"], 3,
        "{ack}"
    );
    assert!(
        ack["data"]["recovery"]["pos"].get("recovered").is_none(),
        "{ack}"
    );
    c.expect_silence().await;
    publish_many(addr, "pos", 3, 1).await;
    contiguous(&read_publications(&mut c, "pos", 1).await, 4);
    // A malformed `since` is refused as such.
    let err = c
        .request(json!({"type":"subscribe","id":"bad","data":{"topic":"pos","since":{"seq":"x"}}}))
        .await;
    assert_eq!(err["data"]["code"], "INVALID_SUBSCRIPTION", "{err}");
}

#[tokio::test]
async fn memory_broker_trimmed_history_and_wrong_epoch_are_not_recovered() {
    let node = start_node(small_history(3)).await;
    let addr = node.local_addr;
    let first = http_publish(addr, "short:m", "tick", json!({})).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    publish_many(addr, "short:m", 1, 5).await;
    let (mut c, _) = connect(addr, "/ws").await;
    let ack = subscribe_since(&mut c, "short:m", 2, &epoch).await;
    assert_eq!(ack["data"]["recovered"], false, "seq 3 is gone: {ack}");
    let ack = subscribe_since(&mut c, "short:m", 3, "another-epoch").await;
    assert_eq!(ack["data"]["recovered"], false, "{ack}");
    let ack = subscribe_since(&mut c, "short:m", 3, &epoch).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    contiguous(&read_publications(&mut c, "short:m", 3).await, 4);
}

/// Publishes with an idempotency key through `addr`; returns the reply.
async fn publish_once(addr: SocketAddr, topic: &str, key: &str, n: u64) -> Value {
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": topic, "type": "order", "data": {"n": n}, "idempotencyKey": key}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn idempotency_holds(addr: SocketAddr, other: SocketAddr, client: &mut Client) {
    let first = publish_once(addr, "orders", "k-1", 1).await;
    assert_eq!(first["duplicate"], false, "{first}");
    let again = publish_once(other, "orders", "k-1", 2).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        (&again["seq"], &again["epoch"]),
        (&first["seq"], &first["epoch"])
    );
    let next = publish_once(addr, "orders", "k-2", 3).await;
    assert_eq!(next["duplicate"], false, "{next}");
    let m = client.recv_json().await;
    assert_eq!(m["data"]["n"], 1, "{m}");
    let m = client.recv_json().await;
    assert_eq!(m["data"]["n"], 3, "the duplicate was not delivered: {m}");
    client.expect_silence().await;
}

#[tokio::test]
async fn a_duplicate_idempotency_key_is_delivered_once_in_memory() {
    let node = start_node(|_| {}).await;
    let (mut c, _) = connect(node.local_addr, "/ws").await;
    subscribe(&mut c, &["orders"]).await;
    idempotency_holds(node.local_addr, node.local_addr, &mut c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_idempotency_key_is_delivered_once_across_nodes() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let [a, b] = two_nodes_with(&urls, |_| {}).await;
    let (mut c, _) = connect(b.local_addr, "/ws").await;
    subscribe(&mut c, &["orders"]).await;
    wait_numsub(&redis, "wsgate:t:{orders}", 1).await;
    idempotency_holds(a.local_addr, b.local_addr, &mut c).await;
    // The key is remembered for exactly the window (IDEMPOTENCY_WINDOW), not forever.
    let ttl: u64 = redis
        .cli(&["PTTL", "wsgate:t:{orders}:idem:k-1"])
        .trim()
        .parse()
        .expect("PTTL answers a number");
    let window = wsgate::broker::IDEMPOTENCY_WINDOW.as_millis() as u64;
    assert!(
        ttl <= window && ttl > window - 10_000,
        "idempotency key TTL {ttl} ms, window {window} ms"
    );
}

/// Backends publish with sequencing and history through the Redis Function, from any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_publish_through_fcall_with_history() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let a = cluster_node(&urls, "a").await;
    wait_ready(a.local_addr).await;
    let (mut c, _) = connect(a.local_addr, "/ws").await;
    subscribe(&mut c, &["prices"]).await;
    wait_numsub(&redis, "wsgate:t:{prices}", 1).await;
    let fcall = |data: &str| {
        redis.cli(&[
            "FCALL",
            "wsgate_publish",
            "1",
            "wsgate:t:{prices}",
            "price",
            data,
        ])
    };
    let reply = fcall(r#"{"usd":1}"#);
    assert!(reply.starts_with('1'), "seq 1 first: {reply:?}");
    // The topic's position expires POSITION_TTL after its last publication, not never.
    let position_ttl = wsgate::broker::POSITION_TTL.as_millis() as u64;
    for key in ["wsgate:t:{prices}:seq", "wsgate:t:{prices}:epoch"] {
        let ttl: u64 = redis
            .cli(&["PTTL", key])
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key} has no TTL"));
        assert!(
            ttl <= position_ttl && ttl > position_ttl - 60_000,
            "{key}: TTL {ttl} ms, expected about {position_ttl}"
        );
    }
    let m = c.expect_type("price").await;
    assert_eq!(
        (m["seq"].as_u64(), &m["data"]),
        (Some(1), &json!({"usd": 1}))
    );
    assert!(
        m["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{m}"
    );
    // Bad input gets a clear answer and publishes nothing.
    let reply = fcall("{not json");
    assert!(reply.contains("not valid JSON"), "{reply}");
    let reply = redis.cli(&["FCALL", "wsgate_publish", "1", "not-a-topic-key", "t", "1"]);
    assert!(reply.contains("wsgate:t:{TOPIC}"), "{reply}");
    c.expect_silence().await;
    fcall("2");
    let m = c.expect_type("price").await;
    assert_eq!(m["seq"], 2, "{m}");
    // Both are in the history a recovering client reads.
    let epoch = m["epoch"].as_str().expect("epoch").to_string();
    let (mut late, _) = connect(a.local_addr, "/ws").await;
    let ack = subscribe_since(&mut late, "prices", 0, &epoch).await;
    assert_eq!(ack["data"]["recovered"], true, "{ack}");
    contiguous(&read_publications(&mut late, "prices", 2).await, 1);
}

/// The top-level publish form (`topic` beside `type`, `data` as the payload) carries
/// `idempotencyKey` and `requireAck` too: a repeated key is published once, and a `requireAck`
/// publication reaches subscribers marked so.
#[tokio::test]
async fn the_top_level_publish_form_carries_idempotency_and_require_ack() {
    let node = start_node(|s| {
        s.namespaces.insert(
            "chat".into(),
            NamespaceSettings {
                publish: wsgate::config::Access::Anyone,
                ..NamespaceSettings::default()
            },
        );
    })
    .await;
    let (mut sub, _) = connect(node.local_addr, "/ws").await;
    subscribe(&mut sub, &["chat:room"]).await;
    let (mut publisher, _) = connect(node.local_addr, "/ws").await;
    let publish = |id: &str, n: u64| {
        json!({"type": "publish", "id": id, "topic": "chat:room", "data": {"n": n},
               "idempotencyKey": "top-1", "requireAck": true})
    };
    let first = publisher.request(publish("p1", 1)).await;
    assert_eq!(first["data"]["duplicate"], false, "{first}");
    let again = publisher.request(publish("p2", 2)).await;
    assert_eq!(again["data"]["duplicate"], true, "{again}");
    assert_eq!(again["data"]["seq"], first["data"]["seq"], "{again}");
    let m = sub.expect_type("message").await;
    assert_eq!(m["data"]["n"], 1, "{m}");
    assert_eq!(m["requireAck"], true, "{m}");
    sub.send_json(json!({"type": "ack", "data": {"id": m["id"]}}))
        .await;
    sub.expect_silence().await;
}
