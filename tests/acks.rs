//! Acknowledged delivery over real sockets: a publication sent with `requireAck` is sent again
//! (the same frame, so the same `id`) every `ack_timeout` until the client answers `ack` with
//! its id, at most `ack_retries` times; an acknowledged one, and one without `requireAck`, is
//! never sent again.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use wsgate::config::{FileConfig, NamespaceSettings, Settings};
use wsgate::node::RunningNode;

/// The `ack_timeout` of every test node: short, so re-sends come quickly, yet long enough that a
/// client which acknowledges (after a few more HTTP publishes) surely does so in time on a loaded
/// 2-core runner.
const ACK_TIMEOUT: Duration = Duration::from_secs(1);
/// The `ack_retries` of every test node.
const RETRIES: usize = 2;
/// Long enough for any re-send still to come to have come: several timeouts.
const SETTLE: Duration = Duration::from_millis(2500);

macro_rules! ack_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() $body
    };
}

async fn ack_node(tweak: impl FnOnce(&mut Settings)) -> RunningNode {
    start_node(|s| {
        s.ws.ack_timeout = ACK_TIMEOUT;
        s.ws.ack_retries = RETRIES as u32;
        tweak(s);
    })
    .await
}

/// Publishes through the HTTP API; returns the API's answer.
async fn publish(addr: SocketAddr, topic: &str, kind: &str, require_ack: bool) -> Value {
    let mut body = json!({"topic": topic, "type": kind, "data": {"n": kind}});
    if require_ack {
        body["requireAck"] = Value::Bool(true);
    }
    let (status, answer) = post(addr, "/api/publish", body).await;
    assert_eq!(status, 200, "publish refused: {answer}");
    answer
}

