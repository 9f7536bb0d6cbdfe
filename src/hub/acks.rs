//! Acknowledged delivery: publications sent with `requireAck` that a connection still owes an
//! `ack` for, and the node's re-send sweep.
//!
//! When the hub queues a `requireAck` publication to a connection it records the frame bytes
//! that connection got (plain or compressed) under the publication's id. The client answers
//! `{"type":"ack","data":{"id":ID}}` and the entry goes away. A node-level task
//! ([`resend_loop`]) looks at what is still pending every quarter of `ack_timeout`: an entry
//! sent `ack_timeout` ago or longer is queued again, the exact same bytes (so the same `id`,
//! which is how the client recognises the duplicate), up to `ack_retries` times; after the last
//! re-send has had its own `ack_timeout`, the entry is given up and counted.
//!
//! Where the state lives: one node-level map keyed by connection id, held by the hub, rather
//! than a field on [`super::Connection`]. A connection that never receives a `requireAck`
//! publication has no entry at all (nothing allocated, nothing locked on its behalf); the
//! sweep visits only connections that owe something instead of every connection of the node;
//! and `Connection` (built in several places, benches and tests included) keeps its shape. The
//! map is sharded (dashmap), like the hub's topic index, so recording during fan-out on
//! different connections rarely contends.
//!
//! Bounds: at most [`MAX_PENDING_PER_CONNECTION`] entries per connection; recording one more
//! gives the oldest up (counted), so a client that never acknowledges cannot grow memory without
//! end. An entry holds a reference to the publication's shared frame bytes (the allocation every
//! recipient shares), not a copy. Entries go away with the connection ([`Acks::forget`] from
//! hub unregister), and the sweep drops every entry of a connection whose queue no longer takes
//! frames (closing, or cut off as a slow consumer).
//!
//! Publications delivered through an `interval` (conflated) subscription are not tracked: that
//! client asked for the latest value only, and a re-send of a superseded message would undo
//! what it asked for.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ConnId, Hub};
use crate::ws::writer::Outbound;

/// Most unacknowledged publications one connection may owe; one more gives the oldest up.
pub const MAX_PENDING_PER_CONNECTION: usize = 1024;

/// Shortest period of the re-send sweep, whatever `ack_timeout` is.
const MIN_SWEEP_PERIOD: Duration = Duration::from_millis(5);

/// One publication a connection has not acknowledged yet.
struct Pending {
    id: Arc<str>,
    /// The bytes this connection got (plain or compressed), queued again as they are.
    frame: Bytes,
    /// Times it was queued so far: 1 after the first send.
    attempts: u32,
    /// When it was last queued.
    sent_at: Instant,
}

/// What one connection owes.
struct ConnPending {
    outbound: Arc<Outbound>,
    /// Oldest first sent first.
    entries: VecDeque<Pending>,
}

/// The pending acknowledgements of every local connection that owes any.
pub struct Acks {
    pending: DashMap<ConnId, ConnPending>,
    limit: usize,
}

impl Default for Acks {
    fn default() -> Self {
        Acks::with_limit(MAX_PENDING_PER_CONNECTION)
    }
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Frames queued again.
    pub resent: usize,
    /// Entries dropped after their last re-send went unacknowledged too.
    pub given_up: usize,
    /// Entries dropped because their connection no longer takes frames.
    pub dropped: usize,
}

impl Acks {
    /// Pending state that keeps at most `limit` (at least 1) entries per connection.
    pub fn with_limit(limit: usize) -> Self {
        Acks {
            pending: DashMap::new(),
            limit: limit.max(1),
        }
    }

    /// Records that `frame` (publication `id`) is being queued to connection `conn` and must be
    /// acknowledged. Call it before queueing, so that an ack racing back cannot find nothing to
    /// remove; call [`Acks::forget`] if the queue then refuses the frame. Recording an id the
    /// connection already owes restarts its timer.
    pub fn record(&self, conn: ConnId, outbound: &Arc<Outbound>, id: &Arc<str>, frame: Bytes) {
        let now = Instant::now();
        let mut owed = self.pending.entry(conn).or_insert_with(|| ConnPending {
            outbound: Arc::clone(outbound),
            entries: VecDeque::new(),
        });
        if let Some(p) = owed.entries.iter_mut().find(|p| p.id == *id) {
            p.frame = frame;
            p.sent_at = now;
            return;
        }
        if owed.entries.len() >= self.limit {
            owed.entries.pop_front();
            metrics::counter!(crate::metrics::ACK_GIVEN_UP, "reason" => "overflow").increment(1);
        }
        owed.entries.push_back(Pending {
            id: Arc::clone(id),
            frame,
            attempts: 1,
            sent_at: now,
        });
    }

