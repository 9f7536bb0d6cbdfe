//! Node settings: the one resolved [`Settings`] value every other module reads.
//!
//! Settings come from three layers, later ones winning (SPEC section 9):
//! the YAML file (`file.rs`), then `WSGATE_*` environment variables, then command-line flags
//! (`cli.rs`; clap resolves env and flag together). [`Settings::validate`] is the single place
//! that says whether a combination of values can run; `wsgate check-config` prints its findings.

pub mod cli;
pub mod file;
pub mod secret;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use secret::Secret;

/// Everything a node needs to run, fully resolved (no `Option` means "use a default" here).
#[derive(Debug, Clone)]
pub struct Settings {
    /// This node's name in logs, `/api/info` and the `connection` message.
    pub node_id: String,
    /// HTTP + WebSocket listener.
    pub listen: SocketAddr,
    pub ws: WsSettings,
    /// Topic namespaces (the part of a topic before the first `:`) and what clients may do there.
    pub namespaces: HashMap<String, NamespaceSettings>,
    /// Rules for topics whose namespace is not listed in `namespaces`.
    pub default_namespace: NamespaceSettings,
    /// Redis broker URLs; empty means the embedded in-process broker.
    pub redis_urls: Vec<String>,
    /// How the Redis broker behaves (ignored without `redis_urls`).
    pub redis: RedisSettings,
    /// How clients prove who they are (JWT keys and validation); no key at all: auth off.
    pub auth: AuthSettings,
    /// HTTP API keys; empty means the API answers loopback peers only.
    pub api_keys: Vec<Secret>,
    pub compression: CompressionSettings,
    /// How long a SIGTERM drain spreads its disconnects.
    pub drain: Duration,
    /// The `$sys.metrics` / `$sys.health` snapshots.
    pub sys: SysSettings,
}

/// The gateway's own topics (`crate::sys`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysSettings {
    /// How often each node publishes its `$sys.metrics` and `$sys.health` snapshots; zero: never.
    pub interval: Duration,
}

impl Default for SysSettings {
    fn default() -> Self {
        SysSettings {
            interval: Duration::from_secs(2),
        }
    }
}

/// WebSocket endpoint, per-connection limits and timers.
#[derive(Debug, Clone)]
pub struct WsSettings {
    /// Paths that accept a WebSocket upgrade (`/ws` plus aliases).
    pub paths: Vec<String>,
    /// Node-wide connection limit (cluster-wide once the Redis broker is on).
    pub max_connections: usize,
    /// Largest inbound message in bytes, all fragments together.
    pub max_message_size: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Longest topic name in bytes.
    pub max_topic_length: usize,
    /// Server WebSocket ping period; also announced to clients in the `connection` message.
    pub heartbeat_interval: Duration,
    /// A connection that sends nothing (not even a pong) for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes a connection may have queued or in flight before it counts as a slow consumer.
    pub send_queue_bytes: usize,
    /// A write that makes no progress for this long ends the connection.
    pub write_timeout: Duration,
    /// Inbound messages per second per connection (token bucket refill rate).
    pub rate_per_second: f64,
    /// Inbound burst allowance per connection (token bucket size).
    pub rate_burst: u32,
    /// Allowed `Origin` values; empty allows any origin.
    pub allowed_origins: Vec<String>,
    /// Whether a client message with an empty `to` may broadcast to every connection.
    pub allow_client_broadcast: bool,
    /// A path whose upgrades run an echo session (every message sent back as-is, no JSON
    /// protocol) for conformance testing, e.g. the Autobahn suite; `None` (the default): off.
    pub echo_path: Option<String>,
    /// Limits per client address and per user, against floods and runaway clients.
    pub peer_limits: PeerLimitSettings,
    /// A `requireAck` publication not acknowledged this long after it was sent is sent again.
    pub ack_timeout: Duration,
    /// How many times an unacknowledged `requireAck` publication is sent again before it is
    /// given up (0: sent once, never again).
    pub ack_retries: u32,
}