async fn subscribe(c: &mut Client, topic: &str) {
    let ack = c
        .request(json!({"type": "subscribe", "id": "s", "data": {"topics": [topic]}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// Every text message that arrives within `window`.
async fn collect_for(c: &mut Client, window: Duration) -> Vec<Value> {
    let deadline = Instant::now() + window;
    let mut seen = Vec::new();
    while let Ok(next) = tokio::time::timeout_at(deadline, c.ws.next()).await {
        match next {
            Some(Ok(Message::Text(t))) => {
                seen.push(serde_json::from_str(t.as_str()).expect("server sends JSON"))
            }
            Some(Ok(_)) => continue,
            other => panic!("connection ended while collecting: {other:?}; seen {seen:?}"),
        }
    }
    seen
}

/// Asserts that nothing at all arrives within `window`.
async fn expect_silence_for(c: &mut Client, window: Duration) {
    let seen = collect_for(c, window).await;
    assert!(seen.is_empty(), "expected silence, got {seen:?}");
}

ack_test! {
    /// Not acknowledged: received `1 + ack_retries` times, the very same message each time (same
    /// `id`, same `timestamp`), about `ack_timeout` apart, then never again; the node counts the
    /// re-sends and the give-up and keeps nothing for the connection.
    async fn an_unacknowledged_publication_is_resent_then_given_up() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let (status, before) = http_raw(addr, "GET", "/metrics", b"", &[]).await;
        assert_eq!(status, 200);
        let before = String::from_utf8(before).expect("text");
        let (mut c, hello) = connect(addr, "/ws").await;
        let conn_id = hello["data"]["connectionId"].as_u64().expect("connection id");
        subscribe(&mut c, "acks.a").await;

        // Before the publish: the server's first send, and so every re-send's schedule, starts
        // after this.
        let published_at = Instant::now();
        let receipt = publish(addr, "acks.a", "order", true).await;
        let first = c.recv_json().await;
        assert_eq!(first["type"], "order", "{first}");
        assert_eq!(first["requireAck"], true, "{first}");
        let expected_id = format!(
            "{}:{}",
            receipt["epoch"].as_str().expect("epoch"),
            receipt["seq"]
        );
        assert_eq!(first["id"], expected_id.as_str(), "{first}");
        assert_eq!(
            node.context().hub.acks().pending_for(conn_id),
            1,
            "recorded as pending"
        );

        // Re-send n goes out at least n timeouts after the first send (each waits a whole
        // timeout after the one before). Measured from before the publish, so a late read on
        // this side can only make the figure larger, never fail a correct server.
        for n in 1..=RETRIES as u32 {
            let again = c.recv_json().await;
            assert_eq!(again, first, "a re-send is the same message");
            let after = published_at.elapsed();
            assert!(
                after >= ACK_TIMEOUT * n,
                "re-send {n} after {after:?}, before {n} timeouts of {ACK_TIMEOUT:?}"
            );
        }
        // Given up after the last re-send's own timeout: nothing more, ever.
        expect_silence_for(&mut c, SETTLE).await;
        assert_eq!(node.context().hub.acks().pending_for(conn_id), 0);
        assert_eq!(node.context().hub.acks().pending_total(), 0);

        let (_, after) = http_raw(addr, "GET", "/metrics", b"", &[]).await;
        let after = String::from_utf8(after).expect("text");
        let resends = |text: &str| sample(text, "wsgate_ack_resends_total", "");
        assert!(
            resends(&after) >= resends(&before) + RETRIES as f64,
            "{after}"
        );
        let given_up = |text: &str| sample(text, "wsgate_ack_given_up_total", "reason=\"retries\"");
        assert!(given_up(&after) >= given_up(&before) + 1.0, "{after}");

        // The connection is still usable and owes nothing.
        let pong = c.request(json!({"type": "ping", "id": "p"})).await;
        assert_eq!(pong["type"], "pong");
    }
}

/// The value of the first sample of `metric` whose line contains `label`; 0 when absent.
fn sample(exposition: &str, metric: &str, label: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(metric) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

ack_test! {
    /// Two subscribers get the same `requireAck` publication: the one that acknowledges it right
    /// away never sees it again (and gets no reply to its ack); the other gets it again.
    async fn an_acknowledged_publication_is_not_resent() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut acking, hello) = connect(addr, "/ws").await;
        let acking_id = hello["data"]["connectionId"].as_u64().expect("connection id");
        let (mut silent, _) = connect(addr, "/ws").await;
        subscribe(&mut acking, "acks.b").await;
        subscribe(&mut silent, "acks.b").await;

        publish(addr, "acks.b", "order", true).await;
        let got = acking.recv_json().await;
        assert_eq!(got["requireAck"], true, "{got}");
        acking
            .send_json(json!({"type": "ack", "data": {"id": got["id"]}}))
            .await;
        let first = silent.recv_json().await;
        assert_eq!(first["id"], got["id"], "every recipient sees the same id");

        // The control: unacknowledged, it comes back.
        let again = silent.recv_json().await;
        assert_eq!(again, first);
        // Acknowledged: never again, and no reply to the ack either.
        expect_silence_for(&mut acking, SETTLE).await;
        assert_eq!(node.context().hub.acks().pending_for(acking_id), 0);
    }
}

ack_test! {
    /// `data.messageId` and the list `data.ids` acknowledge too; acks for ids the connection
    /// does not owe (unknown, already acknowledged) are ignored without a reply; an ack that
    /// names no id is an `INVALID_MESSAGE_FORMAT` error.
    async fn every_ack_form_is_understood() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        subscribe(&mut c, "acks.forms").await;
        let mut firsts = Vec::new();
        for kind in ["m1", "m2", "m3", "m4"] {
            publish(addr, "acks.forms", kind, true).await;
            firsts.push(c.expect_type(kind).await);
        }
        let ids: Vec<Value> = firsts.iter().map(|m| m["id"].clone()).collect();
        c.send_json(json!({"type": "ack", "data": {"messageId": ids[0]}}))
            .await;
        c.send_json(json!({"type": "ack", "id": "a2", "data": {"ids": [ids[1], ids[2], "nope:1"]}}))
            .await;
        c.send_json(json!({"type": "ack", "data": {"id": ids[0]}})).await;
        c.send_json(json!({"type": "ack", "data": {"id": "unknown:7"}}))
            .await;
        let refused = c.request(json!({"type": "ack", "id": "bad", "data": {}})).await;
        assert_eq!(refused["type"], "error", "{refused}");
        assert_eq!(refused["data"]["code"], "INVALID_MESSAGE_FORMAT", "{refused}");

        // Only m4, never acknowledged, comes back: once per retry, then never again.
        for _ in 0..RETRIES {
            let again = c.recv_json().await;
            assert_eq!(again, firsts[3], "only m4 may come back");
        }
        expect_silence_for(&mut c, SETTLE).await;
    }
}

ack_test! {
    /// A publication without `requireAck` goes out once; a `requireAck` one beside it on the
    /// same topic is re-sent, which shows the sweep ran.
    async fn a_publication_without_require_ack_is_never_resent() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, hello) = connect(addr, "/ws").await;
        let conn_id = hello["data"]["connectionId"].as_u64().expect("connection id");
        subscribe(&mut c, "acks.c").await;

        publish(addr, "acks.c", "plain", false).await;
        let plain = c.expect_type("plain").await;
        assert!(plain.get("requireAck").is_none(), "{plain}");
        assert_eq!(node.context().hub.acks().pending_for(conn_id), 0);
        publish(addr, "acks.c", "acked", true).await;
        let control = c.expect_type("acked").await;

        // The control comes back once per retry; the plain one never.
        for _ in 0..RETRIES {
            let again = c.recv_json().await;
            assert_eq!(again, control, "only the requireAck publication may come back");
        }
        expect_silence_for(&mut c, SETTLE).await;
    }
}

