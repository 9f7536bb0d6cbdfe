//! Topic history in Redis Streams, and the one atomic publish path that feeds it.
//!
//! Every sequenced publication goes through the Redis Function `wsgate_publish` (library
//! `wsgate`, loaded by every node at start and again whenever Redis has lost it). In one atomic
//! step on the topic's Redis it:
//! 1. answers a repeated idempotency key with the first publication's position;
//! 2. INCRs the topic's `seq` and keeps its `epoch` (a new one whenever the counter starts over);
//! 3. appends the publication to the topic's stream `wsgate:t:{TOPIC}:history`, trimmed to the
//!    namespace's size (exact `MAXLEN`) and age (`MINID`), expiring with the topic's idle time;
//! 4. publishes it on `wsgate:t:{TOPIC}` with `seq`, `epoch`, `ts` in it.
//!
//! Backends in any language call the same function (README: "Publishing from a backend"):
//! `FCALL wsgate_publish 1 wsgate:t:{TOPIC} TYPE DATA_JSON [IDEMPOTENCY_KEY [REQUIRE_ACK]]`.
//! Every key it touches starts with the one key it is given, so they share its hash tag (one
//! Redis Cluster slot). The namespaces' history bounds are written into the library when a node
//! loads it, so all nodes of a cluster must share the namespace settings.
//!
//! `wsgate_history` reads a topic's stream after a position, with the stream's current position,
//! in one atomic step too, so the two always agree.

use redis::aio::ConnectionLike;
use redis::Value;

use super::commands::Commands;
use super::inbound;
use super::keys;
use crate::broker::{BrokerError, TopicMessage, IDEMPOTENCY_WINDOW, POSITION_TTL};
use crate::config::{HistorySettings, Settings};
use crate::history::{HistoryPage, StreamPosition};

/// The library's name, as `FUNCTION LIST` shows it.
pub const LIBRARY: &str = "wsgate";

/// The library's code for these settings: history bounds per namespace, the idempotency window
/// and the publish command (`PUBLISH`, or `SPUBLISH` on Redis Cluster).
pub fn library_code(settings: &Settings) -> String {
    let bounds = |h: &HistorySettings| {
        if h.enabled() {
            format!("{{{}, {}}}", h.size, h.ttl.as_millis())
        } else {
            "{0, 0}".to_string()
        }
    };
    let mut namespaces: Vec<_> = settings.namespaces.iter().collect();
    namespaces.sort_by(|a, b| a.0.cmp(b.0));
    let table: String = namespaces
        .iter()
        .map(|(name, ns)| format!("  [{}] = {},\n", lua_string(name), bounds(&ns.history)))
        .collect();
    format!(
        "#!lua name={LIBRARY}\n\
         local NAMESPACES = {{\n{table}}}\n\
         local DEFAULT = {default}\n\
         local IDEMPOTENCY_MS = {idem}\n\
         local POSITION_MS = {position}\n\
         local PUBLISH = '{publish}'\n\
         {BODY}",
        default = bounds(&settings.default_namespace.history),
        idem = IDEMPOTENCY_WINDOW.as_millis(),
        position = POSITION_TTL.as_millis(),
        publish = if settings.redis.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        },
    )
}

/// A Lua string literal (namespace names are config text).
fn lua_string(s: &str) -> String {
    let mut out = String::from("'");
    for c in s.chars() {
        match c {
            '\'' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_ascii_graphic() || c == ' ' => out.push(c),
            c => out.push_str(&format!("\\{}", u32::from(c))),
        }
    }
    out.push('\'');
    out
}

/// The functions themselves (after the settings-dependent constants).
const BODY: &str = r#"
local function topic_of(key)
  return string.match(key, '^wsgate:t:{(.+)}$')
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), t
end

