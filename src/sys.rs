//! The gateway's own topics: every node publishes a snapshot of itself to `$sys.metrics` (as a
//! `metrics` message) and `$sys.health` (as a `health_update` message) every `sys.interval`, in
//! the shapes of the gateway admin API's messages of those names, so a dashboard follows the
//! whole cluster over one WebSocket (the status page at `GET /status` does).
//!
//! The snapshots go through the broker like any publication, so a subscriber on any node gets
//! every node's (each carries `node`); a subscription's filters and `interval` apply as usual.
//! Should the broker refuse (Redis unreachable), the snapshot is still delivered to this node's
//! own subscribers, so a dashboard connected to a node cut off from Redis sees why.
//! History follows `default_namespace` like every topic without a namespace (the last 100
//! snapshots of all nodes together, none older than 5 minutes, by default).
//!
//! Figures are the process's counters (see `crate::metrics`; one node per process in a
//! deployment) and rates over the last interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::{to_raw_value, RawValue};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::broker::TopicMessage;
use crate::hub::Publication;
use crate::metrics::{LatencySnapshot, LatencySummary, Received, Sent, TRAFFIC};
use crate::node::NodeContext;
use crate::protocol::envelope::now_rfc3339;
use crate::protocol::topic::{SYS_HEALTH, SYS_METRICS};

/// How long one snapshot may wait for the cluster's node list.
const CLUSTER_STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// Publishes this node's snapshots every `sys.interval` (never when it is zero) until `stop`
/// turns true or its sender is dropped.
pub async fn publish_loop(ctx: Arc<NodeContext>, mut stop: watch::Receiver<bool>) {
    let period = ctx.settings.sys.interval;
    if period.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sampler = Sampler::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        let metrics = sampler.metrics(&ctx);
        publish(&ctx, SYS_METRICS, "metrics", &metrics).await;
        let health = health(&ctx).await;
        publish(&ctx, SYS_HEALTH, "health_update", &health).await;
    }
}

/// Publishes one snapshot through the broker, or to local subscribers only when the broker
/// cannot take it.
async fn publish(ctx: &NodeContext, topic: &str, kind: &str, data: &impl Serialize) {
    let data: Box<RawValue> = match to_raw_value(data) {
        Ok(raw) => raw,
        Err(e) => {
            tracing::warn!(topic, error = %e, "snapshot not encoded");
            return;
        }
    };
    let local_copy = (ctx.hub.subscriber_count(topic) > 0).then(|| data.clone());
    if let Err(e) = ctx
        .broker
        .publish(TopicMessage::new(topic, kind, data))
        .await
    {
        tracing::debug!(topic, error = %e, "snapshot not published; delivered locally only");
        if let Some(data) = local_copy {
            ctx.hub
                .deliver(&Publication::encode_unsequenced(topic, kind, &data));
        }
    }
}

/// The counters at one moment, to turn totals into rates.
struct Sample {
    at: Instant,
    received: u64,
    sent: u64,
    publications: u64,
    received_bytes: u64,
    sent_bytes: u64,
    opened: u64,
    cpu_seconds: Option<f64>,
    latency: LatencySnapshot,
}

impl Sample {
    fn now() -> Self {
        Sample {
            at: Instant::now(),
            received: TRAFFIC.received_total(),
            sent: TRAFFIC.sent_total(),
            publications: TRAFFIC.publications.get(),
            received_bytes: TRAFFIC.received_bytes.get(),
            sent_bytes: TRAFFIC.sent_bytes.get(),
            opened: TRAFFIC.connections_opened.get(),
            cpu_seconds: process::cpu_seconds(),
            latency: TRAFFIC.fanout_latency.snapshot(),
        }
    }
}

/// Remembers the previous snapshot's counters.
struct Sampler {
    last: Sample,
}

impl Sampler {
    fn new() -> Self {
        Sampler {
            last: Sample::now(),
        }
    }

