//! The echo endpoint (`websocket.echo_path`, for conformance testing): off by default; when on,
//! every message comes back as it was sent (compressed when deflate was negotiated), with the
//! read path of the protocol endpoint (close handshake, ping -> pong, UTF-8, size limit) and no
//! JSON of its own. Also the close-frame checks both endpoints share.

mod common;

use std::net::SocketAddr;

use common::*;
use wsgate::config::{FileConfig, Settings};
use wsgate::ws::deflate::{compress, inflate};

async fn echo_node() -> wsgate::node::RunningNode {
    start_node(|s| s.ws.echo_path = Some("/echo".into())).await
}

/// The next frame that is not a ping or pong.
async fn next_data(raw: &mut RawWs) -> RawFrame {
    loop {
        let f = raw.read_frame().await.expect("a frame, not the end");
        if f.opcode != op::PING && f.opcode != op::PONG {
            return f;
        }
    }
}

/// Every frame up to and including the close frame; returns them and the close code.
async fn until_close(raw: &mut RawWs) -> (Option<u16>, Vec<RawFrame>) {
    let mut frames = Vec::new();
    loop {
        let f = raw
            .read_frame()
            .await
            .unwrap_or_else(|| panic!("stream ended without a close frame; got {frames:?}"));
        if f.opcode == op::CLOSE {
            let code = match f.payload.as_slice() {
                [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
                _ => None,
            };
            return (code, frames);
        }
        frames.push(f);
    }
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

#[tokio::test]
async fn the_echo_endpoint_is_off_by_default() {
    assert_eq!(Settings::default().ws.echo_path, None);
    let node = start_node(|_| {}).await;
    let (status, _) = get(node.local_addr, "/echo").await;
    assert_eq!(status, 404);
    node.shutdown().await;
}

#[test]
fn echo_path_comes_from_yaml_and_must_be_a_path_of_its_own() {
    let mut s = Settings::default();
    FileConfig::parse("websocket:\n  echo_path: /echo\n")
        .expect("parses")
        .apply_to(&mut s)
        .expect("applies");
    assert_eq!(s.ws.echo_path.as_deref(), Some("/echo"));
    assert!(s.validate().is_empty(), "{:?}", s.validate());
    s.ws.echo_path = Some("echo".into());
    let problems = s.validate();
    assert!(
        problems.iter().any(|p| p.path == "websocket.echo_path"),
        "{problems:?}"
    );
    s.ws.echo_path = Some("/ws".into());
    assert!(s.validate().iter().any(|p| p.path == "websocket.echo_path"));
}

#[tokio::test]
async fn text_and_binary_come_back_as_sent_with_no_json_of_its_own() {
    let node = echo_node().await;
    let mut raw = RawWs::connect(node.local_addr, "/echo").await;
    raw.send_text("hello").await;
    let f = next_data(&mut raw).await;
    assert_eq!((f.opcode, f.fin, f.rsv1), (op::TEXT, true, false));
    assert_eq!(f.payload, b"hello", "no connection message, just the echo");

    raw.send_frame(true, op::BINARY, &[0, 1, 2, 0xfe, 0xff])
        .await;
    let f = next_data(&mut raw).await;
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (op::BINARY, &[0, 1, 2, 0xfe, 0xff][..])
    );

    // Not JSON at all, and an empty message: both fine here.
    raw.send_text("{not json").await;
    assert_eq!(next_data(&mut raw).await.payload, b"{not json");
    raw.send_text("").await;
    assert_eq!(next_data(&mut raw).await.payload, b"");

    // Fragments with a ping between them: the pong first, then the whole message.
    raw.send_frame(false, op::TEXT, b"frag").await;
    raw.send_frame(true, op::PING, b"p").await;
    raw.send_frame(true, op::CONTINUATION, b"ment").await;
    let pong = raw.read_frame().await.expect("pong");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (op::PONG, &b"p"[..])
    );
    assert_eq!(next_data(&mut raw).await.payload, b"fragment");

    raw.send_frame(true, op::CLOSE, &close_payload(1000, b"bye"))
        .await;
    let (code, frames) = until_close(&mut raw).await;
    assert_eq!(code, Some(1000));
    assert!(frames.is_empty(), "{frames:?}");
    node.shutdown().await;
}

