//! The client protocol over real TCP with an independent WebSocket client (tokio-tungstenite):
//! connecting (SPEC section 2) and the JSON messages in both directions (SPEC section 3).

mod common;

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use wsgate::config::NamespaceSettings;

/// Every test runs server and client on separate worker threads.
macro_rules! ws_test {
    ($(#[$meta:meta])* async fn $name:ident() $body:block) => {
        $(#[$meta])*
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() $body
    };
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

fn encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

/// Publishes through the HTTP API and checks that the API took it.
async fn publish(addr: SocketAddr, topic: &str, kind: &str, data: Value) -> Value {
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": topic, "type": kind, "data": data}),
    )
    .await;
    assert_eq!(status, 200, "publish to {topic} refused: {body}");
    body
}

/// Asserts `v` is an `error` reply with `code` for request `request_id`; returns its data.
fn assert_error(v: &Value, code: &str, request_id: Value) -> Value {
    assert_eq!(v["type"], "error", "expected an error, got {v}");
    assert_eq!(v["data"]["code"], code, "wrong error code in {v}");
    assert_eq!(v["data"]["requestId"], request_id, "wrong requestId in {v}");
    v["data"].clone()
}

/// Sends a `ping` and expects the matching `pong`: the connection is still usable.
async fn assert_usable(c: &mut Client, id: &str) {
    let pong = c.request(json!({"type": "ping", "id": id})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

/// Collects text messages until none arrives for `quiet`.
async fn collect_until_quiet(c: &mut Client, quiet: Duration) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(quiet, c.ws.next()).await {
            Err(_) => return seen,
            Ok(Some(Ok(Message::Text(t)))) => {
                seen.push(serde_json::from_str(t.as_str()).expect("JSON"))
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("connection ended while collecting: {other:?}; seen {seen:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn connection_message_describes_the_session() {
        let node = start_node(|s| {
            s.node_id = "node-under-test".into();
            s.ws.heartbeat_interval = Duration::from_millis(1234);
        })
        .await;
        let before = now_millis();
        let (mut c, hello) = connect(node.local_addr, "/ws?clientId=cid-1&user_id=alice").await;
        let after = now_millis();
        assert_eq!(hello["type"], "connection");
        let ts = hello["timestamp"].as_str().expect("timestamp is a string");
        assert!(ts.contains('T') && ts.ends_with('Z'), "timestamp not RFC 3339 UTC: {ts}");
        assert!(hello["id"].is_string(), "{hello}");
        let d = &hello["data"];
        assert_eq!(d["status"], "connected");
        assert_eq!(d["clientId"], "cid-1");
        assert_eq!(d["userId"], "alice");
        assert_eq!(d["node"], "node-under-test");
        assert_eq!(d["heartbeatInterval"], 1234, "heartbeatInterval is in ms: {d}");
        let server_time = d["serverTime"].as_u64().expect("serverTime in ms");
        assert!(
            server_time + 1000 >= before && server_time <= after + 1000,
            "serverTime {server_time} not within [{before}, {after}]"
        );
        assert!(d["connectionId"].is_u64(), "{d}");
        assert_eq!(d["subscriptions"], json!([]));
        assert_usable(&mut c, "after-hello").await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_id_from_snake_case_query() {
        let node = start_node(|_| {}).await;
        let (_c, hello) = connect(node.local_addr, "/ws?client_id=snake-1").await;
        assert_eq!(hello["data"]["clientId"], "snake-1");
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_id_from_header() {
        let node = start_node(|_| {}).await;
        let mut req = format!("ws://{}/ws?user_id=u1", node.local_addr)
            .into_client_request()
            .expect("request");
        req.headers_mut().insert("X-Client-ID", HeaderValue::from_static("from-header"));
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
            .await
            .expect("connect in time")
            .expect("upgrade succeeds");
        let mut c = Client { ws };
        let hello = c.expect_type("connection").await;
        assert_eq!(hello["data"]["clientId"], "from-header");
        assert_eq!(hello["data"]["userId"], "u1");
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_id_generated_when_absent() {
        let node = start_node(|_| {}).await;
        let (_a, hello_a) = connect(node.local_addr, "/ws").await;
        let (_b, hello_b) = connect(node.local_addr, "/ws").await;
        let a = hello_a["data"]["clientId"].as_str().expect("generated clientId");
        let b = hello_b["data"]["clientId"].as_str().expect("generated clientId");
        assert!(!a.is_empty() && !b.is_empty());
        assert_ne!(a, b, "generated client ids must differ");
        assert_ne!(
            hello_a["data"]["connectionId"], hello_b["data"]["connectionId"],
            "connection ids must differ"
        );
        node.shutdown().await;
    }
}

ws_test! {
    async fn subscriptions_query_as_json_array() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let path = format!("/ws?subscriptions={}", encode(r#"["routes","metrics"]"#));
        let (mut c, hello) = connect(addr, &path).await;
        assert_eq!(hello["data"]["subscriptions"], json!(["metrics", "routes"]));
        publish(addr, "routes", "route_update", json!({"n": 1})).await;
        let m = c.expect_type("route_update").await;
        assert_eq!((m["topic"].as_str(), m["data"]["n"].as_i64()), (Some("routes"), Some(1)));
        publish(addr, "metrics", "metrics", json!({"n": 2})).await;
        let m = c.expect_type("metrics").await;
        assert_eq!((m["topic"].as_str(), m["data"]["n"].as_i64()), (Some("metrics"), Some(2)));
        node.shutdown().await;
    }
}

ws_test! {
    async fn subscriptions_query_as_comma_list() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, hello) = connect(addr, "/ws?subscriptions=alert.cpu,alert.mem").await;
        assert_eq!(hello["data"]["subscriptions"], json!(["alert.cpu", "alert.mem"]));
        publish(addr, "alert.mem", "alert", json!({"n": 1})).await;
        let m = c.expect_type("alert").await;
        assert_eq!(m["topic"], "alert.mem");
        publish(addr, "alert.cpu", "alert", json!({"n": 2})).await;
        let m = c.expect_type("alert").await;
        assert_eq!(m["topic"], "alert.cpu");
        node.shutdown().await;
    }
}

ws_test! {
    async fn invalid_topic_in_subscriptions_query_is_an_error_after_connection() {
        let node = start_node(|_| {}).await;
        let path = format!("/ws?subscriptions={}", encode("bad topic!"));
        let mut c = connect_raw(node.local_addr, &path).await;
        let first = c.recv_json().await;
        assert_eq!(first["type"], "connection", "connection must come first: {first}");
        assert_eq!(first["data"]["subscriptions"], json!([]));
        let err = c.expect_type("error").await;
        assert_eq!(err["data"]["code"], "INVALID_TOPIC", "{err}");
        assert!(
            err["data"]["message"].as_str().is_some_and(|m| m.contains("bad topic!")),
            "the error names the topic: {err}"
        );
        assert_usable(&mut c, "still-open").await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn alias_paths_accept_websockets() {
        let paths = ["/ws", "/api/ws/connect", "/ws/tigateway", "/api/v1/ws"];
        let node = start_node(|s| s.ws.paths = paths.iter().map(|p| p.to_string()).collect()).await;
        for (i, path) in paths.iter().enumerate() {
            let (mut c, hello) = connect(node.local_addr, &format!("{path}?clientId=alias-{i}")).await;
            assert_eq!(hello["data"]["clientId"], format!("alias-{i}"), "on {path}");
            assert_usable(&mut c, path).await;
        }
        node.shutdown().await;
    }
}

ws_test! {
    async fn unknown_path_is_404() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (status, body) = http(addr, "GET", "/ws/nope", None, &[]).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "NOT_FOUND", "{body}");
        // An alias that is not configured is not a WebSocket path either.
        let (status, _) = http(addr, "GET", "/api/v1/ws", None, &[]).await;
        assert_eq!(status, 404);
        let url = format!("ws://{addr}/not-a-ws-path");
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await.expect("in time") {
            Err(WsError::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
            Err(other) => panic!("expected an HTTP 404 refusal, got {other}"),
            Ok(_) => panic!("upgrade on an unknown path must fail"),
        }
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// ping, heartbeat
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn ping_pong_with_string_id() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        c.send_json(json!({"type": "ping", "id": "p-1"})).await;
        let pong = c.recv_json().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["data"]["requestId"], "p-1");
        node.shutdown().await;
    }
}

ws_test! {
    async fn ping_pong_with_numeric_id() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        c.send_json(json!({"type": "ping", "id": 42})).await;
        let pong = c.recv_json().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["data"]["requestId"], json!(42), "numeric ids stay numbers: {pong}");
        node.shutdown().await;
    }
}

ws_test! {
    async fn ping_pong_with_message_id_alias() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        c.send_json(json!({"type": "ping", "messageId": "m-7", "unknownField": true})).await;
        let pong = c.recv_json().await;
        assert_eq!(pong["type"], "pong", "{pong}");
        assert_eq!(pong["data"]["requestId"], "m-7");
        node.shutdown().await;
    }
}

ws_test! {
    async fn heartbeat_echoes_client_timestamp_with_server_time() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        let before = now_millis();
        c.send_json(json!({"type": "heartbeat", "id": "h-1", "data": {"timestamp": 1_700_000_000_123u64}}))
            .await;
        let hb = c.recv_json().await;
        assert_eq!(hb["type"], "heartbeat", "{hb}");
        assert_eq!(hb["data"]["requestId"], "h-1");
        assert_eq!(hb["data"]["timestamp"], json!(1_700_000_000_123u64));
        let server_time = hb["data"]["serverTime"].as_u64().expect("serverTime in ms");
        assert!(server_time + 1000 >= before && server_time <= now_millis() + 1000, "{hb}");
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// subscribe / unsubscribe
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn subscribe_in_all_forms_acks_and_delivers() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let requests = [
            ("f1", json!({"type": "subscribe", "id": "f1", "data": {"topics": ["t.topics"]}}), "t.topics"),
            ("f2", json!({"type": "subscribe", "id": "f2", "data": {"events": ["t.events"]}}), "t.events"),
            ("f3", json!({"type": "subscribe", "id": "f3", "data": {"topic": "t.single"}}), "t.single"),
            ("f4", json!({"type": "subscribe", "id": "f4", "topic": "t.toplevel"}), "t.toplevel"),
        ];
        for (id, req, topic) in requests {
            let ack = c.request(req).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["data"]["action"], "subscribe", "{ack}");
            assert_eq!(ack["data"]["topics"], json!([topic]), "{ack}");
            assert_eq!(ack["data"]["requestId"], id);
        }
        for topic in ["t.topics", "t.events", "t.single", "t.toplevel"] {
            publish(addr, topic, "evt", json!({"topic": topic})).await;
            let m = c.expect_type("evt").await;
            assert_eq!(m["topic"], topic, "{m}");
            assert_eq!(m["data"]["topic"], topic, "{m}");
        }
        node.shutdown().await;
    }
}

ws_test! {
    async fn unsubscribe_in_all_forms_acks_and_stops_delivery() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let topics = ["u.topics", "u.events", "u.single", "u.toplevel"];
        let (mut c, _) = connect(addr, &format!("/ws?subscriptions={}", topics.join(","))).await;
        // Subscribed: each topic delivers.
        for t in topics {
            publish(addr, t, "evt", json!({"before": t})).await;
            assert_eq!(c.expect_type("evt").await["topic"], t);
        }
        let requests = [
            json!({"type": "unsubscribe", "id": "x1", "data": {"topics": ["u.topics"]}}),
            json!({"type": "unsubscribe", "id": "x2", "data": {"events": ["u.events"]}}),
            json!({"type": "unsubscribe", "id": "x3", "data": {"topic": "u.single"}}),
            json!({"type": "unsubscribe", "id": "x4", "topic": "u.toplevel"}),
        ];
        for (req, topic) in requests.into_iter().zip(topics) {
            let id = req["id"].clone();
            let ack = c.request(req).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["data"]["action"], "unsubscribe", "{ack}");
            assert_eq!(ack["data"]["topics"], json!([topic]), "{ack}");
            assert_eq!(ack["data"]["requestId"], id);
        }
        for t in topics {
            let body = publish(addr, t, "evt", json!({"after": t})).await;
            assert_eq!(body["delivered"], 0, "no subscriber left for {t}: {body}");
        }
        c.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn subscribing_twice_delivers_once() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        for id in ["s1", "s2"] {
            let ack = c.request(json!({"type": "subscribe", "id": id, "data": {"topics": ["routes"]}})).await;
            assert_eq!(ack["type"], "ack", "{ack}");
        }
        let ack = c
            .request(json!({"type": "subscribe", "id": "s3", "data": {"topics": ["routes", "routes"]}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        publish(addr, "routes", "route_update", json!({"n": 1})).await;
        let m = c.expect_type("route_update").await;
        assert_eq!(m["data"]["n"], 1);
        c.expect_silence().await;
        publish(addr, "routes", "route_update", json!({"n": 2})).await;
        let m = c.expect_type("route_update").await;
        assert_eq!(m["data"]["n"], 2, "the next message, not a duplicate: {m}");
        c.expect_silence().await;
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// filters and conflation
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn per_topic_filter_applies_only_to_its_topic() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "f", "data": {
                "topics": ["routes", "metrics"],
                "filters": {"routes": {"status": ["ACTIVE"]}}
            }}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        publish(addr, "routes", "route_update", json!({"status": "DELETED", "n": 1})).await;
        publish(addr, "routes", "route_update", json!({"status": "ACTIVE", "n": 2})).await;
        publish(addr, "metrics", "metrics", json!({"status": "DELETED", "n": 3})).await;
        let m = c.recv_json().await;
        assert_eq!((m["topic"].as_str(), m["data"]["n"].as_i64()), (Some("routes"), Some(2)), "{m}");
        let m = c.recv_json().await;
        assert_eq!(
            (m["topic"].as_str(), m["data"]["n"].as_i64()),
            (Some("metrics"), Some(3)),
            "metrics is not filtered: {m}"
        );
        c.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn flat_filter_applies_to_every_listed_topic() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "f", "data": {
                "topics": ["alert.cpu", "alert.mem"],
                "filters": {"level": ["warning", "critical"]}
            }}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        publish(addr, "alert.cpu", "alert", json!({"level": "info", "n": 1})).await;
        publish(addr, "alert.cpu", "alert", json!({"level": "warning", "n": 2})).await;
        publish(addr, "alert.mem", "alert", json!({"level": "info", "n": 3})).await;
        publish(addr, "alert.mem", "alert", json!({"level": "critical", "n": 4})).await;
        publish(addr, "alert.mem", "alert", json!({"n": 5})).await;
        let m = c.expect_type("alert").await;
        assert_eq!((m["topic"].as_str(), m["data"]["n"].as_i64()), (Some("alert.cpu"), Some(2)), "{m}");
        let m = c.expect_type("alert").await;
        assert_eq!((m["topic"].as_str(), m["data"]["n"].as_i64()), (Some("alert.mem"), Some(4)), "{m}");
        c.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn dotted_filter_path_reaches_nested_fields() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "f", "data": {
                "topic": "routes",
                "filters": {"route.status": ["ACTIVE"]}
            }}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        publish(addr, "routes", "route_update", json!({"route": {"status": "DOWN"}, "n": 1})).await;
        publish(addr, "routes", "route_update", json!({"route": {"status": "ACTIVE"}, "n": 2})).await;
        let m = c.expect_type("route_update").await;
        assert_eq!(m["data"]["n"], 2, "the non-matching publication is skipped: {m}");
        c.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn invalid_filters_are_refused() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let bad = [
            json!("status=ACTIVE"),
            json!([1]),
            json!({"interval": "fast"}),
            json!({"status": {"nested": 1}}),
            json!({"status": [{"a": 1}]}),
        ];
        for (i, filters) in bad.into_iter().enumerate() {
            let id = format!("bad-{i}");
            let reply = c
                .request(json!({"type": "subscribe", "id": id, "data": {"topics": ["routes"], "filters": filters}}))
                .await;
            assert_error(&reply, "INVALID_SUBSCRIPTION", json!(id));
        }
        // Nothing was subscribed by the refused requests.
        let body = publish(addr, "routes", "route_update", json!({"status": "ACTIVE"})).await;
        assert_eq!(body["delivered"], 0, "{body}");
        c.expect_silence().await;
        assert_usable(&mut c, "after-bad-filters").await;
        node.shutdown().await;
    }
}

