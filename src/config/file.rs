//! The YAML config file: its shape ([`FileConfig`]), how it is read and how it lands on
//! [`Settings`], and [`ConfigError`], the one error type of the whole `config` module.
//!
//! The shape is the framework guide's `websocket: {enable, port, max_connections}` extended with
//! everything else a node needs (SPEC sections 8 and 9). Every key is optional: a missing key keeps
//! the value `Settings::default()` gives. Unknown keys are refused (`deny_unknown_fields`
//! everywhere) so a typo never silently falls back to a default, and every YAML error names the
//! file, line, column and, where it can be worked out, the dotted key (`websocket.port`).
//!
//! ```yaml
//! node_id: edge-1
//! listen: 0.0.0.0:8080          # optional; else websocket.port picks the port on 0.0.0.0
//! websocket:
//!   enable: true                # false is refused: a gateway without WebSockets serves nothing
//!   port: "8081"                # string or number
//!   max_connections: 10000
//!   paths: [/ws, /api/ws/connect]
//!   heartbeat_interval: 25s     # durations: 500ms, 25s, 2m, 1h
//!   rate_limit: { per_second: 50, burst: 100 }
//!   echo_path: /echo            # conformance-testing echo endpoint; absent: off
//!   per_ip: { max_connections: 100, connect_rate: { per_second: 10, burst: 20 } }
//!   per_user: { max_connections: 10 }
//!   trusted_proxies: [10.0.0.0/8]  # whose X-Forwarded-For names the client
//!   ack_timeout: 5s             # requireAck publications unacknowledged this long are re-sent
//!   ack_retries: 3              # ... at most this many times, then given up
//! namespaces:
//!   chat: { subscribe: authenticated, publish: granted, presence: true, history: { size: 100, ttl: 5m } }
//! auth:
//!   jwt_secret: change-me       # HS256/384/512
//!   public_keys: [{ file: keys/rs256.pem, kid: k1 }]   # RSA, EC or Ed25519 PEM
//!   jwks_file: keys/jwks.json
//!   algorithms: [HS256, RS256]  # empty: every algorithm of the configured key types
//!   leeway: 30s
//!   topics_claim: topics
//! sys:
//!   interval: 2s                # $sys.metrics / $sys.health snapshots; 0s: off
//! redis:
//!   url: redis://127.0.0.1:6379 # or a list of URLs (sharding)
//!   cluster: false              # true: the URLs are Redis Cluster seed nodes
//!   linger: 2s
//!   lease_ttl: 10s
//!   admission_block: 16
//! ```

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use super::{Access, NamespaceSettings, PublicKeySource, Secret, Settings, SettingsProblem};

/// Why settings could not be loaded or cannot run.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read at all.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML, or not in the shape of [`FileConfig`] (unknown key, wrong type,
    /// bad duration, port out of range, ...).
    #[error("{source_name}: {}", yaml_detail(*.line, *.column, .key.as_deref(), .message))]
    Yaml {
        /// The file name (or `<config>` for text parsed without one).
        source_name: String,
        /// 1-based line of the offending node, when known.
        line: Option<u64>,
        /// 1-based column of the offending node, when known.
        column: Option<u64>,
        /// Dotted path of the offending key (`websocket.port`), when it could be worked out.
        key: Option<String>,
        /// The parser's message, without location.
        message: String,
    },
    /// A value that parsed but cannot be used (e.g. `listen` and `websocket.port` disagree).
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
    /// `websocket.enable: false`.
    #[error(
        "websocket.enable is false: wsgate is a WebSocket gateway and would serve nothing; \
         set it to true or remove the line"
    )]
    WebsocketDisabled,
    /// Everything [`Settings::validate`] found, one problem per line.
    #[error("invalid settings:\n{}", render_problems(.0))]
    Problems(Vec<SettingsProblem>),
}

