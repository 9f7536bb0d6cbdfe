//! Subscription filters and conflation intervals.
//!
//! `filters` in a subscribe request is either per topic (`{"routes":{"status":["ACTIVE"]}}`) or
//! flat for every listed topic (`{"level":["warning","critical"]}`). A publication passes a filter
//! when each filtered field of its `data` holds one of the listed values. The key `interval`
//! (milliseconds) is not a field: it asks for conflation, at most one message per interval with
//! the latest winning.
//!
//! Filters are evaluated against a simd-json borrowed tree of the publication's `data`, parsed
//! once per publication by the hub: for full trees simd-json measured about twice as fast as
//! serde_json here (shared/CRATE-NOTES.md).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Number, Value};
use simd_json::{BorrowedValue, StaticNode};

/// Field conditions on a publication's `data`; all must hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    fields: Vec<(String, Vec<Value>)>,
}

/// What one subscription asks for beyond the topic itself.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionOptions {
    pub filter: Option<Arc<Filter>>,
    pub interval: Option<Duration>,
}

/// Why a `filters` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid filters: {0}")]
pub struct FilterError(pub String);

impl Filter {
    /// Whether `data` passes. A field path may be dotted (`a.b`) to reach into nested objects;
    /// a field that holds an array passes when any element is listed.
    pub fn matches(&self, data: &BorrowedValue<'_>) -> bool {
        self.fields
            .iter()
            .all(|(path, allowed)| match lookup(data, path) {
                Some(BorrowedValue::Array(items)) => items.iter().any(|v| is_listed(allowed, v)),
                Some(v) => is_listed(allowed, v),
                None => false,
            })
    }
}

fn field<'a, 'v>(data: &'a BorrowedValue<'v>, key: &str) -> Option<&'a BorrowedValue<'v>> {
    match data {
        BorrowedValue::Object(map) => map.get(key),
        _ => None,
    }
}

fn lookup<'a, 'v>(data: &'a BorrowedValue<'v>, path: &str) -> Option<&'a BorrowedValue<'v>> {
    if let Some(v) = field(data, path) {
        return Some(v);
    }
    path.split('.').try_fold(data, |v, key| field(v, key))
}

fn is_listed(allowed: &[Value], v: &BorrowedValue<'_>) -> bool {
    allowed.iter().any(|a| scalar_eq(a, v))
}

/// JSON equality of a listed scalar and a data scalar (1 and 1.0 are equal, as in JSON).
fn scalar_eq(listed: &Value, v: &BorrowedValue<'_>) -> bool {
    match (listed, v) {
        (Value::Null, BorrowedValue::Static(StaticNode::Null)) => true,
        (Value::Bool(a), BorrowedValue::Static(StaticNode::Bool(b))) => a == b,
        (Value::String(a), BorrowedValue::String(b)) => a == b,
        (Value::Number(a), BorrowedValue::Static(n)) => number_eq(a, n),
        _ => false,
    }
}

fn number_eq(a: &Number, n: &StaticNode) -> bool {
    match *n {
        StaticNode::I64(i) => a.as_i64().map_or(a.as_f64() == Some(i as f64), |x| x == i),
        StaticNode::U64(u) => a.as_u64().map_or(a.as_f64() == Some(u as f64), |x| x == u),
        StaticNode::F64(f) => a.as_f64() == Some(f),
        _ => false,
    }
}

/// Builds the options of one filter object (`{"status":[..], "interval": 5000}`).
fn options_from_object(
    obj: &Map<String, Value>,
    default_interval: Option<Duration>,
) -> Result<SubscriptionOptions, FilterError> {
    let mut fields = Vec::new();
    let mut interval = default_interval;
    for (key, value) in obj {
        if key == "interval" {
            let ms = value.as_u64().ok_or_else(|| {
                FilterError(format!("`interval` must be milliseconds, got {value}"))
            })?;
            interval = (ms > 0).then(|| Duration::from_millis(ms));
            continue;
        }
        let allowed = match value {
            Value::Array(items) => {
                if let Some(bad) = items.iter().find(|v| v.is_object() || v.is_array()) {
                    return Err(FilterError(format!(
                        "values of `{key}` must be strings, numbers, booleans or null, got {bad}"
                    )));
                }
                items.clone()
            }
            Value::Object(_) => {
                return Err(FilterError(format!(
                    "`{key}` must be a value or a list of values, not an object"
                )))
            }
            scalar => vec![scalar.clone()],
        };
        fields.push((key.clone(), allowed));
    }
    Ok(SubscriptionOptions {
        filter: (!fields.is_empty()).then(|| Arc::new(Filter { fields })),
        interval,
    })
}