/// Limits per client IP and per user (all off by default: a load balancer or a load rig often
/// puts many honest clients behind one address; turn them on for a public listener).
#[derive(Debug, Clone, Default)]
pub struct PeerLimitSettings {
    /// Live WebSocket connections one client IP may hold on this node; 0: no limit.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections per second one client IP may open (token bucket refill);
    /// 0: no limit.
    pub connect_rate_per_ip: f64,
    /// Burst of new connections one client IP may open at once.
    pub connect_burst_per_ip: u32,
    /// Live connections one user may hold on this node; 0: no limit.
    pub max_connections_per_user: usize,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` names the real client; from
    /// anyone else the header is ignored and the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Who may do something in a namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Access {
    /// Nobody (server-side publishers only).
    #[default]
    Nobody,
    /// Every connected client, with or without a user id.
    Anyone,
    /// Clients with a user id (a valid token; with auth off, a `user_id` query parameter).
    Authenticated,
    /// Clients whose token's topics claim lists the topic (a pattern that matches it).
    Granted,
}

impl Access {
    /// Parses the config spelling (`nobody`, `anyone`, `authenticated`, `granted`).
    pub fn parse(s: &str) -> Option<Access> {
        match s {
            "nobody" | "none" => Some(Access::Nobody),
            "anyone" | "all" => Some(Access::Anyone),
            "authenticated" => Some(Access::Authenticated),
            "granted" | "claim" => Some(Access::Granted),
            _ => None,
        }
    }
}

/// What clients may do in one topic namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSettings {
    /// Who may subscribe to topics of this namespace (default: anyone).
    pub subscribe: Access,
    /// Who may `publish` to topics of this namespace (default: nobody).
    pub publish: Access,
    /// Whether subscriptions here are recorded in presence (default: on).
    pub presence: bool,
    /// How much of each topic's past is kept for recovery and `/api/history`.
    pub history: HistorySettings,
}

/// Per-topic history bounds: by count and by age, whichever is reached first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistorySettings {
    /// Publications kept per topic; 0 turns history (and recovery) off for the namespace.
    pub size: usize,
    /// Publications older than this are dropped; a topic idle this long loses its history.
    pub ttl: Duration,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            size: 100,
            ttl: Duration::from_secs(300),
        }
    }
}

impl HistorySettings {
    pub fn enabled(&self) -> bool {
        self.size > 0 && !self.ttl.is_zero()
    }
}

impl Default for NamespaceSettings {
    fn default() -> Self {
        NamespaceSettings {
            subscribe: Access::Anyone,
            publish: Access::Nobody,
            presence: true,
            history: HistorySettings::default(),
        }
    }
}

impl NamespaceSettings {
    /// The rules of a namespace where every client may publish (the `client_publish: true` of
    /// the config file).
    pub fn open_publish() -> Self {
        NamespaceSettings {
            publish: Access::Anyone,
            ..NamespaceSettings::default()
        }
    }
}

/// JWT authentication. Any key at all (secret, PEM key, JWKS) turns it on.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// HMAC secret (HS256/HS384/HS512); `--jwt-secret`.
    pub jwt_secret: Option<Secret>,
    /// PEM public keys: RSA, EC (P-256, P-384) or Ed25519, each optionally named by a `kid`.
    pub public_keys: Vec<PublicKeySource>,
    /// A JWKS file (RFC 7517); a token picks its key by `kid`.
    pub jwks_file: Option<PathBuf>,
    /// Accepted `alg` values (`HS256`, `RS256`, `ES256`, `EdDSA`, ...). Empty: every algorithm
    /// of the configured key types. Never taken from the token.
    pub algorithms: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Longest accepted token, in bytes.
    pub max_token_bytes: usize,
    /// The claim that lists the topic patterns a user may subscribe to and publish on.
    pub topics_claim: String,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
}

/// One PEM public key file of `auth.public_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeySource {
    pub path: PathBuf,
    /// Tokens whose header names this `kid` use this key; a key without one serves tokens
    /// without a `kid`.
    pub kid: Option<String>,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            jwt_secret: None,
            public_keys: Vec::new(),
            jwks_file: None,
            algorithms: Vec::new(),
            leeway: Duration::from_secs(30),
            max_token_bytes: 8 * 1024,
            topics_claim: "topics".to_string(),
            audience: None,
            issuer: None,
        }
    }
}

