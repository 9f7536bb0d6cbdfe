//! Several gateway nodes sharing Redis (real `redis-server` processes on free ports, three
//! in-process nodes `a`, `b`, `c`): topic, user and broadcast delivery across nodes, plain
//! `PUBLISH` from a backend, subscription hygiene (a node only listens to what its clients hold),
//! cluster-wide presence, disconnect and send-to-connection across nodes, cluster-wide `seq`,
//! sharding over two independent Redis instances, and the Redis traffic of one publication.
mod common;
use common::cluster::*;
use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use wsgate::broker::redis::shard::shard_of;
use wsgate::config::NamespaceSettings;

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

/// A publication of `topic` without `seq` and `epoch` (published by a backend with plain
/// `PUBLISH`).
fn assert_unsequenced(m: &Value) {
    let obj = m.as_object().expect("an object");
    assert!(
        !obj.contains_key("seq") && !obj.contains_key("epoch"),
        "a plain PUBLISH carries no seq/epoch: {m}"
    );
}

/// The delivery scenario, on one Redis or on several sharded by topic. Node `c` holds user
/// `u_c` subscribed to `t_c` and `t_bc`; node `b` holds `u_b` subscribed to `t_bc`; node `a`
/// holds `u_a` with no subscription. With several servers `t_c` and `t_bc` live on different
/// shards and each channel must exist on its own shard only.
async fn delivery_across_nodes(servers: &[RedisServer]) {
    let shards = servers.len();
    let urls = urls(servers);
    let [a, b, c] = three_nodes(&urls).await;

    // Topics and users on different shards when there are several.
    let t_c = name_on_shard("routes", shards - 1, shards);
    let t_bc = name_on_shard("metrics", 0, shards);
    let u_c = name_on_shard("carol", shards - 1, shards);
    let u_b = name_on_shard("bob", 0, shards);
    let u_a = name_on_shard("alice", 0, shards);
    let server_of = |name: &str| &servers[shard_of(name, shards)];
    let topic_ch = |t: &str| format!("wsgate:t:{{{t}}}");
    let user_ch = |u: &str| format!("wsgate:u:{{{u}}}");

    let (mut on_c, _) = connect(c.local_addr, &format!("/ws?user_id={u_c}")).await;
    let (mut on_b, _) = connect(b.local_addr, &format!("/ws?user_id={u_b}")).await;
    let (mut on_a, _) = connect(a.local_addr, &format!("/ws?user_id={u_a}")).await;
    subscribe(&mut on_c, &[&t_c, &t_bc]).await;
    subscribe(&mut on_b, &[&t_bc]).await;

    // One subscription per node that needs the channel, on the channel's shard.
    wait_numsub(server_of(&t_c), &topic_ch(&t_c), 1).await;
    wait_numsub(server_of(&t_bc), &topic_ch(&t_bc), 2).await;
    for u in [&u_a, &u_b, &u_c] {
        wait_numsub(server_of(u), &user_ch(u), 1).await;
    }
    assert_eq!(numsub(&servers[0], "wsgate:broadcast"), 3);
    assert_eq!(numsub(&servers[0], "wsgate:control"), 3);
    for node in ["a", "b", "c"] {
        assert_eq!(numsub(&servers[0], &format!("wsgate:node:{node}")), 1);
    }
    if shards > 1 {
        for (i, server) in servers.iter().enumerate() {
            let channels = server.channels();
            for name in [&t_c, &t_bc] {
                let on_this = channels.contains(&topic_ch(name));
                assert_eq!(
                    on_this,
                    i == shard_of(name, shards),
                    "channel of {name} on server {i}: {channels:?}"
                );
            }
            for u in [&u_a, &u_b, &u_c] {
                assert_eq!(
                    channels.contains(&user_ch(u)),
                    i == shard_of(u, shards),
                    "channel of user {u} on server {i}: {channels:?}"
                );
            }
            // Broadcast, control and node channels live on the first instance only.
            assert_eq!(
                channels.contains(&"wsgate:broadcast".to_string()),
                i == 0,
                "{channels:?}"
            );
        }
    }

    // Topic: an HTTP publish on `a` reaches `c` only (b is not subscribed to t_c).
    let receipt = http_publish(a.local_addr, &t_c, "route_update", json!({"n": 1})).await;
    let m = expect_publication(&mut on_c, &t_c, &json!({"n": 1})).await;
    assert_eq!(m["type"], "route_update");
    assert_eq!(m["seq"], 1);
    assert_eq!(m["seq"], receipt["seq"]);
    assert_eq!(m["epoch"], receipt["epoch"]);

    // A topic two nodes hold: both get it, in one copy each.
    http_publish(a.local_addr, &t_bc, "metrics", json!({"n": 2})).await;
    expect_publication(&mut on_c, &t_bc, &json!({"n": 2})).await;
    expect_publication(&mut on_b, &t_bc, &json!({"n": 2})).await;

    // A backend's plain PUBLISH on the topic channel: delivered to both nodes, unsequenced.
    let receivers = backend_publish(
        server_of(&t_bc),
        &topic_ch(&t_bc),
        r#"{"type":"route_update","data":{"n":3}}"#,
    );
    assert_eq!(receivers, 2, "two nodes hold {t_bc}");
    for client in [&mut on_c, &mut on_b] {
        let m = expect_publication(client, &t_bc, &json!({"n": 3})).await;
        assert_eq!(m["type"], "route_update");
        assert_unsequenced(&m);
    }

    // User: the HTTP API on `a` reaches the user's connection on `c`.
    let (status, body) = post(
        a.local_addr,
        "/api/ws/send",
        json!({"type": "notification", "to": u_c, "data": {"n": 4}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = on_c.expect_type("notification").await;
    assert_eq!(m["to"], u_c.as_str(), "{m}");
    assert_eq!(m["data"], json!({"n": 4}));
    assert!(m.get("from").is_none(), "an API message has no sender: {m}");

    // A client on `a` writes to the user on `b`: `from` is the sender's identity.
    u_a_chats_to(&mut on_a, &u_b).await;
    let m = on_b.expect_type("chat").await;
    assert_eq!(m["from"], u_a.as_str(), "{m}");
    assert_eq!(m["to"], u_b.as_str(), "{m}");
    assert_eq!(m["data"], json!({"text": "hi"}));

    // A backend's plain PUBLISH on a user channel.
    let receivers = backend_publish(
        server_of(&u_c),
        &user_ch(&u_c),
        r#"{"type":"notification","data":{"n":5}}"#,
    );
    assert_eq!(receivers, 1);
    let m = on_c.expect_type("notification").await;
    assert_eq!(m["data"], json!({"n": 5}));

    // Broadcast: the HTTP API on `b`, and a backend's plain PUBLISH, reach every node.
    let (status, body) = post(
        b.local_addr,
        "/api/ws/broadcast",
        json!({"type": "announcement", "data": {"n": 6}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        let m = client.expect_type("announcement").await;
        assert_eq!(m["data"], json!({"n": 6}));
    }
    let receivers = backend_publish(
        &servers[0],
        "wsgate:broadcast",
        r#"{"type":"announcement","content":{"n":7}}"#,
    );
    assert_eq!(receivers, 3);
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        let m = client.expect_type("announcement").await;
        assert_eq!(m["data"], json!({"n": 7}), "{m}");
        assert_eq!(m["content"], json!({"n": 7}), "{m}");
    }

    // Nobody got anything more (no duplicates, no topic traffic on `a`).
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        client.expect_silence().await;
    }
}

async fn u_a_chats_to(on_a: &mut Client, to: &str) {
    let ack = on_a
        .request(json!({"type": "chat", "id": "m1", "to": to, "data": {"text": "hi"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_user_and_broadcast_delivery_across_nodes() {
    let redis = RedisServer::start();
    delivery_across_nodes(std::slice::from_ref(&redis)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_across_nodes_with_topics_sharded_over_two_redis_instances() {
    let servers = [RedisServer::start(), RedisServer::start()];
    delivery_across_nodes(&servers).await;
}

/// A node subscribes to a topic's channel only while one of its own clients holds the topic,
/// and unsubscribes (after the linger) when its last local subscriber leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_listens_only_to_topics_its_clients_hold() {
    let redis = RedisServer::start();
    let [a, b, c] = three_nodes(&[redis.url()]).await;
    let ch = "wsgate:t:{solo}";
    assert_eq!(numsub(&redis, ch), 0, "no client holds solo yet");

    // Two subscribers on `c`: one subscription in Redis.
    let (mut c1, _) = connect(c.local_addr, "/ws?user_id=c1").await;
    let (mut c2, _) = connect(c.local_addr, "/ws?user_id=c2").await;
    subscribe(&mut c1, &["solo"]).await;
    subscribe(&mut c2, &["solo"]).await;
    wait_numsub(&redis, ch, 1).await;
    // Clients on `a` and `b` that hold other topics do not make their nodes listen to solo.
    let (mut on_a, _) = connect(a.local_addr, "/ws?user_id=a1").await;
    subscribe(&mut on_a, &["other"]).await;
    wait_numsub(&redis, "wsgate:t:{other}", 1).await;
    assert_eq!(numsub(&redis, ch), 1);

    // A publication through `a` reaches both subscribers on `c` (one delivery to node `c`).
    http_publish(a.local_addr, "solo", "tick", json!(1)).await;
    expect_publication(&mut c1, "solo", &json!(1)).await;
    expect_publication(&mut c2, "solo", &json!(1)).await;
    on_a.expect_silence().await;

    // `b` gains a subscriber, then loses it: unsubscribed after the linger, not before.
    let (mut on_b, _) = connect(b.local_addr, "/ws?user_id=b1").await;
    subscribe(&mut on_b, &["solo"]).await;
    wait_numsub(&redis, ch, 2).await;
    let unsubscribe_sent = Instant::now();
    let ack = on_b
        .request(json!({"type": "unsubscribe", "id": "u", "data": {"topics": ["solo"]}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    wait_numsub(&redis, ch, 1).await;
    let took = unsubscribe_sent.elapsed();
    // A flush (any batch) also sends lingers ending within a tenth of the linger.
    assert!(
        took >= LINGER * 9 / 10,
        "b unsubscribed after {took:?}, before the {LINGER:?} linger"
    );

    // The last local subscribers leave `c` (one unsubscribes, one disconnects): no node listens.
    let ack = c1
        .request(json!({"type": "unsubscribe", "id": "u", "data": {"topic": "solo"}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(numsub(&redis, ch), 1, "c2 still holds solo on c");
    c2.close().await;
    wait_numsub(&redis, ch, 0).await;
    // The other channels stay: `a` still holds `other`, every node its own channels.
    assert_eq!(numsub(&redis, "wsgate:t:{other}"), 1);
    assert_eq!(numsub(&redis, "wsgate:broadcast"), 3);
}

/// What Redis does for one publication in a cluster of 3 nodes of which 1 holds the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_publication_costs_one_function_call_and_one_pubsub_delivery() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    // A long lease so that background heartbeats and lease renewals (every third of it) rarely
    // fall inside the measured windows; the minimum over several windows removes them anyway.
    let long_lease = |s: &mut wsgate::config::Settings| s.redis.lease_ttl = Duration::from_secs(30);
    let a = cluster_node_with(&urls, "a", long_lease).await;
    let b = cluster_node_with(&urls, "b", long_lease).await;
    let c = cluster_node_with(&urls, "c", long_lease).await;
    for n in [&a, &b, &c] {
        wait_ready(n.local_addr).await;
    }
    let (mut on_c, _) = connect(c.local_addr, "/ws?user_id=u1").await;
    subscribe(&mut on_c, &["prices"]).await;
    let ch = "wsgate:t:{prices}";
    wait_numsub(&redis, ch, 1).await;

    // Calls per command (`INFO commandstats`; commands run by a script count too), without the
    // `INFO` calls of the measuring itself.
    let snapshot = || -> BTreeMap<String, u64> {
        redis
            .cli(&["INFO", "commandstats"])
            .lines()
            .filter_map(|l| {
                let (name, stats) = l.trim().strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = stats
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_string(), calls))
            })
            .filter(|(name, _)| name != "info")
            .collect()
    };

    const ROUNDS: u64 = 5;
    let mut rounds: Vec<BTreeMap<String, u64>> = Vec::new();
    for round in 1..=ROUNDS {
        let before = snapshot();
        http_publish(a.local_addr, "prices", "price", json!({"round": round})).await;
        expect_publication(&mut on_c, "prices", &json!({"round": round})).await;
        let after = snapshot();
        let delta: BTreeMap<String, u64> = after
            .iter()
            .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
            .filter(|(_, n)| *n > 0)
            .collect();
        // Exactly one PUBLISH and one INCR per publication: nothing else in the cluster runs
        // either command (`cluster_node_with` turns the `$sys` snapshots off), so these counts
        // are exact.
        assert_eq!(delta.get("publish"), Some(&1), "PUBLISH calls: {delta:?}");
        assert_eq!(delta.get("incr"), Some(&1), "INCR calls: {delta:?}");
        rounds.push(delta);
    }
    // Background work (heartbeats, lease renewals, health-check PINGs) may fall into a window;
    // the cheapest round is the publication alone.
    let cheapest = rounds
        .iter()
        .min_by_key(|d| d.values().sum::<u64>())
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        cheapest.get("fcall"),
        Some(&1),
        "one function call per publication: {rounds:?}"
    );
    // Recorded in the topic's history stream: one XADD.
    assert_eq!(cheapest.get("xadd"), Some(&1), "{rounds:?}");

    // Who received it: the channel has one subscriber (node c's subscription connection), so
    // the PUBLISH reached exactly one node. A plain PUBLISH on the same channel shows the
    // receiver count Redis reports.
    assert_eq!(numsub(&redis, ch), 1);
    let receivers = backend_publish(&redis, ch, r#"{"type":"price","data":"probe"}"#);
    assert_eq!(receivers, 1, "only node c holds prices");
    let m = on_c.expect_type("price").await;
    assert_eq!(m["data"], "probe");
    on_c.expect_silence().await;

    let script: u64 = [
        "incr", "get", "set", "time", "xadd", "xtrim", "pexpire", "publish",
    ]
    .iter()
    .filter_map(|c| cheapest.get(*c))
    .sum();
    let total: u64 = cheapest.values().sum();
    println!(
        "redis traffic for one publication (3 nodes, 1 holds the topic), cheapest of {ROUNDS} \
         rounds:\n  commands executed: {total} {cheapest:?}\n    = 1 FCALL wsgate_publish from node a, \
         running {script} inside the function (INCR, GET, TIME, XADD, XTRIM, PEXPIRE, PUBLISH; \
         SET only when the sequence starts), \
         + {} from node a's connection pool check (UNWATCH + PING)\n  commands per round: \
         {:?}\n  pubsub messages delivered: {receivers} (PUBSUB NUMSUB = 1: nodes a and b \
         are not subscribed and receive nothing)\n  messages Redis sends: 1 script reply + 1 \
         pool-check reply to node a, {receivers} pubsub push to node c",
        total - 1 - script,
        rounds
            .iter()
            .map(|d| d.values().sum::<u64>())
            .collect::<Vec<_>>()
    );
}

/// `/api/ws/status`, `/api/info` and `/api/presence` on any node describe the whole cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_is_cluster_wide() {
    let redis = RedisServer::start();
    let [a, b, c] = three_nodes(&[redis.url()]).await;
    let (mut alice, alice_id) = connect_with_id(a.local_addr, "/ws?user_id=alice").await;
    let (mut bob, bob_id) = connect_with_id(b.local_addr, "/ws?user_id=bob").await;
    let (mut carol1, carol1_id) = connect_with_id(c.local_addr, "/ws?user_id=carol").await;
    let (_carol2, _) = connect_with_id(c.local_addr, "/ws?user_id=carol").await;
    subscribe(&mut alice, &["room"]).await;
    subscribe(&mut bob, &["room"]).await;
    subscribe(&mut carol1, &["room"]).await;

    let addrs = [a.local_addr, b.local_addr, c.local_addr];
    for addr in addrs {
        eventually_some(&format!("cluster status on {addr}"), || async move {
            let (status, body) = get(addr, "/api/ws/status").await;
            let ok = status == 200
                && body["online_users"] == json!(["alice", "bob", "carol"])
                && body["online_count"] == 4
                && body["online_user_count"] == 3
                && body["nodes"] == 3;
            if ok {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
    }

    let expected_nodes = json!([
        {"id": "a", "connections": 1},
        {"id": "b", "connections": 1},
        {"id": "c", "connections": 2},
    ]);
    for addr in addrs {
        let expected = &expected_nodes;
        eventually_some(&format!("/api/info on {addr}"), || async move {
            let (status, body) = get(addr, "/api/info").await;
            if status == 200 && &body["nodes"] == expected {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
    }

    let expected_members = json!([
        {"connectionId": alice_id, "node": "a", "userId": "alice"},
        {"connectionId": bob_id, "node": "b", "userId": "bob"},
        {"connectionId": carol1_id, "node": "c", "userId": "carol"},
    ]);
    for addr in addrs {
        let expected = &expected_members;
        eventually_some(&format!("/api/presence on {addr}"), || async move {
            let (status, body) = get(addr, "/api/presence?topic=room").await;
            let members: Vec<Value> = body["members"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|m| {
                    json!({"connectionId": m["connectionId"], "node": m["node"],
                                "userId": m["userId"]})
                })
                .collect();
            if status == 200 && &json!(members) == expected && body["count"] == 3 {
                Ok(())
            } else {
                Err(format!("{status} {body}"))
            }
        })
        .await;
    }

    // Bob leaves: every node's view drops him.
    bob.close().await;
    for addr in addrs {
        eventually_some(&format!("bob gone on {addr}"), || async move {
            let (_, status) = get(addr, "/api/ws/status").await;
            let (_, presence) = get(addr, "/api/presence?topic=room").await;
            let nodes: BTreeMap<String, Value> = presence["members"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|m| (m["userId"].as_str().unwrap_or_default().to_string(), m))
                .collect();
            if status["online_users"] == json!(["alice", "carol"])
                && status["online_count"] == 3
                && presence["count"] == 2
                && !nodes.contains_key("bob")
            {
                Ok(())
            } else {
                Err(format!("{status} {presence}"))
            }
        })
        .await;
    }
}

/// `/api/disconnect` and `/api/ws/send` with a `connectionId` act on connections of other nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_and_send_to_a_connection_on_another_node() {
    let redis = RedisServer::start();
    let [a, _b, c] = three_nodes(&[redis.url()]).await;
    // Several connections per node, so that node-local connection numbers overlap if they are
    // only unique per node.
    let mut on_a = Vec::new();
    for i in 0..3 {
        on_a.push(connect_with_id(a.local_addr, &format!("/ws?user_id=a{i}")).await);
    }
    let mut on_c = Vec::new();
    for i in 0..3 {
        on_c.push(connect_with_id(c.local_addr, &format!("/ws?user_id=c{i}")).await);
    }
    let (mut victim, _) = connect_with_id(c.local_addr, "/ws?user_id=mallory").await;
    let (mut victim2, _) = connect_with_id(c.local_addr, "/ws?user_id=mallory").await;
    wait_numsub(&redis, "wsgate:u:{mallory}", 1).await;

    // Send to the second connection on `c`, through `a`.
    let target = on_c[1].1;
    let (status, body) = post(
        a.local_addr,
        "/api/ws/send",
        json!({"type": "direct", "connectionId": target, "data": {"for": target}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = on_c[1].0.expect_type("direct").await;
    assert_eq!(m["data"], json!({"for": target}));
    for (client, id) in on_a.iter_mut().chain(on_c.iter_mut()) {
        if *id != target {
            client.expect_silence().await;
        }
    }

    // Disconnect a user whose connections are all on `c`, through `a`: close 4003 with a notice.
    let (status, body) = post(
        a.local_addr,
        "/api/disconnect",
        json!({"userId": "mallory"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for client in [&mut victim, &mut victim2] {
        let (code, _reason, seen) = client.expect_close().await;
        assert_eq!(code, 4003, "{seen:?}");
        find_disconnect(&seen, 4003, false);
    }
    // Nobody else was disconnected.
    for (client, _) in on_a.iter_mut().chain(on_c.iter_mut()) {
        let pong = client.request(json!({"type": "ping", "id": "p"})).await;
        assert_eq!(pong["type"], "pong", "{pong}");
    }
    wait_numsub(&redis, "wsgate:u:{mallory}", 0).await;
}

/// Publications to one topic through different nodes share one sequence and one epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seq_is_cluster_wide() {
    let redis = RedisServer::start();
    let urls = [redis.url()];
    let chat_ok = |s: &mut wsgate::config::Settings| {
        s.namespaces
            .insert("chat".into(), NamespaceSettings::open_publish());
    };
    let a = cluster_node_with(&urls, "a", chat_ok).await;
    let b = cluster_node_with(&urls, "b", chat_ok).await;
    let c = cluster_node_with(&urls, "c", chat_ok).await;
    for n in [&a, &b, &c] {
        wait_ready(n.local_addr).await;
    }
    let (mut reader, _) = connect(c.local_addr, "/ws?user_id=r").await;
    subscribe(&mut reader, &["orders", "chat:room"]).await;
    wait_numsub(&redis, "wsgate:t:{orders}", 1).await;
    wait_numsub(&redis, "wsgate:t:{chat:room}", 1).await;

    // HTTP publishes through a, b, c in turn.
    let mut receipts = Vec::new();
    for (n, node) in [&a, &b, &c].into_iter().enumerate() {
        receipts.push(http_publish(node.local_addr, "orders", "order", json!({"n": n + 1})).await);
    }
    let epoch = receipts[0]["epoch"].clone();
    assert!(epoch.as_str().is_some_and(|e| !e.is_empty()), "{epoch}");
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(r["seq"], i + 1, "{receipts:?}");
        assert_eq!(r["epoch"], epoch, "{receipts:?}");
    }
    for n in 1..=3 {
        let m = expect_publication(&mut reader, "orders", &json!({"n": n})).await;
        assert_eq!(m["seq"], n, "{m}");
        assert_eq!(m["epoch"], epoch, "{m}");
    }

    // Client publishes through a, b and c: one sequence too.
    let (mut pub_a, _) = connect(a.local_addr, "/ws?user_id=pa").await;
    let (mut pub_b, _) = connect(b.local_addr, "/ws?user_id=pb").await;
    let (mut pub_c, _) = connect(c.local_addr, "/ws?user_id=pc").await;
    let mut acks = Vec::new();
    for (i, client) in [&mut pub_a, &mut pub_b, &mut pub_c].into_iter().enumerate() {
        let ack = client
            .request(json!({"type": "publish", "id": format!("p{i}"),
                            "data": {"topic": "chat:room", "type": "say", "data": {"i": i}}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acks.push(ack);
    }
    let chat_epoch = acks[0]["data"]["epoch"].clone();
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack["data"]["seq"], i + 1, "{acks:?}");
        assert_eq!(ack["data"]["epoch"], chat_epoch, "{acks:?}");
    }
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = reader.recv_json().await;
        if m["topic"] == "chat:room" {
            got.push((m["seq"].clone(), m["epoch"].clone(), m["data"]["i"].clone()));
        }
    }
    assert_eq!(
        got,
        (0..3)
            .map(|i| (json!(i + 1), chat_epoch.clone(), json!(i)))
            .collect::<Vec<_>>()
    );
}

/// What a backend publishes the moment a client reads its `subscribe` ack (or its `connection`
/// message) reaches the client: the node's SUBSCRIBE for a topic (or user) new to it is
/// confirmed by Redis before the client hears that it is subscribed (connected). Every
/// PUBLISH here goes out right after the ack, on a topic no client of the node held before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_right_after_the_ack_reaches_the_client() {
    let redis = RedisServer::start();
    let node = cluster_node(&[redis.url()], "a").await;
    wait_ready(node.local_addr).await;
    let backend = ::redis::Client::open(redis.url()).expect("redis url");
    let mut backend = backend
        .get_multiplexed_async_connection()
        .await
        .expect("backend connection");
    let (mut client, _) = connect(node.local_addr, "/ws?user_id=u1").await;
    for i in 0..60 {
        let topic = format!("fresh-{i}");
        subscribe(&mut client, &[topic.as_str()]).await;
        let receivers: u64 = ::redis::cmd("PUBLISH")
            .arg(format!("wsgate:t:{{{topic}}}"))
            .arg(format!(r#"{{"type":"tick","data":{{"n":{i}}}}}"#))
            .query_async(&mut backend)
            .await
            .expect("PUBLISH");
        assert_eq!(
            receivers, 1,
            "{topic}: the node was not subscribed yet when the ack came"
        );
        expect_publication(&mut client, &topic, &json!({ "n": i })).await;
    }
    // The same for a user's channel and the `connection` message.
    for i in 0..30 {
        let user = format!("fresh-user-{i}");
        let (mut client, _) = connect(node.local_addr, &format!("/ws?user_id={user}")).await;
        let receivers: u64 = ::redis::cmd("PUBLISH")
            .arg(format!("wsgate:u:{{{user}}}"))
            .arg(r#"{"type":"notification","data":{"hello":true}}"#)
            .query_async(&mut backend)
            .await
            .expect("PUBLISH");
        assert_eq!(
            receivers, 1,
            "{user}: connected before the node received the user's messages"
        );
        let m = client.expect_type("notification").await;
        assert_eq!(m["data"]["hello"], true, "{m}");
    }
}
