//! The hub: this node's local connections, their topic subscriptions, and fan-out to them.
//!
//! It knows nothing of Redis or sockets: brokers hand it publications and frames, and it pushes
//! shared frame bytes into each recipient's bounded queue ([`Outbound`]). The topic index is a
//! sharded map (dashmap), so publishers on different topics do not contend for one lock.
//! Subscribe and unsubscribe report when a topic gains its first or loses its last local
//! subscriber, which is when a cluster broker has to change its interest.

pub mod acks;
pub mod conflate;
pub mod publication;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::metrics::{Sent, TRAFFIC};
use crate::protocol::codes::CloseCode;
use crate::protocol::filter::{Filter, SubscriptionOptions};
use crate::ws::flusher;
use crate::ws::writer::Outbound;
use acks::Acks;
use conflate::Conflator;
pub use publication::{DeflateParams, DirectMessage, Publication, PublicationMeta, SharedFrame};

/// Live publications one recovering subscription may hold before it counts as a slow consumer.
const MAX_HELD_DURING_RECOVERY: usize = 10_000;

/// A connection's id, unique within this node's run.
pub type ConnId = u64;

/// What the hub knows about one local connection.
pub struct Connection {
    pub id: ConnId,
    pub client_id: Arc<str>,
    pub user_id: Option<Arc<str>>,
    pub outbound: Arc<Outbound>,
    pub connected_at: SystemTime,
    /// permessage-deflate as negotiated at the upgrade (`None`: plain frames only).
    pub deflate: Option<DeflateParams>,
}

/// One connection's subscription to one topic.
struct Subscriber {
    conn: Arc<Connection>,
    filter: Option<Arc<Filter>>,
    conflator: Option<Arc<Conflator>>,
    /// While the subscription recovers missed publications from history, live ones are held
    /// here (in arrival order, which is `seq` order) instead of being queued, and merged after
    /// the replay by [`Hub::finish_recovery`].
    held: Option<Mutex<Vec<Publication>>>,
    /// After a recovery: the last replayed `(epoch, seq)`. A live copy of a replayed publication
    /// can still be on its way (history answers on the command connection before pub/sub
    /// delivers on the subscription connection), so anything at or below it is dropped.
    floor: Option<(Arc<str>, u64)>,
}

/// Counts from one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Frames queued (or held by conflation) for a subscriber.
    pub delivered: usize,
    /// Subscribers whose filter did not pass the publication.
    pub filtered: usize,
    /// Subscribers whose queue refused the frame (slow or closing).
    pub dropped: usize,
}

#[derive(Default)]
pub struct Hub {
    topics: DashMap<Arc<str>, HashMap<ConnId, Subscriber>>,
    users: DashMap<Arc<str>, Vec<Arc<Connection>>>,
    connections: DashMap<ConnId, Arc<Connection>>,
    next_id: AtomicU64,
    /// `requireAck` publications each local connection has not acknowledged yet.
    acks: Acks,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        // Connection ids must not repeat across the nodes of a cluster: `/api/ws/send` with a
        // `connectionId` and the control channel name a connection by its id alone. Each hub
        // counts from a random point below 2^52, so ids stay exact as JavaScript numbers.
        Arc::new(Hub {
            next_id: AtomicU64::new(rand::random::<u64>() >> 12),
            ..Hub::default()
        })
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Adds a connection; returns `true` when it is its user's first on this node.
    pub fn register(&self, conn: Arc<Connection>) -> bool {
        self.connections.insert(conn.id, Arc::clone(&conn));
        match &conn.user_id {
            Some(user) => {
                let mut conns = self.users.entry(Arc::clone(user)).or_default();
                conns.push(conn);
                conns.len() == 1
            }
            None => false,
        }
    }

    /// Removes a connection and its subscriptions to `topics`. Returns whether its user has no
    /// connection left here, and the topics that lost their last local subscriber.
    pub fn unregister(&self, conn: &Connection, topics: &[Arc<str>]) -> (bool, Vec<Arc<str>>) {
        self.connections.remove(&conn.id);
        let user_gone = match &conn.user_id {
            Some(user) => self
                .users
                .remove_if_mut(user, |_, conns| {
                    conns.retain(|c| c.id != conn.id);
                    conns.is_empty()
                })
                .is_some(),
            None => false,
        };
        let emptied = topics
            .iter()
            .filter(|t| self.unsubscribe(t, conn.id))
            .cloned()
            .collect();
        // After the unsubscribes: no fan-out can record a new pending entry for it now.
        self.acks.forget(conn.id);
        (user_gone, emptied)
    }

