//! Property tests for the parsers that the fuzz targets in `fuzz/` also cover, kept small enough
//! (256 cases each, short inputs) to run in every `cargo test`:
//!
//! - envelope (`protocol::envelope`): parsing arbitrary text never panics, never accepts text
//!   that is not a JSON object, and agrees with `request_id_of`; generated valid envelopes come
//!   back with their `type`, request id (`id`, else `messageId`) and payload (`data`, else
//!   `content`); a missing or empty `type` is refused as such.
//! - filters (`protocol::filter`): for generated flat and per-topic filters and flat publication
//!   data, `Filter::matches` (on simd-json trees, as the hub parses them) agrees with a simple
//!   reference model: every filtered field present, and its value, or any element of its array
//!   value, equal to a listed scalar (numbers compared as numbers, so 2 == 2.0); `interval`
//!   becomes the subscription's interval.
//! - frame reader (`ws::guard::FrameGuard` under fastwebsockets, set up as `ws::session` does):
//!   generated masked client frames (text and binary, whole and fragmented, pings between
//!   fragments, and with deflate negotiated also permessage-deflate compressed with flate2 and
//!   the RFC 7692 tail trimmed), fed in reads of arbitrary size, come out as exactly the sent
//!   payloads and pings, in order, then end of stream; a message over `max_message_size` (plain
//!   or inflating past it) is refused with `MessageTooBig` after the messages before it.
//!
//! Regression cases found by these properties or by fuzzing go at the end of this file as plain
//! tests.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use fastwebsockets::{OpCode, WebSocketError};
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, ReadBuf};
use wsgate::protocol::envelope::{request_id_of, EnvelopeError, Inbound};
use wsgate::protocol::filter::{options_per_topic, SubscriptionOptions};
use wsgate::ws::guard::{FrameGuard, GuardError};
use wsgate::ws::reader::FrameReader;

const CASES: u32 = 256;

// --- envelope ----------------------------------------------------------------------------------

/// A JSON value of a few levels, small enough to keep cases short.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        // Quarters: exact in binary and in short decimal, so they read back equal.
        (-4000i32..4000).prop_map(|n| Value::from(f64::from(n) / 4.0)),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A request id as clients send them: a string or a number, never null.
fn request_id() -> impl Strategy<Value = Value> {
    prop_oneof![
        ".{0,10}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
    ]
}

/// The parts of a valid envelope.
#[derive(Debug, Clone)]
struct Envelope {
    kind: String,
    id: Option<Value>,
    message_id: Option<Value>,
    data: Option<Value>,
    content: Option<Value>,
    extra: Option<Value>,
    /// Whitespace before the object.
    lead: String,
}

impl Envelope {
    fn to_text(&self, kind: Option<&str>) -> String {
        let mut obj = Map::new();
        if let Some(kind) = kind {
            obj.insert("type".into(), Value::from(kind));
        }
        for (key, value) in [
            ("id", &self.id),
            ("messageId", &self.message_id),
            ("data", &self.data),
            ("content", &self.content),
            ("unknownField", &self.extra),
        ] {
            if let Some(v) = value {
                obj.insert(key.into(), v.clone());
            }
        }
        format!("{}{}", self.lead, Value::Object(obj))
    }
}

