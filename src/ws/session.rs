//! One client connection after the upgrade: admission outcome, registration, the read loop,
//! the token's lifetime, and leaving.
//!
//! The session owns the read half ([`FrameReader`] over [`FrameGuard`]); the write half belongs
//! to the connection's [`Outbound`] queue (written by the node's flusher and the connection's
//! writer task, [`writer::run`]), which the session feeds like every other producer. The session reassembles
//! fragmented messages, applies the per-message limits (size, UTF-8, idle time, token expiry),
//! and hands each complete text message to `dispatch`. It never serializes a publication
//! itself.

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use fastwebsockets::{OpCode, WebSocketError};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::dispatch::Refusal;
use super::guard::{FrameGuard, GuardError};
use super::reader::FrameReader;
use super::writer::{self, Outbound};
use crate::auth::{Credentials, TopicGrants};
use crate::hub::{Connection, DeflateParams, SharedFrame};
use crate::limits::peer::PeerPermits;
use crate::limits::{Slot, TokenBucket};
use crate::metrics::{CountingReader, Received, Sent, TRAFFIC};
use crate::node::NodeContext;
use crate::protocol::codes::{CloseCode, ErrorCode};
use crate::protocol::envelope::ErrorBody;

/// Who is on the other end, as established by the upgrade.
#[derive(Debug, Clone)]
pub struct Identity {
    pub client_id: String,
    /// User id, topic grants and token expiry (all empty with auth off and no `user_id`).
    pub credentials: Credentials,
}

/// What a session does with the client's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    /// The gateway's JSON protocol: subscriptions, publications, direct messages.
    Protocol,
    /// Conformance testing (`websocket.echo_path`): every complete text or binary message goes
    /// back as it came, through the same read path (guard, size limit, UTF-8, close handshake,
    /// ping -> pong) and the same frame code (compressed when deflate was negotiated). No JSON
    /// is ever sent, no rate limit applies, and the connection is not registered with the hub;
    /// the writer sends no heartbeat pings (a test client counts every frame it gets).
    Echo,
}

/// What the upgrade hands over to a session.
pub struct SessionStart {
    pub kind: SessionKind,
    pub stream: TcpStream,
    /// Bytes hyper read past the HTTP request (the client's first frames, if any).
    pub read_ahead: Bytes,
    pub identity: Identity,
    /// Topics from the `subscriptions` query parameter.
    pub initial_topics: Vec<String>,
    /// permessage-deflate, when the upgrade negotiated it.
    pub deflate: Option<DeflateParams>,
    /// The node's admission: a held slot, or why the connection is refused. A refused connection
    /// still completes the upgrade so that browsers, which cannot read an HTTP error body, get
    /// the reason as an `error` message and a close code.
    pub admission: Result<Slot, Refused>,
    /// The connection's places in its client address's and its user's counts; held until the
    /// session ends.
    pub peer_permits: PeerPermits,
}

/// Why a connection is turned away right after the upgrade.
#[derive(Debug, Clone)]
pub struct Refused {
    pub error: ErrorCode,
    pub close: CloseCode,
    pub message: String,
}

/// How a read loop iteration ended the connection.
enum Exit {
    /// Close with this code after an optional `error` message.
    Close(CloseCode, String, Option<ErrorCode>),
    /// The client sent a valid close frame; echo its code (`None`: it carried none).
    ClientClosed(Option<u16>),
    /// The peer vanished or the writer ended (slow consumer, server close): nothing to send.
    Gone,
}

impl Exit {
    /// How the connection ended, for the log.
    fn describe(&self) -> String {
        match self {
            Exit::Close(code, reason, _) => format!("server closed {}: {reason}", code.as_u16()),
            Exit::ClientClosed(code) => format!("client closed {code:?}"),
            Exit::Gone => "connection lost or writer ended".into(),
        }
    }
}

/// One connection's state, shared by the read loop here and the message handlers in
/// `dispatch`.
pub(super) struct Session {
    pub(super) kind: SessionKind,
    pub(super) ctx: Arc<NodeContext>,
    pub(super) conn: Arc<Connection>,
    pub(super) subscriptions: HashSet<Arc<str>>,
    pub(super) bucket: TokenBucket,
    /// Topics the client's token grants (replaced by a `refresh`).
    pub(super) grants: TopicGrants,
    /// When the token runs out unless a `refresh` replaces it; `None` with auth off.
    pub(super) expires_at: Option<SystemTime>,
}