/// Resolves a subscribe request's `filters` (and a request-wide `interval`, in ms) into options
/// per topic. Per-topic form is recognised when every key names a requested topic and every
/// value is an object; otherwise the object is one flat filter for all topics.
pub fn options_per_topic(
    filters: Option<&Value>,
    topics: &[String],
    interval_ms: Option<u64>,
) -> Result<HashMap<String, SubscriptionOptions>, FilterError> {
    let default_interval = interval_ms.filter(|ms| *ms > 0).map(Duration::from_millis);
    let empty = Map::new();
    let obj = match filters {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(obj)) => obj,
        Some(other) => {
            return Err(FilterError(format!(
                "`filters` must be an object, got {other}"
            )));
        }
    };
    let per_topic = !obj.is_empty()
        && obj
            .iter()
            .all(|(k, v)| v.is_object() && topics.iter().any(|t| t == k));
    let mut out = HashMap::with_capacity(topics.len());
    if per_topic {
        for topic in topics {
            let options = match obj.get(topic) {
                Some(Value::Object(f)) => options_from_object(f, default_interval)?,
                _ => SubscriptionOptions {
                    filter: None,
                    interval: default_interval,
                },
            };
            out.insert(topic.clone(), options);
        }
    } else {
        let shared = options_from_object(obj, default_interval)?;
        for topic in topics {
            out.insert(topic.clone(), shared.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Parses test data the way the hub does.
    fn tree(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn passes(filter: &Filter, data: Value) -> bool {
        let mut bytes = tree(data);
        let value = simd_json::to_borrowed_value(&mut bytes).expect("test data is JSON");
        filter.matches(&value)
    }

    fn topics(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn per_topic_form() {
        let f = json!({"routes": {"status": ["ACTIVE", "PENDING"]}, "metrics": {"interval": 5000}});
        let o = options_per_topic(Some(&f), &topics(&["routes", "metrics"]), None).expect("ok");
        let routes = o["routes"].filter.as_ref().expect("routes filtered");
        assert!(passes(routes, json!({"status": "ACTIVE"})));
        assert!(!passes(routes, json!({"status": "DELETED"})));
        assert!(!passes(routes, json!({})));
        assert!(o["metrics"].filter.is_none());
        assert_eq!(o["metrics"].interval, Some(Duration::from_millis(5000)));
    }

    #[test]
    fn flat_form_applies_to_every_topic() {
        let f = json!({"level": ["warning", "critical"]});
        let o =
            options_per_topic(Some(&f), &topics(&["alert.cpu", "alert.mem"]), None).expect("ok");
        for t in ["alert.cpu", "alert.mem"] {
            let filter = o[t].filter.as_ref().expect("filtered");
            assert!(passes(filter, json!({"level": "critical"})));
            assert!(!passes(filter, json!({"level": "info"})));
        }
    }

    #[test]
    fn nested_paths_arrays_and_scalars() {
        let f = json!({"a.b": 1, "tags": ["x"]});
        let o = options_per_topic(Some(&f), &topics(&["t"]), None).expect("ok");
        let filter = o["t"].filter.as_ref().expect("filtered");
        assert!(passes(filter, json!({"a": {"b": 1}, "tags": ["y", "x"]})));
        assert!(!passes(filter, json!({"a": {"b": 2}, "tags": ["x"]})));
    }

    #[test]
    fn bad_shapes_are_refused() {
        let t = topics(&["t"]);
        assert!(options_per_topic(Some(&json!([1])), &t, None).is_err());
        assert!(options_per_topic(Some(&json!({"a": {"b": 1}})), &t, None).is_err());
        assert!(options_per_topic(Some(&json!({"interval": "fast"})), &t, None).is_err());
    }
}
