//! The JSON envelope: lenient parsing of client messages and encoding of server messages.
//!
//! Inbound parsing borrows from the frame (`RawValue` for `id`, `data` and `content`), so a
//! message the gateway only forwards is never turned into a value tree. Outbound server messages
//! (replies, notices) are encoded straight into frame bytes by [`server_message`]; publications
//! and direct messages have their own encoders in `hub::publication`.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::codes::ErrorCode;
use crate::ws::frame;

/// A client message as received. Unknown fields are ignored; `messageId` stands in for `id`.
#[derive(Debug, Deserialize)]
pub struct Inbound<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Text<'a>>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    /// Top-level topic (publish and single-topic subscribe may carry it here or in `data`).
    #[serde(borrow, default)]
    pub topic: Option<Text<'a>>,
    /// Recipient user of a direct message; present-but-empty means broadcast.
    #[serde(borrow, default)]
    pub to: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    /// The framework guide's name for the payload of direct messages.
    #[serde(borrow, default)]
    pub content: Option<&'a RawValue>,
    /// Top-level form of `publish`: the idempotency key and `requireAck` beside `topic`.
    #[serde(rename = "idempotencyKey", borrow, default)]
    pub idempotency_key: Option<Text<'a>>,
    #[serde(rename = "requireAck", default)]
    pub require_ack: bool,
}

/// A string field borrowed from the frame when it has no escapes.
///
/// serde borrows into a `Cow<str>` only when the field is a bare `Cow` marked `borrow`; inside an
/// `Option` it always allocates, so optional strings go through this newtype.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

/// Why a text message is not a usable envelope.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("message is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("message has no `type` field")]
    MissingType,
    #[error("`type` must not be empty")]
    EmptyType,
    #[error("message is not a JSON object")]
    NotAnObject,
}

/// Whether `text` can only be a JSON object. Derived deserializers also accept arrays (fields
/// by position), so `["ping"]` would otherwise pass for `{"type":"ping"}`.
fn is_json_object(text: &str) -> bool {
    text.trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
}

impl<'a> Inbound<'a> {
    /// Parses one text message.
    pub fn parse(text: &'a str) -> Result<Self, EnvelopeError> {
        if !is_json_object(text) {
            return Err(EnvelopeError::NotAnObject);
        }
        let msg: Inbound<'a> = serde_json::from_str(text)?;
        match msg.kind.as_deref() {
            None => Err(EnvelopeError::MissingType),
            Some("") => Err(EnvelopeError::EmptyType),
            Some(_) => Ok(msg),
        }
    }

    /// The message type (never empty after [`Inbound::parse`]).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or_default()
    }

    /// The request id (`id`, or `messageId`), echoed as `data.requestId` in replies.
    pub fn request_id(&self) -> Option<&'a RawValue> {
        self.id.or(self.message_id)
    }

    /// The payload: `data`, or `content` for framework-guide style messages.
    pub fn payload(&self) -> Option<&'a RawValue> {
        self.data.or(self.content)
    }
}

#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
}

/// The request id of a message that is refused before or despite a full parse (rate limit,
/// missing `type`), so even those errors carry `requestId`. `None` when it is not a JSON object.
pub fn request_id_of(text: &str) -> Option<&RawValue> {
    if !is_json_object(text) {
        return None;
    }
    let ids: IdOnly<'_> = serde_json::from_str(text).ok()?;
    ids.id.or(ids.message_id)
}

/// A fresh server message id: a per-process random prefix and a counter (unique per node run).
pub fn next_message_id() -> String {
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(rand::random::<u32>);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix:08x}-{n}")
}

/// Current time as RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// A time in milliseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_of_millis(ms: u64) -> String {
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(at).to_string()
}

/// Current time in milliseconds since the Unix epoch (`serverTime`).
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[derive(Serialize)]
struct ServerMessage<'a, D: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: String,
    timestamp: String,
    data: D,
}

