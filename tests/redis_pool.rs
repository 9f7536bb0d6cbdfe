//! The command-connection pool against a real redis-server: busy connections go back out
//! without a round trip, idle ones are pinged, and a Redis that restarted costs a connection at
//! most one failed command.

mod common;

use std::time::Duration;

use common::redis::RedisServer;
use wsgate::broker::redis::commands::Commands;
use wsgate::broker::redis::pool::{self, PING_AFTER_IDLE};

fn commands(server: &RedisServer) -> Commands {
    pool::create(&server.url()).expect("pool").into()
}

/// One `GET` on a connection taken from the pool (given back when done).
async fn get_once(commands: &Commands) -> redis::RedisResult<Option<String>> {
    let mut conn = commands.get().await.map_err(|e| {
        redis::RedisError::from((redis::ErrorKind::Io, "no connection", e.to_string()))
    })?;
    redis::cmd("GET").arg("k").query_async(&mut conn).await
}

#[tokio::test]
async fn a_connection_in_use_goes_back_out_without_a_ping() {
    let server = RedisServer::start();
    let commands = commands(&server);
    // The harness pings while waiting for the server to come up.
    let pings = server.command_calls("ping");
    const ROUNDS: u64 = 200;
    for _ in 0..ROUNDS {
        get_once(&commands).await.expect("GET");
    }
    assert_eq!(server.command_calls("get"), ROUNDS);
    // deadpool-redis's own recycle pings on every take: ROUNDS - 1 of them.
    assert_eq!(server.command_calls("ping"), pings);
    assert_eq!(server.command_calls("unwatch"), 0);
}

#[tokio::test]
async fn a_connection_idle_past_the_threshold_is_pinged_before_reuse() {
    let server = RedisServer::start();
    let commands = commands(&server);
    get_once(&commands).await.expect("GET");
    let pings = server.command_calls("ping");
    tokio::time::sleep(PING_AFTER_IDLE + Duration::from_millis(100)).await;
    get_once(&commands).await.expect("GET");
    assert_eq!(server.command_calls("ping"), pings + 1);
}

/// A pool with one connection that was busy a moment ago, which Redis has just closed as a
/// restart does (the server is returned to keep it running). `CLIENT KILL` rather than a real
/// restart: a restart slower than `PING_AFTER_IDLE` (a loaded runner) would leave the
/// connection idle long enough to be pinged, and the broken-connection path untested.
async fn pool_across_a_restart() -> (RedisServer, Commands) {
    let server = RedisServer::start();
    let commands = commands(&server);
    get_once(&commands).await.expect("GET");
    // Every client but redis-cli itself (SKIPME defaults to yes): the pool's one connection.
    assert_eq!(server.cli(&["CLIENT", "KILL", "TYPE", "normal"]), "1");
    (server, commands)
}

#[tokio::test]
async fn after_a_redis_restart_a_broken_connection_fails_once_then_is_replaced() {
    let (_server, commands) = pool_across_a_restart().await;
    // The pooled connection was closed by the old server; the pool cannot know before using it
    // (it was busy a moment ago, so it is not pinged).
    let first = get_once(&commands).await;
    assert!(first.is_err(), "{first:?}");
    // That failure marked it broken: the next take gets a fresh connection.
    get_once(&commands)
        .await
        .expect("GET on a new connection after the failure");
}

#[tokio::test]
async fn discarding_idle_connections_after_a_restart_costs_no_failure() {
    let (_server, commands) = pool_across_a_restart().await;
    commands.discard_idle();
    get_once(&commands)
        .await
        .expect("GET on a new connection, the closed one dropped");
}