/// Publishes 10 numbered messages back to back and returns what the client got.
async fn conflated_burst(addr: SocketAddr, c: &mut Client) -> Vec<Value> {
    for n in 0..10 {
        publish(addr, "metrics", "metrics", json!({"n": n})).await;
    }
    collect_until_quiet(c, Duration::from_millis(600)).await
}

fn assert_conflated(got: &[Value]) {
    let ns: Vec<i64> = got
        .iter()
        .map(|m| m["data"]["n"].as_i64().expect("numbered"))
        .collect();
    assert!(got.iter().all(|m| m["type"] == "metrics"), "{got:?}");
    assert!(
        ns.len() >= 2,
        "the first at once and the latest after the interval: {ns:?}"
    );
    assert!(
        ns.len() <= 3,
        "conflation must drop most of a burst of 10: {ns:?}"
    );
    assert_eq!(ns[0], 0, "the first message goes out at once: {ns:?}");
    assert_eq!(*ns.last().expect("some"), 9, "the latest wins: {ns:?}");
}

ws_test! {
    async fn conflation_interval_in_per_topic_filters() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "c", "data": {
                "topics": ["metrics"],
                "filters": {"metrics": {"interval": 300}}
            }}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let got = conflated_burst(addr, &mut c).await;
        assert_conflated(&got);
        node.shutdown().await;
    }
}

