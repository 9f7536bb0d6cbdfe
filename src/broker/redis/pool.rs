//! The pool of command connections to one Redis instance: deadpool over redis-rs
//! `MultiplexedConnection`s (created by deadpool-redis's manager), checked for reuse without a
//! round trip on the hot path.
//!
//! deadpool-redis's own manager sends `UNWATCH` + `PING` every time a connection leaves the pool.
//! For an HTTP publish that is a second round trip next to the one `FCALL`: on a loaded node it
//! was a third of the node's Redis-connection CPU and as many Redis requests again as the
//! publishes themselves. wsgate never `WATCH`es on a pooled connection (its one `MULTI` goes out
//! in a single pipeline with its `EXEC`), so the `UNWATCH` has nothing to undo, and the `PING`
//! is kept only where it finds something:
//! - a connection that saw a connection-level failure (I/O error, dropped, timed out) is marked
//!   broken (every command through it notes its outcome) and discarded instead of reused;
//! - a connection idle for [`PING_AFTER_IDLE`] or longer is pinged first, so one whose Redis went
//!   away while the node was quiet is replaced before a caller's command fails on it;
//! - the broker drops every idle connection when its subscription connection to the same Redis
//!   had to reconnect ([`discard_idle`]): a restarted Redis has closed them all.

use std::time::Duration;

use deadpool::managed::{self, Metrics, RecycleError, RecycleResult};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};

/// A pooled connection idle this long is pinged before it is handed out again.
pub const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The pool of command connections to one Redis instance.
pub type Pool = managed::Pool<Manager>;

/// A connection taken from a [`Pool`] (back into it on drop).
pub type Pooled = managed::Object<Manager>;

/// Why [`Pool::get`] gave no connection (the same type as `deadpool_redis::PoolError`).
pub type PoolError = managed::PoolError<RedisError>;

/// Why no pool could be built (only a malformed URL).
#[derive(Debug, thiserror::Error)]
pub enum CreatePoolError {
    #[error("redis url: {0}")]
    Url(#[from] RedisError),
    #[error("redis pool: {0}")]
    Build(#[from] managed::BuildError),
}

/// A pool for the Redis at `url` with deadpool's default size (four connections per CPU);
/// connects lazily.
pub fn create(url: &str) -> Result<Pool, CreatePoolError> {
    let manager = Manager {
        connect: deadpool_redis::Manager::new(url)?,
    };
    Ok(Pool::builder(manager)
        .runtime(deadpool::Runtime::Tokio1)
        .build()?)
}

/// Drops every connection now idle in `pool` (they are created anew on demand).
pub fn discard_idle(pool: &Pool) {
    let dropped = pool.retain(|_, _| false);
    if !dropped.removed.is_empty() {
        tracing::debug!(
            dropped = dropped.removed.len(),
            "dropped idle redis command connections"
        );
    }
}

/// One pooled connection and whether it is known to be broken.
pub struct PooledConnection {
    conn: MultiplexedConnection,
    broken: bool,
}

impl PooledConnection {
    /// Looks at a command's outcome: a connection-level failure means the connection must not
    /// be reused (a reply that is a Redis error says nothing about the connection).
    fn note<T>(&mut self, outcome: &RedisResult<T>) {
        if outcome.as_ref().is_err_and(breaks_connection) {
            self.broken = true;
        }
    }
}

/// Whether `e` says the connection itself failed (rather than Redis answering with an error).
fn breaks_connection(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
}

/// Every command notes its outcome on the way back, so a broken connection never goes out of
/// the pool again. (The connection's inherent `send_packed_*` are called, so this is the only
/// boxed future per command.)
impl ConnectionLike for PooledConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let reply = self.conn.send_packed_command(cmd).await;
            self.note(&reply);
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let replies = self.conn.send_packed_commands(cmd, offset, count).await;
            self.note(&replies);
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}

/// Creates connections as deadpool-redis does; recycles as the module doc says.
pub struct Manager {
    connect: deadpool_redis::Manager,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager").finish_non_exhaustive()
    }
}

impl managed::Manager for Manager {
    type Type = PooledConnection;
    type Error = RedisError;

    async fn create(&self) -> Result<PooledConnection, RedisError> {
        let conn = managed::Manager::create(&self.connect).await?;
        Ok(PooledConnection {
            conn,
            broken: false,
        })
    }

    async fn recycle(
        &self,
        conn: &mut PooledConnection,
        metrics: &Metrics,
    ) -> RecycleResult<RedisError> {
        if conn.broken {
            return Err(RecycleError::message("connection failed"));
        }
        if metrics.last_used() >= PING_AFTER_IDLE {
            let pong: String = redis::cmd("PING").query_async(&mut conn.conn).await?;
            if pong != "PONG" {
                return Err(RecycleError::message("unexpected PING reply"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_error(kind: std::io::ErrorKind) -> RedisError {
        RedisError::from(std::io::Error::from(kind))
    }

    #[test]
    fn connection_failures_break_the_connection_but_error_replies_do_not() {
        let reply = RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!breaks_connection(&reply));
        for kind in [
            std::io::ErrorKind::BrokenPipe,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            assert!(breaks_connection(&io_error(kind)), "{kind:?}");
        }
    }
}