fn envelope() -> impl Strategy<Value = Envelope> {
    (
        ".{1,12}",
        prop::option::of(request_id()),
        prop::option::of(request_id()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        prop::option::of(json_value()),
        "[ \t\r\n]{0,3}",
    )
        .prop_map(
            |(kind, id, message_id, data, content, extra, lead)| Envelope {
                kind,
                id,
                message_id,
                data,
                content,
                extra,
                lead,
            },
        )
}

/// A valid envelope with a few characters deleted, replaced or inserted: mostly still JSON,
/// often still an envelope, sometimes with duplicate keys, a non-string `type` or a cut-off end.
fn edited_envelope() -> impl Strategy<Value = String> {
    let edit = (
        any::<Index>(),
        0u8..3,
        prop::sample::select(vec![
            '"', '{', '}', '[', ']', ',', ':', ' ', '\\', '1', 'n', 'x',
        ]),
    );
    (envelope(), prop::collection::vec(edit, 0..4)).prop_map(|(env, edits)| {
        let mut chars: Vec<char> = env.to_text(Some(&env.kind)).chars().collect();
        for (at, op, c) in edits {
            let i = at.index(chars.len() + 1);
            match op {
                0 if i < chars.len() => {
                    chars.remove(i);
                }
                1 if i < chars.len() => chars[i] = c,
                _ => chars.insert(i, c),
            }
        }
        chars.into_iter().collect()
    })
}

/// The value of a raw JSON fragment.
fn tree(raw: Option<&RawValue>) -> Option<Value> {
    raw.map(|r| serde_json::from_str(r.get()).expect("a RawValue holds valid JSON"))
}

/// Checks what holds for any text, accepted or not.
fn check_any_text(text: &str) -> Result<(), TestCaseError> {
    let alone = request_id_of(text).map(RawValue::get);
    if let Ok(msg) = Inbound::parse(text) {
        prop_assert!(!msg.kind().is_empty());
        prop_assert!(
            text.trim_start().starts_with('{'),
            "not an object: {text:?}"
        );
        prop_assert_eq!(msg.request_id().map(RawValue::get), alone);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn envelope_parse_never_panics_on_any_text(text in any::<String>()) {
        check_any_text(&text)?;
    }

    #[test]
    fn envelope_parse_never_panics_on_edited_envelopes(text in edited_envelope()) {
        check_any_text(&text)?;
    }

    #[test]
    fn valid_envelopes_round_trip(env in envelope()) {
        let text = env.to_text(Some(&env.kind));
        let msg = Inbound::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}: {text}")))?;
        prop_assert_eq!(msg.kind(), env.kind.as_str());
        let wanted_id = env.id.clone().or(env.message_id.clone());
        prop_assert_eq!(tree(msg.request_id()), wanted_id.clone());
        prop_assert_eq!(request_id_of(&text).map(|r| tree(Some(r))), wanted_id.map(Some));
        // A JSON null payload counts as absent.
        let wanted_payload = env
            .data
            .clone()
            .filter(|v| !v.is_null())
            .or(env.content.clone().filter(|v| !v.is_null()));
        prop_assert_eq!(tree(msg.payload()), wanted_payload);
    }

    #[test]
    fn missing_or_empty_type_is_refused_as_such(env in envelope()) {
        let missing = env.to_text(None);
        prop_assert!(
            matches!(Inbound::parse(&missing), Err(EnvelopeError::MissingType)),
            "{}", missing
        );
        let empty = env.to_text(Some(""));
        prop_assert!(matches!(Inbound::parse(&empty), Err(EnvelopeError::EmptyType)), "{}", empty);
        // The id still comes through for the error reply.
        prop_assert_eq!(
            request_id_of(&missing).map(|r| tree(Some(r))),
            env.id.clone().or(env.message_id.clone()).map(Some)
        );
        let array = format!("[{}]", Value::from(env.kind.clone()));
        prop_assert!(matches!(Inbound::parse(&array), Err(EnvelopeError::NotAnObject)));
    }
}

// --- filters -----------------------------------------------------------------------------------

const FIELDS: [&str; 4] = ["a", "b", "level", "x"];
const TOPICS: [&str; 3] = ["alerts", "routes", "metrics"];

/// The scalars filters list and data holds; few enough that they often meet.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (-2i64..3).prop_map(Value::from),
        prop::sample::select(vec![-1.0, 0.5, 2.0]).prop_map(Value::from),
        prop::sample::select(vec!["warning", "info", "", "2"]).prop_map(Value::from),
    ]
}