/// Runs a connection to its end.
pub async fn run(ctx: Arc<NodeContext>, start: SessionStart) {
    let settings = &ctx.settings.ws;
    let echo = start.kind == SessionKind::Echo;
    // Dropped last, when everything below is done: the address and user get their place back.
    let _peer_permits = start.peer_permits;
    let (read_half, write_half) = start.stream.into_split();
    let outbound =
        Outbound::for_socket(settings.send_queue_bytes, write_half, ctx.flushers.assign());
    let mut writer = tokio::spawn(writer::run(
        Arc::clone(&outbound),
        settings.write_timeout,
        (!echo).then_some(settings.heartbeat_interval),
    ));

    if let Err(refused) = &start.admission {
        let reason = match refused.close {
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::UserConnectionLimit => "per_user",
            _ => "full",
        };
        crate::metrics::connection_refused(reason);
        // The message says what was wrong with a token, never the token itself.
        tracing::debug!(
            client_id = %start.identity.client_id,
            close = refused.close.as_u16(),
            reason = %refused.message,
            "connection refused"
        );
    }
    let _slot = match start.admission {
        Ok(slot) => slot,
        Err(refused) if echo => {
            outbound.close_bare(refused.close, &refused.message);
            let _ = tokio::time::timeout(settings.write_timeout, &mut writer).await;
            return;
        }
        Err(refused) => {
            let _ = outbound.send(
                Sent::Error,
                ErrorBody::new(refused.error, refused.message.as_str()).to_frame(),
            );
            outbound.close(refused.close, &refused.message);
            let _ = tokio::time::timeout(settings.write_timeout, &mut writer).await;
            return;
        }
    };

    let conn = Arc::new(Connection {
        id: ctx.hub.next_conn_id(),
        client_id: Arc::from(start.identity.client_id.as_str()),
        user_id: start.identity.credentials.user_id.as_deref().map(Arc::from),
        outbound: Arc::clone(&outbound),
        connected_at: SystemTime::now(),
        deflate: start.deflate,
    });
    let mut session = Session {
        kind: start.kind,
        bucket: TokenBucket::new(settings.rate_per_second, settings.rate_burst),
        ctx: Arc::clone(&ctx),
        conn: Arc::clone(&conn),
        subscriptions: HashSet::new(),
        grants: start.identity.credentials.grants,
        expires_at: start.identity.credentials.expires_at,
    };
    if !echo {
        if ctx.hub.register(Arc::clone(&conn)) {
            if let Some(user) = &conn.user_id {
                ctx.broker.user_interest(user, true);
            }
        }
        let initial = if start.initial_topics.is_empty() {
            Ok(Vec::new())
        } else {
            session.subscribe(start.initial_topics, None, None, &[])
        };
        session
            .until_received(initial.as_deref().unwrap_or_default(), true)
            .await;
        let _ = outbound.push(session.connection_message());
        if let Err(refusal) = initial {
            let _ = outbound.push(session.error_frame(refusal, None));
        }
    }

    let reader = FrameGuard::new(
        CountingReader::new(Cursor::new(start.read_ahead).chain(read_half)),
        settings.max_message_size,
        start.deflate.is_some(),
    );
    TRAFFIC.connections_opened.add(1);
    tracing::debug!(
        conn = conn.id,
        client_id = %conn.client_id,
        user = conn.user_id.as_deref().unwrap_or("-"),
        "connection opened"
    );
    let exit = session.read_loop(reader, &mut writer).await;
    // A close the server had already asked for (a limit, an operator, a drain) is the one that
    // counts, even when the client's answering close frame or the writer's end came first.
    let (reason, code) = match (outbound.close_code(), &exit) {
        (Some(code), _) => ("server", code),
        (None, Exit::Close(code, ..)) => ("server", code.as_u16()),
        (None, Exit::ClientClosed(code)) => ("client", code.unwrap_or(1005)),
        (None, Exit::Gone) => ("lost", 1006),
    };
    crate::metrics::connection_closed(reason, code);
    tracing::debug!(conn = conn.id, how = exit.describe(), "connection closed");

    match exit {
        Exit::Close(code, reason, _) if echo => outbound.close_bare(code, &reason),
        Exit::Close(code, reason, error) => {
            if let Some(error) = error {
                let _ = outbound.send(
                    Sent::Error,
                    ErrorBody::new(error, reason.as_str()).to_frame(),
                );
            }
            outbound.close(code, &reason);
        }
        Exit::ClientClosed(code) => outbound.close_echo(code),
        Exit::Gone => outbound.abort(),
    }
    if !echo {
        session.leave();
    }
    // The read loop may already have polled the writer to completion (`Exit::Gone`); polling a
    // finished JoinHandle again panics, so only wait for a writer that is still running.
    if !writer.is_finished()
        && tokio::time::timeout(settings.write_timeout, &mut writer)
            .await
            .is_err()
    {
        writer.abort();
    }
}

