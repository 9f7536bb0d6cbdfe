//! Real Redis for tests: a `redis-server` child process on a free port ([`RedisServer`]) and a
//! local 3-master Redis Cluster ([`RedisCluster`]). Both are killed on drop; each server runs in
//! its own temporary directory so dumps and cluster config files never collide.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a server may take to answer PING after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new cluster may take to reach `cluster_state:ok`.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(20);

/// A port on 127.0.0.1 that was free a moment ago (and whose cluster bus port, +10000, too).
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind an ephemeral port");
        let port = listener.local_addr().expect("local addr").port();
        if port > 55_535 {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10_000)).is_ok() {
            return port;
        }
    }
}

fn check_installed() {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        panic!("redis-server not found: run ./scripts/test, which installs it");
    }
}

/// Whether a Redis on `port` answers PING.
fn pings(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    let mut got = Vec::new();
    while got.len() < 7 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    got.starts_with(b"+PONG")
}

/// A real `redis-server` child process on 127.0.0.1, killed on drop.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// A server on a free port (no persistence); returns once it answers PING.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A server on `port`; returns once it answers PING.
    pub fn start_on(port: u16) -> RedisServer {
        Self::start_on_with(port, &[])
    }

    /// A server on a free port with extra `redis-server` arguments (e.g. cluster mode).
    pub fn start_with(extra_args: &[&str]) -> RedisServer {
        check_installed();
        // Another test may grab the port between our probe and redis-server's bind: try again.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = Self::new(free_port(), extra_args);
            match server.spawn() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    /// A server on `port` with extra `redis-server` arguments.
    pub fn start_on_with(port: u16, extra_args: &[&str]) -> RedisServer {
        check_installed();
        let mut server = Self::new(port, extra_args);
        server.spawn_retrying();
        server
    }

    fn new(port: u16, extra_args: &[&str]) -> RedisServer {
        RedisServer {
            port,
            dir: tempfile::tempdir().expect("temp dir for redis-server"),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn_retrying();
    }

    /// Runs `redis-cli -p PORT args...`; returns its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs every line of `script` through one `redis-cli -p PORT` session, back to back (no
    /// other client can get in between on a busy loopback); returns its stdout.
    pub fn cli_script(&self, script: &str) -> String {
        use std::io::Write;
        let mut child = Command::new("redis-cli")
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run redis-cli");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("write the script");
        let out = child.wait_with_output().expect("redis-cli output");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// The `calls` of one command in `INFO commandstats` (0 when it never ran).
    pub fn command_calls(&self, command: &str) -> u64 {
        let stats = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        stats
            .lines()
            .find_map(|line| line.trim().strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Channels with at least one subscriber (`PUBSUB CHANNELS`).
    pub fn channels(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .cli(&["PUBSUB", "CHANNELS"])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        v.sort();
        v
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("redis.log")
    }

    fn spawn_retrying(&mut self) {
        // The old process's port may linger briefly (or the kernel may hand it out): retry.
        let mut last_error = String::new();
        for attempt in 0..10 {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1)));
        }
        panic!(
            "redis-server did not start on port {}: {last_error}",
            self.port
        );
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn redis-server: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!("exited with {status}; log tail: {tail:?}"));
            }
            if pings(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no PONG in time".to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local 3-master Redis Cluster (cluster-enabled redis-servers on free ports, joined with `redis-cli --cluster create ... --cluster-replicas 0 --cluster-yes`), killed on Drop; waits until `CLUSTER INFO` says cluster_state:ok on every node.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(String::from));
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let ok = (0..cluster.nodes.len()).all(|i| {
                cluster
                    .cli(i, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            });
            if ok {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not reach cluster_state:ok: {:?}",
                (0..cluster.nodes.len())
                    .map(|i| cluster.cli(i, &["CLUSTER", "INFO"]))
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis://127.0.0.1:PORT` of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes themselves (to kill or restart one).
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Runs `redis-cli -p PORT args...` against node `node`; returns its stdout, trimmed.
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        self.nodes[node].cli(args)
    }
}
