//! The built-in topics `$sys.metrics` and `$sys.health`: every node publishes its snapshot there
//! every `sys.interval` in the shapes of the admin API's `metrics` and `health_update` messages;
//! clients may subscribe (filters and `interval` apply) but never publish; through Redis every
//! node's snapshots reach subscribers on any node.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{cluster_node_with, wait_ready, CLUSTER_WAIT};
use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};
use wsgate::config::FileConfig;

/// A node publishing its snapshots every `interval`.
async fn sys_node(id: &str, interval: Duration) -> wsgate::node::RunningNode {
    let id = id.to_string();
    start_node(move |s| {
        s.node_id = id;
        s.sys.interval = interval;
    })
    .await
}

/// Reads messages until one of `kind` on `topic` arrives (within `WAIT`).
async fn next_on(client: &mut Client, topic: &str, kind: &str) -> Value {
    loop {
        let m = client.recv_json().await;
        if m["topic"] == topic {
            assert_eq!(m["type"], kind, "{m}");
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_come_in_the_admin_api_shapes() {
    let node = sys_node("sys-shapes", Duration::from_millis(200)).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws?subscriptions=$sys.health").await;
    let ack = c
        .request(json!({"type": "subscribe", "id": "s", "data": {"topics": ["$sys.metrics"]}}))
        .await;
    assert_eq!(ack["data"]["topics"], json!(["$sys.metrics"]), "{ack}");

    let m = next_on(&mut c, "$sys.metrics", "metrics").await;
    let d = &m["data"];
    assert_eq!(d["node"], "sys-shapes", "{m}");
    assert!(
        d["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{m}"
    );
    assert!(m["seq"].as_u64().is_some(), "a sequenced publication: {m}");
    let metrics = &d["metrics"];
    for key in ["total", "success", "error", "rate"] {
        assert!(metrics["requests"][key].is_number(), "requests.{key}: {m}");
    }
    for key in ["avg", "p50", "p95", "p99", "max"] {
        assert!(
            metrics["response_time"][key].is_number(),
            "response_time.{key}: {m}"
        );
    }
    assert!(metrics["system"].get("cpu_usage").is_some(), "{m}");
    assert!(metrics["system"].get("memory_usage").is_some(), "{m}");
    assert!(metrics["connections"]["active"].as_u64() >= Some(1), "{m}");
    assert!(
        metrics["messages"]["in"].as_u64() >= Some(1),
        "the subscribe: {m}"
    );
    assert!(metrics["bytes"]["out"].is_number(), "{m}");

    let h = next_on(&mut c, "$sys.health", "health_update").await;
    let d = &h["data"];
    assert_eq!(d["node"], "sys-shapes", "{h}");
    assert_eq!(d["status"], "UP", "{h}");
    for component in ["broker", "connections", "sendQueues"] {
        assert_eq!(
            d["components"][component]["status"], "UP",
            "{component}: {h}"
        );
        assert!(d["components"][component]["details"].is_object(), "{h}");
    }
    assert_eq!(
        d["components"]["broker"]["details"]["type"], "memory",
        "{h}"
    );
    assert_eq!(d["cluster"]["nodes"][0]["id"], "sys-shapes", "{h}");

    // Later snapshots see the traffic in between.
    for i in 0..5 {
        let pong = c
            .request(json!({"type": "ping", "id": format!("p{i}")}))
            .await;
        assert_eq!(pong["type"], "pong");
    }
    let before = m["data"]["metrics"]["requests"]["total"]
        .as_u64()
        .expect("total");
    let later = loop {
        let m = next_on(&mut c, "$sys.metrics", "metrics").await;
        let total = m["data"]["metrics"]["requests"]["total"]
            .as_u64()
            .expect("total");
        if total >= before + 5 {
            break m;
        }
    };
    assert!(
        later["data"]["metrics"]["messages"]["out"].as_u64()
            > m["data"]["metrics"]["messages"]["out"].as_u64(),
        "{later}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_may_subscribe_but_never_publish_there() {
    let node = start_node(|s| {
        s.sys.interval = Duration::ZERO;
        // Even a namespace rule that lets clients publish everywhere does not open `$sys.`.
        s.default_namespace = wsgate::config::NamespaceSettings::open_publish();
    })
    .await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws").await;

    let refused = c
        .request(json!({"type": "publish", "id": "p", "data": {"topic": "$sys.metrics", "type": "metrics", "data": {}}}))
        .await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["data"]["code"], "PERMISSION_DENIED", "{refused}");
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": "$sys.health", "type": "health_update", "data": {}}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "PERMISSION_DENIED", "{body}");

    // Only the two system topics exist under the prefix, and `$` nowhere else.
    for topic in ["$sys.metric", "$sys.", "$metrics", "a$b"] {
        let refused = c
            .request(json!({"type": "subscribe", "id": topic, "data": {"topics": [topic]}}))
            .await;
        assert_eq!(
            refused["data"]["code"], "INVALID_TOPIC",
            "{topic}: {refused}"
        );
    }
    // An ordinary topic still publishes (the namespace rule above is in force).
    let ok = c
        .request(json!({"type": "publish", "id": "q", "data": {"topic": "sys.metrics", "type": "x", "data": 1}}))
        .await;
    assert_eq!(ok["type"], "ack", "{ok}");

    // With the snapshots off, a subscriber hears nothing.
    let ack = c
        .request(json!({"type": "subscribe", "id": "s", "data": {"topics": ["$sys.metrics", "$sys.health"]}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    c.expect_silence().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interval_conflation_and_filters_apply() {
    let node = sys_node("sys-interval", Duration::from_millis(100)).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws").await;
    let ack = c
        .request(json!({"type": "subscribe", "id": "s",
                        "data": {"topics": ["$sys.metrics"], "interval": 1000}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let (mut other, _) = connect(addr, "/ws").await;
    let ack = other
        .request(
            json!({"type": "subscribe", "id": "s", "data": {"topics": ["$sys.health"],
                        "filters": {"node": ["some-other-node"]}}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    // About 15 snapshots in 1.5 s; conflated to one per second: the first at once, then one.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut got = 0;
    while let Ok(Some(Ok(msg))) =
        tokio::time::timeout_at(deadline.into(), futures_util::StreamExt::next(&mut c.ws)).await
    {
        if msg.is_text() {
            got += 1;
        }
    }
    assert!(
        (1..=3).contains(&got),
        "{got} snapshots through a 1 s interval"
    );
    // The filter on `node` passes none of this node's snapshots.
    other.expect_silence().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_nodes_snapshots_reach_a_subscriber_on_any_node() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let fast = |s: &mut wsgate::config::Settings| s.sys.interval = Duration::from_millis(200);
    let a = cluster_node_with(&urls, "sys-a", fast).await;
    let b = cluster_node_with(&urls, "sys-b", fast).await;
    for n in [&a, &b] {
        wait_ready(n.local_addr).await;
    }
    let (mut c, _) = connect(a.local_addr, "/ws").await;
    let ack = c
        .request(json!({"type": "subscribe", "id": "s", "data": {"topics": ["$sys.metrics", "$sys.health"]}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let mut metrics_from = std::collections::BTreeSet::new();
    let mut health_from = std::collections::BTreeSet::new();
    let mut whole_cluster_listed = false;
    let deadline = Instant::now() + CLUSTER_WAIT;
    while metrics_from.len() < 2 || health_from.len() < 2 || !whole_cluster_listed {
        assert!(
            Instant::now() < deadline,
            "snapshots seen from {metrics_from:?} / {health_from:?}, cluster listed: \
             {whole_cluster_listed}"
        );
        let m = c.recv_json().await;
        let node = m["data"]["node"].as_str().unwrap_or_default().to_string();
        match m["topic"].as_str() {
            Some("$sys.metrics") => {
                metrics_from.insert(node);
            }
            Some("$sys.health") => {
                assert_eq!(
                    m["data"]["components"]["broker"]["details"]["type"], "redis",
                    "{m}"
                );
                assert_eq!(m["data"]["status"], "UP", "{m}");
                let listed: Vec<&str> = m["data"]["cluster"]["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n["id"].as_str())
                    .collect();
                whole_cluster_listed |= listed.contains(&"sys-a") && listed.contains(&"sys-b");
                health_from.insert(node);
            }
            _ => {}
        }
    }
    assert_eq!(
        metrics_from,
        ["sys-a".to_string(), "sys-b".to_string()].into()
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[test]
fn the_interval_is_configured_in_the_file() {
    let mut settings = wsgate::config::Settings::default();
    assert_eq!(settings.sys.interval, Duration::from_secs(2), "default");
    FileConfig::parse("sys:\n  interval: 0s\n")
        .expect("parses")
        .apply_to(&mut settings)
        .expect("applies");
    assert!(settings.sys.interval.is_zero());
    assert!(settings.validate().is_empty(), "0s turns it off");
    FileConfig::parse("sys: { interval: 10ms }\n")
        .expect("parses")
        .apply_to(&mut settings)
        .expect("applies");
    let problems = settings.validate();
    assert!(
        problems.iter().any(|p| p.path == "sys.interval"),
        "{problems:?}"
    );
    assert!(
        FileConfig::parse("sys: { period: 1s }\n").is_err(),
        "unknown key"
    );
}
