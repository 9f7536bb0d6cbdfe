//! `GET /api/history/{topic}`: the newest publications, or those after `since` (with `epoch`),
//! at most `limit`; each exactly as subscribers receive it; `complete` says whether that is
//! everything since then. Refusals in the API's JSON error shape. The in-process broker, and
//! two nodes on a real `redis-server` (publish on one, read on the other).

mod common;
use common::cluster::*;
use common::redis::RedisServer;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use wsgate::config::{HistorySettings, NamespaceSettings, Settings};

/// Publishes `n` messages `{"n": 1..=n}` of type `tick` to `topic` through `addr`; returns
/// the epoch they share.
async fn publish_n(addr: SocketAddr, topic: &str, n: u64) -> String {
    let mut epoch = None;
    for i in 1..=n {
        let body = http_publish(addr, topic, "tick", json!({"n": i})).await;
        let e = body["epoch"].as_str().expect("epoch").to_string();
        assert_eq!(
            *epoch.get_or_insert_with(|| e.clone()),
            e,
            "one epoch: {body}"
        );
    }
    epoch.expect("n > 0")
}

/// `GET path` on `addr`; asserts 200 and returns the body.
async fn history(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = get(addr, path).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// The `seq`s of a history answer's publications.
fn seqs(body: &Value) -> Vec<u64> {
    body["publications"]
        .as_array()
        .unwrap_or_else(|| panic!("publications is a list: {body}"))
        .iter()
        .map(|p| p["seq"].as_u64().unwrap_or_else(|| panic!("no seq in {p}")))
        .collect()
}

/// Asserts an API error: `status` and `error.code`.
fn assert_refused(resp: &(u16, Value), status: u16, code: &str) {
    let (got, body) = resp;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error says why: {body}"
    );
}

/// Namespace `ns` with the given history bounds.
fn with_history(s: &mut Settings, ns: &str, size: usize, ttl: Duration) {
    s.namespaces.insert(
        ns.into(),
        NamespaceSettings {
            history: HistorySettings { size, ttl },
            ..NamespaceSettings::default()
        },
    );
}

#[tokio::test]
async fn newest_after_since_and_limit() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let epoch = publish_n(addr, "news", 5).await;

    // Without `since`: everything kept (up to the default limit of 100), oldest first.
    let body = history(addr, "/api/history/news").await;
    assert_eq!(body["topic"], "news", "{body}");
    assert_eq!(
        body["position"],
        json!({"seq": 5, "epoch": epoch}),
        "{body}"
    );
    assert_eq!(body["complete"], true, "{body}");
    assert_eq!(seqs(&body), vec![1, 2, 3, 4, 5]);
    let first = &body["publications"][0];
    assert_eq!(first["type"], "tick", "{first}");
    assert_eq!(first["topic"], "news", "{first}");
    assert_eq!(first["id"], format!("{epoch}:1"), "{first}");
    assert_eq!(first["epoch"], epoch.as_str(), "{first}");
    assert_eq!(first["data"], json!({"n": 1}), "{first}");
    assert!(first["timestamp"].is_string(), "{first}");

    // After a position: what came later, complete.
    let body = history(addr, &format!("/api/history/news?since=2&epoch={epoch}")).await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![3, 4, 5], &json!(true))
    );
    let body = history(addr, &format!("/api/history/news?since=5&epoch={epoch}")).await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(true)));
    assert_eq!(body["position"]["seq"], 5, "{body}");

    // `limit` without `since`: the newest ones.
    let body = history(addr, "/api/history/news?limit=2").await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![4, 5], &json!(true)));
    // `limit` 0: the position only.
    let body = history(addr, "/api/history/news?limit=0").await;
    assert_eq!(seqs(&body), Vec::<u64>::new());
    assert_eq!(
        body["position"],
        json!({"seq": 5, "epoch": epoch}),
        "{body}"
    );
    // `limit` below what is missing after `since`: the oldest of them, not complete.
    let body = history(
        addr,
        &format!("/api/history/news?since=1&epoch={epoch}&limit=2"),
    )
    .await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![2, 3], &json!(false))
    );
}

#[tokio::test]
async fn publications_are_what_subscribers_received() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut client, _) = connect(addr, "/ws?user_id=u1").await;
    subscribe(&mut client, &["prices"]).await;
    http_publish(
        addr,
        "prices",
        "quote",
        json!({"sym": "ACME", "px": [1.5, 2]}),
    )
    .await;
    http_publish(
        addr,
        "prices",
        "quote",
        json!({"sym": "INIT", "nested": {"z": 1, "a": 2}}),
    )
    .await;
    let live = vec![client.recv_json().await, client.recv_json().await];
    let body = history(addr, "/api/history/prices").await;
    assert_eq!(
        body["publications"],
        json!(live),
        "history shows what the socket showed"
    );
}

