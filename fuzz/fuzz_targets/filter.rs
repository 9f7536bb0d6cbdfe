//! Fuzzes subscription filters: `wsgate::protocol::filter::options_per_topic` on arbitrary
//! `filters` JSON, topic lists and request-wide intervals, then `Filter::matches` of every
//! resulting filter against arbitrary publication data parsed by simd-json (as the hub does).
//!
//! The input is text, one part per line (so seeds stay readable):
//! 1. the `filters` value as JSON (an empty line means no `filters`);
//! 2. the topics, separated by `,`;
//! 3. the request-wide `interval` in milliseconds (empty or not a number: none);
//! 4. and every further line: one publication's `data`, as JSON for simd-json.
//!
//! Checks: nothing panics (simd-json included, on arbitrary bytes); an accepted `filters` yields
//! options for exactly the requested topics; a filter's clone gives the same answer on the same
//! data; without `filters` there is no filter and the interval is the request-wide one. Whether
//! the answers are right is what the reference model in `tests/parsers_proptest.rs` checks.

#![no_main]

use std::collections::HashSet;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsgate::protocol::filter::options_per_topic;

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|b| *b == b'\n');
    let filters_line = lines.next().unwrap_or_default();
    let filters: Option<Value> = if filters_line.is_empty() {
        None
    } else {
        match serde_json::from_slice(filters_line) {
            Ok(v) => Some(v),
            Err(_) => return,
        }
    };
    let topics: Vec<String> = String::from_utf8_lossy(lines.next().unwrap_or_default())
        .split(',')
        .map(str::to_owned)
        .collect();
    let interval_ms = std::str::from_utf8(lines.next().unwrap_or_default())
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());

    let Ok(options) = options_per_topic(filters.as_ref(), &topics, interval_ms) else {
        return;
    };
    let wanted: HashSet<&String> = topics.iter().collect();
    let got: HashSet<&String> = options.keys().collect();
    assert_eq!(got, wanted, "options for other topics than requested");
    if matches!(filters, None | Some(Value::Null)) {
        let interval = interval_ms.filter(|ms| *ms > 0).map(Duration::from_millis);
        for o in options.values() {
            assert!(o.filter.is_none(), "a filter without `filters`");
            assert_eq!(o.interval, interval, "interval without `filters`");
        }
    }

    let filters: Vec<_> = options.values().filter_map(|o| o.filter.clone()).collect();
    for line in lines {
        let mut bytes = line.to_vec();
        let Ok(value) = simd_json::to_borrowed_value(&mut bytes) else {
            continue;
        };
        for filter in &filters {
            let first = filter.matches(&value);
            let copy = (**filter).clone();
            assert_eq!(copy.matches(&value), first, "matching is not deterministic");
        }
    }
});