/// One field condition as a subscriber writes it: one value or a list of them.
fn condition() -> impl Strategy<Value = Value> {
    prop_oneof![
        scalar(),
        prop::collection::vec(scalar(), 0..4).prop_map(Value::Array),
    ]
}

/// A flat filter object; maybe with an `interval`.
fn flat_filter() -> impl Strategy<Value = Map<String, Value>> {
    (
        prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), condition(), 0..4),
        prop::option::of(0u64..10_000),
    )
        .prop_map(|(fields, interval)| {
            let mut obj: Map<String, Value> = fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            if let Some(ms) = interval {
                obj.insert("interval".into(), Value::from(ms));
            }
            obj
        })
}

/// Publication data: the fields hold scalars, arrays of scalars, or an object (never listed).
fn data() -> impl Strategy<Value = Value> {
    let field = prop_oneof![
        4 => scalar(),
        2 => prop::collection::vec(scalar(), 0..4).prop_map(Value::Array),
        1 => scalar().prop_map(|v| json!({ "v": v })),
    ];
    prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), field, 0..5)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// Reference equality of a listed scalar and a data value: same JSON type and value, numbers
/// by numeric value.
fn model_eq(listed: &Value, v: &Value) -> bool {
    match (listed, v) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(_) | Value::Object(_), _) | (_, Value::Array(_) | Value::Object(_)) => false,
        (a, b) => a == b,
    }
}

/// The reference model of a filter object on flat data.
fn model_matches(filter: &Map<String, Value>, data: &Value) -> bool {
    filter
        .iter()
        .filter(|(k, _)| k.as_str() != "interval")
        .all(|(k, condition)| {
            let allowed: &[Value] = match condition {
                Value::Array(items) => items,
                one => std::slice::from_ref(one),
            };
            match data.get(k) {
                None => false,
                Some(Value::Array(items)) => {
                    items.iter().any(|v| allowed.iter().any(|a| model_eq(a, v)))
                }
                Some(v) => allowed.iter().any(|a| model_eq(a, v)),
            }
        })
}

/// What the gateway decides for one subscription and one publication.
fn gateway_matches(options: &SubscriptionOptions, data: &Value) -> bool {
    // As the hub parses it: simd-json, from the publication's bytes.
    let mut bytes = data.to_string().into_bytes();
    let tree = simd_json::to_borrowed_value(&mut bytes).expect("generated data is JSON");
    options.filter.as_ref().is_none_or(|f| f.matches(&tree))
}

fn interval_of(filter: &Map<String, Value>, default: Option<u64>) -> Option<Duration> {
    filter
        .get("interval")
        .and_then(Value::as_u64)
        .or(default)
        .filter(|ms| *ms > 0)
        .map(Duration::from_millis)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn flat_filters_match_like_the_model(
        filter in flat_filter(),
        topics in prop::sample::subsequence(TOPICS.to_vec(), 1..=3),
        interval in prop::option::of(0u64..10_000),
        publications in prop::collection::vec(data(), 1..6),
    ) {
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let value = Value::Object(filter.clone());
        let options = options_per_topic(Some(&value), &topics, interval)
            .map_err(|e| TestCaseError::fail(format!("{e}: {value}")))?;
        prop_assert_eq!(options.len(), topics.len());
        for topic in &topics {
            let o = &options[topic];
            prop_assert_eq!(o.interval, interval_of(&filter, interval), "{}", value);
            for data in &publications {
                prop_assert_eq!(
                    gateway_matches(o, data),
                    model_matches(&filter, data),
                    "filter {} on {}", value, data
                );
            }
        }
    }

    #[test]
    fn per_topic_filters_match_like_the_model(
        filters in prop::collection::btree_map(
            prop::sample::select(TOPICS.to_vec()), flat_filter(), 1..=3),
        extra_topic in any::<bool>(),
        publications in prop::collection::vec(data(), 1..6),
    ) {
        // Every filtered topic is requested, and maybe one without a filter of its own.
        let mut topics: Vec<String> = filters.keys().map(|t| t.to_string()).collect();
        if extra_topic {
            if let Some(t) = TOPICS.iter().find(|t| !filters.contains_key(*t)) {
                topics.push(t.to_string());
            }
        }
        let value = Value::Object(
            filters.iter().map(|(t, f)| (t.to_string(), Value::Object(f.clone()))).collect(),
        );
        let options = options_per_topic(Some(&value), &topics, None)
            .map_err(|e| TestCaseError::fail(format!("{e}: {value}")))?;
        let none = Map::new();
        for topic in &topics {
            let filter = filters.get(topic.as_str()).unwrap_or(&none);
            let o = &options[topic];
            prop_assert_eq!(o.interval, interval_of(filter, None), "{} in {}", topic, value);
            for data in &publications {
                prop_assert_eq!(
                    gateway_matches(o, data),
                    model_matches(filter, data),
                    "topic {} of {} on {}", topic, value, data
                );
            }
        }
    }
}

