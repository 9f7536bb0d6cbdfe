//! Redis going away under a running cluster of three in-process nodes: local connections stay
//! up, `/readyz` says 503 while Redis is down and 200 once every node has reconnected and
//! resubscribed, and cross-node delivery resumes without restarting any node. Also a node that
//! starts while Redis is down.
mod common;
use common::cluster::*;
use common::redis::{free_port, RedisServer};
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Waits until `/readyz` on `addr` answers `status`; returns the body.
async fn wait_readyz(addr: SocketAddr, status: u16) -> Value {
    eventually_some(&format!("{addr} /readyz {status}"), || async move {
        let (s, body) = get(addr, "/readyz").await;
        if s == status {
            Ok(body)
        } else {
            Err(format!("{s} {body}"))
        }
    })
    .await
}

/// Reads `client` until a publication of `topic` whose data has `key` arrives (skipping the
/// background traffic); returns it.
async fn read_until(client: &mut Client, topic: &str, key: &str) -> Value {
    loop {
        let m = client.recv_json().await;
        if m["topic"] == topic && m["data"].get(key).is_some() {
            return m;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_during_traffic_delivery_resumes_without_restarting_nodes() {
    let mut redis = RedisServer::start_on(free_port());
    let urls = [redis.url()];
    let [a, b, c] = three_nodes(&urls).await;
    let addrs = [a.local_addr, b.local_addr, c.local_addr];

    let (mut on_c, _) = connect(c.local_addr, "/ws?user_id=carol").await;
    let (mut on_b, _) = connect(b.local_addr, "/ws?user_id=bob").await;
    subscribe(&mut on_c, &["live"]).await;
    wait_numsub(&redis, "wsgate:t:{live}", 1).await;
    wait_numsub(&redis, "wsgate:u:{bob}", 1).await;
    let before = http_publish(a.local_addr, "live", "tick", json!({"marker": "before"})).await;
    let m = read_until(&mut on_c, "live", "marker").await;
    assert_eq!(m["data"]["marker"], "before");
    assert_eq!(m["epoch"], before["epoch"]);

    // Background traffic: publications through `a` every 20 ms; every answer must be 200 or
    // 503 (never a hang, never another error).
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(Mutex::new(Vec::new()));
    let traffic = tokio::spawn({
        let (stop, statuses) = (Arc::clone(&stop), Arc::clone(&statuses));
        let addr = a.local_addr;
        async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let (status, body) = post(
                    addr,
                    "/api/publish",
                    json!({"topic": "live", "type": "tick", "data": {"traffic": n}}),
                )
                .await;
                assert!(status == 200 || status == 503, "{status} {body}");
                statuses.lock().expect("lock").push(status);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    eventually("traffic flowing", || {
        !statuses.lock().expect("lock").is_empty()
    })
    .await;

    redis.kill();
    for addr in addrs {
        let body = wait_readyz(addr, 503).await;
        assert_eq!(body["brokerReady"], false, "{body}");
    }
    // Publishing says it cannot deliver rather than pretending.
    let (status, body) = post(
        a.local_addr,
        "/api/publish",
        json!({"topic": "live", "type": "tick", "data": {"lost": true}}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
    // Local connections stay up and keep talking.
    for client in [&mut on_c, &mut on_b] {
        let pong = client.request(json!({"type": "ping", "id": "p"})).await;
        assert_eq!(pong["type"], "pong", "{pong}");
    }

    redis.restart();
    for addr in addrs {
        let body = wait_readyz(addr, 200).await;
        assert_eq!(body["brokerReady"], true, "{body}");
    }
    // Every node resubscribed: once all are ready, a publication through `a` reaches `c`.
    let after = post_until_ok(
        a.local_addr,
        "/api/publish",
        json!({"topic": "live", "type": "tick", "data": {"marker": "after"}}),
    )
    .await;
    let m = read_until(&mut on_c, "live", "marker").await;
    assert_eq!(m["data"]["marker"], "after", "{m}");
    assert_eq!(m["seq"], after["seq"], "{m}");
    // The restarted Redis kept nothing: the sequence starts again under a new epoch, which is
    // how a client tells that numbers restarted.
    assert_ne!(after["epoch"], before["epoch"], "{after} {before}");
    // Users too: the API on `a` reaches bob on `b`; and `b` publishes to `c`.
    post_until_ok(
        a.local_addr,
        "/api/ws/send",
        json!({"type": "notification", "to": "bob", "data": {"after": 1}}),
    )
    .await;
    let m = on_b.expect_type("notification").await;
    assert_eq!(m["data"], json!({"after": 1}));
    post_until_ok(
        b.local_addr,
        "/api/publish",
        json!({"topic": "live", "type": "tick", "data": {"marker": "from b"}}),
    )
    .await;
    let m = read_until(&mut on_c, "live", "marker").await;
    assert_eq!(m["data"]["marker"], "from b", "{m}");

    stop.store(true, Ordering::Release);
    traffic
        .await
        .expect("traffic never saw anything but 200 or 503");
    let statuses = statuses.lock().expect("lock").clone();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    println!(
        "traffic through a: {} publications, {ok} accepted, {} refused while redis was away",
        statuses.len(),
        statuses.len() - ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_while_redis_is_down_becomes_ready_when_it_appears() {
    let port = free_port();
    let urls = [format!("redis://127.0.0.1:{port}")];
    let a = cluster_node(&urls, "a").await;
    let c = cluster_node(&urls, "c").await;
    for addr in [a.local_addr, c.local_addr] {
        let (status, body) = get(addr, "/readyz").await;
        assert_eq!(status, 503, "{body}");
        // It serves HTTP all the same.
        assert_eq!(get(addr, "/healthz").await.0, 200);
    }
    let redis = RedisServer::start_on(port);
    for addr in [a.local_addr, c.local_addr] {
        wait_readyz(addr, 200).await;
    }
    // Admission reserved its slots once Redis was there: the client is admitted.
    let mut on_c = eventually_some("c admits a client", || async {
        let mut client = connect_raw(c.local_addr, "/ws?user_id=carol").await;
        let first = client.recv_json().await;
        if first["type"] == "connection" {
            Ok(client)
        } else {
            Err(first.to_string())
        }
    })
    .await;
    subscribe(&mut on_c, &["late"]).await;
    wait_numsub(&redis, "wsgate:t:{late}", 1).await;
    http_publish(a.local_addr, "late", "tick", json!(1)).await;
    expect_publication(&mut on_c, "late", &json!(1)).await;
}
