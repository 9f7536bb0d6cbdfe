//! A minimal WebSocket client (RFC 6455) with the receiving half of permessage-deflate (RFC 7692),
//! and the three servers' subscribe handshakes. The framing and inflation are in
//! [`crate::frames`]; this file owns the socket: connect, upgrade, send, and the stamped reads.
//!
//! Why not tokio-tungstenite (already a dev-dependency of the gateway): it has no
//! permessage-deflate, and the generator must negotiate it. Only the receiving side of the
//! extension is needed: a client may always send uncompressed messages (RSV1 clear), and what
//! the generator sends (subscribe, pong, engine.io packets) is tiny. Inflating is flate2 on a raw
//! deflate stream with the RFC's `00 00 ff ff` tail appended. When the server answers
//! `server_no_context_takeover` (wsgate, nchan) every message inflates on its own, so one
//! inflater per worker process serves every connection; otherwise (Socket.IO's `ws` keeps its
//! context by default) each connection keeps its own. The generator also offers
//! `client_no_context_takeover`, which costs it nothing (it never compresses).
//!
//! Frames from the server are unmasked; frames to the server are masked (a fixed mask: the
//! masking protects proxies, not the data, and a constant one is allowed by the framing).

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};

use base64::Engine;
use flate2::Decompress;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::{Config, Scenario, Target};
pub use crate::frames::Deflate;
use crate::frames::{Frames, Step};

/// The RFC 6455 example key and its accept value (the key only has to be a base64 nonce; a
/// fixed one keeps SHA-1 out of the generator).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";
const MASK: [u8; 4] = [0x12, 0x34, 0x56, 0x78];

#[derive(Debug)]
pub struct ClientError(pub String);

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError(format!("io: {e}"))
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ClientError> {
    Err(ClientError(msg.into()))
}

/// One event from the socket.
pub enum Event<'a> {
    /// A complete text or binary message (inflated), and when its last bytes reached this
    /// host's socket (`SO_TIMESTAMPNS`, see [`Frames::message`]).
    Message(&'a [u8], Option<u64>),
    /// The server closed (close frame code, if any) or the TCP stream ended (`None`).
    Closed(Option<u16>),
}

pub struct WsClient {
    stream: TcpStream,
    /// What has been read and not yet taken as messages.
    pub frames: Frames,
}

/// One `recvmsg` into `buf`: the bytes read and, when the kernel attached one, the
/// `SCM_TIMESTAMPNS` receive time (ns since the epoch, the clock of [`crate::publish::now_ns`]).
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: a valid fd and msghdr whose buffers are live and sized as declared.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let stamp = receive_stamp(&msg);
    Ok((n as usize, stamp))
}

/// The `SCM_TIMESTAMPNS` receive time among the control messages `msg` points at, if there is
/// one (ns since the epoch, the clock of [`crate::publish::now_ns`]).
pub fn receive_stamp(msg: &libc::msghdr) -> Option<u64> {
    let mut stamp = None;
    // SAFETY: walking control messages the kernel wrote (msg_control/msg_controllen describe
    // a live buffer), with the libc macros, which stop at msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec);
                stamp = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    stamp
}

/// Waits until `stream` has data and reads it into `buf` with [`recv_stamped`].
///
/// A read that leaves room in `buf` took everything the socket held, so it also clears the
/// stream's readiness: otherwise the next read would find the socket ready, make a second
/// `recvmsg` only to get `EAGAIN`, and double the generator's syscalls per message. Readiness
/// that arrives meanwhile is newer than the one cleared, and tokio keeps it.
async fn read_stamped(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, Option<u64>)> {
    let fd = stream.as_raw_fd();
    let room = buf.len();
    loop {
        stream.readable().await?;
        let mut drained = None;
        match stream.try_io(Interest::READABLE, || match recv_stamped(fd, buf) {
            Ok((n, stamp)) if n > 0 && n < room => {
                drained = Some((n, stamp));
                Err(std::io::ErrorKind::WouldBlock.into())
            }
            read => read,
        }) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Some(read) = drained {
                    return Ok(read);
                }
            }
            read => return read,
        }
    }
}

