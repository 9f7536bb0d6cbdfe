//! `GET /metrics`: the Prometheus exposition says what the node did and how its broker is.

mod common;
use common::cluster::{cluster_node, eventually_some, readyz};
use common::redis::RedisServer;
use common::*;
use serde_json::json;
use std::net::SocketAddr;

/// The value of the first sample of `metric` whose labels contain `label` (e.g. `node="a"`).
fn sample(exposition: &str, metric: &str, label: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(metric) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_raw(addr, "GET", "/metrics", b"", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8(body).expect("text exposition")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_connections_publications_and_deliveries() {
    let node = start_node(|s| s.node_id = "metrics-a".into()).await;
    let addr = node.local_addr;
    let before = scrape(addr).await;
    let published_before = sample(&before, "wsgate_publications_total", "").unwrap_or(0.0);
    let delivered_before = sample(&before, "wsgate_deliveries_total", "").unwrap_or(0.0);

    let (mut a, _) = connect(addr, "/ws?subscriptions=m.topic").await;
    let (mut b, _) = connect(addr, "/ws?subscriptions=m.topic").await;
    let (status, _) = post(
        addr,
        "/api/publish",
        json!({"topic":"m.topic","type":"t","data":1}),
    )
    .await;
    assert_eq!(status, 200);
    a.expect_type("t").await;
    b.expect_type("t").await;

    // A refusal (message too big: 1009) is counted with its close code.
    let (mut c, _) = connect(addr, "/ws").await;
    c.request(json!({"type": "ping", "id": "m1"})).await;
    c.send_text(&"x".repeat(70_000)).await;
    let (code, _, _) = c.expect_close().await;
    assert_eq!(code, 1009);

    let after = scrape(addr).await;
    assert!(
        sample(&after, "wsgate_connections_closed_total", "code=\"1009\"").unwrap_or(0.0) >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "wsgate_messages_received_total", "").unwrap_or(0.0) >= 1.0,
        "{after}"
    );
    assert!(
        sample(&after, "wsgate_connections_opened_total", "").unwrap_or(0.0) >= 3.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, "wsgate_connections", "node=\"metrics-a\""),
        Some(2.0),
        "{after}"
    );
    assert_eq!(
        sample(&after, "wsgate_broker_ready", "node=\"metrics-a\""),
        Some(1.0)
    );
    // Other tests in this process publish too: compare against the earlier scrape.
    let published = sample(&after, "wsgate_publications_total", "").unwrap_or(0.0);
    let delivered = sample(&after, "wsgate_deliveries_total", "").unwrap_or(0.0);
    assert!(published > published_before, "{after}");
    assert!(delivered >= delivered_before + 2.0, "{after}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_shows_in_readiness_and_metrics() {
    let mut redis = RedisServer::start();
    let node = cluster_node(&[redis.url()], "metrics-r").await;
    let addr = node.local_addr;
    let label = "node=\"metrics-r\"";
    eventually_some("broker ready", || async {
        let text = scrape(addr).await;
        match sample(&text, "wsgate_broker_ready", label) {
            Some(1.0) => Ok(()),
            _ => Err(text),
        }
    })
    .await;

    redis.kill();
    eventually_some("broker not ready in metrics", || async {
        let text = scrape(addr).await;
        match sample(&text, "wsgate_broker_ready", label) {
            Some(0.0) => Ok(()),
            _ => Err(text),
        }
    })
    .await;
    assert_eq!(readyz(addr).await, 503);

    redis.restart();
    let text = eventually_some("recovered, with a reconnect counted", || async {
        let text = scrape(addr).await;
        let ready = sample(&text, "wsgate_broker_ready", label) == Some(1.0);
        let reconnects = sample(&text, "wsgate_redis_reconnects", label).unwrap_or(0.0);
        if ready && reconnects >= 1.0 {
            Ok(text)
        } else {
            Err(text)
        }
    })
    .await;
    assert!(
        sample(&text, "wsgate_redis_subscribed_channels", label).unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    assert_eq!(readyz(addr).await, 200);
    node.shutdown().await;
}
