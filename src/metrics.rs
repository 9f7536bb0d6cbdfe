//! Every metric name in one place, the Prometheus recorder, the hot-path counters, and
//! `GET /metrics`.
//!
//! # Cost on the hot path
//!
//! The figures that move on every message or socket read/write (messages in and out by type,
//! bytes in and out, publications, slow consumers, connects) are plain process-wide atomics
//! ([`Traffic`]), each on a cache line of its own, with their label (a `type` such as
//! `publication` or `ping`) chosen from a fixed enum: an increment is one relaxed `fetch_add`,
//! with no registry lookup, no allocation and no lock. Fan-out adds them up once per
//! publication, never inside its per-recipient loop. A scrape copies them into the Prometheus
//! recorder (`Counter::absolute`); the `$sys.metrics` snapshots read the same atomics.
//!
//! Rare events (refusals, closes by reason and code, `requireAck` give-ups, Redis errors) go
//! straight through the `metrics` facade with static labels. Gauges that mirror state
//! (connections, queued bytes, Redis health) are set at scrape time from the node's own state,
//! so they can never drift; they carry a `node` label because several nodes may share one
//! process (tests do), while the counters are process-wide (one node per process in a
//! deployment; Prometheus adds `instance`).
//!
//! # Fan-out latency
//!
//! `wsgate_fanout_latency_seconds` is the time from a publication reaching this node (the HTTP
//! or client publish with the in-process broker, the message arriving from Redis with a cluster
//! broker: when it is encoded into its frame) to the moment the writer task of one of its
//! recipients has handed that frame to the kernel. Measuring every recipient would cost a clock
//! read and a histogram record per delivery, so it is sampled: one probe per publication, put on
//! the last recipient the fan-out loop queued it to (the one that waited longest for the loop),
//! and recorded when that connection's writer gets past the frame's last byte. A recipient that
//! already carries an unfinished probe is not probed again, so a backed-up connection does not
//! turn into a stream of samples. Publications with no directly queued recipient (conflated or
//! recovering subscriptions only) are not sampled.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use metrics::Unit;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncRead, ReadBuf};

use crate::node::NodeContext;