-- KEYS[1] = wsgate:t:{TOPIC}; ARGV: type, data (JSON), [idempotency key], [require ack: "1"],
-- [data already checked: "trusted"]. Returns {seq, epoch, duplicate (0/1)}.
local function publish(keys, args)
  local channel = keys[1]
  local topic = channel and topic_of(channel)
  if not topic then
    return redis.error_reply('ERR wsgate_publish: the key must be wsgate:t:{TOPIC}')
  end
  local kind, data = args[1], args[2]
  if not kind or kind == '' or not data then
    return redis.error_reply('ERR wsgate_publish: arguments are TYPE DATA_JSON [IDEMPOTENCY_KEY [REQUIRE_ACK]]')
  end
  if args[5] ~= 'trusted' and not pcall(cjson.decode, data) then
    return redis.error_reply('ERR wsgate_publish: DATA_JSON is not valid JSON')
  end
  local idem = args[3] or ''
  local idem_key = channel .. ':idem:' .. idem
  if idem ~= '' then
    local first = redis.call('GET', idem_key)
    if first then
      local seq, epoch = string.match(first, '^(%d+):(.*)$')
      return {tonumber(seq), epoch, 1}
    end
  end
  local seq = redis.call('INCR', channel .. ':seq')
  local epoch = redis.call('GET', channel .. ':epoch')
  local ms, t = now_ms()
  if seq == 1 or not epoch then
    epoch = string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
    redis.call('SET', channel .. ':epoch', epoch)
  end
  -- The position outlives any history, but not forever (both go together).
  redis.call('PEXPIRE', channel .. ':seq', POSITION_MS)
  redis.call('PEXPIRE', channel .. ':epoch', POSITION_MS)
  local spec = '{"seq":' .. seq .. ',"epoch":"' .. epoch .. '","ts":' .. ms ..
    ',"type":' .. cjson.encode(kind)
  if args[4] == '1' then
    spec = spec .. ',"requireAck":true'
  end
  spec = spec .. ',"data":' .. data .. '}'
  local ns = string.match(topic, '^([^:]*):')
  local bounds = (ns and NAMESPACES[ns]) or DEFAULT
  if bounds[1] > 0 then
    local stream = channel .. ':history'
    redis.call('XADD', stream, 'MAXLEN', bounds[1], '*', 's', seq, 'd', spec)
    redis.call('XTRIM', stream, 'MINID', ms - bounds[2])
    redis.call('PEXPIRE', stream, bounds[2])
  end
  redis.call(PUBLISH, channel, spec)
  if idem ~= '' then
    redis.call('SET', idem_key, seq .. ':' .. epoch, 'PX', IDEMPOTENCY_MS)
  end
  return {seq, epoch, 0}
end

-- KEYS[1] = wsgate:t:{TOPIC}; ARGV: since seq ('' for none), since epoch, limit.
-- Returns {seq, epoch, spec...}: the stream's position (0, '' when none) and the publications
-- after `since` (the oldest limit + 1 of them, so the caller sees whether there are more), or
-- the newest `limit` without it; oldest first, none older than the namespace's ttl.
local function history(keys, args)
  local channel = keys[1]
  if not (channel and topic_of(channel)) then
    return redis.error_reply('ERR wsgate_history: the key must be wsgate:t:{TOPIC}')
  end
  local top = tonumber(redis.call('GET', channel .. ':seq') or '0')
  local epoch = redis.call('GET', channel .. ':epoch') or ''
  local limit = tonumber(args[3]) or 100
  -- Newest first: everything after `since` (the stream never holds more than its size), or
  -- the newest `limit` without it.
  local count = limit
  local take = limit
  if args[1] ~= '' then
    -- Seq 0 means "nothing seen yet": this epoch from its start will do.
    if args[2] ~= epoch and tonumber(args[1]) ~= 0 then
      return {top, epoch}
    end
    count = top - tonumber(args[1])
    take = limit + 1
  end
  local out = {top, epoch}
  if count <= 0 or take <= 0 then
    return out
  end
  -- Entries older than the namespace's ttl are only trimmed by the next publish; a quiet
  -- topic must not serve them meanwhile.
  local ns = string.match(topic_of(channel), '^([^:]*):')
  local bounds = (ns and NAMESPACES[ns]) or DEFAULT
  local oldest = now_ms() - bounds[2]
  local entries = redis.call('XREVRANGE', channel .. ':history', '+', '-', 'COUNT', count)
  local taken = 0
  for i = #entries, 1, -1 do
    local ms = tonumber(string.match(entries[i][1], '^(%d+)'))
    if ms and ms >= oldest and taken < take then
      local fields = entries[i][2]
      for j = 1, #fields, 2 do
        if fields[j] == 'd' then
          table.insert(out, fields[j + 1])
          taken = taken + 1
        end
      end
    end
  end
  return out
end

redis.register_function('wsgate_publish', publish)
redis.register_function{function_name = 'wsgate_history', callback = history, flags = {'no-writes'}}
"#;

/// Loads (or replaces) the library on `commands`' Redis (every master, on a cluster).
pub async fn load_library(commands: &Commands, code: &str) -> Result<(), BrokerError> {
    let mut conn = commands.get().await.map_err(unavailable)?;
    let _: Value = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(code)
        .query_async(&mut conn)
        .await
        .map_err(unavailable)?;
    Ok(())
}

/// Whether an error says the library is missing (Redis restarted without persistence, or was
/// flushed), so loading it again and retrying is the cure.
fn is_missing_function(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    text.contains("Function not found") || text.contains("function not found")
}

