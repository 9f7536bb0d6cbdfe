//! What a session does with each client message of the JSON protocol: `ping`, `heartbeat`,
//! `ack` (of a `requireAck` publication), `refresh`, `subscribe` / `unsubscribe` (with the namespace permission checks), `publish`,
//! direct messages (`to`) and everything else (forwarded to backends). Each handler turns one
//! message into hub and broker calls and a reply frame, or a [`Refusal`] that becomes an `error`.
//!
//! The frame-level read loop that calls these lives in `session`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::recovery;
use super::session::Session;
use crate::auth::{self, Action};
use crate::broker::{Direct, Recipient, TopicMessage, UpstreamMessage};
use crate::history::StreamPosition;
use crate::hub::ConnId;
use crate::metrics::{Received, Sent, TRAFFIC};
use crate::protocol::codes::ErrorCode;
use crate::protocol::envelope::{now_millis, request_id_of, server_message, ErrorBody, Inbound};
use crate::protocol::{filter, topic};

/// A refusal to send back as an `error` message.
pub(super) struct Refusal {
    code: ErrorCode,
    message: String,
    details: Option<Value>,
}

impl Refusal {
    pub(super) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
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

impl Session {
    /// Handles one complete client text message.
    pub(super) async fn handle_text(&mut self, text: &str) {
        if let Err(wait) = self.bucket.try_take(std::time::Instant::now()) {
            TRAFFIC.received(Received::RateLimited, text.len());
            let retry_ms = wait.as_millis().max(1) as u64;
            let body = ErrorBody::new(
                ErrorCode::RateLimitExceeded,
                "too many messages; this one was dropped",
            )
            .retry_after_ms(retry_ms)
            .request_id(request_id_of(text));
            let _ = self.conn.outbound.send(Sent::Error, body.to_frame());
            return;
        }
        let msg = match Inbound::parse(text) {
            Ok(msg) => msg,
            Err(e) => {
                TRAFFIC.received(Received::Invalid, text.len());
                let refusal = Refusal::new(ErrorCode::InvalidMessageFormat, e.to_string());
                self.refuse(refusal, request_id_of(text));
                return;
            }
        };
        TRAFFIC.received(received_kind(&msg), text.len());
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
            "ack" => self.handle_ack(&msg),
            "refresh" => self.handle_refresh(&msg).map(Some),
            "subscribe" => self.handle_subscribe(&msg).await,
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

    /// `subscribe`. With `since` (or `recover: true`) each topic is recovered: the live
    /// publications are held while the node makes sure it receives the topic and reads its
    /// history after the client's position; the ack (with `recovered` and each topic's current
    /// position) goes out, then the missed publications in order, then the held live ones that
    /// follow them, with no gap and no duplicate.
    async fn handle_subscribe(&mut self, msg: &Inbound<'_>) -> Result<Option<Bytes>, Refusal> {
        let req = SubscriptionRequest::from_message(msg)?;
        let recovery = recovery::positions(&req.topics, req.since.as_ref(), req.recover)?;
        let topics = self.subscribe(req.topics, req.filters.as_ref(), req.interval, &recovery)?;
        let data = json!({"action": "subscribe", "topics": topics});
        if recovery.is_empty() {
            self.until_received(&topics, false).await;
            return Ok(Some(self.reply("ack", msg.request_id(), data)));
        }
        self.recover_topics(msg.request_id(), data, &recovery).await;
        Ok(None)
    }

    /// `ack` of `requireAck` publications: their ids in `data.id`, `data.messageId` or the list
    /// `data.ids` (any of them, together). Those ids stop being re-sent. No reply: an ack is an
    /// answer itself, and an id this connection does not owe (unknown, already acknowledged,
    /// given up) is ignored silently, since it may be a late duplicate. Only an ack that names
    /// no id at all, or not as strings, gets an `error`.
    fn handle_ack(&self, msg: &Inbound<'_>) -> Result<Option<Bytes>, Refusal> {
        let req: AckRequest = parse_data(msg.payload())?;
        let ids: Vec<&str> = req
            .id
            .iter()
            .chain(req.message_id.iter())
            .chain(req.ids.iter().flatten())
            .map(String::as_str)
            .collect();
        if ids.is_empty() {
            return Err(Refusal::new(
                ErrorCode::InvalidMessageFormat,
                "ack needs the message id in `data.id` (or `data.messageId`, or a list in `data.ids`)",
            ));
        }
        self.ctx.hub.acks().acknowledge(self.conn.id, &ids);
        Ok(None)
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
    pub(super) fn token_deadline(&self) -> Option<Instant> {
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
    pub(super) fn presence_changed(&self, topic: &Arc<str>, present: bool) {
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

    /// Waits until this node receives what is published on `topics` (and, with `user`, what is
    /// sent to the connection's user) through the broker, so that a message published after
    /// the client reads its `ack` (or `connection` message) reaches it: with Redis, the
    /// node's SUBSCRIBE for a topic new to the node must be confirmed first. Bounded by
    /// [`SUBSCRIBE_WAIT`](crate::broker::SUBSCRIBE_WAIT); with the broker unreachable it does
    /// not wait at all (the subscriptions are made when it is back, and topics with history
    /// are backfilled then).
    pub(super) async fn until_received(&self, topics: &[String], user: bool) {
        let broker = &self.ctx.broker;
        if !broker.is_ready() {
            return;
        }
        // One bound for the whole wait, however many topics.
        let deadline = Instant::now() + crate::broker::SUBSCRIBE_WAIT;
        let left = || deadline.saturating_duration_since(Instant::now());
        for topic in topics {
            if !broker.await_subscribed(topic, left()).await {
                tracing::debug!(topic, "subscribed before the broker confirmed the topic");
            }
        }
        if let (true, Some(user)) = (user, &self.conn.user_id) {
            if !broker.await_user_subscribed(user, left()).await {
                tracing::debug!(user = %user, "connected before the broker confirmed the user channel");
            }
        }
    }

    /// Subscribes to all of `topics` or none: every name and the total count are checked first.
    pub(super) fn subscribe(
        &mut self,
        topics: Vec<String>,
        filters: Option<&Value>,
        interval_ms: Option<u64>,
        recovering: &[(String, Option<StreamPosition>)],
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
            let first = if recovering.iter().any(|(t, _)| t == name) {
                self.ctx.hub.subscribe_recovering(&topic, &self.conn, &opts)
            } else {
                self.ctx.hub.subscribe(&topic, &self.conn, &opts)
            };
            if first {
                self.ctx.broker.topic_interest(&topic, true);
            }
            if self.subscriptions.insert(Arc::clone(&topic)) {
                self.presence_changed(&topic, true);
            }
        }
        Ok(topics)
    }

    async fn handle_publish(&mut self, msg: &Inbound<'_>) -> Result<Bytes, Refusal> {
        // Two shapes: `data: {topic, type, data, idempotencyKey, requireAck}`, or a top-level
        // `topic` (and `idempotencyKey`, `requireAck`) with `data` as the payload itself (then
        // the publication's type is "message").
        let req: PublishRequest = match msg.topic.as_deref() {
            Some(topic) => PublishRequest {
                topic: Some(topic.to_string()),
                data: msg.payload().map(RawValue::to_owned),
                idempotency_key: msg.idempotency_key.as_deref().map(str::to_string),
                require_ack: msg.require_ack,
                ..PublishRequest::default()
            },
            None => parse_data(msg.payload())?,
        };
        let topic = req.topic.ok_or_else(|| {
            Refusal::new(ErrorCode::InvalidMessageFormat, "publish needs a `topic`")
        })?;
        topic::validate(&topic, self.ctx.settings.ws.max_topic_length)
            .map_err(|e| Refusal::new(ErrorCode::InvalidTopic, e.to_string()))?;
        if topic::is_system(&topic) {
            return Err(Refusal::new(
                ErrorCode::PermissionDenied,
                format!("{topic} is a system topic: only the gateway publishes there"),
            ));
        }
        self.permitted(Action::Publish, &topic)?;
        let data = req.data.unwrap_or_else(null_raw);
        let receipt = self
            .ctx
            .broker
            .publish(TopicMessage {
                idempotency_key: req.idempotency_key,
                require_ack: req.require_ack,
                ..TopicMessage::new(
                    topic.clone(),
                    req.kind.unwrap_or_else(|| "message".to_string()),
                    data,
                )
            })
            .await
            .map_err(|e| Refusal::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(self.reply(
            "ack",
            msg.request_id(),
            json!({"action": "publish", "topic": topic, "seq": receipt.seq, "epoch": receipt.epoch,
                   "duplicate": receipt.duplicate}),
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

    pub(super) fn connection_message(&self) -> Bytes {
        let mut topics: Vec<&str> = self.subscriptions.iter().map(|t| &**t).collect();
        topics.sort_unstable();
        counted(
            Sent::Connection,
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
            ),
        )
    }

    /// A reply frame whose `data` carries `requestId` when the request had an id.
    pub(super) fn reply(
        &self,
        kind: &str,
        request_id: Option<&RawValue>,
        mut data: Value,
    ) -> Bytes {
        if let (Some(id), Value::Object(map)) = (request_id, &mut data) {
            let id = serde_json::from_str(id.get()).unwrap_or(Value::Null);
            map.insert("requestId".into(), id);
        }
        counted(Sent::of_reply(kind), server_message(kind, data))
    }

    pub(super) fn error_frame(&self, refusal: Refusal, request_id: Option<&RawValue>) -> Bytes {
        let mut body = ErrorBody::new(refusal.code, refusal.message).request_id(request_id);
        if let Some(details) = refusal.details {
            body = body.details(details);
        }
        counted(Sent::Error, body.to_frame())
    }

    pub(super) fn refuse(&self, refusal: Refusal, request_id: Option<&RawValue>) {
        let _ = self
            .conn
            .outbound
            .push(self.error_frame(refusal, request_id));
    }
}

/// Counts a server message that is about to be queued (replies are built right before they are
/// pushed) and hands it back.
fn counted(kind: Sent, frame: Bytes) -> Bytes {
    TRAFFIC.sent(kind, 1, crate::metrics::frame_payload_len(&frame) as u64);
    frame
}

/// The counted type of a parsed client message (the dispatch below, in the same order).
fn received_kind(msg: &Inbound<'_>) -> Received {
    match msg.kind() {
        "ping" => Received::Ping,
        "heartbeat" => Received::Heartbeat,
        "pong" => Received::Pong,
        "ack" => Received::Ack,
        "refresh" => Received::Refresh,
        "subscribe" => Received::Subscribe,
        "unsubscribe" => Received::Unsubscribe,
        "publish" => Received::Publish,
        _ if msg.to.is_some() => Received::Direct,
        _ => Received::Upstream,
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
    #[serde(default)]
    recover: bool,
}

struct SubscriptionRequest {
    topics: Vec<String>,
    filters: Option<Value>,
    interval: Option<u64>,
    since: Option<Value>,
    recover: bool,
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
            recover: data.recover,
        })
    }
}

/// The `data` of `ack`: the ids of the acknowledged publications.
#[derive(Debug, Default, Deserialize)]
struct AckRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(rename = "messageId", default)]
    message_id: Option<String>,
    #[serde(default)]
    ids: Option<Vec<String>>,
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
    #[serde(rename = "idempotencyKey", default)]
    idempotency_key: Option<String>,
    #[serde(rename = "requireAck", default)]
    require_ack: bool,
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