impl AuthSettings {
    /// Whether clients must present a token.
    pub fn enabled(&self) -> bool {
        self.jwt_secret.is_some() || !self.public_keys.is_empty() || self.jwks_file.is_some()
    }
}

/// Redis broker tuning.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// The URLs are seed nodes of one Redis Cluster (sharded pub/sub) rather than independent
    /// instances sharded by topic.
    pub cluster: bool,
    /// How long a node stays subscribed to a channel after its last local interest ended.
    pub linger: Duration,
    /// Liveness of a node's registry entry and connection-slot reservation without renewal: a
    /// dead node's share of `max_connections` returns after at most this long.
    pub lease_ttl: Duration,
    /// Connection slots reserved from the cluster budget per trip to Redis.
    pub admission_block: usize,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            cluster: false,
            linger: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(10),
            admission_block: 16,
        }
    }
}

/// permessage-deflate (RFC 7692) settings; negotiated in the compression issue.
#[derive(Debug, Clone)]
pub struct CompressionSettings {
    pub enabled: bool,
    /// flate2 level 0-9.
    pub level: u32,
    /// Payloads smaller than this many bytes go out uncompressed.
    pub threshold: usize,
}

impl Default for WsSettings {
    fn default() -> Self {
        WsSettings {
            paths: vec!["/ws".to_string()],
            max_connections: 10_000,
            max_message_size: 64 * 1024,
            max_subscriptions: 128,
            max_topic_length: 128,
            heartbeat_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            send_queue_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            rate_per_second: 50.0,
            rate_burst: 100,
            allowed_origins: Vec::new(),
            allow_client_broadcast: false,
            echo_path: None,
            peer_limits: PeerLimitSettings::default(),
            ack_timeout: Duration::from_secs(5),
            ack_retries: 3,
        }
    }
}

impl Default for CompressionSettings {
    fn default() -> Self {
        CompressionSettings {
            enabled: true,
            level: 1,
            threshold: 256,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            node_id: generated_node_id(),
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            ws: WsSettings::default(),
            namespaces: HashMap::new(),
            default_namespace: NamespaceSettings::default(),
            redis_urls: Vec::new(),
            redis: RedisSettings::default(),
            auth: AuthSettings::default(),
            api_keys: Vec::new(),
            compression: CompressionSettings::default(),
            drain: Duration::from_secs(30),
            sys: SysSettings::default(),
        }
    }
}

/// A setting that cannot run, with the setting's path so the user can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct SettingsProblem {
    pub path: String,
    pub problem: String,
}