/// What `wsgate_publish` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub position: StreamPosition,
    pub duplicate: bool,
}

/// Publishes through `wsgate_publish` on `commands`' Redis (loading the library again first
/// if that Redis lost it).
pub async fn publish(
    commands: &Commands,
    library: &str,
    msg: &TopicMessage,
) -> Result<Published, BrokerError> {
    let mut conn = commands.get().await.map_err(unavailable)?;
    match call_publish(&mut conn, msg).await {
        Err(e) if is_missing_function(&e) => {
            load_library(commands, library).await?;
            call_publish(&mut conn, msg).await
        }
        other => other,
    }
    .map_err(unavailable)
}

/// Reads `topic`'s history after `since` through `wsgate_history` (see
/// [`HistoryPage::after`]), loading the library again first if that Redis lost it.
pub async fn read(
    commands: &Commands,
    library: &str,
    topic: &str,
    since: Option<&StreamPosition>,
    limit: usize,
) -> Result<HistoryPage, BrokerError> {
    let mut conn = commands.get().await.map_err(unavailable)?;
    match call_history(&mut conn, topic, since, limit).await {
        Err(e) if is_missing_function(&e) => {
            load_library(commands, library).await?;
            call_history(&mut conn, topic, since, limit).await
        }
        other => other,
    }
    .map_err(unavailable)
}

async fn call_publish<C: ConnectionLike>(
    conn: &mut C,
    msg: &TopicMessage,
) -> Result<Published, redis::RedisError> {
    let (seq, epoch, duplicate): (u64, String, u8) = redis::cmd("FCALL")
        .arg("wsgate_publish")
        .arg(1)
        .arg(keys::topic_channel(&msg.topic))
        .arg(&msg.kind)
        .arg(msg.data.get())
        .arg(msg.idempotency_key.as_deref().unwrap_or(""))
        .arg(if msg.require_ack { "1" } else { "" })
        .arg("trusted")
        .query_async(conn)
        .await?;
    Ok(Published {
        position: StreamPosition { seq, epoch },
        duplicate: duplicate == 1,
    })
}

async fn call_history<C: ConnectionLike>(
    conn: &mut C,
    topic: &str,
    since: Option<&StreamPosition>,
    limit: usize,
) -> Result<HistoryPage, redis::RedisError> {
    let (since_seq, since_epoch) = match since {
        Some(p) => (p.seq.to_string(), p.epoch.as_str()),
        None => (String::new(), ""),
    };
    let reply: Vec<Value> = redis::cmd("FCALL_RO")
        .arg("wsgate_history")
        .arg(1)
        .arg(keys::topic_channel(topic))
        .arg(since_seq)
        .arg(since_epoch)
        .arg(limit)
        .query_async(conn)
        .await?;
    let mut items = reply.into_iter();
    let seq: u64 = items
        .next()
        .map(redis::from_redis_value)
        .transpose()?
        .unwrap_or(0);
    let epoch: String = items
        .next()
        .map(redis::from_redis_value)
        .transpose()?
        .unwrap_or_default();
    let position = (seq > 0 && !epoch.is_empty()).then_some(StreamPosition { seq, epoch });
    let mut found = Vec::new();
    for item in items {
        let spec: Vec<u8> = redis::from_redis_value(item)?;
        match inbound::publication_from_spec(topic, &spec) {
            Ok(p) => found.push(p),
            Err(e) => tracing::warn!(topic, error = %e, "skipped an unreadable history entry"),
        }
    }
    Ok(HistoryPage::after(since, position, found, limit))
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NamespaceSettings;
    use std::time::Duration;

    #[test]
    fn library_carries_the_namespace_bounds() {
        let mut settings = Settings::for_loopback();
        settings.namespaces.insert(
            "chat".into(),
            NamespaceSettings {
                history: HistorySettings {
                    size: 7,
                    ttl: Duration::from_secs(9),
                },
                ..NamespaceSettings::default()
            },
        );
        settings.namespaces.insert(
            "o'dd".into(),
            NamespaceSettings {
                history: HistorySettings {
                    size: 0,
                    ttl: Duration::from_secs(9),
                },
                ..NamespaceSettings::default()
            },
        );
        let code = library_code(&settings);
        assert!(code.starts_with("#!lua name=wsgate\n"), "{code}");
        assert!(code.contains("['chat'] = {7, 9000}"), "{code}");
        assert!(code.contains("['o\\'dd'] = {0, 0}"), "{code}");
        assert!(code.contains("local DEFAULT = {100, 300000}"), "{code}");
        assert!(code.contains("local PUBLISH = 'PUBLISH'"), "{code}");
    }
}