    /// Subscribes (or re-subscribes with new options); returns `true` when `topic` had no local
    /// subscriber before.
    pub fn subscribe(
        &self,
        topic: &Arc<str>,
        conn: &Arc<Connection>,
        options: &SubscriptionOptions,
    ) -> bool {
        self.subscribe_with(topic, conn, options, false)
    }

    /// Subscribes like [`Hub::subscribe`], but holds the topic's live publications for this
    /// connection until [`Hub::finish_recovery`] replays history in front of them.
    pub fn subscribe_recovering(
        &self,
        topic: &Arc<str>,
        conn: &Arc<Connection>,
        options: &SubscriptionOptions,
    ) -> bool {
        self.subscribe_with(topic, conn, options, true)
    }

    fn subscribe_with(
        &self,
        topic: &Arc<str>,
        conn: &Arc<Connection>,
        options: &SubscriptionOptions,
        recovering: bool,
    ) -> bool {
        let subscriber = Subscriber {
            conn: Arc::clone(conn),
            filter: options.filter.clone(),
            conflator: options.interval.map(Conflator::new),
            held: recovering.then(|| Mutex::new(Vec::new())),
            floor: None,
        };
        let mut subs = self.topics.entry(Arc::clone(topic)).or_default();
        let first = subs.is_empty();
        if let Some(old) = subs.insert(conn.id, subscriber) {
            if let Some(c) = old.conflator {
                c.cancel();
            }
        }
        first
    }

    /// Ends a recovering subscription's hold: queues `replay` (publications from history, oldest
    /// first), then the live publications held meanwhile that come after the replay (by `seq`;
    /// unsequenced ones all), and from then on delivers live. Runs under the topic's write
    /// lock, so no live publication can slip in between. Returns how many frames it queued.
    pub fn finish_recovery(&self, topic: &str, conn_id: ConnId, replay: Vec<Publication>) -> usize {
        let Some(mut subs) = self.topics.get_mut(topic) else {
            return 0;
        };
        let Some(sub) = subs.get_mut(&conn_id) else {
            return 0;
        };
        let held = sub.held.take().map(Mutex::into_inner).unwrap_or_default();
        let replayed_to = replay.iter().filter_map(|p| p.seq).max();
        sub.floor = replay.last().and_then(|p| Some((p.epoch.clone()?, p.seq?)));
        let live = held.into_iter().filter(|p| match (p.seq, replayed_to) {
            (Some(seq), Some(last)) => seq > last,
            _ => true,
        });
        let mut queued = 0;
        let replayed = replay.len();
        for (i, publication) in replay.into_iter().chain(live).enumerate() {
            if let Some(filter) = &sub.filter {
                let mut scratch = publication.data.to_vec();
                let passes = simd_json::to_borrowed_value(&mut scratch)
                    .ok()
                    .is_some_and(|d| filter.matches(&d));
                if !passes {
                    continue;
                }
            }
            let frame = publication.frame.for_recipient(sub.conn.deflate);
            if self.queue_publication(&sub.conn, &publication, frame) {
                queued += 1;
                let kind = if i < replayed {
                    Sent::Replay
                } else {
                    Sent::Publication
                };
                let payload = crate::metrics::frame_payload_len(publication.frame.plain());
                TRAFFIC.sent(kind, 1, payload as u64);
            }
        }
        queued
    }

    /// Unsubscribes; returns `true` when that left `topic` with no local subscriber.
    pub fn unsubscribe(&self, topic: &str, conn_id: ConnId) -> bool {
        let mut removed = false;
        let emptied = self
            .topics
            .remove_if_mut(topic, |_, subs| {
                if let Some(old) = subs.remove(&conn_id) {
                    removed = true;
                    if let Some(c) = old.conflator {
                        c.cancel();
                    }
                }
                subs.is_empty()
            })
            .is_some();
        removed && emptied
    }