#[tokio::test]
async fn wrong_epoch_and_unknown_topic() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let epoch = publish_n(addr, "alerts", 3).await;

    // Another epoch: the numbers do not compare; nothing is replayed.
    let body = history(addr, "/api/history/alerts?since=1&epoch=not-it").await;
    assert_eq!(body["complete"], false, "{body}");
    assert_eq!(seqs(&body), Vec::<u64>::new());
    assert_eq!(
        body["position"],
        json!({"seq": 3, "epoch": epoch}),
        "{body}"
    );

    // A topic nothing was published to: no position; complete only from the start.
    let body = history(addr, "/api/history/quiet").await;
    assert_eq!(body["position"], Value::Null, "{body}");
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(true)));
    let body = history(addr, "/api/history/quiet?since=0&epoch=any").await;
    assert_eq!(body["complete"], true, "{body}");
    let body = history(addr, "/api/history/quiet?since=4&epoch=any").await;
    assert_eq!(body["complete"], false, "{body}");
}

#[tokio::test]
async fn topic_names_with_slashes_colons_and_escapes() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let topic = "chat:room/1@eu";
    publish_n(addr, topic, 2).await;
    for path in [
        "/api/history/chat:room/1@eu",
        "/api/history/chat%3Aroom%2F1%40eu",
        "/api/history/chat%3aroom/1%40eu",
    ] {
        let body = history(addr, path).await;
        assert_eq!(body["topic"], topic, "{path}: {body}");
        assert_eq!(seqs(&body), vec![1, 2], "{path}");
    }
}

#[tokio::test]
async fn refusals() {
    let node = start_node(|s| with_history(s, "live", 0, Duration::from_secs(60))).await;
    let addr = node.local_addr;
    publish_n(addr, "news", 1).await;

    for path in [
        "/api/history/bad%20topic",
        "/api/history/bad+topic",
        "/api/history/",
        "/api/history/news%2",
        "/api/history/%FF",
    ] {
        assert_refused(&get(addr, path).await, 400, "INVALID_TOPIC");
    }
    let long = format!("/api/history/{}", "a".repeat(129));
    assert_refused(&get(addr, &long).await, 400, "INVALID_TOPIC");

    for path in [
        "/api/history/news?since=1",
        "/api/history/news?epoch=e",
        "/api/history/news?since=x&epoch=e",
        "/api/history/news?since=-1&epoch=e",
        "/api/history/news?limit=many",
        "/api/history/news?limit=-1",
        "/api/history/news?limit=10001",
    ] {
        assert_refused(&get(addr, path).await, 400, "INVALID_MESSAGE_FORMAT");
    }
    assert_eq!(
        get(addr, "/api/history/news?limit=10000").await.0,
        200,
        "10000 is allowed"
    );

    // History off for the namespace (size 0): not an empty answer but a refusal.
    publish_n(addr, "live:feed", 2).await;
    assert_refused(
        &get(addr, "/api/history/live:feed").await,
        400,
        "INVALID_OPERATION",
    );

    // Only GET.
    for method in ["POST", "PUT", "DELETE"] {
        let resp = http(addr, method, "/api/history/news", None, &[]).await;
        assert_refused(&resp, 405, "METHOD_NOT_ALLOWED");
    }
    // `/api/history` itself names no topic: not a route.
    assert_refused(&get(addr, "/api/history").await, 404, "NOT_FOUND");
}

#[tokio::test]
async fn behind_the_api_key() {
    let node = start_node(|s| s.api_keys = vec!["k1".into()]).await;
    let addr = node.local_addr;
    assert_refused(&get(addr, "/api/history/news").await, 401, "UNAUTHORIZED");
    let resp = http(
        addr,
        "GET",
        "/api/history/news",
        None,
        &[("X-API-Key", "k1")],
    )
    .await;
    assert_eq!(resp.0, 200, "{}", resp.1);
}

#[tokio::test]
async fn bounded_by_the_namespace_size() {
    let node = start_node(|s| with_history(s, "short", 5, Duration::from_secs(60))).await;
    let addr = node.local_addr;
    let epoch = publish_n(addr, "short:t", 8).await;

    // Only the newest 5 are kept.
    let body = history(addr, "/api/history/short:t").await;
    assert_eq!(seqs(&body), vec![4, 5, 6, 7, 8]);
    assert_eq!(body["position"]["seq"], 8, "{body}");
    // After 3: 4..=8 are all there.
    let body = history(addr, &format!("/api/history/short:t?since=3&epoch={epoch}")).await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![4, 5, 6, 7, 8], &json!(true))
    );
    // After 2: 3 was trimmed; nothing is returned rather than a list with a hole.
    let body = history(addr, &format!("/api/history/short:t?since=2&epoch={epoch}")).await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(false)));
    // The default namespace keeps its 100.
    publish_n(addr, "other", 8).await;
    assert_eq!(seqs(&history(addr, "/api/history/other").await).len(), 8);
}