impl ConfigError {
    /// The individual problems, one line each, without the file name (for `check-config`, which
    /// prefixes each with the file it checked).
    pub fn problems(&self) -> Vec<String> {
        match self {
            ConfigError::Read { source, .. } => vec![format!("cannot read: {source}")],
            ConfigError::Yaml {
                line,
                column,
                key,
                message,
                ..
            } => vec![yaml_detail(*line, *column, key.as_deref(), message)],
            ConfigError::Invalid { .. } | ConfigError::WebsocketDisabled => vec![self.to_string()],
            ConfigError::Problems(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

fn yaml_detail(line: Option<u64>, column: Option<u64>, key: Option<&str>, message: &str) -> String {
    let mut out = String::new();
    match (line, column) {
        (Some(l), Some(c)) => out.push_str(&format!("line {l}, column {c}")),
        (Some(l), None) => out.push_str(&format!("line {l}")),
        _ => {}
    }
    if let Some(key) = key {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(&format!("({key})"));
    }
    if !out.is_empty() {
        out.push_str(": ");
    }
    out.push_str(message);
    out
}

fn render_problems(problems: &[SettingsProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole config file. Every field is optional; see the module docs for an example.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_id: Option<String>,
    /// `ADDR:PORT` (or `:PORT` for all IPv4 interfaces); wins over `websocket.port`.
    #[serde(default, deserialize_with = "opt_listen")]
    pub listen: Option<SocketAddr>,
    pub websocket: Option<WebsocketFile>,
    pub namespaces: Option<HashMap<String, NamespaceFile>>,
    pub default_namespace: Option<NamespaceFile>,
    pub redis: Option<RedisFile>,
    pub auth: Option<AuthFile>,
    pub api: Option<ApiFile>,
    pub compression: Option<CompressionFile>,
    pub shutdown: Option<ShutdownFile>,
    pub sys: Option<SysFile>,
}

/// `websocket:` — the framework guide's block, extended with limits and timers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebsocketFile {
    /// `false` is refused (see [`ConfigError::WebsocketDisabled`]); absent means `true`.
    pub enable: Option<bool>,
    /// Port on `0.0.0.0` when `listen` is absent; a number or a string (`"8081"`).
    #[serde(default, deserialize_with = "opt_port")]
    pub port: Option<u16>,
    pub max_connections: Option<usize>,
    pub paths: Option<Vec<String>>,
    pub max_message_size: Option<usize>,
    pub max_subscriptions: Option<usize>,
    pub max_topic_length: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub heartbeat_interval: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub idle_timeout: Option<Duration>,
    pub send_queue_bytes: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub write_timeout: Option<Duration>,
    pub rate_limit: Option<RateLimitFile>,
    pub allowed_origins: Option<Vec<String>>,
    pub allow_client_broadcast: Option<bool>,
    /// Echo endpoint for conformance testing (e.g. `/echo`); absent: off.
    pub echo_path: Option<String>,
    pub per_ip: Option<PerIpFile>,
    pub per_user: Option<PerUserFile>,
    /// Addresses or CIDR ranges of proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Option<Vec<String>>,
    /// How long a `requireAck` publication waits for its `ack` before it is sent again.
    #[serde(default, deserialize_with = "opt_duration")]
    pub ack_timeout: Option<Duration>,
    /// Re-sends of an unacknowledged `requireAck` publication before it is given up.
    pub ack_retries: Option<u32>,
}

/// `websocket.per_ip:` — limits per client address.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerIpFile {
    pub max_connections: Option<usize>,
    pub connect_rate: Option<RateLimitFile>,
}

/// `websocket.per_user:` — limits per user id.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerUserFile {
    pub max_connections: Option<usize>,
}

/// `websocket.rate_limit:` — per-connection inbound token bucket.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub per_second: Option<f64>,
    pub burst: Option<u32>,
}

/// One entry of `namespaces:`, or `default_namespace:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceFile {
    /// Shorthand: `true` is `publish: anyone`, `false` is `publish: nobody`.
    pub client_publish: Option<bool>,
    /// `anyone`, `authenticated`, `granted` or `nobody`.
    pub subscribe: Option<String>,
    /// `anyone`, `authenticated`, `granted` or `nobody`.
    pub publish: Option<String>,
    pub presence: Option<bool>,
    pub history: Option<HistoryFile>,
}

/// `history:` of a namespace: `{size, ttl}`; `size: 0` turns it off.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryFile {
    pub size: Option<usize>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub ttl: Option<Duration>,
}

/// `redis:` — absent (or an empty URL list) means the embedded in-process broker.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    /// One URL, a comma-separated string, or a YAML list (several URLs: sharded).
    #[serde(default, deserialize_with = "opt_string_list")]
    pub url: Option<Vec<String>>,
    /// The URLs are seed nodes of a Redis Cluster (sharded pub/sub).
    pub cluster: Option<bool>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub linger: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub lease_ttl: Option<Duration>,
    pub admission_block: Option<usize>,
}

