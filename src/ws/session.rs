//! One client connection after the upgrade: the read loop and client message dispatch.
//!
//! The session owns the read half (fastwebsockets over [`FrameGuard`]); the write half belongs
//! to the connection's writer task ([`writer::run`]), which the session feeds through the
//! connection's [`Outbound`] queue like every other producer. The session reassembles
//! fragmented messages, applies the per-message limits (size, UTF-8, rate), and turns each
//! client message into hub and broker calls. It never serializes a publication itself.

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use fastwebsockets::{OpCode, Role, WebSocketError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::guard::{FrameGuard, GuardError};
use super::writer::{self, Outbound};
use crate::auth::{self, Action, Credentials, TopicGrants};
use crate::broker::{Direct, Recipient, TopicMessage, UpstreamMessage};
use crate::hub::{ConnId, Connection, DeflateParams, SharedFrame};
use crate::limits::peer::PeerPermits;
use crate::limits::{Slot, TokenBucket};
use crate::node::NodeContext;
use crate::protocol::codes::{CloseCode, ErrorCode};
use crate::protocol::envelope::{now_millis, request_id_of, server_message, ErrorBody, Inbound};
use crate::protocol::{filter, topic};

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

/// A refusal to send back as an `error` message.
struct Refusal {
    code: ErrorCode,
    message: String,
    details: Option<Value>,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            details: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }
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

struct Session {
    kind: SessionKind,
    ctx: Arc<NodeContext>,
    conn: Arc<Connection>,
    subscriptions: HashSet<Arc<str>>,
    bucket: TokenBucket,
    /// Topics the client's token grants (replaced by a `refresh`).
    grants: TopicGrants,
    /// When the token runs out unless a `refresh` replaces it; `None` with auth off.
    expires_at: Option<SystemTime>,
}

/// Runs a connection to its end.
pub async fn run(ctx: Arc<NodeContext>, start: SessionStart) {
    let settings = &ctx.settings.ws;
    let echo = start.kind == SessionKind::Echo;
    // Dropped last, when everything below is done: the address and user get their place back.
    let _peer_permits = start.peer_permits;
    let (read_half, write_half) = start.stream.into_split();
    let outbound = Outbound::new(settings.send_queue_bytes);
    let mut writer = tokio::spawn(writer::run(
        Arc::clone(&outbound),
        write_half,
        settings.write_timeout,
        (!echo).then_some(settings.heartbeat_interval),
    ));

    if let Err(refused) = &start.admission {
        let reason = match refused.close {
            CloseCode::Unauthorized => "unauthorized",
            CloseCode::UserConnectionLimit => "per_user",
            _ => "full",
        };
        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "reason" => reason).increment(1);
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
            let _ =
                outbound.push(ErrorBody::new(refused.error, refused.message.as_str()).to_frame());
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
            session.subscribe(start.initial_topics, None, None)
        };
        let _ = outbound.push(session.connection_message());
        if let Err(refusal) = initial {
            let _ = outbound.push(session.error_frame(refusal, None));
        }
    }

    let reader = FrameGuard::new(
        Cursor::new(start.read_ahead).chain(read_half),
        settings.max_message_size,
        start.deflate.is_some(),
    );
    metrics::counter!(crate::metrics::CONNECTIONS_OPENED).increment(1);
    tracing::debug!(
        conn = conn.id,
        client_id = %conn.client_id,
        user = conn.user_id.as_deref().unwrap_or("-"),
        "connection opened"
    );
    let exit = session.read_loop(reader, &mut writer).await;
    if let Exit::Close(code, ..) = &exit {
        metrics::counter!(crate::metrics::CONNECTIONS_CLOSED, "code" => code.as_u16().to_string())
            .increment(1);
    }
    tracing::debug!(conn = conn.id, how = exit.describe(), "connection closed");

    match exit {
        Exit::Close(code, reason, _) if echo => outbound.close_bare(code, &reason),
        Exit::Close(code, reason, error) => {
            if let Some(error) = error {
                let _ = outbound.push(ErrorBody::new(error, reason.as_str()).to_frame());
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
        let (mut ws, _unused_write_half) =
            fastwebsockets::after_handshake_split(reader, tokio::io::sink(), Role::Server);
        // Pings, pongs and closes are answered through our own writer, not fastwebsockets'.
        ws.set_auto_close(false);
        ws.set_auto_pong(false);
        // FrameGuard enforces the whole-message limit first; fastwebsockets' own check is per
        // frame and refuses a frame of exactly its limit, so give it one byte of room.
        ws.set_max_message_size(settings.max_message_size + 1);
        let mut no_obligations = |_frame| async { Ok::<(), std::io::Error>(()) };

        // A fragmented message so far: its opcode, its bytes, and (text) how many of them are
        // known to be complete UTF-8, so that an invalid sequence fails it at once (1007).
        let mut fragments: Option<(OpCode, Vec<u8>, usize)> = None;
        loop {
            // One timer per read covers both the idle timeout and the token's expiry.
            let idle_deadline = Instant::now() + idle_timeout;
            let token_deadline = self.token_deadline();
            let deadline = token_deadline.map_or(idle_deadline, |t| t.min(idle_deadline));
            let frame = tokio::select! {
                read = tokio::time::timeout_at(deadline, ws.read_frame(&mut no_obligations)) => match read {
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
                if opcode == OpCode::Text && std::str::from_utf8(&payload).is_err() {
                    return invalid_utf8();
                }
                self.echo(opcode, &payload);
                continue;
            }
            if opcode == OpCode::Binary {
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
        let _ = self.conn.outbound.push(bytes);
    }

    /// Handles one complete client text message.
    async fn handle_text(&mut self, text: &str) {
        metrics::counter!(crate::metrics::MESSAGES_RECEIVED).increment(1);
        if let Err(wait) = self.bucket.try_take(std::time::Instant::now()) {
            let retry_ms = wait.as_millis().max(1) as u64;
            let body = ErrorBody::new(
                ErrorCode::RateLimitExceeded,
                "too many messages; this one was dropped",
            )
            .retry_after_ms(retry_ms)
            .request_id(request_id_of(text));
            let _ = self.conn.outbound.push(body.to_frame());
            return;
        }
        let msg = match Inbound::parse(text) {
            Ok(msg) => msg,
            Err(e) => {
                let refusal = Refusal::new(ErrorCode::InvalidMessageFormat, e.to_string());
                self.refuse(refusal, request_id_of(text));
                return;
            }
        };
        let request_id = msg.request_id();
        let result = match msg.kind() {
            "ping" => Ok(Some(self.reply(
                "pong",
                request_id,
                json!({"serverTime": now_millis()}),
            ))),
            "heartbeat" => {
                let client_time = msg
                    .payload()
                    .and_then(|d| serde_json::from_str::<Value>(d.get()).ok())
                    .and_then(|d| d.get("timestamp").cloned())
                    .unwrap_or(Value::Null);
                Ok(Some(self.reply(
                    "heartbeat",
                    request_id,
                    json!({"serverTime": now_millis(), "timestamp": client_time}),
                )))
            }
            "pong" => Ok(None),
            "refresh" => self.handle_refresh(&msg).map(Some),
            "subscribe" => self.handle_subscribe(&msg).map(Some),
            "unsubscribe" => self.handle_unsubscribe(&msg).map(Some),
            "publish" => self.handle_publish(&msg).await.map(Some),
            _ if msg.to.is_some() => self.handle_direct(&msg).await,
            _ => self.handle_upstream(&msg, text).await,
        };
        match result {
            Ok(Some(frame)) => {
                let _ = self.conn.outbound.push(frame);
            }
            Ok(None) => {}
            Err(refusal) => self.refuse(refusal, request_id),
        }
    }

    fn handle_subscribe(&mut self, msg: &Inbound<'_>) -> Result<Bytes, Refusal> {
        let req = SubscriptionRequest::from_message(msg)?;
        let recovery = req.since.is_some();
        let topics = self.subscribe(req.topics, req.filters.as_ref(), req.interval)?;
        let mut data = json!({"action": "subscribe", "topics": topics});
        if recovery {
            // History arrives with the history issue; until then say plainly that nothing was
            // recovered rather than pretend the gap is empty.
            data["recovered"] = Value::Bool(false);
        }
        Ok(self.reply("ack", msg.request_id(), data))
    }

    /// `refresh` with `data.token`: a new token for the same user replaces the connection's
    /// grants and expiry. A bad token leaves the connection as it was (it still ends at the old
    /// expiry); a token for another user is refused.
    fn handle_refresh(&mut self, msg: &Inbound<'_>) -> Result<Bytes, Refusal> {
        if !self.ctx.auth.enabled() {
            return Err(Refusal::new(
                ErrorCode::InvalidOperation,
                "authentication is off here; there is no token to refresh",
            ));
        }
        let req: RefreshRequest = parse_data(msg.payload())?;
        let token = req.token.ok_or_else(|| {
            Refusal::new(
                ErrorCode::InvalidMessageFormat,
                "refresh needs `data.token`",
            )
        })?;
        let fresh = self
            .ctx
            .auth
            .verify(&token)
            .map_err(|e| Refusal::new(ErrorCode::Unauthorized, e.to_string()))?;
        if fresh.user_id.as_deref() != self.conn.user_id.as_deref() {
            return Err(Refusal::new(
                ErrorCode::PermissionDenied,
                "a refreshed token must be for the same user (sub) as the connection",
            ));
        }
        self.grants = fresh.grants;
        self.expires_at = fresh.expires_at;
        let expires_ms = fresh
            .expires_at
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64);
        Ok(self.reply(
            "ack",
            msg.request_id(),
            json!({"action": "refresh", "expiresAt": expires_ms}),
        ))
    }

    /// When the read loop must end the connection for an expired token.
    fn token_deadline(&self) -> Option<Instant> {
        let left = self
            .expires_at?
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Some(Instant::now() + left)
    }

    /// Whether this connection may do `action` on `topic` under its namespace's rule.
    fn permitted(&self, action: Action, topic: &str) -> Result<(), Refusal> {
        let ns = self.ctx.settings.namespace_of(topic);
        let rule = match action {
            Action::Subscribe => ns.subscribe,
            Action::Publish => ns.publish,
        };
        auth::grants::check(
            rule,
            action,
            topic,
            self.conn.user_id.as_deref(),
            &self.grants,
        )
        .map_err(|denied| Refusal::new(ErrorCode::PermissionDenied, denied.to_string()))
    }

    /// Tells the broker about presence where the topic's namespace keeps it.
    fn presence_changed(&self, topic: &Arc<str>, present: bool) {
        if self.ctx.settings.namespace_of(topic).presence {
            self.ctx.broker.presence_changed(topic, &self.conn, present);
        }
    }

    fn handle_unsubscribe(&mut self, msg: &Inbound<'_>) -> Result<Bytes, Refusal> {
        let req = SubscriptionRequest::from_message(msg)?;
        for name in &req.topics {
            if let Some(topic) = self.subscriptions.take(name.as_str()) {
                if self.ctx.hub.unsubscribe(&topic, self.conn.id) {
                    self.ctx.broker.topic_interest(&topic, false);
                }
                self.presence_changed(&topic, false);
            }
        }
        Ok(self.reply(
            "ack",
            msg.request_id(),
            json!({"action": "unsubscribe", "topics": req.topics}),
        ))
    }

    /// Subscribes to all of `topics` or none: every name and the total count are checked first.
    fn subscribe(
        &mut self,
        topics: Vec<String>,
        filters: Option<&Value>,
        interval_ms: Option<u64>,
    ) -> Result<Vec<String>, Refusal> {
        let ws = &self.ctx.settings.ws;
        let bad: Vec<String> = topics
            .iter()
            .filter_map(|t| topic::validate(t, ws.max_topic_length).err())
            .map(|e| e.to_string())
            .collect();
        if !bad.is_empty() {
            return Err(Refusal::new(ErrorCode::InvalidTopic, bad.join("; "))
                .with_details(json!({"topics": topics})));
        }
        let denied: Vec<(String, String)> = topics
            .iter()
            .filter_map(|t| {
                self.permitted(Action::Subscribe, t)
                    .err()
                    .map(|r| (t.clone(), r.message))
            })
            .collect();
        if !denied.is_empty() {
            let message = denied
                .iter()
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let names: Vec<&str> = denied.iter().map(|(t, _)| t.as_str()).collect();
            return Err(Refusal::new(ErrorCode::PermissionDenied, message)
                .with_details(json!({"topics": names})));
        }
        let new = topics
            .iter()
            .filter(|t| !self.subscriptions.contains(t.as_str()))
            .collect::<HashSet<_>>()
            .len();
        if self.subscriptions.len() + new > ws.max_subscriptions {
            return Err(Refusal::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "this connection holds {} subscriptions; {} more would pass the limit of {}",
                    self.subscriptions.len(),
                    new,
                    ws.max_subscriptions
                ),
            ));
        }
        let options = filter::options_per_topic(filters, &topics, interval_ms)
            .map_err(|e| Refusal::new(ErrorCode::InvalidSubscription, e.to_string()))?;
        for name in &topics {
            let topic: Arc<str> = self
                .subscriptions
                .get(name.as_str())
                .cloned()
                .unwrap_or_else(|| Arc::from(name.as_str()));
            let opts = options.get(name).cloned().unwrap_or_default();
            if self.ctx.hub.subscribe(&topic, &self.conn, &opts) {
                self.ctx.broker.topic_interest(&topic, true);
            }
            if self.subscriptions.insert(Arc::clone(&topic)) {
                self.presence_changed(&topic, true);
            }
        }
        Ok(topics)
    }

    async fn handle_publish(&mut self, msg: &Inbound<'_>) -> Result<Bytes, Refusal> {
        // Two shapes: `data: {topic, type, data}`, or a top-level `topic` with `data` as the
        // payload itself (then the publication's type is "message").
        let req: PublishRequest = match msg.topic.as_deref() {
            Some(topic) => PublishRequest {
                topic: Some(topic.to_string()),
                kind: None,
                data: msg.payload().map(RawValue::to_owned),
            },
            None => parse_data(msg.payload())?,
        };
        let topic = req.topic.ok_or_else(|| {
            Refusal::new(ErrorCode::InvalidMessageFormat, "publish needs a `topic`")
        })?;
        topic::validate(&topic, self.ctx.settings.ws.max_topic_length)
            .map_err(|e| Refusal::new(ErrorCode::InvalidTopic, e.to_string()))?;
        self.permitted(Action::Publish, &topic)?;
        let data = req.data.unwrap_or_else(null_raw);
        let receipt = self
            .ctx
            .broker
            .publish(TopicMessage {
                topic: topic.clone(),
                kind: req.kind.unwrap_or_else(|| "message".to_string()),
                data,
            })
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(self.reply(
            "ack",
            msg.request_id(),
            json!({"action": "publish", "topic": topic, "seq": receipt.seq, "epoch": receipt.epoch}),
        ))
    }

    async fn handle_direct(&mut self, msg: &Inbound<'_>) -> Result<Option<Bytes>, Refusal> {
        let to = msg.to.as_deref().unwrap_or_default();
        let recipient = if to.is_empty() {
            if !self.ctx.settings.ws.allow_client_broadcast {
                return Err(Refusal::new(
                    ErrorCode::PermissionDenied,
                    "an empty `to` broadcasts to everyone, which clients may not do here",
                ));
            }
            Recipient::Everyone
        } else {
            Recipient::User(to.to_string())
        };
        let from = self
            .conn
            .user_id
            .as_deref()
            .unwrap_or(&self.conn.client_id)
            .to_string();
        let as_content = msg.data.is_none() && msg.content.is_some();
        self.ctx
            .broker
            .send(Direct {
                recipient,
                kind: msg.kind().to_string(),
                from: Some(from),
                data: msg
                    .payload()
                    .map(RawValue::to_owned)
                    .unwrap_or_else(null_raw),
                as_content,
            })
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(msg
            .request_id()
            .map(|id| self.reply("ack", Some(id), json!({"action": "send", "to": to}))))
    }

    async fn handle_upstream(
        &mut self,
        msg: &Inbound<'_>,
        raw: &str,
    ) -> Result<Option<Bytes>, Refusal> {
        self.ctx
            .broker
            .forward_upstream(UpstreamMessage {
                node_id: self.ctx.settings.node_id.clone(),
                conn_id: self.conn.id,
                client_id: self.conn.client_id.to_string(),
                user_id: self.conn.user_id.as_deref().map(str::to_string),
                kind: msg.kind().to_string(),
                raw: raw.to_string(),
            })
            .await
            .map_err(|e| Refusal::new(ErrorCode::InvalidOperation, e.to_string()))?;
        Ok(msg
            .request_id()
            .map(|id| self.reply("ack", Some(id), json!({"action": "forwarded"}))))
    }

    fn connection_message(&self) -> Bytes {
        let mut topics: Vec<&str> = self.subscriptions.iter().map(|t| &**t).collect();
        topics.sort_unstable();
        server_message(
            "connection",
            ConnectionData {
                status: "connected",
                connection_id: self.conn.id,
                client_id: &self.conn.client_id,
                user_id: self.conn.user_id.as_deref(),
                node: &self.ctx.settings.node_id,
                server_time: now_millis(),
                heartbeat_interval: self.ctx.settings.ws.heartbeat_interval.as_millis() as u64,
                subscriptions: topics,
            },
        )
    }

    /// A reply frame whose `data` carries `requestId` when the request had an id.
    fn reply(&self, kind: &str, request_id: Option<&RawValue>, mut data: Value) -> Bytes {
        if let (Some(id), Value::Object(map)) = (request_id, &mut data) {
            let id = serde_json::from_str(id.get()).unwrap_or(Value::Null);
            map.insert("requestId".into(), id);
        }
        server_message(kind, data)
    }

    fn error_frame(&self, refusal: Refusal, request_id: Option<&RawValue>) -> Bytes {
        let mut body = ErrorBody::new(refusal.code, refusal.message).request_id(request_id);
        if let Some(details) = refusal.details {
            body = body.details(details);
        }
        body.to_frame()
    }

    fn refuse(&self, refusal: Refusal, request_id: Option<&RawValue>) {
        let _ = self
            .conn
            .outbound
            .push(self.error_frame(refusal, request_id));
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

#[derive(Serialize)]
struct ConnectionData<'a> {
    status: &'a str,
    #[serde(rename = "connectionId")]
    connection_id: ConnId,
    #[serde(rename = "clientId")]
    client_id: &'a str,
    #[serde(rename = "userId")]
    user_id: Option<&'a str>,
    node: &'a str,
    #[serde(rename = "serverTime")]
    server_time: u64,
    #[serde(rename = "heartbeatInterval")]
    heartbeat_interval: u64,
    subscriptions: Vec<&'a str>,
}

/// The `data` of subscribe and unsubscribe: `topics`, `events` or one `topic`.
#[derive(Debug, Default, Deserialize)]
struct SubscriptionData {
    #[serde(default)]
    topics: Option<Vec<String>>,
    #[serde(default)]
    events: Option<Vec<String>>,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    filters: Option<Value>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    since: Option<Value>,
}

struct SubscriptionRequest {
    topics: Vec<String>,
    filters: Option<Value>,
    interval: Option<u64>,
    since: Option<Value>,
}

impl SubscriptionRequest {
    fn from_message(msg: &Inbound<'_>) -> Result<Self, Refusal> {
        let data: SubscriptionData = parse_data(msg.data)?;
        let mut topics: Vec<String> = Vec::new();
        let listed = data.topics.into_iter().flatten();
        let events = data.events.into_iter().flatten();
        let single = data
            .topic
            .into_iter()
            .chain(msg.topic.as_deref().map(str::to_string));
        for t in listed.chain(events).chain(single) {
            if !topics.contains(&t) {
                topics.push(t);
            }
        }
        if topics.is_empty() {
            return Err(Refusal::new(
                ErrorCode::InvalidSubscription,
                "no topics given: send data.topics, data.events or data.topic",
            ));
        }
        Ok(SubscriptionRequest {
            topics,
            filters: data.filters,
            interval: data.interval,
            since: data.since,
        })
    }
}

/// The `data` of `refresh`.
#[derive(Debug, Default, Deserialize)]
struct RefreshRequest {
    #[serde(default)]
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PublishRequest {
    #[serde(default)]
    topic: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// Parses a message's `data` into `T`; absent `data` gives `T::default()`.
fn parse_data<T: for<'de> Deserialize<'de> + Default>(
    data: Option<&RawValue>,
) -> Result<T, Refusal> {
    match data {
        None => Ok(T::default()),
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| {
            Refusal::new(
                ErrorCode::InvalidMessageFormat,
                format!("invalid `data`: {e}"),
            )
        }),
    }
}

fn null_raw() -> Box<RawValue> {
    RawValue::NULL.to_owned()
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
