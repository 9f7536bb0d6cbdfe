//! Three in-process gateway nodes on a local three-master Redis Cluster in sharded mode
//! (`redis: {cluster: true}`): topic, user and broadcast delivery across nodes, a backend's
//! plain `SPUBLISH`, subscription hygiene seen with `PUBSUB SHARDNUMSUB` on the master owning a
//! channel's slot, cluster-wide presence and admission, and readiness while a master restarts.
mod common;
use common::cluster::*;
use common::redis::RedisCluster;
use common::*;
use serde_json::json;
use std::net::SocketAddr;
use wsgate::node::RunningNode;

/// An in-process node `id` on `cluster` in cluster mode, with the cluster test timings.
async fn sharded_node(
    cluster: &RedisCluster,
    id: &str,
    tweak: impl FnOnce(&mut wsgate::config::Settings),
) -> RunningNode {
    cluster_node_with(&cluster.urls(), id, |s| {
        s.redis.cluster = true;
        tweak(s);
    })
    .await
}

/// Nodes `a`, `b`, `c` on `cluster`, each ready.
async fn three_sharded_nodes(
    cluster: &RedisCluster,
    tweak: impl Fn(&mut wsgate::config::Settings),
) -> [RunningNode; 3] {
    let a = sharded_node(cluster, "a", &tweak).await;
    let b = sharded_node(cluster, "b", &tweak).await;
    let c = sharded_node(cluster, "c", &tweak).await;
    for n in [&a, &b, &c] {
        wait_ready(n.local_addr).await;
    }
    [a, b, c]
}

/// The slot of `key` (`CLUSTER KEYSLOT`).
fn keyslot(cluster: &RedisCluster, key: &str) -> u16 {
    let out = cluster.cli(0, &["CLUSTER", "KEYSLOT", key]);
    out.parse()
        .unwrap_or_else(|_| panic!("unexpected CLUSTER KEYSLOT reply {out:?}"))
}

/// The index of the master owning the slot of `key` (from each node's own `CLUSTER NODES` line).
fn owner(cluster: &RedisCluster, key: &str) -> usize {
    let slot = keyslot(cluster, key);
    (0..3)
        .find(|&i| {
            let nodes = cluster.cli(i, &["CLUSTER", "NODES"]);
            let Some(me) = nodes.lines().find(|l| l.contains("myself")) else {
                return false;
            };
            me.split_whitespace().skip(8).any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                match (lo.parse::<u16>(), hi.parse::<u16>()) {
                    (Ok(lo), Ok(hi)) => (lo..=hi).contains(&slot),
                    _ => false,
                }
            })
        })
        .unwrap_or_else(|| panic!("no master owns slot {slot} of {key}"))
}

/// `PUBSUB SHARDNUMSUB channel` on master `node`: one per gateway node subscribed there.
fn shardnumsub(cluster: &RedisCluster, node: usize, channel: &str) -> u64 {
    let out = cluster.cli(node, &["PUBSUB", "SHARDNUMSUB", channel]);
    out.lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected PUBSUB SHARDNUMSUB output {out:?}"))
}

/// Waits until `channel` has `n` sharded subscribers on the master owning it.
async fn wait_shardnumsub(cluster: &RedisCluster, channel: &str, n: u64) {
    let node = owner(cluster, channel);
    eventually(&format!("{n} sharded subscriber(s) of {channel}"), || {
        shardnumsub(cluster, node, channel) == n
    })
    .await;
}

/// A backend's `SPUBLISH channel payload` through `redis-cli -c` started on node 0 (it follows
/// the MOVED redirection to the owner); returns how many gateway nodes received it.
fn backend_spublish(cluster: &RedisCluster, channel: &str, payload: &str) -> u64 {
    let out = cluster.cli(0, &["-c", "SPUBLISH", channel, payload]);
    out.lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected SPUBLISH reply {out:?}"))
}

fn topic_ch(topic: &str) -> String {
    format!("wsgate:t:{{{topic}}}")
}

