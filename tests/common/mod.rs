//! Test support: in-process gateway nodes on ephemeral ports, a real WebSocket client
//! (tokio-tungstenite, independent of the server's frame code), and a minimal HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as TCloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::config::Settings;
use wsgate::node::{self, RunningNode};

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long a test waits to be sure something does not happen.
pub const QUIET: Duration = Duration::from_millis(300);

/// Starts a node on 127.0.0.1:0 with `tweak` applied to loopback defaults.
pub async fn start_node(tweak: impl FnOnce(&mut Settings)) -> RunningNode {
    let mut settings = Settings::for_loopback();
    tweak(&mut settings);
    node::start(settings).await.expect("node starts")
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A test client: one WebSocket connection.
pub struct Client {
    pub ws: Ws,
}

/// Connects to `path_and_query` (e.g. `/ws?user_id=u1`) without reading anything.
pub async fn connect_raw(addr: SocketAddr, path_and_query: &str) -> Client {
    let url = format!("ws://{addr}{path_and_query}");
    let (ws, _resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect in time")
        .expect("upgrade succeeds");
    Client { ws }
}

/// Connects and reads the `connection` message; returns the client and that message.
pub async fn connect(addr: SocketAddr, path_and_query: &str) -> (Client, Value) {
    let mut c = connect_raw(addr, path_and_query).await;
    let hello = c.expect_type("connection").await;
    (c, hello)
}

impl Client {
    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws
            .send(Message::text(s.to_string()))
            .await
            .expect("send");
    }

    /// The next text message as JSON (skipping pings/pongs); panics on close or timeout.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no error");
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("server sends JSON")
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Reads until a message of `kind` arrives; returns it.
    pub async fn expect_type(&mut self, kind: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["type"], kind, "expected a {kind} message, got {v}");
        v
    }

    /// Asserts that no text message arrives within `QUIET`.
    pub async fn expect_silence(&mut self) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(QUIET, self.ws.next()).await {
            panic!("expected no message, got {t}");
        }
    }

    /// Reads messages until the close frame; returns its code and reason and the text
    /// messages seen before it.
    pub async fn expect_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match next {
                Some(Ok(Message::Text(t))) => {
                    seen.push(serde_json::from_str(t.as_str()).expect("JSON"))
                }
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string(), seen)
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new(), seen),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("error before close frame: {e}; seen {seen:?}"),
                None => panic!("stream ended without a close frame; seen {seen:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: TCloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
    }

    /// Sends a request and returns the reply that carries `data.requestId == id`.
    pub async fn request(&mut self, msg: Value) -> Value {
        let id = msg["id"].clone();
        self.send_json(msg).await;
        loop {
            let v = self.recv_json().await;
            if v["data"]["requestId"] == id {
                return v;
            }
        }
    }
}

/// A minimal HTTP/1.1 request (`Connection: close`); returns status and JSON body (or Null).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, raw) = http_raw(addr, method, path, body.as_bytes(), headers).await;
    (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
}

