//! Cluster-wide `max_connections`: every node reserves connection slots from one shared budget
//! in Redis, a small block at a time, under a lease that it renews.
//!
//! # Scheme
//!
//! The whole admission state is **one Redis hash**, [`ADMISSION_KEY`]: one field per node,
//! valued `"<reserved>:<expires_at_ms>"`. One key means one slot, so it works unchanged on Redis
//! Cluster, needs no cross-slot access and never KEYS/SCANs. Every change goes through one Lua
//! script ([`RESERVE_SCRIPT`]) that, atomically and by the **Redis server's clock**
//! (`redis.call('TIME')`, never a node's):
//!
//! 1. drops the fields whose lease expired (and malformed ones),
//! 2. sums the live reservations of the *other* nodes,
//! 3. sets the caller's reservation to `min(wanted, max_connections - others)` (at least 0) with a
//!    fresh expiry `now + lease_ttl` — or removes the field when that is 0,
//! 4. sets the key to expire when its last lease does, and returns the new reservation.
//!
//! A node asks for an *absolute* reservation, so one script covers everything:
//!
//! * [`ClusterAdmission::reserve_block`]: wanted = current limit + `block`; the grant is
//!   `min(block, max - total)` (the remainder of the budget near the end). A connect only waits
//!   on Redis when the node has used up its reservation: [`ClusterAdmission::grow`] is what the
//!   connect path calls and reserves only when there is no headroom left.
//! * [`ClusterAdmission::tick`] (every `lease_ttl / 3`, see [`ClusterAdmission::spawn_maintenance`]):
//!   renews the lease with wanted = current limit; when `limit - live >= 2 * block` it gives the
//!   surplus back, keeping one block of headroom (wanted = `live + block`); when the lease had
//!   expired it re-reserves what it needs to cover its live connections.
//! * [`ClusterAdmission::release_all`] (shutdown): `HDEL` of the node's field.
//!
//! Because the reservation is absolute, a reply lost to a timeout cannot leak slots: the next
//! tick writes the node's real limit back.
//!
//! The node's local [`ConnectionSlots`] limit always mirrors its reservation, so admitting a
//! connection is a local atomic compare — Redis is not on the connect path while a node has
//! headroom.
//!
//! # Guarantee and margin
//!
//! Every script run keeps the **sum of live reservations `<= max_connections`** (each node only
//! ever takes what the others leave, all inside one atomic script). A node never holds more
//! connections than its reservation while its lease is live, so the cluster never admits more
//! than `max_connections`.
//!
//! The one exception — the **lease margin** — is a node that is alive and holds connections but
//! whose lease expired: its renewals failed for a whole `lease_ttl` (Redis unreachable from that
//! node, a long stall), or Redis lost the hash (restart without persistence) and the node has not
//! ticked since (at most `lease_ttl / 3`). Other nodes may then reserve its share while its connections stay up. The
//! cluster-wide excess is bounded by that node's reservation (its local limit, which it never
//! raises without Redis), so: **admitted <= `max_connections` + the reservations of the nodes
//! whose lease lapsed while alive** — at most `max_connections + R` for one such node holding
//! `R`. When it reaches Redis again its tick re-reserves `min(live, what is free)`; until the
//! others shrink, its limit stays below its live count and it admits nothing new (logged as a
//! warning).
//!
//! **A dead node's share comes back within `lease_ttl`** (default 10 s) of its last renewal: the
//! next script run after the expiry drops its field.
//!
//! # Policy while Redis is unreachable (fail-static)
//!
//! [`ClusterAdmission::reserve_block`] and [`ClusterAdmission::tick`] return
//! [`AdmissionError`] and leave the local limit **unchanged**: the node keeps admitting
//! connections within the reservation it already holds, and nothing beyond it (the connect path
//! then refuses with close code 1013, "try again later"). For [`RETRY_AFTER`] after a failure,
//! `reserve_block`/`grow` fail at once ([`AdmissionError::Unavailable`]) rather than queue
//! connects behind an unreachable Redis; every Redis trip is bounded by a timeout of
//! `lease_ttl / 4` (clamped to 100 ms ..= 2 s). Existing connections are never closed
//! for admission reasons. After Redis comes back the next tick re-establishes the lease (and
//! re-reserves the node's limit, even if Redis lost its data).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::Script;
use tokio::sync::Mutex;

use super::commands::{Commands, CommandsError};
use super::keys::ADMISSION_KEY;
use crate::limits::ConnectionSlots;

