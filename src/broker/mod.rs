//! The broker decides who in the cluster receives a message; the hub then delivers it locally.
//!
//! [`Broker`] is the small interface between sessions / the HTTP API and message transport.
//! [`memory::MemoryBroker`] is the embedded default (one node, in-process fan-out); the Redis
//! broker implements the same trait to carry topic, user, broadcast and control messages
//! between nodes. A node tells its broker about local interest (first subscriber of a topic,
//! first connection of a user) so a cluster broker only listens to what this node needs.

pub mod memory;
pub mod redis;

use async_trait::async_trait;
use serde_json::value::RawValue;

use crate::history::{HistoryPage, StreamPosition};
use crate::hub::{ConnId, Connection};

/// A publication request: the broker assigns `seq`/`epoch`, records it in the topic's history
/// and fans it out.
#[derive(Debug, Clone)]
pub struct TopicMessage {
    pub topic: String,
    /// The `type` subscribers see (`route_update`, `metrics`, ...).
    pub kind: String,
    pub data: Box<RawValue>,
    /// A publish with a key already used for this topic within the idempotency window is not
    /// published again; the receipt names the first one's position.
    pub idempotency_key: Option<String>,
    /// Recipients must acknowledge it by id, or get it again.
    pub require_ack: bool,
}

impl TopicMessage {
    /// A plain publication: no idempotency key, no acknowledgements.
    pub fn new(topic: impl Into<String>, kind: impl Into<String>, data: Box<RawValue>) -> Self {
        TopicMessage {
            topic: topic.into(),
            kind: kind.into(),
            data,
            idempotency_key: None,
            require_ack: false,
        }
    }
}

/// Where the broker put a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishReceipt {
    pub seq: u64,
    pub epoch: String,
    /// Local subscribers that got it (this node only; other nodes do not report back).
    pub delivered_here: usize,
    /// The idempotency key was seen before: nothing was published this time, and `seq`/`epoch`
    /// are the first publication's.
    pub duplicate: bool,
}

/// How long a subscribe (or a connect) waits for the broker to confirm that this node receives
/// the topic (or the user's messages) before the client is told it is subscribed. Redis
/// answers in well under a millisecond; the bound is for a Redis that stopped answering.
pub const SUBSCRIBE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a topic's position (`seq` counter and `epoch`) is kept in Redis after its last
/// publication (Centrifugo's `history_meta_ttl`): long past any history, so a client that
/// comes back to a quiet topic is told `recovered: true` (it missed nothing); after that, a
/// topic published again starts a new epoch. Without it every topic name ever used would keep
/// two keys in Redis forever.
pub const POSITION_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// How long an idempotency key is remembered per topic.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Who a direct message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// Every connection of a user, on every node.
    User(String),
    /// One connection (by the id the `connection` message reported).
    Connection(ConnId),
    /// Every connection on every node.
    Everyone,
}

/// A message for users or connections rather than a topic.
#[derive(Debug, Clone)]
pub struct Direct {
    pub recipient: Recipient,
    pub kind: String,
    /// The sender as the server knows it; `None` for backend / HTTP API messages.
    pub from: Option<String>,
    pub data: Box<RawValue>,
    /// The payload arrived as `content` and is repeated under that name.
    pub as_content: bool,
}

/// Whom to disconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectTarget {
    User(String),
    Client(String),
}

/// A client message of a type the gateway does not handle itself, for backends.
#[derive(Debug, Clone)]
pub struct UpstreamMessage {
    pub node_id: String,
    pub conn_id: ConnId,
    pub client_id: String,
    pub user_id: Option<String>,
    /// The client's `type`.
    pub kind: String,
    /// The whole message as the client sent it.
    pub raw: String,
}

/// The broker's health, for `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BrokerDiagnostics {
    pub ready: bool,
    /// Reconnects of the subscription connections since start.
    pub reconnects: u64,
    /// Messages received on the subscription connections since start.
    pub messages_received: u64,
    pub subscribed_channels: usize,
}

