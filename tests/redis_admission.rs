//! Cluster admission and presence against a real redis-server (library level: several
//! `ClusterAdmission` / `Presence` instances stand in for gateway nodes).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use tokio::time::{sleep, timeout, Instant};
use wsgate::broker::redis::admission::{AdmissionConfig, ClusterAdmission};
use wsgate::broker::redis::keys::{node_users_key, topic_presence_key, ADMISSION_KEY, NODES_KEY};
use wsgate::broker::redis::pool::{self, Pool};
use wsgate::broker::redis::presence::{Presence, PresenceConfig, PresenceEntry, PresenceError};
use wsgate::broker::redis::shard::shard_of;
use wsgate::limits::{ConnectionSlots, Slot};

/// Upper bound for any polling wait (a lease of 1 s must have lapsed well within it).
const POLL_LIMIT: Duration = Duration::from_secs(8);

fn pool(server: &RedisServer) -> Pool {
    pool::create(&server.url()).expect("redis pool")
}

fn admission(
    server: &RedisServer,
    node: &str,
    max: usize,
    block: usize,
    lease_ttl: Duration,
) -> Arc<ClusterAdmission> {
    let config = AdmissionConfig {
        node_id: node.to_string(),
        max_connections: max,
        block,
        lease_ttl,
    };
    ClusterAdmission::new(pool(server), config, ConnectionSlots::with_limit(max, 0))
}

/// Polls `check` every 50 ms until it holds; panics with `what` after [`POLL_LIMIT`].
async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + POLL_LIMIT;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        sleep(Duration::from_millis(50)).await;
    }
}