impl Settings {
    /// Settings for tests and embedding: defaults on a loopback ephemeral port.
    pub fn for_loopback() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..Settings::default()
        }
    }

    /// The namespace rules that apply to `topic`.
    pub fn namespace_of(&self, topic: &str) -> &NamespaceSettings {
        topic
            .split_once(':')
            .and_then(|(ns, _)| self.namespaces.get(ns))
            .unwrap_or(&self.default_namespace)
    }

    /// Every reason these settings cannot run; empty when they can.
    pub fn validate(&self) -> Vec<SettingsProblem> {
        let mut problems = Vec::new();
        let mut bad = |path: &str, problem: String| {
            problems.push(SettingsProblem {
                path: path.to_string(),
                problem,
            })
        };
        if self.node_id.is_empty() {
            bad("node_id", "must not be empty".into());
        }
        if self.ws.paths.is_empty() {
            bad("websocket.paths", "needs at least one path".into());
        }
        for p in &self.ws.paths {
            if !p.starts_with('/') {
                bad("websocket.paths", format!("{p:?} must start with '/'"));
            }
        }
        if let Some(echo) = &self.ws.echo_path {
            if !echo.starts_with('/') {
                bad(
                    "websocket.echo_path",
                    format!("{echo:?} must start with '/'"),
                );
            } else if self.ws.paths.contains(echo) {
                bad(
                    "websocket.echo_path",
                    format!("{echo:?} is also in websocket.paths; pick a path of its own"),
                );
            }
        }
        if self.ws.max_connections == 0 {
            bad("websocket.max_connections", "must be at least 1".into());
        }
        if self.ws.max_message_size < 128 {
            bad(
                "websocket.max_message_size",
                format!("{} is below the 128-byte minimum", self.ws.max_message_size),
            );
        }
        if self.ws.max_subscriptions == 0 {
            bad("websocket.max_subscriptions", "must be at least 1".into());
        }
        if self.ws.max_topic_length == 0 {
            bad("websocket.max_topic_length", "must be at least 1".into());
        }
        if self.ws.heartbeat_interval.is_zero() {
            bad("websocket.heartbeat_interval", "must be positive".into());
        }
        if self.ws.idle_timeout <= self.ws.heartbeat_interval {
            bad(
                "websocket.idle_timeout",
                "must be longer than heartbeat_interval, or live clients get cut off".into(),
            );
        }
        if self.ws.send_queue_bytes < self.ws.max_message_size.min(64 * 1024) {
            bad(
                "websocket.send_queue_bytes",
                "must hold at least one message of max_message_size (or 64 KiB)".into(),
            );
        }
        if self.ws.rate_per_second.is_nan() || self.ws.rate_per_second <= 0.0 {
            bad("websocket.rate_limit.per_second", "must be positive".into());
        }
        if self.ws.rate_burst == 0 {
            bad("websocket.rate_limit.burst", "must be at least 1".into());
        }
        if !self.sys.interval.is_zero() && self.sys.interval < Duration::from_millis(100) {
            bad("sys.interval", "must be 0s (off) or at least 100ms".into());
        }
        if self.ws.ack_timeout.is_zero() {
            bad("websocket.ack_timeout", "must be positive".into());
        }
        if self.compression.level > 9 {
            bad(
                "compression.level",
                format!("{} is outside 0-9", self.compression.level),
            );
        }
        for url in &self.redis_urls {
            if !(url.starts_with("redis://")
                || url.starts_with("rediss://")
                || url.starts_with("redis+unix://"))
            {
                bad(
                    "redis.url",
                    format!("{url:?} is not a redis:// or rediss:// URL"),
                );
            }
        }
        if self.redis.admission_block == 0 {
            bad("redis.admission_block", "must be at least 1".into());
        }
        if self.redis.lease_ttl < Duration::from_millis(300) {
            bad(
                "redis.lease_ttl",
                "must be at least 300ms (it is renewed every third of it)".into(),
            );
        }
        if matches!(&self.auth.jwt_secret, Some(s) if s.expose().is_empty()) {
            bad("auth.jwt_secret", "must not be empty when set".into());
        }
        for alg in &self.auth.algorithms {
            if crate::auth::parse_algorithm(alg).is_none() {
                bad(
                    "auth.algorithms",
                    format!("{alg:?} is not a JWT algorithm this gateway verifies (HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"),
                );
            }
        }
        if self.auth.max_token_bytes < 64 {
            bad("auth.max_token_bytes", "must be at least 64".into());
        }
        if self.auth.topics_claim.is_empty() {
            bad("auth.topics_claim", "must not be empty".into());
        }
        let peers = &self.ws.peer_limits;
        if peers.connect_rate_per_ip.is_nan() || peers.connect_rate_per_ip < 0.0 {
            bad(
                "websocket.per_ip.connect_rate.per_second",
                "must be 0 (off) or positive".into(),
            );
        }
        if peers.connect_rate_per_ip > 0.0 && peers.connect_burst_per_ip == 0 {
            bad(
                "websocket.per_ip.connect_rate.burst",
                "must be at least 1 when a connect rate is set".into(),
            );
        }
        if self.api_keys.iter().any(|k| k.expose().is_empty()) {
            bad("api.keys", "must not contain an empty key".into());
        }
        problems
    }
}

/// `wsgate-` plus eight random hex digits: unique enough to tell nodes apart in one cluster.
pub fn generated_node_id() -> String {
    format!("wsgate-{:08x}", rand::random::<u32>())
}

pub use cli::{Cli, Command, RunArgs};
pub use file::{ConfigError, FileConfig};