    /// Fans a publication out to the topic's local subscribers: the same frame bytes to each.
    pub fn deliver(&self, publication: &Publication) -> Delivery {
        let mut delivery = Delivery::default();
        let Some(subs) = self.topics.get(&*publication.topic) else {
            return delivery;
        };
        // The data tree is parsed once per publication, and only if some subscriber filters.
        let mut scratch = Vec::new();
        let data = if subs.values().any(|s| s.filter.is_some()) {
            scratch.extend_from_slice(&publication.data);
            simd_json::to_borrowed_value(&mut scratch).ok()
        } else {
            None
        };
        // Metrics are added up here and recorded once after the loop (see `crate::metrics`).
        let payload_len = crate::metrics::frame_payload_len(publication.frame.plain());
        let mut queued = 0u64;
        let mut last_queued: Option<&Connection> = None;
        // A small fan-out goes to one flusher: one wake-up for all its writes.
        let _gathered = flusher::gather(subs.len());
        for sub in subs.values() {
            if let (Some((epoch, floor)), Some(seq), Some(e)) =
                (&sub.floor, publication.seq, &publication.epoch)
            {
                if seq <= *floor && epoch == e {
                    delivery.filtered += 1;
                    continue;
                }
            }
            if let Some(held) = &sub.held {
                // Filtered when the recovery finishes, with the replayed publications.
                let mut held = held.lock();
                if held.len() >= MAX_HELD_DURING_RECOVERY {
                    // A recovery this far behind a busy topic is a slow consumer: it reconnects
                    // and recovers again rather than buffering without end.
                    sub.conn.outbound.close(
                        CloseCode::SlowConsumer,
                        "too many live messages while recovering",
                    );
                    delivery.dropped += 1;
                } else {
                    held.push(publication.clone());
                    delivery.delivered += 1;
                }
                continue;
            }
            if let Some(filter) = &sub.filter {
                if !data.as_ref().is_some_and(|d| filter.matches(d)) {
                    delivery.filtered += 1;
                    continue;
                }
            }
            let frame = publication.frame.for_recipient(sub.conn.deflate);
            match &sub.conflator {
                // Not tracked for `requireAck`: the client asked for the latest value only, and
                // re-sending a superseded one would undo that (see `acks`).
                Some(c) => {
                    c.offer(frame, payload_len, &sub.conn.outbound);
                    delivery.delivered += 1;
                }
                None if self.queue_publication(&sub.conn, publication, frame) => {
                    delivery.delivered += 1;
                    queued += 1;
                    last_queued = Some(&sub.conn);
                }
                None => delivery.dropped += 1,
            }
        }
        if let Some(conn) = last_queued {
            conn.outbound.probe(publication.received_at);
        }
        TRAFFIC.publications.add(1);
        TRAFFIC.deliveries.add(delivery.delivered as u64);
        TRAFFIC.sent(Sent::Publication, queued, queued * payload_len as u64);
        delivery
    }

    /// Queues one recipient's frame of `publication`; a `requireAck` one is recorded as
    /// pending for the connection first (so that a fast ack always finds it) and forgotten
    /// again if the queue refuses it. Returns whether the queue took it.
    fn queue_publication(
        &self,
        conn: &Connection,
        publication: &Publication,
        frame: Bytes,
    ) -> bool {
        if !publication.require_ack {
            return conn.outbound.push(frame).is_ok();
        }
        self.acks
            .record(conn.id, &conn.outbound, &publication.id, frame.clone());
        let queued = conn.outbound.push(frame).is_ok();
        if !queued {
            // Closing or cut off as a slow consumer: nothing it owes will be re-sent.
            self.acks.forget(conn.id);
        }
        queued
    }

    /// The `requireAck` publications local connections have not acknowledged yet.
    pub fn acks(&self) -> &Acks {
        &self.acks
    }

    /// Queues `frame` to every local connection of `user`; returns how many took it.
    pub fn deliver_to_user(&self, user: &str, frame: &SharedFrame) -> usize {
        let n = self.users.get(user).map_or(0, |conns| {
            let _gathered = flusher::gather(conns.len());
            conns.iter().filter(|c| push_shared(c, frame)).count()
        });
        count_direct(frame, n)
    }

    /// Queues `frame` to one connection; returns whether it took it.
    pub fn deliver_to_connection(&self, id: ConnId, frame: &SharedFrame) -> bool {
        let took = self
            .connections
            .get(&id)
            .is_some_and(|c| push_shared(&c, frame));
        count_direct(frame, usize::from(took)) == 1
    }

    /// Queues `frame` to every local connection; returns how many took it.
    pub fn deliver_to_all(&self, frame: &SharedFrame) -> usize {
        let n = self
            .connections
            .iter()
            .filter(|c| push_shared(c, frame))
            .count();
        count_direct(frame, n)
    }