/// Counter: connections accepted (upgrade completed and admitted).
pub const CONNECTIONS_OPENED: &str = "wsgate_connections_opened_total";
/// Counter: connections refused; label `reason`: `unauthorized`, `full`, `per_user` (after the
/// upgrade, with an `error` message and a close code), `per_ip_rate`, `per_ip` (HTTP 429 before
/// it), `origin` (HTTP 403), `shutting_down` (HTTP 503), `bad_request` (HTTP 400: not a valid
/// upgrade, or a `clientId` too long).
pub const CONNECTIONS_REFUSED: &str = "wsgate_connections_refused_total";
/// Counter: admitted connections that ended; labels `reason` (`client`: the client sent a close
/// frame; `server`: the server closed it on purpose, a limit, a protocol error, an operator,
/// shutdown; `lost`: no close handshake, the peer vanished or a write failed) and `code` (the
/// close code: the server's, the client's, `1005` for a client close without one, `1006` for
/// `lost`; client codes outside the registered 1000-1015 and the gateway's own are `other`).
pub const CONNECTIONS_CLOSED: &str = "wsgate_connections_closed_total";
/// Counter: complete client messages received, by `type` (see [`Received`]).
pub const MESSAGES_RECEIVED: &str = "wsgate_messages_received_total";
/// Counter: messages queued to clients, by `type` (see [`Sent`]). Re-sends of `requireAck`
/// publications are counted in [`ACK_RESENDS`] instead.
pub const MESSAGES_SENT: &str = "wsgate_messages_sent_total";
/// Counter: bytes read from client sockets after the upgrade: WebSocket frames as they crossed
/// the wire (headers and masks included, compressed payloads compressed).
pub const RECEIVED_BYTES: &str = "wsgate_received_bytes_total";
/// Counter: payload bytes of complete client messages, after inflation (before compression).
pub const RECEIVED_PAYLOAD_BYTES: &str = "wsgate_received_payload_bytes_total";
/// Counter: bytes written to client sockets: frames as they crossed the wire (after
/// compression), control frames included.
pub const SENT_BYTES: &str = "wsgate_sent_bytes_total";
/// Counter: `write`/`writev` calls that put bytes on client sockets. [`SENT_BYTES`] or
/// [`MESSAGES_SENT`] over it is how well writes are batched.
pub const SOCKET_WRITES: &str = "wsgate_socket_writes_total";
/// Counter: payload bytes of the messages counted in [`MESSAGES_SENT`], before compression.
pub const SENT_PAYLOAD_BYTES: &str = "wsgate_sent_payload_bytes_total";
/// Counter: publications fanned out by this node (local or from Redis) to at least one local
/// subscriber.
pub const PUBLICATIONS: &str = "wsgate_publications_total";
/// Counter: frames queued (or handed to conflation, or held during a recovery) for local
/// subscribers by fan-out.
pub const DELIVERIES: &str = "wsgate_deliveries_total";
/// Histogram: publication received by this node to its frame written to a recipient's socket,
/// sampled once per publication (see the module docs).
pub const FANOUT_LATENCY: &str = "wsgate_fanout_latency_seconds";
/// Counter: connections cut off because their send queue passed its bound.
pub const SLOW_CONSUMERS: &str = "wsgate_slow_consumers_total";
/// Counter: `requireAck` publications queued again because no `ack` came within `ack_timeout`.
pub const ACK_RESENDS: &str = "wsgate_ack_resends_total";
/// Counter: `requireAck` publications given up without an `ack`; label `reason`: `retries`
/// (every re-send went unacknowledged) or `overflow` (the connection owed too many).
pub const ACK_GIVEN_UP: &str = "wsgate_ack_given_up_total";
/// Gauge: `requireAck` publications local connections have not acknowledged yet.
pub const ACK_PENDING: &str = "wsgate_ack_pending";
/// Gauge: live connections on this node.
pub const CONNECTIONS: &str = "wsgate_connections";
/// Gauge: this node's connection limit right now (its cluster reservation with Redis).
pub const CONNECTION_LIMIT: &str = "wsgate_connection_limit";
/// Gauge: topics with at least one local subscriber.
pub const TOPICS: &str = "wsgate_topics";
/// Gauge: users with at least one local connection.
pub const USERS: &str = "wsgate_users";
/// Gauge: bytes queued or in flight to this node's connections, all together.
pub const SEND_QUEUE_BYTES: &str = "wsgate_send_queue_bytes";
/// Gauge: the longest send queue of one connection on this node, in bytes.
pub const SEND_QUEUE_LARGEST_BYTES: &str = "wsgate_send_queue_largest_bytes";
/// Gauge: 1 while the broker can carry messages (Redis reachable and subscribed), else 0.
pub const BROKER_READY: &str = "wsgate_broker_ready";
/// Counter: reconnects of the Redis subscription connections since the node started.
pub const REDIS_RECONNECTS: &str = "wsgate_redis_reconnects_total";
/// Counter: messages this node received on its Redis subscriptions (topics, users, broadcast,
/// control), before any filtering: compare with the publications sent to see what Redis
/// delivered.
pub const REDIS_MESSAGES: &str = "wsgate_redis_messages_received_total";
/// Gauge: Redis channels this node is subscribed to.
pub const REDIS_CHANNELS: &str = "wsgate_redis_subscribed_channels";
/// Counter: Redis failures; label `kind`: `command` (a command or pipeline answered an error or
/// failed on the connection), `connection` (no command connection could be had),
/// `subscription` (a subscription connection failed, or could not be set up).
pub const REDIS_ERRORS: &str = "wsgate_redis_errors_total";
/// Histogram: round trip of one Redis command or pipeline on a command connection.
pub const REDIS_COMMAND_DURATION: &str = "wsgate_redis_command_duration_seconds";
/// Counter: publications this node fetched from history to fill a gap in a topic's live stream
/// (after a lost Redis subscription).
pub const HISTORY_BACKFILLED: &str = "wsgate_history_backfilled_total";
/// Counter: live publications dropped because this node had already delivered them.
pub const DUPLICATES_DROPPED: &str = "wsgate_duplicate_publications_dropped_total";
/// Counter: gaps in a topic's live stream that history could not fill (trimmed or unreachable).
pub const HISTORY_GAPS_UNFILLED: &str = "wsgate_history_gaps_unfilled_total";
/// Gauge: when the node started, in seconds since the Unix epoch.
pub const START_TIME: &str = "wsgate_start_time_seconds";
/// Gauge: always 1; labels `node` and `version`.
pub const BUILD_INFO: &str = "wsgate_build_info";