impl Session {
    /// Reads frames until the connection ends; returns how it should be closed.
    async fn read_loop<R>(
        &mut self,
        reader: FrameGuard<R>,
        writer: &mut tokio::task::JoinHandle<Result<(), writer::WriterError>>,
    ) -> Exit
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let settings = &self.ctx.settings.ws;
        let idle_timeout = settings.idle_timeout;
        // Pings, pongs and closes are answered through our own writer. FrameGuard enforces the
        // whole-message limit first; the reader's own bound is per frame.
        let mut ws = FrameReader::new(reader, settings.max_message_size);

        // A fragmented message so far: its opcode, its bytes, and (text) how many of them are
        // known to be complete UTF-8, so that an invalid sequence fails it at once (1007).
        let mut fragments: Option<(OpCode, Vec<u8>, usize)> = None;
        loop {
            // One timer per read covers both the idle timeout and the token's expiry.
            let idle_deadline = Instant::now() + idle_timeout;
            let token_deadline = self.token_deadline();
            let deadline = token_deadline.map_or(idle_deadline, |t| t.min(idle_deadline));
            let frame = tokio::select! {
                read = tokio::time::timeout_at(deadline, ws.read_frame()) => match read {
                    Ok(Ok(frame)) => frame,
                    Ok(Err(e)) => return exit_for(e),
                    Err(_) if token_deadline.is_some_and(|t| t <= Instant::now()) => {
                        return Exit::Close(
                            CloseCode::TokenExpired,
                            "token expired; reconnect with a fresh token, or send `refresh` before it expires".into(),
                            None,
                        )
                    }
                    Err(_) => return Exit::Close(
                        CloseCode::IdleTimeout,
                        format!("nothing received for {idle_timeout:?}"),
                        None,
                    ),
                },
                _ = &mut *writer => return Exit::Gone,
            };
            let (opcode, payload) = match frame.opcode {
                OpCode::Close => return client_close(&frame.payload),
                OpCode::Ping => {
                    let pong = super::frame::frame(super::frame::OpCode::Pong, &frame.payload);
                    let _ = self.conn.outbound.push(pong);
                    continue;
                }
                OpCode::Pong => continue,
                OpCode::Text | OpCode::Binary if frame.fin => {
                    if fragments.is_some() {
                        return protocol_error("a new message started before the last one ended");
                    }
                    (frame.opcode, frame.payload.to_vec())
                }
                OpCode::Text | OpCode::Binary => {
                    if fragments.is_some() {
                        return protocol_error("a new message started before the last one ended");
                    }
                    let (opcode, buf) = (frame.opcode, frame.payload.to_vec());
                    let mut checked = 0;
                    if opcode == OpCode::Text && !utf8_so_far(&buf, &mut checked) {
                        return invalid_utf8();
                    }
                    fragments = Some((opcode, buf, checked));
                    continue;
                }
                OpCode::Continuation => {
                    let Some((opcode, buf, checked)) = fragments.as_mut() else {
                        return protocol_error("continuation frame without a message to continue");
                    };
                    buf.extend_from_slice(&frame.payload);
                    if *opcode == OpCode::Text && !utf8_so_far(buf, checked) {
                        return invalid_utf8();
                    }
                    if !frame.fin {
                        continue;
                    }
                    match fragments.take() {
                        Some((opcode, buf, _)) => (opcode, buf),
                        None => continue,
                    }
                }
            };
            if self.kind == SessionKind::Echo {
                TRAFFIC.received(Received::Echo, payload.len());
                if opcode == OpCode::Text && std::str::from_utf8(&payload).is_err() {
                    return invalid_utf8();
                }
                self.echo(opcode, &payload);
                continue;
            }
            if opcode == OpCode::Binary {
                TRAFFIC.received(Received::Binary, payload.len());
                self.refuse(
                    Refusal::new(
                        ErrorCode::InvalidMessageFormat,
                        "binary messages are not supported; send JSON text",
                    ),
                    None,
                );
                continue;
            }
            let Ok(text) = std::str::from_utf8(&payload) else {
                return invalid_utf8();
            };
            self.handle_text(text).await;
        }
    }

    /// Sends one complete message back as it came (echo sessions), through the frame code
    /// every other outbound message uses. With deflate negotiated, every payload at or above the
    /// threshold goes back compressed, even one deflate cannot shrink (publications go plain
    /// then): a conformance client then sees the compressed path for everything it sends above
    /// the threshold, and some (kosoku, which runs the Autobahn cases) only handle echoes on a
    /// compressed connection right when they come back compressed.
    fn echo(&self, opcode: OpCode, payload: &[u8]) {
        let opcode = match opcode {
            OpCode::Binary => super::frame::OpCode::Binary,
            _ => super::frame::OpCode::Text,
        };
        let frame = SharedFrame::new(super::frame::frame(opcode, payload));
        let bytes = match self.conn.deflate {
            Some(params) if payload.len() >= params.threshold => frame.deflated(params),
            _ => frame.plain().clone(),
        };
        if self.conn.outbound.push(bytes).is_ok() {
            TRAFFIC.sent(Sent::Echo, 1, payload.len() as u64);
        }
    }

    /// Removes the connection from the hub and tells the broker what interest went with it.
    fn leave(&mut self) {
        let topics: Vec<Arc<str>> = self.subscriptions.drain().collect();
        let (user_gone, emptied) = self.ctx.hub.unregister(&self.conn, &topics);
        for topic in &topics {
            self.presence_changed(topic, false);
        }
        for topic in emptied {
            self.ctx.broker.topic_interest(&topic, false);
        }
        if let (true, Some(user)) = (user_gone, &self.conn.user_id) {
            self.ctx.broker.user_interest(user, false);
        }
    }
}

