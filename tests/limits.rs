//! Every limit of SPEC section 6 at its edge: the exact limit passes, one unit more is refused,
//! and every refusal says why (an `error` message, a `disconnect` notice, a close code).
//! Also the shutdown paths: `RunningNode::shutdown` and SIGTERM / SIGINT on the real binary.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use wsgate::broker::TopicMessage;

/// A `ping` with request id `id`, padded with a string field to exactly `total` bytes.
fn padded_ping(id: &str, total: usize) -> String {
    let base = json!({"type": "ping", "id": id, "pad": ""}).to_string();
    assert!(total >= base.len(), "{total} is too small for a ping");
    let s = json!({"type": "ping", "id": id, "pad": "x".repeat(total - base.len())}).to_string();
    assert_eq!(s.len(), total);
    s
}

/// Asserts that `v` is an `error` message with `code` / `numeric`; returns its `data`.
fn assert_error(v: &Value, code: &str, numeric: u64) -> Value {
    assert_eq!(v["type"], "error", "expected an error, got {v}");
    assert_eq!(v["data"]["code"], code, "{v}");
    assert_eq!(v["data"]["numericCode"], numeric, "{v}");
    assert!(
        v["data"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "an error says why: {v}"
    );
    v["data"].clone()
}

/// Sends `ping` with request id `id` and asserts the `pong` that answers it.
async fn assert_alive(c: &mut Client, id: &str) {
    let pong = c.request(json!({"type": "ping", "id": id})).await;
    assert_eq!(pong["type"], "pong", "{pong}");
}

// ---------------------------------------------------------------------------------------------
// Message size: the whole message, fragments included.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn message_of_exactly_max_size_is_handled_one_byte_more_closes_1009() {
    let node = start_node(|s| s.ws.max_message_size = 1024).await;
    let (mut c, _) = connect(node.local_addr, "/ws").await;

    c.send_text(&padded_ping("exact", 1024)).await;
    let pong = c.expect_type("pong").await;
    assert_eq!(pong["data"]["requestId"], "exact");

    c.send_text(&padded_ping("over", 1025)).await;
    let (code, _reason, seen) = c.expect_close().await;
    assert_eq!(code, 1009, "seen {seen:?}");
    assert_error(&seen[0], "MESSAGE_TOO_LARGE", 2001);
    find_disconnect(&seen, 1009, false);
    assert!(
        !seen.iter().any(|m| m["type"] == "pong"),
        "the oversized ping was answered: {seen:?}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn fragmented_message_counts_all_fragments_against_the_limit() {
    let node = start_node(|s| s.ws.max_message_size = 1024).await;
    let mut raw = RawWs::connect(node.local_addr, "/ws").await;
    raw.expect_type("connection").await;

    // Two messages of exactly 1024 bytes in three fragments each, with a ping between
    // fragments: both pass (the count starts again with each message; control frames do not
    // count).
    for id in ["frag1", "frag2"] {
        let msg = padded_ping(id, 1024);
        let b = msg.as_bytes();
        raw.send_frame(false, op::TEXT, &b[..400]).await;
        raw.send_frame(true, op::PING, b"hb").await;
        raw.send_frame(false, op::CONTINUATION, &b[400..800]).await;
        raw.send_frame(true, op::CONTINUATION, &b[800..]).await;
        let control = raw.read_frame().await.expect("a pong frame");
        assert_eq!(
            (control.opcode, control.payload.as_slice()),
            (op::PONG, &b"hb"[..])
        );
        let pong = raw.expect_type("pong").await;
        assert_eq!(pong["data"]["requestId"], id);
    }

    // 1025 bytes in fragments of at most 400: every frame is small, the message is not.
    let msg = padded_ping("frag-over", 1025);
    let b = msg.as_bytes();
    raw.send_frame(false, op::TEXT, &b[..400]).await;
    raw.send_frame(false, op::CONTINUATION, &b[400..800]).await;
    raw.send_frame(true, op::CONTINUATION, &b[800..]).await;
    let (code, _reason, seen) = raw.expect_close().await;
    assert_eq!(code, 1009, "seen {seen:?}");
    assert_error(&seen[0], "MESSAGE_TOO_LARGE", 2001);
    find_disconnect(&seen, 1009, false);
    assert!(!seen.iter().any(|m| m["type"] == "pong"), "{seen:?}");
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// UTF-8, masking, malformed messages.
// ---------------------------------------------------------------------------------------------

async fn expect_1007(raw: &mut RawWs) {
    let (code, _reason, seen) = raw.expect_close().await;
    assert_eq!(code, 1007, "seen {seen:?}");
    find_disconnect(&seen, 1007, false);
    assert!(!seen.iter().any(|m| m["type"] == "pong"), "{seen:?}");
}

#[tokio::test]
async fn invalid_utf8_closes_1007_whole_or_fragmented() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;

    // One frame with a byte that is never UTF-8.
    let mut raw = RawWs::connect(addr, "/ws").await;
    raw.expect_type("connection").await;
    let mut bad = br#"{"type":"ping","id":"x","pad":""#.to_vec();
    bad.push(0xff);
    bad.extend_from_slice(br#""}"#);
    raw.send_frame(true, op::TEXT, &bad).await;
    expect_1007(&mut raw).await;

    // A character split across fragments: neither fragment is valid UTF-8 alone, the message is.
    let mut raw = RawWs::connect(addr, "/ws").await;
    raw.expect_type("connection").await;
    let text = r#"{"type":"ping","id":"split","pad":"é€"}"#;
    let b = text.as_bytes();
    let cut = text.find('é').expect("é") + 1; // between the two bytes of é
    assert!(std::str::from_utf8(&b[..cut]).is_err() && std::str::from_utf8(&b[cut..]).is_err());
    raw.send_frame(false, op::TEXT, &b[..cut]).await;
    raw.send_frame(true, op::CONTINUATION, &b[cut..]).await;
    let pong = raw.expect_type("pong").await;
    assert_eq!(pong["data"]["requestId"], "split");

    // The last fragment ends in the middle of a character.
    let text = r#"{"type":"ping","id":"cut","pad":"é"}"#;
    let b = text.as_bytes();
    let cut = text.find('é').expect("é") + 1;
    raw.send_frame(false, op::TEXT, &b[..10]).await;
    raw.send_frame(true, op::CONTINUATION, &b[10..cut]).await;
    expect_1007(&mut raw).await;

    // An invalid byte in a middle fragment.
    let mut raw = RawWs::connect(addr, "/ws").await;
    raw.expect_type("connection").await;
    raw.send_frame(false, op::TEXT, br#"{"type":"ping","#).await;
    raw.send_frame(false, op::CONTINUATION, &[b'"', 0xc3, 0x28, b'"'])
        .await;
    raw.send_frame(true, op::CONTINUATION, br#":1}"#).await;
    expect_1007(&mut raw).await;
    node.shutdown().await;
}

#[tokio::test]
async fn unmasked_client_frame_closes_1002_after_earlier_messages_are_handled() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;

    // A good message and an unmasked one in the same write: the first is still answered.
    let mut raw = RawWs::connect(addr, "/ws").await;
    raw.expect_type("connection").await;
    let ping = json!({"type": "ping", "id": "before"}).to_string();
    let mut bytes = raw_frame(true, op::TEXT, ping.as_bytes(), Some([1, 2, 3, 4]));
    bytes.extend(raw_frame(true, op::TEXT, ping.as_bytes(), None));
    raw.send_raw(&bytes).await;
    let (code, _reason, seen) = raw.expect_close().await;
    assert_eq!(code, 1002, "seen {seen:?}");
    let pongs: Vec<_> = seen.iter().filter(|m| m["type"] == "pong").collect();
    assert_eq!(pongs.len(), 1, "only the masked ping is answered: {seen:?}");
    assert_eq!(pongs[0]["data"]["requestId"], "before");
    find_disconnect(&seen, 1002, false);

    // An unmasked control frame is just as much a violation.
    let mut raw = RawWs::connect(addr, "/ws").await;
    raw.expect_type("connection").await;
    raw.send_unmasked(true, op::PING, b"hi").await;
    let (code, _reason, seen) = raw.expect_close().await;
    assert_eq!(code, 1002, "seen {seen:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn malformed_messages_get_an_error_and_the_connection_stays() {
    let node = start_node(|_| {}).await;
    let (mut c, _) = connect(node.local_addr, "/ws").await;
    // (message, the requestId its error must carry, if any)
    let cases = [
        ("not json", None),
        (r#"{"type":"ping""#, None),
        (r#"{"id":"no-type","data":{}}"#, Some("no-type")),
        (r#"{"type":5,"id":"numeric-type"}"#, Some("numeric-type")),
        (
            r#"{"type":null,"messageId":"null-type"}"#,
            Some("null-type"),
        ),
        (r#"{"type":"","id":"empty-type"}"#, Some("empty-type")),
        ("[1,2]", None),
        // An array is not an envelope, even one whose items would fit its fields in order.
        (r#"["ping","arr"]"#, None),
        (r#""ping""#, None),
        ("", None),
    ];
    for (text, request_id) in cases {
        c.send_text(text).await;
        let v = c.recv_json().await;
        let data = assert_error(&v, "INVALID_MESSAGE_FORMAT", 2000);
        match request_id {
            Some(id) => assert_eq!(data["requestId"], id, "{text}: {v}"),
            None => assert!(data.get("requestId").is_none(), "{text}: {v}"),
        }
    }
    c.ws.send(Message::binary(br#"{"type":"ping","id":"bin"}"#.to_vec()))
        .await
        .expect("send binary");
    let v = c.recv_json().await;
    assert_error(&v, "INVALID_MESSAGE_FORMAT", 2000);
    assert_alive(&mut c, "still-here").await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Subscriptions and topic names.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn default_subscription_limit_is_128() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    assert_eq!(node.context().settings.ws.max_subscriptions, 128);
    let (mut c, _) = connect(addr, "/ws").await;
    let topics: Vec<String> = (0..128).map(|i| format!("t{i}")).collect();
    let ack = c
        .request(json!({"type": "subscribe", "id": "s128", "data": {"topics": topics}}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["data"]["topics"].as_array().map(Vec::len), Some(128));

    let refused = c
        .request(json!({"type": "subscribe", "id": "s129", "data": {"topics": ["t128"]}}))
        .await;
    assert_error(&refused, "TOO_MANY_SUBSCRIPTIONS", 3003);
    assert_eq!(node.context().hub.subscriber_count("t128"), 0);

    // A topic already held is not a new subscription, even at the limit.
    let again = c
        .request(json!({"type": "subscribe", "id": "again", "data": {"topic": "t0"}}))
        .await;
    assert_eq!(again["type"], "ack", "{again}");

    // The earlier subscriptions still work.
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": "t127", "type": "n", "data": 1}),
    )
    .await;
    assert_eq!((status, &body["delivered"]), (200, &json!(1)), "{body}");
    let m = c.expect_type("n").await;
    assert_eq!(m["topic"], "t127");
    let (_, body) = post(
        addr,
        "/api/publish",
        json!({"topic": "t128", "type": "n", "data": 1}),
    )
    .await;
    assert_eq!(body["delivered"], 0, "{body}");
    node.shutdown().await;
}

#[tokio::test]
async fn subscription_requests_are_all_or_nothing_at_the_limit() {
    let node = start_node(|s| s.ws.max_subscriptions = 3).await;
    let hub = &node.context().hub;
    let (mut c, _) = connect(node.local_addr, "/ws").await;
    let sub = |id: &str, topics: &[&str]| json!({"type": "subscribe", "id": id, "data": {"topics": topics}});

    assert_eq!(c.request(sub("1", &["a"])).await["type"], "ack");
    // Three new topics with two slots left: none is subscribed.
    let refused = c.request(sub("2", &["b", "c", "d"])).await;
    assert_error(&refused, "TOO_MANY_SUBSCRIPTIONS", 3003);
    for t in ["b", "c", "d"] {
        assert_eq!(
            hub.subscriber_count(t),
            0,
            "{t} was subscribed by a refused request"
        );
    }
    // Exactly up to the limit: accepted.
    let ack = c.request(sub("3", &["b", "c"])).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["data"]["topics"], json!(["b", "c"]));
    assert_error(
        &c.request(sub("4", &["d"])).await,
        "TOO_MANY_SUBSCRIPTIONS",
        3003,
    );
    // Held topics plus nothing new: fine.
    assert_eq!(c.request(sub("5", &["a", "b"])).await["type"], "ack");
    // Unsubscribing frees a slot.
    let unsub = c
        .request(json!({"type": "unsubscribe", "id": "6", "data": {"topics": ["a"]}}))
        .await;
    assert_eq!(unsub["type"], "ack", "{unsub}");
    assert_eq!(c.request(sub("7", &["d"])).await["type"], "ack");
    for (t, n) in [("a", 0), ("b", 1), ("c", 1), ("d", 1)] {
        assert_eq!(hub.subscriber_count(t), n, "{t}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn topic_names_follow_the_rules() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let max = node.context().settings.ws.max_topic_length;
    let hub = &node.context().hub;
    let (mut c, _) = connect(addr, "/ws").await;
    let sub = |id: &str, topics: Vec<String>| json!({"type": "subscribe", "id": id, "data": {"topics": topics}});

    let longest = "a".repeat(max);
    let ack = c.request(sub("max", vec![longest.clone()])).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let ack = c
        .request(sub("chars", vec!["chat:room-1/a@b_c.d".into()]))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");

    let too_long = "a".repeat(max + 1);
    for (i, bad) in [
        too_long.clone(),
        "has space".into(),
        "star*".into(),
        String::new(),
        "é".into(),
    ]
    .into_iter()
    .enumerate()
    {
        let v = c.request(sub(&format!("bad{i}"), vec![bad.clone()])).await;
        assert_error(&v, "INVALID_TOPIC", 3004);
        assert_eq!(hub.subscriber_count(&bad), 0, "{bad:?}");
    }
    // One bad name refuses the whole request.
    let v = c
        .request(sub("mixed", vec!["fine".into(), "not fine".into()]))
        .await;
    assert_error(&v, "INVALID_TOPIC", 3004);
    assert_eq!(hub.subscriber_count("fine"), 0);

    // The same rules on the HTTP API and at connect time.
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": too_long, "type": "n", "data": 1}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "INVALID_TOPIC", "{body}");
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": longest, "type": "n", "data": 1}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (mut c2, hello) = connect(addr, "/ws?subscriptions=ok1,bad*").await;
    assert_eq!(hello["data"]["subscriptions"], json!([]), "{hello}");
    assert_error(&c2.recv_json().await, "INVALID_TOPIC", 3004);
    assert_eq!(hub.subscriber_count("ok1"), 0);
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Rate and admission.
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn inbound_rate_is_a_token_bucket() {
    let node = start_node(|s| {
        s.ws.rate_per_second = 1.0;
        s.ws.rate_burst = 5;
    })
    .await;
    let (mut c, _) = connect(node.local_addr, "/ws").await;
    for i in 0..6 {
        c.send_json(json!({"type": "ping", "id": format!("p{i}")}))
            .await;
    }
    for i in 0..5 {
        let pong = c.expect_type("pong").await;
        assert_eq!(pong["data"]["requestId"], format!("p{i}"));
    }
    let refused = c.recv_json().await;
    let data = assert_error(&refused, "RATE_LIMIT_EXCEEDED", 2002);
    assert_eq!(
        data["requestId"], "p5",
        "the refusal names the dropped request"
    );
    let retry = data["retryAfter"].as_u64().expect("retryAfter in ms");
    assert!(retry > 0 && retry <= 1000, "retryAfter {retry}");

    // The connection stays; a second later there is a token again (one: the refill rate, not
    // the burst).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.send_json(json!({"type": "ping", "id": "later"})).await;
    c.send_json(json!({"type": "ping", "id": "too-soon"})).await;
    assert_eq!(c.expect_type("pong").await["data"]["requestId"], "later");
    let data = assert_error(&c.recv_json().await, "RATE_LIMIT_EXCEEDED", 2002);
    assert_eq!(data["requestId"], "too-soon");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_connection_limit_refuses_with_1013_and_frees_slots() {
    let node = start_node(|s| s.ws.max_connections = 2).await;
    let addr = node.local_addr;
    let (a, _) = connect(addr, "/ws?clientId=a").await;
    let (mut b, _) = connect(addr, "/ws?clientId=b").await;

    let mut third = connect_raw(addr, "/ws?clientId=c").await;
    let (code, _reason, seen) = third.expect_close().await;
    assert_eq!(code, 1013, "seen {seen:?}");
    assert_error(&seen[0], "TOO_MANY_CONNECTIONS", 1000);
    find_disconnect(&seen, 1013, true);
    assert!(!seen.iter().any(|m| m["type"] == "connection"), "{seen:?}");
    assert_eq!(node.context().hub.connection_count(), 2);

    a.close().await;
    let deadline = Instant::now() + WAIT;
    let mut admitted = loop {
        let mut c = connect_raw(addr, "/ws?clientId=d").await;
        let first = c.recv_json().await;
        if first["type"] == "connection" {
            break c;
        }
        assert_error(&first, "TOO_MANY_CONNECTIONS", 1000);
        assert!(
            Instant::now() < deadline,
            "the closed connection's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Full again.
    let mut fourth = connect_raw(addr, "/ws?clientId=e").await;
    assert_eq!(fourth.expect_close().await.0, 1013);
    assert_alive(&mut b, "b").await;
    assert_alive(&mut admitted, "d").await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Send queue bound: a slow consumer is cut off, nobody else is affected.
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected_and_others_get_every_message() {
    const BATCH: u64 = 8; // 8 x ~2 KB: even three batches in flight fit the good client's 64 KiB queue
    const MAX_MESSAGES: u64 = 20_000;
    let node = start_node(|s| {
        s.ws.send_queue_bytes = 64 * 1024;
        s.ws.max_message_size = 64 * 1024;
    })
    .await;
    let addr = node.local_addr;
    let ctx = std::sync::Arc::clone(node.context());

    // Subscribes, then never reads again (and has a small receive window).
    let mut slow = RawWs::connect_small_buffer(addr, "/ws?clientId=slow", 4096).await;
    slow.expect_type("connection").await;
    slow.send_json(json!({"type": "subscribe", "id": "s", "data": {"topics": ["flood"]}}))
        .await;
    assert_eq!(slow.expect_type("ack").await["data"]["requestId"], "s");
    let (mut good, _) = connect(addr, "/ws?clientId=good").await;
    let ack = good
        .request(json!({"type": "subscribe", "id": "g", "data": {"topics": ["flood"]}}))
        .await;
    assert_eq!(ack["type"], "ack");

    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(2000))).expect("JSON");
    let mut published = 0u64;
    let mut cut_at = None;
    let mut batches_after_cut = 0;
    let mut good_next = 1u64;
    while batches_after_cut < 2 {
        assert!(
            published < MAX_MESSAGES,
            "the slow consumer was never cut off"
        );
        for _ in 0..BATCH {
            let receipt = ctx
                .broker
                .publish(TopicMessage::new("flood", "bulk", data.clone()))
                .await
                .expect("publish");
            published += 1;
            assert_eq!(receipt.seq, published);
            match cut_at {
                None if receipt.delivered_here < 2 => cut_at = Some(published),
                Some(_) => assert_eq!(receipt.delivered_here, 1, "only the good client is left"),
                None => {}
            }
        }
        // The good client reads each batch before the next one is published.
        for _ in 0..BATCH {
            let m = good.expect_type("bulk").await;
            assert_eq!(
                m["seq"], good_next,
                "the good client missed or reordered a message"
            );
            good_next += 1;
        }
        if cut_at.is_some() {
            batches_after_cut += 1;
        }
    }
    let cut_at = cut_at.expect("cut");
    assert_eq!(good_next, published + 1);

    // What the slow client finds when it finally reads: a prefix of the publications in order,
    // then the notice and close 4008.
    let (code, _reason, seen) = slow.expect_close().await;
    assert_eq!(code, 4008);
    let last = seen.last().expect("messages before the close");
    assert_eq!(
        last["type"], "disconnect",
        "the notice comes right before the close"
    );
    find_disconnect(&seen, 4008, true);
    let seqs: Vec<u64> = seen
        .iter()
        .filter(|m| m["type"] == "bulk")
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert!(
        seqs.iter().copied().eq(1..=seqs.len() as u64),
        "the slow client got a gap or a reordering"
    );
    assert!(
        (seqs.len() as u64) < cut_at,
        "{} delivered, cut at {cut_at}",
        seqs.len()
    );

    // The slow connection goes away; the good one is still there and untouched.
    let deadline = Instant::now() + WAIT;
    while ctx.hub.connection_count() != 1 {
        assert!(
            Instant::now() < deadline,
            "the slow connection was never removed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_alive(&mut good, "still-good").await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Idle timeout.
// ---------------------------------------------------------------------------------------------

/// The heartbeat tests' ping period and idle timeout: the timeout is ten pings, so a stall of a
/// few hundred milliseconds on a loaded runner neither cuts off a client that answers nor
/// leaves too few pings to count.
const HEARTBEAT: Duration = Duration::from_millis(200);
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn client_that_never_answers_pings_is_closed_4002() {
    let node = start_node(|s| {
        s.ws.heartbeat_interval = HEARTBEAT;
        s.ws.idle_timeout = IDLE_TIMEOUT;
    })
    .await;
    let mut raw = RawWs::connect(node.local_addr, "/ws").await;
    let hello = raw.expect_type("connection").await;
    assert_eq!(
        hello["data"]["heartbeatInterval"],
        HEARTBEAT.as_millis() as u64
    );
    let mut pings = 0;
    let close = loop {
        let f = raw
            .read_frame()
            .await
            .expect("a close frame before the end");
        match f.opcode {
            op::PING => pings += 1,
            op::TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
                assert_eq!(v["type"], "disconnect", "{v}");
                assert_eq!(v["data"]["code"], 4002);
                assert_eq!(v["data"]["reconnect"], true);
            }
            op::CLOSE => break f,
            other => panic!("unexpected opcode {other}"),
        }
    };
    assert_eq!(
        u16::from_be_bytes([close.payload[0], close.payload[1]]),
        4002
    );
    assert!(
        pings >= 2,
        "the server pings idle clients ({pings} pings seen)"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn client_that_answers_pings_outlives_the_idle_timeout() {
    let node = start_node(|s| {
        s.ws.heartbeat_interval = HEARTBEAT;
        s.ws.idle_timeout = IDLE_TIMEOUT;
    })
    .await;
    let mut raw = RawWs::connect(node.local_addr, "/ws").await;
    raw.expect_type("connection").await;
    let until = Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1);
    let mut pongs = 0;
    while Instant::now() < until {
        let f = raw.read_frame().await.expect("connection stays open");
        assert_ne!(
            f.opcode,
            op::CLOSE,
            "closed: {:?}",
            String::from_utf8_lossy(&f.payload)
        );
        if f.opcode == op::PING {
            raw.send_frame(true, op::PONG, &f.payload).await;
            pongs += 1;
        }
    }
    assert!(pongs >= 5, "{pongs} pings answered");
    raw.send_json(json!({"type": "ping", "id": "alive"})).await;
    assert_eq!(raw.expect_type("pong").await["data"]["requestId"], "alive");
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Shutdown.
// ---------------------------------------------------------------------------------------------

/// One request on a kept-alive HTTP connection; returns status, lower-cased head and JSON body.
async fn keepalive_request(stream: &mut TcpStream, head: &str) -> (u16, String, Value) {
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("response in time")
            .expect("read");
        assert!(n > 0, "connection closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let resp_head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let len: usize = resp_head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    while buf.len() < head_end + len {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.expect("read body");
        assert!(n > 0, "body cut short");
        buf.extend_from_slice(&chunk[..n]);
    }
    let status = resp_head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let body = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    (status, resp_head, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_1001_and_refuses_new_connections() {
    let node = start_node(|_| {}).await;
    let addr = node.local_addr;
    let ctx = std::sync::Arc::clone(node.context());
    let (mut a, _) = connect(addr, "/ws?user_id=u1").await;
    let (mut b, _) = connect(addr, "/ws").await;
    // An HTTP connection accepted before the shutdown and kept alive through it.
    let mut http = TcpStream::connect(addr).await.expect("connect");
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let (status, _, body) = keepalive_request(&mut http, &get("/readyz")).await;
    assert_eq!((status, &body["ready"]), (200, &json!(true)), "{body}");

    let shutdown = tokio::spawn(node.shutdown());
    for c in [&mut a, &mut b] {
        let (code, _reason, seen) = c.expect_close().await;
        assert_eq!(code, 1001, "seen {seen:?}");
        find_disconnect(&seen, 1001, true);
    }
    assert!(ctx.is_shutting_down());
    let (status, _, body) = keepalive_request(&mut http, &get("/readyz")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    let (status, _, body) = keepalive_request(&mut http, &get("/healthz")).await;
    assert_eq!(status, 200, "{body}");
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let (status, head, body) = keepalive_request(&mut http, &upgrade).await;
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after:"), "{head}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");

    tokio::time::timeout(WAIT, shutdown)
        .await
        .expect("shutdown finishes in time")
        .expect("shutdown task");
    assert_eq!(ctx.hub.connection_count(), 0);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted after shutdown"
    );
}

// ---------------------------------------------------------------------------------------------
// Signals on the real binary.
// ---------------------------------------------------------------------------------------------

/// Kills the child if the test ends early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn signal_closes_with_1001_and_exits(signal: &str) {
    let addr = free_port();
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        cmd.env_remove(k);
    }
    cmd.args(["--listen", &addr.to_string(), "--drain-seconds", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().expect("log"));
    let mut child = ChildGuard(cmd.spawn().expect("spawn wsgate"));
    let logs = || std::fs::read_to_string(log.path()).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("wsgate exited early with {status}: {}", logs());
        }
        assert!(
            Instant::now() < deadline,
            "wsgate never listened: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut c, _) = connect(addr, "/ws").await;
    assert_alive(&mut c, "before").await;

    let pid = child.0.id().to_string();
    let killed = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .expect("kill");
    assert!(killed.success());
    let (code, _reason, seen) = c.expect_close().await;
    assert_eq!(code, 1001, "seen {seen:?}; logs: {}", logs());
    find_disconnect(&seen, 1001, true);

    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "wsgate did not exit after SIG{signal}: {}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "exit status {status}: {}", logs());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_clients_1001_and_the_binary_exits() {
    signal_closes_with_1001_and_exits("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_closes_clients_1001_and_the_binary_exits() {
    signal_closes_with_1001_and_exits("INT").await;
}