    /// Bytes queued or in flight to every local connection together, and the most one
    /// connection has (for `/metrics` and the `$sys` snapshots; one lock per connection).
    pub fn send_queue_bytes(&self) -> (usize, usize) {
        self.connections
            .iter()
            .map(|c| c.outbound.queued_bytes())
            .fold((0, 0), |(sum, max), q| (sum + q, max.max(q)))
    }

    /// Closes every local connection of `user` with a `disconnect` notice; returns how many.
    pub fn disconnect_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        self.users.get(user).map_or(0, |conns| {
            conns.iter().for_each(|c| c.outbound.close(code, reason));
            conns.len()
        })
    }

    /// Closes every local connection labelled `client_id`; returns how many.
    pub fn disconnect_client(&self, client_id: &str, code: CloseCode, reason: &str) -> usize {
        self.close_where(|c| &*c.client_id == client_id, code, reason)
    }

    /// Closes every local connection (shutdown).
    pub fn disconnect_all(&self, code: CloseCode, reason: &str) -> usize {
        self.close_where(|_| true, code, reason)
    }

    fn close_where(
        &self,
        pick: impl Fn(&Connection) -> bool,
        code: CloseCode,
        reason: &str,
    ) -> usize {
        let mut n = 0;
        for c in self.connections.iter().filter(|c| pick(c)) {
            c.outbound.close(code, reason);
            n += 1;
        }
        n
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Every local connection right now (a snapshot: a graceful drain closes them in batches).
    pub fn connections_snapshot(&self) -> Vec<Arc<Connection>> {
        self.connections.iter().map(|c| Arc::clone(&c)).collect()
    }

    /// Whether connection `id` is on this node.
    pub fn has_connection(&self, id: ConnId) -> bool {
        self.connections.contains_key(&id)
    }

    /// Users with at least one local connection.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    pub fn topic_count(&self) -> usize {
        self.topics.len()
    }

    /// Local subscribers of `topic`.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.topics.get(topic).map_or(0, |s| s.len())
    }

    /// Users with at least one local connection.
    pub fn online_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.users.iter().map(|e| e.key().to_string()).collect();
        users.sort_unstable();
        users
    }

    /// The users and clients subscribed to `topic` here (local presence).
    pub fn presence(&self, topic: &str) -> Vec<(ConnId, Arc<str>, Option<Arc<str>>)> {
        self.topics.get(topic).map_or_else(Vec::new, |subs| {
            subs.values()
                .map(|s| {
                    (
                        s.conn.id,
                        Arc::clone(&s.conn.client_id),
                        s.conn.user_id.clone(),
                    )
                })
                .collect()
        })
    }
}

/// Counts `n` recipients of a direct message (once per message, not per recipient); returns `n`.
fn count_direct(frame: &SharedFrame, n: usize) -> usize {
    let payload = crate::metrics::frame_payload_len(frame.plain()) as u64;
    TRAFFIC.sent(Sent::Direct, n as u64, n as u64 * payload);
    n
}

