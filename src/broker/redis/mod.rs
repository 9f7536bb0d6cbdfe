//! The Redis broker: any number of stateless nodes share topics, users, broadcasts, presence and
//! the connection budget through Redis (one instance, several sharded by topic, or a cluster).

pub mod keys;
pub mod pubsub;
pub mod shard;
