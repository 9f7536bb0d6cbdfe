//! Every metric name in one place, the Prometheus recorder, and `GET /metrics`.
//!
//! Counters are incremented where things happen (once per publication or connection event, never
//! per delivery inside the fan-out loop); gauges that mirror state (connections, Redis health)
//! are set when `/metrics` is scraped, from the node's own state, so they can never drift.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::node::NodeContext;

/// Connections accepted (upgrade completed and admitted).
pub const CONNECTIONS_OPENED: &str = "wsgate_connections_opened_total";
/// Connections refused; label `reason`: `unauthorized`, `full`, `per_user` (after the upgrade),
/// `per_ip_rate`, `per_ip` (an HTTP 429 before it).
pub const CONNECTIONS_REFUSED: &str = "wsgate_connections_refused_total";
/// Connections the server closed on purpose (limits, protocol errors, idle); label `code`.
pub const CONNECTIONS_CLOSED: &str = "wsgate_connections_closed_total";
/// Client messages received (complete messages, after reassembly).
pub const MESSAGES_RECEIVED: &str = "wsgate_messages_received_total";
/// Publications fanned out by this node (local or from Redis).
pub const PUBLICATIONS: &str = "wsgate_publications_total";
/// Frames queued to local subscribers by fan-out.
pub const DELIVERIES: &str = "wsgate_deliveries_total";
/// Connections cut off because their send queue passed its bound.
pub const SLOW_CONSUMERS: &str = "wsgate_slow_consumers_total";
/// Counter: `requireAck` publications queued again because no `ack` came within `ack_timeout`.
pub const ACK_RESENDS: &str = "wsgate_ack_resends_total";
/// Counter: `requireAck` publications given up without an `ack`; label `reason`: `retries`
/// (every re-send went unacknowledged) or `overflow` (the connection owed too many).
pub const ACK_GIVEN_UP: &str = "wsgate_ack_given_up_total";
/// `requireAck` publications local connections have not acknowledged yet (gauge).
pub const ACK_PENDING: &str = "wsgate_ack_pending";
/// Live connections on this node (gauge).
pub const CONNECTIONS: &str = "wsgate_connections";
/// This node's connection limit right now (its cluster reservation with Redis) (gauge).
pub const CONNECTION_LIMIT: &str = "wsgate_connection_limit";
/// 1 while the broker can carry messages (Redis reachable and subscribed), else 0 (gauge).
pub const BROKER_READY: &str = "wsgate_broker_ready";
/// Reconnects of the Redis subscription connections since start (gauge of a running count).
pub const REDIS_RECONNECTS: &str = "wsgate_redis_reconnects";
/// Redis channels this node is subscribed to (gauge).
pub const REDIS_CHANNELS: &str = "wsgate_redis_subscribed_channels";
/// Counter: publications this node fetched from history to fill a gap in a topic's live stream
/// (after a lost Redis subscription).
pub const HISTORY_BACKFILLED: &str = "wsgate_history_backfilled_total";
/// Counter: live publications dropped because this node had already delivered them.
pub const DUPLICATES_DROPPED: &str = "wsgate_duplicate_publications_dropped_total";
/// Counter: gaps in a topic's live stream that history could not fill (trimmed or unreachable).
pub const HISTORY_GAPS_UNFILLED: &str = "wsgate_history_gaps_unfilled_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on first use (several nodes in one process, as
/// in tests, share it). `None` when another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                // Histograms and summaries need periodic upkeep; counters and gauges do not,
                // but keep the exporter's contract.
                let upkeep = handle.clone();
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    rt.spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(5));
                        loop {
                            tick.tick().await;
                            upkeep.run_upkeep();
                        }
                    });
                }
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        })
        .as_ref()
}

/// The Prometheus text exposition for this node.
pub fn render(ctx: &NodeContext) -> String {
    let Some(handle) = handle() else {
        return String::new();
    };
    let node = ctx.settings.node_id.clone();
    let diag = ctx.broker.diagnostics();
    metrics::gauge!(CONNECTIONS, "node" => node.clone()).set(ctx.hub.connection_count() as f64);
    metrics::gauge!(ACK_PENDING, "node" => node.clone()).set(ctx.hub.acks().pending_total() as f64);
    metrics::gauge!(CONNECTION_LIMIT, "node" => node.clone()).set(ctx.slots.limit() as f64);
    metrics::gauge!(BROKER_READY, "node" => node.clone()).set(if diag.ready { 1.0 } else { 0.0 });
    metrics::gauge!(REDIS_RECONNECTS, "node" => node.clone()).set(diag.reconnects as f64);
    metrics::gauge!(REDIS_CHANNELS, "node" => node).set(diag.subscribed_channels as f64);
    handle.render()
}