/// `auth:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    /// HMAC secret; setting it (or any key) turns JWT authentication on.
    pub jwt_secret: Option<String>,
    pub public_keys: Option<Vec<PublicKeyFile>>,
    pub jwks_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "opt_string_list")]
    pub algorithms: Option<Vec<String>>,
    #[serde(default, deserialize_with = "opt_duration")]
    pub leeway: Option<Duration>,
    pub max_token_bytes: Option<usize>,
    pub topics_claim: Option<String>,
    pub audience: Option<String>,
    pub issuer: Option<String>,
}

/// One entry of `auth.public_keys:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicKeyFile {
    pub file: PathBuf,
    pub kid: Option<String>,
}

/// `api:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// HTTP API keys; none means the API answers loopback peers only.
    #[serde(default, deserialize_with = "opt_string_list")]
    pub keys: Option<Vec<String>>,
}

/// `compression:` — permessage-deflate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompressionFile {
    pub enable: Option<bool>,
    pub level: Option<u32>,
    pub threshold: Option<usize>,
}

/// `sys:` — the gateway's own `$sys.metrics` / `$sys.health` topics.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SysFile {
    /// How often each node publishes its snapshots; `0s`: never.
    #[serde(default, deserialize_with = "opt_duration")]
    pub interval: Option<Duration>,
}

/// `shutdown:`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownFile {
    /// How long a SIGTERM drain spreads its disconnects.
    pub drain_seconds: Option<u64>,
}

/// Name used in messages for text parsed without a file name.
const UNNAMED_SOURCE: &str = "<config>";

impl FileConfig {
    /// Parses config text; errors name `<config>` as the source.
    pub fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        Self::parse_named(text, UNNAMED_SOURCE)
    }

    /// Parses config text; errors name `source_name` (normally the file path) as the source.
    pub fn parse_named(text: &str, source_name: &str) -> Result<FileConfig, ConfigError> {
        serde_saphyr::from_str::<Option<FileConfig>>(text)
            .map(Option::unwrap_or_default)
            .map_err(|err| yaml_error(&err, text, source_name))
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_named(&text, &path.display().to_string())
    }

    /// Writes every value the file sets onto `settings`, leaving the others alone.
    pub fn apply_to(self, settings: &mut Settings) -> Result<(), ConfigError> {
        if let Some(node_id) = self.node_id {
            settings.node_id = node_id;
        }
        let port = self.websocket.as_ref().and_then(|ws| ws.port);
        match (self.listen, port) {
            (Some(listen), Some(port)) if listen.port() != port => {
                return Err(ConfigError::Invalid {
                    key: "websocket.port".into(),
                    problem: format!("{port} disagrees with listen {listen}; set only one of them"),
                });
            }
            (Some(listen), _) => settings.listen = listen,
            (None, Some(port)) => settings.listen = SocketAddr::from(([0, 0, 0, 0], port)),
            (None, None) => {}
        }
        if let Some(ws) = self.websocket {
            ws.apply_to(settings)?;
        }
        if let Some(namespaces) = self.namespaces {
            for (name, ns) in namespaces {
                if name.is_empty() || name.contains(':') {
                    return Err(ConfigError::Invalid {
                        key: format!("namespaces.{name}"),
                        problem: "a namespace name is the part of a topic before the first ':' \
                                  and must be non-empty without ':'"
                            .into(),
                    });
                }
                let key = format!("namespaces.{name}");
                let entry = settings.namespaces.entry(name).or_default();
                ns.apply_to(entry, &key)?;
            }
        }
        if let Some(ns) = self.default_namespace {
            ns.apply_to(&mut settings.default_namespace, "default_namespace")?;
        }
        if let Some(redis) = self.redis {
            if let Some(urls) = redis.url {
                settings.redis_urls = urls;
            }
            set(&mut settings.redis.cluster, redis.cluster);
            set(&mut settings.redis.linger, redis.linger);
            set(&mut settings.redis.lease_ttl, redis.lease_ttl);
            set(&mut settings.redis.admission_block, redis.admission_block);
        }
        if let Some(auth) = self.auth {
            auth.apply_to(settings);
        }
        if let Some(keys) = self.api.and_then(|a| a.keys) {
            settings.api_keys = keys.into_iter().map(Secret::from).collect();
        }
        if let Some(c) = self.compression {
            set(&mut settings.compression.enabled, c.enable);
            set(&mut settings.compression.level, c.level);
            set(&mut settings.compression.threshold, c.threshold);
        }
        if let Some(secs) = self.shutdown.and_then(|s| s.drain_seconds) {
            settings.drain = Duration::from_secs(secs);
        }
        if let Some(interval) = self.sys.and_then(|s| s.interval) {
            settings.sys.interval = interval;
        }
        Ok(())
    }
}

