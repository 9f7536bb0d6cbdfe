//! permessage-deflate (RFC 7692) on the wire, with the raw client: what is negotiated, compressed
//! client messages (whole, fragmented, with control frames between fragments), the size limit
//! after inflation, every refusal and its close code, and which server frames go compressed.
//!
//! Payloads are built and decoded with `wsgate::ws::deflate::{compress, inflate}`; that they
//! agree with independent implementations is what `tests/python_client.rs` (Python
//! `websockets`) and the Autobahn cases (`scripts/autobahn`) check.

mod common;

use std::net::SocketAddr;

use common::*;
use serde_json::{json, Value};
use wsgate::ws::deflate::{compress, inflate, RESPONSE};

/// A `ping` with request id `id` whose padding makes it `total` bytes long.
fn padded_ping(id: &str, total: usize) -> Vec<u8> {
    let base = json!({"type": "ping", "id": id, "pad": ""}).to_string();
    assert!(total >= base.len(), "{total} is too small for a ping");
    let s = json!({"type": "ping", "id": id, "pad": "x".repeat(total - base.len())}).to_string();
    s.into_bytes()
}

/// The next data frame, inflated when it came compressed; returns (was it compressed, JSON).
/// Pings and pongs are skipped.
async fn recv_message(raw: &mut RawWs) -> (bool, Value) {
    loop {
        let f = raw.read_frame().await.expect("a frame, not the end");
        match f.opcode {
            op::PING | op::PONG => continue,
            op::TEXT => {
                assert!(f.fin, "server messages are not fragmented");
                let payload = if f.rsv1 {
                    inflate(&f.payload, 1 << 24).expect("the server's compressed frame inflates")
                } else {
                    f.payload
                };
                let v = serde_json::from_slice(&payload).expect("server sends JSON");
                return (f.rsv1, v);
            }
            other => panic!(
                "expected a text frame, got opcode {other}: {:?}",
                String::from_utf8_lossy(&f.payload)
            ),
        }
    }
}

/// Reads messages until one of `kind` arrives; returns whether it was compressed, and it.
async fn expect_kind(raw: &mut RawWs, kind: &str) -> (bool, Value) {
    loop {
        let (rsv1, v) = recv_message(raw).await;
        if v["type"] == kind {
            return (rsv1, v);
        }
    }
}

