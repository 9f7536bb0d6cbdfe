//! Messages arriving from Redis, turned into hub deliveries: each is encoded once on this node
//! and goes through the same shared-frame path as local publications.
//!
//! Payloads are the JSON "specs" documented for backends (README: "Publishing from a backend"):
//! - topic channel: `{"type","data"}`, plus `seq`/`epoch` when published through the sequencing
//!   script (nodes and the HTTP API always are; a plain `PUBLISH` from a backend is not);
//! - user, broadcast and node channels: `{"type","data"|"content","from"?}`, and on a node
//!   channel `connectionId` to reach one connection;
//! - control channel: `{"op":"disconnect","userId"|"clientId"}` or
//!   `{"op":"send","connectionId",...}` for a connection whose node is unknown.
//!
//! A payload that is not a valid spec is logged and dropped: it cannot be delivered, and it must
//! not disturb anything else.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::gapfill::GapFiller;
use super::keys::{classify, ChannelKind};
use crate::broker::memory::{deliver_direct, disconnect_local};
use crate::broker::{Direct, DisconnectTarget, Recipient};
use crate::hub::{ConnId, Hub, Publication, PublicationMeta};

#[derive(Debug, Deserialize)]
struct TopicSpec<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    epoch: Option<Cow<'a, str>>,
    /// Publish time (ms since the Unix epoch), set by `wsgate_publish`.
    #[serde(default)]
    ts: Option<u64>,
    #[serde(rename = "requireAck", default)]
    require_ack: bool,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

/// Encodes a topic spec (from the topic channel or the topic's history stream) for `topic`.
pub fn publication_from_spec(topic: &str, payload: &[u8]) -> Result<Publication, InboundError> {
    let spec: TopicSpec<'_> = serde_json::from_slice(payload)?;
    let meta = PublicationMeta {
        kind: spec.kind.as_deref().unwrap_or("message"),
        sequence: match (spec.seq, spec.epoch.as_deref()) {
            (Some(seq), Some(epoch)) => Some((seq, epoch)),
            _ => None,
        },
        id: None,
        time_ms: spec.ts,
        require_ack: spec.require_ack,
    };
    Ok(Publication::from_meta(
        topic,
        &meta,
        spec.data.unwrap_or(RawValue::NULL),
    ))
}

#[derive(Debug, Deserialize)]
struct DirectSpec<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
    #[serde(rename = "connectionId", default)]
    connection_id: Option<ConnId>,
}

/// A control message: `op` says what it is. `{"op":"send",...}` is read again as a
/// [`DirectSpec`] (an internally tagged enum cannot hold the borrowed `RawValue` payload: serde
/// buffers its content, and `RawValue` only deserializes straight from JSON text).
#[derive(Debug, Deserialize)]
struct ControlSpec<'a> {
    #[serde(borrow)]
    op: Cow<'a, str>,
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
    #[serde(rename = "clientId", default)]
    client_id: Option<String>,
}

/// Why a payload from Redis was dropped.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("channel {0:?} is not one of wsgate's")]
    UnknownChannel(String),
    #[error("payload is not a valid message spec: {0}")]
    BadPayload(#[from] serde_json::Error),
    #[error("message needs {0}")]
    Missing(&'static str),
}

/// Delivers one message from `channel` to this node's local connections; returns how many
/// connections it was queued to (topic publications go through `topics`, which keeps each
/// topic's stream in order and may hold one while it fills a gap: 0 is returned for those).
pub fn dispatch(
    hub: &Hub,
    topics: &Arc<GapFiller>,
    channel: &str,
    payload: &[u8],
) -> Result<usize, InboundError> {
    let kind = classify(channel).ok_or_else(|| InboundError::UnknownChannel(channel.into()))?;
    match kind {
        ChannelKind::Topic(topic) => {
            topics.offer(publication_from_spec(topic, payload)?);
            Ok(0)
        }
        ChannelKind::User(user) => {
            let spec: DirectSpec<'_> = serde_json::from_slice(payload)?;
            Ok(deliver_direct(
                hub,
                &direct(spec, Recipient::User(user.to_string()))?,
            ))
        }
        ChannelKind::Broadcast => {
            let spec: DirectSpec<'_> = serde_json::from_slice(payload)?;
            Ok(deliver_direct(hub, &direct(spec, Recipient::Everyone)?))
        }
        ChannelKind::Node(_) => {
            let spec: DirectSpec<'_> = serde_json::from_slice(payload)?;
            to_connection(hub, spec)
        }
        ChannelKind::Control => {
            let control: ControlSpec<'_> = serde_json::from_slice(payload)?;
            match &*control.op {
                "disconnect" => {
                    let target = match (control.user_id, control.client_id) {
                        (Some(user), _) => DisconnectTarget::User(user),
                        (None, Some(client)) => DisconnectTarget::Client(client),
                        (None, None) => return Err(InboundError::Missing("userId or clientId")),
                    };
                    Ok(disconnect_local(hub, &target))
                }
                "send" => to_connection(hub, serde_json::from_slice(payload)?),
                _ => Err(InboundError::Missing("an op of \"disconnect\" or \"send\"")),
            }
        }
    }
}

fn to_connection(hub: &Hub, spec: DirectSpec<'_>) -> Result<usize, InboundError> {
    let id = spec
        .connection_id
        .ok_or(InboundError::Missing("connectionId"))?;
    Ok(deliver_direct(
        hub,
        &direct(spec, Recipient::Connection(id))?,
    ))
}

fn direct(spec: DirectSpec<'_>, recipient: Recipient) -> Result<Direct, InboundError> {
    let (data, as_content) = match (spec.data, spec.content) {
        (Some(d), _) => (d, false),
        (None, Some(c)) => (c, true),
        (None, None) => return Err(InboundError::Missing("data or content")),
    };
    Ok(Direct {
        recipient,
        kind: spec.kind.as_deref().unwrap_or("message").to_string(),
        from: spec.from.map(Cow::into_owned),
        data: data.to_owned(),
        as_content,
    })
}
