//! The embedded broker: one node, everything delivered in-process through the hub.
//!
//! Sequence numbers are per topic and start at 1 in a random epoch; the topic's history is an
//! in-memory ring ([`HistoryRing`]) with the namespace's bounds, so `since` recovery and
//! `/api/history` work without Redis (within one node run: a restart starts new epochs).
//! Idempotency keys are remembered per topic for [`IDEMPOTENCY_WINDOW`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{
    Broker, BrokerError, ClusterStatus, Direct, DisconnectTarget, NodeStatus, PresenceMember,
    PublishReceipt, Recipient, TopicMessage, UpstreamMessage, IDEMPOTENCY_WINDOW,
};
use crate::config::Settings;
use crate::history::{HistoryPage, HistoryRing, StreamPosition};
use crate::hub::{Connection, DirectMessage, Hub, Publication, PublicationMeta};
use crate::protocol::codes::CloseCode;

/// How often idle topics and old idempotency keys are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub struct MemoryBroker {
    hub: Arc<Hub>,
    settings: Arc<Settings>,
    history: HistoryRing,
    /// `(topic, key)` -> the first publication's position and when the key was first seen.
    idempotency: Mutex<HashMap<(String, String), (StreamPosition, Instant)>>,
    last_sweep: Mutex<Instant>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, settings: Arc<Settings>) -> Self {
        MemoryBroker {
            hub,
            settings,
            history: HistoryRing::new(),
            idempotency: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Forgets idle topics and expired idempotency keys, at most every [`SWEEP_EVERY`].
    fn sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock();
            if now.duration_since(*last) < SWEEP_EVERY {
                return;
            }
            *last = now;
        }
        self.idempotency
            .lock()
            .retain(|_, (_, at)| remembered(*at, now));
        let settings = Arc::clone(&self.settings);
        self.history
            .expire_idle(|topic| settings.namespace_of(topic).history);
    }
}

/// Whether an idempotency key first seen at `at` still counts at `now`: for exactly
/// [`IDEMPOTENCY_WINDOW`].
fn remembered(at: Instant, now: Instant) -> bool {
    now.saturating_duration_since(at) < IDEMPOTENCY_WINDOW
}

/// Encodes a direct message once and hands it to the hub.
pub fn deliver_direct(hub: &Hub, msg: &Direct) -> usize {
    let to = match &msg.recipient {
        Recipient::User(user) => Some(user.as_str()),
        _ => None,
    };
    let frame = DirectMessage {
        kind: &msg.kind,
        from: msg.from.as_deref(),
        to,
        data: &msg.data,
        as_content: msg.as_content,
    }
    .encode();
    match &msg.recipient {
        Recipient::User(user) => hub.deliver_to_user(user, &frame),
        Recipient::Connection(id) => usize::from(hub.deliver_to_connection(*id, &frame)),
        Recipient::Everyone => hub.deliver_to_all(&frame),
    }
}

/// This node's subscribers of `topic` as presence members.
pub fn local_presence(hub: &Hub, node_id: &str, topic: &str) -> Vec<PresenceMember> {
    hub.presence(topic)
        .into_iter()
        .map(|(id, client, user)| PresenceMember {
            connection_id: id,
            node: node_id.to_string(),
            client_id: client.to_string(),
            user_id: user.as_deref().map(str::to_string),
        })
        .collect()
}

/// Closes the local connections of a disconnect target.
pub fn disconnect_local(hub: &Hub, target: &DisconnectTarget) -> usize {
    let reason = "disconnected by the server";
    match target {
        DisconnectTarget::User(u) => {
            hub.disconnect_user(u, CloseCode::DisconnectedByServer, reason)
        }
        DisconnectTarget::Client(c) => {
            hub.disconnect_client(c, CloseCode::DisconnectedByServer, reason)
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, msg: TopicMessage) -> Result<PublishReceipt, BrokerError> {
        self.sweep();
        let key = msg.idempotency_key.map(|k| (msg.topic.clone(), k));
        // Held across the publish so two publishes with one key cannot both go out.
        let mut seen = key.as_ref().map(|_| self.idempotency.lock());
        if let (Some(seen), Some(key)) = (seen.as_deref(), key.as_ref()) {
            if let Some((first, at)) = seen.get(key) {
                if remembered(*at, Instant::now()) {
                    return Ok(PublishReceipt {
                        seq: first.seq,
                        epoch: first.epoch.clone(),
                        delivered_here: 0,
                        duplicate: true,
                    });
                }
            }
        }
        let bounds = self.settings.namespace_of(&msg.topic).history;
        let mut delivered = 0;
        let position = self.history.append(
            &msg.topic,
            bounds,
            || format!("{:08x}", rand::random::<u32>()),
            |position| {
                let meta = PublicationMeta {
                    kind: &msg.kind,
                    sequence: Some((position.seq, &position.epoch)),
                    require_ack: msg.require_ack,
                    ..PublicationMeta::default()
                };
                let publication = Publication::from_meta(&msg.topic, &meta, &msg.data);
                delivered = self.hub.deliver(&publication).delivered;
                publication
            },
        );
        if let (Some(seen), Some(key)) = (seen.as_deref_mut(), key) {
            seen.insert(key, (position.clone(), Instant::now()));
        }
        Ok(PublishReceipt {
            seq: position.seq,
            epoch: position.epoch,
            delivered_here: delivered,
            duplicate: false,
        })
    }

    async fn send(&self, msg: Direct) -> Result<usize, BrokerError> {
        Ok(deliver_direct(&self.hub, &msg))
    }

    async fn disconnect(&self, target: DisconnectTarget) -> Result<usize, BrokerError> {
        Ok(disconnect_local(&self.hub, &target))
    }

    async fn forward_upstream(&self, msg: UpstreamMessage) -> Result<(), BrokerError> {
        Err(BrokerError::NoBackend(msg.kind))
    }

    fn topic_interest(&self, _topic: &str, _interested: bool) {}

    fn user_interest(&self, _user: &str, _interested: bool) {}

    fn presence_changed(&self, _topic: &str, _conn: &Connection, _joined: bool) {}

    async fn grow_admission(&self) -> bool {
        // One node: max_connections is the whole budget from the start.
        false
    }

    async fn cluster_status(&self) -> Result<ClusterStatus, BrokerError> {
        Ok(ClusterStatus {
            online_count: self.hub.connection_count(),
            online_users: self.hub.online_users(),
            nodes: vec![NodeStatus {
                id: self.settings.node_id.clone(),
                connections: self.hub.connection_count(),
            }],
        })
    }

    async fn topic_presence(&self, topic: &str) -> Result<Vec<PresenceMember>, BrokerError> {
        Ok(local_presence(&self.hub, &self.settings.node_id, topic))
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let bounds = self.settings.namespace_of(topic).history;
        Ok(self.history.read(topic, since, limit, bounds))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idempotency_key_counts_for_exactly_the_window() {
        let at = Instant::now();
        assert!(remembered(at, at));
        assert!(remembered(
            at,
            at + IDEMPOTENCY_WINDOW - Duration::from_millis(1)
        ));
        assert!(!remembered(at, at + IDEMPOTENCY_WINDOW));
    }
}
