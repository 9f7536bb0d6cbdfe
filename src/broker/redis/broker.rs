//! [`RedisBroker`]: the [`Broker`] that makes any number of nodes behave as one gateway.
//!
//! - Publishing goes through a Lua script on the topic's Redis instance that increments the
//!   topic's sequence, keeps its epoch and publishes, all atomically; every node subscribed to
//!   the topic's channel (this one included) then delivers it to its local subscribers.
//! - A node subscribes only to what its own clients need: a topic's channel while it has a local
//!   subscriber, a user's channel while that user has a local connection, plus the broadcast,
//!   control and own-node channels (`pubsub` batches, lingers and resubscribes).
//! - Commands use a deadpool pool per instance (`pool`); subscriptions a dedicated connection
//!   per instance. With several URLs, topics and users are spread over the instances by jump hash
//!   (`shard`); the broadcast, control, node, registry, admission and upstream names live on
//!   the first instance.
//! - With `redis.cluster`, the URLs are seed nodes of one Redis Cluster: a single logical shard
//!   whose commands go through one cluster connection (`commands`), published with `SPUBLISH`
//!   (the publish script too) and received with `SSUBSCRIBE` (sharded pub/sub: a channel lives
//!   on the master owning its slot). Topic and user names are hash-tagged (`keys`), so a topic's
//!   channel, sequence and epoch share a slot and one script can touch them all.
//!
//! While Redis is unreachable, local connections stay up, `is_ready` is false (`/readyz` 503),
//! and publishing answers `UNAVAILABLE` instead of accepting what it cannot deliver.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::admission::{AdmissionConfig, ClusterAdmission};
use super::commands::Commands;
use super::gapfill::{GapFiller, HistoryReader};
use super::history;
use super::inbound;
use super::keys;
use super::pool;
use super::presence::{Presence, PresenceConfig, PresenceEntry, PresenceError};
use super::pubsub::{Subscriber, SubscriberConfig};
use super::shard::shard_of;
use crate::broker::memory::{deliver_direct, disconnect_local};
use crate::broker::{
    Broker, BrokerDiagnostics, BrokerError, ClusterStatus, Direct, DisconnectTarget, NodeStatus,
    PresenceMember, PublishReceipt, Recipient, TopicMessage, UpstreamMessage,
};
use crate::config::Settings;
use crate::history::{HistoryPage, StreamPosition};
use crate::hub::{Connection, Hub};
use crate::limits::ConnectionSlots;

/// Upstream stream length cap (approximate trimming keeps XADD cheap).
const UPSTREAM_MAXLEN: usize = 100_000;

/// One Redis instance (or the whole cluster): where commands go and this node's subscription
/// connection to it.
struct Shard {
    commands: Commands,
    subscriber: Subscriber,
}

/// Presence updates, applied in order by one background task so a quick join/leave pair can
/// never land in Redis the other way round.
enum PresenceOp {
    UserOnline(String),
    UserOffline(String),
    Join(String, PresenceEntry),
    Leave(String, u64),
}

pub struct RedisBroker {
    hub: Arc<Hub>,
    node_id: String,
    shards: Vec<Shard>,
    /// The `wsgate` Redis Function library for these settings (`history`).
    library: Arc<str>,
    /// Keeps every topic's live stream gap-free and in order on this node.
    gaps: Arc<GapFiller>,
    /// `PUBLISH`, or `SPUBLISH` on Redis Cluster.
    publish_command: &'static str,
    presence: Arc<Presence>,
    presence_ops: mpsc::UnboundedSender<PresenceOp>,
    admission: Arc<ClusterAdmission>,
    background: Vec<JoinHandle<()>>,
}

/// The JSON spec put on user, broadcast and control channels.
#[derive(Serialize)]
struct DirectSpecOut<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    op: Option<&'a str>,
    #[serde(rename = "connectionId", skip_serializing_if = "Option::is_none")]
    connection_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a RawValue>,
}

