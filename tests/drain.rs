//! Graceful drain: on SIGTERM (or `RunningNode::drain`) a node answers `/readyz` 503 at once,
//! refuses new upgrades, keeps serving the clients it has until their turn, tells each to
//! reconnect (`disconnect` notice `{code: 1001, reconnect: true}`, close 1001) in batches spread
//! over the drain window, flushes what was queued for them first, and exits 0.
//!
//! The first test runs the repository's HAProxy config (`deploy/haproxy/haproxy.cfg`, rendered
//! for loopback by `tests/haproxy/mod.rs`) with Debian's `haproxy` in front of two nodes on a real
//! `redis-server`, and drains one of them: its clients are told to go over the window (not all at
//! once), HAProxy sends them to the other node, and resubscribing with `since` they get every
//! publication exactly once, in order. The others run the real binary (SIGTERM, a second signal)
//! and an embedded node (a drain of 0 s).

mod common;
mod haproxy;

use common::cluster::*;
use common::redis::RedisServer;
use common::*;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const TOPIC: &str = "feed";

/// What one client saw: where it was connected, its `disconnect` notice (if any) and when it
/// arrived, the close code, where it reconnected, and the `seq` of every publication it got
/// (on either connection), in arrival order.
#[derive(Debug, Default)]
struct Followed {
    client: usize,
    first_node: String,
    notice: Option<(Instant, Value)>,
    close_code: Option<u16>,
    /// The last `seq` received before the notice.
    seq_at_notice: u64,
    second_node: Option<String>,
    /// Upgrades through HAProxy that failed before the reconnect succeeded.
    failed_reconnects: u32,
    seqs: Vec<u64>,
}

/// Reads `client` (already subscribed to [`TOPIC`], already holding `seq` 1 of `epoch`) until it
/// has `seq` `last`. On a `disconnect` notice and close it reconnects through `lb` and
/// resubscribes with `since` its last position.
async fn follow(
    index: usize,
    mut client: Client,
    first_node: String,
    lb: SocketAddr,
    epoch: String,
    last: u64,
) -> Followed {
    let mut f = Followed {
        client: index,
        first_node,
        seqs: vec![1],
        ..Followed::default()
    };
    while f.seqs.last() != Some(&last) {
        let msg = tokio::time::timeout(WAIT, client.ws.next())
            .await
            .unwrap_or_else(|_| panic!("client {index}: nothing for {WAIT:?}; so far {f:?}"))
            .unwrap_or_else(|| panic!("client {index}: stream ended without a close frame"))
            .unwrap_or_else(|e| panic!("client {index}: {e}; so far {f:?}"));
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                match v["type"].as_str() {
                    Some("tick") => {
                        assert_eq!(v["topic"], TOPIC, "{v}");
                        assert_eq!(v["epoch"], epoch.as_str(), "one epoch: {v}");
                        f.seqs.push(v["seq"].as_u64().expect("seq"));
                    }
                    Some("disconnect") => {
                        assert!(f.notice.is_none(), "client {index}: a second notice {v}");
                        f.seq_at_notice = *f.seqs.last().expect("seq 1 at least");
                        f.notice = Some((Instant::now(), v));
                    }
                    _ => panic!("client {index}: unexpected {v}"),
                }
            }
            Message::Close(frame) => {
                assert!(
                    f.notice.is_some(),
                    "client {index}: closed without a notice"
                );
                f.close_code = Some(frame.map_or(1005, |fr| u16::from(fr.code)));
                client = reconnect(index, lb, &mut f).await;
                let ack = client
                    .request(json!({"type": "subscribe", "id": "again", "data": {
                        "topics": [TOPIC],
                        "since": {"seq": f.seq_at_notice, "epoch": epoch}}}))
                    .await;
                assert_eq!(ack["type"], "ack", "client {index}: {ack}");
                assert_eq!(ack["data"]["recovered"], true, "client {index}: {ack}");
            }
            _ => {}
        }
    }
    f
}