fn protocol_error(reason: &str) -> Exit {
    Exit::Close(CloseCode::ProtocolError, reason.to_string(), None)
}

/// Whether the bytes of a text message received so far can still be valid UTF-8: checks them
/// past `checked` (already known to be good) and moves `checked` to the end of the last complete
/// character. A character cut at the end may be completed by the next fragment.
fn utf8_so_far(buf: &[u8], checked: &mut usize) -> bool {
    match std::str::from_utf8(buf.get(*checked..).unwrap_or_default()) {
        Ok(_) => {
            *checked = buf.len();
            true
        }
        Err(e) if e.error_len().is_none() => {
            *checked += e.valid_up_to();
            true
        }
        Err(_) => false,
    }
}

fn invalid_utf8() -> Exit {
    Exit::Close(
        CloseCode::InvalidPayload,
        "text message is not valid UTF-8".into(),
        None,
    )
}

/// How a client's close frame ends the connection (RFC 6455 5.5.1, 7.4): echoed when it is
/// valid; a one-byte payload or a code no endpoint may send is a protocol error (1002), and a
/// reason that is not UTF-8 is invalid payload (1007).
fn client_close(payload: &[u8]) -> Exit {
    match payload {
        [] => Exit::ClientClosed(None),
        [_] => protocol_error("close frame with a one-byte payload"),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::peer_may_send(code) {
                return protocol_error(&format!("close code {code} may not be sent"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Exit::Close(
                    CloseCode::InvalidPayload,
                    "close reason is not valid UTF-8".into(),
                    None,
                );
            }
            Exit::ClientClosed(Some(code))
        }
    }
}

/// Maps a read failure to how the connection ends.
fn exit_for(e: WebSocketError) -> Exit {
    match e {
        WebSocketError::IoError(io) => match GuardError::from_io(&io) {
            Some(GuardError::MessageTooBig { max, .. }) => Exit::Close(
                CloseCode::MessageTooBig,
                format!("message over the {max}-byte limit"),
                Some(ErrorCode::MessageTooLarge),
            ),
            Some(GuardError::BadCompressedData) => Exit::Close(
                CloseCode::InvalidPayload,
                GuardError::BadCompressedData.to_string(),
                None,
            ),
            Some(refused) => protocol_error(&refused.to_string()),
            None => Exit::Gone,
        },
        WebSocketError::UnexpectedEOF | WebSocketError::ConnectionClosed => Exit::Gone,
        WebSocketError::InvalidUTF8 => invalid_utf8(),
        WebSocketError::FrameTooLarge => Exit::Close(
            CloseCode::MessageTooBig,
            "frame over the message size limit".into(),
            Some(ErrorCode::MessageTooLarge),
        ),
        other => protocol_error(&other.to_string()),
    }
}
