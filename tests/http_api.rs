//! The HTTP API (SPEC sections 4 and 9): every route with its success and its refusals. Errors
//! are JSON `{"error": {code, numericCode, message}}` in the socket's codes.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Asserts an API error response: `status` and `{"error": {code, numericCode, message}}`.
fn assert_api_error(resp: &(u16, Value), status: u16, code: &str, numeric: u64) {
    let (got, body) = resp;
    assert_eq!(*got, status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["numericCode"], numeric, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error says why: {body}"
    );
}

/// The lower-cased status line and headers of the answer to a body-less request.
async fn response_head(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head end")
        + 4;
    String::from_utf8_lossy(&resp[..end]).to_ascii_lowercase()
}

/// Connects and returns the client with its `connectionId`.
async fn connect_id(addr: SocketAddr, query: &str) -> (Client, u64) {
    let (c, hello) = connect(addr, query).await;
    let id = hello["data"]["connectionId"]
        .as_u64()
        .expect("connectionId");
    (c, id)
}

async fn subscribe(c: &mut Client, topic: &str) {
    let ack = c
        .request(
            json!({"type": "subscribe", "id": format!("sub-{topic}"), "data": {"topic": topic}}),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
}

/// Asserts that `c` is still open and answering.
async fn assert_alive(c: &mut Client, id: &str) {
    let pong = c.request(json!({"type": "ping", "id": id})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

// ---------------------------------------------------------------------------------------------
// POST /api/publish
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn publish_delivers_with_increasing_seq_per_topic() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws").await;
    subscribe(&mut c, "news").await;

    let (status, first) = post(
        addr,
        "/api/publish",
        json!({"topic": "news", "type": "headline", "data": {"n": 1}}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["ok"], true);
    assert_eq!(first["topic"], "news");
    assert_eq!(first["seq"], 1);
    assert_eq!(first["delivered"], 1);
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    let (status, second) = post(
        addr,
        "/api/publish",
        json!({"topic": "news", "type": "headline", "data": {"n": 2}}),
    )
    .await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["seq"], 2);
    assert_eq!(second["epoch"], epoch.as_str());
    // Sequence numbers are per topic.
    let (_, other) = post(
        addr,
        "/api/publish",
        json!({"topic": "other", "type": "x", "data": {}}),
    )
    .await;
    assert_eq!(
        (&other["seq"], &other["delivered"]),
        (&json!(1), &json!(0)),
        "{other}"
    );

    for n in 1..=2 {
        let m = c.expect_type("headline").await;
        assert_eq!(m["topic"], "news");
        assert_eq!(m["seq"], n);
        assert_eq!(m["epoch"], epoch.as_str());
        assert_eq!(m["data"], json!({"n": n}));
        assert!(m["id"].is_string() && m["timestamp"].is_string(), "{m}");
    }
    c.expect_silence().await;
    node.shutdown().await;
}

#[tokio::test]
async fn publish_refusals_are_json_errors_and_publish_nothing() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws").await;
    subscribe(&mut c, "news").await;

    let bad_bodies = [
        (
            json!({"type": "t", "data": 1}),
            "INVALID_MESSAGE_FORMAT",
            2000,
        ), // no topic
        (
            json!({"topic": "news", "data": 1}),
            "INVALID_MESSAGE_FORMAT",
            2000,
        ), // no type
        (
            json!({"topic": "news", "type": "", "data": 1}),
            "INVALID_MESSAGE_FORMAT",
            2000,
        ),
        (
            json!({"topic": 5, "type": "t", "data": 1}),
            "INVALID_MESSAGE_FORMAT",
            2000,
        ),
        (
            json!({"topic": "bad topic", "type": "t", "data": 1}),
            "INVALID_TOPIC",
            3004,
        ),
        (
            json!({"topic": "", "type": "t", "data": 1}),
            "INVALID_TOPIC",
            3004,
        ),
        (json!([1, 2]), "INVALID_MESSAGE_FORMAT", 2000),
    ];
    for (body, code, numeric) in bad_bodies {
        let resp = post(addr, "/api/publish", body.clone()).await;
        assert_api_error(&resp, 400, code, numeric);
    }
    for raw in [
        &b"{not json"[..],
        b"",
        b"{\"topic\":\"news\",\"type\":\"t\",\"data\":",
    ] {
        let (status, body) = http_raw(addr, "POST", "/api/publish", raw, &[]).await;
        let body: Value = serde_json::from_slice(&body).expect("JSON error body");
        assert_api_error(&(status, body), 400, "INVALID_MESSAGE_FORMAT", 2000);
    }
    c.expect_silence().await;
    // Nothing refused used up a sequence number.
    let (_, ok) = post(
        addr,
        "/api/publish",
        json!({"topic": "news", "type": "t", "data": 1}),
    )
    .await;
    assert_eq!(ok["seq"], 1, "{ok}");
    node.shutdown().await;
}

#[tokio::test]
async fn publish_body_size_limit_is_max_message_size() {
    let node = start_node(|s| s.ws.max_message_size = 1024).await;
    let addr = node.local_addr;
    let body_of = |len: usize| {
        let base = json!({"topic": "big", "type": "t", "data": ""}).to_string();
        let s =
            json!({"topic": "big", "type": "t", "data": "x".repeat(len - base.len())}).to_string();
        assert_eq!(s.len(), len);
        s
    };
    let (status, body) =
        http_raw(addr, "POST", "/api/publish", body_of(1024).as_bytes(), &[]).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let (status, body) =
        http_raw(addr, "POST", "/api/publish", body_of(1025).as_bytes(), &[]).await;
    let body: Value = serde_json::from_slice(&body).expect("JSON error body");
    assert_api_error(&(status, body), 413, "MESSAGE_TOO_LARGE", 2001);
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// POST /api/ws/send and /api/ws/broadcast
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn send_reaches_every_connection_of_a_user_and_no_one_else() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut a1, _) = connect(addr, "/ws?user_id=u1").await;
    let (mut a2, _) = connect(addr, "/ws?user_id=u1").await;
    let (mut b, b_id) = connect_id(addr, "/ws?user_id=u2").await;

    let (status, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "notice", "to": "u1", "data": {"k": "v"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["ok"], &body["delivered"]),
        (&json!(true), &json!(2)),
        "{body}"
    );
    for c in [&mut a1, &mut a2] {
        let m = c.expect_type("notice").await;
        assert_eq!(m["to"], "u1");
        assert_eq!(m["data"], json!({"k": "v"}));
        assert!(
            m.get("from").is_none(),
            "a backend message has no sender: {m}"
        );
        assert!(m.get("content").is_none(), "sent as data, not content: {m}");
        assert!(m["id"].is_string() && m["timestamp"].is_string(), "{m}");
    }
    b.expect_silence().await;

    // `content` instead of `data`: repeated as `content`.
    let (_, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "chat", "to": "u1", "content": "hi"}),
    )
    .await;
    assert_eq!(body["delivered"], 2, "{body}");
    for c in [&mut a1, &mut a2] {
        let m = c.expect_type("chat").await;
        assert_eq!(
            (&m["data"], &m["content"]),
            (&json!("hi"), &json!("hi")),
            "{m}"
        );
    }

    // One connection by id.
    let (_, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "direct", "connectionId": b_id, "data": 5}),
    )
    .await;
    assert_eq!(body["delivered"], 1, "{body}");
    let m = b.expect_type("direct").await;
    assert_eq!(m["data"], 5);
    a1.expect_silence().await;
    a2.expect_silence().await;

    // Nobody there: fine, delivered 0.
    let (status, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "t", "to": "nobody", "data": 1}),
    )
    .await;
    assert_eq!((status, &body["delivered"]), (200, &json!(0)), "{body}");
    let (_, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "t", "connectionId": 999_999, "data": 1}),
    )
    .await;
    assert_eq!(body["delivered"], 0, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn send_and_broadcast_refusals() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let cases = [
        ("/api/ws/send", json!({"to": "u1", "data": 1})),
        ("/api/ws/send", json!({"type": "", "to": "u1", "data": 1})),
        ("/api/ws/send", json!({"type": "t", "data": 1})),
        ("/api/ws/send", json!({"type": "t", "to": "", "data": 1})),
        ("/api/ws/send", json!({"type": "t", "to": "u1"})),
        ("/api/ws/broadcast", json!({"data": 1})),
        ("/api/ws/broadcast", json!({"type": "t"})),
        ("/api/ws/broadcast", json!("just a string")),
    ];
    for (path, body) in cases {
        let resp = post(addr, path, body.clone()).await;
        assert_api_error(&resp, 400, "INVALID_MESSAGE_FORMAT", 2000);
    }
    node.shutdown().await;
}

