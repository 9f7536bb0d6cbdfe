//! Headless Chromium driven over the Chrome DevTools Protocol, for tests that load a page: the
//! browser (Debian's `chromium`, or `CHROMIUM`), a minimal CDP client on tokio-tungstenite (no
//! Node, no Playwright), and the helpers a page test needs (navigate, evaluate, screenshot).
//!
//! Used by `tests/interop_chromium.rs` (deflate interop) and `tests/status_page.rs`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// How long Chromium may take to open its DevTools port.
const BROWSER_START: Duration = Duration::from_secs(30);
/// How long one DevTools command may take.
const CDP_TIMEOUT: Duration = Duration::from_secs(30);

/// No sandbox as root, no network besides loopback, a DevTools port chosen by Chromium.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
];

/// The Chromium binary; panics (the test fails, it does not skip) when there is none.
pub fn find_chromium() -> PathBuf {
    let candidates: Vec<PathBuf> = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
                .iter()
                .map(PathBuf::from),
        )
        .collect();
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return found.clone();
    }
    panic!(
        "Chromium is not installed (looked for {candidates:?}): run ./scripts/test (it installs \
         Debian's `chromium` with apt-get), or `apt-get install chromium`, or set CHROMIUM to a \
         Chromium binary; this test needs it"
    );
}

/// A headless Chromium with its own empty profile; killed when dropped.
pub struct Browser {
    child: Child,
    profile: tempfile::TempDir,
    log: tempfile::NamedTempFile,
}

impl Browser {
    pub fn start(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().expect("temp profile dir");
        let log = tempfile::NamedTempFile::new().expect("temp file for Chromium's log");
        let child = Command::new(binary)
            .args(CHROMIUM_FLAGS)
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.reopen().expect("reopen")))
            .stderr(Stdio::from(log.reopen().expect("reopen")))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        Browser {
            child,
            profile,
            log,
        }
    }

    /// The browser-wide DevTools WebSocket URL, from the `DevToolsActivePort` file Chromium
    /// writes into its profile (port on the first line, path on the second).
    pub fn devtools_url(&mut self) -> String {
        let file = self.profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + BROWSER_START;
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    return format!("ws://127.0.0.1:{}{}", port.trim(), path.trim());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Chromium exited during start-up ({status}):\n{}",
                    self.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "Chromium opened no DevTools port within {BROWSER_START:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal Chrome DevTools Protocol client: one command at a time, events skipped.
pub struct Cdp {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    next_id: u64,
}

impl Cdp {
    pub async fn connect(url: &str) -> Cdp {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("connect to Chromium's DevTools at {url}: {e}"));
        Cdp { ws, next_id: 0 }
    }

    pub async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .await
            .expect("send a DevTools command");
        let reply = tokio::time::timeout(CDP_TIMEOUT, async {
            loop {
                let frame = self
                    .ws
                    .next()
                    .await
                    .expect("DevTools connection open")
                    .expect("DevTools message");
                let Message::Text(text) = frame else { continue };
                let v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                if v["id"] == json!(id) {
                    return v;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools `{method}` did not answer within {CDP_TIMEOUT:?}"));
        if let Some(err) = reply.get("error") {
            panic!("DevTools `{method}` failed: {err}");
        }
        reply["result"].clone()
    }

    /// A new page target, attached (flat session); returns the session id.
    pub async fn new_page(&mut self) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({"url": "about:blank"}))
            .await;
        self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        )
        .await["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned()
    }

    /// Evaluates `expression` in the page (awaiting a promise); returns its value as JSON.
    pub async fn evaluate(&mut self, session: &str, expression: &str) -> Value {
        let result = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        if let Some(e) = result.get("exceptionDetails") {
            panic!("the page threw evaluating {expression:?}: {e}");
        }
        result["result"]["value"].clone()
    }

    /// A PNG screenshot of the page's viewport.
    pub async fn screenshot(&mut self, session: &str) -> Vec<u8> {
        let shot = self
            .call(
                Some(session),
                "Page.captureScreenshot",
                json!({"format": "png"}),
            )
            .await;
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }
}

/// Standard base64 (what DevTools sends binary data in), padding optional.
pub fn base64_decode(text: &str) -> Vec<u8> {
    fn value(c: u8) -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    }
    let clean: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= value(*c) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_round_trips_the_rfc_4648_examples() {
    for (plain, encoded) in [
        ("", ""),
        ("f", "Zg=="),
        ("fo", "Zm8="),
        ("foo", "Zm9v"),
        ("foob", "Zm9vYg=="),
        ("fooba", "Zm9vYmE="),
        ("foobar", "Zm9vYmFy"),
    ] {
        assert_eq!(base64_decode(encoded), plain.as_bytes(), "{encoded}");
    }
}
