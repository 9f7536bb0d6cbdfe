//! Messages encoded once, delivered many times.
//!
//! A [`Publication`] (topic message) and a direct message are serialized exactly once into a
//! complete WebSocket text frame; fan-out then queues clones of the same `Bytes` (a reference
//! count, no copy) to every recipient. A [`SharedFrame`] also holds the permessage-deflate
//! version of the frame, compressed at most once, and only when a recipient negotiated it.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::protocol::envelope::{next_message_id, now_rfc3339, rfc3339_of_millis};
use crate::ws::{deflate, frame};

/// How compressed frames are made (from the node's compression settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateParams {
    pub level: u32,
    /// Payloads shorter than this go out uncompressed even to clients that negotiated deflate.
    pub threshold: usize,
    /// The LZ77 window (9-15) this recipient's compressed frames are made with: 15 unless the
    /// client limited it with `server_max_window_bits`.
    pub window_bits: u8,
}

/// One message's frame bytes for every recipient: the plain frame, and the compressed frame
/// made on first demand.
#[derive(Debug, Clone)]
pub struct SharedFrame {
    plain: Bytes,
    /// One compressed frame per server window size a recipient negotiated (9 to 15 bits; 15,
    /// the default, is the one nearly everybody shares).
    compressed: Arc<[OnceLock<Bytes>; WINDOW_SIZES]>,
}

/// Server window sizes permessage-deflate can agree on here: 9 to 15 bits.
const WINDOW_SIZES: usize = 7;

impl SharedFrame {
    pub fn new(plain: Bytes) -> Self {
        SharedFrame {
            plain,
            compressed: Arc::new(Default::default()),
        }
    }

    /// The plain frame.
    pub fn plain(&self) -> &Bytes {
        &self.plain
    }

    /// The frame for one recipient: compressed when it negotiated deflate (`Some`) and the
    /// payload is worth it, plain otherwise. Either way a reference count, not a copy: each
    /// window size is compressed at most once. The plain frame must be a final text or binary
    /// frame; the compressed one keeps its opcode.
    pub fn for_recipient(&self, deflate: Option<DeflateParams>) -> Bytes {
        let Some(params) = deflate else {
            return self.plain.clone();
        };
        let worth_it = || {
            let payload = frame::payload_of(&self.plain);
            if payload.len() < params.threshold {
                return self.plain.clone();
            }
            let compressed = self.deflated(params);
            if compressed.len() >= self.plain.len() {
                return self.plain.clone();
            }
            compressed
        };
        let slot = usize::from(params.window_bits.saturating_sub(9)).min(WINDOW_SIZES - 1);
        self.compressed[slot].get_or_init(worth_it).clone()
    }

    /// The compressed frame made with `params`, whether or not deflate makes it any smaller
    /// and whatever the threshold (echo sessions decide that themselves).
    pub fn deflated(&self, params: DeflateParams) -> Bytes {
        let payload = frame::payload_of(&self.plain);
        let compressed = deflate::compress_with_window(payload, params.level, params.window_bits);
        frame::compressed(frame::data_opcode_of(&self.plain), &compressed)
    }
}

/// Everything about a publication but its topic and payload, as it travels between nodes and
/// sits in history (the spec documented for backends).
#[derive(Debug, Clone, Copy, Default)]
pub struct PublicationMeta<'a> {
    /// The `type` subscribers see.
    pub kind: &'a str,
    /// Position in the topic's sequence: `(seq, epoch)`; `None` for a plain `PUBLISH` from a
    /// backend.
    pub sequence: Option<(u64, &'a str)>,
    /// The message id; default: `<epoch>:<seq>` when sequenced (the same on every node, in
    /// history and in every re-send), else a fresh id.
    pub id: Option<&'a str>,
    /// When it was published, in milliseconds since the Unix epoch; default: now.
    pub time_ms: Option<u64>,
    /// Recipients must answer `ack` with the id, or get it again.
    pub require_ack: bool,
}