ws_test! {
    async fn conflation_interval_request_wide() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut c, _) = connect(addr, "/ws").await;
        let ack = c
            .request(json!({"type": "subscribe", "id": "c", "data": {"topics": ["metrics"], "interval": 300}}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let got = conflated_burst(addr, &mut c).await;
        assert_conflated(&got);
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// publish from a client
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn client_publish_refused_where_namespace_does_not_allow_it() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut sub, _) = connect(addr, "/ws?subscriptions=chat:room1,routes").await;
        let (mut c, _) = connect(addr, "/ws?user_id=u1").await;
        for (i, topic) in ["chat:room1", "routes"].into_iter().enumerate() {
            let id = format!("p{i}");
            let reply = c
                .request(json!({"type": "publish", "id": id, "data": {"topic": topic, "type": "chat", "data": {"x": 1}}}))
                .await;
            assert_error(&reply, "PERMISSION_DENIED", json!(id));
        }
        sub.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_publish_allowed_by_namespace() {
        let node = start_node(|s| {
            s.namespaces.insert("chat".into(), NamespaceSettings::open_publish());
        })
        .await;
        let addr = node.local_addr;
        let (mut sub, _) = connect(addr, "/ws?user_id=u2&subscriptions=chat:room1").await;
        let (mut c, _) = connect(addr, "/ws?user_id=u1").await;
        let mut epoch = None;
        for (seq, text) in [(1, "hello"), (2, "again")] {
            let id = format!("pub-{seq}");
            let ack = c
                .request(json!({"type": "publish", "id": id, "data": {
                    "topic": "chat:room1", "type": "chat_message", "data": {"text": text}
                }}))
                .await;
            assert_eq!(ack["type"], "ack", "{ack}");
            assert_eq!(ack["data"]["action"], "publish", "{ack}");
            assert_eq!(ack["data"]["requestId"], json!(id));
            assert_eq!(ack["data"]["seq"], seq, "{ack}");
            let e = ack["data"]["epoch"].as_str().expect("epoch").to_string();
            assert!(!e.is_empty());
            assert_eq!(*epoch.get_or_insert_with(|| e.clone()), e, "epoch is stable");

            let m = sub.recv_json().await;
            assert_eq!(m["type"], "chat_message", "the publisher's type: {m}");
            assert_eq!(m["topic"], "chat:room1");
            assert_eq!(m["seq"], seq);
            assert_eq!(m["epoch"], json!(e));
            assert_eq!(m["data"], json!({"text": text}));
        }
        // Other namespaces stay closed.
        let reply = c
            .request(json!({"type": "publish", "id": "other", "data": {"topic": "routes", "type": "x", "data": 1}}))
            .await;
        assert_error(&reply, "PERMISSION_DENIED", json!("other"));
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_publish_with_top_level_topic_sends_data_as_the_payload() {
        let node = start_node(|s| {
            s.namespaces.insert("chat".into(), NamespaceSettings::open_publish());
        })
        .await;
        let addr = node.local_addr;
        let (mut sub, _) = connect(addr, "/ws?user_id=u2&subscriptions=chat:room1").await;
        let (mut c, _) = connect(addr, "/ws?user_id=u1").await;
        let ack = c
            .request(json!({"type": "publish", "id": "p", "topic": "chat:room1", "data": {"text": "hi"}}))
            .await;
        assert_eq!(ack["data"]["seq"], 1, "{ack}");
        let m = sub.recv_json().await;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["data"], json!({"text": "hi"}), "{m}");
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_publish_without_topic_is_invalid_format() {
        let node = start_node(|s| {
            s.namespaces.insert("chat".into(), NamespaceSettings::open_publish());
        })
        .await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        let reply = c
            .request(json!({"type": "publish", "id": "nt", "data": {"type": "chat_message", "data": {"text": "x"}}}))
            .await;
        assert_error(&reply, "INVALID_MESSAGE_FORMAT", json!("nt"));
        node.shutdown().await;
    }
}

ws_test! {
    async fn client_publish_with_bad_topic_name_is_invalid_topic() {
        let node = start_node(|s| {
            s.namespaces.insert("chat".into(), NamespaceSettings::open_publish());
        })
        .await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        let reply = c
            .request(json!({"type": "publish", "id": "bt", "data": {"topic": "chat:room 1*", "type": "m", "data": 1}}))
            .await;
        assert_error(&reply, "INVALID_TOPIC", json!("bt"));
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// direct messages
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn direct_message_reaches_every_connection_of_the_user_with_server_set_from() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b1, _) = connect(addr, "/ws?user_id=u2&clientId=b1").await;
        let (mut b2, _) = connect(addr, "/ws?user_id=u2&clientId=b2").await;
        let (mut other, _) = connect(addr, "/ws?user_id=u3").await;
        a.send_json(json!({"type": "chat", "to": "u2", "from": "mallory", "data": {"text": "hi"}})).await;
        for b in [&mut b1, &mut b2] {
            let m = b.recv_json().await;
            assert_eq!(m["type"], "chat", "{m}");
            assert_eq!(m["from"], "u1", "from is the sender's identity, not the claimed one: {m}");
            assert_eq!(m["to"], "u2", "{m}");
            assert_eq!(m["data"], json!({"text": "hi"}));
            assert!(m["id"].is_string() && m["timestamp"].is_string(), "{m}");
        }
        other.expect_silence().await;
        a.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn direct_message_content_arrives_as_data_and_content() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
        a.send_json(json!({"type": "private_message", "to": "u2", "content": {"text": "psst"}})).await;
        let m = b.recv_json().await;
        assert_eq!(m["type"], "private_message", "{m}");
        assert_eq!(m["from"], "u1");
        assert_eq!(m["data"], json!({"text": "psst"}), "{m}");
        assert_eq!(m["content"], json!({"text": "psst"}), "{m}");
        node.shutdown().await;
    }
}

