//! Where the Redis broker sends its *commands* (publish scripts, admission, presence, upstream),
//! whatever Redis looks like: [`Commands`] is either a deadpool-redis pool of one instance or a
//! Redis Cluster client.
//!
//! - **One instance** (`Commands::Pool`): each [`Commands::get`] takes a pooled
//!   `MultiplexedConnection` ([`super::pool`]: reused without a round trip, replaced after a
//!   connection-level failure).
//! - **Redis Cluster** (`Commands::Cluster`): one `redis::cluster_async::ClusterConnection`
//!   (RESP3), shared by every caller (it multiplexes and routes every command to the master of
//!   its key's slot, follows MOVED/ASK and reconnects by itself). It is created on first use, so
//!   a node starts even when the cluster is down; a failed attempt is retried by the next `get`.
//!
//! [`CommandConnection`] implements [`redis::aio::ConnectionLike`] by delegating, so
//! `query_async` and `Script::invoke_async` work unchanged on both.
//!
//! # Cross-slot rules in a cluster
//!
//! A single command is routed by its first key, a script (`EVALSHA`) by its first key, and the
//! keys of one script must share a slot. The cluster connection sends a whole pipeline to one
//! node and refuses (`CrossSlot`) a pipeline whose commands name keys in different slots
//! (keyless commands such as `TIME` may ride along). [`query_each`] is the way to run a batch
//! of single-key commands that may span slots: one pipeline on a single instance, one pipeline
//! per slot (concurrently) on a cluster.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionLike;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, ProtocolVersion, RedisError, RedisFuture, RedisResult, Value};
use tokio::sync::OnceCell;

use super::pool::{self, Pool, PoolError, Pooled};

/// How long connecting to one cluster node may take.
const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command (with its retries and redirections) may take on the cluster.
const CLUSTER_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many per-slot pipelines of one [`query_each`] are in flight at once.
const MAX_CONCURRENT_PIPELINES: usize = 64;

/// A source of connections for commands; cheap to clone (clones share the pool or the cluster
/// connection).
#[derive(Clone)]
pub enum Commands {
    /// One Redis instance.
    Pool(Pool),
    /// One Redis Cluster.
    Cluster(Arc<ClusterCommands>),
}

impl std::fmt::Debug for Commands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Commands::Pool(_) => f.write_str("Commands::Pool"),
            Commands::Cluster(c) => f
                .debug_struct("Commands::Cluster")
                .field("connected", &c.conn.initialized())
                .finish(),
        }
    }
}

/// The cluster client and its lazily created connection.
pub struct ClusterCommands {
    client: ClusterClient,
    conn: OnceCell<ClusterConnection>,
}