/// Histogram buckets of [`FANOUT_LATENCY`], in seconds.
const FANOUT_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Histogram buckets of [`REDIS_COMMAND_DURATION`], in seconds.
const REDIS_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder on first use (several nodes in one process, as
/// in tests, share it). `None` when another recorder was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get_or_init(install).as_ref()
}

fn install() -> Option<PrometheusHandle> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(FANOUT_LATENCY.into()), FANOUT_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(REDIS_COMMAND_DURATION.into()), REDIS_BUCKETS)
        });
    let installed = builder.and_then(PrometheusBuilder::install_recorder);
    match installed {
        Ok(handle) => {
            describe();
            // Histograms need periodic upkeep (they are also drained at every scrape).
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
    }
}

/// `# HELP` lines (and units) for the exposition.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(CONNECTIONS_OPENED, "WebSocket connections accepted");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connection attempts refused, by reason"
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "Accepted connections that ended, by reason (client, server, lost) and close code"
    );
    describe_counter!(MESSAGES_RECEIVED, "Client messages received, by type");
    describe_counter!(MESSAGES_SENT, "Messages queued to clients, by type");
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes read from client sockets (frames as on the wire, compressed)"
    );
    describe_counter!(
        RECEIVED_PAYLOAD_BYTES,
        Unit::Bytes,
        "Payload bytes of client messages, after inflation"
    );
    describe_counter!(
        SENT_BYTES,
        Unit::Bytes,
        "Bytes written to client sockets (frames as on the wire, compressed)"
    );
    describe_counter!(
        SOCKET_WRITES,
        "Write calls that put bytes on client sockets (one may carry many frames)"
    );
    describe_counter!(
        SENT_PAYLOAD_BYTES,
        Unit::Bytes,
        "Payload bytes of messages queued to clients, before compression"
    );
    describe_counter!(PUBLICATIONS, "Publications fanned out to local subscribers");
    describe_counter!(DELIVERIES, "Frames queued to local subscribers by fan-out");
    describe_histogram!(
        FANOUT_LATENCY,
        Unit::Seconds,
        "Publication received to frame written to a recipient's socket (one sample per publication)"
    );
    describe_counter!(
        SLOW_CONSUMERS,
        "Connections cut off because their send queue passed its bound"
    );
    describe_counter!(ACK_RESENDS, "requireAck publications sent again");
    describe_counter!(
        ACK_GIVEN_UP,
        "requireAck publications given up unacknowledged"
    );
    describe_gauge!(ACK_PENDING, "requireAck publications not acknowledged yet");
    describe_gauge!(CONNECTIONS, "Live connections on the node");
    describe_gauge!(CONNECTION_LIMIT, "The node's connection limit right now");
    describe_gauge!(TOPICS, "Topics with a local subscriber");
    describe_gauge!(USERS, "Users with a local connection");
    describe_gauge!(
        SEND_QUEUE_BYTES,
        Unit::Bytes,
        "Bytes queued or in flight to the node's connections"
    );
    describe_gauge!(
        SEND_QUEUE_LARGEST_BYTES,
        Unit::Bytes,
        "The longest send queue of one connection"
    );
    describe_gauge!(BROKER_READY, "1 while the broker can carry messages");
    describe_counter!(REDIS_RECONNECTS, "Reconnects of the Redis subscriptions");
    describe_counter!(
        REDIS_MESSAGES,
        "Messages received on the Redis subscriptions"
    );
    describe_gauge!(REDIS_CHANNELS, "Redis channels the node is subscribed to");
    describe_counter!(REDIS_ERRORS, "Redis failures, by kind");
    describe_histogram!(
        REDIS_COMMAND_DURATION,
        Unit::Seconds,
        "Round trip of one Redis command or pipeline"
    );
    describe_counter!(
        HISTORY_BACKFILLED,
        "Publications fetched from history to fill gaps"
    );
    describe_counter!(
        DUPLICATES_DROPPED,
        "Live publications dropped as already delivered"
    );
    describe_counter!(HISTORY_GAPS_UNFILLED, "Gaps history could not fill");
    describe_gauge!(START_TIME, Unit::Seconds, "Node start, Unix time");
    describe_gauge!(BUILD_INFO, "Always 1; labels node and version");
}