/// The admission script. `KEYS[1]` = [`ADMISSION_KEY`]; `ARGV` = node id, wanted reservation,
/// `max_connections`, lease TTL in ms. Returns `{granted, previous, others}` where `previous` is
/// the node's live reservation before the call (`-1` when it had none or its lease had expired)
/// and `others` the sum of the other nodes' live reservations.
pub const RESERVE_SCRIPT: &str = r"
-- Before Redis 5 scripts calling TIME must replicate effects; later versions always do.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local node = ARGV[1]
local want = tonumber(ARGV[2])
local max = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local others = 0
local previous = -1
local last = 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local field = all[i]
  local r, e = string.match(all[i + 1], '^(%d+):(%d+)$')
  r = tonumber(r)
  e = tonumber(e)
  if r == nil or e == nil or e <= now then
    redis.call('HDEL', KEYS[1], field)
  elseif field == node then
    previous = r
  else
    others = others + r
    if e > last then last = e end
  end
end
local granted = max - others
if want < granted then granted = want end
if granted < 0 then granted = 0 end
if granted > 0 then
  local expires = now + ttl
  redis.call('HSET', KEYS[1], node, string.format('%d:%d', granted, expires))
  if expires > last then last = expires end
else
  redis.call('HDEL', KEYS[1], node)
end
if last > 0 then redis.call('PEXPIREAT', KEYS[1], last + 1000) end
return {granted, previous, others}
";

/// After a failed trip to Redis, `reserve_block`/`grow` fail at once for this long instead of
/// trying again (so a connect storm does not queue behind an unreachable Redis); `tick` always
/// tries.
pub const RETRY_AFTER: Duration = Duration::from_millis(500);

/// How a node takes part in cluster admission.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    pub node_id: String,
    /// The cluster-wide budget (every node must use the same value).
    pub max_connections: usize,
    /// Slots reserved per trip to Redis (default 16; at least 1).
    pub block: usize,
    /// How long a reservation lives without renewal (default 10 s); renewed every third of it.
    pub lease_ttl: Duration,
}

impl AdmissionConfig {
    pub const DEFAULT_BLOCK: usize = 16;
    pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

    /// Defaults for `node_id` with `max_connections`.
    pub fn new(node_id: impl Into<String>, max_connections: usize) -> Self {
        AdmissionConfig {
            node_id: node_id.into(),
            max_connections,
            block: Self::DEFAULT_BLOCK,
            lease_ttl: Self::DEFAULT_LEASE_TTL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("redis connection pool: {0}")]
    Pool(#[from] super::pool::PoolError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Not tried: the last attempt failed this long ago (less than [`RETRY_AFTER`]).
    #[error("redis unreachable (last attempt failed {0:?} ago)")]
    Unavailable(Duration),
}

impl From<CommandsError> for AdmissionError {
    fn from(e: CommandsError) -> Self {
        match e {
            CommandsError::Pool(e) => AdmissionError::Pool(e),
            CommandsError::Redis(e) => AdmissionError::Redis(e),
        }
    }
}

/// This node's share of the cluster connection budget; see the module doc.
pub struct ClusterAdmission {
    commands: Commands,
    config: AdmissionConfig,
    slots: Arc<ConnectionSlots>,
    script: Script,
    /// One admission change at a time on this node, so the local limit always mirrors the last
    /// reservation Redis granted.
    op: Mutex<()>,
    /// Set by `release_all`: no more reservations.
    closed: AtomicBool,
    /// When the last trip to Redis failed (`None` while it works): outages are logged once, and
    /// the connect path does not queue behind a Redis that just failed.
    last_failure: parking_lot::Mutex<Option<Instant>>,
    op_timeout: Duration,
}

impl std::fmt::Debug for ClusterAdmission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterAdmission")
            .field("config", &self.config)
            .field("limit", &self.slots.limit())
            .field("live", &self.slots.live())
            .finish_non_exhaustive()
    }
}

/// What one script run returned.
#[derive(Debug, Clone, Copy)]
struct Grant {
    granted: usize,
    /// The node's live reservation before the run; `None` when its lease had lapsed.
    previous: Option<usize>,
    others: usize,
}

impl ClusterAdmission {
    /// Admission for this node; `slots` should start at limit 0
    /// (`ConnectionSlots::with_limit(max, 0)`): the node admits nothing it has not reserved.
    /// Call [`reserve_block`](Self::reserve_block) once at start-up to have a first block ready
    /// and [`spawn_maintenance`](Self::spawn_maintenance) to keep the lease.
    /// `commands`: the instance (or cluster) holding [`ADMISSION_KEY`]; a deadpool pool converts.
    pub fn new(
        commands: impl Into<Commands>,
        mut config: AdmissionConfig,
        slots: Arc<ConnectionSlots>,
    ) -> Arc<Self> {
        config.block = config.block.max(1);
        if config.lease_ttl < Duration::from_millis(30) {
            config.lease_ttl = Duration::from_millis(30);
        }
        let op_timeout =
            (config.lease_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(2));
        Arc::new(ClusterAdmission {
            commands: commands.into(),
            config,
            slots,
            script: Script::new(RESERVE_SCRIPT),
            op: Mutex::new(()),
            closed: AtomicBool::new(false),
            last_failure: parking_lot::Mutex::new(None),
            op_timeout,
        })
    }