impl RedisBroker {
    /// Connects to every configured instance (in the background: Redis being down at start is
    /// survivable) and starts the subscription, presence and admission tasks.
    pub fn start(
        settings: &Settings,
        hub: Arc<Hub>,
        slots: Arc<ConnectionSlots>,
    ) -> Result<Self, BrokerError> {
        let node_id = settings.node_id.clone();
        let gaps = GapFiller::new(Arc::clone(&hub));
        let handler = || {
            let hub = Arc::clone(&hub);
            let gaps = Arc::clone(&gaps);
            Arc::new(move |channel: &str, payload: &[u8]| {
                if let Err(e) = inbound::dispatch(&hub, &gaps, channel, payload) {
                    tracing::warn!(channel, error = %e, "dropped a message from redis");
                }
            })
        };
        let cluster = settings.redis.cluster;
        // The node's own channels go to the first subscriber started (the cluster's, or the
        // first shard's): its first connection subscribes them before the node reports ready.
        let mut node_channels = Some(vec![
            keys::BROADCAST_CHANNEL.to_string(),
            keys::CONTROL_CHANNEL.to_string(),
            keys::node_channel(&node_id),
        ]);
        let mut shards = Vec::with_capacity(settings.redis_urls.len());
        if cluster && !settings.redis_urls.is_empty() {
            let commands = Commands::cluster(&settings.redis_urls)
                .map_err(|e| BrokerError::Unavailable(format!("redis cluster client: {e}")))?;
            let subscriber = Subscriber::start(
                SubscriberConfig {
                    linger: settings.redis.linger,
                    channels: node_channels.take().unwrap_or_default(),
                    ..SubscriberConfig::cluster(settings.redis_urls.clone())
                },
                handler(),
            );
            shards.push(Shard {
                commands,
                subscriber,
            });
        }
        for url in settings.redis_urls.iter().filter(|_| !cluster) {
            let pool = pool::create(url.as_str()).map_err(|e| {
                BrokerError::Unavailable(format!(
                    "redis pool for {}: {e}",
                    crate::config::secret::redact_url(url)
                ))
            })?;
            let subscriber = Subscriber::start(
                SubscriberConfig {
                    linger: settings.redis.linger,
                    channels: node_channels.take().unwrap_or_default(),
                    ..SubscriberConfig::new(url.as_str())
                },
                handler(),
            );
            shards.push(Shard {
                commands: pool.into(),
                subscriber,
            });
        }
        let Some(first) = shards.first() else {
            return Err(BrokerError::Unavailable("no redis URL configured".into()));
        };

        let admission = ClusterAdmission::new(
            first.commands.clone(),
            AdmissionConfig {
                block: settings.redis.admission_block,
                lease_ttl: settings.redis.lease_ttl,
                ..AdmissionConfig::new(node_id.as_str(), settings.ws.max_connections)
            },
            slots,
        );
        let presence = Arc::new(Presence::new(
            shards.iter().map(|s| s.commands.clone()).collect(),
            PresenceConfig {
                ttl: settings.redis.lease_ttl,
                ..PresenceConfig::new(node_id.as_str())
            },
        ));
        let library: Arc<str> = Arc::from(history::library_code(settings));
        for shard in &shards {
            // Backends may call FCALL before any client publishes; a failure here is retried
            // by the first publish that finds the library missing.
            let commands = shard.commands.clone();
            let code = Arc::clone(&library);
            tokio::spawn(async move {
                if let Err(e) = history::load_library(&commands, &code).await {
                    tracing::debug!(error = %e, "wsgate functions not loaded yet");
                }
            });
        }
        gaps.set_reader(history_reader(
            shards.iter().map(|s| s.commands.clone()).collect(),
            Arc::clone(&library),
        ));
        let (presence_ops, ops_rx) = mpsc::unbounded_channel();
        let counts_hub = Arc::clone(&hub);
        let background = vec![
            tokio::spawn(resync_after_reconnects(
                shards
                    .iter()
                    .map(|s| (s.subscriber.clone(), s.commands.clone()))
                    .collect(),
                Arc::clone(&gaps),
                Arc::clone(&library),
            )),
            admission.spawn_maintenance(),
            presence
                .spawn_heartbeat(move || (counts_hub.connection_count(), counts_hub.user_count())),
            tokio::spawn(apply_presence_ops(Arc::clone(&presence), ops_rx)),
            tokio::spawn({
                let admission = Arc::clone(&admission);
                async move {
                    if let Err(e) = admission.reserve_block().await {
                        tracing::warn!(error = %e, "no connection slots reserved yet: redis unreachable");
                    }
                }
            }),
        ];
        Ok(RedisBroker {
            hub,
            node_id,
            shards,
            library,
            gaps,
            publish_command: if cluster { "SPUBLISH" } else { "PUBLISH" },
            presence,
            presence_ops,
            admission,
            background,
        })
    }