/// The Prometheus text exposition for this node.
pub fn render(ctx: &NodeContext) -> String {
    let Some(handle) = handle() else {
        return String::new();
    };
    let node = ctx.settings.node_id.clone();
    let diag = ctx.broker.diagnostics();
    let (queued, largest) = ctx.hub.send_queue_bytes();
    let gauges: [(&'static str, f64); 9] = [
        (CONNECTIONS, ctx.hub.connection_count() as f64),
        (ACK_PENDING, ctx.hub.acks().pending_total() as f64),
        (CONNECTION_LIMIT, ctx.slots.limit() as f64),
        (TOPICS, ctx.hub.topic_count() as f64),
        (USERS, ctx.hub.user_count() as f64),
        (SEND_QUEUE_BYTES, queued as f64),
        (SEND_QUEUE_LARGEST_BYTES, largest as f64),
        (BROKER_READY, if diag.ready { 1.0 } else { 0.0 }),
        (REDIS_CHANNELS, diag.subscribed_channels as f64),
    ];
    for (name, value) in gauges {
        metrics::gauge!(name, "node" => node.clone()).set(value);
    }
    let started = std::time::SystemTime::now()
        .checked_sub(ctx.started_at.elapsed())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0.0, |d| d.as_secs_f64().round());
    metrics::gauge!(START_TIME, "node" => node.clone()).set(started);
    metrics::gauge!(BUILD_INFO, "node" => node.clone(), "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    metrics::counter!(REDIS_RECONNECTS, "node" => node.clone()).absolute(diag.reconnects);
    metrics::counter!(REDIS_MESSAGES, "node" => node).absolute(diag.messages_received);
    TRAFFIC.export();
    handle.render()
}

// ---- hot-path counters -------------------------------------------------------------------------

/// A counter on a cache line of its own, so that counters moved by different threads (readers,
/// writers, fan-out) do not slow each other down.
#[repr(align(64))]
pub struct Hot(AtomicU64);

impl Hot {
    const fn new() -> Self {
        Hot(AtomicU64::new(0))
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Declares a label enum: its variants, their label values, and `ALL`.
macro_rules! label_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $label:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vdoc])* $variant,)+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            pub const COUNT: usize = $name::ALL.len();

            /// The value of the `type` label.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)+ }
            }
        }
    };
}

label_enum! {
    /// The `type` of a received client message in [`MESSAGES_RECEIVED`]: the protocol's own
    /// types, and what the gateway did with the rest.
    Received {
        Ping => "ping",
        Heartbeat => "heartbeat",
        Pong => "pong",
        Ack => "ack",
        Refresh => "refresh",
        Subscribe => "subscribe",
        Unsubscribe => "unsubscribe",
        Publish => "publish",
        /// A message with a top-level `to` (chat, typing, ...).
        Direct => "direct",
        /// Any other type, forwarded to backends.
        Upstream => "upstream",
        /// Not JSON, or no `type`.
        Invalid => "invalid",
        /// Dropped by the per-connection rate limit before it was read.
        RateLimited => "rate_limited",
        /// A binary message (refused: the protocol is JSON text).
        Binary => "binary",
        /// A message on the echo endpoint.
        Echo => "echo",
    }
}

