//! Several gateway nodes on real Redis: in-process nodes wired to one or more `redis-server`s,
//! polling helpers, and the Redis-side view of who is subscribed to what.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate::broker::redis::shard::shard_of;
use wsgate::config::Settings;
use wsgate::node::RunningNode;

use super::redis::RedisServer;
use super::{connect, start_node, Client};

/// How long cluster tests wait for something that should happen (subscriptions travel through
/// Redis; presence through heartbeats every third of the lease TTL).
pub const CLUSTER_WAIT: Duration = Duration::from_secs(10);
/// The linger every cluster test node uses.
pub const LINGER: Duration = Duration::from_millis(200);
/// The lease TTL of cluster test nodes (presence heartbeat and admission lease).
pub const LEASE_TTL: Duration = Duration::from_secs(1);

/// The URLs of `servers`, in shard order.
pub fn urls(servers: &[RedisServer]) -> Vec<String> {
    servers.iter().map(RedisServer::url).collect()
}

/// An in-process node named `id` on `urls`, with the cluster test timings and `tweak` applied.
pub async fn cluster_node_with(
    urls: &[String],
    id: &str,
    tweak: impl FnOnce(&mut Settings),
) -> RunningNode {
    let urls = urls.to_vec();
    let id = id.to_string();
    start_node(move |s| {
        s.redis_urls = urls;
        s.node_id = id;
        s.redis.linger = LINGER;
        s.redis.lease_ttl = LEASE_TTL;
        // No `$sys` snapshots (every 2 s by default, each a PUBLISH and an INCR through Redis)
        // unless a test asks for them: tests count Redis commands and deliveries.
        s.sys.interval = Duration::ZERO;
        tweak(s);
    })
    .await
}

/// An in-process node named `id` on `urls` with the cluster test timings.
pub async fn cluster_node(urls: &[String], id: &str) -> RunningNode {
    cluster_node_with(urls, id, |_| {}).await
}

/// Two nodes `a`, `b` on `urls` with `tweak` applied to both, each ready.
pub async fn two_nodes_with(
    urls: &[String],
    tweak: impl Fn(&mut Settings) + Clone,
) -> [RunningNode; 2] {
    let a = cluster_node_with(urls, "a", tweak.clone()).await;
    let b = cluster_node_with(urls, "b", tweak).await;
    for n in [&a, &b] {
        wait_ready(n.local_addr).await;
    }
    [a, b]
}

/// Three nodes `a`, `b`, `c` on `urls`, each ready (its Redis subscriptions are up).
pub async fn three_nodes(urls: &[String]) -> [RunningNode; 3] {
    let a = cluster_node(urls, "a").await;
    let b = cluster_node(urls, "b").await;
    let c = cluster_node(urls, "c").await;
    for n in [&a, &b, &c] {
        wait_ready(n.local_addr).await;
    }
    [a, b, c]
}

/// Polls `check` every 20 ms until it holds; panics with `what` after [`CLUSTER_WAIT`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {CLUSTER_WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls the async `check` every 50 ms until it returns `Some`; panics with `what` and the last
/// value seen after [`CLUSTER_WAIT`].
pub async fn eventually_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + CLUSTER_WAIT;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {CLUSTER_WAIT:?} waiting for {what}; last seen: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/readyz` of `addr`: its status code.
pub async fn readyz(addr: SocketAddr) -> u16 {
    super::get(addr, "/readyz").await.0
}

/// Waits until `/readyz` answers 200.
pub async fn wait_ready(addr: SocketAddr) {
    eventually_some(&format!("{addr} /readyz 200"), || async {
        match readyz(addr).await {
            200 => Ok(()),
            other => Err(other.to_string()),
        }
    })
    .await
}

/// Subscribers of `channel` on `server` (`PUBSUB NUMSUB`): one per node subscribed to it.
pub fn numsub(server: &RedisServer, channel: &str) -> u64 {
    let out = server.cli(&["PUBSUB", "NUMSUB", channel]);
    out.lines()
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("unexpected PUBSUB NUMSUB output {out:?}"))
}

/// Waits until `channel` has exactly `n` subscribers on `server`.
pub async fn wait_numsub(server: &RedisServer, channel: &str, n: u64) {
    eventually(&format!("{n} subscriber(s) of {channel}"), || {
        numsub(server, channel) == n
    })
    .await;
}

/// `PUBLISH channel payload` from a "backend" (redis-cli); returns how many subscribers
/// (nodes) Redis delivered it to.
pub fn backend_publish(server: &RedisServer, channel: &str, payload: &str) -> u64 {
    let out = server.cli(&["PUBLISH", channel, payload]);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("unexpected PUBLISH reply {out:?}"))
}

/// The first of `candidates`-like names `{prefix}`, `{prefix}-1`, `{prefix}-2`, ... that lands on
/// `shard` of `shards` (`shard_of`, as the broker computes it).
pub fn name_on_shard(prefix: &str, shard: usize, shards: usize) -> String {
    std::iter::once(prefix.to_string())
        .chain((1..).map(|i| format!("{prefix}-{i}")))
        .find(|name| shard_of(name, shards) == shard)
        .expect("some name lands on every shard")
}

/// Connects `query` to `addr`; returns the client and its `connectionId`.
pub async fn connect_with_id(addr: SocketAddr, query: &str) -> (Client, u64) {
    let (client, hello) = connect(addr, query).await;
    let id = hello["data"]["connectionId"]
        .as_u64()
        .unwrap_or_else(|| panic!("connection message without connectionId: {hello}"));
    (client, id)
}

/// Subscribes `client` to `topics` and checks the ack.
pub async fn subscribe(client: &mut Client, topics: &[&str]) {
    let ack = client
        .request(
            json!({"type": "subscribe", "id": format!("sub-{}", topics.join(",")),
                        "data": {"topics": topics}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["data"]["topics"], json!(topics), "{ack}");
}

/// `POST /api/publish` on `addr`; asserts 200 and returns the body (`seq`, `epoch`).
pub async fn http_publish(addr: SocketAddr, topic: &str, kind: &str, data: Value) -> Value {
    let (status, body) = super::post(
        addr,
        "/api/publish",
        json!({"topic": topic, "type": kind, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "publish on {addr}: {body}");
    body
}

/// POSTs `body` to `path` on `addr` until it answers 200 (a node's pooled Redis connections may
/// fail once after Redis restarted); returns the 200 body.
pub async fn post_until_ok(addr: SocketAddr, path: &str, body: Value) -> Value {
    eventually_some(&format!("POST {path} on {addr} answers 200"), || {
        let body = body.clone();
        async move {
            let (status, reply) = super::post(addr, path, body).await;
            if status == 200 {
                Ok(reply)
            } else {
                assert_eq!(status, 503, "only UNAVAILABLE while redis is away: {reply}");
                Err(format!("{status} {reply}"))
            }
        }
    })
    .await
}

/// Reads the next message and checks it is a publication of `topic` with `data`.
pub async fn expect_publication(client: &mut Client, topic: &str, data: &Value) -> Value {
    let m = client.recv_json().await;
    assert_eq!(
        m["topic"], topic,
        "expected a publication of {topic}, got {m}"
    );
    assert_eq!(&m["data"], data, "{m}");
    m
}
