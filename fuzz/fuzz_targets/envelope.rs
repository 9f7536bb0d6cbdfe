//! Fuzzes the client envelope parser, `wsgate::protocol::envelope::{Inbound::parse,
//! request_id_of}`, with arbitrary UTF-8 text (what a client can put in a text frame).
//!
//! Checks:
//! - neither function panics, whatever the text;
//! - a parsed envelope has a non-empty `kind()`;
//! - `request_id()` agrees with `request_id_of` on the same text (the id a refusal carries is the
//!   id a reply would carry);
//! - where serde_json can also read the text as a value tree, the accessors agree with it: `kind`
//!   is the `type` string, `request_id` is `id` or else `messageId`, `payload` is `data` or else
//!   `content`, and `topic` / `to` are those strings (a JSON `null` counts as absent);
//! - text that is not a JSON object is never accepted.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use serde_json::Value;
use wsgate::protocol::envelope::{request_id_of, Inbound};

/// The first of `keys` present in `obj` with a non-null value.
fn first_present<'a>(obj: &'a serde_json::Map<String, Value>, keys: &[&str]) -> Option<&'a Value> {
    keys.iter()
        .filter_map(|k| obj.get(*k))
        .find(|v| !v.is_null())
}

/// The value a borrowed raw JSON fragment stands for.
fn tree(raw: Option<&RawValue>) -> Option<Value> {
    raw.map(|r| serde_json::from_str(r.get()).expect("a RawValue is valid JSON"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let id_alone = request_id_of(text).map(RawValue::get);
    let Ok(msg) = Inbound::parse(text) else {
        return;
    };
    assert!(!msg.kind().is_empty(), "accepted an empty type: {text:?}");
    assert_eq!(
        msg.request_id().map(RawValue::get),
        id_alone,
        "request_id and request_id_of disagree on {text:?}"
    );

    // The value tree can fail where the borrowing parse does not (numbers out of f64 range
    // inside a RawValue); only compare when both read the text.
    let Ok(value) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let Value::Object(obj) = &value else {
        panic!("accepted a message that is not a JSON object: {text:?}");
    };
    assert_eq!(
        obj.get("type").and_then(Value::as_str),
        Some(msg.kind()),
        "kind of {text:?}"
    );
    assert_eq!(
        tree(msg.request_id()).as_ref(),
        first_present(obj, &["id", "messageId"]),
        "request id of {text:?}"
    );
    assert_eq!(
        tree(msg.payload()).as_ref(),
        first_present(obj, &["data", "content"]),
        "payload of {text:?}"
    );
    assert_eq!(
        msg.topic.as_deref(),
        first_present(obj, &["topic"]).and_then(Value::as_str),
        "topic of {text:?}"
    );
    assert_eq!(
        msg.to.as_deref(),
        first_present(obj, &["to"]).and_then(Value::as_str),
        "to of {text:?}"
    );
});
