//! Support for the interoperability tests against independent clients (`tests/interop_k6.rs`,
//! `tests/interop_chromium.rs`): the real `wsgate` binary on a free loopback port, and a wire tap
//! (a TCP relay in front of it) that records the bytes of each connection both ways so a test can
//! read the WebSocket frames as they crossed the wire: RSV1 bits, sizes, and the inflated text.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long the binary may take to start answering on its port.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway process; killed when dropped, so a failing assertion does not leak it.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Gateway {
    /// Starts the binary on a free loopback port with `extra` arguments and waits until the port
    /// answers.
    pub fn start(extra: &[&str]) -> Gateway {
        Self::start_logging("info", extra)
    }

    /// [`Gateway::start`] with the log level `level` (`--log`).
    pub fn start_logging(level: &str, extra: &[&str]) -> Gateway {
        let addr = free_port();
        let log = tempfile::NamedTempFile::new().expect("temp file for the gateway log");
        let out = log.reopen().expect("reopen the log file");
        let err = log.reopen().expect("reopen the log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .arg("--log")
            .arg(level)
            .args(extra)
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
        let mut gw = Gateway { child, addr, log };
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
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the gateway printed so far.
    pub fn output(&self) -> String {
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
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The bytes of one relayed TCP connection.
#[derive(Default)]
pub struct Recorded {
    /// Client to server.
    pub up: Vec<u8>,
    /// Server to client.
    pub down: Vec<u8>,
}

/// A TCP relay on its own loopback port in front of `upstream` that keeps a copy of every byte
/// of every connection. Its accept thread lives as long as the test process (tests are short).
pub struct WireTap {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
}

impl WireTap {
    pub fn start(upstream: SocketAddr) -> WireTap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the wire tap");
        let addr = listener.local_addr().expect("local address");
        let connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let list = Arc::clone(&connections);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let rec = Arc::new(Mutex::new(Recorded::default()));
                list.lock().unwrap().push(Arc::clone(&rec));
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                let up = Arc::clone(&rec);
                thread::spawn(move || relay(client, server, &up, true));
                thread::spawn(move || relay(s2, c2, &rec, false));
            }
        });
        WireTap { addr, connections }
    }

    /// Every WebSocket connection seen so far that was upgraded (101), with its frames.
    pub fn websockets(&self) -> Vec<WsCapture> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .filter_map(|rec| WsCapture::parse(&rec.lock().unwrap()))
            .collect()
    }
}

fn relay(mut from: TcpStream, mut to: TcpStream, rec: &Mutex<Recorded>, up: bool) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                {
                    let mut r = rec.lock().unwrap();
                    if up {
                        r.up.extend_from_slice(&buf[..n]);
                    } else {
                        r.down.extend_from_slice(&buf[..n]);
                    }
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// One WebSocket frame as it crossed the wire.
#[derive(Debug, Clone)]
pub struct WireFrame {
    pub fin: bool,
    pub rsv1: bool,
    pub opcode: u8,
    /// Payload length on the wire (compressed length for a compressed message).
    pub wire_len: usize,
    /// The payload, unmasked.
    pub payload: Vec<u8>,
}

/// One data message (its frames joined) as it crossed the wire.
#[derive(Debug, Clone)]
pub struct WireMessage {
    pub opcode: u8,
    pub compressed: bool,
    /// Payload bytes on the wire, all frames together.
    pub wire_len: usize,
    /// The message text: inflated when it was compressed.
    pub text: String,
}

/// An upgraded connection as the tap saw it.
#[derive(Debug)]
pub struct WsCapture {
    pub request_head: String,
    pub response_head: String,
    pub up: Vec<WireFrame>,
    pub down: Vec<WireFrame>,
}

impl WsCapture {
    fn parse(rec: &Recorded) -> Option<WsCapture> {
        let (request_head, up) = split_head(&rec.up)?;
        let (response_head, down) = split_head(&rec.down)?;
        if !response_head.starts_with("HTTP/1.1 101") {
            return None;
        }
        Some(WsCapture {
            request_head,
            response_head,
            up: parse_frames(up),
            down: parse_frames(down),
        })
    }

    /// A header of the upgrade request (case-insensitive name), if present.
    pub fn request_header(&self, name: &str) -> Option<String> {
        header(&self.request_head, name)
    }

    /// A header of the 101 response (case-insensitive name), if present.
    pub fn response_header(&self, name: &str) -> Option<String> {
        header(&self.response_head, name)
    }

    /// Client-to-server data messages.
    pub fn messages_up(&self) -> Vec<WireMessage> {
        messages(&self.up)
    }

    /// Server-to-client data messages.
    pub fn messages_down(&self) -> Vec<WireMessage> {
        messages(&self.down)
    }

    /// A one-line-per-message account of the connection, for failure messages and test output.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (dir, msgs) in [("->", self.messages_up()), ("<-", self.messages_down())] {
            for m in msgs {
                let head: String = m.text.chars().take(60).collect();
                s.push_str(&format!(
                    "{dir} opcode {} {} {} wire bytes, {} text bytes: {head}\n",
                    m.opcode,
                    if m.compressed { "RSV1" } else { "plain" },
                    m.wire_len,
                    m.text.len(),
                ));
            }
        }
        s
    }
}

fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

fn split_head(bytes: &[u8]) -> Option<(String, &[u8])> {
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    Some((head, &bytes[end + 4..]))
}

/// Parses whole frames; a truncated last frame (a connection cut mid-frame) is left out.
fn parse_frames(mut b: &[u8]) -> Vec<WireFrame> {
    let mut frames = Vec::new();
    while b.len() >= 2 {
        let fin = b[0] & 0x80 != 0;
        let rsv1 = b[0] & 0x40 != 0;
        let opcode = b[0] & 0x0F;
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (
                u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        let mask = if masked {
            if b.len() < at + 4 {
                break;
            }
            let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
            at += 4;
            Some(m)
        } else {
            None
        };
        if b.len() < at + len {
            break;
        }
        let mut payload = b[at..at + len].to_vec();
        if let Some(m) = mask {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= m[i % 4];
            }
        }
        frames.push(WireFrame {
            fin,
            rsv1,
            opcode,
            wire_len: len,
            payload,
        });
        b = &b[at + len..];
    }
    frames
}

/// Joins data frames into messages (control frames are skipped) and inflates compressed ones.
fn messages(frames: &[WireFrame]) -> Vec<WireMessage> {
    let mut out = Vec::new();
    let mut current: Option<(u8, bool, usize, Vec<u8>)> = None;
    for f in frames {
        if f.opcode >= 8 {
            continue;
        }
        let (opcode, compressed, wire_len, mut data) = match (f.opcode, current.take()) {
            (0, Some(c)) => c,
            (0, None) => continue, // a continuation without a start: not ours to judge here
            (op, _) => (op, f.rsv1, 0, Vec::new()),
        };
        data.extend_from_slice(&f.payload);
        let next = (opcode, compressed, wire_len + f.wire_len, data);
        if !f.fin {
            current = Some(next);
            continue;
        }
        let (opcode, compressed, wire_len, data) = next;
        let bytes = if compressed {
            wsgate::ws::deflate::inflate(&data, 16 << 20)
                .unwrap_or_else(|e| format!("<does not inflate: {e}>").into_bytes())
        } else {
            data
        };
        out.push(WireMessage {
            opcode,
            compressed,
            wire_len,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    out
}
