//! The `wsgate` binary as a deployment script meets it: `--help`, `check-config`, and starting
//! a node purely from SPEC section 9 flags and environment variables.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wsgate");

/// Kills the child on drop so a failing test leaves no gateway behind.
struct Gateway(Child);

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn wait_until_listening(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn yaml_file(yaml: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yaml")
        .tempfile()
        .expect("temp file");
    f.write_all(yaml.as_bytes()).expect("write");
    f
}

#[test]
fn help_lists_every_deployment_setting_with_its_env_var() {
    let out = Command::new(BIN)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, env) in [
        ("--config", "WSGATE_CONFIG"),
        ("--listen", "WSGATE_LISTEN"),
        ("--node-id", "WSGATE_NODE_ID"),
        ("--redis-url", "WSGATE_REDIS_URL"),
        ("--max-connections", "WSGATE_MAX_CONNECTIONS"),
        ("--max-message-size", "WSGATE_MAX_MESSAGE_SIZE"),
        ("--jwt-secret", "WSGATE_JWT_SECRET"),
        ("--api-key", "WSGATE_API_KEYS"),
        ("--compression", "WSGATE_COMPRESSION"),
        ("--drain-seconds", "WSGATE_DRAIN_SECONDS"),
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        assert!(help.contains(env), "--help lacks {env}");
    }
    assert!(help.contains("check-config"));
}

#[test]
fn check_config_accepts_a_good_file() {
    let f = yaml_file("websocket:\n  enable: true\n  port: \"8081\"\n  max_connections: 10000\n");
    let out = Command::new(BIN)
        .args(["check-config"])
        .arg(f.path())
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": ok"), "{stdout}");
    assert!(stdout.contains("0.0.0.0:8081"), "{stdout}");
}

#[test]
fn check_config_explains_what_is_wrong() {
    let f = yaml_file("websocket:\n  enable: true\n  max_conections: 10\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(f.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("max_conections"),
        "names the bad key: {stderr}"
    );
    assert!(stderr.contains("line 3"), "names the line: {stderr}");

    let f = yaml_file("websocket:\n  max_connections: 0\n  paths: [ws]\n");
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(f.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_connections"), "{stderr}");
    assert!(
        stderr.contains("paths"),
        "every problem is listed: {stderr}"
    );
}

#[test]
fn node_starts_from_environment_alone_and_flags_beat_env() {
    let env_port = free_port();
    let flag_port = free_port();
    let _gw = Gateway(
        Command::new(BIN)
            .env("WSGATE_LISTEN", format!("127.0.0.1:{env_port}"))
            .env("WSGATE_NODE_ID", "env-node")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    assert!(wait_until_listening(SocketAddr::from((
        [127, 0, 0, 1],
        env_port
    ))));

    let _gw2 = Gateway(
        Command::new(BIN)
            .env("WSGATE_LISTEN", format!("127.0.0.1:{env_port}"))
            .args(["--listen", &format!("127.0.0.1:{flag_port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    assert!(wait_until_listening(SocketAddr::from((
        [127, 0, 0, 1],
        flag_port
    ))));
}

#[test]
fn a_port_in_use_is_reported_and_exits_nonzero() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let out = Command::new(BIN)
        .args(["--listen", &addr.to_string()])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
}

#[test]
fn json_logs_come_one_object_per_line_with_secrets_kept_out() {
    let port = free_port();
    let mut gw = Gateway(
        Command::new(BIN)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--node-id", "json-node"])
            // Nothing listens on port 1: the node starts anyway and logs that Redis is away.
            .args(["--redis-url", "redis://:hunter2-pass@127.0.0.1:1"])
            .env("WSGATE_LOG_FORMAT", "json")
            .env("WSGATE_API_KEYS", "api-key-sekrit")
            .env("WSGATE_JWT_SECRET", "jwt-sekrit-value")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    assert!(wait_until_listening(SocketAddr::from((
        [127, 0, 0, 1],
        port
    ))));
    std::thread::sleep(Duration::from_millis(500));
    let _ = gw.0.kill();
    let _ = gw.0.wait();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    use std::io::Read;
    gw.0.stdout
        .take()
        .expect("piped")
        .read_to_string(&mut stdout)
        .expect("stdout");
    gw.0.stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "stdout: {stdout}\nstderr: {stderr}");
    let mut listening = None;
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}\nstdout: {stdout}"));
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v.get(key).is_some(), "no {key:?} in {line}");
        }
        if v["message"] == "wsgate listening" {
            listening = Some(v);
        }
    }
    let listening = listening.unwrap_or_else(|| panic!("no `wsgate listening` line: {stdout}"));
    assert_eq!(listening["level"], "INFO");
    assert_eq!(
        listening["node"], "json-node",
        "fields are top-level: {listening}"
    );
    assert_eq!(listening["broker"], "redis");
    assert!(
        stdout.contains("redis unreachable"),
        "the Redis warning is logged: {stdout}"
    );
    for secret in ["hunter2-pass", "api-key-sekrit", "jwt-sekrit-value"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} was logged:\n{stdout}\n{stderr}"
        );
    }

    // `--log-format` and its variable are in --help; an unknown format is refused.
    let help = Command::new(BIN).arg("--help").output().expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--log-format") && help.contains("WSGATE_LOG_FORMAT"),
        "{help}"
    );
    let bad = Command::new(BIN)
        .args(["--log-format", "xml"])
        .output()
        .expect("run");
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
}