/// A complete text frame `{type, id, timestamp, data}` for a reply or notice from the server.
pub fn server_message<D: Serialize>(kind: &str, data: D) -> Bytes {
    frame::json_text(&ServerMessage {
        kind,
        id: next_message_id(),
        timestamp: now_rfc3339(),
        data,
    })
}

/// The `data` of an `error` message (and the body of an HTTP API error).
#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody<'a> {
    pub code: ErrorCode,
    #[serde(rename = "numericCode")]
    pub numeric_code: u16,
    pub message: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
    #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a RawValue>,
    /// Milliseconds to wait before retrying (rate limits).
    #[serde(rename = "retryAfter", skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl<'a> ErrorBody<'a> {
    pub fn new(code: ErrorCode, message: impl Into<Cow<'a, str>>) -> Self {
        ErrorBody {
            code,
            numeric_code: code.numeric(),
            message: message.into(),
            details: None,
            request_id: None,
            retry_after_ms: None,
        }
    }

    pub fn request_id(mut self, id: Option<&'a RawValue>) -> Self {
        self.request_id = id;
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn retry_after_ms(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// The `error` message frame.
    pub fn to_frame(&self) -> Bytes {
        server_message("error", self)
    }
}

/// The `data` of a `disconnect` notice sent before the server closes a connection on purpose.
#[derive(Debug, Serialize)]
pub struct DisconnectNotice<'a> {
    pub code: u16,
    pub reason: &'a str,
    pub reconnect: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_strings_are_borrowed_not_copied() {
        let m = Inbound::parse(r#"{"type":"chat","to":"u2","topic":"t"}"#).expect("parses");
        for field in [&m.kind, &m.to, &m.topic] {
            assert!(matches!(field, Some(Text(Cow::Borrowed(_)))), "{field:?}");
        }
        let m = Inbound::parse(r#"{"type":"ch\u0061t"}"#).expect("parses");
        assert_eq!(m.kind(), "chat");
    }

    #[test]
    fn message_id_is_an_alias_of_id() {
        let m = Inbound::parse(r#"{"type":"ping","messageId":"m-1"}"#).expect("parses");
        assert_eq!(m.request_id().map(RawValue::get), Some(r#""m-1""#));
        let m = Inbound::parse(r#"{"type":"ping","id":7,"messageId":"m-1"}"#).expect("parses");
        assert_eq!(m.request_id().map(RawValue::get), Some("7"));
    }

    #[test]
    fn refusals_say_why() {
        assert!(matches!(
            Inbound::parse(r#"{"data":{}}"#),
            Err(EnvelopeError::MissingType)
        ));
        assert!(matches!(
            Inbound::parse(r#"{"type":""}"#),
            Err(EnvelopeError::EmptyType)
        ));
        assert!(matches!(
            Inbound::parse("[1]"),
            Err(EnvelopeError::NotAnObject)
        ));
        // Arrays would otherwise fill the envelope's fields by position.
        assert!(matches!(
            Inbound::parse(r#" ["ping","x"]"#),
            Err(EnvelopeError::NotAnObject)
        ));
        assert!(request_id_of(r#"[1,2]"#).is_none());
        assert!(matches!(
            Inbound::parse(r#"{"type":5}"#),
            Err(EnvelopeError::Json(_))
        ));
    }

    #[test]
    fn request_id_survives_refusals() {
        assert_eq!(
            request_id_of(r#"{"id":"r1"}"#).map(RawValue::get),
            Some(r#""r1""#)
        );
        // A bad `type` does not hide the id.
        assert_eq!(
            request_id_of(r#"{"messageId":3,"type":5}"#).map(RawValue::get),
            Some("3")
        );
        assert!(request_id_of("not json").is_none());
    }

    #[test]
    fn unknown_fields_are_ignored_and_content_stands_for_data() {
        let m = Inbound::parse(r#"{"type":"chat","to":"u2","content":{"text":"hi"},"x":1}"#)
            .expect("parses");
        assert_eq!(m.kind(), "chat");
        assert_eq!(m.to.as_deref(), Some("u2"));
        assert_eq!(m.payload().map(RawValue::get), Some(r#"{"text":"hi"}"#));
    }
}