/// A topic message ready for fan-out.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: Arc<str>,
    /// The message id every recipient sees (and acknowledges, when `require_ack`).
    pub id: Arc<str>,
    pub require_ack: bool,
    /// Position in the topic's sequence; `None` for messages a backend published straight to
    /// Redis without going through the sequencing script.
    pub seq: Option<u64>,
    pub epoch: Option<Arc<str>>,
    /// The publisher's `data` as JSON text, kept for subscription filters.
    pub data: Bytes,
    /// The complete text frame every subscriber receives (plain and compressed).
    pub frame: SharedFrame,
    /// When this node got it (encoded it): the start of its fan-out latency sample.
    pub received_at: std::time::Instant,
}

#[derive(Serialize)]
struct PublicationWire<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: &'a str,
    timestamp: &'a str,
    topic: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    epoch: Option<&'a str>,
    #[serde(rename = "requireAck", skip_serializing_if = "std::ops::Not::not")]
    require_ack: bool,
    data: &'a RawValue,
}

impl Publication {
    /// Encodes `{type, id, timestamp, topic, seq, epoch, data}` into its frame, once.
    pub fn encode(topic: &str, kind: &str, seq: u64, epoch: &str, data: &RawValue) -> Self {
        Self::from_meta(
            topic,
            &PublicationMeta {
                kind,
                sequence: Some((seq, epoch)),
                ..PublicationMeta::default()
            },
            data,
        )
    }

    /// Encodes a publication that has no place in the topic's sequence (no `seq`/`epoch`).
    pub fn encode_unsequenced(topic: &str, kind: &str, data: &RawValue) -> Self {
        Self::from_meta(
            topic,
            &PublicationMeta {
                kind,
                ..PublicationMeta::default()
            },
            data,
        )
    }

    /// Encodes `{type, id, timestamp, topic, seq, epoch, requireAck, data}` into its frame, once.
    pub fn from_meta(topic: &str, meta: &PublicationMeta<'_>, data: &RawValue) -> Self {
        let sequence = meta.sequence;
        let id: Arc<str> = match (meta.id, sequence) {
            (Some(id), _) => Arc::from(id),
            (None, Some((seq, epoch))) => Arc::from(format!("{epoch}:{seq}")),
            (None, None) => Arc::from(next_message_id()),
        };
        let timestamp = match meta.time_ms {
            Some(ms) => rfc3339_of_millis(ms),
            None => now_rfc3339(),
        };
        let frame = frame::json_text(&PublicationWire {
            kind: meta.kind,
            id: &id,
            timestamp: &timestamp,
            topic,
            seq: sequence.map(|(seq, _)| seq),
            epoch: sequence.map(|(_, epoch)| epoch),
            require_ack: meta.require_ack,
            data,
        });
        Publication {
            topic: Arc::from(topic),
            id,
            require_ack: meta.require_ack,
            seq: sequence.map(|(seq, _)| seq),
            epoch: sequence.map(|(_, epoch)| Arc::from(epoch)),
            data: Bytes::copy_from_slice(data.get().as_bytes()),
            frame: SharedFrame::new(frame),
            received_at: std::time::Instant::now(),
        }
    }
}

/// A message addressed to users or connections rather than a topic.
#[derive(Debug, Clone)]
pub struct DirectMessage<'a> {
    pub kind: &'a str,
    /// The sender's identity, always set by the server for client-originated messages.
    pub from: Option<&'a str>,
    pub to: Option<&'a str>,
    pub data: &'a RawValue,
    /// Also put the payload under `content` (the framework guide's field name).
    pub as_content: bool,
}

#[derive(Serialize)]
struct DirectWire<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    id: &'a str,
    timestamp: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    data: &'a RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a RawValue>,
}