label_enum! {
    /// The `type` of a message queued to a client in [`MESSAGES_SENT`].
    Sent {
        /// A topic publication, live.
        Publication => "publication",
        /// A topic publication replayed from history (`subscribe` with `since`).
        Replay => "replay",
        /// A message for a user, a connection or everyone.
        Direct => "direct",
        Connection => "connection",
        Ack => "ack",
        Pong => "pong",
        Heartbeat => "heartbeat",
        Error => "error",
        /// The notice before a close the server decided on.
        Disconnect => "disconnect",
        /// A message sent back by the echo endpoint.
        Echo => "echo",
    }
}

impl Sent {
    /// The counted type of a reply of protocol `type` `kind` (`ack`, `pong`, `heartbeat`).
    pub fn of_reply(kind: &str) -> Sent {
        match kind {
            "pong" => Sent::Pong,
            "heartbeat" => Sent::Heartbeat,
            "error" => Sent::Error,
            "connection" => Sent::Connection,
            _ => Sent::Ack,
        }
    }
}

/// The hot-path counters (see the module docs), process-wide.
pub struct Traffic {
    received: [Hot; Received::COUNT],
    sent: [Hot; Sent::COUNT],
    pub received_bytes: Hot,
    pub received_payload_bytes: Hot,
    pub sent_bytes: Hot,
    pub socket_writes: Hot,
    pub sent_payload_bytes: Hot,
    pub publications: Hot,
    pub deliveries: Hot,
    pub slow_consumers: Hot,
    pub connections_opened: Hot,
    pub connections_closed: Hot,
    pub fanout_latency: Latency,
}

/// The process's counters.
pub static TRAFFIC: Traffic = Traffic {
    received: [const { Hot::new() }; Received::COUNT],
    sent: [const { Hot::new() }; Sent::COUNT],
    received_bytes: Hot::new(),
    received_payload_bytes: Hot::new(),
    sent_bytes: Hot::new(),
    socket_writes: Hot::new(),
    sent_payload_bytes: Hot::new(),
    publications: Hot::new(),
    deliveries: Hot::new(),
    slow_consumers: Hot::new(),
    connections_opened: Hot::new(),
    connections_closed: Hot::new(),
    fanout_latency: Latency::new(),
};

impl Traffic {
    /// Counts one received client message of `kind` with `payload` bytes (after inflation).
    #[inline]
    pub fn received(&self, kind: Received, payload: usize) {
        self.received[kind as usize].add(1);
        self.received_payload_bytes.add(payload as u64);
    }

    /// Counts `messages` messages of `kind` queued to clients, `payload` bytes in all (before
    /// compression).
    #[inline]
    pub fn sent(&self, kind: Sent, messages: u64, payload: u64) {
        if messages > 0 {
            self.sent[kind as usize].add(messages);
            self.sent_payload_bytes.add(payload);
        }
    }

    pub fn received_count(&self, kind: Received) -> u64 {
        self.received[kind as usize].get()
    }

    pub fn sent_count(&self, kind: Sent) -> u64 {
        self.sent[kind as usize].get()
    }

    /// Messages received, all types together.
    pub fn received_total(&self) -> u64 {
        self.received.iter().map(Hot::get).sum()
    }

    /// Messages sent, all types together.
    pub fn sent_total(&self) -> u64 {
        self.sent.iter().map(Hot::get).sum()
    }