async fn publish(addr: SocketAddr, topic: &str, data: Value) {
    let (status, body) = post(
        addr,
        "/api/publish",
        json!({"topic": topic, "type": "update", "data": data}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

async fn subscribe(raw: &mut RawWs, topic: &str) {
    raw.send_json(json!({"type": "subscribe", "id": "s", "data": {"topics": [topic]}}))
        .await;
    let (_, ack) = expect_kind(raw, "ack").await;
    assert_eq!(ack["data"]["topics"], json!([topic]), "{ack}");
}

/// A deflate client on `/ws`, past its `connection` message.
async fn deflate_client(addr: SocketAddr) -> RawWs {
    let mut raw = RawWs::connect_deflate(addr, "/ws").await;
    let (compressed, hello) = recv_message(&mut raw).await;
    assert_eq!(hello["type"], "connection", "{hello}");
    assert!(
        !compressed,
        "the connection message is small and goes plain"
    );
    raw
}

/// Asserts that the server closes with `code`; returns the text messages before the close.
async fn expect_close_code(raw: &mut RawWs, code: u16) -> Vec<Value> {
    let (got, reason, seen) = raw.expect_close().await;
    assert_eq!(got, code, "reason {reason:?}, seen {seen:?}");
    seen
}

// ---------------------------------------------------------------------------------------------
// Negotiation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_accepted_offer_gets_the_no_context_takeover_response() {
    let node = start_node(|_| {}).await;
    let raw = RawWs::connect_deflate(node.local_addr, "/ws").await;
    assert_eq!(
        raw.response_header("sec-websocket-extensions").as_deref(),
        Some(RESPONSE)
    );
    assert_eq!(
        RESPONSE,
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn a_declined_offer_gets_no_extension_and_plain_frames() {
    let node = start_node(|_| {}).await;
    // zlib cannot compress with an 8-bit window, so this offer cannot be honoured.
    let offer = [(
        "Sec-WebSocket-Extensions",
        "permessage-deflate; server_max_window_bits=8",
    )];
    let mut raw = RawWs::connect_with_headers(node.local_addr, "/ws", &offer).await;
    assert_eq!(raw.response_header("sec-websocket-extensions"), None);
    let (compressed, hello) = recv_message(&mut raw).await;
    assert_eq!(
        (compressed, hello["type"].as_str()),
        (false, Some("connection"))
    );
    subscribe(&mut raw, "news").await;
    let big = json!({"text": "a compressible sentence. ".repeat(200)});
    publish(node.local_addr, "news", big.clone()).await;
    let (compressed, publication) = expect_kind(&mut raw, "update").await;
    assert!(!compressed, "no deflate, no RSV1");
    assert_eq!(publication["data"], big);
    // And RSV1 from this client is refused: nothing was negotiated.
    raw.send_frame(true, op::TEXT | op::RSV1, &compress(b"{}", 1))
        .await;
    expect_close_code(&mut raw, 1002).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_smaller_server_window_is_honoured() {
    // Level 6: dynamic Huffman codes, so that even without matches the frame gets smaller.
    let node = start_node(|s| s.compression.level = 6).await;
    let offer = [(
        "Sec-WebSocket-Extensions",
        "permessage-deflate; server_max_window_bits=9; client_max_window_bits",
    )];
    let mut raw = RawWs::connect_with_headers(node.local_addr, "/ws", &offer).await;
    assert_eq!(
        raw.response_header("sec-websocket-extensions"),
        Some(format!("{RESPONSE}; server_max_window_bits=9"))
    );
    expect_kind(&mut raw, "connection").await;
    subscribe(&mut raw, "news").await;
    // Repeats 1000 bytes apart: a 15-bit window would reach back for them, a 9-bit one cannot.
    let mut x: u32 = 1;
    let chunk: String = (0..1000)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            char::from(b'a' + ((x >> 16) % 26) as u8)
        })
        .collect();
    let data = json!({"text": chunk.repeat(8)});
    publish(node.local_addr, "news", data.clone()).await;
    let f = loop {
        let f = raw.read_frame().await.expect("a frame");
        if f.opcode == op::TEXT {
            break f;
        }
    };
    assert!(f.rsv1, "the publication is compressed");
    let mut small_window = flate2::Decompress::new_with_window_bits(false, 9);
    let mut input = f.payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 * 1024);
    small_window
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .expect("inflates with a 9-bit window");
    let v: Value = serde_json::from_slice(&out).expect("JSON");
    assert_eq!(v["data"], data);
    node.shutdown().await;
}

#[tokio::test]
async fn compression_off_means_no_extension() {
    let node = start_node(|s| s.compression.enabled = false).await;
    let mut raw = RawWs::connect_deflate(node.local_addr, "/ws").await;
    assert_eq!(raw.response_header("sec-websocket-extensions"), None);
    expect_kind(&mut raw, "connection").await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Compressed client messages
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_compressed_message_is_understood() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    let ping = padded_ping("big", 20_000);
    let compressed = compress(&ping, 6);
    assert!(compressed.len() < 1000);
    raw.send_frame(true, op::TEXT | op::RSV1, &compressed).await;
    let (_, pong) = expect_kind(&mut raw, "pong").await;
    assert_eq!(pong["data"]["requestId"], "big");
    node.shutdown().await;
}

#[tokio::test]
async fn a_fragmented_compressed_message_with_a_ping_between_fragments() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    let compressed = compress(&padded_ping("frag", 5_000), 6);
    let third = compressed.len() / 3;
    raw.send_frame(false, op::TEXT | op::RSV1, &compressed[..third])
        .await;
    raw.send_frame(true, op::PING, b"between").await;
    raw.send_frame(false, op::CONTINUATION, &compressed[third..2 * third])
        .await;
    raw.send_frame(true, op::CONTINUATION, &compressed[2 * third..])
        .await;
    // The control frame is answered first, in order; then the message.
    let pong = loop {
        let f = raw.read_frame().await.expect("a frame");
        if f.opcode == op::PONG {
            break f;
        }
        assert_ne!(
            f.opcode,
            op::CLOSE,
            "{:?}",
            String::from_utf8_lossy(&f.payload)
        );
    };
    assert_eq!(pong.payload, b"between");
    let (_, reply) = expect_kind(&mut raw, "pong").await;
    assert_eq!(reply["data"]["requestId"], "frag");
    node.shutdown().await;
}

#[tokio::test]
async fn an_inflation_bomb_is_refused_with_1009() {
    let node = start_node(|s| s.ws.max_message_size = 64 * 1024).await;
    let mut raw = deflate_client(node.local_addr).await;
    let bomb = compress(&vec![0u8; 1_000_000], 9);
    assert!(bomb.len() < 5_000, "{} bytes on the wire", bomb.len());
    raw.send_frame(true, op::TEXT | op::RSV1, &bomb).await;
    let seen = expect_close_code(&mut raw, 1009).await;
    let error = seen
        .iter()
        .find(|m| m["type"] == "error")
        .unwrap_or_else(|| panic!("no error message in {seen:?}"));
    assert_eq!(error["data"]["code"], "MESSAGE_TOO_LARGE", "{error}");
    find_disconnect(&seen, 1009, false);
    node.shutdown().await;
}

#[tokio::test]
async fn exactly_the_limit_after_inflation_passes() {
    let node = start_node(|s| s.ws.max_message_size = 64 * 1024).await;
    let mut raw = deflate_client(node.local_addr).await;
    raw.send_frame(
        true,
        op::TEXT | op::RSV1,
        &compress(&padded_ping("edge", 65_536), 6),
    )
    .await;
    let (_, pong) = expect_kind(&mut raw, "pong").await;
    assert_eq!(pong["data"]["requestId"], "edge");
    raw.send_frame(
        true,
        op::TEXT | op::RSV1,
        &compress(&padded_ping("over", 65_537), 6),
    )
    .await;
    expect_close_code(&mut raw, 1009).await;
    node.shutdown().await;
}

#[tokio::test]
async fn rsv1_on_a_ping_is_a_protocol_error() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    raw.send_frame(true, op::PING | op::RSV1, b"").await;
    expect_close_code(&mut raw, 1002).await;
    node.shutdown().await;
}