impl WebsocketFile {
    fn apply_to(self, settings: &mut Settings) -> Result<(), ConfigError> {
        if self.enable == Some(false) {
            return Err(ConfigError::WebsocketDisabled);
        }
        let ws = &mut settings.ws;
        set(&mut ws.max_connections, self.max_connections);
        set(&mut ws.paths, self.paths);
        set(&mut ws.max_message_size, self.max_message_size);
        set(&mut ws.max_subscriptions, self.max_subscriptions);
        set(&mut ws.max_topic_length, self.max_topic_length);
        set(&mut ws.heartbeat_interval, self.heartbeat_interval);
        set(&mut ws.idle_timeout, self.idle_timeout);
        set(&mut ws.send_queue_bytes, self.send_queue_bytes);
        set(&mut ws.write_timeout, self.write_timeout);
        if let Some(rate) = self.rate_limit {
            set(&mut ws.rate_per_second, rate.per_second);
            set(&mut ws.rate_burst, rate.burst);
        }
        set(&mut ws.allowed_origins, self.allowed_origins);
        set(&mut ws.allow_client_broadcast, self.allow_client_broadcast);
        set(&mut ws.ack_timeout, self.ack_timeout);
        set(&mut ws.ack_retries, self.ack_retries);
        if let Some(path) = self.echo_path {
            ws.echo_path = Some(path);
        }
        let peers = &mut ws.peer_limits;
        if let Some(per_ip) = self.per_ip {
            set(&mut peers.max_connections_per_ip, per_ip.max_connections);
            if let Some(rate) = per_ip.connect_rate {
                set(&mut peers.connect_rate_per_ip, rate.per_second);
                set(&mut peers.connect_burst_per_ip, rate.burst);
            }
        }
        if let Some(per_user) = self.per_user {
            set(
                &mut peers.max_connections_per_user,
                per_user.max_connections,
            );
        }
        if let Some(proxies) = self.trusted_proxies {
            peers.trusted_proxies = proxies
                .iter()
                .map(|p| parse_net(p))
                .collect::<Result<_, _>>()
                .map_err(|problem| ConfigError::Invalid {
                    key: "websocket.trusted_proxies".into(),
                    problem,
                })?;
        }
        Ok(())
    }
}

/// An address (`10.0.0.1`, a single host) or a CIDR range (`10.0.0.0/8`).
fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR range"))
}

impl NamespaceFile {
    fn apply_to(self, ns: &mut NamespaceSettings, key: &str) -> Result<(), ConfigError> {
        let access = |field: &str, value: &str| {
            Access::parse(value).ok_or_else(|| ConfigError::Invalid {
                key: format!("{key}.{field}"),
                problem: format!("{value:?} is not one of anyone, authenticated, granted, nobody"),
            })
        };
        if let Some(open) = self.client_publish {
            ns.publish = if open { Access::Anyone } else { Access::Nobody };
        }
        if let Some(v) = self.subscribe {
            ns.subscribe = access("subscribe", &v)?;
        }
        if let Some(v) = self.publish {
            ns.publish = access("publish", &v)?;
        }
        set(&mut ns.presence, self.presence);
        if let Some(history) = self.history {
            set(&mut ns.history.size, history.size);
            set(&mut ns.history.ttl, history.ttl);
        }
        Ok(())
    }
}

impl AuthFile {
    fn apply_to(self, settings: &mut Settings) {
        let auth = &mut settings.auth;
        if let Some(secret) = self.jwt_secret {
            auth.jwt_secret = Some(Secret::from(secret));
        }
        if let Some(keys) = self.public_keys {
            auth.public_keys = keys
                .into_iter()
                .map(|k| PublicKeySource {
                    path: k.file,
                    kid: k.kid,
                })
                .collect();
        }
        if let Some(path) = self.jwks_file {
            auth.jwks_file = Some(path);
        }
        set(&mut auth.algorithms, self.algorithms);
        set(&mut auth.leeway, self.leeway);
        set(&mut auth.max_token_bytes, self.max_token_bytes);
        set(&mut auth.topics_claim, self.topics_claim);
        if let Some(aud) = self.audience {
            auth.audience = Some(aud);
        }
        if let Some(iss) = self.issuer {
            auth.issuer = Some(iss);
        }
    }
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *slot = v;
    }
}

