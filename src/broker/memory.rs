//! The embedded broker: one node, everything delivered in-process through the hub.
//!
//! Sequence numbers are per topic and start at 1; the epoch is random per broker instance, so
//! a client can tell that numbers restarted after a node restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use dashmap::DashMap;

use super::{
    Broker, BrokerError, ClusterStatus, Direct, DisconnectTarget, NodeStatus, PresenceMember,
    PublishReceipt, Recipient, TopicMessage, UpstreamMessage,
};
use crate::hub::{Connection, DirectMessage, Hub, Publication};
use crate::protocol::codes::CloseCode;

pub struct MemoryBroker {
    hub: Arc<Hub>,
    node_id: String,
    epoch: String,
    seqs: DashMap<String, AtomicU64>,
}

impl MemoryBroker {
    pub fn new(hub: Arc<Hub>, node_id: &str) -> Self {
        MemoryBroker {
            hub,
            node_id: node_id.to_string(),
            epoch: format!("{:08x}", rand::random::<u32>()),
            seqs: DashMap::new(),
        }
    }

    fn next_seq(&self, topic: &str) -> u64 {
        if let Some(counter) = self.seqs.get(topic) {
            return counter.fetch_add(1, Ordering::Relaxed) + 1;
        }
        let counter = self.seqs.entry(topic.to_string()).or_default();
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
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
        let seq = self.next_seq(&msg.topic);
        let publication = Publication::encode(&msg.topic, &msg.kind, seq, &self.epoch, &msg.data);
        let delivery = self.hub.deliver(&publication);
        Ok(PublishReceipt {
            seq,
            epoch: self.epoch.clone(),
            delivered_here: delivery.delivered,
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
                id: self.node_id.clone(),
                connections: self.hub.connection_count(),
            }],
        })
    }

    async fn topic_presence(&self, topic: &str) -> Result<Vec<PresenceMember>, BrokerError> {
        Ok(local_presence(&self.hub, &self.node_id, topic))
    }

    fn is_ready(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}