    pub fn config(&self) -> &AdmissionConfig {
        &self.config
    }

    pub fn slots(&self) -> &Arc<ConnectionSlots> {
        &self.slots
    }

    /// Reserves another block (or the remainder of the budget) from Redis and raises the slots'
    /// limit; `Ok(false)` when the cluster budget is exhausted (or after `release_all`).
    /// On error the limit is unchanged (fail-static).
    pub async fn reserve_block(&self) -> Result<bool, AdmissionError> {
        let _op = self.op.lock().await;
        self.reserve_locked().await
    }

    /// What the connect path calls when `try_acquire` failed: reserves a block only if no other
    /// task made room meanwhile, so a burst of connects costs one trip to Redis per block, not
    /// one per connection. `Ok(true)` when the node has headroom now.
    pub async fn grow(&self) -> Result<bool, AdmissionError> {
        let _op = self.op.lock().await;
        if self.slots.limit() > self.slots.live() {
            return Ok(true);
        }
        self.reserve_locked().await
    }

    async fn reserve_locked(&self) -> Result<bool, AdmissionError> {
        if self.closed.load(Ordering::Acquire) {
            return Ok(false);
        }
        let limit = self.slots.limit();
        let want = limit
            .saturating_add(self.config.block)
            .min(self.config.max_connections);
        if let Some(ago) = self.failed_recently() {
            return Err(AdmissionError::Unavailable(ago));
        }
        let grant = self.run(want).await?;
        self.apply(limit, grant);
        if grant.granted > limit {
            tracing::debug!(
                node = %self.config.node_id,
                from = limit,
                to = grant.granted,
                others = grant.others,
                "reserved connection slots"
            );
            Ok(true)
        } else {
            tracing::debug!(
                node = %self.config.node_id,
                limit = grant.granted,
                others = grant.others,
                max = self.config.max_connections,
                "cluster connection budget exhausted"
            );
            Ok(false)
        }
    }

    /// Renews this node's lease, gives back surplus (when `limit - live >= 2 * block`, down to
    /// `live + block`), and re-reserves to cover live connections if the lease expired. Called
    /// by the maintenance loop every `lease_ttl / 3`. On error the limit is unchanged (or, when
    /// giving back surplus, stays at the lowered `live + block`, which Redis still covers).
    pub async fn tick(&self) -> Result<(), AdmissionError> {
        let _op = self.op.lock().await;
        if self.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let limit = self.slots.limit();
        let block = self.config.block;
        let want = if limit >= self.slots.live().saturating_add(block.saturating_mul(2)) {
            // Giving back surplus: lower the local limit first, so that connects admitted
            // while the script runs cannot end up beyond the smaller reservation (the slots
            // given back would go to other nodes while these connections hold them); then
            // count again, keeping whatever was admitted meanwhile.
            let target = self.slots.live() + block;
            self.slots.set_limit(target);
            target.max(self.slots.live())
        } else {
            limit.max(self.slots.live())
        };
        let live = self.slots.live();
        let grant = self.run(want).await?;
        self.apply(limit, grant);
        if grant.granted < limit && grant.previous.is_some() {
            tracing::debug!(
                node = %self.config.node_id,
                from = limit,
                to = grant.granted,
                live,
                "returned surplus connection slots"
            );
        }
        if grant.granted < live {
            tracing::warn!(
                node = %self.config.node_id,
                live,
                reserved = grant.granted,
                "more live connections than reserved slots (the lease lapsed and others took the \
                 share); admitting no new connections until slots free up"
            );
        }
        Ok(())
    }