    /// Copies the counters into the recorder (at scrape time).
    fn export(&self) {
        for kind in Received::ALL {
            metrics::counter!(MESSAGES_RECEIVED, "type" => kind.label())
                .absolute(self.received_count(*kind));
        }
        for kind in Sent::ALL {
            metrics::counter!(MESSAGES_SENT, "type" => kind.label())
                .absolute(self.sent_count(*kind));
        }
        let plain: [(&'static str, &Hot); 9] = [
            (RECEIVED_BYTES, &self.received_bytes),
            (RECEIVED_PAYLOAD_BYTES, &self.received_payload_bytes),
            (SENT_BYTES, &self.sent_bytes),
            (SOCKET_WRITES, &self.socket_writes),
            (SENT_PAYLOAD_BYTES, &self.sent_payload_bytes),
            (PUBLICATIONS, &self.publications),
            (DELIVERIES, &self.deliveries),
            (SLOW_CONSUMERS, &self.slow_consumers),
            (CONNECTIONS_OPENED, &self.connections_opened),
        ];
        for (name, hot) in plain {
            metrics::counter!(name).absolute(hot.get());
        }
    }
}

/// Payload length of a complete server frame (a final frame, as `ws::frame` builds them).
pub fn frame_payload_len(frame: &[u8]) -> usize {
    crate::ws::frame::payload_of(frame).len()
}

/// Counts one admitted connection that ended (see [`CONNECTIONS_CLOSED`]).
pub fn connection_closed(reason: &'static str, code: u16) {
    TRAFFIC.connections_closed.add(1);
    metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason, "code" => close_code_label(code))
        .increment(1);
}

/// The `code` label of a close code: the registered 1000-1015 and the gateway's own 4xxx codes
/// as themselves, any other code a client chose as `other` (a client must not be able to create
/// label values at will).
pub fn close_code_label(code: u16) -> &'static str {
    match code {
        1000 => "1000",
        1001 => "1001",
        1002 => "1002",
        1003 => "1003",
        1005 => "1005",
        1006 => "1006",
        1007 => "1007",
        1008 => "1008",
        1009 => "1009",
        1010 => "1010",
        1011 => "1011",
        1012 => "1012",
        1013 => "1013",
        1014 => "1014",
        1015 => "1015",
        4001 => "4001",
        4002 => "4002",
        4003 => "4003",
        4004 => "4004",
        4008 => "4008",
        4029 => "4029",
        _ => "other",
    }
}

/// Counts a connection refusal (see [`CONNECTIONS_REFUSED`]).
pub fn connection_refused(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REFUSED, "reason" => reason).increment(1);
}

/// Counts a Redis failure of `kind` (see [`REDIS_ERRORS`]).
pub fn redis_error(kind: &'static str) {
    metrics::counter!(REDIS_ERRORS, "kind" => kind).increment(1);
}

/// Records the round trip of one Redis command or pipeline.
pub fn redis_command(elapsed: Duration) {
    static HISTOGRAM: OnceLock<metrics::Histogram> = OnceLock::new();
    HISTOGRAM
        .get_or_init(|| {
            handle();
            metrics::histogram!(REDIS_COMMAND_DURATION)
        })
        .record(elapsed.as_secs_f64());
}

/// Records one fan-out latency sample (see the module docs).
pub fn fanout_latency(elapsed: Duration) {
    static HISTOGRAM: OnceLock<metrics::Histogram> = OnceLock::new();
    HISTOGRAM
        .get_or_init(|| {
            handle();
            metrics::histogram!(FANOUT_LATENCY)
        })
        .record(elapsed.as_secs_f64());
    TRAFFIC.fanout_latency.record(elapsed);
}

// ---- a latency histogram the node can read back (for the `$sys.metrics` snapshots) -------------

/// Microsecond values below this get a bucket each.
const LINEAR_US: u64 = 16;
/// Sub-buckets per power of two above [`LINEAR_US`] (12.5 % wide).
const SUB_BUCKETS: u64 = 8;
/// Buckets: 16 linear, then 8 per power of two from 16 µs up to 2^31 µs (about 36 minutes).
const LATENCY_BUCKETS: usize = (LINEAR_US + (31 - 4) * SUB_BUCKETS) as usize;

/// A log-linear histogram of durations (microsecond resolution, buckets 12.5 % wide) in atomics,
/// so the node can compute quantiles of recent samples (the Prometheus histogram can only be
/// rendered, not read back).
pub struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Latency {
    const fn new() -> Self {
        Latency {
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS],
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// The counts so far; subtract an earlier snapshot for the samples in between.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: self.buckets.iter().map(|b| b.load(Relaxed)).collect(),
            count: self.count.load(Relaxed),
            sum_us: self.sum_us.load(Relaxed),
        }
    }
}

