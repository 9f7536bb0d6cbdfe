//! `examples/backend.py` (Python, `redis` package) against a real redis-server and a node with
//! the Redis broker: a client's `config_get` goes up the `wsgate:upstream` stream, the backend
//! answers on the node channel, and the client gets the `config` reply with its `requestId`.
//!
//! Needs `python3` with the `redis` package; `./scripts/test` installs it. When it is missing
//! this test fails (it does not skip) and says so.

mod common;
use common::cluster::*;
use common::redis::RedisServer;
use common::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The backend process; killed when dropped.
struct Backend {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Backend {
    fn start(redis_url: &str) -> Backend {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/backend.py");
        let has_redis = Command::new("python3")
            .args(["-c", "import redis"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            has_redis,
            "python3 with the `redis` package is needed for examples/backend.py: run \
             ./scripts/test, which installs it, or: python3 -m pip install redis"
        );
        let mut child = Command::new("python3")
            .arg(&script)
            .args(["--redis", redis_url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn python3 examples/backend.py");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Backend { child, lines }
    }

    /// Waits for an output line containing `needle`; panics with what it printed otherwise.
    fn wait_for_line(&self, needle: &str) -> String {
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(Duration::from_secs(10)) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(e) => panic!("backend never printed {needle:?} ({e}); it printed {seen:?}"),
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The node's `ack` (forwarded) and the backend's `config` answer, in whichever order they
/// arrive (the backend may answer before the node has queued its ack).
async fn ack_and_answer(client: &mut Client) -> (serde_json::Value, serde_json::Value) {
    let first = client.recv_json().await;
    let second = client.recv_json().await;
    match (first["type"].as_str(), second["type"].as_str()) {
        (Some("ack"), Some("config")) => (first, second),
        (Some("config"), Some("ack")) => (second, first),
        _ => panic!("expected an ack and a config answer, got {first} and {second}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_backend_answers_config_get() {
    let redis = RedisServer::start();
    let node = cluster_node(&[redis.url()], "edge-1").await;
    wait_ready(node.local_addr).await;
    let backend = Backend::start(&redis.url());
    backend.wait_for_line("reading wsgate:upstream");

    let (mut client, hello) = connect(node.local_addr, "/ws?user_id=alice&clientId=web-1").await;
    let connection_id = hello["data"]["connectionId"].as_u64().expect("id");
    let (mut other, _) = connect(node.local_addr, "/ws?user_id=bob").await;

    client
        .send_json(json!({"type": "config_get", "id": "c1", "data": {}}))
        .await;
    let (ack, reply) = ack_and_answer(&mut client).await;
    assert_eq!(ack["data"]["action"], "forwarded", "{ack}");
    assert_eq!(ack["data"]["requestId"], "c1", "{ack}");
    assert_eq!(reply["data"]["requestId"], "c1", "{reply}");
    assert_eq!(reply["data"]["config"]["user"], "alice", "{reply}");
    assert!(reply["data"]["config"]["features"].is_object(), "{reply}");
    backend.wait_for_line("answered config_get 'c1'");
    // Only the asking connection gets the answer.
    other.expect_silence().await;

    // The stream entry the backend read carries the documented fields.
    let entry = redis.cli(&["XRANGE", "wsgate:upstream", "-", "+", "COUNT", "1"]);
    let lines: Vec<&str> = entry.lines().map(str::trim).collect();
    let field = |name: &str| {
        lines
            .iter()
            .position(|l| *l == name)
            .and_then(|i| lines.get(i + 1))
            .copied()
            .unwrap_or_else(|| panic!("no field {name} in {entry}"))
    };
    assert_eq!(field("node"), "edge-1");
    assert_eq!(field("connectionId"), connection_id.to_string());
    assert_eq!(field("clientId"), "web-1");
    assert_eq!(field("userId"), "alice");
    assert_eq!(field("type"), "config_get");
    let message: serde_json::Value = serde_json::from_str(field("message")).expect("JSON");
    assert_eq!(message["id"], "c1");

    // A second request, from another client: answered too (the backend keeps reading).
    other
        .send_json(json!({"type": "config_get", "id": 7, "data": {}}))
        .await;
    let (ack, reply) = ack_and_answer(&mut other).await;
    assert_eq!(ack["data"]["requestId"], 7, "{ack}");
    assert_eq!(reply["data"]["requestId"], 7, "{reply}");
    assert_eq!(reply["data"]["config"]["user"], "bob", "{reply}");
    client.expect_silence().await;
}

/// The Python `shard_of` of examples/backend.py (the one README shows) picks the same Redis
/// instance as the gateway for every name.
#[test]
fn python_shard_of_matches_the_gateway() {
    use wsgate::broker::redis::shard::shard_of;
    let names: Vec<String> = [
        "routes",
        "metrics",
        "alerts",
        "chat:room",
        "alice",
        "ü-topic",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain((0..200).map(|i| format!("topic-{i}")))
    .collect();
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples");
    let program = "import json, sys\n\
                   import backend\n\
                   names = json.load(sys.stdin)\n\
                   print(json.dumps([[backend.shard_of(n, s) for s in range(1, 6)] for n in names]))\n";
    let mut child = Command::new("python3")
        .args(["-B", "-c", program])
        .current_dir(&examples)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(serde_json::to_string(&names).expect("JSON").as_bytes())
            .expect("write names");
    }
    let out = child.wait_with_output().expect("python3 runs");
    assert!(
        out.status.success(),
        "python3 failed (needs the `redis` package: python3 -m pip install redis): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let python: Vec<Vec<usize>> = serde_json::from_slice(&out.stdout).expect("JSON from python");
    for (name, shards) in names.iter().zip(&python) {
        let rust: Vec<usize> = (1..6).map(|s| shard_of(name, s)).collect();
        assert_eq!(&rust, shards, "shard_of({name:?}, 1..=5)");
    }
    assert_eq!(python.len(), names.len());
}