/// The history ttl of the `brief` namespace: long enough that the check before it expires
/// (two publishes and a read) is done in time on a loaded runner.
const BRIEF_TTL: Duration = Duration::from_secs(2);

#[tokio::test]
async fn bounded_by_age() {
    let node = start_node(|s| with_history(s, "brief", 10, BRIEF_TTL)).await;
    let addr = node.local_addr;
    let epoch = publish_n(addr, "brief:t", 2).await;
    assert_eq!(
        seqs(&history(addr, "/api/history/brief:t").await),
        vec![1, 2]
    );
    tokio::time::sleep(BRIEF_TTL + Duration::from_millis(500)).await;
    let body = history(addr, &format!("/api/history/brief:t?since=0&epoch={epoch}")).await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(false)));
}

/// Redis trims old entries only when the topic is published to again; a read of a quiet topic
/// must still leave out what is older than the namespace's ttl.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bounded_by_age_on_a_quiet_topic() {
    let redis = RedisServer::start();
    let brief = |s: &mut Settings| with_history(s, "brief", 10, BRIEF_TTL);
    let a = cluster_node_with(&[redis.url()], "a", brief).await;
    wait_ready(a.local_addr).await;
    let epoch = publish_n(a.local_addr, "brief:t", 2).await;
    assert_eq!(
        seqs(&history(a.local_addr, "/api/history/brief:t").await),
        vec![1, 2]
    );
    tokio::time::sleep(BRIEF_TTL + Duration::from_millis(500)).await;
    let body = history(
        a.local_addr,
        &format!("/api/history/brief:t?since=0&epoch={epoch}"),
    )
    .await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![], &json!(false)),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_publish_on_a_read_on_b() {
    let redis = RedisServer::start();
    let urls = vec![redis.url()];
    let short = |s: &mut Settings| with_history(s, "short", 5, Duration::from_secs(60));
    let a = cluster_node_with(&urls, "a", short).await;
    let b = cluster_node_with(&urls, "b", short).await;
    wait_ready(a.local_addr).await;
    wait_ready(b.local_addr).await;

    let epoch = publish_n(a.local_addr, "routes/eu", 5).await;
    let body = history(b.local_addr, "/api/history/routes%2Feu").await;
    assert_eq!(body["topic"], "routes/eu", "{body}");
    assert_eq!(
        body["position"],
        json!({"seq": 5, "epoch": epoch}),
        "{body}"
    );
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![1, 2, 3, 4, 5], &json!(true))
    );
    let first = &body["publications"][0];
    assert_eq!(first["id"], format!("{epoch}:1"), "{first}");
    assert_eq!(first["type"], "tick", "{first}");
    assert_eq!(first["data"], json!({"n": 1}), "{first}");

    let since =
        |n: u64, extra: &str| format!("/api/history/routes%2Feu?since={n}&epoch={epoch}{extra}");
    let body = history(b.local_addr, &since(3, "")).await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![4, 5], &json!(true)));
    let body = history(b.local_addr, &since(5, "")).await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(true)));
    let body = history(b.local_addr, "/api/history/routes%2Feu?limit=2").await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![4, 5], &json!(true)));
    let body = history(b.local_addr, "/api/history/routes%2Feu?since=1&epoch=other").await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(false)));

    // The namespace bound holds in Redis too.
    publish_n(a.local_addr, "short:t", 8).await;
    let body = history(b.local_addr, "/api/history/short:t").await;
    assert_eq!(seqs(&body), vec![4, 5, 6, 7, 8]);
    let epoch = body["position"]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    let body = history(
        b.local_addr,
        &format!("/api/history/short:t?since=2&epoch={epoch}"),
    )
    .await;
    assert_eq!((seqs(&body), &body["complete"]), (vec![], &json!(false)));
    let body = history(
        b.local_addr,
        &format!("/api/history/short:t?since=3&epoch={epoch}"),
    )
    .await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![4, 5, 6, 7, 8], &json!(true))
    );
}

/// `since` with a `limit` below what is missing pages forward from `since` (as the in-process
/// broker does), so a backend can read a long gap in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_since_with_a_small_limit_pages_from_since() {
    let redis = RedisServer::start();
    let a = cluster_node(&[redis.url()], "a").await;
    wait_ready(a.local_addr).await;
    let epoch = publish_n(a.local_addr, "news", 5).await;
    let body = history(
        a.local_addr,
        &format!("/api/history/news?since=1&epoch={epoch}&limit=2"),
    )
    .await;
    assert_eq!(
        (seqs(&body), &body["complete"]),
        (vec![2, 3], &json!(false))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503() {
    let mut redis = RedisServer::start();
    let urls = vec![redis.url()];
    let a = cluster_node(&urls, "a").await;
    wait_ready(a.local_addr).await;
    publish_n(a.local_addr, "news", 1).await;
    redis.kill();
    let resp = get(a.local_addr, "/api/history/news").await;
    assert_refused(&resp, 503, "UNAVAILABLE");
}
