//! Several gateway nodes sharing one Redis: delivery across nodes.
mod common;
use common::redis::RedisServer;
use common::*;
use serde_json::json;
use std::time::Duration;

async fn cluster_node(redis: &[String], id: &str) -> wsgate::node::RunningNode {
    let urls = redis.to_vec();
    let id = id.to_string();
    start_node(move |s| {
        s.redis_urls = urls;
        s.node_id = id;
        s.redis.linger = Duration::from_millis(200);
        s.redis.lease_ttl = Duration::from_secs(1);
    })
    .await
}

/// Waits until `check` holds (polling), or panics with `what`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_publish_on_a_reaches_a_client_on_c() {
    let redis = RedisServer::start();
    let urls = vec![redis.url()];
    let a = cluster_node(&urls, "a").await;
    let _b = cluster_node(&urls, "b").await;
    let c = cluster_node(&urls, "c").await;
    let (mut client, _) = connect(c.local_addr, "/ws?user_id=u1").await;
    client
        .request(json!({"type":"subscribe","id":"s","data":{"topics":["routes"]}}))
        .await;
    eventually("c subscribed in redis", || {
        redis
            .cli(&["PUBSUB", "NUMSUB", "wsgate:t:{routes}"])
            .ends_with('1')
    })
    .await;
    let (status, body) = post(
        a.local_addr,
        "/api/publish",
        json!({"topic":"routes","type":"route_update","data":{"n":1}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = client.expect_type("route_update").await;
    assert_eq!(m["seq"], 1);
    assert_eq!(m["data"]["n"], 1);
}