pub async fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write body");
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut resp))
        .await
        .expect("response in time")
        .expect("read");
    let text_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end")
        + 4;
    let head = String::from_utf8_lossy(&resp[..text_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    (status, resp[text_end..].to_vec())
}

pub async fn post(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    http(addr, "POST", path, Some(&body), &[]).await
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    http(addr, "GET", path, None, &[]).await
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket client: the handshake and frames done by hand, for what a well-behaved client
// library will not send (unmasked frames, invalid UTF-8, fragments of our choosing) and for
// clients that never read or never answer pings.
// ---------------------------------------------------------------------------------------------

/// The RFC 6455 sample key and its accept value.
const RAW_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const RAW_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
/// The mask every raw client frame uses (any value is valid; a fixed one keeps tests repeatable).
const RAW_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// WebSocket opcodes for [`RawWs`].
pub mod op {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
    /// Or-ed into an opcode for [`super::raw_frame`] / [`super::RawWs::send_frame`]: sets RSV1
    /// (permessage-deflate's "compressed" bit) in the frame's first byte.
    pub const RSV1: u8 = 0x40;
}

/// One frame as the server sent it.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    /// RSV1: the payload is compressed (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

/// A WebSocket client with no protocol logic of its own: it answers nothing by itself.
pub struct RawWs {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    /// The server's upgrade response: status line and headers.
    pub response_head: String,
}

/// Builds one client frame; `mask: None` sends it unmasked (a protocol violation). `opcode` may
/// carry [`op::RSV1`].
pub fn raw_frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            f.push(mask_bit | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(mask_bit | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            f.extend_from_slice(&m);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

impl RawWs {
    /// TCP connect and upgrade on `path_and_query`; panics unless the server answers 101.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> RawWs {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, addr, path_and_query, &[], &[]).await
    }

    /// Like [`RawWs::connect`], with extra request headers (e.g. `Sec-WebSocket-Extensions`).
    pub async fn connect_with_headers(
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> RawWs {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, addr, path_and_query, headers, &[]).await
    }

    /// Connects offering permessage-deflate the way browsers do
    /// (`permessage-deflate; client_max_window_bits`).
    pub async fn connect_deflate(addr: SocketAddr, path_and_query: &str) -> RawWs {
        let offer = [(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        )];
        Self::connect_with_headers(addr, path_and_query, &offer).await
    }

    /// The value of response header `name` (case-insensitive), if the upgrade response had it.
    pub fn response_header(&self, name: &str) -> Option<String> {
        self.response_head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }

    /// Like [`RawWs::connect`] over a socket with a small receive buffer (`bytes`), so that a
    /// client that does not read fills up quickly.
    pub async fn connect_small_buffer(addr: SocketAddr, path_and_query: &str, bytes: u32) -> RawWs {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        Self::handshake(stream, addr, path_and_query, &[], &[]).await
    }

    /// Like [`RawWs::connect`], with `early` (client frames) written in the same `write` as the
    /// upgrade request, so that the server reads them together with the request.
    pub async fn connect_with_early_frames(
        addr: SocketAddr,
        path_and_query: &str,
        early: &[u8],
    ) -> RawWs {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Self::handshake(stream, addr, path_and_query, &[], early).await
    }

    async fn handshake(
        mut stream: TcpStream,
        addr: SocketAddr,
        path_and_query: &str,
        headers: &[(&str, &str)],
        early: &[u8],
    ) -> RawWs {
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {RAW_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        );
        for (name, value) in headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(early);
        stream
            .write_all(&bytes)
            .await
            .expect("write upgrade request");
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                .await
                .expect("upgrade response in time")
                .expect("read upgrade response");
            assert!(
                n > 0,
                "connection closed during the handshake: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "expected 101, got {head}");
        assert!(
            head.to_ascii_lowercase().contains(&format!(
                "sec-websocket-accept: {}",
                RAW_ACCEPT.to_ascii_lowercase()
            )),
            "bad accept header in {head}"
        );
        RawWs {
            stream,
            buf,
            pos: head_end,
            response_head: head,
        }
    }

    /// Writes bytes exactly as given.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&raw_frame(fin, opcode, payload, Some(RAW_MASK)))
            .await;
    }

    /// Sends one frame without the mask bit.
    pub async fn send_unmasked(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&raw_frame(fin, opcode, payload, None)).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, op::TEXT, text.as_bytes()).await;
    }

    pub async fn send_json(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Makes `n` unread bytes available; false at EOF (or a reset connection).
    async fn fill(&mut self, n: usize) -> bool {
        while self.buf.len() - self.pos < n {
            if self.pos > 0 && self.pos * 2 >= self.buf.len() {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let read = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("server data in time");
            match read {
                Ok(0) | Err(_) => return false,
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
            }
        }
        true
    }

    /// The next server frame; `None` when the stream ended. Panics on a masked server frame.
    pub async fn read_frame(&mut self) -> Option<RawFrame> {
        if !self.fill(2).await {
            return None;
        }
        let (b0, b1) = (self.buf[self.pos], self.buf[self.pos + 1]);
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let ext = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        if !self.fill(2 + ext).await {
            return None;
        }
        let h = &self.buf[self.pos..];
        let len = match ext {
            2 => usize::from(u16::from_be_bytes([h[2], h[3]])),
            8 => u64::from_be_bytes(h[2..10].try_into().expect("8 bytes")) as usize,
            _ => usize::from(b1 & 0x7f),
        };
        if !self.fill(2 + ext + len).await {
            return None;
        }
        let start = self.pos + 2 + ext;
        let payload = self.buf[start..start + len].to_vec();
        self.pos = start + len;
        Some(RawFrame {
            fin: b0 & 0x80 != 0,
            rsv1: b0 & 0x40 != 0,
            opcode: b0 & 0x0f,
            payload,
        })
    }

    /// The next text message as JSON, skipping (not answering) pings and pongs.
    pub async fn recv_json(&mut self) -> Value {
        loop {
            let f = self
                .read_frame()
                .await
                .expect("a frame, not the end of the stream");
            match f.opcode {
                op::PING | op::PONG => continue,
                op::TEXT => {
                    assert!(f.fin, "server messages are not fragmented");
                    return serde_json::from_slice(&f.payload).expect("server sends JSON");
                }
                other => panic!(
                    "expected a text frame, got opcode {other} {:?}",
                    String::from_utf8_lossy(&f.payload)
                ),
            }
        }
    }

    pub async fn expect_type(&mut self, kind: &str) -> Value {
        let v = self.recv_json().await;
        assert_eq!(v["type"], kind, "expected a {kind} message, got {v}");
        v
    }

    /// Reads until the close frame; returns its code and reason and the text messages before it
    /// (pings and pongs skipped). Panics if the stream ends without a close frame.
    pub async fn expect_close(&mut self) -> (u16, String, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            let f = self
                .read_frame()
                .await
                .unwrap_or_else(|| panic!("stream ended without a close frame; seen {seen:?}"));
            match f.opcode {
                op::TEXT => seen.push(serde_json::from_slice(&f.payload).expect("JSON")),
                op::CLOSE => {
                    let code = match f.payload.as_slice() {
                        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                        _ => 1005,
                    };
                    let reason =
                        String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default()).to_string();
                    return (code, reason, seen);
                }
                _ => continue,
            }
        }
    }

    /// Reads every remaining frame until the server ends the stream (EOF).
    pub async fn drain_to_eof(&mut self) -> Vec<RawFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.read_frame().await {
            frames.push(f);
        }
        frames
    }
}

/// Asserts that `msgs` holds a `disconnect` notice with `code` and `reconnect`; returns it.
pub fn find_disconnect(msgs: &[Value], code: u16, reconnect: bool) -> Value {
    let notice = msgs
        .iter()
        .find(|m| m["type"] == "disconnect")
        .unwrap_or_else(|| panic!("no disconnect notice among {msgs:?}"))
        .clone();
    assert_eq!(notice["data"]["code"], code, "{notice}");
    assert_eq!(notice["data"]["reconnect"], reconnect, "{notice}");
    assert!(
        notice["data"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{notice}"
    );
    notice
}

pub mod redis;

pub mod cluster;