/// One node as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeStatus {
    pub id: String,
    pub connections: usize,
}

/// Cluster-wide presence for `/api/ws/status` and `/api/info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// Connections on all live nodes.
    pub online_count: usize,
    /// Users with at least one connection anywhere, sorted.
    pub online_users: Vec<String>,
    pub nodes: Vec<NodeStatus>,
}

/// One connection subscribed to a topic, anywhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PresenceMember {
    #[serde(rename = "connectionId")]
    pub connection_id: ConnId,
    pub node: String,
    #[serde(rename = "clientId")]
    pub client_id: String,
    #[serde(rename = "userId")]
    pub user_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no backend is configured to handle message type {0:?}")]
    NoBackend(String),
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publishes to a topic cluster-wide.
    async fn publish(&self, msg: TopicMessage) -> Result<PublishReceipt, BrokerError>;

    /// Sends a direct message cluster-wide; returns how many local connections took it.
    async fn send(&self, msg: Direct) -> Result<usize, BrokerError>;

    /// Disconnects a user or client on every node; returns how many local connections closed.
    async fn disconnect(&self, target: DisconnectTarget) -> Result<usize, BrokerError>;

    /// Hands a client message of an unhandled type to the backends.
    async fn forward_upstream(&self, msg: UpstreamMessage) -> Result<(), BrokerError>;

    /// `topic` gained its first local subscriber (`true`) or lost its last (`false`).
    fn topic_interest(&self, topic: &str, interested: bool);

    /// `user` gained its first local connection (`true`) or lost its last (`false`).
    fn user_interest(&self, user: &str, interested: bool);

    /// `conn` joined (`true`) or left (`false`) `topic`, for per-topic presence.
    fn presence_changed(&self, topic: &str, conn: &Connection, joined: bool);

    /// Asks for room for more connections on this node (cluster admission); `true` when the
    /// node's connection limit was raised.
    async fn grow_admission(&self) -> bool;

    /// Who is online across the cluster.
    async fn cluster_status(&self) -> Result<ClusterStatus, BrokerError>;

    /// The live nodes and their connections: [`Broker::cluster_status`] without the user list
    /// (cheap enough for the periodic `$sys.health` snapshots).
    async fn cluster_nodes(&self) -> Result<Vec<NodeStatus>, BrokerError> {
        self.cluster_status().await.map(|status| status.nodes)
    }

    /// Who is subscribed to `topic` across the cluster.
    async fn topic_presence(&self, topic: &str) -> Result<Vec<PresenceMember>, BrokerError>;

    /// The topic's publications after `since` (the newest `limit` without it), and whether that
    /// is everything since then (see [`HistoryPage::after`]).
    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError>;

    /// Waits until this node receives `topic`'s live publications (its subscription in the
    /// cluster is active), so that a history read made afterwards leaves no gap; `false` when
    /// that did not happen within `timeout`.
    async fn await_subscribed(&self, _topic: &str, _timeout: std::time::Duration) -> bool {
        true
    }

    /// Waits until this node receives the messages sent to `user` (its user channel in the
    /// cluster is active); `false` when that did not happen within `timeout`.
    async fn await_user_subscribed(&self, _user: &str, _timeout: std::time::Duration) -> bool {
        true
    }

    /// Whether the broker can carry messages now (for `/readyz`).
    fn is_ready(&self) -> bool;

    /// Health figures for `/metrics`.
    fn diagnostics(&self) -> BrokerDiagnostics {
        BrokerDiagnostics {
            ready: self.is_ready(),
            ..BrokerDiagnostics::default()
        }
    }

    /// `"memory"` or `"redis"`, for `/api/info`.
    fn name(&self) -> &'static str;

    /// Leaves the cluster cleanly (returns reserved slots, leaves the registry).
    async fn shutdown(&self) {}
}
