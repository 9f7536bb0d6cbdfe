//! Redis Cluster hash slots, for the subscription connection's cluster mode
//! ([`super::pubsub`]): the slot of a key, the one SSUBSCRIBE/SUNSUBSCRIBE per slot that a batch
//! of channels becomes, and the health check that asks every master by a key of its own slots.
//!
//! Kept apart from `pubsub` because none of it depends on the actor's state: these are plain
//! functions of a `ClusterConnection` and the slot map.

use std::collections::{HashMap, HashSet};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{RedisError, Value};

use super::pubsub::MAX_CHANNELS_PER_COMMAND;

/// At most this many per-slot SSUBSCRIBE/SUNSUBSCRIBE commands are in flight at once.
const MAX_CONCURRENT_SLOT_COMMANDS: usize = 64;

/// The cluster health check: succeeds only when every master answers. A keyless PING will not
/// do: the cluster connection sends it to the connected masters only, and a command routed to a
/// slot whose master is unreachable may be answered by another node. So this reads the slot
/// map (`CLUSTER SLOTS`) and sends, per master, an `EXISTS` of a probe key in one of its slots:
/// only the slot's owner answers that (others redirect to it).
pub(super) async fn probe_masters(mut conn: ClusterConnection) -> Result<(), RedisError> {
    let slots: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut conn)
        .await?;
    let ranges = master_slot_ranges(slots);
    if ranges.is_empty() {
        return Err(RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "CLUSTER SLOTS lists no slot",
        )));
    }
    let mut running = tokio::task::JoinSet::new();
    for (start, end) in ranges {
        let Some(key) = probe_key(start, end) else {
            continue;
        };
        let mut conn = conn.clone();
        running.spawn(async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<Value>(&mut conn)
                .await
                .map(|_| ())
        });
    }
    while let Some(done) = running.join_next().await {
        slot_command_done(done)?;
    }
    Ok(())
}

/// One slot range per master from a `CLUSTER SLOTS` reply (`[[start, end, [host, port, id],
/// replicas...], ...]`); ranges whose master id is unknown count as their own master.
fn master_slot_ranges(reply: Value) -> Vec<(u16, u16)> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    let mut ranges = Vec::new();
    for item in items {
        let Value::Array(fields) = item else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end))) = (fields.first(), fields.get(1))
        else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
            continue;
        };
        let master_id = match fields.get(2) {
            Some(Value::Array(master)) => match master.get(2) {
                Some(Value::BulkString(id)) => Some(id.clone()),
                _ => None,
            },
            _ => None,
        };
        if master_id.is_none_or(|id| seen.insert(id)) {
            ranges.push((start, end));
        }
    }
    ranges
}

/// A key whose hash slot is in `start..=end` (`None` if the range is not a valid slot range).
fn probe_key(start: u16, end: u16) -> Option<String> {
    if start > end || end >= CLUSTER_SLOTS {
        return None;
    }
    // A random key lands in a given single slot once in 16384 tries on average.
    (0..1_000_000u32)
        .map(|n| format!("wsgate:probe:{n}"))
        .find(|key| (start..=end).contains(&key_slot(key)))
}

/// The number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: u16 = 16384;

/// The hash slot of `key` (CRC16/XMODEM of the key, or of its `{hash tag}`, mod 16384).
fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &b in hashed {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % CLUSTER_SLOTS
}

/// SSUBSCRIBE (`subscribe`) or SUNSUBSCRIBE `channels` on a cluster: one command per slot (and
/// per [`MAX_CHANNELS_PER_COMMAND`] channels), since one naming channels of several slots fails
/// with `CrossSlot`; at most [`MAX_CONCURRENT_SLOT_COMMANDS`] in flight.
pub(super) async fn per_slot(
    conn: &ClusterConnection,
    channels: &[String],
    subscribe: bool,
) -> Result<(), RedisError> {
    let mut by_slot: HashMap<Slot, Vec<String>> = HashMap::new();
    for channel in channels {
        by_slot
            .entry(Slot::for_key(channel.as_bytes()))
            .or_default()
            .push(channel.clone());
    }
    let mut running = tokio::task::JoinSet::new();
    for group in by_slot.into_values() {
        for chunk in group.chunks(MAX_CHANNELS_PER_COMMAND) {
            if running.len() >= MAX_CONCURRENT_SLOT_COMMANDS {
                if let Some(done) = running.join_next().await {
                    slot_command_done(done)?;
                }
            }
            let mut conn = conn.clone();
            let chunk = chunk.to_vec();
            running.spawn(async move {
                if subscribe {
                    conn.ssubscribe(chunk).await
                } else {
                    conn.sunsubscribe(chunk).await
                }
            });
        }
    }
    while let Some(done) = running.join_next().await {
        slot_command_done(done)?;
    }
    Ok(())
}

/// The outcome of one per-slot command task (a panicked or cancelled task counts as failed).
pub(super) fn slot_command_done(
    done: Result<Result<(), RedisError>, tokio::task::JoinError>,
) -> Result<(), RedisError> {
    done.map_err(|e| {
        RedisError::from((
            redis::ErrorKind::Client,
            "subscription task failed",
            e.to_string(),
        ))
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis() {
        // CLUSTER KEYSLOT reference values.
        assert_eq!(key_slot("123456789"), 12739);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        for key in [
            "wsgate:broadcast",
            "wsgate:t:{routes}",
            "a{b}c",
            "foo{}{bar}",
            "{",
        ] {
            assert_eq!(
                Slot::new(key_slot(key)),
                Some(Slot::for_key(key.as_bytes())),
                "{key}"
            );
        }
        let key = probe_key(100, 100).expect("a key for every slot");
        assert_eq!(key_slot(&key), 100);
        assert_eq!(probe_key(5, 4), None);
    }

    #[test]
    fn one_slot_range_per_master() {
        let node = |port: i64, id: &str| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(id.as_bytes().to_vec()),
            ])
        };
        let range = |start: i64, end: i64, master: Value| {
            Value::Array(vec![Value::Int(start), Value::Int(end), master])
        };
        let reply = Value::Array(vec![
            range(0, 5460, node(7000, "m1")),
            range(5461, 10922, node(7001, "m2")),
            range(10923, 16000, node(7002, "m3")),
            range(16001, 16383, node(7000, "m1")),
            Value::Int(3),
            range(-1, 5, node(7003, "bad")),
        ]);
        assert_eq!(
            master_slot_ranges(reply),
            vec![(0, 5460), (5461, 10922), (10923, 16000)]
        );
        assert!(master_slot_ranges(Value::Nil).is_empty());
    }
}
