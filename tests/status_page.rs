//! The live status page (`GET /status`) in headless Chromium: the real `wsgate` binary serves
//! it, the page subscribes to `$sys.metrics` and `$sys.health` over the gateway's own WebSocket,
//! and after some traffic its figures (connections, messages) change on screen and its charts
//! fill. The screenshot is saved as a CI artifact: `target/artifacts/status-page.png` (printed).
//!
//! Needs Chromium, like `tests/interop_chromium.rs` (`./scripts/test` installs it; `CHROMIUM`
//! may name another binary). When it is missing this test fails (it does not skip).

#[path = "interop/chromium.rs"]
mod chromium;
mod common;
#[path = "interop/mod.rs"]
mod interop;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use chromium::{find_chromium, Browser, Cdp};
use interop::Gateway;

/// How long the page may take to show what the test waits for.
const PAGE_WAIT: Duration = Duration::from_secs(15);

/// What the page shows: its figures as displayed, and its state (`null` while it is loading).
const READ_PAGE: &str = r#"!window.wsgateStatus ? "null" : JSON.stringify({
  snapshots: window.wsgateStatus.snapshots,
  health: window.wsgateStatus.health,
  errors: window.wsgateStatus.errors,
  points: window.wsgateStatus.points.length,
  connected: window.wsgateStatus.connected,
  totals: totals(),
  shown: {
    nodes: document.getElementById('sum-nodes').textContent,
    connections: document.getElementById('sum-connections').textContent,
    messagesIn: document.getElementById('sum-messages-in').textContent,
    messagesOut: document.getElementById('sum-messages-out').textContent,
    tableRows: document.querySelectorAll('#nodes-body tr[data-node]').length,
    health: (document.querySelector('#nodes-body .badge') || {}).textContent,
    connLine: document.getElementById('conn-text').textContent,
  },
})"#;

async fn read_page(cdp: &mut Cdp, session: &str) -> Value {
    let text = cdp.evaluate(session, READ_PAGE).await;
    serde_json::from_str(text.as_str().expect("a JSON string")).expect("JSON")
}

/// Polls the page until `ready` accepts what it shows; panics with the last reading otherwise.
async fn wait_for(
    cdp: &mut Cdp,
    session: &str,
    what: &str,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let page = read_page(cdp, session).await;
        if ready(&page) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}; it shows {page}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `target/artifacts/` (next to the test binaries' `target/tmp`).
fn artifacts_dir() -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let target = tmp.parent().map_or(tmp.clone(), PathBuf::from);
    target.join("artifacts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_live_figures_in_chromium() {
    let chromium_bin = find_chromium();
    let config = tempfile::NamedTempFile::new().expect("temp config");
    std::fs::write(config.path(), "sys:\n  interval: 400ms\n").expect("write config");
    let config_path = config.path().to_str().expect("utf-8 path").to_owned();
    let gw = Gateway::start(&["--config", &config_path, "--node-id", "status-node"]);
    let addr = gw.addr;

    let mut browser = Browser::start(&chromium_bin);
    let devtools = browser.devtools_url();
    let mut cdp = Cdp::connect(&devtools).await;
    let session = cdp.new_page().await;
    cdp.call(
        Some(&session),
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    cdp.call(
        Some(&session),
        "Page.navigate",
        json!({"url": format!("http://{addr}/status")}),
    )
    .await;

    // The page connects and shows itself: one node, one connection (its own).
    let first = wait_for(&mut cdp, &session, "two snapshots", |p| {
        p.get("snapshots").and_then(Value::as_u64) >= Some(2)
            && p.get("health").and_then(Value::as_u64) >= Some(1)
    })
    .await;
    println!("page before traffic: {first}");
    assert_eq!(first["errors"], json!([]), "{first}");
    assert_eq!(first["shown"]["nodes"], "1", "{first}");
    assert_eq!(first["shown"]["connections"], "1", "{first}");
    assert_eq!(first["shown"]["tableRows"], 1, "{first}");
    assert_eq!(first["shown"]["health"], "UP", "{first}");
    assert_eq!(
        first["shown"]["connLine"], "connected to status-node",
        "{first}"
    );

    // Traffic: five subscribers, pings from each, and forty publications.
    let mut clients = Vec::new();
    for i in 0..5 {
        let (mut c, _) =
            common::connect(addr, &format!("/ws?clientId=load-{i}&subscriptions=news")).await;
        for j in 0..3 {
            let pong = c
                .request(json!({"type": "ping", "id": format!("p{j}")}))
                .await;
            assert_eq!(pong["type"], "pong");
        }
        clients.push(c);
    }
    for i in 0..40 {
        let (status, body) = common::post(
            addr,
            "/api/publish",
            json!({"topic": "news", "type": "headline", "data": {"n": i, "text": "x".repeat(200)}}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    for c in &mut clients {
        for _ in 0..40 {
            c.expect_type("headline").await;
        }
    }

    // The figures on the page move: six connections, more messages in and out.
    let before_in = first["totals"]["messagesIn"].as_f64().expect("messagesIn");
    let before_out = first["totals"]["messagesOut"]
        .as_f64()
        .expect("messagesOut");
    let after = wait_for(&mut cdp, &session, "the traffic", |p| {
        p["shown"]["connections"] == "6"
            && p["totals"]["messagesIn"].as_f64() >= Some(before_in + 15.0)
            && p["totals"]["messagesOut"].as_f64() >= Some(before_out + 200.0)
    })
    .await;
    println!("page after traffic: {after}");
    assert_ne!(
        after["shown"]["messagesIn"], first["shown"]["messagesIn"],
        "{after}"
    );
    assert_ne!(
        after["shown"]["messagesOut"], first["shown"]["messagesOut"],
        "{after}"
    );

    // A steady trickle while the charts draw a few more points: a publication every 50 ms,
    // and a ping from one client (the subscribers' queues hold what they do not read).
    let mut pinger = clients.pop().expect("a client");
    let trickle = tokio::spawn(async move {
        for i in 0u64.. {
            let _ = common::post(
                addr,
                "/api/publish",
                json!({"topic": "news", "type": "headline", "data": {"n": i}}),
            )
            .await;
            pinger
                .send_json(json!({"type": "ping", "id": format!("t{i}")}))
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let snapshots = after["snapshots"].as_u64().expect("snapshots");
    let last = wait_for(&mut cdp, &session, "more snapshots", |p| {
        p["snapshots"].as_u64() >= Some(snapshots + 6)
    })
    .await;
    assert!(last["points"].as_u64() >= Some(5), "{last}");
    assert_eq!(last["errors"], json!([]), "{last}");
    assert!(
        last["totals"]["p95"].is_number(),
        "fan-out latency sampled: {last}"
    );

    let png = cdp.screenshot(&session).await;
    trickle.abort();
    let _ = cdp.call(None, "Browser.close", json!({})).await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).expect("create target/artifacts");
    let path = dir.join("status-page.png");
    std::fs::write(&path, &png).expect("write the screenshot");
    println!("status page screenshot: {}", path.display());
    drop(browser);
    drop(clients);
    drop(gw);
}