/// Sets an `int` socket option to 1 (best effort: the generator works without either option
/// it sets, only less well).
fn enable_option(fd: RawFd, level: libc::c_int, name: libc::c_int) {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a 4-byte int option value.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Opens a TCP connection from `source` (port chosen at connect time, so each source address
/// gets its own ephemeral port range per destination).
pub async fn tcp_connect(source: Ipv4Addr, dest: SocketAddr) -> Result<TcpStream, ClientError> {
    let socket = TcpSocket::new_v4()?;
    // IP_BIND_ADDRESS_NO_PORT: bind() keeps the address only; connect() picks the port for the
    // whole 4-tuple, so one source address can reach 28k ports per destination.
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    enable_option(
        socket.as_raw_fd(),
        libc::IPPROTO_IP,
        IP_BIND_ADDRESS_NO_PORT,
    );
    // SO_TIMESTAMPNS: every read also says when its bytes arrived (see `recv_stamped`).
    enable_option(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS);
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let stream = socket.connect(dest).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The request path and query of connection `i`.
pub fn ws_path(cfg: &Config, i: usize, token: Option<&str>) -> String {
    let user = cfg.user_of(i);
    match cfg.target {
        Target::Wsgate => match token {
            Some(t) => format!("/ws?token={t}&clientId={}-c{i}", cfg.prefix()),
            None => format!("/ws?user_id={user}&clientId={}-c{i}", cfg.prefix()),
        },
        Target::Socketio => format!("/socket.io/?EIO=4&transport=websocket&user_id={user}"),
        Target::Nchan => {
            let channel = match cfg.scenario {
                Scenario::Users => user,
                Scenario::Storm => format!("{}-storm", cfg.prefix()),
                _ if cfg.streams() == 0 => format!("{}-idle", cfg.prefix()),
                _ => cfg.stream_name(i % cfg.streams()),
            };
            format!("/sub/{channel}")
        }
    }
}

impl WsClient {
    /// The HTTP upgrade. Returns once the 101 has been read.
    pub async fn handshake(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        offer_deflate: bool,
    ) -> Result<WsClient, ClientError> {
        let ext = if offer_deflate {
            "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut buf = vec![0u8; 4096];
        let mut end = 0;
        let head_len = loop {
            if end == buf.len() {
                return err("upgrade response headers over 4 KiB");
            }
            let n = stream.read(&mut buf[end..]).await?;
            if n == 0 {
                return err("connection closed during the upgrade");
            }
            end += n;
            if let Some(p) = memchr::memmem::find(&buf[..end], b"\r\n\r\n") {
                break p + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        let status = head.split(' ').nth(1).unwrap_or("");
        if status != "101" {
            let first = head.lines().next().unwrap_or("");
            return err(format!("upgrade refused: {first}"));
        }
        let mut deflate = Deflate::Off;
        let mut accept_ok = false;
        for line in head.lines().skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "sec-websocket-accept" {
                accept_ok = value == WS_ACCEPT;
            } else if name == "sec-websocket-extensions"
                && value.to_ascii_lowercase().starts_with("permessage-deflate")
            {
                deflate = if value.contains("server_no_context_takeover") {
                    Deflate::NoContext
                } else {
                    Deflate::Context
                };
            }
        }
        if !accept_ok {
            return err("upgrade answered without the right Sec-WebSocket-Accept");
        }
        Ok(WsClient {
            stream,
            frames: Frames::new(buf, head_len, end, deflate),
        })
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &[u8]) -> Result<(), ClientError> {
        let mut f = Vec::with_capacity(text.len() + 14);
        encode_frame(&mut f, 0x1, text);
        self.stream.write_all(&f).await?;
        Ok(())
    }

    /// The next complete message (pings are answered on the way). `shared` is the worker's
    /// inflater for messages compressed without context takeover.
    pub async fn next<'a>(
        &'a mut self,
        shared: &RefCell<Decompress>,
    ) -> Result<Event<'a>, ClientError> {
        loop {
            match self.frames.step(shared)? {
                Step::Message => {
                    let (m, arrived) = self.frames.message();
                    return Ok(Event::Message(m, arrived));
                }
                Step::Close(code) => return Ok(Event::Closed(code)),
                Step::NeedMore => {}
            }
            let out = self.frames.take_out();
            if !out.is_empty() {
                self.stream.write_all(&out).await?;
            }
            let (n, stamp) = read_stamped(&self.stream, self.frames.spare()).await?;
            if n == 0 {
                return Ok(Event::Closed(None));
            }
            self.frames.filled(n, stamp);
        }
    }

    /// The socket (out of tokio's reactor, still non-blocking) and the bytes read so far, for
    /// a receive loop of its own ([`crate::uring`]).
    pub fn into_parts(self) -> std::io::Result<(std::net::TcpStream, Frames)> {
        Ok((self.stream.into_std()?, self.frames))
    }
}

/// Appends one masked frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// An HS256 JWT with `sub` and `exp` (an hour from now).
pub fn jwt(secret: &str, sub: &str) -> String {
    use hmac::{Hmac, Mac};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64.encode(format!(r#"{{"sub":"{sub}","exp":{exp}}}"#));
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(signing_input.as_bytes());
    let sig = b64.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{sig}")
}

/// After the upgrade: waits for the server's greeting and subscribes connection `i` to its
/// stream (topic or user), as each server wants it.
pub async fn subscribe(
    ws: &mut WsClient,
    cfg: &Config,
    i: usize,
    shared: &RefCell<Decompress>,
) -> Result<(), ClientError> {
    let topic = match cfg.scenario {
        Scenario::Fanout | Scenario::Topics => Some(cfg.stream_name(i % cfg.streams())),
        Scenario::Idle if cfg.streams() > 0 => Some(cfg.stream_name(i % cfg.streams())),
        _ => None,
    };
    match cfg.target {
        Target::Wsgate => {
            expect(
                ws,
                shared,
                |m| contains(m, br#""type":"connection""#),
                "connection",
            )
            .await?;
            if let Some(t) = topic {
                let msg = format!(r#"{{"type":"subscribe","id":1,"data":{{"topics":["{t}"]}}}}"#);
                ws.send_text(msg.as_bytes()).await?;
                expect(
                    ws,
                    shared,
                    |m| contains(m, br#""type":"ack""#),
                    "subscribe ack",
                )
                .await?;
            }
        }
        Target::Socketio => {
            expect(ws, shared, |m| m.first() == Some(&b'0'), "engine.io open").await?;
            ws.send_text(b"40").await?;
            expect(ws, shared, |m| m.starts_with(b"40"), "socket.io connect").await?;
            if let Some(t) = topic {
                ws.send_text(format!(r#"420["subscribe",["{t}"]]"#).as_bytes())
                    .await?;
                expect(ws, shared, |m| m.starts_with(b"430"), "subscribe ack").await?;
            }
        }
        // Subscribed by the upgrade itself.
        Target::Nchan => {}
    }
    Ok(())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// Reads messages until one satisfies `want`; an `error` message or a close fails.
async fn expect(
    ws: &mut WsClient,
    shared: &RefCell<Decompress>,
    want: impl Fn(&[u8]) -> bool,
    what: &str,
) -> Result<(), ClientError> {
    loop {
        match ws.next(shared).await? {
            Event::Message(m, _) if want(m) => return Ok(()),
            Event::Message(m, _) if contains(m, br#""type":"error""#) => {
                return err(format!(
                    "waiting for {what}: {}",
                    String::from_utf8_lossy(&m[..m.len().min(300)])
                ))
            }
            Event::Message(m, _) if m == b"2" => ws.send_text(b"3").await?,
            Event::Message(..) => {}
            Event::Closed(code) => return err(format!("closed ({code:?}) waiting for {what}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::server_frame;
    use flate2::{Compress, Compression, FlushCompress};
    use tokio::net::TcpListener;

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::new(1), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, FlushCompress::Sync)
            .expect("compresses");
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    #[tokio::test]
    async fn reads_plain_fragmented_compressed_and_control_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let big = "x".repeat(3000);
        let big_for_server = big.clone();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut req = vec![0u8; 4096];
            let n = s.read(&mut req).await.expect("request");
            let req = String::from_utf8_lossy(&req[..n]).into_owned();
            assert!(req.contains("permessage-deflate"), "{req}");
            let mut out = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {WS_ACCEPT}\r\nSec-WebSocket-Extensions: permessage-deflate; \
                 server_no_context_takeover; client_no_context_takeover\r\n\r\n"
            )
            .into_bytes();
            out.extend(server_frame(0x81, b"hello"));
            out.extend(server_frame(0x89, b"p1"));
            out.extend(server_frame(0x01, b"ab"));
            out.extend(server_frame(0x80, b"cd"));
            out.extend(server_frame(0xC1, &deflate_raw(big_for_server.as_bytes())));
            out.extend(server_frame(0x88, &1000u16.to_be_bytes()));
            // Byte by byte: every frame split across reads.
            for b in out {
                s.write_all(&[b]).await.expect("write");
            }
            let mut pong = [0u8; 8];
            s.read_exact(&mut pong).await.expect("pong");
            pong
        });
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut ws = WsClient::handshake(stream, "h", "/ws", true)
            .await
            .expect("upgrade");
        assert_eq!(ws.frames.deflate, Deflate::NoContext);
        let shared = RefCell::new(Decompress::new(false));
        let mut got = Vec::new();
        loop {
            match ws.next(&shared).await.expect("reads") {
                Event::Message(m, _) => got.push(String::from_utf8(m.to_vec()).expect("utf8")),
                Event::Closed(code) => {
                    assert_eq!(code, Some(1000));
                    break;
                }
            }
        }
        assert_eq!(got, vec!["hello".to_string(), "abcd".to_string(), big]);
        let pong = server.await.expect("server");
        assert_eq!(pong[0], 0x8A, "FIN + pong");
        assert_eq!(pong[1], 0x80 | 2, "masked, 2 bytes");
        let unmasked: Vec<u8> = pong[6..8]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ pong[2 + i])
            .collect();
        assert_eq!(unmasked, b"p1");
    }

    /// What the peer sent on `stream`, read with `read_stamped`.
    async fn read_stamped_once(stream: &TcpStream) -> (Vec<u8>, Option<u64>) {
        let mut buf = [0u8; 16];
        let (n, stamp) = read_stamped(stream, &mut buf).await.expect("recvmsg");
        (buf[..n].to_vec(), stamp)
    }

    #[tokio::test]
    async fn reads_carry_the_kernel_receive_time_on_generator_sockets_only() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stamped = tcp_connect(Ipv4Addr::LOCALHOST, addr)
            .await
            .expect("connect");
        let (mut a, _) = listener.accept().await.expect("accept");
        let plain = TcpStream::connect(addr).await.expect("connect");
        let (mut b, _) = listener.accept().await.expect("accept");
        // Linux turns receive timestamps on for the whole system lazily, from a work item, when
        // the first socket asks: data arriving before that carries none. Wait until it does.
        let mut warm = false;
        for _ in 0..200 {
            a.write_all(b"w").await.expect("write");
            if read_stamped_once(&stamped).await.1.is_some() {
                warm = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(warm, "no receive timestamp within 2 s of SO_TIMESTAMPNS");

        let before = crate::publish::now_ns();
        a.write_all(b"abc").await.expect("write");
        b.write_all(b"def").await.expect("write");
        // Read late: the stamp is when the bytes arrived, not when they were read.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (data, stamp) = read_stamped_once(&stamped).await;
        let read_at = crate::publish::now_ns();
        assert_eq!(data, b"abc");
        let stamp = stamp.expect("SO_TIMESTAMPNS was set by tcp_connect");
        assert!(stamp >= before, "{stamp} < {before}");
        assert!(
            read_at - stamp >= 40_000_000,
            "stamped at the read, not the arrival"
        );
        let (data, stamp) = read_stamped_once(&plain).await;
        assert_eq!(data, b"def");
        assert_eq!(stamp, None);

        // A read that fills the buffer leaves the socket ready: the rest is read next, without
        // new data arriving to wake it.
        a.write_all(&[7u8; 20]).await.expect("write");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (first, _) = read_stamped_once(&stamped).await;
        assert_eq!(first, [7u8; 16]);
        let rest = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_stamped_once(&stamped),
        )
        .await
        .expect("the rest is read without another wake-up");
        assert_eq!(rest.0, [7u8; 4]);
    }

    #[test]
    fn masked_frames_and_jwt_shape() {
        let mut f = Vec::new();
        encode_frame(&mut f, 0x1, b"abcd");
        assert_eq!(&f[..2], &[0x81, 0x84]);
        let unmasked: Vec<u8> = f[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ f[2 + i % 4])
            .collect();
        assert_eq!(unmasked, b"abcd");
        let token = jwt("secret", "u1");
        assert_eq!(token.split('.').count(), 3);
        assert!(token.starts_with("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."));
    }
}
