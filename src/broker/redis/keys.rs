//! Every Redis channel and key name wsgate uses, in one place: backends rely on these names
//! (README: "Publishing from a backend"), so they change only with a documented migration.
//!
//! Topic and user names are wrapped in a hash tag (`{...}`) so that, in Redis Cluster, a topic's
//! channel, sequence counter, epoch and history all live in one slot.

/// Prefix of every name.
pub const PREFIX: &str = "wsgate";

/// Publications of one topic. Payload: a publication spec (see `inbound`).
pub fn topic_channel(topic: &str) -> String {
    format!("{PREFIX}:t:{{{topic}}}")
}

/// The topic's sequence counter (INCR per publication).
pub fn topic_seq_key(topic: &str) -> String {
    format!("{PREFIX}:t:{{{topic}}}:seq")
}

/// The topic's epoch: set when its sequence starts at 1, so a counter that was lost (Redis
/// restarted without persistence) shows up as a new epoch.
pub fn topic_epoch_key(topic: &str) -> String {
    format!("{PREFIX}:t:{{{topic}}}:epoch")
}

/// Per-topic presence: hash of `<node>:<connectionId>` -> `{"connectionId","node","clientId","userId"}`.
pub fn topic_presence_key(topic: &str) -> String {
    format!("{PREFIX}:t:{{{topic}}}:presence")
}

/// Direct messages for every connection of one user.
pub fn user_channel(user: &str) -> String {
    format!("{PREFIX}:u:{{{user}}}")
}

/// Messages for every connection on every node.
pub const BROADCAST_CHANNEL: &str = "wsgate:broadcast";

/// Cluster-wide control: disconnect a user or client, reach a connection whose node is unknown.
pub const CONTROL_CHANNEL: &str = "wsgate:control";

/// Messages for one node (a backend answering one connection).
pub fn node_channel(node_id: &str) -> String {
    format!("{PREFIX}:node:{node_id}")
}

/// Client messages of types the gateway does not handle, for backends (a stream).
pub const UPSTREAM_STREAM: &str = "wsgate:upstream";

/// Node registry: hash of node id -> `{"connections","users","startedAt","heartbeatAt"}`.
pub const NODES_KEY: &str = "wsgate:nodes";

/// A node's liveness lease (a key with a TTL, renewed by its heartbeat).
pub fn node_alive_key(node_id: &str) -> String {
    format!("{PREFIX}:node:{node_id}:alive")
}

/// The users with a connection on one node (a set, expiring with the node's lease).
pub fn node_users_key(node_id: &str) -> String {
    format!("{PREFIX}:node:{node_id}:users")
}

/// Cluster admission: hash of node id -> `<reserved slots>:<lease expiry, ms of Redis time>`.
pub const ADMISSION_KEY: &str = "wsgate:admission";

/// What a subscribed channel carries, recovered from its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelKind<'a> {
    Topic(&'a str),
    User(&'a str),
    Broadcast,
    Control,
    Node(&'a str),
}

/// Classifies a channel name produced by this module.
pub fn classify(channel: &str) -> Option<ChannelKind<'_>> {
    if channel == BROADCAST_CHANNEL {
        return Some(ChannelKind::Broadcast);
    }
    if channel == CONTROL_CHANNEL {
        return Some(ChannelKind::Control);
    }
    let rest = channel.strip_prefix("wsgate:")?;
    if let Some(tagged) = rest.strip_prefix("t:") {
        return untag(tagged).map(ChannelKind::Topic);
    }
    if let Some(tagged) = rest.strip_prefix("u:") {
        return untag(tagged).map(ChannelKind::User);
    }
    rest.strip_prefix("node:").map(ChannelKind::Node)
}

fn untag(tagged: &str) -> Option<&str> {
    tagged.strip_prefix('{')?.strip_suffix('}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(topic_channel("routes"), "wsgate:t:{routes}");
        assert_eq!(
            classify(&topic_channel("chat:1")),
            Some(ChannelKind::Topic("chat:1"))
        );
        assert_eq!(classify(&user_channel("u1")), Some(ChannelKind::User("u1")));
        assert_eq!(classify(&node_channel("n1")), Some(ChannelKind::Node("n1")));
        assert_eq!(classify(BROADCAST_CHANNEL), Some(ChannelKind::Broadcast));
        assert_eq!(classify(CONTROL_CHANNEL), Some(ChannelKind::Control));
        assert_eq!(classify("other"), None);
    }
}