    /// The `data` of a `metrics` message: the admin API's `{timestamp, metrics: {requests,
    /// response_time, system}}` with the gateway's own groups next to them.
    fn metrics(&mut self, ctx: &NodeContext) -> Value {
        let now = Sample::now();
        let secs = now.at.duration_since(self.last.at).as_secs_f64();
        let rate = |new: u64, old: u64| {
            if secs > 0.0 {
                round2(new.saturating_sub(old) as f64 / secs)
            } else {
                0.0
            }
        };
        let latency: LatencySummary = now.latency.since(&self.last.latency);
        let errors = TRAFFIC.sent_count(Sent::Error);
        let (queued, largest) = ctx.hub.send_queue_bytes();
        let cpu_usage = match (now.cpu_seconds, self.last.cpu_seconds) {
            (Some(new), Some(old)) if secs > 0.0 => Some(round2(
                (new - old).max(0.0) / secs / process::cores() * 100.0,
            )),
            _ => None,
        };
        let memory = process::memory();
        let data = json!({
            "node": ctx.settings.node_id,
            "timestamp": now_rfc3339(),
            "uptime_seconds": ctx.started_at.elapsed().as_secs(),
            "interval_ms": ctx.settings.sys.interval.as_millis() as u64,
            "metrics": {
                // Client messages: received, refused with an `error`, per second.
                "requests": {
                    "total": now.received,
                    "success": now.received.saturating_sub(errors),
                    "error": errors,
                    "rate": rate(now.received, self.last.received),
                },
                // Fan-out latency over the last interval, in milliseconds.
                "response_time": {
                    "avg": round2(latency.avg),
                    "p50": latency.p50,
                    "p95": latency.p95,
                    "p99": latency.p99,
                    "max": latency.max,
                    "samples": latency.count,
                },
                "connections": {
                    "active": ctx.hub.connection_count(),
                    "limit": ctx.slots.limit(),
                    "opened": now.opened,
                    "closed": TRAFFIC.connections_closed.get(),
                    "rate": rate(now.opened, self.last.opened),
                },
                "messages": {
                    "in": now.received,
                    "out": now.sent,
                    "in_rate": rate(now.received, self.last.received),
                    "out_rate": rate(now.sent, self.last.sent),
                    "publications": now.publications,
                    "publication_rate": rate(now.publications, self.last.publications),
                    "by_type_in": by_type_in(),
                },
                "bytes": {
                    "in": now.received_bytes,
                    "out": now.sent_bytes,
                    "in_rate": rate(now.received_bytes, self.last.received_bytes),
                    "out_rate": rate(now.sent_bytes, self.last.sent_bytes),
                    "in_uncompressed": TRAFFIC.received_payload_bytes.get(),
                    "out_uncompressed": TRAFFIC.sent_payload_bytes.get(),
                },
                "queues": {
                    "bytes": queued,
                    "largest_bytes": largest,
                    "slow_consumers": TRAFFIC.slow_consumers.get(),
                },
                "topics": { "active": ctx.hub.topic_count() },
                "users": { "online": ctx.hub.user_count() },
                "system": {
                    "cpu_usage": cpu_usage,
                    "memory_usage": memory.map(|(rss, total)| round2(rss as f64 / total as f64 * 100.0)),
                    "memory_bytes": memory.map(|(rss, _)| rss),
                    "cpu_cores": process::cores(),
                },
            },
        });
        self.last = now;
        data
    }
}

/// Received messages by type, the types seen so far only.
fn by_type_in() -> Value {
    let map: serde_json::Map<String, Value> = Received::ALL
        .iter()
        .map(|k| (k.label(), TRAFFIC.received_count(*k)))
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), json!(n)))
        .collect();
    Value::Object(map)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The `data` of a `health_update` message: the admin API's `{status, components: {NAME:
/// {status, details}}}`. `status` is `UP`, `DOWN` (the broker cannot carry messages: Redis
/// unreachable) or `OUT_OF_SERVICE` (draining or shutting down: not taking connections).
async fn health(ctx: &NodeContext) -> Value {
    let diag = ctx.broker.diagnostics();
    let shutting_down = ctx.is_shutting_down();
    let up = |ok: bool| if ok { "UP" } else { "DOWN" };
    let (queued, largest) = ctx.hub.send_queue_bytes();
    let status = if shutting_down {
        "OUT_OF_SERVICE"
    } else {
        up(diag.ready)
    };
    let mut data = json!({
        "node": ctx.settings.node_id,
        "timestamp": now_rfc3339(),
        "status": status,
        "components": {
            "broker": {
                "status": up(diag.ready),
                "details": {
                    "type": ctx.broker.name(),
                    "ready": diag.ready,
                    "reconnects": diag.reconnects,
                    "subscribedChannels": diag.subscribed_channels,
                },
            },
            "connections": {
                "status": if shutting_down { "OUT_OF_SERVICE" } else { "UP" },
                "details": {
                    "active": ctx.hub.connection_count(),
                    "limit": ctx.slots.limit(),
                    "maxConnections": ctx.settings.ws.max_connections,
                    "acceptingConnections": !shutting_down,
                },
            },
            "sendQueues": {
                "status": "UP",
                "details": {
                    "queuedBytes": queued,
                    "largestQueueBytes": largest,
                    "slowConsumers": TRAFFIC.slow_consumers.get(),
                },
            },
        },
    });
    // Which nodes are alive and how many connections each holds (from Redis with a cluster).
    if let Ok(Ok(nodes)) =
        tokio::time::timeout(CLUSTER_STATUS_TIMEOUT, ctx.broker.cluster_nodes()).await
    {
        data["cluster"] = json!({
            "onlineCount": nodes.iter().map(|n| n.connections).sum::<usize>(),
            "nodes": nodes,
        });
    }
    data
}

/// CPU time and memory of this process, from `/proc` (Linux); `None` elsewhere.
mod process {
    /// CPU seconds (user + system) used by this process so far.
    pub fn cpu_seconds() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the command name (which may hold spaces) start after the last ')'.
        let rest = stat.get(stat.rfind(')')? + 2..)?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
        let ticks: f64 =
            fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // USER_HZ is 100 on every Linux the gateway targets.
        Some(ticks / 100.0)
    }

    /// Resident memory of this process and the machine's total memory, in bytes.
    pub fn memory() -> Option<(u64, u64)> {
        let kb = |text: &str, key: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(key))?;
            line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
                .map(|k| k * 1024)
        };
        let rss = kb(
            &std::fs::read_to_string("/proc/self/status").ok()?,
            "VmRSS:",
        )?;
        let total = kb(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal:")?;
        (total > 0).then_some((rss, total))
    }

    pub fn cores() -> f64 {
        std::thread::available_parallelism().map_or(1, |n| n.get()) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::process;

    #[test]
    fn process_figures_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(process::cpu_seconds().is_some_and(|s| s >= 0.0));
            let (rss, total) = process::memory().expect("memory figures");
            assert!(rss > 0 && total > rss);
        }
        assert!(process::cores() >= 1.0);
    }
}