/// Parses a listen address: `IP:PORT`, `[IPv6]:PORT`, or `:PORT` (all IPv4 interfaces).
/// Shared by the file and the `--listen` flag.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        return parse_port(port).map(|p| SocketAddr::from(([0, 0, 0, 0], p)));
    }
    s.parse::<SocketAddr>().map_err(|_| {
        format!("{s:?} is not ADDR:PORT (e.g. 0.0.0.0:8080, 127.0.0.1:9000, [::]:8080 or :8080)")
    })
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(n) => port_in_range(n),
        Err(_) => Err(format!("{s:?} is not a port number (1-65535)")),
    }
}

fn port_in_range(n: u64) -> Result<u16, String> {
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!("port {n} is outside 1-65535")),
    }
}

// ---- field deserializers: each accepts null as "absent" and reports bad values with context ----

fn opt_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<SocketAddr>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a listen address ADDR:PORT, e.g. 0.0.0.0:8080")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_listen(v).map(Some).map_err(E::custom)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

fn opt_port<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<u16>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a port 1-65535, as a number or a string like \"8081\"")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            port_in_range(v).map(Some).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!("port {v} is outside 1-65535"))),
            }
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            parse_port(v).map(Some).map_err(E::custom)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration with a unit, e.g. 500ms, 25s, 2m")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            humantime::parse_duration(v.trim()).map(Some).map_err(|e| {
                E::custom(format!(
                    "{v:?} is not a duration ({e}); write e.g. 500ms, 25s, 2m"
                ))
            })
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "{v} has no unit; write e.g. {v}s or {v}ms"
            )))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Err(E::custom(format!("{v} is not a duration; write e.g. 25s")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "{v} is not a duration; write e.g. 1500ms"
            )))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// A string (split on commas, like the env var) or a list of strings.
fn opt_string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Option<Vec<String>>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a string or a list of strings")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(split_list(v)))
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item.trim().to_string());
            }
            Ok(Some(out))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    }
    d.deserialize_any(V)
}

/// Splits `a, b,,c` into `["a", "b", "c"]`: entries trimmed, empty ones dropped.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- turning a serde-saphyr error into a message that names line, column and key ----

fn yaml_error(err: &serde_saphyr::Error, text: &str, source_name: &str) -> ConfigError {
    let opts = serde_saphyr::render_options! { snippets: serde_saphyr::SnippetMode::Off };
    let location = err.location().filter(|l| l.line() > 0);
    let mut message = err.render_with_options(opts);
    // The plain rendering ends in " at line L, column C"; we print the location up front.
    if let Some(loc) = &location {
        let suffix = format!(" at line {}, column {}", loc.line(), loc.column());
        if let Some(stripped) = message.strip_suffix(&suffix) {
            message = stripped.to_string();
        }
    }
    // serde-saphyr reports an out-of-range or negative integer as just "invalid u32".
    if matches!(
        message.as_str(),
        "invalid u8" | "invalid u16" | "invalid u32" | "invalid u64" | "invalid usize"
    ) {
        message = format!("{message}: expected a whole number, 0 or more");
    }
    let key = location.as_ref().and_then(|loc| {
        let line = usize::try_from(loc.line()).ok()?;
        let column = usize::try_from(loc.column()).ok()?;
        key_path_at(text, line, column)
    });
    ConfigError::Yaml {
        source_name: source_name.to_string(),
        line: location.as_ref().map(|l| l.line()),
        column: location.as_ref().map(|l| l.column()).filter(|c| *c > 0),
        key,
        message,
    }
}