    /// Keeps the lease: runs [`tick`](Self::tick) every `lease_ttl / 3` until this admission
    /// is dropped or [`release_all`](Self::release_all) ran. Errors are logged (once per outage).
    pub fn spawn_maintenance(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        let period = self.config.lease_ttl / 3;
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(this) = weak.upgrade() else { return };
                if this.closed.load(Ordering::Acquire) {
                    return;
                }
                // Errors are logged by `run`.
                let _ = this.tick().await;
            }
        })
    }

    /// On shutdown: drops this node's reservation (its field in Redis) and admits nothing more
    /// (the local limit goes to 0; live connections stay). Final: later calls reserve nothing.
    /// If Redis is unreachable the reservation still lapses after `lease_ttl`.
    pub async fn release_all(&self) -> Result<(), AdmissionError> {
        let _op = self.op.lock().await;
        self.closed.store(true, Ordering::Release);
        self.slots.set_limit(0);
        let node = self.config.node_id.clone();
        let released = self
            .with_timeout(async {
                let mut conn = self.commands.get().await?;
                let _: i64 = redis::cmd("HDEL")
                    .arg(ADMISSION_KEY)
                    .arg(&node)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            })
            .await;
        match &released {
            Ok(()) => tracing::info!(node = %node, "released connection slot reservation"),
            Err(e) => tracing::warn!(
                node = %node,
                error = %e,
                ttl = ?self.config.lease_ttl,
                "could not release the slot reservation; it lapses with its lease"
            ),
        }
        released
    }

    /// The live reservations of every node (by Redis time), sorted by node id.
    pub async fn reservations(&self) -> Result<Vec<(String, usize)>, AdmissionError> {
        self.with_timeout(async {
            let mut conn = self.commands.get().await?;
            let ((secs, micros), fields): ((u64, u64), Vec<(String, String)>) = redis::pipe()
                .cmd("TIME")
                .cmd("HGETALL")
                .arg(ADMISSION_KEY)
                .query_async(&mut conn)
                .await?;
            let now = secs * 1000 + micros / 1000;
            let mut out: Vec<(String, usize)> = fields
                .into_iter()
                .filter_map(|(node, value)| {
                    let (reserved, expires) = parse_reservation(&value)?;
                    (expires > now).then_some((node, reserved))
                })
                .collect();
            out.sort();
            Ok(out)
        })
        .await
    }

    fn apply(&self, old_limit: usize, grant: Grant) {
        if grant.previous.is_none() && old_limit > 0 {
            tracing::warn!(
                node = %self.config.node_id,
                limit = old_limit,
                reserved = grant.granted,
                "connection slot lease had lapsed; re-reserved"
            );
        }
        self.slots.set_limit(grant.granted);
    }

    /// One run of the admission script, asking for an absolute reservation of `want`.
    async fn run(&self, want: usize) -> Result<Grant, AdmissionError> {
        let ttl_ms = u64::try_from(self.config.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        let result = self
            .with_timeout(async {
                let mut conn = self.commands.get().await?;
                let (granted, previous, others): (i64, i64, i64) = self
                    .script
                    .key(ADMISSION_KEY)
                    .arg(&self.config.node_id)
                    .arg(want)
                    .arg(self.config.max_connections)
                    .arg(ttl_ms)
                    .invoke_async(&mut conn)
                    .await?;
                Ok(Grant {
                    granted: usize::try_from(granted).unwrap_or(0),
                    previous: usize::try_from(previous).ok(),
                    others: usize::try_from(others).unwrap_or(0),
                })
            })
            .await;
        let was_failing = match &result {
            Ok(_) => self.last_failure.lock().take().is_some(),
            Err(_) => self.last_failure.lock().replace(Instant::now()).is_some(),
        };
        match &result {
            Ok(_) => {
                if was_failing {
                    tracing::info!(node = %self.config.node_id, "cluster admission reached redis again");
                }
            }
            Err(e) => {
                if !was_failing {
                    tracing::warn!(
                        node = %self.config.node_id,
                        error = %e,
                        limit = self.slots.limit(),
                        "cluster admission cannot reach redis; keeping the current reservation \
                         (fail-static)"
                    );
                }
            }
        }
        result
    }

    /// How long ago Redis last failed, if that is less than [`RETRY_AFTER`] ago.
    fn failed_recently(&self) -> Option<Duration> {
        let at = (*self.last_failure.lock())?;
        let ago = at.elapsed();
        (ago < RETRY_AFTER).then_some(ago)
    }

    async fn with_timeout<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, AdmissionError>>,
    ) -> Result<T, AdmissionError> {
        tokio::time::timeout(self.op_timeout, fut)
            .await
            .unwrap_or(Err(AdmissionError::Timeout(self.op_timeout)))
    }
}

/// `"<reserved>:<expires_at_ms>"`.
fn parse_reservation(value: &str) -> Option<(usize, u64)> {
    let (reserved, expires) = value.split_once(':')?;
    Some((reserved.parse().ok()?, expires.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_values_parse() {
        assert_eq!(
            parse_reservation("16:1700000000000"),
            Some((16, 1_700_000_000_000))
        );
        assert_eq!(parse_reservation("x:1"), None);
        assert_eq!(parse_reservation("16"), None);
    }

    #[test]
    fn config_defaults() {
        let c = AdmissionConfig::new("n1", 100);
        assert_eq!(c.block, 16);
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
    }
}