/// The reservations stored in Redis, read with redis-cli (independent of the code under test).
fn stored_reservations(server: &RedisServer) -> Vec<(String, usize)> {
    let raw = server.cli(&["HGETALL", ADMISSION_KEY]);
    let lines: Vec<&str> = raw
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut out: Vec<(String, usize)> = lines
        .chunks_exact(2)
        .map(|pair| {
            let reserved = pair[1]
                .split_once(':')
                .and_then(|(r, _)| r.parse().ok())
                .unwrap_or_else(|| panic!("malformed reservation {:?}", pair[1]));
            (pair[0].to_string(), reserved)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_exceed_the_budget() {
    let server = RedisServer::start();
    let nodes: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| admission(&server, n, 50, 8, Duration::from_secs(10)))
        .collect();
    // Three reserving tasks per node, all at once.
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..3 {
            let node = Arc::clone(node);
            tasks.push(tokio::spawn(async move {
                while node.reserve_block().await.expect("redis reachable") {}
            }));
        }
    }
    for task in tasks {
        timeout(POLL_LIMIT, task)
            .await
            .expect("reservations finish")
            .expect("task");
    }
    let limits: Vec<usize> = nodes.iter().map(|n| n.slots().limit()).collect();
    assert_eq!(limits.iter().sum::<usize>(), 50, "limits {limits:?}");
    let stored = stored_reservations(&server);
    assert_eq!(
        stored.iter().map(|(_, r)| r).sum::<usize>(),
        50,
        "{stored:?}"
    );
    // Redis mirrors every local limit (a node that got nothing has no field).
    for node in &nodes {
        let in_redis = stored
            .iter()
            .find(|(id, _)| *id == node.config().node_id)
            .map_or(0, |(_, r)| *r);
        assert_eq!(in_redis, node.slots().limit(), "{}", node.config().node_id);
    }
    // Exhausted: nobody gets more.
    for node in &nodes {
        assert!(!node.reserve_block().await.expect("redis reachable"));
    }
    assert_eq!(nodes[0].reservations().await.expect("read"), stored);
}

/// What a session does: `try_acquire`, and on refusal ask admission to grow, then try again.
async fn connect(admission: &ClusterAdmission) -> Option<Slot> {
    loop {
        if let Some(slot) = admission.slots().try_acquire() {
            return Some(slot);
        }
        if !admission.grow().await.expect("redis reachable") {
            return admission.slots().try_acquire();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_storm_over_three_nodes_admits_exactly_max_connections() {
    const MAX: usize = 50;
    let server = RedisServer::start();
    let nodes: Vec<_> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| admission(&server, n, MAX, 8, Duration::from_secs(10)))
        .collect();
    // A watcher checks the cluster-wide live count all along.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let nodes = nodes.clone();
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Acquire) {
                let live: usize = nodes.iter().map(|n| n.slots().live()).sum();
                let limits: usize = nodes.iter().map(|n| n.slots().limit()).sum();
                assert!(live <= MAX, "{live} connections admitted");
                assert!(limits <= MAX, "{limits} slots reserved");
                peak = peak.max(live);
                tokio::task::yield_now().await;
            }
            peak
        })
    };
    // 60 clients per node (180 in all) connect at once and hold their connection.
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..60 {
            let node = Arc::clone(node);
            clients.push(tokio::spawn(async move { connect(&node).await }));
        }
    }
    let mut held = Vec::new();
    for client in clients {
        if let Some(slot) = timeout(POLL_LIMIT, client)
            .await
            .expect("connect finishes")
            .expect("task")
        {
            held.push(slot);
        }
    }
    stop.store(true, Ordering::Release);
    let peak = watcher.await.expect("watcher saw no over-admission");
    assert_eq!(held.len(), MAX, "the whole budget is usable, and no more");
    assert!(peak <= MAX);
    let live: usize = nodes.iter().map(|n| n.slots().live()).sum();
    assert_eq!(live, MAX);
    let stored: usize = stored_reservations(&server).iter().map(|(_, r)| r).sum();
    assert_eq!(stored, MAX);
    // A connection that leaves makes room for exactly one more on its node.
    drop(held.pop());
    assert_eq!(
        nodes.iter().map(|n| n.slots().live()).sum::<usize>(),
        MAX - 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_share_comes_back_after_its_lease() {
    let ttl = Duration::from_secs(1);
    let server = RedisServer::start();
    let n1 = admission(&server, "n1", 50, 8, ttl);
    let n2 = admission(&server, "n2", 50, 8, ttl);
    let n3 = admission(&server, "n3", 50, 8, ttl);
    while n1.reserve_block().await.expect("reserve") {}
    assert_eq!(n1.slots().limit(), 50);
    assert!(
        !n2.reserve_block().await.expect("reserve"),
        "budget exhausted"
    );

    // n1 dies: no release, no renewal.
    drop(n1);
    wait_until("n2 can reserve n1's share", || {
        let n2 = Arc::clone(&n2);
        async move { n2.reserve_block().await.expect("reserve") }
    })
    .await;
    while n2.reserve_block().await.expect("reserve") {}
    while n3.reserve_block().await.expect("reserve") {}
    assert_eq!(n2.slots().limit() + n3.slots().limit(), 50);
    assert!(!stored_reservations(&server).iter().any(|(n, _)| n == "n1"));

    // Renewed leases outlive their TTL: n2 and n3 keep their shares (all in use, so there is
    // no surplus to give back) for several TTLs. Maintenance starts only once every slot is in
    // use: a tick before that would rightly give the unused surplus back (each reserve above
    // wrote a fresh lease, so nothing lapses meanwhile).
    let mut held = Vec::new();
    for node in [&n2, &n3] {
        while let Some(slot) = node.slots().try_acquire() {
            held.push(slot);
        }
    }
    assert_eq!(held.len(), 50);
    let _keep_n2 = n2.spawn_maintenance();
    let _keep_n3 = n3.spawn_maintenance();
    sleep(ttl * 3).await;
    let n4 = admission(&server, "n4", 50, 8, ttl);
    assert!(
        !n4.reserve_block().await.expect("reserve"),
        "live leases are kept"
    );
    let stored: usize = stored_reservations(&server).iter().map(|(_, r)| r).sum();
    assert_eq!(stored, 50);
}

#[tokio::test]
async fn tick_returns_surplus_and_release_all_frees_everything() {
    let server = RedisServer::start();
    let n1 = admission(&server, "n1", 50, 8, Duration::from_secs(10));
    for _ in 0..4 {
        assert!(n1.reserve_block().await.expect("reserve"));
    }
    assert_eq!(n1.slots().limit(), 32);

    // 10 live connections, 22 spare >= 2 blocks: keep one block of headroom.
    let held: Vec<Slot> = (0..10)
        .map(|_| n1.slots().try_acquire().expect("within the reservation"))
        .collect();
    n1.tick().await.expect("tick");
    assert_eq!(n1.slots().limit(), 18);
    assert_eq!(stored_reservations(&server), vec![("n1".to_string(), 18)]);
    // Less than two blocks spare: nothing to give back.
    n1.tick().await.expect("tick");
    assert_eq!(n1.slots().limit(), 18);

    // Another node can take what n1 gave back.
    let n2 = admission(&server, "n2", 50, 50, Duration::from_secs(10));
    assert!(n2.reserve_block().await.expect("reserve"));
    assert_eq!(n2.slots().limit(), 32);

    // Shutdown: n1's whole reservation is released; live connections are not touched.
    n1.release_all().await.expect("release");
    assert_eq!(n1.slots().limit(), 0);
    assert_eq!(n1.slots().live(), 10);
    assert!(!n1.reserve_block().await.expect("released is final"));
    assert_eq!(stored_reservations(&server), vec![("n2".to_string(), 32)]);
    assert!(n2.reserve_block().await.expect("reserve"));
    assert_eq!(n2.slots().limit(), 50);
    drop(held);

    n2.release_all().await.expect("release");
    assert_eq!(server.cli(&["EXISTS", ADMISSION_KEY]), "0");
}

#[tokio::test]
async fn redis_unreachable_keeps_the_current_reservation_then_recovers() {
    let mut server = RedisServer::start();
    let n1 = admission(&server, "n1", 50, 8, Duration::from_secs(1));
    assert!(n1.reserve_block().await.expect("reserve"));
    assert!(n1.reserve_block().await.expect("reserve"));
    assert_eq!(n1.slots().limit(), 16);
    let mut held: Vec<Slot> = (0..5)
        .map(|_| n1.slots().try_acquire().expect("reserved"))
        .collect();

    server.kill();
    assert!(
        n1.reserve_block().await.is_err(),
        "no reservation without Redis"
    );
    assert!(n1.tick().await.is_err());
    assert!(
        n1.grow().await.is_ok(),
        "headroom left: no trip to Redis needed"
    );
    assert_eq!(
        n1.slots().limit(),
        16,
        "fail-static: the limit is unchanged"
    );
    // Connections within the held reservation are still admitted, none beyond it.
    while let Some(slot) = n1.slots().try_acquire() {
        held.push(slot);
    }
    assert_eq!(held.len(), 16);
    assert!(n1.grow().await.is_err(), "no headroom and no Redis: refuse");
    assert!(n1.slots().try_acquire().is_none());

    // Redis comes back empty (no persistence): the next tick re-establishes the lease.
    server.restart();
    assert_eq!(server.cli(&["EXISTS", ADMISSION_KEY]), "0");
    wait_until("the lease is re-established", || {
        let n1 = Arc::clone(&n1);
        async move { n1.tick().await.is_ok() }
    })
    .await;
    assert_eq!(n1.slots().limit(), 16);
    assert_eq!(stored_reservations(&server), vec![("n1".to_string(), 16)]);
    assert!(n1.reserve_block().await.expect("reserve"));
    assert_eq!(n1.slots().limit(), 24);
    drop(held);
}

#[tokio::test]
async fn a_node_whose_lease_lapsed_reclaims_only_what_is_free() {
    // The documented margin: n1's lease lapses while it still holds connections (its renewals
    // failed for a whole TTL); n2 takes the budget meanwhile.
    let ttl = Duration::from_secs(2);
    let server = RedisServer::start();
    let n1 = admission(&server, "n1", 20, 10, ttl);
    let n2 = admission(&server, "n2", 20, 10, ttl);
    assert!(n1.reserve_block().await.expect("reserve"));
    let held: Vec<Slot> = (0..10)
        .map(|_| n1.slots().try_acquire().expect("reserved"))
        .collect();
    sleep(ttl + Duration::from_millis(300)).await;
    assert!(n2.reserve_block().await.expect("reserve"));
    assert!(n2.reserve_block().await.expect("reserve"));
    assert_eq!(n2.slots().limit(), 20);
    // Over-admission is bounded by n1's reservation (10), and n1 admits nothing new.
    n1.tick().await.expect("tick");
    assert_eq!(n1.slots().limit(), 0);
    assert!(n1.slots().try_acquire().is_none());
    assert_eq!(n1.slots().live() + n2.slots().limit(), 20 + 10);
    // Once n2 gives surplus back, n1 covers its live connections again.
    n2.tick().await.expect("tick");
    assert_eq!(n2.slots().limit(), 10);
    n1.tick().await.expect("tick");
    assert_eq!(n1.slots().limit(), 10);
    let stored: usize = stored_reservations(&server).iter().map(|(_, r)| r).sum();
    assert_eq!(stored, 20);
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// Presence

fn presence(pools: Vec<Pool>, node: &str, ttl: Duration) -> Arc<Presence> {
    Arc::new(Presence::new(
        pools,
        PresenceConfig {
            node_id: node.to_string(),
            ttl,
        },
    ))
}

fn entry(node: &str, connection_id: u64, user: Option<&str>) -> PresenceEntry {
    PresenceEntry {
        connection_id,
        node: node.to_string(),
        client_id: format!("client-{node}-{connection_id}"),
        user_id: user.map(str::to_string),
    }
}

#[tokio::test]
async fn heartbeats_make_the_node_registry() {
    let server = RedisServer::start();
    let p1 = presence(vec![pool(&server)], "n1", Duration::from_secs(10));
    let p2 = presence(vec![pool(&server)], "n2", Duration::from_secs(10));
    p1.heartbeat(3, 2).await.expect("heartbeat");
    p2.heartbeat(7, 5).await.expect("heartbeat");
    let nodes = p1.nodes().await.expect("nodes");
    let summary: Vec<(&str, usize, usize)> = nodes
        .iter()
        .map(|n| (n.id.as_str(), n.connections, n.users))
        .collect();
    assert_eq!(summary, vec![("n1", 3, 2), ("n2", 7, 5)]);
    let started = nodes[0].started_at_ms;
    assert!(started > 0 && nodes[0].heartbeat_at_ms >= started);

    // A later heartbeat updates the counts and keeps startedAt.
    sleep(Duration::from_millis(20)).await;
    p1.heartbeat(4, 2).await.expect("heartbeat");
    let n1 = p2.nodes().await.expect("nodes").remove(0);
    assert_eq!((n1.connections, n1.started_at_ms), (4, started));
    assert!(n1.heartbeat_at_ms > started);
    let json = serde_json::to_value(&n1).expect("serializes");
    assert_eq!(json["startedAt"], serde_json::json!(started));
    assert_eq!(json["connections"], serde_json::json!(4));

    p2.deregister().await.expect("deregister");
    let ids: Vec<String> = p1
        .nodes()
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["n1".to_string()]);
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_disappears_with_its_presence() {
    let ttl = Duration::from_secs(1);
    let server = RedisServer::start();
    let p1 = presence(vec![pool(&server)], "n1", ttl);
    let p2 = presence(vec![pool(&server)], "n2", ttl);
    let _beat = p1.spawn_heartbeat(|| (1, 1));
    p2.heartbeat(1, 2).await.expect("heartbeat");
    // n2 keeps beating until it is dropped below: the steps up to there may take longer than
    // one ttl on a loaded runner.
    let _beat2 = p2.spawn_heartbeat(|| (1, 2));

    p1.user_online("alice").await.expect("online");
    p1.user_online("bob").await.expect("online");
    p2.user_online("bob").await.expect("online");
    p2.user_online("carol").await.expect("online");
    assert_eq!(
        p1.online_users().await.expect("users"),
        ["alice", "bob", "carol"]
    );

    // Same connection id on two nodes: two entries.
    p1.topic_join("chat", &entry("n1", 1, Some("alice")))
        .await
        .expect("join");
    p1.topic_join("chat", &entry("n1", 2, Some("bob")))
        .await
        .expect("join");
    p2.topic_join("chat", &entry("n2", 1, Some("carol")))
        .await
        .expect("join");
    let members = p1.topic_presence("chat").await.expect("presence");
    let ids: Vec<(&str, u64)> = members
        .iter()
        .map(|e| (e.node.as_str(), e.connection_id))
        .collect();
    assert_eq!(ids, vec![("n1", 1), ("n1", 2), ("n2", 1)]);
    assert_eq!(members[2], entry("n2", 1, Some("carol")));

    p1.topic_leave("chat", 2).await.expect("leave");
    p1.user_offline("bob").await.expect("offline");
    let ids: Vec<u64> = p2
        .topic_presence("chat")
        .await
        .expect("presence")
        .iter()
        .map(|e| e.connection_id)
        .collect();
    assert_eq!(ids, vec![1, 1]);
    assert_eq!(
        p2.online_users().await.expect("users"),
        ["alice", "bob", "carol"],
        "bob is still on n2"
    );

    // n2 dies (no deregister): after the ttl it is gone, with its users and topic entries.
    drop(p2);
    wait_until("n2 leaves the registry", || {
        let p1 = Arc::clone(&p1);
        async move {
            let nodes = p1.nodes().await.expect("nodes");
            nodes.len() == 1 && nodes[0].id == "n1"
        }
    })
    .await;
    assert_eq!(
        server.cli(&["HEXISTS", NODES_KEY, "n2"]),
        "0",
        "stale field removed"
    );
    assert_eq!(p1.online_users().await.expect("users"), ["alice"]);
    let members = p1.topic_presence("chat").await.expect("presence");
    assert_eq!(members, vec![entry("n1", 1, Some("alice"))]);
    assert_eq!(
        server.cli(&["HLEN", &topic_presence_key("chat")]),
        "1",
        "the dead node's entries are removed"
    );
    // n1 keeps living past several ttls thanks to its heartbeat task.
    sleep(ttl * 2).await;
    assert_eq!(p1.nodes().await.expect("nodes").len(), 1);

    p1.deregister().await.expect("deregister");
    assert!(p1.nodes().await.expect("nodes").is_empty());
    assert_eq!(server.cli(&["EXISTS", &node_users_key("n1")]), "0");
    assert_eq!(server.cli(&["EXISTS", &topic_presence_key("chat")]), "0");
}

#[tokio::test]
async fn presence_is_rewritten_after_redis_loses_it() {
    let mut server = RedisServer::start();
    let p1 = presence(vec![pool(&server)], "n1", Duration::from_secs(10));
    p1.heartbeat(2, 1).await.expect("heartbeat");
    p1.user_online("alice").await.expect("online");
    p1.topic_join("chat", &entry("n1", 1, Some("alice")))
        .await
        .expect("join");
    p1.topic_join("chat", &entry("n1", 2, None))
        .await
        .expect("join");

    server.kill();
    assert!(p1.heartbeat(2, 1).await.is_err());
    // Changes while Redis is away are kept locally.
    assert!(p1.topic_leave("chat", 2).await.is_err());
    assert!(
        matches!(p1.user_online("bob").await, Err(PresenceError::Deferred)),
        "after a failed write, changes wait for the resync instead of Redis"
    );

    server.restart();
    assert_eq!(
        server.cli(&["EXISTS", NODES_KEY]),
        "0",
        "Redis came back empty"
    );
    wait_until("the heartbeat reaches Redis again", || {
        let p1 = Arc::clone(&p1);
        async move { p1.heartbeat(2, 2).await.is_ok() }
    })
    .await;
    assert_eq!(p1.online_users().await.expect("users"), ["alice", "bob"]);
    assert_eq!(
        p1.topic_presence("chat").await.expect("presence"),
        vec![entry("n1", 1, Some("alice"))]
    );
}

#[tokio::test]
async fn topic_presence_lives_on_the_topics_shard() {
    let shards = [RedisServer::start(), RedisServer::start()];
    let pools = || shards.iter().map(pool).collect::<Vec<_>>();
    let p1 = presence(pools(), "n1", Duration::from_secs(10));
    let p2 = presence(pools(), "n2", Duration::from_secs(10));
    p1.heartbeat(1, 0).await.expect("heartbeat");
    p2.heartbeat(1, 0).await.expect("heartbeat");
    // Two topics that land on different shards.
    let topics: Vec<String> = (0..100).map(|i| format!("topic-{i}")).collect();
    let on0 = topics
        .iter()
        .find(|t| shard_of(t, 2) == 0)
        .expect("a topic on shard 0");
    let on1 = topics
        .iter()
        .find(|t| shard_of(t, 2) == 1)
        .expect("a topic on shard 1");
    p1.topic_join(on0, &entry("n1", 1, None))
        .await
        .expect("join");
    p2.topic_join(on1, &entry("n2", 1, None))
        .await
        .expect("join");
    assert_eq!(shards[0].cli(&["HLEN", &topic_presence_key(on0)]), "1");
    assert_eq!(shards[1].cli(&["HLEN", &topic_presence_key(on0)]), "0");
    assert_eq!(shards[1].cli(&["HLEN", &topic_presence_key(on1)]), "1");
    assert_eq!(
        shards[1].cli(&["EXISTS", NODES_KEY]),
        "0",
        "the registry is on shard 0"
    );
    assert_eq!(
        p1.topic_presence(on1).await.expect("presence"),
        vec![entry("n2", 1, None)]
    );
}