#[tokio::test]
async fn broadcast_reaches_every_connection() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
    let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
    let (mut anon, _) = connect(addr, "/ws").await;

    let (status, body) = post(
        addr,
        "/api/ws/broadcast",
        json!({"type": "announcement", "data": {"text": "maintenance"}}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["delivered"], 3, "{body}");
    for c in [&mut a, &mut b, &mut anon] {
        let m = c.expect_type("announcement").await;
        assert_eq!(m["data"], json!({"text": "maintenance"}));
        assert!(m.get("from").is_none() && m.get("to").is_none(), "{m}");
    }
    let (_, body) = post(
        addr,
        "/api/ws/broadcast",
        json!({"type": "note", "content": {"x": 1}}),
    )
    .await;
    assert_eq!(body["delivered"], 3, "{body}");
    for c in [&mut a, &mut b, &mut anon] {
        let m = c.expect_type("note").await;
        assert_eq!(
            (&m["data"], &m["content"]),
            (&json!({"x": 1}), &json!({"x": 1})),
            "{m}"
        );
    }
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// POST /api/disconnect
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn disconnect_by_user_or_client_closes_4003_and_spares_the_rest() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut a1, _) = connect(addr, "/ws?user_id=u1&clientId=a1").await;
    let (mut a2, _) = connect(addr, "/ws?user_id=u1&clientId=a2").await;
    let (mut b, _) = connect(addr, "/ws?user_id=u2&clientId=b").await;
    let (mut x, _) = connect(addr, "/ws?clientId=cx").await;
    let (mut y, _) = connect(addr, "/ws?clientId=cy").await;

    let (status, body) = post(addr, "/api/disconnect", json!({"userId": "u1"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["disconnected"], 2, "{body}");
    for c in [&mut a1, &mut a2] {
        let (code, _reason, seen) = c.expect_close().await;
        assert_eq!(code, 4003, "seen {seen:?}");
        find_disconnect(&seen, 4003, false);
    }

    let (status, body) = post(addr, "/api/disconnect", json!({"clientId": "cx"})).await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(1)), "{body}");
    let (code, _reason, seen) = x.expect_close().await;
    assert_eq!(code, 4003, "seen {seen:?}");
    find_disconnect(&seen, 4003, false);

    // Unknown targets: nothing to do.
    let (status, body) = post(addr, "/api/disconnect", json!({"userId": "nobody"})).await;
    assert_eq!((status, &body["disconnected"]), (200, &json!(0)), "{body}");
    // No target at all.
    for bad in [json!({}), json!({"userId": ""}), json!({"clientId": ""})] {
        let resp = post(addr, "/api/disconnect", bad).await;
        assert_api_error(&resp, 400, "INVALID_MESSAGE_FORMAT", 2000);
    }

    assert_alive(&mut b, "b").await;
    assert_alive(&mut y, "y").await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, status) = get(addr, "/api/ws/status").await;
        if status["online_count"] == 2 {
            assert_eq!(status["online_users"], json!(["u2"]), "{status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disconnected clients still counted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// GET /api/ws/status, /api/info, /api/presence, health
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn status_counts_connections_and_lists_users_sorted() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (status, body) = get(addr, "/api/ws/status").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["online_count"], &body["online_users"]),
        (&json!(0), &json!([])),
        "{body}"
    );

    let (zed, _) = connect(addr, "/ws?user_id=zed").await;
    let (_amy1, _) = connect(addr, "/ws?user_id=amy").await;
    let (_amy2, _) = connect(addr, "/ws?user_id=amy").await;
    let (_anon, _) = connect(addr, "/ws").await;
    let (_, body) = get(addr, "/api/ws/status").await;
    assert_eq!(body["online_count"], 4, "{body}");
    assert_eq!(body["online_users"], json!(["amy", "zed"]), "{body}");

    zed.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = get(addr, "/api/ws/status").await;
        if body["online_count"] == 3 {
            assert_eq!(body["online_users"], json!(["amy"]), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a closed connection is still counted: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown().await;
}

#[tokio::test]
async fn info_names_the_node_and_its_connections() {
    let node = start_node(|s| {
        s.node_id = "node-under-test".into();
        s.ws.max_connections = 50;
    })
    .await;
    let addr = node.local_addr;
    let (_a, _) = connect(addr, "/ws").await;
    let (_b, _) = connect(addr, "/ws").await;
    let (status, body) = get(addr, "/api/info").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node"], "node-under-test");
    assert_eq!(body["broker"], "memory");
    assert_eq!(body["ready"], true);
    let nodes = body["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1, "{body}");
    assert_eq!(nodes[0]["id"], "node-under-test");
    assert_eq!(nodes[0]["connections"], 2, "{body}");
    assert_eq!(body["max_connections"], 50, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn presence_lists_a_topics_subscribers() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut p1, id1) = connect_id(addr, "/ws?user_id=u1&clientId=p1").await;
    let (mut p2, id2) = connect_id(addr, "/ws?clientId=p2").await;
    let (mut other, _) = connect(addr, "/ws?clientId=p3").await;
    subscribe(&mut p1, "room").await;
    subscribe(&mut p2, "room").await;
    subscribe(&mut other, "hall").await;

    let (status, body) = get(addr, "/api/presence?topic=room").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["topic"], &body["count"]),
        (&json!("room"), &json!(2)),
        "{body}"
    );
    let mut members: Vec<(u64, String, Value)> = body["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["connectionId"].as_u64().expect("connectionId"),
                m["clientId"].as_str().expect("clientId").to_string(),
                m["userId"].clone(),
            )
        })
        .collect();
    members.sort_by_key(|m| m.0);
    let mut expected = vec![
        (id1, "p1".to_string(), json!("u1")),
        (id2, "p2".to_string(), Value::Null),
    ];
    expected.sort_by_key(|m| m.0);
    assert_eq!(members, expected);

    let (status, body) = get(addr, "/api/presence?topic=empty").await;
    assert_eq!(
        (status, &body["count"], &body["members"]),
        (200, &json!(0), &json!([])),
        "{body}"
    );
    let resp = get(addr, "/api/presence").await;
    assert_api_error(&resp, 400, "INVALID_MESSAGE_FORMAT", 2000);
    node.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")), "{body}");
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!((status, &body["ready"]), (200, &json!(true)), "{body}");
    // 503 while shutting down is covered in tests/limits.rs (shutdown test).
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Routing and API keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_routes_404_and_wrong_methods_405() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    for path in [
        "/api/nope",
        "/api/ws",
        "/api/ws/status/extra",
        "/nothing-here",
    ] {
        let resp = get(addr, path).await;
        assert_api_error(&resp, 404, "NOT_FOUND", 3005);
    }
    let wrong = [
        ("GET", "/api/publish"),
        ("GET", "/api/ws/send"),
        ("PUT", "/api/ws/broadcast"),
        ("DELETE", "/api/disconnect"),
        ("POST", "/api/ws/status"),
        ("POST", "/api/info"),
        ("DELETE", "/api/presence"),
    ];
    for (method, path) in wrong {
        let resp = http(addr, method, path, None, &[]).await;
        assert_api_error(&resp, 405, "METHOD_NOT_ALLOWED", 3006);
        let allow =
            if path.ends_with("status") || path.ends_with("info") || path.ends_with("presence") {
                "GET"
            } else {
                "POST"
            };
        let head = response_head(addr, method, path).await;
        assert!(
            head.contains(&format!("\r\nallow: {}\r\n", allow.to_ascii_lowercase())),
            "{method} {path}: {head}"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn api_keys_are_required_when_configured() {
    let node = start_node(|s| s.api_keys = vec!["k1".into()]).await;
    let addr = node.local_addr;
    let status_with = |headers: &'static [(&'static str, &'static str)]| async move {
        http(addr, "GET", "/api/ws/status", None, headers).await
    };
    assert_api_error(&status_with(&[]).await, 401, "UNAUTHORIZED", 1001);
    assert_api_error(
        &status_with(&[("X-API-Key", "k2")]).await,
        401,
        "UNAUTHORIZED",
        1001,
    );
    assert_api_error(
        &status_with(&[("X-API-Key", "k1x")]).await,
        401,
        "UNAUTHORIZED",
        1001,
    );
    assert_api_error(
        &status_with(&[("Authorization", "Bearer nope")]).await,
        401,
        "UNAUTHORIZED",
        1001,
    );
    assert_api_error(
        &status_with(&[("Authorization", "k1")]).await,
        401,
        "UNAUTHORIZED",
        1001,
    );
    assert_eq!(status_with(&[("X-API-Key", "k1")]).await.0, 200);
    assert_eq!(status_with(&[("Authorization", "Bearer k1")]).await.0, 200);

    // Writes too, and nothing is published without a key.
    let (mut c, _) = connect(addr, "/ws").await;
    subscribe(&mut c, "keyed").await;
    let body = json!({"topic": "keyed", "type": "t", "data": 1});
    let resp = http(addr, "POST", "/api/publish", Some(&body), &[]).await;
    assert_api_error(&resp, 401, "UNAUTHORIZED", 1001);
    c.expect_silence().await;
    let (status, resp) = http(
        addr,
        "POST",
        "/api/publish",
        Some(&body),
        &[("X-API-Key", "k1")],
    )
    .await;
    assert_eq!((status, &resp["seq"]), (200, &json!(1)), "{resp}");
    assert_eq!(c.expect_type("t").await["seq"], 1);

    // Probes stay open for load balancers.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 200);
    node.shutdown().await;
}

#[tokio::test]
async fn explicit_null_data_is_a_payload_not_an_absence() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let (mut c, _) = connect(addr, "/ws?user_id=n1").await;
    subscribe(&mut c, "nulls").await;
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": "nulls", "type": "t", "data": null}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = c.expect_type("t").await;
    assert_eq!(m["data"], Value::Null);
    assert!(m.as_object().is_some_and(|o| o.contains_key("data")), "{m}");
    let (status, body) = post(
        addr,
        "/api/ws/send",
        json!({"type": "d", "to": "n1", "content": null}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let m = c.expect_type("d").await;
    assert!(
        m["content"].is_null() && m.as_object().is_some_and(|o| o.contains_key("content")),
        "{m}"
    );
    // Absent is still refused.
    let (status, _) = post(addr, "/api/publish", json!({"topic": "nulls", "type": "t"})).await;
    assert_eq!(status, 400);
    node.shutdown().await;
}
