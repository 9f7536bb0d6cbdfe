//! The repository's HAProxy config (`deploy/haproxy/haproxy.cfg`, the one `deploy/compose.yaml`
//! mounts) rendered for loopback, and a real `haproxy` process running it (`tests/drain.rs`,
//! `tests/deploy_files.rs`).
//!
//! Rendering changes addresses only: the public `bind` (`:8080`) and the stats `bind` (`:8404`)
//! become loopback ports, and the `server` lines of the `wsgate` backend point, in order, at the
//! test's nodes (servers beyond the test's nodes are left out). Everything else (checks on
//! `/readyz`, retries, timeouts) runs as committed.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The committed config.
pub fn config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/haproxy.cfg")
}

/// The `haproxy` binary: on `PATH`, else Debian's `/usr/sbin/haproxy` (not on a normal user's
/// `PATH`). `None` when it is not installed.
pub fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
}

/// [`find_binary`], or a panic that says how to get it.
pub fn binary() -> PathBuf {
    find_binary().unwrap_or_else(|| {
        panic!(
            "haproxy not found: run ./scripts/test, which installs it (apt-get install -y haproxy)"
        )
    })
}

/// `host:port` of every `server` line of the `wsgate` backend, in order, with its name.
pub fn servers(config: &str) -> Vec<(String, String)> {
    let mut in_backend = false;
    let mut out = Vec::new();
    for line in config.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            [first, ..] if first.starts_with('#') => {}
            [section, rest @ ..]
                if !line.starts_with(char::is_whitespace)
                    && matches!(
                        *section,
                        "global" | "defaults" | "frontend" | "backend" | "listen" | "resolvers"
                    ) =>
            {
                in_backend = *section == "backend" && rest.first() == Some(&"wsgate");
            }
            ["server", name, addr, ..] if in_backend => {
                out.push((name.to_string(), addr.to_string()));
            }
            _ => {}
        }
    }
    out
}

/// The committed config with `bind :8080` on `public`, `bind :8404` on `stats`, and the backend's
/// servers on `nodes` (in order; servers beyond `nodes.len()` dropped).
pub fn render(config: &str, public: SocketAddr, stats: SocketAddr, nodes: &[SocketAddr]) -> String {
    let mut server_index = 0;
    let mut out = String::new();
    let mut binds = 0;
    for line in config.lines() {
        let trimmed = line.trim();
        let indent = &line[..line.len() - line.trim_start().len()];
        if trimmed == "bind :8080" {
            out.push_str(&format!("{indent}bind {public}\n"));
            binds += 1;
        } else if trimmed == "bind :8404" {
            out.push_str(&format!("{indent}bind {stats}\n"));
            binds += 1;
        } else if let Some(rest) = trimmed.strip_prefix("server ") {
            let mut words = rest.split_whitespace();
            let name = words.next().expect("server name");
            let _addr = words.next().expect("server address");
            let params: Vec<&str> = words.collect();
            if let Some(node) = nodes.get(server_index) {
                out.push_str(&format!(
                    "{indent}server {name} {node} {}\n",
                    params.join(" ")
                ));
            }
            server_index += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert_eq!(binds, 2, "the config binds :8080 and :8404");
    assert!(
        server_index >= nodes.len(),
        "the config has {server_index} servers, the test {} nodes",
        nodes.len()
    );
    out
}

/// `haproxy -c -f FILE`: `Ok(output)` when the config is valid.
pub fn check(file: &Path) -> Result<String, String> {
    let out = Command::new(binary())
        .arg("-c")
        .arg("-f")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .expect("run haproxy -c");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
}

/// A `haproxy` process running the rendered config; killed on drop.
pub struct Haproxy {
    child: Child,
    /// The public frontend (WebSockets and the HTTP API).
    pub addr: SocketAddr,
    /// The stats page (`/;csv` for the servers' states).
    pub stats: SocketAddr,
    dir: tempfile::TempDir,
}

impl Haproxy {
    /// Renders the committed config for `nodes`, checks it (`haproxy -c`), starts it in the
    /// foreground and waits until its public port answers.
    pub fn start(nodes: &[SocketAddr]) -> Haproxy {
        let bin = binary();
        let template = std::fs::read_to_string(config_path()).expect("read haproxy.cfg");
        let (addr, stats) = (free_addr(), free_addr());
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, render(&template, addr, stats, nodes)).expect("write config");
        if let Err(out) = check(&cfg) {
            panic!("haproxy -c refuses the rendered config:\n{out}");
        }
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("log file");
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn haproxy");
        let mut proxy = Haproxy {
            child,
            addr,
            stats,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                panic!("haproxy exited with {status}: {}", proxy.log());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not listen: {}",
                proxy.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }

    /// What HAProxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default()
    }

    /// The state (`UP`, `DOWN`, `UP 1/2`, ...) of every server of the `wsgate` backend, from
    /// the stats page's CSV.
    pub async fn server_states(&self) -> Vec<(String, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.stats)
            .await
            .expect("connect to the stats page");
        let req = format!("GET /;csv HTTP/1.0\r\nHost: {}\r\n\r\n", self.stats);
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
            .await
            .expect("stats page in time")
            .expect("read");
        let text = String::from_utf8_lossy(&raw).to_string();
        let (head, body) = text.split_once("\r\n\r\n").expect("HTTP response");
        assert!(head.contains(" 200 "), "stats page: {head}");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        let mut lines = body.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines
            .next()
            .expect("csv header")
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .unwrap_or_else(|| panic!("no {name} column in {header:?}"))
        };
        let (px, sv, st) = (col("pxname"), col("svname"), col("status"));
        lines
            .map(|l| l.split(',').collect::<Vec<&str>>())
            .filter(|f| f.len() > st && f[px] == "wsgate" && f[sv] != "BACKEND")
            .map(|f| (f[sv].to_string(), f[st].to_string()))
            .collect()
    }
}

/// The payload of a chunked HTTP/1.1 body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if size == 0 || rest.len() < size {
            break;
        }
        out.push_str(&rest[..size]);
        body = rest[size..].trim_start_matches("\r\n");
    }
    out
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