/// Best-effort dotted key path of the YAML node at 1-based `line`/`column`, e.g.
/// `websocket.rate_limit.burst`. Handles block mappings (by indentation) and `{ }` flow mappings
/// on the error's own line, which covers how config files are written. `None` when no key is found.
pub(crate) fn key_path_at(text: &str, line: usize, column: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let cur = *lines.get(line.checked_sub(1)?)?;
    let mut path = keys_on_line(cur, column.saturating_sub(1));

    // Enclosing block keys: walk up to lines indented less than this one.
    let (mut indent, cur_is_item) = line_indent(cur);
    let mut items_may_align = cur_is_item;
    let mut parents = Vec::new();
    for prev in lines[..line - 1].iter().rev() {
        let trimmed = prev.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let (prev_indent, prev_is_item) = line_indent(prev);
        // `key:` followed by `- item` lines at the same indentation is valid YAML.
        // A sibling item at that indentation is not a parent.
        let encloses =
            prev_indent < indent || (items_may_align && prev_indent == indent && !prev_is_item);
        if !encloses {
            continue;
        }
        let keys = keys_on_line(prev, prev.len());
        if let Some(first) = keys.first() {
            parents.push(first.clone());
        }
        indent = prev_indent;
        items_may_align = prev_is_item;
        if indent == 0 && !prev_is_item {
            break;
        }
    }
    parents.reverse();
    parents.append(&mut path);
    (!parents.is_empty()).then(|| parents.join("."))
}

/// Indentation of a line and whether it is a block sequence item (`- ...`).
fn line_indent(line: &str) -> (usize, bool) {
    let trimmed = line.trim_start_matches(' ');
    (
        line.len() - trimmed.len(),
        trimmed == "-" || trimmed.starts_with("- "),
    )
}

/// The key path within one line up to character index `upto` (0-based): keys of enclosing flow
/// mappings plus the key whose value (or which itself) sits at `upto`.
fn keys_on_line(line: &str, upto: usize) -> Vec<String> {
    let chars: Vec<char> = line.chars().collect();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    // Sequence items: skip the `- ` markers so `- key: v` is seen as `key: v`.
    while i < chars.len()
        && (chars[i] == ' ' || (chars[i] == '-' && chars.get(i + 1) == Some(&' ')))
    {
        i += 1;
    }
    while i < chars.len() && i <= upto {
        let c = chars[i];
        match c {
            '#' if i == 0 || chars[i - 1] == ' ' => break,
            '"' | '\'' => {
                let start = i;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if c == '"' && chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                // A quoted key: "name": value
                if chars.get(i + 1) == Some(&':') && is_key_end(chars.get(i + 2)) {
                    let key: String = chars[start + 1..i.min(chars.len())].iter().collect();
                    stack.retain(|(d, _)| *d < depth);
                    stack.push((depth, key));
                    i += 2;
                    continue;
                }
            }
            '{' | '[' => depth += 1,
            '}' | ']' => {
                stack.retain(|(d, _)| *d < depth);
                depth = depth.saturating_sub(1);
            }
            ',' => stack.retain(|(d, _)| *d < depth),
            c if is_key_char(c) && (i == 0 || !is_key_char(chars[i - 1])) => {
                let start = i;
                while i < chars.len() && is_key_char(chars[i]) {
                    i += 1;
                }
                if chars.get(i) == Some(&':') && is_key_end(chars.get(i + 1)) {
                    let key: String = chars[start..i].iter().collect();
                    stack.retain(|(d, _)| *d < depth);
                    stack.push((depth, key));
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    stack.into_iter().map(|(_, k)| k).collect()
}

fn is_key_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn is_key_end(c: Option<&char>) -> bool {
    matches!(c, None | Some(' ' | '\t' | '{' | '[' | ',' | '}'))
}

#[cfg(test)]
mod tests {
    use super::key_path_at;

    #[test]
    fn key_paths() {
        let text = "node_id: a\nwebsocket:\n  port: 70000\n  rate_limit: { per_second: 5, burst: x }\n  paths:\n  - /ws\n  - 5\nredis:\n  url: redis://h:1\n";
        assert_eq!(key_path_at(text, 1, 10).as_deref(), Some("node_id"));
        assert_eq!(key_path_at(text, 3, 9).as_deref(), Some("websocket.port"));
        assert_eq!(key_path_at(text, 3, 3).as_deref(), Some("websocket.port"));
        assert_eq!(
            key_path_at(text, 4, 40).as_deref(),
            Some("websocket.rate_limit.burst")
        );
        assert_eq!(key_path_at(text, 7, 5).as_deref(), Some("websocket.paths"));
        assert_eq!(key_path_at(text, 9, 8).as_deref(), Some("redis.url"));
        assert_eq!(key_path_at(text, 99, 1), None);
    }
}