    fn shard_for(&self, name: &str) -> &Shard {
        &self.shards[shard_of(name, self.shards.len())]
    }

    fn first(&self) -> &Shard {
        &self.shards[0]
    }

    async fn publish_raw(
        &self,
        shard: &Shard,
        channel: &str,
        payload: String,
    ) -> Result<usize, BrokerError> {
        let mut conn = shard.commands.get().await.map_err(unavailable)?;
        let receivers: usize = redis::cmd(self.publish_command)
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(receivers)
    }

    /// Channels this node is subscribed to right now, over all instances (for tests and ops).
    pub fn subscribed_channels(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .shards
            .iter()
            .flat_map(|s| s.subscriber.subscribed())
            .collect();
        all.sort_unstable();
        all
    }
}

/// Publications fetched per history read while filling a gap in a topic's live stream.
const GAP_FILL_PAGE: usize = 10_000;

/// How often the subscription connections' reconnect counts are looked at.
const RECONNECT_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// Reads a topic's history on the Redis that holds it, for the gap filler.
fn history_reader(shards: Vec<Commands>, library: Arc<str>) -> HistoryReader {
    let shards = Arc::new(shards);
    Arc::new(move |topic: String, from: StreamPosition| {
        let shards = Arc::clone(&shards);
        let library = Arc::clone(&library);
        Box::pin(async move {
            let commands = &shards[shard_of(&topic, shards.len())];
            history::read(commands, &library, &topic, Some(&from), GAP_FILL_PAGE).await
        })
    })
}

/// Whenever a subscription connection comes back (its reconnect count moves), whatever was
/// published while it was down is fetched from history for every topic this node holds, and
/// the function library is loaded again on that Redis (it may have restarted empty, and
/// backends calling `FCALL wsgate_publish` need it before any node publishes).
async fn resync_after_reconnects(
    shards: Vec<(Subscriber, Commands)>,
    gaps: Arc<GapFiller>,
    library: Arc<str>,
) {
    let mut seen: Vec<u64> = shards.iter().map(|(s, _)| s.reconnects()).collect();
    let mut tick = tokio::time::interval(RECONNECT_POLL);
    loop {
        tick.tick().await;
        let now: Vec<u64> = shards.iter().map(|(s, _)| s.reconnects()).collect();
        if now == seen {
            continue;
        }
        for (i, (_, commands)) in shards.iter().enumerate() {
            if now[i] != seen[i] {
                // The subscription found that Redis went away: so did the idle command
                // connections to it.
                commands.discard_idle();
                if let Err(e) = history::load_library(commands, &library).await {
                    tracing::warn!(error = %e, "could not reload the wsgate functions");
                }
            }
        }
        tracing::info!("redis subscription restored: filling every topic from history");
        gaps.resync_all();
        seen = now;
    }
}

