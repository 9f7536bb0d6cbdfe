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
        self.ws.send(Message::text(s.to_string())).await.expect("send");
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
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sends JSON"),
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
            let next = tokio::time::timeout(WAIT, self.ws.next()).await.expect("close in time");
            match next {
                Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(t.as_str()).expect("JSON")),
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
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, raw) = http_raw(addr, method, path, body.as_bytes(), headers).await;
    (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
}

pub async fn http_raw(addr: SocketAddr, method: &str, path: &str, body: &[u8], headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
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
    let text_end = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("headers end") + 4;
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
