//! Cluster-wide presence: the node registry (for `/api/info`), who is online (for
//! `/api/ws/status`) and who is subscribed to a topic (per-topic presence).
//!
//! # Layout
//!
//! * **Node registry** — hash [`NODES_KEY`] on shard 0: node id ->
//!   `{"connections","users","startedAt","heartbeatAt"}`. Each node writes its field with
//!   [`Presence::heartbeat`] (every `ttl / 3`, see [`Presence::spawn_heartbeat`]); `heartbeatAt`
//!   and `startedAt` are **Redis server time** (`TIME`), so node clocks do not matter. A node is
//!   *live* while `heartbeatAt + ttl > now` (Redis time); readers remove stale fields
//!   ([`Presence::nodes`]), so a node that died disappears within `ttl`.
//! * **Online users** — one set per node, [`node_users_key`] on shard 0, expiring `2 * ttl` after
//!   the node's last heartbeat. [`Presence::online_users`] reads the sets of the live nodes only
//!   (`SMEMBERS` each, in one pipeline, union taken client-side: no cross-slot `SUNION`).
//! * **Per-topic presence** — hash [`topic_presence_key`] on shard `shard_of(topic, shards)`:
//!   field `"<node>:<connectionId>"` (connection ids are only unique per node) -> JSON
//!   `{"connectionId","node","clientId","userId"}`. [`Presence::topic_presence`] lists the
//!   entries of live nodes and removes those of dead ones.
//!
//! Every command touches one key, so this works on independent shards and on Redis Cluster;
//! batches of commands on several keys (resync, deregister, the user sets) go through
//! [`query_each`]: one pipeline on an instance, one per hash slot on a cluster (a pipeline
//! spanning slots fails there with `CROSSSLOT`).
//!
//! # Losing Redis
//!
//! The node keeps a local copy of what it wrote (its users and topic entries). A write that
//! fails (Redis unreachable) still updates the local copy and marks it dirty; until the next
//! successful resync, later writes only update the local copy (returning
//! [`PresenceError::Deferred`]) instead of waiting on Redis. When the node's
//! registry entry was missing or stale at a heartbeat (Redis restarted and lost its data, or the
//! node was considered dead) or the copy is dirty, the heartbeat re-writes everything: the user
//! set is replaced, topic entries are re-added, and leaves that failed are retried. Presence is
//! thus eventually right again one heartbeat after Redis is back.
//!
//! Entries of a node that died are never listed; they are deleted lazily by the next
//! [`Presence::topic_presence`] read of that topic, and its user set expires on its own.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use redis::Script;
use tokio::sync::RwLock;

use super::commands::{query_each, Commands, CommandsError};
use super::keys::{node_users_key, topic_presence_key, NODES_KEY};
use super::shard::shard_of;

/// Writes this node's registry field. `KEYS[1]` = [`NODES_KEY`]; `ARGV` = node id,
/// connections, users, started-at ms (0: now), ttl ms. Returns `{was_live, now_ms, started_ms}`
/// where `was_live` is 1 when the node's previous field existed and was not stale.
pub const HEARTBEAT_SCRIPT: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[5])
local started = tonumber(ARGV[4])
if started == nil or started <= 0 then started = now end
local was_live = 0
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, v = pcall(cjson.decode, old)
  if ok and type(v) == 'table' and tonumber(v.heartbeatAt) and tonumber(v.heartbeatAt) + ttl > now then
    was_live = 1
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format(
  '{"connections":%d,"users":%d,"startedAt":%d,"heartbeatAt":%d}',
  tonumber(ARGV[2]), tonumber(ARGV[3]), started, now))
return {was_live, now, started}
"#;