#[tokio::test]
async fn echoes_go_back_compressed_above_the_threshold() {
    let node = echo_node().await;
    let mut raw = RawWs::connect_deflate(node.local_addr, "/echo").await;
    assert!(raw.response_header("sec-websocket-extensions").is_some());

    let text = "echo me, echo me, echo me. ".repeat(100);
    raw.send_frame(true, op::TEXT | op::RSV1, &compress(text.as_bytes(), 6))
        .await;
    let f = next_data(&mut raw).await;
    assert_eq!((f.opcode, f.rsv1), (op::TEXT, true));
    assert_eq!(
        inflate(&f.payload, 1 << 20).expect("inflates"),
        text.as_bytes()
    );

    // Binary keeps its opcode when compressed.
    let binary: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    raw.send_frame(true, op::BINARY, &binary).await;
    let f = next_data(&mut raw).await;
    assert_eq!((f.opcode, f.rsv1), (op::BINARY, true));
    assert_eq!(inflate(&f.payload, 1 << 20).expect("inflates"), binary);

    // Below the threshold (256 by default): plain.
    raw.send_text("short").await;
    let f = next_data(&mut raw).await;
    assert_eq!((f.rsv1, f.payload.as_slice()), (false, &b"short"[..]));
    node.shutdown().await;
}

#[tokio::test]
async fn echo_refusals_are_close_frames_only() {
    let node = start_node(|s| {
        s.ws.echo_path = Some("/echo".into());
        s.ws.max_message_size = 1024;
    })
    .await;
    let addr: SocketAddr = node.local_addr;

    let mut raw = RawWs::connect(addr, "/echo").await;
    raw.send_frame(true, op::TEXT, &[b'a', 0xc3, 0x28]).await;
    let (code, frames) = until_close(&mut raw).await;
    assert_eq!(code, Some(1007));
    assert!(
        frames.is_empty(),
        "no error message, no disconnect notice: {frames:?}"
    );

    let mut raw = RawWs::connect(addr, "/echo").await;
    raw.send_frame(true, op::BINARY, &[0; 1025]).await;
    let (code, frames) = until_close(&mut raw).await;
    assert_eq!(code, Some(1009));
    assert!(frames.is_empty(), "{frames:?}");

    let mut raw = RawWs::connect(addr, "/echo").await;
    raw.send_unmasked(true, op::TEXT, b"x").await;
    assert_eq!(until_close(&mut raw).await.0, Some(1002));
    node.shutdown().await;
}

#[tokio::test]
async fn invalid_utf8_in_a_fragment_fails_before_the_message_ends() {
    let node = echo_node().await;
    let mut raw = RawWs::connect(node.local_addr, "/echo").await;
    // A character cut at the fragment boundary is fine...
    raw.send_frame(false, op::TEXT, &[b'a', 0xc3]).await;
    raw.send_frame(true, op::CONTINUATION, &[0xa9, b'b']).await;
    assert_eq!(next_data(&mut raw).await.payload, "aéb".as_bytes());
    // ...a sequence that can never be valid fails at once, with the message still open.
    raw.send_frame(false, op::TEXT, b"ok so far").await;
    raw.send_frame(false, op::CONTINUATION, &[0xf4, 0x90, 0x80, 0x80])
        .await;
    assert_eq!(until_close(&mut raw).await.0, Some(1007));
    node.shutdown().await;
}

/// Close frames are checked on both endpoints (RFC 6455 5.5.1 and 7.4).
#[tokio::test]
async fn close_frames_are_checked_and_valid_ones_echoed() {
    let node = echo_node().await;
    for path in ["/echo", "/ws"] {
        for (payload, expected) in [
            (close_payload(1000, b""), Some(1000)),
            (close_payload(1001, b"going"), Some(1001)),
            (close_payload(3000, b""), Some(3000)),
            (close_payload(4999, b""), Some(4999)),
            (Vec::new(), None),
            (vec![0x03], Some(1002)),
            (close_payload(999, b""), Some(1002)),
            (close_payload(1005, b""), Some(1002)),
            (close_payload(1006, b""), Some(1002)),
            (close_payload(1015, b""), Some(1002)),
            (close_payload(2000, b""), Some(1002)),
            (close_payload(5000, b""), Some(1002)),
            (close_payload(1000, &[0xce, 0xba, 0xe1, 0xbd]), Some(1007)),
        ] {
            let mut raw = RawWs::connect(node.local_addr, path).await;
            raw.send_frame(true, op::CLOSE, &payload).await;
            let (code, _) = until_close(&mut raw).await;
            assert_eq!(code, expected, "{path}: close payload {payload:?}");
            assert!(
                raw.read_frame().await.is_none(),
                "the server ends the stream"
            );
        }
    }
    node.shutdown().await;
}
