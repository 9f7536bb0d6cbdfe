//! permessage-deflate against headless Chromium (Debian's `chromium` package): the browser's own
//! WebSocket, whose offer is `permessage-deflate; client_max_window_bits`, talks to the real
//! `wsgate` binary with both directions compressed.
//!
//! The test starts Chromium with a DevTools port, drives it over the Chrome DevTools Protocol
//! (the test's own small client on tokio-tungstenite: no Node, no Playwright), and has a blank page
//! run a script that opens `new WebSocket(...)`, reads `ws.extensions`, sends a ~4 KB `ping` and a
//! ~4 KB client `publish` on a topic it is subscribed to, and waits for the `pong` and the
//! publication. The WebSocket goes through a relay that records the wire, and the test reads the
//! frames itself: Chromium's offer, the large messages crossing with RSV1 set both ways, in far
//! fewer bytes than their text, and inflating to what was sent.
//!
//! Needs Chromium (`./scripts/test` installs Debian's `chromium` with apt-get; `CHROMIUM` may
//! name another binary). When it is missing this test fails (it does not skip) and says so.

#[path = "interop/chromium.rs"]
mod chromium;
#[path = "interop/mod.rs"]
mod interop;

use serde_json::{json, Value};

use chromium::{find_chromium, Browser, Cdp};
use interop::{Gateway, WireTap};

/// The page script: one WebSocket, a 4 KB ping and a 4 KB publish out, the pong and the
/// publication back; resolves to a JSON report.
fn page_script(url: &str, topic: &str) -> String {
    format!(
        r#"(async () => {{
  const pad = 'abcdefgh-0123456789-'.repeat(205);
  const topic = {topic:?};
  const payload = {{ pad, rows: Array.from({{ length: 20 }}, (_, i) => ({{ i, status: 'ACTIVE' }})) }};
  const r = {{ extensions: null, pong: null, publication: null, errors: [] }};
  const ws = new WebSocket({url:?});
  await new Promise((resolve) => {{
    const timer = setTimeout(() => {{ r.errors.push('timed out after 10 s'); resolve(); }}, 10000);
    const done = () => {{ clearTimeout(timer); resolve(); }};
    ws.onopen = () => {{ r.extensions = ws.extensions; }};
    ws.onerror = () => {{ r.errors.push('error event'); }};
    ws.onclose = (e) => {{ r.errors.push('closed early: ' + e.code + ' ' + e.reason); done(); }};
    ws.onmessage = (e) => {{
      const m = JSON.parse(e.data);
      if (m.type === 'connection') {{
        ws.send(JSON.stringify({{ type: 'ping', id: 'p1', pad }}));
        ws.send(JSON.stringify({{ type: 'publish', id: 'u1', topic, data: payload }}));
      }} else if (m.type === 'pong') {{
        r.pong = m.data.requestId;
      }} else if (m.topic === topic) {{
        r.publication = JSON.stringify(m.data) === JSON.stringify(payload);
      }} else if (m.type === 'error') {{
        r.errors.push(e.data);
      }}
      if (r.pong !== null && r.publication !== null) {{
        ws.onclose = null;
        ws.close(1000);
        done();
      }}
    }};
  }});
  return JSON.stringify(r);
}})()"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_negotiates_deflate_and_talks_both_ways_compressed() {
    let chromium = find_chromium();
    let topic = "interop:chromium";
    let config = tempfile::NamedTempFile::new().expect("temp config");
    std::fs::write(
        config.path(),
        "namespaces:\n  interop: { client_publish: true }\n",
    )
    .expect("write config");
    let config_path = config.path().to_str().expect("utf-8 path").to_owned();
    let gw = Gateway::start(&["--config", &config_path]);
    let tap = WireTap::start(gw.addr);
    let ws_url = format!(
        "ws://{}/ws?clientId=chromium&subscriptions={topic}",
        tap.addr
    );

    let mut browser = Browser::start(&chromium);
    let devtools = browser.devtools_url();
    let mut cdp = Cdp::connect(&devtools).await;
    let version = cdp.call(None, "Browser.getVersion", json!({})).await;
    println!("browser: {}", version["product"]);
    let target = cdp
        .call(None, "Target.createTarget", json!({"url": "about:blank"}))
        .await;
    let session = cdp
        .call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await["sessionId"]
        .as_str()
        .expect("a session id")
        .to_owned();
    let evaluated = cdp
        .call(
            Some(&session),
            "Runtime.evaluate",
            json!({
                "expression": page_script(&ws_url, topic),
                "awaitPromise": true,
                "returnByValue": true,
            }),
        )
        .await;
    let _ = cdp.call(None, "Browser.close", json!({})).await;

    let captures = tap.websockets();
    let wire: String = captures.iter().map(|c| c.describe()).collect();
    let context = format!(
        "--- evaluate\n{evaluated}\n--- wire\n{wire}--- gateway output\n{}--- chromium output\n{}",
        gw.output(),
        browser.output()
    );
    let report: Value = evaluated["result"]["value"]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_else(|| panic!("the page script returned no report\n{context}"));
    println!("page report: {report}\n{wire}");

    // What the page saw.
    assert_eq!(report["errors"], json!([]), "{context}");
    let extensions = report["extensions"].as_str().unwrap_or_default();
    assert!(
        extensions.starts_with("permessage-deflate"),
        "ws.extensions is {extensions:?}\n{context}"
    );
    assert_eq!(report["pong"], "p1", "{context}");
    assert_eq!(report["publication"], true, "{context}");

    // What crossed the wire, read independently of the browser's account.
    assert_eq!(
        captures.len(),
        1,
        "one WebSocket connection expected\n{context}"
    );
    let ws = &captures[0];
    let offer = ws
        .request_header("Sec-WebSocket-Extensions")
        .unwrap_or_default();
    println!(
        "Chromium offered: {offer}\ngateway answered: {}",
        ws.response_header("Sec-WebSocket-Extensions")
            .unwrap_or_default()
    );
    assert!(
        offer.contains("permessage-deflate") && offer.contains("client_max_window_bits"),
        "Chromium's offer: {offer:?}"
    );
    let up = ws.messages_up();
    for needle in [r#""id":"p1""#, r#""id":"u1""#] {
        let m = up
            .iter()
            .find(|m| m.text.contains(needle))
            .unwrap_or_else(|| panic!("no {needle} message from Chromium on the wire\n{context}"));
        assert!(
            m.compressed && m.text.len() > 4_000 && m.wire_len * 4 < m.text.len(),
            "Chromium's {needle} message should cross compressed: {} wire bytes for {} text \
             bytes (RSV1 {})\n{context}",
            m.wire_len,
            m.text.len(),
            m.compressed
        );
    }
    let publication = ws
        .messages_down()
        .into_iter()
        .find(|m| m.text.contains(r#""topic":"interop:chromium""#))
        .unwrap_or_else(|| panic!("no publication to Chromium on the wire\n{context}"));
    assert!(
        publication.compressed
            && publication.text.len() > 4_000
            && publication.wire_len * 4 < publication.text.len(),
        "the publication should cross compressed: {} wire bytes for {} text bytes (RSV1 {})",
        publication.wire_len,
        publication.text.len(),
        publication.compressed
    );
}