impl DirectMessage<'_> {
    /// Encodes `{type, id, timestamp, from, to, data[, content]}` into its frame, once.
    pub fn encode(&self) -> SharedFrame {
        let id = next_message_id();
        let timestamp = now_rfc3339();
        SharedFrame::new(frame::json_text(&DirectWire {
            kind: self.kind,
            id: &id,
            timestamp: &timestamp,
            from: self.from,
            to: self.to,
            data: self.data,
            content: self.as_content.then_some(self.data),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> serde_json::Value {
        let header = match frame[1] & 0x7F {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        serde_json::from_slice(&frame[header..]).expect("frame payload is JSON")
    }

    #[test]
    fn publication_frame_carries_the_envelope() {
        let data = RawValue::from_string(r#"{"status":"ACTIVE"}"#.into()).expect("json");
        let p = Publication::encode("routes", "route_update", 7, "e1", &data);
        let v = payload(p.frame.plain());
        assert_eq!(v["type"], "route_update");
        assert_eq!(v["topic"], "routes");
        assert_eq!(v["seq"], 7);
        assert_eq!(v["epoch"], "e1");
        assert_eq!(v["data"]["status"], "ACTIVE");
        // The data is kept as sent, for filters.
        assert_eq!(&p.data[..], data.get().as_bytes());
    }

    #[test]
    fn compressed_once_and_only_above_the_threshold() {
        let big = format!("{{\"text\":\"{}\"}}", "abc".repeat(200));
        let data = RawValue::from_string(big).expect("json");
        let p = Publication::encode("t", "k", 1, "e", &data);
        let params = DeflateParams {
            level: 1,
            threshold: 100,
            window_bits: 15,
        };
        let a = p.frame.for_recipient(Some(params));
        let b = p.frame.for_recipient(Some(params));
        assert_eq!(a[0], 0xC1, "FIN + RSV1 + text");
        assert_eq!(a.as_ptr(), b.as_ptr(), "one compressed frame shared by all");
        assert!(a.len() < p.frame.plain().len());
        let inflated =
            crate::ws::deflate::inflate(frame::payload_of(&a), 10_000).expect("inflates");
        assert_eq!(inflated, frame::payload_of(p.frame.plain()));
        assert_eq!(
            p.frame.for_recipient(None).as_ptr(),
            p.frame.plain().as_ptr()
        );

        // About 100 bytes of envelope (the id grows with the process's message count): well
        // below a threshold of 256.
        let small = RawValue::from_string("1".into()).expect("json");
        let p = Publication::encode("t", "k", 1, "e", &small);
        let params = DeflateParams {
            threshold: 256,
            ..params
        };
        assert_eq!(
            p.frame.for_recipient(Some(params)).as_ptr(),
            p.frame.plain().as_ptr()
        );

        // A binary frame stays binary when compressed; a limited window gets its own frame,
        // shared by every recipient with that window.
        let binary = SharedFrame::new(frame::frame(frame::OpCode::Binary, &[7u8; 4000]));
        let small_window = DeflateParams {
            window_bits: 9,
            ..params
        };
        let c = binary.for_recipient(Some(small_window));
        assert_eq!(c[0], 0xC2, "FIN + RSV1 + binary");
        assert_eq!(
            c.as_ptr(),
            binary.for_recipient(Some(small_window)).as_ptr(),
            "compressed once per window size"
        );
        assert_ne!(
            c.as_ptr(),
            binary.for_recipient(Some(params)).as_ptr(),
            "the 15-bit frame is another one"
        );
        assert_eq!(
            crate::ws::deflate::inflate(frame::payload_of(&c), 10_000).expect("inflates"),
            vec![7u8; 4000]
        );
    }

    #[test]
    fn unsequenced_publication_has_no_seq_or_epoch() {
        let data = RawValue::from_string("1".into()).expect("json");
        let v = payload(
            Publication::encode_unsequenced("t", "k", &data)
                .frame
                .plain(),
        );
        assert!(v.get("seq").is_none() && v.get("epoch").is_none(), "{v}");
        assert_eq!(v["data"], 1);
    }

    #[test]
    fn direct_message_repeats_content_when_sent_as_content() {
        let data = RawValue::from_string(r#""hi""#.into()).expect("json");
        let f = DirectMessage {
            kind: "chat",
            from: Some("u1"),
            to: Some("u2"),
            data: &data,
            as_content: true,
        }
        .encode();
        let v = payload(f.plain());
        assert_eq!(
            (v["from"].as_str(), v["to"].as_str()),
            (Some("u1"), Some("u2"))
        );
        assert_eq!(v["data"], "hi");
        assert_eq!(v["content"], "hi");
    }
}