// --- frame reader ------------------------------------------------------------------------------

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// A client stream held in memory, handed out in reads of at most `chunk` bytes.
struct Chunked {
    data: Vec<u8>,
    at: usize,
    chunk: usize,
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let n = (this.data.len() - this.at)
            .min(this.chunk)
            .min(buf.remaining());
        buf.put_slice(&this.data[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

/// A masked client frame.
fn masked_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (u8::from(rsv1) << 6) | opcode];
    let len = payload.len();
    if len < 126 {
        f.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        f.push(0x80 | 126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(0x80 | 127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// permessage-deflate compression of one message, independent of the gateway's own code: raw
/// deflate (flate2), sync-flushed, with the 00 00 ff ff tail removed (RFC 7692 7.2.1).
fn compress(payload: &[u8], level: u32) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
    encoder.write_all(payload).expect("writes to a Vec");
    encoder.flush().expect("sync flush to a Vec");
    let mut out = encoder.get_ref().clone();
    assert!(
        out.ends_with(&TAIL),
        "a sync flush ends with the empty stored block"
    );
    out.truncate(out.len() - TAIL.len());
    out
}

/// One client message as generated.
#[derive(Debug, Clone)]
struct Message {
    binary: bool,
    payload: Vec<u8>,
    /// Compress it (only when deflate is on).
    compress: bool,
    level: u32,
    /// Where its wire payload is cut into fragments.
    cuts: Vec<Index>,
    /// Ping payloads sent after the first fragment.
    ping: Option<Vec<u8>>,
    mask: [u8; 4],
}

fn payload() -> impl Strategy<Value = (bool, Vec<u8>)> {
    prop_oneof![
        // Text: valid UTF-8 with multi-byte characters (cuts fall inside them).
        "[a-z {}\":,é€😀]{0,200}".prop_map(|s| (false, s.into_bytes())),
        // Binary: random (incompressible) or repetitive bytes.
        prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (true, b)),
        (any::<u8>(), 0usize..400).prop_map(|(b, n)| (true, vec![b; n])),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    (
        payload(),
        any::<bool>(),
        0u32..=9,
        prop::collection::vec(any::<Index>(), 0..4),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        any::<[u8; 4]>(),
    )
        .prop_map(
            |((binary, payload), compress, level, cuts, ping, mask)| Message {
                binary,
                payload,
                compress,
                level,
                cuts,
                ping,
                mask,
            },
        )
}

/// Appends `m`'s frames to `wire`; returns the pings it sent.
fn encode(m: &Message, deflate: bool, wire: &mut Vec<u8>) -> Vec<Vec<u8>> {
    let compressed = deflate && m.compress;
    let body = if compressed {
        compress(&m.payload, m.level)
    } else {
        m.payload.clone()
    };
    let mut cuts: Vec<usize> = m.cuts.iter().map(|i| i.index(body.len() + 1)).collect();
    cuts.push(0);
    cuts.push(body.len());
    cuts.sort_unstable();
    cuts.dedup();
    // An empty payload is still one frame.
    let pieces: Vec<&[u8]> = if cuts.len() < 2 {
        vec![&body[..]]
    } else {
        cuts.windows(2).map(|w| &body[w[0]..w[1]]).collect()
    };
    let mut pings = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        let first = i == 0;
        let opcode = match (first, m.binary) {
            (false, _) => 0x0,
            (true, false) => 0x1,
            (true, true) => 0x2,
        };
        let fin = i + 1 == pieces.len();
        wire.extend(masked_frame(
            fin,
            compressed && first,
            opcode,
            piece,
            m.mask,
        ));
        if first && !fin {
            if let Some(ping) = &m.ping {
                wire.extend(masked_frame(true, false, 0x9, ping, [7, 7, 1, 2]));
                pings.push(ping.clone());
            }
        }
    }
    pings
}

/// What the read loop saw: whole messages (binary?, payload), pings, and how it ended.
#[derive(Debug, Default)]
struct Received {
    messages: Vec<(bool, Vec<u8>)>,
    pings: Vec<Vec<u8>>,
    end: Option<WebSocketError>,
}

/// Reads `wire` through FrameGuard and the frame reader as `ws::session` does, reassembling
/// fragmented messages.
fn read_all(wire: Vec<u8>, chunk: usize, max_message: usize, deflate: bool) -> Received {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async move {
        let reader = Chunked {
            data: wire,
            at: 0,
            chunk,
        };
        let guard = FrameGuard::new(reader, max_message, deflate);
        let mut ws = FrameReader::new(guard, max_message);
        let mut got = Received::default();
        let mut partial: Option<(bool, Vec<u8>)> = None;
        loop {
            let frame = match ws.read_frame().await {
                Ok(frame) => frame,
                Err(e) => {
                    got.end = Some(e);
                    return got;
                }
            };
            match frame.opcode {
                OpCode::Ping => got.pings.push(frame.payload.to_vec()),
                OpCode::Text | OpCode::Binary => {
                    assert!(partial.is_none(), "a message inside a message");
                    let m = (frame.opcode == OpCode::Binary, frame.payload.to_vec());
                    if frame.fin {
                        got.messages.push(m);
                    } else {
                        partial = Some(m);
                    }
                }
                OpCode::Continuation => {
                    let Some((_, buf)) = partial.as_mut() else {
                        panic!("a continuation without a message");
                    };
                    buf.extend_from_slice(&frame.payload);
                    if frame.fin {
                        got.messages.extend(partial.take());
                    }
                }
                OpCode::Close | OpCode::Pong => panic!("no {:?} was sent", frame.opcode),
            }
        }
    })
}

fn refusal(end: &Option<WebSocketError>) -> Option<&GuardError> {
    match end {
        Some(WebSocketError::IoError(e)) => GuardError::from_io(e),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn frame_reader_returns_exactly_the_sent_payloads(
        messages in prop::collection::vec(message(), 1..4),
        deflate in any::<bool>(),
        chunk in 1usize..80,
        max_message in 128usize..600,
    ) {
        let mut wire = Vec::new();
        let mut pings = Vec::new();
        let mut expected = Vec::new();
        for m in &messages {
            let mut m = m.clone();
            m.payload.truncate(max_message);
            if !m.binary {
                // Truncation must not split a character.
                while std::str::from_utf8(&m.payload).is_err() {
                    m.payload.pop();
                }
            }
            pings.extend(encode(&m, deflate, &mut wire));
            expected.push((m.binary, m.payload));
        }
        let got = read_all(wire, chunk, max_message, deflate);
        prop_assert!(
            matches!(got.end, Some(WebSocketError::UnexpectedEOF)),
            "ended with {:?}", got.end
        );
        prop_assert_eq!(got.messages, expected);
        prop_assert_eq!(got.pings, pings);
    }

    #[test]
    fn frame_reader_refuses_messages_over_the_limit(
        before in prop::collection::vec(message(), 0..3),
        big in message(),
        deflate in any::<bool>(),
        chunk in 1usize..80,
        max_message in 128usize..300,
        over in 1usize..100,
    ) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for m in &before {
            let mut m = m.clone();
            m.binary = true;
            m.payload.truncate(max_message);
            encode(&m, deflate, &mut wire);
            expected.push((true, m.payload));
        }
        let mut big = big;
        big.binary = true;
        big.payload.resize(max_message + over, b'z');
        encode(&big, deflate, &mut wire);
        let got = read_all(wire, chunk, max_message, deflate);
        prop_assert_eq!(got.messages, expected);
        prop_assert!(
            matches!(refusal(&got.end), Some(GuardError::MessageTooBig { .. })),
            "ended with {:?}", got.end
        );
    }
}

// --- examples and regressions ------------------------------------------------------------------

#[test]
fn frame_reader_example_compressed_and_fragmented() {
    // The shape of fuzz/seeds/frame_reader/compressed_fragmented.bin, as a plain test.
    let text = br#"{"type":"publish","topic":"t","data":{"text":"hello hello hello"}}"#;
    let c = compress(text, 6);
    let mut wire = masked_frame(false, true, 0x1, &c[..5], [1, 2, 3, 4]);
    wire.extend(masked_frame(true, false, 0x9, b"p", [0; 4]));
    wire.extend(masked_frame(true, false, 0x0, &c[5..], [9, 9, 9, 9]));
    let got = read_all(wire, 3, 1000, true);
    assert_eq!(got.messages, vec![(false, text.to_vec())]);
    assert_eq!(got.pings, vec![b"p".to_vec()]);
}

/// Found by `frame_reader_refuses_messages_over_the_limit`: when a refused frame header arrived
/// split across reads, the guard handed all of it up, so fastwebsockets read the refused frame:
/// an empty one as a message (here an unmasked empty text frame became a message before the
/// refusal), a long one refused by its own check (`FrameTooLarge`) instead of the guard's.
#[test]
fn regression_refused_header_split_across_reads() {
    let got = read_all(vec![0x81, 0x00], 1, 1000, false);
    assert_eq!(got.messages, Vec::<(bool, Vec<u8>)>::new());
    assert_eq!(refusal(&got.end), Some(&GuardError::Unmasked));

    let mut wire = masked_frame(true, false, 0x1, b"ok", [1, 2, 3, 4]);
    wire.extend(masked_frame(true, false, 0x2, &[0; 300], [1, 2, 3, 4]));
    for deflate in [false, true] {
        let got = read_all(wire.clone(), 5, 200, deflate);
        assert_eq!(got.messages, vec![(false, b"ok".to_vec())]);
        assert_eq!(
            refusal(&got.end),
            Some(&GuardError::MessageTooBig {
                size: 300,
                max: 200
            }),
            "deflate {deflate}: {:?}",
            got.end
        );
    }
}

/// Found by the `frame_reader` fuzz target (fuzz/seeds/frame_reader/regression_huge_continuation.bin
/// is the minimised input): a continuation of a compressed message claiming nearly `u64::MAX`
/// bytes overflowed the guard's running size (a panic; in release, a wrapped size that passed
/// the limit and let the guard capture without bound).
#[test]
fn regression_huge_continuation_of_a_compressed_message() {
    let mut wire = masked_frame(false, true, 0x1, b"abcde", [0, 0, 0xe0, 0x51]);
    wire.extend([0x80, 0xFF]);
    wire.extend(u64::MAX.to_be_bytes());
    wire.extend([0xcf, 0x65, 0x5d, 0x57]);
    wire.extend([0x55; 100]);
    let got = read_all(wire, 7, 65_536, true);
    assert_eq!(got.messages, Vec::<(bool, Vec<u8>)>::new());
    assert!(
        matches!(
            refusal(&got.end),
            Some(GuardError::MessageTooBig { max: 65_536, .. })
        ),
        "{:?}",
        got.end
    );
}
