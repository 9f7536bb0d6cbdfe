//! The real `wsgate` binary driven by an independent client: Python `websockets`
//! (`tests/py/client_check.py`), a WebSocket implementation that shares no code with ours or with
//! the Rust test client. The binary is started the way deployments start it (`--listen`, and a
//! YAML config that lets clients publish to the `chat` namespace). `websockets` offers
//! permessage-deflate by default, so the script also checks compression both ways: a large
//! publication the server compressed, and large client messages the server had to inflate.
//!
//! Needs `python3` with the `websockets` package; `./scripts/test` installs it. When it is missing
//! this test fails (it does not skip) and says so.

mod interop;

use std::path::Path;
use std::process::{Command, Stdio};

use interop::{repo_root, Gateway};

/// The gateway's config file: clients may publish to `chat:*` topics.
const CONFIG: &str = "namespaces:\n  chat:\n    client_publish: true\n";

/// Fails (never skips) when python3 or its `websockets` package is missing.
fn require_python_websockets() {
    let probe = Command::new("python3")
        .args(["-c", "import websockets"])
        .output();
    match probe {
        Err(e) => panic!(
            "python3 is not available ({e}); this test drives the gateway from Python. \
             Install python3, then run ./scripts/test (it installs the websockets package)."
        ),
        Ok(out) if !out.status.success() => panic!(
            "the Python package `websockets` is missing: run ./scripts/test (it installs it), \
             or `python3 -m pip install websockets`.\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(_) => {}
    }
}

#[test]
fn python_websockets_client_talks_to_the_binary() {
    require_python_websockets();
    let script = repo_root().join("tests/py/client_check.py");
    assert!(
        Path::new(&script).exists(),
        "{} is missing",
        script.display()
    );

    let config = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file for the config");
    std::fs::write(config.path(), CONFIG).expect("write the config");
    let config_path = config.path().to_string_lossy().to_string();
    let gw = Gateway::start(&["--config", &config_path]);
    let url = format!("ws://{}", gw.addr);
    let out = Command::new("python3")
        .arg(&script)
        .arg(&url)
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .output()
        .expect("run python3 tests/py/client_check.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python3 tests/py/client_check.py {url} failed ({}):\n--- stdout\n{stdout}--- stderr\n{stderr}\
         --- gateway output\n{}",
        out.status,
        gw.output()
    );
    print!("{stdout}");
}