/// Queues the right variant of a shared frame (plain or compressed) to one connection.
fn push_shared(conn: &Connection, frame: &SharedFrame) -> bool {
    conn.outbound
        .push(frame.for_recipient(conn.deflate))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::flusher::Flushers;
    use serde_json::value::RawValue;

    fn connection(hub: &Hub) -> Arc<Connection> {
        connection_with(hub, Outbound::new(1 << 30), None)
    }

    fn connection_with(
        hub: &Hub,
        outbound: Arc<Outbound>,
        user_id: Option<&str>,
    ) -> Arc<Connection> {
        let conn = Arc::new(Connection {
            id: hub.next_conn_id(),
            client_id: Arc::from("held"),
            user_id: user_id.map(Arc::from),
            outbound,
            connected_at: SystemTime::now(),
            deflate: None,
        });
        hub.register(Arc::clone(&conn));
        conn
    }

    fn publication(seq: u64) -> Publication {
        let meta = PublicationMeta {
            kind: "tick",
            sequence: Some((seq, "e")),
            id: None,
            time_ms: Some(0),
            require_ack: false,
        };
        let data = RawValue::from_string(format!("{{\"n\":{seq}}}")).expect("json");
        Publication::from_meta("busy", &meta, &data)
    }

    /// `n` connections subscribed to `topic` (all of user `user`), dealt to `flushers` in turn.
    fn subscribed(hub: &Hub, flushers: &Flushers, topic: &str, n: usize, user: &str) {
        let topic = Arc::from(topic);
        for _ in 0..n {
            let outbound = Outbound::with_flusher(1 << 30, flushers.assign());
            let conn = connection_with(hub, outbound, Some(user));
            hub.subscribe(&topic, &conn, &SubscriptionOptions::default());
        }
    }

    /// A fan-out to fewer than SPREAD_AT connections (4, and SPREAD_AT - 1 at the edge) puts
    /// them all on one flusher's list (one wake-up), however they were dealt; one of SPREAD_AT
    /// stays spread over every flusher.
    #[test]
    fn a_small_fan_out_goes_to_one_flusher_a_large_one_spreads() {
        let hub = Hub::new();
        let flushers = Flushers::unstarted(2);
        subscribed(&hub, &flushers, "busy", 4, "ann");
        let d = hub.deliver(&publication(1));
        assert_eq!(d.delivered, 4);
        let mut listed = flushers.listed();
        listed.sort();
        assert_eq!(listed, [0, 4]);

        let hub = Hub::new();
        let flushers = Flushers::unstarted(2);
        subscribed(&hub, &flushers, "busy", flusher::SPREAD_AT - 1, "cy");
        hub.deliver(&publication(1));
        let mut listed = flushers.listed();
        listed.sort();
        assert_eq!(listed, [0, flusher::SPREAD_AT - 1]);

        let hub = Hub::new();
        let flushers = Flushers::unstarted(2);
        subscribed(&hub, &flushers, "busy", flusher::SPREAD_AT, "bob");
        hub.deliver(&publication(1));
        let half = flusher::SPREAD_AT / 2;
        assert_eq!(flushers.listed(), [half, half]);
    }

    /// The same for a message to one user's few connections.
    #[test]
    fn a_message_to_one_user_goes_to_one_flusher() {
        let hub = Hub::new();
        let flushers = Flushers::unstarted(2);
        subscribed(&hub, &flushers, "inbox", 3, "ann");
        let frame = SharedFrame::new(crate::ws::frame::frame(
            crate::ws::frame::OpCode::Text,
            b"{}",
        ));
        assert_eq!(hub.deliver_to_user("ann", &frame), 3);
        let mut listed = flushers.listed();
        listed.sort();
        assert_eq!(listed, [0, 3]);
    }

    /// A hub with one connection recovering its subscription to `busy`.
    fn recovering_subscriber() -> (Arc<Hub>, Arc<Connection>) {
        let hub = Hub::new();
        let conn = connection(&hub);
        hub.subscribe_recovering(&Arc::from("busy"), &conn, &SubscriptionOptions::default());
        (hub, conn)
    }

    /// A recovering subscription holds up to MAX_HELD_DURING_RECOVERY live publications; the
    /// one after that makes it a slow consumer (close 4008) instead of buffering without end.
    #[test]
    fn a_recovery_holds_up_to_its_limit_then_is_a_slow_consumer() {
        let (hub, conn) = recovering_subscriber();
        for seq in 1..=MAX_HELD_DURING_RECOVERY as u64 {
            let d = hub.deliver(&publication(seq));
            assert_eq!((d.delivered, d.dropped), (1, 0), "publication {seq} held");
        }
        assert_eq!(conn.outbound.close_code(), None);
        let d = hub.deliver(&publication(MAX_HELD_DURING_RECOVERY as u64 + 1));
        assert_eq!((d.delivered, d.dropped), (0, 1));
        assert_eq!(
            conn.outbound.close_code(),
            Some(CloseCode::SlowConsumer.as_u16())
        );
    }

    /// Below the limit, what was held is queued after the replay, in order, once the recovery
    /// finishes.
    #[test]
    fn held_publications_follow_the_replay() {
        let (hub, conn) = recovering_subscriber();
        for seq in 3..=5 {
            hub.deliver(&publication(seq));
        }
        // History replays 1..=4; the held 3 and 4 are already in it.
        let replay = (1..=4).map(publication).collect();
        assert_eq!(hub.finish_recovery("busy", conn.id, replay), 5);
        assert_eq!(conn.outbound.queued_seqs(), [1, 2, 3, 4, 5]);
    }
}
