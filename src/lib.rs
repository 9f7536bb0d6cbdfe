//! wsgate: a horizontally scaled WebSocket gateway.
//!
//! The path of a publication, by module:
//! - it arrives from `http::api` (backend HTTP), `ws::session` (a client `publish` or direct
//!   message), or a cluster broker;
//! - `broker` decides who in the cluster gets it (`broker::memory` is the one-node default);
//! - `hub::publication` encodes it once into complete WebSocket frame bytes;
//! - `hub` looks up the local subscribers (sharded index, filters, conflation) and queues the
//!   same bytes to each;
//! - `ws::writer` drains each connection's byte-bounded queue with vectored writes.
//!
//! `history` holds topic history (positions, pages, the in-memory ring); `protocol` holds the wire format (envelope, codes, filters, topic rules), `config` the
//! settings, `auth` identity and API access, `limits` rate limiting and admission, `metrics` the
//! Prometheus names and hot-path counters, `sys` the `$sys.metrics` / `$sys.health` snapshots,
//! `node` the wiring and shutdown, and `runtime` the tokio runtime (worker threads, CPU pinning).

pub mod auth;
pub mod broker;
pub mod config;
pub mod history;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod runtime;
pub mod sys;
pub mod ws;
