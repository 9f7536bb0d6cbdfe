//! The Redis broker: any number of stateless nodes share topics, users, broadcasts, presence and
//! the connection budget through Redis (one instance, several sharded by topic, or a cluster).

pub mod admission;
pub mod broker;
mod cluster_slots;
pub mod commands;
pub mod gapfill;
pub mod history;
pub mod inbound;
pub mod keys;
pub mod pool;
pub mod presence;
pub mod pubsub;
pub mod shard;

pub use broker::RedisBroker;
