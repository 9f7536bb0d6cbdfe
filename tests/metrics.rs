//! `GET /metrics`: the Prometheus exposition says what the node did and how its broker is.
//!
//! Counters are process-wide (see `src/metrics.rs`), and the tests of one file run in parallel
//! threads of one process: [`counters_move_by_exactly_what_the_traffic_did`] is the only test in
//! this file that opens WebSocket connections or publishes, so it can check exact deltas; the
//! Redis test next to it moves only Redis figures and `node`-labelled gauges.

mod common;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::cluster::{cluster_node, eventually_some, readyz};
use common::redis::RedisServer;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::broker::TopicMessage;
use wsgate::config::NamespaceSettings;
use wsgate::ws::deflate::{compress, inflate};

/// The value of the first sample of `metric` whose labels contain `label` (e.g. `node="a"`).
fn sample(exposition: &str, metric: &str, label: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && l.contains(label)
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_raw(addr, "GET", "/metrics", b"", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8(body).expect("text exposition")
}

/// Scrapes until the sample of `metric` with `label` equals `value`; returns that exposition.
async fn until_sample(addr: SocketAddr, metric: &str, label: &str, value: f64) -> String {
    eventually_some(&format!("{metric}{{{label}}} = {value}"), || async {
        let text = scrape(addr).await;
        match sample(&text, metric, label) {
            Some(v) if v == value => Ok(text),
            _ => Err(text),
        }
    })
    .await
}

/// Every sample of the exposition: `name{labels}` -> value (0 when absent, for deltas).
fn samples(exposition: &str) -> HashMap<String, f64> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// The mask of every frame the tallying client sends.
const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// Length of a server frame header for a payload of `len` bytes (server frames are unmasked).
fn header_len(len: usize) -> u64 {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// A raw WebSocket client that tallies every byte it puts on the wire and reads off it, and the
/// payload bytes of the messages both ways (inflated when compressed): what the gateway's byte
/// counters must add up to.
struct Tally {
    raw: RawWs,
    up_wire: u64,
    up_payload: u64,
    down_wire: u64,
    down_payload: u64,
    /// Every text message received, by kind: `publication` (it has a `topic`), `direct` (it
    /// has a `from`), else its `type`.
    down_types: HashMap<String, u64>,
    /// The code of the close frame received, if one came.
    close_code: Option<u16>,
}

impl Tally {
    async fn plain(addr: SocketAddr, path: &str) -> Tally {
        Tally::new(RawWs::connect(addr, path).await)
    }

    async fn deflate(addr: SocketAddr, path: &str) -> Tally {
        Tally::new(RawWs::connect_deflate(addr, path).await)
    }

    fn new(raw: RawWs) -> Tally {
        Tally {
            raw,
            up_wire: 0,
            up_payload: 0,
            down_wire: 0,
            down_payload: 0,
            down_types: HashMap::new(),
            close_code: None,
        }
    }

    /// Sends one frame of `opcode` with `wire_payload`; `message_len` is the message's length
    /// before compression (counted as payload) for a data frame, `None` for a control frame.
    async fn send(&mut self, opcode: u8, wire_payload: &[u8], message_len: Option<usize>) {
        let frame = raw_frame(true, opcode, wire_payload, Some(MASK));
        self.up_wire += frame.len() as u64;
        self.up_payload += message_len.unwrap_or(0) as u64;
        self.raw.send_raw(&frame).await;
    }

    async fn send_json(&mut self, v: Value) {
        let text = v.to_string();
        self.send(op::TEXT, text.as_bytes(), Some(text.len())).await;
    }

    /// Sends `v` compressed (permessage-deflate).
    async fn send_json_compressed(&mut self, v: Value) {
        let text = v.to_string();
        let compressed = compress(text.as_bytes(), 6);
        self.send(op::TEXT | op::RSV1, &compressed, Some(text.len()))
            .await;
    }

    async fn close(&mut self, code: u16) {
        self.send(op::CLOSE, &code.to_be_bytes(), None).await;
    }

    /// The next frame, tallied; `None` at the end of the stream.
    async fn frame(&mut self) -> Option<(u8, Option<Value>)> {
        let f = self.raw.read_frame().await?;
        self.down_wire += header_len(f.payload.len()) + f.payload.len() as u64;
        if f.opcode == op::CLOSE {
            self.close_code = f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
        }
        if f.opcode != op::TEXT {
            return Some((f.opcode, None));
        }
        let payload = if f.rsv1 {
            inflate(&f.payload, 1 << 24).expect("the server's frame inflates")
        } else {
            f.payload
        };
        self.down_payload += payload.len() as u64;
        let v: Value = serde_json::from_slice(&payload).expect("JSON");
        let kind = if v.get("topic").is_some() {
            "publication".to_string()
        } else if v.get("from").is_some() {
            "direct".to_string()
        } else {
            v["type"].as_str().unwrap_or_default().to_string()
        };
        *self.down_types.entry(kind).or_default() += 1;
        Some((op::TEXT, Some(v)))
    }

    /// The next text message.
    async fn next_message(&mut self) -> Value {
        loop {
            match self.frame().await {
                Some((_, Some(v))) => return v,
                Some(_) => continue,
                None => panic!("stream ended before a message"),
            }
        }
    }

    /// Reads until a message of `kind`; returns it.
    async fn expect(&mut self, kind: &str) -> Value {
        loop {
            match self.frame().await {
                Some((_, Some(v))) if v["type"] == kind => return v,
                Some(_) => continue,
                None => panic!("stream ended before a {kind} message"),
            }
        }
    }

    /// Reads everything up to the end of the stream; returns the close code, if a close came.
    async fn drain(&mut self) -> Option<u16> {
        while self.frame().await.is_some() {}
        self.close_code
    }
}

/// Sums of what a set of tallying clients saw.
#[derive(Default, Debug)]
struct Totals {
    up_wire: u64,
    up_payload: u64,
    down_wire: u64,
    down_payload: u64,
    down_types: HashMap<String, u64>,
}

impl Totals {
    fn add(&mut self, t: &Tally) {
        self.up_wire += t.up_wire;
        self.up_payload += t.up_payload;
        self.down_wire += t.down_wire;
        self.down_payload += t.down_payload;
        for (k, n) in &t.down_types {
            *self.down_types.entry(k.clone()).or_default() += n;
        }
    }
}

/// An upgrade request with a forbidden Origin, by hand (the test clients never send one).
async fn upgrade_status_with_origin(addr: SocketAddr, origin: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Origin: {origin}\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("answer in time")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_exactly_what_the_traffic_did() {
    let node = start_node(|s| {
        s.node_id = "metrics-exact".into();
        s.sys.interval = Duration::ZERO;
        s.ws.max_message_size = 4096;
        s.ws.send_queue_bytes = 4096;
        s.ws.heartbeat_interval = Duration::from_secs(60);
        s.ws.idle_timeout = Duration::from_secs(120);
        s.ws.peer_limits.max_connections_per_user = 1;
        s.ws.allowed_origins = vec!["https://ok.example".into()];
        s.namespaces
            .insert("m".into(), NamespaceSettings::open_publish());
    })
    .await;
    let addr = node.local_addr;
    let ctx = std::sync::Arc::clone(node.context());
    let before = samples(&scrape(addr).await);

    // A: a plain client that sends one message of nearly every type.
    let mut a = Tally::plain(addr, "/ws?user_id=alice&clientId=a").await;
    a.expect("connection").await;
    // B: bob, with permessage-deflate.
    let mut b = Tally::deflate(addr, "/ws?user_id=bob&clientId=b").await;
    b.expect("connection").await;
    for (t, id) in [(&mut a, "sa"), (&mut b, "sb")] {
        t.send_json(json!({"type": "subscribe", "id": id, "data": {"topics": ["m:news"]}}))
            .await;
        t.expect("ack").await;
    }
    a.send_json(json!({"type": "ping", "id": "p1"})).await;
    a.expect("pong").await;
    b.send_json_compressed(json!({"type": "ping", "id": "p2", "pad": "z".repeat(1000)}))
        .await;
    b.expect("pong").await;
    a.send(op::TEXT, b"not json", Some(8)).await;
    a.expect("error").await;
    a.send(op::BINARY, b"\x00\x01\x02", Some(3)).await;
    a.expect("error").await;
    a.send_json(json!({"type": "config_get", "id": "u1"})).await;
    a.expect("error").await; // no backend without Redis
    a.send_json(json!({"type": "chat", "id": "d1", "to": "bob", "data": {"text": "hi"}}))
        .await;
    a.expect("ack").await;
    b.expect("chat").await;
    a.send_json(
        json!({"type": "publish", "id": "pub1", "data": {"topic": "m:news", "type": "chat", "data": {"t": 1}}}),
    )
    .await;
    // The publication may reach the publisher before its ack.
    let mut two = [a.next_message().await, a.next_message().await].map(|m| m["type"].clone());
    two.sort_by_key(|t| t.to_string());
    assert_eq!(two, [json!("ack"), json!("chat")]);
    b.expect("chat").await;
    // A compressible publication from the HTTP API: plain to A, compressed to B.
    let (status, _) = post(
        addr,
        "/api/publish",
        json!({"topic": "m:news", "type": "news", "data": {"text": "abc ".repeat(500)}}),
    )
    .await;
    assert_eq!(status, 200);
    a.expect("news").await;
    b.expect("news").await;

    // C: alice again, over the per-user limit: refused after the upgrade (4029).
    let mut c = Tally::plain(addr, "/ws?user_id=alice&clientId=c").await;
    assert_eq!(c.drain().await, Some(4029));
    // An upgrade from a forbidden Origin: HTTP 403.
    assert_eq!(
        upgrade_status_with_origin(addr, "https://evil.example").await,
        403
    );

    // D: a subscriber a publication larger than its whole send queue cuts off (4008).
    let mut d = Tally::plain(addr, "/ws?clientId=d").await;
    d.expect("connection").await;
    d.send_json(json!({"type": "subscribe", "id": "sd", "data": {"topics": ["m:big"]}}))
        .await;
    d.expect("ack").await;
    let big = serde_json::value::to_raw_value(&"y".repeat(5000)).expect("JSON");
    let receipt = ctx
        .broker
        .publish(TopicMessage::new("m:big", "bulk", big))
        .await
        .expect("publish");
    assert_eq!(receipt.delivered_here, 0, "the queue refused it");
    assert_eq!(d.drain().await, Some(4008));

    // E: announces a message over max_message_size (only the header is sent): 1009.
    let mut e = Tally::plain(addr, "/ws?clientId=e").await;
    e.expect("connection").await;
    let mut header = vec![0x81, 0x80 | 126];
    header.extend_from_slice(&5000u16.to_be_bytes());
    header.extend_from_slice(&MASK);
    e.up_wire += header.len() as u64;
    e.raw.send_raw(&header).await;
    assert_eq!(e.drain().await, Some(1009));

    // F: disconnected by an operator (4003). G: closes itself (1000). H: just goes away.
    let mut f = Tally::plain(addr, "/ws?user_id=frank&clientId=f").await;
    f.expect("connection").await;
    let (status, _) = post(addr, "/api/disconnect", json!({"userId": "frank"})).await;
    assert_eq!(status, 200);
    assert_eq!(f.drain().await, Some(4003));
    let mut g = Tally::plain(addr, "/ws?clientId=g").await;
    g.expect("connection").await;
    g.close(1000).await;
    assert_eq!(g.drain().await, Some(1000));
    let mut h = Tally::plain(addr, "/ws?clientId=h").await;
    h.expect("connection").await;
    h.raw.stream.shutdown().await.expect("FIN");
    assert_eq!(h.drain().await, None, "no close handshake");

    // A and B leave normally.
    for t in [&mut a, &mut b] {
        t.close(1000).await;
        assert_eq!(t.drain().await, Some(1000));
    }
    let mut seen = Totals::default();
    for t in [&a, &b, &c, &d, &e, &f, &g, &h] {
        seen.add(t);
    }

    // What the counters must have moved by.
    let mut want: Vec<(String, f64)> = vec![
        ("wsgate_connections_opened_total".into(), 7.0),
        (
            r#"wsgate_connections_refused_total{reason="per_user"}"#.into(),
            1.0,
        ),
        (
            r#"wsgate_connections_refused_total{reason="origin"}"#.into(),
            1.0,
        ),
        (closed("client", "1000"), 3.0),
        (closed("server", "4008"), 1.0),
        (closed("server", "1009"), 1.0),
        (closed("server", "4003"), 1.0),
        (closed("lost", "1006"), 1.0),
        ("wsgate_slow_consumers_total".into(), 1.0),
        ("wsgate_publications_total".into(), 3.0),
        ("wsgate_deliveries_total".into(), 4.0),
        ("wsgate_received_bytes_total".into(), seen.up_wire as f64),
        (
            "wsgate_received_payload_bytes_total".into(),
            seen.up_payload as f64,
        ),
        ("wsgate_sent_bytes_total".into(), seen.down_wire as f64),
        (
            "wsgate_sent_payload_bytes_total".into(),
            seen.down_payload as f64,
        ),
    ];
    for (kind, n) in [
        ("ping", 2),
        ("subscribe", 3),
        ("invalid", 1),
        ("binary", 1),
        ("upstream", 1),
        ("direct", 1),
        ("publish", 1),
        ("heartbeat", 0),
        ("rate_limited", 0),
    ] {
        want.push((of_type("received", kind), n as f64));
    }
    let sent_types = [
        ("connection", 7),
        ("ack", 5),
        ("pong", 2),
        ("error", 5),
        ("publication", 4),
        ("direct", 1),
        ("disconnect", 4),
        ("replay", 0),
    ];
    for (kind, n) in sent_types {
        // What the clients received agrees with what the server counted, type by type.
        let got = seen.down_types.get(kind).copied().unwrap_or(0);
        assert_eq!(got, n, "clients received {kind}: {:?}", seen.down_types);
        want.push((of_type("sent", kind), n as f64));
    }
    // Compression made B's big messages smaller on the wire than before it.
    assert!(
        b.down_wire < b.down_payload,
        "B: {} wire bytes for {} payload",
        b.down_wire,
        b.down_payload
    );
    assert!(
        b.up_wire < b.up_payload,
        "B: {} wire bytes for {} payload",
        b.up_wire,
        b.up_payload
    );

    // Sessions end (and writers count their last bytes) a moment after the clients saw EOF.
    let after = eventually_some("counters to settle", || async {
        let after = samples(&scrape(addr).await);
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|(key, delta)| {
                let got = after.get(key).copied().unwrap_or(0.0)
                    - before.get(key).copied().unwrap_or(0.0);
                (got != *delta).then(|| format!("{key}: moved {got}, expected {delta}"))
            })
            .collect();
        if wrong.is_empty() {
            Ok(after)
        } else {
            Err(wrong.join("\n"))
        }
    })
    .await;

    // Every frame the clients got went out in some write, and a write carries one frame or
    // more: at least one write, at most one per message plus one per close frame (no pings
    // within the 60 s heartbeat).
    let messages: u64 = seen.down_types.values().sum();
    let writes = after
        .get("wsgate_socket_writes_total")
        .copied()
        .unwrap_or(0.0)
        - before
            .get("wsgate_socket_writes_total")
            .copied()
            .unwrap_or(0.0);
    assert!(
        writes >= 1.0 && writes <= (messages + 8) as f64,
        "{writes} socket writes for {messages} messages and 8 close frames"
    );

    // Gauges of this node, and the fan-out latency samples (one per publication at most).
    let text = scrape(addr).await;
    assert_eq!(
        sample(&text, "wsgate_connections", r#"node="metrics-exact""#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "wsgate_send_queue_bytes", r#"node="metrics-exact""#),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "wsgate_broker_ready", r#"node="metrics-exact""#),
        Some(1.0)
    );
    let latency = "wsgate_fanout_latency_seconds_count";
    let samples_taken =
        after.get(latency).copied().unwrap_or(0.0) - before.get(latency).copied().unwrap_or(0.0);
    assert!(
        (1.0..=2.0).contains(&samples_taken),
        "{samples_taken} fan-out latency samples for 2 publications queued to sockets"
    );
    assert!(
        text.contains("wsgate_fanout_latency_seconds_bucket{le=\"0.001\"}"),
        "{text}"
    );
    node.shutdown().await;
}

fn closed(reason: &str, code: &str) -> String {
    format!(r#"wsgate_connections_closed_total{{reason="{reason}",code="{code}"}}"#)
}

fn of_type(direction: &str, kind: &str) -> String {
    format!(r#"wsgate_messages_{direction}_total{{type="{kind}"}}"#)
}

/// Every metric the Grafana dashboard queries is one the gateway exports (histogram series by
/// their base name).
#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let dashboard: Value = serde_json::from_str(include_str!("../deploy/grafana/wsgate.json"))
        .expect("the dashboard is JSON");
    let source = include_str!("../src/metrics.rs");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("expr").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    let mut names = 0;
    for expr in &exprs {
        for (i, _) in expr.match_indices("wsgate_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                .unwrap_or(&name);
            assert!(
                source.contains(&format!("\"{base}\"")),
                "the dashboard queries {name}, which src/metrics.rs does not define: {expr}"
            );
            names += 1;
        }
    }
    assert!(names >= exprs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_shows_in_readiness_and_metrics() {
    let mut redis = RedisServer::start();
    let node = cluster_node(&[redis.url()], "metrics-r").await;
    let addr = node.local_addr;
    let label = "node=\"metrics-r\"";
    until_sample(addr, "wsgate_broker_ready", label, 1.0).await;
    let before = scrape(addr).await;
    let errors_before = sample(
        &before,
        "wsgate_redis_errors_total",
        "kind=\"subscription\"",
    );

    redis.kill();
    until_sample(addr, "wsgate_broker_ready", label, 0.0).await;
    assert_eq!(readyz(addr).await, 503);

    redis.restart();
    let text = eventually_some("recovered, with a reconnect counted", || async {
        let text = scrape(addr).await;
        let ready = sample(&text, "wsgate_broker_ready", label) == Some(1.0);
        let reconnects = sample(&text, "wsgate_redis_reconnects_total", label).unwrap_or(0.0);
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
    // The lost subscription connection is an error; commands (admission, presence) were timed.
    let errors = sample(&text, "wsgate_redis_errors_total", "kind=\"subscription\"");
    assert!(
        errors.unwrap_or(0.0) > errors_before.unwrap_or(0.0),
        "{errors_before:?} -> {errors:?}\n{text}"
    );
    assert!(
        sample(&text, "wsgate_redis_command_duration_seconds_count", "").unwrap_or(0.0) > 0.0,
        "{text}"
    );
    assert!(
        text.contains("# TYPE wsgate_redis_reconnects_total counter"),
        "{text}"
    );
    assert_eq!(readyz(addr).await, 200);
    node.shutdown().await;
}

/// `wsgate_redis_messages_received_total` counts what Redis delivered to the node's
/// subscriptions, one by one (here on the broadcast channel with nobody connected, so no
/// process-wide counter moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_messages_received_counts_each_message_redis_delivered() {
    let redis = RedisServer::start();
    let node = cluster_node(&[redis.url()], "metrics-m").await;
    let addr = node.local_addr;
    let label = "node=\"metrics-m\"";
    until_sample(addr, "wsgate_broker_ready", label, 1.0).await;
    let before = sample(
        &scrape(addr).await,
        "wsgate_redis_messages_received_total",
        label,
    );
    assert_eq!(before, Some(0.0));
    for n in 0..5 {
        let receivers = redis.cli(&[
            "PUBLISH",
            "wsgate:broadcast",
            &format!(r#"{{"type":"announcement","data":{{"n":{n}}}}}"#),
        ]);
        assert_eq!(
            receivers, "1",
            "the node is subscribed to the broadcast channel"
        );
    }
    until_sample(addr, "wsgate_redis_messages_received_total", label, 5.0).await;
    node.shutdown().await;
}