#[tokio::test]
async fn rsv1_on_a_continuation_is_a_protocol_error() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    let compressed = compress(&padded_ping("c", 500), 6);
    let (a, b) = compressed.split_at(compressed.len() / 2);
    raw.send_frame(false, op::TEXT | op::RSV1, a).await;
    raw.send_frame(true, op::CONTINUATION | op::RSV1, b).await;
    expect_close_code(&mut raw, 1002).await;
    node.shutdown().await;
}

#[tokio::test]
async fn rsv1_without_negotiation_is_a_protocol_error() {
    let node = start_node(|_| {}).await;
    let mut raw = RawWs::connect(node.local_addr, "/ws").await;
    raw.expect_type("connection").await;
    raw.send_frame(
        true,
        op::TEXT | op::RSV1,
        &compress(&padded_ping("n", 200), 6),
    )
    .await;
    expect_close_code(&mut raw, 1002).await;
    node.shutdown().await;
}

#[tokio::test]
async fn corrupt_deflate_data_is_invalid_payload() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    raw.send_frame(true, op::TEXT | op::RSV1, &[0xff, 0xfe, 0xfd, 0xfc, 0x00])
        .await;
    expect_close_code(&mut raw, 1007).await;
    node.shutdown().await;
}

#[tokio::test]
async fn a_compressed_message_that_is_not_utf8_is_invalid_payload() {
    let node = start_node(|_| {}).await;
    let mut raw = deflate_client(node.local_addr).await;
    raw.send_frame(
        true,
        op::TEXT | op::RSV1,
        &compress(&[b'{', 0xc3, 0x28, b'}'], 6),
    )
    .await;
    expect_close_code(&mut raw, 1007).await;
    node.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Compressed server frames
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_large_publication_goes_compressed_to_deflate_clients_and_plain_to_others() {
    let node = start_node(|_| {}).await;
    let mut deflated = deflate_client(node.local_addr).await;
    let mut plain = RawWs::connect(node.local_addr, "/ws").await;
    assert_eq!(plain.response_header("sec-websocket-extensions"), None);
    plain.expect_type("connection").await;
    subscribe(&mut deflated, "metrics").await;
    subscribe(&mut plain, "metrics").await;

    let data =
        json!({"series": (0..200).map(|i| json!({"t": i, "cpu": i % 7})).collect::<Vec<_>>()});
    publish(node.local_addr, "metrics", data.clone()).await;
    let (was_compressed, from_deflated) = expect_kind(&mut deflated, "update").await;
    let (was_plain_compressed, from_plain) = expect_kind(&mut plain, "update").await;
    assert!(was_compressed, "RSV1 set for the deflate client");
    assert!(!was_plain_compressed, "plain for the plain client");
    assert_eq!(from_deflated, from_plain, "one message, two encodings");
    assert_eq!(from_deflated["data"], data);
    node.shutdown().await;
}

#[tokio::test]
async fn a_publication_below_the_threshold_goes_plain_even_to_deflate_clients() {
    let node = start_node(|s| s.compression.threshold = 256).await;
    let mut raw = deflate_client(node.local_addr).await;
    subscribe(&mut raw, "ticks").await;
    publish(node.local_addr, "ticks", json!({"n": 1})).await;
    let (compressed, publication) = expect_kind(&mut raw, "update").await;
    assert!(
        !compressed,
        "a small publication is not worth compressing: {publication}"
    );
    assert_eq!(publication["data"], json!({"n": 1}));
    node.shutdown().await;
}