ws_test! {
    async fn direct_message_with_id_is_acked() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
        a.send_json(json!({"type": "typing", "id": "dm-1", "to": "u2", "data": {"on": true}})).await;
        let ack = a.recv_json().await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert_eq!(ack["data"]["requestId"], "dm-1");
        let m = b.expect_type("typing").await;
        assert_eq!(m["data"]["on"], true);
        // Without an id there is no ack.
        a.send_json(json!({"type": "typing", "to": "u2", "data": {"on": false}})).await;
        assert_eq!(b.expect_type("typing").await["data"]["on"], false);
        a.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn direct_message_empty_to_is_refused_by_default() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
        let reply = a.request(json!({"type": "chat", "id": "bc", "to": "", "data": {"text": "all"}})).await;
        assert_error(&reply, "PERMISSION_DENIED", json!("bc"));
        b.expect_silence().await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn direct_message_empty_to_broadcasts_when_allowed() {
        let node = start_node(|s| s.ws.allow_client_broadcast = true).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
        let (mut anon, _) = connect(addr, "/ws").await;
        a.send_json(json!({"type": "chat", "to": "", "data": {"text": "all"}})).await;
        for c in [&mut b, &mut anon] {
            let m = c.expect_type("chat").await;
            assert_eq!(m["from"], "u1", "{m}");
            assert_eq!(m["data"]["text"], "all");
        }
        node.shutdown().await;
    }
}