impl From<Pool> for Commands {
    fn from(pool: Pool) -> Self {
        Commands::Pool(pool)
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum CommandsError {
    #[error("redis connection pool: {0}")]
    Pool(#[from] PoolError),
    #[error("redis cluster: {0}")]
    Redis(#[from] RedisError),
}

impl Commands {
    /// A client for the Redis Cluster that `seeds` (URLs of some of its nodes) belong to. Does not
    /// connect: the first [`get`](Self::get) does.
    pub fn cluster(seeds: &[String]) -> Result<Commands, RedisError> {
        let client = ClusterClient::builder(seeds.iter().map(String::as_str))
            .use_protocol(ProtocolVersion::RESP3)
            .connection_timeout(CLUSTER_CONNECT_TIMEOUT)
            .response_timeout(CLUSTER_RESPONSE_TIMEOUT)
            .build()?;
        Ok(Commands::Cluster(Arc::new(ClusterCommands {
            client,
            conn: OnceCell::new(),
        })))
    }

    /// Whether this is a Redis Cluster (commands then must respect slots; see the module doc).
    pub fn is_cluster(&self) -> bool {
        matches!(self, Commands::Cluster(_))
    }

    /// Drops the idle pooled connections (after Redis was found to have gone away: they are
    /// all closed). Nothing to do on a cluster, whose connection reconnects by itself.
    pub fn discard_idle(&self) {
        if let Commands::Pool(p) = self {
            pool::discard_idle(p);
        }
    }

    /// A connection to run commands on (a failure counts in `wsgate_redis_errors_total`).
    pub async fn get(&self) -> Result<CommandConnection, CommandsError> {
        let got = self.connect().await;
        if got.is_err() {
            crate::metrics::redis_error("connection");
        }
        got
    }

    async fn connect(&self) -> Result<CommandConnection, CommandsError> {
        match self {
            Commands::Pool(pool) => Ok(CommandConnection::Pool(pool.get().await?)),
            Commands::Cluster(cluster) => {
                let conn = cluster
                    .conn
                    .get_or_try_init(|| cluster.client.get_async_connection())
                    .await?;
                Ok(CommandConnection::Cluster(conn.clone()))
            }
        }
    }
}

/// A connection from [`Commands::get`]: use it like any async Redis connection.
pub enum CommandConnection {
    Pool(Pooled),
    Cluster(ClusterConnection),
}

impl CommandConnection {
    /// Whether commands on this connection go to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, CommandConnection::Cluster(_))
    }
}

/// Every command and pipeline through a [`CommandConnection`] is timed
/// (`wsgate_redis_command_duration_seconds`), and a failure or an error reply counted
/// (`wsgate_redis_errors_total{kind="command"}`): one clock read and one boxed future per round
/// trip, nothing next to the round trip itself.
impl ConnectionLike for CommandConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let sent = match self {
            CommandConnection::Pool(conn) => conn.req_packed_command(cmd),
            CommandConnection::Cluster(conn) => conn.req_packed_command(cmd),
        };
        Box::pin(async move {
            let started = std::time::Instant::now();
            let reply = sent.await;
            crate::metrics::redis_command(started.elapsed());
            if matches!(reply, Err(_) | Ok(Value::ServerError(_))) {
                crate::metrics::redis_error("command");
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let sent = match self {
            CommandConnection::Pool(conn) => conn.req_packed_commands(cmd, offset, count),
            CommandConnection::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        };
        Box::pin(async move {
            let started = std::time::Instant::now();
            let replies = sent.await;
            crate::metrics::redis_command(started.elapsed());
            let failed = match &replies {
                Err(_) => true,
                Ok(values) => values.iter().any(|v| matches!(v, Value::ServerError(_))),
            };
            if failed {
                crate::metrics::redis_error("command");
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        match self {
            CommandConnection::Pool(conn) => conn.get_db(),
            CommandConnection::Cluster(conn) => conn.get_db(),
        }
    }
}

/// Runs `cmds`, each a command on the one key given with it, and returns their replies in
/// order: in one pipeline on a single instance; on a cluster, one pipeline per hash slot, those
/// running concurrently (a pipeline spanning slots would fail with `CrossSlot`). Not atomic.
pub async fn query_each(
    conn: &mut CommandConnection,
    cmds: Vec<(String, Cmd)>,
) -> RedisResult<Vec<Value>> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    let cluster = match conn {
        CommandConnection::Pool(_) => {
            let mut pipe = redis::pipe();
            for (_, cmd) in cmds {
                pipe.add_command(cmd);
            }
            return pipe.query_async(conn).await;
        }
        CommandConnection::Cluster(cluster) => cluster.clone(),
    };
    let total = cmds.len();
    let mut groups: HashMap<Slot, (Vec<usize>, Pipeline)> = HashMap::new();
    for (i, (key, cmd)) in cmds.into_iter().enumerate() {
        let (indices, pipe) = groups.entry(Slot::for_key(key.as_bytes())).or_default();
        indices.push(i);
        pipe.add_command(cmd);
    }
    let results = run_pipelines(&cluster, groups.into_values().collect()).await?;
    let mut out = vec![Value::Nil; total];
    for (indices, values) in results {
        if values.len() != indices.len() {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "pipeline reply count mismatch",
            )));
        }
        for (i, v) in indices.into_iter().zip(values) {
            out[i] = v;
        }
    }
    Ok(out)
}

/// Runs each pipeline on the cluster, at most [`MAX_CONCURRENT_PIPELINES`] at once.
async fn run_pipelines(
    cluster: &ClusterConnection,
    groups: Vec<(Vec<usize>, Pipeline)>,
) -> RedisResult<Vec<(Vec<usize>, Vec<Value>)>> {
    let mut out = Vec::with_capacity(groups.len());
    let mut running = tokio::task::JoinSet::new();
    for (indices, pipe) in groups {
        if running.len() >= MAX_CONCURRENT_PIPELINES {
            if let Some(done) = running.join_next().await {
                out.push(joined(done)?);
            }
        }
        let mut conn = cluster.clone();
        running.spawn(async move {
            let values: Vec<Value> = pipe.query_async(&mut conn).await?;
            Ok::<_, RedisError>((indices, values))
        });
    }
    while let Some(done) = running.join_next().await {
        out.push(joined(done)?);
    }
    Ok(out)
}

fn joined<T>(done: Result<RedisResult<T>, tokio::task::JoinError>) -> RedisResult<T> {
    done.map_err(|e| {
        RedisError::from((
            redis::ErrorKind::Client,
            "pipeline task failed",
            e.to_string(),
        ))
    })?
}
