//! Helpers shared by the benches (each bench uses some of them).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::value::RawValue;
use wsgate::hub::{Connection, DeflateParams, Hub};
use wsgate::ws::writer::Outbound;

/// Whether this is a `--bench` run (not `cargo test`'s quick check of bench targets) whose name
/// filter, if any, can select the benchmark `id`: such runs also print a plain-loop summary.
pub fn run_selects(id: &str) -> bool {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|a| a == "--bench") {
        return false;
    }
    // Positional words that are not option values (numbers) act as name filters.
    let words: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .collect();
    words.is_empty() || words.iter().any(|w| id.contains(w.as_str()))
}

/// A 1001-byte publication `data`: a route update, realistic nested JSON.
pub const ROUTE_UPDATE_1001B: &str = concat!(
    r#"{"type":"route_update","routeId":"rt-5f2c9a0e","status":"ACTIVE","version":42"#,
    r#","updatedAt":"2026-11-23T10:15:32.123Z","driver":{"id":"drv-1093""#,
    r#","name":"Ana M\u00fcller","vehicle":{"plate":"B-WS 4711","model":"eSprinter""#,
    r#","capacityKg":1200,"electric":true}},"stops":[{"seq":1,"id":"st-001","name":"Depot Nord""#,
    r#","lat":52.5561,"lon":13.3472,"eta":"2026-11-23T10:30:00Z","status":"DONE","parcels":12}"#,
    r#",{"seq":2,"id":"st-002","name":"Friedrichstra\u00dfe 44","lat":52.5079,"lon":13.3904"#,
    r#","eta":"2026-11-23T10:52:00Z","status":"DONE","parcels":3},{"seq":3,"id":"st-003""#,
    r#","name":"Alexanderplatz 1","lat":52.5219,"lon":13.4132,"eta":"2026-11-23T11:10:00Z""#,
    r#","status":"PENDING","parcels":5},{"seq":4,"id":"st-004","name":"Warschauer Str. 70""#,
    r#","lat":52.5058,"lon":13.4491,"eta":"2026-11-23T11:34:00Z","status":"PENDING""#,
    r#","parcels":1}],"tags":["express","cold-chain","priority:high","zone:mitte"]"#,
    r#","metrics":{"distanceKm":38.7,"durationMin":95,"onTimeRate":0.97"#,
    r#","delays":[{"stop":"st-002","minutes":4,"reason":"traffic"}]}}"#,
);

/// A 101-byte publication `data` (`status` is what filters look at).
pub const DATA_101B: &str = r#"{"status":"ACTIVE","routeId":"rt-5f2c9a0e","driver":"drv-1093","eta":"2026-11-23T11:10:00Z","stop":3}"#;

/// `json` as the raw JSON value a publication carries.
pub fn raw(json: &str) -> Box<RawValue> {
    RawValue::from_string(json.to_owned()).expect("valid JSON")
}

/// Connection number `i` of a bench hub (not registered yet): user `user-i`, a send queue that
/// never overflows (nothing drains it in most benches), and `deflate` as negotiated.
pub fn connection(hub: &Hub, i: usize, deflate: Option<DeflateParams>) -> Arc<Connection> {
    Arc::new(Connection {
        id: hub.next_conn_id(),
        client_id: Arc::from(format!("client-{i}")),
        user_id: Some(Arc::from(format!("user-{i}"))),
        outbound: Outbound::new(1 << 40),
        connected_at: SystemTime::now(),
        deflate,
    })
}