fn bucket_of(us: u64) -> usize {
    if us < LINEAR_US {
        return us as usize;
    }
    let exp = 63 - u64::from(us.leading_zeros()); // >= 4
    let sub = (us >> (exp - 3)) & (SUB_BUCKETS - 1);
    let idx = LINEAR_US + (exp - 4) * SUB_BUCKETS + sub;
    (idx as usize).min(LATENCY_BUCKETS - 1)
}

/// The largest value (µs) that falls into bucket `idx`.
fn bucket_upper_us(idx: usize) -> u64 {
    let idx = idx as u64;
    if idx < LINEAR_US {
        return idx;
    }
    let exp = (idx - LINEAR_US) / SUB_BUCKETS + 4;
    let sub = (idx - LINEAR_US) % SUB_BUCKETS;
    ((SUB_BUCKETS + sub + 1) << (exp - 3)) - 1
}

/// Counts of a [`Latency`] at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    buckets: Vec<u64>,
    pub count: u64,
    sum_us: u64,
}

/// Summary of the samples between two snapshots, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub avg: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencySnapshot {
    /// The samples recorded after `earlier` (quantiles to within a bucket, 12.5 %).
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, c)| c.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
            .collect();
        let count = self.count.saturating_sub(earlier.count);
        if count == 0 {
            return LatencySummary::default();
        }
        let sum_us = self.sum_us.saturating_sub(earlier.sum_us);
        let ms = |us: u64| us as f64 / 1000.0;
        let quantile = |q: f64| {
            let rank = ((q * count as f64).ceil() as u64).max(1);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return ms(bucket_upper_us(i));
                }
            }
            ms(bucket_upper_us(LATENCY_BUCKETS - 1))
        };
        LatencySummary {
            count,
            avg: ms(sum_us) / count as f64,
            p50: quantile(0.50),
            p95: quantile(0.95),
            p99: quantile(0.99),
            max: quantile(1.0),
        }
    }
}

// ---- counting client bytes --------------------------------------------------------------------

/// Counts the bytes read through it into [`RECEIVED_BYTES`] (one atomic add per read, not per
/// frame).
pub struct CountingReader<R> {
    inner: R,
}

impl<R> CountingReader<R> {
    pub fn new(inner: R) -> Self {
        CountingReader { inner }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for CountingReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            TRAFFIC.received_bytes.add(read as u64);
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_contain_their_values() {
        let mut last = 0;
        for us in (0..100_000u64).chain([1 << 20, (1 << 31) - 1, u64::MAX]) {
            let b = bucket_of(us);
            assert!(b >= last || us == 0, "{us}");
            last = b;
            if b < LATENCY_BUCKETS - 1 {
                assert!(us <= bucket_upper_us(b), "{us} in bucket {b}");
                if b > 0 {
                    assert!(us > bucket_upper_us(b - 1), "{us} in bucket {b}");
                }
            }
        }
    }

    #[test]
    fn quantiles_of_recent_samples() {
        let h = Latency::new();
        h.record(Duration::from_millis(500));
        let first = h.snapshot();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot().since(&first);
        assert_eq!(s.count, 100);
        assert!((s.avg - 50.5).abs() < 0.01, "{s:?}");
        for (got, want) in [(s.p50, 50.0), (s.p95, 95.0), (s.p99, 99.0), (s.max, 100.0)] {
            assert!(got >= want && got <= want * 1.13, "{s:?}");
        }
        assert_eq!(h.snapshot().since(&h.snapshot()), LatencySummary::default());
    }

    #[test]
    fn close_code_labels_are_bounded() {
        assert_eq!(close_code_label(1009), "1009");
        assert_eq!(close_code_label(4008), "4008");
        assert_eq!(close_code_label(4321), "other");
        assert_eq!(close_code_label(3000), "other");
    }
}
