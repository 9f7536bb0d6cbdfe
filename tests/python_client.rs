//! The real `wsgate` binary driven by an independent client: Python `websockets`
//! (`tests/py/client_check.py`), a WebSocket implementation that shares no code with ours or with
//! the Rust test client. The binary is started the way deployments start it (`--listen`, and a
//! YAML config that lets clients publish to the `chat` namespace). `websockets` offers
//! permessage-deflate by default, so the script also checks compression both ways: a large
//! publication the server compressed, and large client messages the server had to inflate.
//!
//! Needs `python3` with the `websockets` package; `./scripts/test` installs it. When it is missing
//! this test fails (it does not skip) and says so.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the binary may take to start answering on its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway process; killed when dropped, so a failing assertion does not leak it.
struct Gateway {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
    _config: tempfile::NamedTempFile,
}

/// The gateway's config file: clients may publish to `chat:*` topics.
const CONFIG: &str = "namespaces:\n  chat:\n    client_publish: true\n";

impl Gateway {
    /// Starts the binary on a free loopback port and waits until the port answers.
    fn start() -> Gateway {
        let addr = free_port();
        let log = tempfile::NamedTempFile::new().expect("temp file for the gateway log");
        let out = log.reopen().expect("reopen the log file");
        let err = log.reopen().expect("reopen the log file");
        let config = tempfile::Builder::new()
            .suffix(".yaml")
            .tempfile()
            .expect("temp file for the config");
        std::fs::write(config.path(), CONFIG).expect("write the config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.arg("--config")
            .arg(config.path())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--log")
            .arg("info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        // The run must not depend on the caller's environment (an API key, a Redis URL, ...).
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("WSGATE_") {
                cmd.env_remove(&key);
            }
        }
        let child = cmd.spawn().expect("spawn the wsgate binary");
        let mut gw = Gateway {
            child,
            addr,
            log,
            _config: config,
        };
        gw.wait_until_listening();
        gw
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "wsgate --listen {} exited during start-up ({status}); its output:\n{}",
                    self.addr,
                    self.output()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "wsgate --listen {} did not answer within {START_TIMEOUT:?}; its output:\n{}",
                    self.addr,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the gateway printed so far.
    fn output(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.log.path()) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on right now: bind port 0, note the port, let it go.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

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

    let gw = Gateway::start();
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