async fn apply_presence_ops(presence: Arc<Presence>, mut ops: mpsc::UnboundedReceiver<PresenceOp>) {
    while let Some(op) = ops.recv().await {
        let result = match &op {
            PresenceOp::UserOnline(user) => presence.user_online(user).await,
            PresenceOp::UserOffline(user) => presence.user_offline(user).await,
            PresenceOp::Join(topic, entry) => presence.topic_join(topic, entry).await,
            PresenceOp::Leave(topic, id) => presence.topic_leave(topic, *id).await,
        };
        match result {
            Ok(()) => {}
            // Kept locally and rewritten by the next heartbeat that reaches Redis.
            Err(PresenceError::Deferred) => tracing::debug!("presence update deferred"),
            Err(e) => {
                tracing::warn!(error = %e, "presence update failed; the next heartbeat repairs it")
            }
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {e}"))
}

fn spec_json(spec: &DirectSpecOut<'_>) -> Result<String, BrokerError> {
    serde_json::to_string(spec).map_err(|e| BrokerError::Unavailable(format!("encoding: {e}")))
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, msg: TopicMessage) -> Result<PublishReceipt, BrokerError> {
        let shard = self.shard_for(&msg.topic);
        let published = history::publish(&shard.commands, &self.library, &msg).await?;
        Ok(PublishReceipt {
            seq: published.position.seq,
            epoch: published.position.epoch,
            // Local subscribers get it through our own subscription, like every other node.
            delivered_here: 0,
            duplicate: published.duplicate,
        })
    }

    async fn history(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let shard = self.shard_for(topic);
        history::read(&shard.commands, &self.library, topic, since, limit).await
    }

    async fn await_subscribed(&self, topic: &str, timeout: std::time::Duration) -> bool {
        self.shard_for(topic)
            .subscriber
            .wait_subscribed(&keys::topic_channel(topic), timeout)
            .await
    }

    async fn await_user_subscribed(&self, user: &str, timeout: std::time::Duration) -> bool {
        self.shard_for(user)
            .subscriber
            .wait_subscribed(&keys::user_channel(user), timeout)
            .await
    }

    async fn send(&self, msg: Direct) -> Result<usize, BrokerError> {
        let (data, content) = if msg.as_content {
            (None, Some(&*msg.data))
        } else {
            (Some(&*msg.data), None)
        };
        let mut spec = DirectSpecOut {
            kind: &msg.kind,
            op: None,
            connection_id: None,
            from: msg.from.as_deref(),
            data,
            content,
        };
        match &msg.recipient {
            Recipient::User(user) => {
                let payload = spec_json(&spec)?;
                self.publish_raw(self.shard_for(user), &keys::user_channel(user), payload)
                    .await
            }
            Recipient::Everyone => {
                let payload = spec_json(&spec)?;
                self.publish_raw(self.first(), keys::BROADCAST_CHANNEL, payload)
                    .await
            }
            Recipient::Connection(id) => {
                if self.hub.has_connection(*id) {
                    return Ok(deliver_direct(&self.hub, &msg));
                }
                spec.op = Some("send");
                spec.connection_id = Some(*id);
                let payload = spec_json(&spec)?;
                self.publish_raw(self.first(), keys::CONTROL_CHANNEL, payload)
                    .await
            }
        }
    }

    async fn disconnect(&self, target: DisconnectTarget) -> Result<usize, BrokerError> {
        let local = disconnect_local(&self.hub, &target);
        let spec = match &target {
            DisconnectTarget::User(u) => serde_json::json!({"op": "disconnect", "userId": u}),
            DisconnectTarget::Client(c) => serde_json::json!({"op": "disconnect", "clientId": c}),
        };
        // Every node (this one too, harmlessly: a second close is a no-op) closes its share.
        self.publish_raw(self.first(), keys::CONTROL_CHANNEL, spec.to_string())
            .await?;
        Ok(local)
    }

    async fn forward_upstream(&self, msg: UpstreamMessage) -> Result<(), BrokerError> {
        let mut conn = self.first().commands.get().await.map_err(unavailable)?;
        let _: String = redis::cmd("XADD")
            .arg(keys::UPSTREAM_STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(UPSTREAM_MAXLEN)
            .arg("*")
            .arg("node")
            .arg(&msg.node_id)
            .arg("connectionId")
            .arg(msg.conn_id)
            .arg("clientId")
            .arg(&msg.client_id)
            .arg("userId")
            .arg(msg.user_id.as_deref().unwrap_or(""))
            .arg("type")
            .arg(&msg.kind)
            .arg("message")
            .arg(&msg.raw)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    fn topic_interest(&self, topic: &str, interested: bool) {
        let shard = self.shard_for(topic);
        let channel = keys::topic_channel(topic);
        if interested {
            shard.subscriber.add(channel);
        } else {
            shard.subscriber.remove(channel);
            self.gaps.forget(topic);
        }
    }

    fn user_interest(&self, user: &str, interested: bool) {
        let shard = self.shard_for(user);
        let channel = keys::user_channel(user);
        let op = if interested {
            shard.subscriber.add(channel);
            PresenceOp::UserOnline(user.to_string())
        } else {
            shard.subscriber.remove(channel);
            PresenceOp::UserOffline(user.to_string())
        };
        let _ = self.presence_ops.send(op);
    }

    fn presence_changed(&self, topic: &str, conn: &Connection, joined: bool) {
        let op = if joined {
            PresenceOp::Join(
                topic.to_string(),
                PresenceEntry {
                    connection_id: conn.id,
                    node: self.node_id.clone(),
                    client_id: conn.client_id.to_string(),
                    user_id: conn.user_id.as_deref().map(str::to_string),
                },
            )
        } else {
            PresenceOp::Leave(topic.to_string(), conn.id)
        };
        let _ = self.presence_ops.send(op);
    }

    async fn grow_admission(&self) -> bool {
        match self.admission.grow().await {
            Ok(grown) => grown,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reserve connection slots: redis unreachable");
                false
            }
        }
    }

    async fn cluster_status(&self) -> Result<ClusterStatus, BrokerError> {
        let nodes = self.presence.nodes().await.map_err(unavailable)?;
        let online_users = self.presence.online_users().await.map_err(unavailable)?;
        Ok(ClusterStatus {
            online_count: nodes.iter().map(|n| n.connections).sum(),
            online_users,
            nodes: nodes
                .into_iter()
                .map(|n| NodeStatus {
                    id: n.id,
                    connections: n.connections,
                })
                .collect(),
        })
    }

    async fn cluster_nodes(&self) -> Result<Vec<NodeStatus>, BrokerError> {
        let nodes = self.presence.nodes().await.map_err(unavailable)?;
        Ok(nodes
            .into_iter()
            .map(|n| NodeStatus {
                id: n.id,
                connections: n.connections,
            })
            .collect())
    }

    async fn topic_presence(&self, topic: &str) -> Result<Vec<PresenceMember>, BrokerError> {
        self.presence
            .topic_presence(topic)
            .await
            .map_err(unavailable)
    }

    fn is_ready(&self) -> bool {
        self.shards.iter().all(|s| s.subscriber.is_ready())
    }

    fn diagnostics(&self) -> BrokerDiagnostics {
        BrokerDiagnostics {
            ready: self.is_ready(),
            reconnects: self.shards.iter().map(|s| s.subscriber.reconnects()).sum(),
            messages_received: self
                .shards
                .iter()
                .map(|s| s.subscriber.messages_received())
                .sum(),
            subscribed_channels: self
                .shards
                .iter()
                .map(|s| s.subscriber.subscribed().len())
                .sum(),
        }
    }

    fn name(&self) -> &'static str {
        "redis"
    }

    async fn shutdown(&self) {
        if let Err(e) = self.admission.release_all().await {
            tracing::warn!(error = %e, "could not return connection slots");
        }
        if let Err(e) = self.presence.deregister().await {
            tracing::warn!(error = %e, "could not leave the node registry");
        }
        for shard in &self.shards {
            shard.subscriber.shutdown();
        }
        for task in &self.background {
            task.abort();
        }
    }
}