fn user_ch(user: &str) -> String {
    format!("wsgate:u:{{{user}}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_across_nodes_with_sharded_pubsub() {
    let cluster = RedisCluster::start();
    let [a, b, c] = three_sharded_nodes(&cluster, |_| {}).await;

    let (mut on_c, _) = connect(c.local_addr, "/ws?user_id=carol").await;
    let (mut on_b, _) = connect(b.local_addr, "/ws?user_id=bob").await;
    let (mut on_a, _) = connect(a.local_addr, "/ws?user_id=alice").await;
    subscribe(&mut on_c, &["routes", "metrics"]).await;
    subscribe(&mut on_b, &["metrics"]).await;

    // Sharded subscriptions, on the master owning each channel, one per node that needs it.
    wait_shardnumsub(&cluster, &topic_ch("routes"), 1).await;
    wait_shardnumsub(&cluster, &topic_ch("metrics"), 2).await;
    for u in ["alice", "bob", "carol"] {
        wait_shardnumsub(&cluster, &user_ch(u), 1).await;
    }
    wait_shardnumsub(&cluster, "wsgate:broadcast", 3).await;
    wait_shardnumsub(&cluster, "wsgate:control", 3).await;
    for node in ["a", "b", "c"] {
        wait_shardnumsub(&cluster, &format!("wsgate:node:{node}"), 1).await;
    }
    let routes_owner = owner(&cluster, &topic_ch("routes"));
    for i in 0..3 {
        // Nothing on classic pub/sub, and a sharded channel only on its own master.
        assert_eq!(cluster.cli(i, &["PUBSUB", "CHANNELS"]), "", "node {i}");
        let shard_channels = cluster.cli(i, &["PUBSUB", "SHARDCHANNELS"]);
        assert_eq!(
            shard_channels
                .lines()
                .any(|l| l.trim() == topic_ch("routes")),
            i == routes_owner,
            "node {i}: {shard_channels}"
        );
    }

    // Topic: HTTP publish on `a` reaches the client on `c`, sequenced.
    for n in 1..=2 {
        let receipt = http_publish(a.local_addr, "routes", "route_update", json!({"n": n})).await;
        let m = expect_publication(&mut on_c, "routes", &json!({"n": n})).await;
        assert_eq!(m["type"], "route_update");
        assert_eq!(m["seq"], n);
        assert_eq!(m["seq"], receipt["seq"]);
        assert_eq!(m["epoch"], receipt["epoch"]);
    }
    // The sequence and epoch live in the topic's slot, next to its channel.
    let seq_owner = owner(&cluster, "wsgate:t:{routes}:seq");
    assert_eq!(seq_owner, routes_owner);
    assert_eq!(
        cluster.cli(seq_owner, &["GET", "wsgate:t:{routes}:seq"]),
        "2"
    );

    // A topic two nodes hold: both get it once.
    http_publish(c.local_addr, "metrics", "metrics", json!({"n": 3})).await;
    expect_publication(&mut on_c, "metrics", &json!({"n": 3})).await;
    expect_publication(&mut on_b, "metrics", &json!({"n": 3})).await;

    // A backend's plain SPUBLISH on the topic channel: both nodes, unsequenced.
    let receivers = backend_spublish(
        &cluster,
        &topic_ch("metrics"),
        r#"{"type":"route_update","data":{"n":4}}"#,
    );
    assert_eq!(receivers, 2);
    for client in [&mut on_c, &mut on_b] {
        let m = expect_publication(client, "metrics", &json!({"n": 4})).await;
        assert_eq!(m["type"], "route_update");
        assert!(m.get("seq").is_none(), "a plain SPUBLISH has no seq: {m}");
    }

    // User: the HTTP API on `a` reaches carol on `c`; a client on `a` writes to bob on `b`.
    let (status, body) = post(
        a.local_addr,
        "/api/ws/send",
        json!({"type": "notification", "to": "carol", "data": {"n": 5}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = on_c.expect_type("notification").await;
    assert_eq!(m["data"], json!({"n": 5}));
    let ack = on_a
        .request(json!({"type": "chat", "id": "m1", "to": "bob", "data": {"text": "hi"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = on_b.expect_type("chat").await;
    assert_eq!(m["from"], "alice", "{m}");
    // And a backend's SPUBLISH on the user's channel.
    assert_eq!(
        backend_spublish(
            &cluster,
            &user_ch("carol"),
            r#"{"type":"notification","data":{"n":6}}"#
        ),
        1
    );
    let m = on_c.expect_type("notification").await;
    assert_eq!(m["data"], json!({"n": 6}));

    // Broadcast: from the HTTP API on `b`, and from a backend.
    let (status, body) = post(
        b.local_addr,
        "/api/ws/broadcast",
        json!({"type": "announcement", "data": {"n": 7}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        let m = client.expect_type("announcement").await;
        assert_eq!(m["data"], json!({"n": 7}));
    }
    assert_eq!(
        backend_spublish(
            &cluster,
            "wsgate:broadcast",
            r#"{"type":"announcement","data":{"n":8}}"#
        ),
        3
    );
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        let m = client.expect_type("announcement").await;
        assert_eq!(m["data"], json!({"n": 8}));
    }

    // Presence is cluster-wide (the node registry, per-node user sets and per-topic hashes live
    // in different slots).
    eventually_some("cluster status", || async {
        let (status, body) = get(b.local_addr, "/api/ws/status").await;
        if status == 200
            && body["online_users"] == json!(["alice", "bob", "carol"])
            && body["nodes"] == 3
        {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
    eventually_some("topic presence", || async {
        let (status, body) = get(a.local_addr, "/api/presence?topic=metrics").await;
        if status == 200 && body["count"] == 2 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;

    // Nothing more arrived anywhere (no duplicates, no topic traffic on `a`).
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        client.expect_silence().await;
    }

    // One subscribe of 60 topics (one batch over many slots, split per slot).
    let many: Vec<String> = (0..60).map(|i| format!("bulk-{i}")).collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    subscribe(&mut on_a, &many_refs).await;
    for topic in &many {
        wait_shardnumsub(&cluster, &topic_ch(topic), 1).await;
    }
    http_publish(b.local_addr, "bulk-59", "metrics", json!({"n": 9})).await;
    expect_publication(&mut on_a, "bulk-59", &json!({"n": 9})).await;

    // Hygiene: the channel of `routes` stays only while `c` has a subscriber (plus the linger).
    let ack = on_c
        .request(json!({"type": "unsubscribe", "id": "u", "data": {"topics": ["routes"]}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    wait_shardnumsub(&cluster, &topic_ch("routes"), 0).await;
    assert_eq!(shardnumsub(&cluster, routes_owner, &topic_ch("metrics")), {
        if owner(&cluster, &topic_ch("metrics")) == routes_owner {
            2
        } else {
            0
        }
    });
    on_b.close().await;
    wait_shardnumsub(&cluster, &topic_ch("metrics"), 1).await;
    wait_shardnumsub(&cluster, &user_ch("bob"), 0).await;
}

/// Connects to `addr`: `Some(client)` when admitted, `None` when refused as the spec says
/// (`error` TOO_MANY_CONNECTIONS, then close 1013).
async fn try_connect(addr: SocketAddr, user: &str) -> Option<Client> {
    let mut client = connect_raw(addr, &format!("/ws?user_id={user}")).await;
    let first = client.recv_json().await;
    match first["type"].as_str() {
        Some("connection") => Some(client),
        Some("error") => {
            assert_eq!(first["data"]["code"], "TOO_MANY_CONNECTIONS", "{first}");
            let (code, reason, _) = client.expect_close().await;
            assert_eq!(code, 1013, "{reason}");
            None
        }
        _ => panic!("expected `connection` or a refusal, got {first}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_across_the_cluster() {
    let cluster = RedisCluster::start();
    let nodes = three_sharded_nodes(&cluster, |s| {
        s.ws.max_connections = 5;
        s.redis.admission_block = 1;
    })
    .await;
    // Every node has its first block before the storm.
    eventually("three reservations", || {
        cluster
            .cli(0, &["-c", "HLEN", "wsgate:admission"])
            .lines()
            .last()
            .is_some_and(|l| l.trim() == "3")
    })
    .await;
    let mut held = Vec::new();
    for i in 0..5 {
        let node = &nodes[i % 3];
        let client = try_connect(node.local_addr, &format!("u{i}")).await;
        held.push(client.unwrap_or_else(|| panic!("connection {} refused", i + 1)));
    }
    for node in &nodes {
        assert!(
            try_connect(node.local_addr, "extra").await.is_none(),
            "a 6th connection was admitted on {}",
            node.local_addr
        );
    }
    // One leaves: one more fits again (somewhere).
    if let Some(client) = held.pop() {
        client.close().await;
    }
    eventually_some("a free slot", || async {
        for node in &nodes {
            if let Some(client) = try_connect(node.local_addr, "again").await {
                return Ok(client);
            }
        }
        Err("all refused".to_string())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_master_makes_nodes_unready_then_resubscribed() {
    let mut cluster = RedisCluster::start();
    let [a, b, _c] = three_sharded_nodes(&cluster, |_| {}).await;
    let routes_owner = owner(&cluster, &topic_ch("routes"));
    // A topic whose channel lives on another master.
    let elsewhere = (1..)
        .map(|i| format!("metrics-{i}"))
        .find(|t| owner(&cluster, &topic_ch(t)) != routes_owner)
        .expect("some topic on another master");
    let (mut on_b, _) = connect(b.local_addr, "/ws").await;
    subscribe(&mut on_b, &["routes", &elsewhere]).await;
    wait_shardnumsub(&cluster, &topic_ch("routes"), 1).await;
    wait_shardnumsub(&cluster, &topic_ch(&elsewhere), 1).await;

    cluster.nodes()[routes_owner].kill();
    for node in [&a, &b] {
        eventually_some("not ready while a master is down", || async {
            match readyz(node.local_addr).await {
                503 => Ok(()),
                other => Err(other.to_string()),
            }
        })
        .await;
    }
    // Meanwhile topics on the healthy masters go on working, across nodes.
    http_publish(a.local_addr, &elsewhere, "metrics", json!({"n": 0})).await;
    expect_publication(&mut on_b, &elsewhere, &json!({"n": 0})).await;
    // And the nodes stay unready while the master is down.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    for node in [&a, &b] {
        assert_eq!(readyz(node.local_addr).await, 503, "{}", node.local_addr);
    }
    cluster.nodes()[routes_owner].restart();
    for node in [&a, &b] {
        wait_ready(node.local_addr).await;
    }
    // Resubscribed on the restarted master: publications reach `b` again.
    wait_shardnumsub(&cluster, &topic_ch("routes"), 1).await;
    eventually_some("delivery after the restart", || async {
        let (status, body) = post(
            a.local_addr,
            "/api/publish",
            json!({"topic": "routes", "type": "route_update", "data": {"n": 1}}),
        )
        .await;
        if status == 200 {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
    let m = loop {
        let m = on_b.recv_json().await;
        if m["topic"] == "routes" {
            break m;
        }
    };
    // The client's connection stayed up throughout.
    assert_eq!(m["data"], json!({"n": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_starts_while_the_cluster_is_unreachable() {
    let unreachable = vec![format!("redis://127.0.0.1:{}", common::redis::free_port())];
    let node = cluster_node_with(&unreachable, "lonely", |s| s.redis.cluster = true).await;
    assert_eq!(readyz(node.local_addr).await, 503);
    // Publishing says the broker is unavailable instead of pretending.
    let (status, body) = post(
        node.local_addr,
        "/api/publish",
        json!({"topic": "routes", "type": "t", "data": {}}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_restarting_is_survived() {
    let mut cluster = RedisCluster::start();
    let [a, b, _c] = three_sharded_nodes(&cluster, |_| {}).await;
    let (mut on_b, _) = connect(b.local_addr, "/ws").await;
    subscribe(&mut on_b, &["routes"]).await;
    wait_shardnumsub(&cluster, &topic_ch("routes"), 1).await;
    for node in cluster.nodes().iter_mut() {
        node.kill();
    }
    for node in [&a, &b] {
        eventually_some("not ready without redis", || async {
            match readyz(node.local_addr).await {
                503 => Ok(()),
                other => Err(other.to_string()),
            }
        })
        .await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    for node in cluster.nodes().iter_mut() {
        node.restart();
    }
    // The same nodes (no restart) become ready, resubscribe and deliver again.
    for node in [&a, &b] {
        wait_ready(node.local_addr).await;
    }
    wait_shardnumsub(&cluster, &topic_ch("routes"), 1).await;
    // Readiness is the subscription side; a pooled command connection may still fail once.
    post_until_ok(
        a.local_addr,
        "/api/publish",
        json!({"topic": "routes", "type": "route_update", "data": {"n": 1}}),
    )
    .await;
    expect_publication(&mut on_b, "routes", &json!({"n": 1})).await;
}