ack_test! {
    /// A client `publish` whose `data` carries `requireAck: true` is delivered the same way: the
    /// subscriber gets it again until it acknowledges, then never again.
    async fn a_client_publication_with_require_ack_is_resent_until_acknowledged() {
        let node = ack_node(|s| {
            s.namespaces
                .insert("chat".into(), NamespaceSettings::open_publish());
        })
        .await;
        let addr = node.local_addr;
        let (mut publisher, _) = connect(addr, "/ws").await;
        let (mut subscriber, _) = connect(addr, "/ws").await;
        subscribe(&mut subscriber, "chat:room").await;

        let ack = publisher
            .request(json!({"type": "publish", "id": "p1", "data": {
                "topic": "chat:room", "type": "chat", "data": {"text": "hi"}, "requireAck": true}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let first = subscriber.expect_type("chat").await;
        assert_eq!(first["requireAck"], true, "{first}");
        let again = subscriber.recv_json().await;
        assert_eq!(again, first, "re-sent, same id");
        subscriber
            .send_json(json!({"type": "ack", "data": {"id": first["id"]}}))
            .await;
        expect_silence_for(&mut subscriber, SETTLE).await;
    }
}

ack_test! {
    /// A `requireAck` publication replayed by a recovering `subscribe` (`since`) is tracked like
    /// a live one.
    async fn a_recovered_publication_with_require_ack_is_resent() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let receipt = publish(addr, "acks.recovery", "missed", true).await;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "s", "data": {
                "topic": "acks.recovery", "since": {"seq": 0, "epoch": receipt["epoch"]}}}))
            .await;
        assert_eq!(ack["data"]["recovered"], true, "{ack}");
        let replayed = c.expect_type("missed").await;
        assert_eq!(replayed["requireAck"], true, "{replayed}");
        let again = c.recv_json().await;
        assert_eq!(again, replayed, "re-sent, same id");
    }
}

ack_test! {
    /// Pending entries go away with the connection.
    async fn a_closed_connection_owes_nothing() {
        let node = ack_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, hello) = connect(addr, "/ws").await;
        let conn_id = hello["data"]["connectionId"].as_u64().expect("connection id");
        subscribe(&mut c, "acks.gone").await;
        publish(addr, "acks.gone", "order", true).await;
        c.expect_type("order").await;
        assert_eq!(node.context().hub.acks().pending_for(conn_id), 1);
        c.close().await;
        // The hub drops the connection first and its pending entries just after, on the
        // session's task: wait for both.
        let hub = &node.context().hub;
        let deadline = Instant::now() + WAIT;
        while (hub.has_connection(conn_id) || hub.acks().pending_for(conn_id) > 0)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!hub.has_connection(conn_id));
        assert_eq!(hub.acks().pending_for(conn_id), 0);
    }
}

/// `websocket.ack_timeout` and `websocket.ack_retries` in the config file, their defaults, and
/// the timeout's validation.
#[test]
fn ack_settings_from_the_config_file() {
    let defaults = Settings::default();
    assert_eq!(defaults.ws.ack_timeout, Duration::from_secs(5));
    assert_eq!(defaults.ws.ack_retries, 3);

    let mut s = Settings::default();
    FileConfig::parse("websocket:\n  ack_timeout: 750ms\n  ack_retries: 0\n")
        .expect("parses")
        .apply_to(&mut s)
        .expect("applies");
    assert_eq!(s.ws.ack_timeout, Duration::from_millis(750));
    assert_eq!(s.ws.ack_retries, 0);
    assert!(s.validate().is_empty(), "{:?}", s.validate());

    let mut s = Settings::default();
    FileConfig::parse("websocket:\n  ack_timeout: 0s\n")
        .expect("parses")
        .apply_to(&mut s)
        .expect("applies");
    let problems = s.validate();
    assert!(
        problems.iter().any(|p| p.path == "websocket.ack_timeout"),
        "{problems:?}"
    );
    assert!(FileConfig::parse("websocket:\n  ack_timeout: 5\n").is_err());
}