/// Lists the live registry fields and removes the stale ones. `KEYS[1]` = [`NODES_KEY`];
/// `ARGV[1]` = ttl ms. Returns `{field, value, field, value, ...}` of live nodes.
pub const LIVE_NODES_SCRIPT: &str = r"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, v = pcall(cjson.decode, all[i + 1])
  local at = ok and type(v) == 'table' and tonumber(v.heartbeatAt)
  if at and at + ttl > now then
    out[#out + 1] = all[i]
    out[#out + 1] = all[i + 1]
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return out
";

#[derive(Debug, Clone)]
pub struct PresenceConfig {
    pub node_id: String,
    /// A node is gone when it has not heart-beaten for this long (default 10 s, as the
    /// admission lease).
    pub ttl: Duration,
}

impl PresenceConfig {
    pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

    pub fn new(node_id: impl Into<String>) -> Self {
        PresenceConfig {
            node_id: node_id.into(),
            ttl: Self::DEFAULT_TTL,
        }
    }
}

/// One live node of the registry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeInfo {
    pub id: String,
    pub connections: usize,
    pub users: usize,
    #[serde(rename = "startedAt")]
    pub started_at_ms: u64,
    #[serde(rename = "heartbeatAt")]
    pub heartbeat_at_ms: u64,
}

/// A presence hash entry is the broker's [`PresenceMember`](crate::broker::PresenceMember), stored as JSON.
pub use crate::broker::PresenceMember as PresenceEntry;

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    #[error("redis connection pool: {0}")]
    Pool(#[from] super::pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("no redis shard configured")]
    NoShards,
    /// Not written now: an earlier write failed, so this change waits (kept locally) for the
    /// next heartbeat's resync.
    #[error("redis unreachable; the change is kept and written once redis is back")]
    Deferred,
    #[error("encoding a presence entry: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<CommandsError> for PresenceError {
    fn from(e: CommandsError) -> Self {
        match e {
            CommandsError::Pool(e) => PresenceError::Pool(e),
            CommandsError::Redis(e) => PresenceError::Redis(e),
        }
    }
}

/// The registry value as stored (without the id, which is the field).
#[derive(serde::Deserialize)]
struct RegistryValue {
    connections: usize,
    users: usize,
    #[serde(rename = "startedAt")]
    started_at: u64,
    #[serde(rename = "heartbeatAt")]
    heartbeat_at: u64,
}

/// Single-key commands (key, command) to run, by shard.
type PerShard = HashMap<usize, Vec<(String, redis::Cmd)>>;

/// Queues `verb <topic's presence key> <args...>` on the shard that holds `topic`.
fn queue_topic_cmd(
    per_shard: &mut PerShard,
    shards: usize,
    topic: &str,
    verb: &str,
    args: impl FnOnce(&mut redis::Cmd),
) {
    let key = topic_presence_key(topic);
    let mut cmd = redis::cmd(verb);
    cmd.arg(&key);
    args(&mut cmd);
    per_shard
        .entry(shard_of(topic, shards))
        .or_default()
        .push((key, cmd));
}

/// What this node wrote, to write it again after Redis lost it.
#[derive(Default)]
struct LocalState {
    users: HashSet<String>,
    /// topic -> field -> JSON value.
    topics: HashMap<String, HashMap<String, String>>,
    /// Leaves whose `HDEL` failed: (topic, field).
    pending_leaves: Vec<(String, String)>,
}

/// This node's view of cluster presence; see the module doc.
pub struct Presence {
    shards: Vec<Commands>,
    config: PresenceConfig,
    nodes_script: Script,
    heartbeat_script: Script,
    /// Redis time of the first heartbeat (0 before it).
    started_at_ms: AtomicU64,
    local: Mutex<LocalState>,
    /// Set when a write failed: the next heartbeat re-writes everything.
    dirty: AtomicBool,
    /// Writes hold it shared; a resync holds it exclusively, so it never races a write.
    writes: RwLock<()>,
    op_timeout: Duration,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("config", &self.config)
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl Presence {
    /// `shards`: one per Redis shard, in shard order (shard 0 holds the registry and user sets);
    /// a single [`Commands::Cluster`] for Redis Cluster. Deadpool pools convert.
    pub fn new<C: Into<Commands>>(shards: Vec<C>, mut config: PresenceConfig) -> Self {
        if config.ttl < Duration::from_millis(30) {
            config.ttl = Duration::from_millis(30);
        }
        let op_timeout = (config.ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        Presence {
            shards: shards.into_iter().map(Into::into).collect(),
            config,
            nodes_script: Script::new(LIVE_NODES_SCRIPT),
            heartbeat_script: Script::new(HEARTBEAT_SCRIPT),
            started_at_ms: AtomicU64::new(0),
            local: Mutex::new(LocalState::default()),
            dirty: AtomicBool::new(false),
            writes: RwLock::new(()),
            op_timeout,
        }
    }

    pub fn config(&self) -> &PresenceConfig {
        &self.config
    }

    fn ttl_ms(&self) -> u64 {
        u64::try_from(self.config.ttl.as_millis()).unwrap_or(u64::MAX)
    }

    fn pool(&self, shard: usize) -> Result<&Commands, PresenceError> {
        self.shards.get(shard).ok_or(PresenceError::NoShards)
    }

    fn topic_pool(&self, topic: &str) -> Result<&Commands, PresenceError> {
        self.pool(shard_of(topic, self.shards.len()))
    }

    fn entry_field(&self, connection_id: u64) -> String {
        format!("{}:{connection_id}", self.config.node_id)
    }

    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, PresenceError>>,
    ) -> Result<T, PresenceError> {
        tokio::time::timeout(self.op_timeout, fut)
            .await
            .unwrap_or(Err(PresenceError::Timeout(self.op_timeout)))
    }

    /// While a resync is pending, writes only go to the local copy (the resync writes them), so
    /// updates do not queue behind an unreachable Redis.
    fn defer_if_dirty(&self) -> Result<(), PresenceError> {
        if self.dirty.load(Ordering::Acquire) {
            Err(PresenceError::Deferred)
        } else {
            Ok(())
        }
    }

    /// Notes a failed write: the local copy already has the change, the next heartbeat
    /// re-writes it.
    fn failed<T>(&self, what: &str, result: Result<T, PresenceError>) -> Result<T, PresenceError> {
        if let Err(e) = &result {
            self.dirty.store(true, Ordering::Release);
            tracing::debug!(node = %self.config.node_id, error = %e, "presence {what} failed; will resync");
        }
        result
    }

    /// Writes this node's registry entry (`connections`, `users`, Redis-time `heartbeatAt`),
    /// keeps its user set alive, and re-writes all of this node's presence when Redis lost it.
    pub async fn heartbeat(&self, connections: usize, users: usize) -> Result<(), PresenceError> {
        let node = &self.config.node_id;
        let ttl_ms = self.ttl_ms();
        let started = self.started_at_ms.load(Ordering::Acquire);
        let was_live = self
            .with_timeout(async {
                let mut conn = self.pool(0)?.get().await?;
                let (was_live, _now, started_ms): (i64, u64, u64) = self
                    .heartbeat_script
                    .key(NODES_KEY)
                    .arg(node)
                    .arg(connections)
                    .arg(users)
                    .arg(started)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                let _: i64 = redis::cmd("PEXPIRE")
                    .arg(node_users_key(node))
                    .arg(ttl_ms.saturating_mul(2))
                    .query_async(&mut conn)
                    .await?;
                if started == 0 {
                    self.started_at_ms.store(started_ms, Ordering::Release);
                }
                Ok(was_live == 1)
            })
            .await?;
        if !was_live || self.dirty.load(Ordering::Acquire) {
            if !was_live && started != 0 {
                tracing::info!(node = %node, "presence entry was missing or stale; re-writing presence");
            }
            self.resync().await?;
        }
        Ok(())
    }

    /// Runs [`heartbeat`](Self::heartbeat) every `ttl / 3` with the counts `counts` returns
    /// (connections, users) until this presence is dropped. Errors are logged.
    pub fn spawn_heartbeat<F>(self: &Arc<Self>, counts: F) -> tokio::task::JoinHandle<()>
    where
        F: Fn() -> (usize, usize) + Send + Sync + 'static,
    {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.config.ttl / 3;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut failing = false;
            loop {
                interval.tick().await;
                let Some(this) = weak.upgrade() else { return };
                let (connections, users) = counts();
                match this.heartbeat(connections, users).await {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(node = %this.config.node_id, "presence heartbeat reached redis again");
                    }
                    Ok(()) => {}
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(node = %this.config.node_id, error = %e, "presence heartbeat failed");
                    }
                    Err(_) => {}
                }
            }
        })
    }

    /// Re-writes everything this node holds: replaces its user set, re-adds its topic entries,
    /// retries failed leaves.
    async fn resync(&self) -> Result<(), PresenceError> {
        let _exclusive = self.writes.write().await;
        self.dirty.store(false, Ordering::Release);
        let (users, topics, leaves) = {
            let local = self.local.lock();
            (
                local.users.iter().cloned().collect::<Vec<_>>(),
                local.topics.clone(),
                local.pending_leaves.clone(),
            )
        };
        let node = &self.config.node_id;
        let result = self
            .with_timeout(async {
                let users_key = node_users_key(node);
                let mut pipe = redis::pipe();
                pipe.atomic().cmd("DEL").arg(&users_key).ignore();
                if !users.is_empty() {
                    pipe.cmd("SADD").arg(&users_key).arg(&users).ignore();
                    pipe.cmd("PEXPIRE")
                        .arg(&users_key)
                        .arg(self.ttl_ms().saturating_mul(2))
                        .ignore();
                }
                let mut conn = self.pool(0)?.get().await?;
                let () = pipe.query_async(&mut conn).await?;

                let mut per_shard = PerShard::default();
                let shards = self.shards.len();
                for (topic, entries) in &topics {
                    if entries.is_empty() {
                        continue;
                    }
                    queue_topic_cmd(&mut per_shard, shards, topic, "HSET", |cmd| {
                        for (field, value) in entries {
                            cmd.arg(field).arg(value);
                        }
                    });
                }
                for (topic, field) in &leaves {
                    let still_joined = topics.get(topic).is_some_and(|e| e.contains_key(field));
                    if !still_joined {
                        queue_topic_cmd(&mut per_shard, shards, topic, "HDEL", |cmd| {
                            cmd.arg(field);
                        });
                    }
                }
                self.run_per_shard(per_shard).await
            })
            .await;
        match result {
            Ok(()) => {
                let mut local = self.local.lock();
                local.pending_leaves.retain(|l| !leaves.contains(l));
                Ok(())
            }
            Err(e) => {
                self.dirty.store(true, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Runs single-key commands grouped by shard (see [`query_each`]: on a cluster, per slot).
    async fn run_per_shard(&self, per_shard: PerShard) -> Result<(), PresenceError> {
        for (shard, cmds) in per_shard {
            let mut conn = self.pool(shard)?.get().await?;
            query_each(&mut conn, cmds).await?;
        }
        Ok(())
    }

    /// `user` has a connection on this node now.
    pub async fn user_online(&self, user: &str) -> Result<(), PresenceError> {
        let _shared = self.writes.read().await;
        self.local.lock().users.insert(user.to_owned());
        self.defer_if_dirty()?;
        let key = node_users_key(&self.config.node_id);
        let result = self
            .with_timeout(async {
                let mut conn = self.pool(0)?.get().await?;
                let () = redis::pipe()
                    .cmd("SADD")
                    .arg(&key)
                    .arg(user)
                    .ignore()
                    .cmd("PEXPIRE")
                    .arg(&key)
                    .arg(self.ttl_ms().saturating_mul(2))
                    .ignore()
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
            .await;
        self.failed("user_online", result)
    }

    /// `user` has no connection on this node any more.
    pub async fn user_offline(&self, user: &str) -> Result<(), PresenceError> {
        let _shared = self.writes.read().await;
        self.local.lock().users.remove(user);
        self.defer_if_dirty()?;
        let key = node_users_key(&self.config.node_id);
        let result = self
            .with_timeout(async {
                let mut conn = self.pool(0)?.get().await?;
                let _: i64 = redis::cmd("SREM")
                    .arg(&key)
                    .arg(user)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
            .await;
        self.failed("user_offline", result)
    }

    /// A connection of this node joined `topic`. `entry.node` should be this node.
    pub async fn topic_join(
        &self,
        topic: &str,
        entry: &PresenceEntry,
    ) -> Result<(), PresenceError> {
        let _shared = self.writes.read().await;
        let field = self.entry_field(entry.connection_id);
        let value = serde_json::to_string(entry)?;
        {
            let mut local = self.local.lock();
            local
                .topics
                .entry(topic.to_owned())
                .or_default()
                .insert(field.clone(), value.clone());
            local
                .pending_leaves
                .retain(|(t, f)| !(t == topic && *f == field));
        }
        self.defer_if_dirty()?;
        let result = self
            .with_timeout(async {
                let mut conn = self.topic_pool(topic)?.get().await?;
                let _: i64 = redis::cmd("HSET")
                    .arg(topic_presence_key(topic))
                    .arg(&field)
                    .arg(&value)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
            .await;
        self.failed("topic_join", result)
    }

    /// A connection of this node left `topic`.
    pub async fn topic_leave(&self, topic: &str, connection_id: u64) -> Result<(), PresenceError> {
        let _shared = self.writes.read().await;
        let field = self.entry_field(connection_id);
        {
            let mut local = self.local.lock();
            if let Some(entries) = local.topics.get_mut(topic) {
                entries.remove(&field);
                if entries.is_empty() {
                    local.topics.remove(topic);
                }
            }
            if self.dirty.load(Ordering::Acquire) {
                local.pending_leaves.push((topic.to_owned(), field.clone()));
                return Err(PresenceError::Deferred);
            }
        }
        let result = self
            .with_timeout(async {
                let mut conn = self.topic_pool(topic)?.get().await?;
                let _: i64 = redis::cmd("HDEL")
                    .arg(topic_presence_key(topic))
                    .arg(&field)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
            .await;
        if result.is_err() {
            self.local
                .lock()
                .pending_leaves
                .push((topic.to_owned(), field));
        }
        self.failed("topic_leave", result)
    }

    /// The live nodes (heartbeat within `ttl`, by Redis time), sorted by id; stale registry
    /// fields are removed.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, PresenceError> {
        let flat: Vec<String> = self
            .with_timeout(async {
                let mut conn = self.pool(0)?.get().await?;
                Ok(self
                    .nodes_script
                    .key(NODES_KEY)
                    .arg(self.ttl_ms())
                    .invoke_async(&mut conn)
                    .await?)
            })
            .await?;
        let mut nodes: Vec<NodeInfo> = flat
            .chunks_exact(2)
            .filter_map(|pair| {
                let (id, value) = (&pair[0], &pair[1]);
                match serde_json::from_str::<RegistryValue>(value) {
                    Ok(v) => Some(NodeInfo {
                        id: id.clone(),
                        connections: v.connections,
                        users: v.users,
                        started_at_ms: v.started_at,
                        heartbeat_at_ms: v.heartbeat_at,
                    }),
                    Err(e) => {
                        tracing::warn!(node = %id, error = %e, "unreadable node registry entry");
                        None
                    }
                }
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(nodes)
    }

    /// Users with a connection on any live node, sorted and deduplicated.
    pub async fn online_users(&self) -> Result<Vec<String>, PresenceError> {
        let nodes = self.nodes().await?;
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let sets: Vec<Vec<String>> = self
            .with_timeout(async {
                let cmds = nodes
                    .iter()
                    .map(|node| {
                        let key = node_users_key(&node.id);
                        let mut cmd = redis::cmd("SMEMBERS");
                        cmd.arg(&key);
                        (key, cmd)
                    })
                    .collect();
                let mut conn = self.pool(0)?.get().await?;
                let replies = query_each(&mut conn, cmds).await?;
                Ok(replies
                    .into_iter()
                    .map(redis::from_redis_value)
                    .collect::<Result<Vec<Vec<String>>, _>>()
                    .map_err(redis::RedisError::from)?)
            })
            .await?;
        let users: BTreeSet<String> = sets.into_iter().flatten().collect();
        Ok(users.into_iter().collect())
    }

    /// The connections subscribed to `topic` on live nodes, sorted by node then connection id.
    /// Entries of nodes that are not live are removed.
    pub async fn topic_presence(&self, topic: &str) -> Result<Vec<PresenceEntry>, PresenceError> {
        let live: HashSet<String> = self.nodes().await?.into_iter().map(|n| n.id).collect();
        let key = topic_presence_key(topic);
        let pool = self.topic_pool(topic)?;
        let fields: Vec<(String, String)> = self
            .with_timeout(async {
                let mut conn = pool.get().await?;
                Ok(redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?)
            })
            .await?;
        let mut entries = Vec::with_capacity(fields.len());
        let mut dead = Vec::new();
        for (field, value) in fields {
            match serde_json::from_str::<PresenceEntry>(&value) {
                Ok(entry) if live.contains(&entry.node) => entries.push(entry),
                Ok(_) => dead.push(field),
                Err(e) => {
                    tracing::warn!(topic, field = %field, error = %e, "unreadable presence entry");
                    dead.push(field);
                }
            }
        }
        if !dead.is_empty() {
            // Best effort: a failure here only delays the clean-up to the next read.
            let removed = self
                .with_timeout(async {
                    let mut conn = pool.get().await?;
                    let _: i64 = redis::cmd("HDEL")
                        .arg(&key)
                        .arg(&dead)
                        .query_async(&mut conn)
                        .await?;
                    Ok(())
                })
                .await;
            if let Err(e) = removed {
                tracing::debug!(topic, error = %e, "could not remove presence entries of dead nodes");
            }
        }
        entries.sort_by(|a, b| {
            a.node
                .cmp(&b.node)
                .then(a.connection_id.cmp(&b.connection_id))
        });
        Ok(entries)
    }

    /// On shutdown: removes this node's registry entry, its user set and its topic entries.
    pub async fn deregister(&self) -> Result<(), PresenceError> {
        let _exclusive = self.writes.write().await;
        let (topics, leaves) = {
            let mut local = self.local.lock();
            local.users.clear();
            let topics = std::mem::take(&mut local.topics);
            let leaves = std::mem::take(&mut local.pending_leaves);
            (topics, leaves)
        };
        self.dirty.store(false, Ordering::Release);
        let node = &self.config.node_id;
        let result = self
            .with_timeout(async {
                let mut per_shard = PerShard::default();
                let mut registry = redis::cmd("HDEL");
                registry.arg(NODES_KEY).arg(node);
                let users_key = node_users_key(node);
                let mut users = redis::cmd("DEL");
                users.arg(&users_key);
                // Two keys in different slots: one pipeline on an instance, two on a cluster.
                per_shard
                    .entry(0)
                    .or_default()
                    .extend([(NODES_KEY.to_string(), registry), (users_key, users)]);
                let shards = self.shards.len();
                let fields = topics
                    .iter()
                    .flat_map(|(t, e)| e.keys().map(move |f| (t.as_str(), f.as_str())))
                    .chain(leaves.iter().map(|(t, f)| (t.as_str(), f.as_str())));
                for (topic, field) in fields {
                    queue_topic_cmd(&mut per_shard, shards, topic, "HDEL", |cmd| {
                        cmd.arg(field);
                    });
                }
                self.run_per_shard(per_shard).await
            })
            .await;
        match &result {
            Ok(()) => tracing::info!(node = %node, "left the node registry"),
            Err(e) => tracing::warn!(
                node = %node,
                error = %e,
                "could not leave the node registry; the entry lapses after the ttl"
            ),
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_serialize_with_api_names() {
        let entry = PresenceEntry {
            connection_id: 7,
            node: "n1".into(),
            client_id: "c".into(),
            user_id: None,
        };
        let json = serde_json::to_string(&entry).expect("serializes");
        assert_eq!(
            json,
            r#"{"connectionId":7,"node":"n1","clientId":"c","userId":null}"#
        );
        let back: PresenceEntry = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, entry);
    }
}