ws_test! {
    async fn direct_message_to_offline_user_is_silently_undelivered() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
        let (mut b, _) = connect(addr, "/ws?user_id=u2").await;
        a.send_json(json!({"type": "chat", "to": "nobody", "data": {"text": "?"}})).await;
        a.expect_silence().await;
        b.expect_silence().await;
        assert_usable(&mut a, "after-offline").await;
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// other types, error shape
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn other_types_without_backend_are_invalid_operation() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws?user_id=u1").await;
        for (i, kind) in ["config_get", "route_create"].into_iter().enumerate() {
            let reply = c.request(json!({"type": kind, "id": i, "data": {"k": "v"}})).await;
            let data = assert_error(&reply, "INVALID_OPERATION", json!(i));
            let message = data["message"].as_str().expect("message");
            assert!(message.contains("no backend"), "says why: {message}");
            assert!(message.contains(kind), "names the type: {message}");
        }
        assert_usable(&mut c, "after-upstream").await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn error_replies_carry_code_numeric_code_message_and_request_id() {
        let node = start_node(|_| {}).await;
        let (mut c, _) = connect(node.local_addr, "/ws").await;
        let reply = c
            .request(json!({"type": "publish", "id": "e-1", "data": {"topic": "routes", "type": "x", "data": 1}}))
            .await;
        assert_eq!(reply["type"], "error");
        let d = &reply["data"];
        assert_eq!(d["code"], "PERMISSION_DENIED");
        assert_eq!(d["numericCode"], 3001, "{d}");
        assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
        assert_eq!(d["requestId"], "e-1");
        assert!(reply["id"].is_string() && reply["timestamp"].is_string(), "{reply}");

        let reply = c.request(json!({"type": "subscribe", "id": 9, "data": {}})).await;
        let d = assert_error(&reply, "INVALID_SUBSCRIPTION", json!(9));
        assert_eq!(d["numericCode"], 3000, "{d}");
        assert!(d["message"].as_str().is_some_and(|m| !m.is_empty()), "{d}");
        node.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// server pings, HTTP send to one connection
// ---------------------------------------------------------------------------------------------

ws_test! {
    async fn server_pings_keep_a_quiet_client_alive_past_the_idle_timeout() {
        let node = start_node(|s| {
            s.ws.heartbeat_interval = Duration::from_millis(200);
            s.ws.idle_timeout = Duration::from_secs(2);
        })
        .await;
        let (mut c, hello) = connect(node.local_addr, "/ws").await;
        assert_eq!(hello["data"]["heartbeatInterval"], 200);
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            match tokio::time::timeout_at(until, c.ws.next()).await {
                Err(_) => break,
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(Some(Ok(Message::Text(t)))) => panic!("unexpected message {t}"),
                Ok(other) => panic!("the connection ended while the client answered pings: {other:?}"),
            }
        }
        assert!(pings >= 3, "a ping every 200 ms over 3 s, got {pings}");
        assert_usable(&mut c, "after-idle").await;
        node.shutdown().await;
    }
}

ws_test! {
    async fn http_send_to_connection_id_reaches_only_that_connection() {
        let node = start_node(|_| {}).await;
        let addr = node.local_addr;
        let (mut a, hello_a) = connect(addr, "/ws?user_id=u1&clientId=a").await;
        let (mut b, hello_b) = connect(addr, "/ws?user_id=u1&clientId=b").await;
        let id_a = hello_a["data"]["connectionId"].clone();
        assert_ne!(id_a, hello_b["data"]["connectionId"]);
        let (status, body) = post(
            addr,
            "/api/ws/send",
            json!({"type": "notification", "connectionId": id_a, "data": {"msg": "just you"}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["delivered"], 1, "{body}");
        let m = a.expect_type("notification").await;
        assert_eq!(m["data"]["msg"], "just you");
        b.expect_silence().await;
        node.shutdown().await;
    }
}

/// Frames the client writes together with the upgrade request (so that the server reads them
/// with the request, before the upgrade completes) are handled as if they came later: the
/// session starts with those bytes, copied out of hyper's read buffer.
#[tokio::test]
async fn frames_sent_with_the_upgrade_request_are_handled() {
    let node = start_node(|_| {}).await;
    let mut early = raw_frame(
        true,
        0x1,
        br#"{"type":"subscribe","id":"early-1","data":{"topics":["early"]}}"#,
        Some([1, 2, 3, 4]),
    );
    early.extend(raw_frame(
        true,
        0x1,
        br#"{"type":"ping","id":"early-2"}"#,
        Some([5, 6, 7, 8]),
    ));
    let mut ws = RawWs::connect_with_early_frames(node.local_addr, "/ws?user_id=e", &early).await;
    ws.expect_type("connection").await;
    let ack = ws.expect_type("ack").await;
    assert_eq!(ack["data"]["requestId"], "early-1", "{ack}");
    assert_eq!(ack["data"]["topics"], json!(["early"]), "{ack}");
    let pong = ws.expect_type("pong").await;
    assert_eq!(pong["data"]["requestId"], "early-2", "{pong}");
    publish(node.local_addr, "early", "tick", json!({"n": 1})).await;
    let m = ws.expect_type("tick").await;
    assert_eq!(m["data"]["n"], 1, "{m}");
}
