//! Limits per client address and per user at their edges, over real sockets: the per-address
//! connection limit and connect rate (HTTP 429 before the upgrade), the per-user connection limit
//! (an `error` and close 4029 after it), and `X-Forwarded-For`, believed from trusted proxies
//! only. Client addresses other than 127.0.0.1 come from sockets bound to 127.0.0.2 and friends
//! before they connect (Linux routes all of 127.0.0.0/8 to loopback).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wsgate::node::RunningNode;

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// An HTTP answer to an upgrade request that was not `101`.
#[derive(Debug)]
struct Refusal {
    status: u16,
    head: String,
    body: Value,
    /// The server closed the TCP connection after the answer.
    closed: bool,
}

impl Refusal {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }

    /// Asserts a `429` with error `code` / `numeric` and a reason, after which the server hung
    /// up.
    fn assert_429(&self, code: &str, numeric: u64) {
        assert_eq!(self.status, 429, "{self:?}");
        assert_eq!(self.body["error"]["code"], code, "{self:?}");
        assert_eq!(self.body["error"]["numericCode"], numeric, "{self:?}");
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "a refusal says why: {self:?}"
        );
        assert!(self.closed, "the server keeps no socket for a refusal");
    }
}

/// Opens a TCP connection from `from` (any loopback address) and asks for a WebSocket upgrade
/// on `path` with extra `headers`: the connected client (its `connection` message unread), or
/// the HTTP answer that refused it.
async fn try_connect(
    addr: SocketAddr,
    from: IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, Refusal> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the source address");
    let mut stream: TcpStream = socket.connect(addr).await.expect("connect");
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await.expect("write");

    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("an answer in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let mut rest = buf[head_end..].to_vec();
    if status == 101 {
        let ws = WebSocketStream::from_partially_read(
            MaybeTlsStream::Plain(stream),
            rest,
            Role::Client,
            None,
        )
        .await;
        return Ok(Client { ws });
    }
    let mut refusal = Refusal {
        status,
        head,
        body: Value::Null,
        closed: false,
    };
    let length: usize = refusal
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .expect("a content-length");
    while rest.len() < length {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .expect("the body in time")
            .expect("read");
        assert!(n > 0, "closed inside the body");
        rest.extend_from_slice(&chunk[..n]);
    }
    refusal.body = serde_json::from_slice(&rest[..length]).expect("a JSON body");
    let mut tail = [0u8; 64];
    refusal.closed = matches!(
        tokio::time::timeout(WAIT, stream.read(&mut tail)).await,
        Ok(Ok(0)) | Ok(Err(_))
    );
    Err(refusal)
}

/// Connects from `from` and reads the `connection` message; panics on a refusal.
async fn connect_from(
    addr: SocketAddr,
    from: IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Client {
    let mut client = try_connect(addr, from, path, headers)
        .await
        .unwrap_or_else(|r| panic!("expected an accepted connection from {from}, got {r:?}"));
    client.expect_type("connection").await;
    client
}

/// Connects from `from` and expects an HTTP refusal.
async fn refused_from(
    addr: SocketAddr,
    from: IpAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Refusal {
    match try_connect(addr, from, path, headers).await {
        Ok(_) => panic!("expected {from} to be refused before the upgrade"),
        Err(refusal) => refusal,
    }
}

/// Waits until `check` holds (the server ends a session a moment after the client closed).
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_raw(addr, "GET", "/metrics", b"", &[]).await;
    assert_eq!(status, 200);
    String::from_utf8(body).expect("text exposition")
}

/// Asserts that `/metrics` counts refusals for `reason`.
async fn assert_refusals_counted(node: &RunningNode, reason: &str) {
    let exposition = scrape(node.local_addr).await;
    let label = format!("reason=\"{reason}\"");
    assert!(
        exposition
            .lines()
            .any(|l| l.starts_with("wsgate_connections_refused_total") && l.contains(&label)),
        "no refusal counted for {reason}:\n{exposition}"
    );
}

#[tokio::test]
async fn per_ip_connection_limit_at_its_edge() {
    let node = start_node(|s| s.ws.peer_limits.max_connections_per_ip = 3).await;
    let addr = node.local_addr;
    let _ = scrape(addr).await; // installs the metrics recorder before anything is counted

    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from(addr, LOCAL, "/ws", &[]).await);
    }
    let refusal = refused_from(addr, LOCAL, "/ws", &[]).await;
    refusal.assert_429("TOO_MANY_CONNECTIONS", 1000);
    assert_eq!(
        refusal.header("retry-after"),
        None,
        "a wait cannot be known: {refusal:?}"
    );
    assert_refusals_counted(&node, "per_ip").await;

    // Another address has a budget of its own.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(connect_from(addr, OTHER, "/ws", &[]).await);
    }
    refused_from(addr, OTHER, "/ws", &[])
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);

    // Closing one lets exactly one new connection in.
    held.pop().expect("a client").close().await;
    let peers = &node.context().peers;
    until("the closed connection to give its place back", || {
        peers.connections_of_ip(LOCAL) == 2
    })
    .await;
    held.push(connect_from(addr, LOCAL, "/ws", &[]).await);
    refused_from(addr, LOCAL, "/ws", &[])
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);

    // The connections still held work.
    for (i, c) in held.iter_mut().enumerate() {
        let id = format!("alive-{i}");
        let pong = c
            .request(serde_json::json!({"type": "ping", "id": id}))
            .await;
        assert_eq!(pong["type"], "pong", "{pong}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn per_ip_connect_rate_at_its_edge() {
    // One new connection per second, bursts of 3.
    let node = start_node(|s| {
        s.ws.peer_limits.connect_rate_per_ip = 1.0;
        s.ws.peer_limits.connect_burst_per_ip = 3;
    })
    .await;
    let addr = node.local_addr;
    let _ = scrape(addr).await;

    // Connections that end at once still count: the limit is on opening them.
    for _ in 0..3 {
        connect_from(addr, LOCAL, "/ws", &[]).await.close().await;
    }
    let refusal = refused_from(addr, LOCAL, "/ws", &[]).await;
    refusal.assert_429("RATE_LIMIT_EXCEEDED", 2002);
    let retry_after: u64 = refusal
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a Retry-After in whole seconds: {refusal:?}"));
    assert_eq!(
        retry_after, 1,
        "under a second to wait, rounded up: {refusal:?}"
    );
    let retry_ms = refusal.body["error"]["retryAfter"]
        .as_u64()
        .unwrap_or_else(|| panic!("retryAfter in ms: {refusal:?}"));
    assert!((1..=1000).contains(&retry_ms), "{refusal:?}");
    assert_refusals_counted(&node, "per_ip_rate").await;

    // Another address is not slowed down.
    connect_from(addr, OTHER, "/ws", &[]).await;

    // After the wait the server named, one more connection gets in, and only one.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let _again = connect_from(addr, LOCAL, "/ws", &[]).await;
    refused_from(addr, LOCAL, "/ws", &[])
        .await
        .assert_429("RATE_LIMIT_EXCEEDED", 2002);
    node.shutdown().await;
}

#[tokio::test]
async fn per_user_limit_at_its_edge() {
    let node = start_node(|s| s.ws.peer_limits.max_connections_per_user = 2).await;
    let addr = node.local_addr;
    let _ = scrape(addr).await;

    let (first, hello) = connect(addr, "/ws?user_id=u1").await;
    assert_eq!(hello["data"]["userId"], "u1");
    let (mut second, _) = connect(addr, "/ws?user_id=u1").await;

    // The third completes the upgrade (a browser could not read an HTTP body) and is told why.
    let mut third = connect_raw(addr, "/ws?user_id=u1").await;
    let (code, _reason, seen) = third.expect_close().await;
    assert_eq!(code, 4029, "seen {seen:?}");
    assert!(
        !seen.iter().any(|m| m["type"] == "connection"),
        "a refused connection gets no connection message: {seen:?}"
    );
    let error = seen
        .iter()
        .find(|m| m["type"] == "error")
        .unwrap_or_else(|| panic!("no error message among {seen:?}"));
    assert_eq!(error["data"]["code"], "TOO_MANY_CONNECTIONS", "{error}");
    assert_eq!(error["data"]["numericCode"], 1000, "{error}");
    find_disconnect(&seen, 4029, false);
    assert_refusals_counted(&node, "per_user").await;

    // Other users, and anonymous connections, are not affected.
    let (_u2a, _) = connect(addr, "/ws?user_id=u2").await;
    let (_u2b, _) = connect(addr, "/ws?user_id=u2").await;
    let (_anon, _) = connect(addr, "/ws").await;

    // The refusal took no place; closing one lets exactly one new connection in.
    let peers = &node.context().peers;
    assert_eq!(peers.connections_of_user("u1"), 2);
    first.close().await;
    until("the closed connection to give its place back", || {
        peers.connections_of_user("u1") == 1
    })
    .await;
    let (_again, _) = connect(addr, "/ws?user_id=u1").await;
    let mut over = connect_raw(addr, "/ws?user_id=u1").await;
    let (code, _, seen) = over.expect_close().await;
    assert_eq!(code, 4029, "seen {seen:?}");

    let pong = second
        .request(serde_json::json!({"type": "ping", "id": "still-here"}))
        .await;
    assert_eq!(pong["type"], "pong", "{pong}");
    node.shutdown().await;
}

#[tokio::test]
async fn forwarded_for_is_believed_from_a_trusted_proxy_only() {
    let xff = |v| [("X-Forwarded-For", v)];

    // 127.0.0.1 is a trusted proxy: each client it names has its own budget of one.
    let node = start_node(|s| {
        s.ws.peer_limits.max_connections_per_ip = 1;
        s.ws.peer_limits.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
    })
    .await;
    let addr = node.local_addr;
    let _a = connect_from(addr, LOCAL, "/ws", &xff("203.0.113.1")).await;
    let _b = connect_from(addr, LOCAL, "/ws", &xff("203.0.113.2")).await;
    refused_from(addr, LOCAL, "/ws", &xff("203.0.113.1"))
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);
    // A client cannot escape by prepending an address: the proxy appended the real one.
    refused_from(addr, LOCAL, "/ws", &xff("198.51.100.9, 203.0.113.2"))
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);
    // Without the header, the proxy's own address is the client.
    let _proxy = connect_from(addr, LOCAL, "/ws", &[]).await;
    let peers = &node.context().peers;
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    assert_eq!(peers.connections_of_ip(ip("203.0.113.1")), 1);
    assert_eq!(peers.connections_of_ip(ip("203.0.113.2")), 1);
    assert_eq!(peers.connections_of_ip(LOCAL), 1);
    // 127.0.0.2 is not trusted: what it claims is ignored, it is itself.
    let _c = connect_from(addr, OTHER, "/ws", &xff("203.0.113.3")).await;
    refused_from(addr, OTHER, "/ws", &xff("203.0.113.4"))
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);
    assert_eq!(peers.connections_of_ip(ip("203.0.113.3")), 0);
    node.shutdown().await;

    // No trusted proxy at all: the header is ignored, both clients are 127.0.0.1.
    let node = start_node(|s| s.ws.peer_limits.max_connections_per_ip = 1).await;
    let addr = node.local_addr;
    let _a = connect_from(addr, LOCAL, "/ws", &xff("203.0.113.1")).await;
    refused_from(addr, LOCAL, "/ws", &xff("203.0.113.2"))
        .await
        .assert_429("TOO_MANY_CONNECTIONS", 1000);
    node.shutdown().await;
}