    /// Removes `ids` from what connection `conn` owes; returns how many it owed. Ids it does not
    /// owe (unknown, already acknowledged, given up: a late duplicate) are ignored.
    pub fn acknowledge(&self, conn: ConnId, ids: &[&str]) -> usize {
        if ids.is_empty() {
            return 0;
        }
        let mut removed = 0;
        self.pending.remove_if_mut(&conn, |_, owed| {
            let before = owed.entries.len();
            if let [id] = ids {
                if let Some(i) = owed.entries.iter().position(|p| &*p.id == *id) {
                    owed.entries.remove(i);
                }
            } else {
                let ids: HashSet<&str> = ids.iter().copied().collect();
                owed.entries.retain(|p| !ids.contains(&*p.id));
            }
            removed = before - owed.entries.len();
            owed.entries.is_empty()
        });
        removed
    }

    /// Drops everything connection `conn` owes (it left, or its queue refused a frame).
    pub fn forget(&self, conn: ConnId) {
        self.pending.remove(&conn);
    }

    /// Publications connection `conn` has not acknowledged yet.
    pub fn pending_for(&self, conn: ConnId) -> usize {
        self.pending.get(&conn).map_or(0, |owed| owed.entries.len())
    }

    /// Unacknowledged publications over every local connection.
    pub fn pending_total(&self) -> usize {
        self.pending.iter().map(|owed| owed.entries.len()).sum()
    }

    /// Queues again every entry last sent `timeout` or more before `now`, unless it was already
    /// sent `1 + retries` times: then it is given up. A connection whose queue refuses a frame
    /// loses all its entries.
    pub fn resend_due(&self, now: Instant, timeout: Duration, retries: u32) -> Sweep {
        let mut sweep = Sweep::default();
        self.pending.retain(|_, owed| {
            let outbound = &owed.outbound;
            let mut refused = false;
            owed.entries.retain_mut(|p| {
                if refused {
                    sweep.dropped += 1;
                    return false;
                }
                if now.saturating_duration_since(p.sent_at) < timeout {
                    return true;
                }
                if p.attempts > retries {
                    sweep.given_up += 1;
                    return false;
                }
                if outbound.push(p.frame.clone()).is_err() {
                    refused = true;
                    sweep.dropped += 1;
                    return false;
                }
                p.attempts += 1;
                p.sent_at = now;
                sweep.resent += 1;
                true
            });
            if refused {
                // The ones queued again before the refusal go too: the connection is ending.
                sweep.dropped += owed.entries.len();
                return false;
            }
            !owed.entries.is_empty()
        });
        sweep
    }
}