/// A new connection through the load balancer; returns it once its `connection` message came.
async fn reconnect(index: usize, lb: SocketAddr, f: &mut Followed) -> Client {
    loop {
        match tokio_tungstenite::connect_async(format!("ws://{lb}/ws?clientId=c{index}")).await {
            Ok((ws, _)) => {
                let mut client = Client { ws };
                let hello = client.expect_type("connection").await;
                f.second_node = hello["data"]["node"].as_str().map(str::to_string);
                return client;
            }
            Err(e) => {
                f.failed_reconnects += 1;
                assert!(
                    f.failed_reconnects < 20,
                    "client {index} cannot reconnect: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Polls HAProxy's stats until `check` accepts the servers' states.
async fn wait_states(
    lb: &haproxy::Haproxy,
    what: &str,
    check: impl Fn(&[(String, String)]) -> bool,
) {
    let deadline = Instant::now() + CLUSTER_WAIT;
    loop {
        let states = lb.server_states().await;
        if check(&states) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy never showed {what}; last {states:?}; log:\n{}",
            lb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `/readyz` on `addr` until it answers 503 (draining); panics if that takes longer than
/// `within` after `signalled` (the first poll may still see 200 if the signal is not handled yet).
async fn wait_draining(addr: SocketAddr, signalled: Instant, within: Duration) {
    while readyz(addr).await != 503 {
        assert!(
            signalled.elapsed() < within,
            "/readyz still 200 {within:?} after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Asserts that `times` (one per client) are spread over the window rather than bunched: first
/// and last at least `min_spread` apart, no more than half of them in any 100 ms (sent at once,
/// all would be; the receipt times are this side's, so a stall of a few hundred milliseconds
/// on a loaded runner may bunch a few), and between a quarter and three quarters in the first
/// half of the span.
fn assert_spread(times: &[Instant], min_spread: Duration) {
    let first = *times.iter().min().expect("some notices");
    let last = *times.iter().max().expect("some notices");
    let span = last - first;
    let offsets: Vec<u128> = {
        let mut v: Vec<u128> = times.iter().map(|t| (*t - first).as_millis()).collect();
        v.sort_unstable();
        v
    };
    assert!(
        span >= min_spread,
        "notices within {span:?}, expected at least {min_spread:?}: {offsets:?} ms"
    );
    let mut per_bucket = std::collections::HashMap::new();
    for ms in &offsets {
        *per_bucket.entry(ms / 100).or_insert(0usize) += 1;
    }
    let crowded = per_bucket.values().copied().max().unwrap_or(0);
    assert!(
        crowded <= (times.len() / 2).max(3),
        "{crowded} of {} notices within 100 ms: {offsets:?} ms",
        times.len()
    );
    let early = offsets
        .iter()
        .filter(|ms| **ms * 2 < span.as_millis())
        .count();
    assert!(
        early * 4 >= times.len() && early * 4 <= times.len() * 3,
        "{early} of {} notices in the first half: {offsets:?} ms",
        times.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn draining_a_node_behind_haproxy_moves_its_clients_without_losing_a_message() {
    const CLIENTS: usize = 40;
    const WINDOW: Duration = Duration::from_secs(2);
    /// Publications during the test (after `seq` 1), one every ~25 ms: longer than the drain.
    const PUBLISHED: u64 = 120;

    let redis = RedisServer::start();
    let urls = vec![redis.url()];
    let a = cluster_node_with(&urls, "node-a", |s| s.drain = WINDOW).await;
    let b = cluster_node_with(&urls, "node-b", |s| s.drain = WINDOW).await;
    let (a_addr, b_addr) = (a.local_addr, b.local_addr);
    wait_ready(a_addr).await;
    wait_ready(b_addr).await;
    let lb = haproxy::Haproxy::start(&[a_addr, b_addr]);
    wait_states(&lb, "both servers UP", |s| {
        s.len() == 2 && s.iter().all(|(_, st)| st == "UP")
    })
    .await;

    // Clients through HAProxy: leastconn spreads them over both nodes.
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (mut c, hello) = connect(lb.addr, &format!("/ws?clientId=c{i}")).await;
        subscribe(&mut c, &[TOPIC]).await;
        let node = hello["data"]["node"].as_str().expect("node").to_string();
        clients.push((c, node));
    }
    let on_a = clients.iter().filter(|(_, n)| n == "node-a").count();
    assert!(
        on_a >= CLIENTS / 4 && CLIENTS - on_a >= CLIENTS / 4,
        "{on_a} of {CLIENTS} clients on node-a"
    );
    // Every client holds a position before the drain.
    let first = http_publish(b_addr, TOPIC, "tick", json!({"n": 1})).await;
    let epoch = first["epoch"].as_str().expect("epoch").to_string();
    for (c, _) in &mut clients {
        expect_publication(c, TOPIC, &json!({"n": 1})).await;
    }
    let last = 1 + PUBLISHED;
    let followers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, (c, node))| tokio::spawn(follow(i, c, node, lb.addr, epoch.clone(), last)))
        .collect();

    let drain_started = Instant::now();
    let drain = tokio::spawn(async move {
        a.drain().await;
        drain_started.elapsed()
    });
    let publisher = tokio::spawn(async move {
        for n in 2..=last {
            let body = http_publish(b_addr, TOPIC, "tick", json!({"n": n})).await;
            assert_eq!(body["seq"], n, "{body}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Instant::now()
    });

    // The draining node: not ready (as soon as the drain task has run its first step, which on
    // a loaded machine can come after the test's next request), still alive, refusing upgrades.
    let not_ready_by = Instant::now() + Duration::from_secs(2);
    while readyz(a_addr).await != 503 && Instant::now() < not_ready_by {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(readyz(a_addr).await, 503);
    assert_eq!(get(a_addr, "/healthz").await.0, 200);
    let (status, body) = http(
        a_addr,
        "GET",
        "/ws",
        None,
        &[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
    // HAProxy's check on /readyz takes node-a out; node-b stays in.
    wait_states(&lb, "node1 DOWN and node2 UP", |s| {
        s.contains(&("node1".into(), "DOWN".into())) && s.contains(&("node2".into(), "UP".into()))
    })
    .await;
    let marked_down_after = drain_started.elapsed();

    let drain_took = tokio::time::timeout(Duration::from_secs(15), drain)
        .await
        .expect("the drain ends")
        .expect("drain task");
    let publisher_done = publisher.await.expect("publisher");
    let mut seen = Vec::new();
    for f in followers {
        seen.push(f.await.expect("a client task failed"));
    }

    let moved: Vec<&Followed> = seen.iter().filter(|f| f.first_node == "node-a").collect();
    let stayed: Vec<&Followed> = seen.iter().filter(|f| f.first_node == "node-b").collect();
    eprintln!(
        "{} clients moved, {} stayed; node-a marked down after {marked_down_after:?}; \
         drain took {drain_took:?}; failed reconnects {}",
        moved.len(),
        stayed.len(),
        moved.iter().map(|f| f.failed_reconnects).sum::<u32>()
    );
    // Every client of the drained node: told to reconnect, with 1001, and it landed on node-b.
    for f in &moved {
        let (_, notice) = f.notice.as_ref().expect("a notice");
        find_disconnect(std::slice::from_ref(notice), 1001, true);
        assert_eq!(f.close_code, Some(1001), "{f:?}");
        assert_eq!(f.second_node.as_deref(), Some("node-b"), "{f:?}");
        assert_eq!(f.failed_reconnects, 0, "HAProxy hid every refusal: {f:?}");
    }
    // The notices are spread over the window, not sent at once (with n clients, the last is due
    // at (n-1)/n of it).
    let times: Vec<Instant> = moved
        .iter()
        .map(|f| f.notice.as_ref().expect("notice").0)
        .collect();
    assert_spread(&times, WINDOW / 2);
    assert!(
        drain_took >= WINDOW * 3 / 4 && drain_took < WINDOW + Duration::from_secs(4),
        "the drain took {drain_took:?} for a {WINDOW:?} window"
    );
    assert!(
        publisher_done > drain_started + drain_took,
        "publications went on after the drain"
    );
    // Until its turn a client of the drained node was served: the last to be told had been
    // receiving the publications made during the drain.
    let latest = moved
        .iter()
        .max_by_key(|f| f.notice.as_ref().expect("notice").0)
        .expect("moved clients");
    assert!(
        latest.seq_at_notice >= 20,
        "the last client told got only up to seq {} on node-a",
        latest.seq_at_notice
    );
    // Nobody else was disturbed.
    for f in &stayed {
        assert!(f.notice.is_none(), "{f:?}");
    }
    // Every publication exactly once, in order, on every client.
    let expected: Vec<u64> = (1..=last).collect();
    for f in &seen {
        assert_eq!(f.seqs, expected, "client {} ({})", f.client, f.first_node);
    }
    // Reconnects that reached node-a before HAProxy's check marked it down were answered 503 and
    // retried on node-b by HAProxy (the `+` retries field of its log: redispatched), so no
    // client saw the refusal. (A tunnel is logged when it ends; the clients are gone by now.)
    let redispatched = |log: &str| {
        log.lines()
            .filter(|l| l.contains("wsgate/node2") && l.contains("\"GET /ws?"))
            .filter(|l| {
                l.split_whitespace()
                    .any(|w| w.split('/').nth(4).is_some_and(|r| r.starts_with('+')))
            })
            .count()
    };
    let deadline = Instant::now() + WAIT;
    while redispatched(&lb.log()) == 0 {
        assert!(
            Instant::now() < deadline,
            "no upgrade was redispatched from node-a to node-b; HAProxy log:\n{}",
            lb.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // New clients go to the node that is left.
    let (c, hello) = connect(lb.addr, "/ws?clientId=late").await;
    assert_eq!(hello["data"]["node"], "node-b", "{hello}");
    c.close().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_zero_closes_everyone_at_once_after_flushing_their_queues() {
    let node = start_node(|s| s.drain = Duration::ZERO).await;
    let addr = node.local_addr;
    let ctx = Arc::clone(node.context());
    let mut clients = Vec::new();
    for i in 0..5 {
        let (mut c, _) = connect(addr, &format!("/ws?clientId=z{i}")).await;
        subscribe(&mut c, &[TOPIC]).await;
        clients.push(c);
    }
    // Queued, not yet read by anyone.
    for n in 1..=200 {
        http_publish(addr, TOPIC, "tick", json!({"n": n})).await;
    }
    let started = Instant::now();
    tokio::time::timeout(WAIT, node.drain())
        .await
        .expect("a drain of 0 s ends at once");
    assert!(started.elapsed() < Duration::from_secs(2));
    for c in &mut clients {
        let (code, _reason, seen) = c.expect_close().await;
        assert_eq!(code, 1001, "{seen:?}");
        let (ticks, rest): (Vec<&Value>, Vec<&Value>) =
            seen.iter().partition(|m| m["type"] == "tick");
        let seqs: Vec<u64> = ticks.iter().filter_map(|m| m["seq"].as_u64()).collect();
        assert_eq!(
            seqs,
            (1..=200).collect::<Vec<u64>>(),
            "everything queued first"
        );
        assert_eq!(rest.len(), 1, "then only the notice: {rest:?}");
        find_disconnect(&seen, 1001, true);
        assert_eq!(seen.last().expect("notice")["type"], "disconnect");
    }
    assert_eq!(ctx.hub.connection_count(), 0);
    assert!(ctx.is_shutting_down());
}

// ---------------------------------------------------------------------------------------------
// The real binary.
// ---------------------------------------------------------------------------------------------

/// The `wsgate` binary on a free loopback port, started with flags only (no `WSGATE_*` from the
/// caller's environment); killed on drop if still running.
struct Binary {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Binary {
    async fn start(args: &[&str]) -> Binary {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let log = tempfile::NamedTempFile::new().expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
            cmd.env_remove(k);
        }
        cmd.args(["--listen", &addr.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"));
        let mut bin = Binary {
            child: cmd.spawn().expect("spawn wsgate"),
            addr,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = bin.child.try_wait() {
                panic!("wsgate exited early with {status}: {}", bin.logs());
            }
            assert!(Instant::now() < deadline, "never listened: {}", bin.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bin
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
    }

    /// Waits for the process to exit (at most `limit`); returns its status.
    async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "wsgate did not exit within {limit:?}: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `POST /api/publish` that reports failure instead of panicking (the node may be gone).
async fn try_publish(addr: SocketAddr, n: u64) -> Option<u64> {
    let body = json!({"topic": TOPIC, "type": "tick", "data": {"n": n}}).to_string();
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.ok()?;
    let mut resp = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut resp))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str::<Value>(body).ok()?["seq"].as_u64()
}

/// Reads one client until its close frame: the time of its `disconnect` notice, the notice, the
/// close code, and the `seq`s it got before.
async fn read_until_close(mut c: Client) -> (Instant, Value, u16, Vec<u64>) {
    let mut seqs = Vec::new();
    let mut notice = None;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), c.ws.next())
            .await
            .expect("a message in time")
            .expect("a close frame before the end")
            .expect("no error");
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
                if v["type"] == "disconnect" {
                    notice = Some((Instant::now(), v));
                } else {
                    assert!(notice.is_none(), "nothing after the notice: {v}");
                    seqs.push(v["seq"].as_u64().expect("a publication"));
                }
            }
            Message::Close(frame) => {
                let (at, v) = notice.expect("a notice before the close");
                return (at, v, frame.map_or(1005, |f| u16::from(f.code)), seqs);
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_binary_over_its_window_and_it_exits_0() {
    const CLIENTS: usize = 10;
    let mut bin = Binary::start(&["--drain-seconds", "2", "--node-id", "drainer"]).await;
    let addr = bin.addr;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (mut c, _) = connect(addr, &format!("/ws?clientId=t{i}")).await;
        subscribe(&mut c, &[TOPIC]).await;
        clients.push(c);
    }
    assert_eq!(try_publish(addr, 1).await, Some(1));
    for c in &mut clients {
        expect_publication(c, TOPIC, &json!({"n": 1})).await;
    }
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(read_until_close(c)))
        .collect();

    bin.signal("TERM");
    let signalled = Instant::now();
    wait_draining(addr, signalled, Duration::from_secs(5)).await;
    // Alive, and the HTTP API still serves; new upgrades are refused.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (status, body) = http(
        addr,
        "GET",
        "/ws",
        None,
        &[
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
    )
    .await;
    assert_eq!(status, 503, "{body}");
    // Publications go on during the drain.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut n = 2;
            let mut during_drain = 0;
            while !stop.load(Ordering::Relaxed) {
                if try_publish(addr, n).await.is_none() {
                    break;
                }
                n += 1;
                during_drain += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            during_drain
        })
    };
    let mut seen = Vec::new();
    for r in readers {
        seen.push(r.await.expect("reader"));
    }
    stop.store(true, Ordering::Relaxed);
    let published_during_drain = publisher.await.expect("publisher");
    let status = bin.exit_status(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}: {}", bin.logs());
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(8),
        "SIGTERM to exit: {took:?} for a 2 s drain"
    );
    for (_, notice, code, seqs) in &seen {
        assert_eq!(*code, 1001);
        find_disconnect(std::slice::from_ref(notice), 1001, true);
        // seq 1 was read before the signal.
        let expected: Vec<u64> = (2..2 + seqs.len() as u64).collect();
        assert_eq!(
            seqs, &expected,
            "in order, nothing missing before the notice"
        );
    }
    let times: Vec<Instant> = seen.iter().map(|s| s.0).collect();
    assert_spread(&times, Duration::from_secs(1));
    let most = seen.iter().map(|s| s.3.len()).max().unwrap_or(0);
    assert!(
        published_during_drain >= 20 && most >= 20,
        "clients kept receiving during the drain: {published_during_drain} published, \
         the last client told got {most}"
    );
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still listening after exit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_ends_the_drain_at_once() {
    let mut bin = Binary::start(&["--drain-seconds", "20"]).await;
    let addr = bin.addr;
    let mut readers = Vec::new();
    for i in 0..6 {
        let (c, _) = connect(addr, &format!("/ws?clientId=s{i}")).await;
        readers.push(tokio::spawn(read_until_close(c)));
    }
    bin.signal("TERM");
    let signalled = Instant::now();
    // Well before the second batch is due (below).
    wait_draining(addr, signalled, Duration::from_secs(2)).await;
    // One batch out of six is due at once, the next after 20/6 s: wait for the first (well
    // before the second is due), then check it was only the first.
    let finished =
        |readers: &[tokio::task::JoinHandle<_>]| readers.iter().filter(|r| r.is_finished()).count();
    while finished(&readers) == 0 && signalled.elapsed() < Duration::from_millis(2500) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let done = finished(&readers);
    assert_eq!(
        done, 1,
        "only the first batch went before the second signal"
    );
    bin.signal("INT");
    let hurried = Instant::now();
    for r in readers {
        let (_, notice, code, _) = r.await.expect("reader");
        assert_eq!(code, 1001);
        find_disconnect(std::slice::from_ref(&notice), 1001, true);
    }
    let status = bin.exit_status(Duration::from_secs(5)).await;
    assert!(status.success(), "exit status {status}: {}", bin.logs());
    assert!(
        hurried.elapsed() < Duration::from_secs(3),
        "the second signal ended the drain at once, not after {:?}",
        hurried.elapsed()
    );
}