/// The node's re-send task: sweeps `hub`'s pending acknowledgements every quarter of `timeout`
/// until `stop` turns true or its sender is dropped.
pub async fn resend_loop(
    hub: Arc<Hub>,
    timeout: Duration,
    retries: u32,
    mut stop: watch::Receiver<bool>,
) {
    let period = (timeout / 4).max(MIN_SWEEP_PERIOD);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
                continue;
            }
        }
        let sweep = hub.acks().resend_due(Instant::now(), timeout, retries);
        if sweep.resent > 0 {
            metrics::counter!(crate::metrics::ACK_RESENDS).increment(sweep.resent as u64);
        }
        if sweep.given_up > 0 {
            metrics::counter!(crate::metrics::ACK_GIVEN_UP, "reason" => "retries")
                .increment(sweep.given_up as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    fn frame(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn queued(outbound: &Outbound) -> Vec<Bytes> {
        outbound.drain_for_test()
    }

    #[test]
    fn unacknowledged_entries_are_resent_then_given_up() {
        let acks = Acks::default();
        let out = Outbound::new(1 << 20);
        acks.record(1, &out, &id("e:1"), frame("one"));
        let start = Instant::now();

        // Not due yet: nothing happens.
        assert_eq!(acks.resend_due(start, TIMEOUT, 2), Sweep::default());
        assert!(queued(&out).is_empty());

        // Two re-sends, each a timeout after the one before, the same bytes each time.
        let first = start + TIMEOUT;
        assert_eq!(acks.resend_due(first, TIMEOUT, 2).resent, 1);
        assert_eq!(queued(&out), vec![frame("one")]);
        assert_eq!(
            acks.resend_due(first + TIMEOUT / 2, TIMEOUT, 2),
            Sweep::default()
        );
        let second = first + TIMEOUT;
        assert_eq!(acks.resend_due(second, TIMEOUT, 2).resent, 1);
        assert_eq!(queued(&out), vec![frame("one")]);

        // The last re-send gets its timeout too, then the entry is given up.
        let sweep = acks.resend_due(second + TIMEOUT, TIMEOUT, 2);
        assert_eq!((sweep.resent, sweep.given_up), (0, 1));
        assert!(queued(&out).is_empty());
        assert_eq!(acks.pending_for(1), 0);
        assert!(acks.pending.is_empty(), "no entry left for the connection");
    }

    #[test]
    fn acknowledged_entries_are_not_resent() {
        let acks = Acks::default();
        let out = Outbound::new(1 << 20);
        for n in 1..=4 {
            acks.record(7, &out, &id(&format!("e:{n}")), frame(&format!("f{n}")));
        }
        assert_eq!(acks.acknowledge(7, &["e:2"]), 1);
        assert_eq!(acks.acknowledge(7, &["e:1", "e:3", "unknown"]), 2);
        assert_eq!(acks.acknowledge(7, &["e:2"]), 0, "a late duplicate ack");
        assert_eq!(acks.acknowledge(8, &["e:4"]), 0, "another connection's");
        let sweep = acks.resend_due(Instant::now() + TIMEOUT, TIMEOUT, 3);
        assert_eq!(sweep.resent, 1);
        assert_eq!(queued(&out), vec![frame("f4")]);

        // Acknowledging the last one removes the connection's entry altogether.
        assert_eq!(acks.acknowledge(7, &["e:4"]), 1);
        assert!(acks.pending.is_empty());
    }

    #[test]
    fn pending_state_is_bounded_per_connection() {
        let acks = Acks::with_limit(3);
        let out = Outbound::new(1 << 20);
        for n in 1..=5 {
            acks.record(1, &out, &id(&format!("e:{n}")), frame(&format!("f{n}")));
        }
        assert_eq!(acks.pending_for(1), 3);
        // The oldest two were given up: acknowledging them finds nothing.
        assert_eq!(acks.acknowledge(1, &["e:1", "e:2"]), 0);
        acks.resend_due(Instant::now() + TIMEOUT, TIMEOUT, 1);
        assert_eq!(queued(&out), vec![frame("f3"), frame("f4"), frame("f5")]);

        // The default bound.
        let acks = Acks::default();
        for n in 0..MAX_PENDING_PER_CONNECTION + 10 {
            acks.record(2, &out, &id(&n.to_string()), frame("x"));
        }
        assert_eq!(acks.pending_for(2), MAX_PENDING_PER_CONNECTION);
        assert_eq!(acks.pending_total(), MAX_PENDING_PER_CONNECTION);
    }

    #[test]
    fn recording_an_owed_id_again_keeps_one_entry() {
        let acks = Acks::default();
        let out = Outbound::new(1 << 20);
        acks.record(1, &out, &id("e:1"), frame("a"));
        acks.record(1, &out, &id("e:1"), frame("a"));
        assert_eq!(acks.pending_for(1), 1);
    }

    #[test]
    fn a_closed_connection_loses_its_entries() {
        let acks = Acks::default();
        let out = Outbound::new(1 << 20);
        acks.record(1, &out, &id("e:1"), frame("a"));
        acks.record(1, &out, &id("e:2"), frame("b"));
        out.close(crate::protocol::codes::CloseCode::GoingAway, "bye");
        let sweep = acks.resend_due(Instant::now() + TIMEOUT, TIMEOUT, 3);
        assert_eq!((sweep.resent, sweep.dropped), (0, 2));
        assert!(acks.pending.is_empty());

        acks.record(2, &out, &id("e:1"), frame("a"));
        acks.forget(2);
        assert_eq!(acks.pending_total(), 0);
    }
}
