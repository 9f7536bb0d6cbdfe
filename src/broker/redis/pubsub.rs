//! This node's subscription connection to ONE Redis instance, or to ONE Redis Cluster (sharded
//! pub/sub; see "Redis Cluster" below).
//!
//! A [`Subscriber`] is a cheap handle to one actor task. The actor owns the only connection this
//! node uses to *receive* from that instance, the set of channels the node wants, and the set the
//! server has confirmed. Callers only send it `add` / `remove` notes (never awaited), so the hot
//! path (a client subscribing to a topic) never waits on Redis.
//!
//! # Why it is built this way
//!
//! - **RESP3 push on a `MultiplexedConnection`** (not `aio::PubSub`). In RESP3, SUBSCRIBE and
//!   UNSUBSCRIBE are ordinary commands on a connection that can still run PING, and messages
//!   arrive as push frames on the connection's push sender. redis 1.8.1's
//!   `MultiplexedConnection::subscribe`/`unsubscribe` wait for every per-channel confirmation of
//!   a multi-channel command, so the actor knows exactly when a batch is active. The connection
//!   also announces its own death with a `PushKind::Disconnection` push (and closes the push
//!   channel), which `aio::PubSub` has no equivalent for. Each connection gets a fresh push
//!   channel, so a late push from a dead connection can never be mistaken for the new one.
//!   `ConnectionManager` with `set_automatic_resubscription` was not used: it reconnects lazily
//!   (only when a command fails), does not tell us when it is back or resubscribed (so the node
//!   could not report "not ready"), and resubscribes channel by channel.
//! - **Counted notes.** The hub decides "first local subscriber" / "last one gone" under its
//!   own lock, but the notes reach this actor from different tasks, so a topic's `remove`
//!   (one connection leaving) can arrive after the `add` of the connection that joined right
//!   after it. Applied as edges, that pair would unsubscribe a topic somebody holds. So each
//!   note is +1 / -1 on a per-channel count and a channel is wanted while its count is
//!   positive: the sum does not depend on the order the notes arrive in.
//! - **Waiting for a subscription.** [`Subscriber::wait_subscribed`] returns once the server
//!   confirmed the channel and it is wanted (woken by a notification, not polling). A channel
//!   leaves that set as soon as its count drops to 0 (while it lingers), so a waiter never
//!   trusts a subscription that is about to be unsubscribed; an `add` sent before the wait
//!   cancels the linger long before it could expire.
//! - **Batching.** The actor applies every queued `add`/`remove` (a `try_recv` loop) before it
//!   talks to Redis, then sends at most one SUBSCRIBE with all new channels and one UNSUBSCRIBE
//!   with all channels whose linger expired: a burst of 1000 subscribes is one round trip. Very
//!   large batches (more than [`MAX_CHANNELS_PER_COMMAND`]) are split so a single command stays a
//!   reasonable size for the server's query buffer.
//! - **Linger.** `remove` does not unsubscribe at once: the channel stays subscribed for
//!   `linger`, and an `add` within that time cancels the removal, so a client that reconnects or
//!   flaps between topics causes no UNSUBSCRIBE/SUBSCRIBE churn. Deadlines are equal offsets from
//!   "now", so they are kept in insertion order in a queue (stale entries are skipped lazily).
//! - **Reconnect.** On a lost connection (a `Disconnection` push, a closed push channel, or any
//!   failed command, including the periodic health-check PING that catches half-open TCP) the
//!   subscriber is marked not ready and reconnects with exponential backoff (50 ms doubling up to
//!   `max_backoff`, with random jitter so a fleet of nodes does not reconnect in lockstep). On
//!   success it resubscribes every wanted channel in one command and only then reports ready.
//!   Redis being down at start is the same state as "lost": `start` never fails. Messages
//!   published while disconnected are lost here; callers that need them backfill from history.
//!
//! # Redis Cluster (sharded pub/sub)
//!
//! With [`SubscriberConfig::cluster_nodes`] set, the actor holds a
//! `redis::cluster_async::ClusterConnection` (RESP3, with a push sender) instead, and uses
//! SSUBSCRIBE/SUNSUBSCRIBE: a sharded channel lives on the master owning its slot, so a node
//! only hears the channels it subscribed to, from the master that holds them. Everything above
//! (the `add`/`remove` notes, batching, linger, the first connection with backoff) is shared;
//! what differs:
//!
//! - **Batches per slot** (the slot arithmetic is in `cluster_slots`). One SSUBSCRIBE may only
//!   name channels of one slot (else `CrossSlot`), so a batch is split by hash slot (channels
//!   sharing a `{tag}` share a slot; untagged names such as `wsgate:broadcast` hash as a whole)
//!   and the per-slot commands run concurrently.
//! - **Losing a master is not losing the connection.** The cluster connection reconnects to a
//!   node by itself and re-sends that node's subscriptions (and moves them when slots move), but
//!   it does not say when that is done. So a `Disconnection` push from any node, a failed
//!   SSUBSCRIBE/SUNSUBSCRIBE, or a failed health check marks the subscriber **not ready**
//!   (*degraded*) and schedules, with the same jittered backoff, a probe followed by a
//!   *resync*: SUNSUBSCRIBE what is no longer wanted and SSUBSCRIBE every wanted channel again
//!   (idempotent). When that succeeds the subscriber is ready again and counts a reconnect.
//!   While degraded, new `add`s wait for the resync instead of stalling on a dead master.
//! - **Readiness means every master answers.** The health check (every 10 s, and the probe
//!   before a resync) is not a PING: the cluster connection fans a keyless PING out to the
//!   masters it is connected to *now*, and routes a command for a slot whose master is down to
//!   some other node. It reads the slot map (`CLUSTER SLOTS`) and sends, per master, an
//!   `EXISTS` of a probe key hashing into one of its slots, which only that master answers. The
//!   probe runs in its own task, so messages from the healthy masters keep flowing meanwhile.
//! - A server-side SUNSUBSCRIBE of a wanted channel (its slot moved) re-subscribes it in the
//!   next batch without flipping readiness. Only a closed push channel, or
//!   `REBUILD_AFTER_ATTEMPTS` (10) failed resyncs in a row, drop the whole cluster connection
//!   (rebuilt from the seed nodes, like a lost single connection; the first connection too is
//!   ready only once every master answers).
//!
//! # Where messages are handled
//!
//! redis-rs reads the connection on a driver task of its own and hands every push to the push
//! sender we give it, synchronously, as it parses them. Our sender (`PushRouter`) calls the
//! handler right there for messages, and forwards only the rest (disconnection, server-side
//! unsubscribes, confirmations) to the actor. Sending messages through the actor as well cost
//! one more task wake-up per publication (driver -> actor -> flushers), which at moderate rates,
//! where the workers park between publications, is a cross-thread wake and a scheduling delay
//! each time. The handler therefore runs on the driver task (in cluster mode, on the driver of
//! whichever master sent the message, so concurrently for different masters) and must not block.
//! It may be called for a channel whose interest just ended (a message already in flight, or
//! during linger); callers must tolerate that.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use redis::aio::{AsyncPushSender, MultiplexedConnection, SendError};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError, Value,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::cluster_slots;

/// Called for every message on a subscribed channel (channel name, payload bytes). Runs on the
/// connection's driver task (see "Where messages are handled"): must not block.
pub type MessageHandler = Arc<dyn Fn(&str, &[u8]) + Send + Sync>;

/// The first reconnect delay (before jitter); doubles per failed attempt up to `max_backoff`.
const INITIAL_BACKOFF: Duration = Duration::from_millis(50);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command (SUBSCRIBE of a large batch, PING) may take before the connection is
/// considered dead.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often an idle subscription connection is checked with PING (catches half-open TCP).
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// The largest number of channels in one SUBSCRIBE/UNSUBSCRIBE command.
pub const MAX_CHANNELS_PER_COMMAND: usize = 4096;
/// At most this many pushes are handled per wake-up, so commands are never starved.
const PUSH_BATCH: usize = 256;
/// While Redis stays unreachable, every this many failed attempts is logged as a warning.
const WARN_EVERY_ATTEMPTS: u32 = 20;
/// Cluster mode: after this many failed resyncs the cluster connection is dropped and rebuilt
/// from the seed nodes (with max_backoff 5 s: after about half a minute).
const REBUILD_AFTER_ATTEMPTS: u32 = 10;

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// `redis://[user:pass@]host:port[/db]`; RESP3 is forced whatever the URL says. Unused in
    /// cluster mode.
    pub url: String,
    /// Seed nodes of ONE Redis Cluster (`redis://host:port` each). When not empty, the subscriber
    /// uses sharded pub/sub (SSUBSCRIBE) through a cluster connection; see the module doc.
    pub cluster_nodes: Vec<String>,
    /// How long a channel stays subscribed after its interest ended.
    pub linger: Duration,
    /// The longest reconnect delay (before jitter).
    pub max_backoff: Duration,
    /// Channels wanted from the start, as if `add`ed once before the actor ran: the first
    /// connection subscribes them before the subscriber reports ready. (An `add` right after
    /// [`Subscriber::start`] could lose the race to a fast first connection, which would then
    /// report ready without them for a round trip.)
    pub channels: Vec<String>,
}

impl SubscriberConfig {
    /// A config for `url` with the default linger (2 s) and max backoff (5 s).
    pub fn new(url: impl Into<String>) -> SubscriberConfig {
        SubscriberConfig {
            url: url.into(),
            ..SubscriberConfig::default()
        }
    }

    /// A config for the Redis Cluster that `seeds` belong to (sharded pub/sub), with the default
    /// linger and max backoff.
    pub fn cluster(seeds: Vec<String>) -> SubscriberConfig {
        SubscriberConfig {
            cluster_nodes: seeds,
            ..SubscriberConfig::default()
        }
    }

    fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// Where this subscribes, without passwords, for logs.
    fn target(&self) -> String {
        if self.is_cluster() {
            let seeds: Vec<String> = self
                .cluster_nodes
                .iter()
                .map(|u| crate::config::secret::redact_url(u))
                .collect();
            format!("cluster[{}]", seeds.join(","))
        } else {
            crate::config::secret::redact_url(&self.url)
        }
    }
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            cluster_nodes: Vec::new(),
            linger: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
            channels: Vec::new(),
        }
    }
}

enum Command {
    Add(String),
    Remove(String),
}

/// What the actor publishes for the handles.
#[derive(Default)]
struct Shared {
    ready: AtomicBool,
    reconnects: AtomicU64,
    /// Messages handed to the handler.
    messages: AtomicU64,
    /// The channels that are wanted and confirmed by the server on the current connection: a
    /// waiter that finds its channel here receives every message published from then on. A
    /// lingering channel is left out (still on the server, but about to go), so is one whose
    /// UNSUBSCRIBE is under way.
    subscribed: Mutex<HashSet<String>>,
    /// Notified (all waiters) whenever channels join `subscribed`.
    confirmed: tokio::sync::Notify,
}

struct Inner {
    commands: mpsc::UnboundedSender<Command>,
    shutdown: watch::Sender<bool>,
    shared: Arc<Shared>,
}

/// A cheap, cloneable handle to the subscription actor of one Redis instance. The actor stops
/// on [`Subscriber::shutdown`] or when the last handle is dropped.
#[derive(Clone)]
pub struct Subscriber {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriber")
            .field("ready", &self.is_ready())
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl Subscriber {
    /// Starts the actor; it connects in the background (does not fail if Redis is down: it retries).
    ///
    /// Must be called within a Tokio runtime.
    pub fn start(mut config: SubscriberConfig, handler: MessageHandler) -> Subscriber {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let initial = std::mem::take(&mut config.channels);
        let mut actor = Actor {
            config,
            handler,
            shared: shared.clone(),
            commands: commands_rx,
            live: None,
            interest: HashMap::new(),
            server: HashSet::new(),
            pending: HashSet::new(),
            lingering: HashMap::new(),
            linger_queue: VecDeque::new(),
            backoff: INITIAL_BACKOFF,
            next_attempt: Instant::now(),
            failed_attempts: 0,
            lost_at: None,
            ever_connected: false,
            degraded: false,
            resync_at: None,
            probe: None,
        };
        for channel in initial {
            actor.apply(Command::Add(channel));
        }
        tokio::spawn(actor.run(shutdown_rx));
        Subscriber {
            inner: Arc::new(Inner {
                commands,
                shutdown,
                shared,
            }),
        }
    }

    /// Interest in `channel` begins (the caller reference-counts; this is called once per 0->1).
    /// Non-blocking. Notes are counted, so an `add` and a `remove` sent by different tasks may
    /// arrive in either order.
    pub fn add(&self, channel: String) {
        // Fails only when the actor has stopped, and then there is nothing to subscribe.
        let _ = self.inner.commands.send(Command::Add(channel));
    }

    /// Interest ends (1->0). The actual UNSUBSCRIBE happens after `linger` unless `add` comes back first. Non-blocking.
    pub fn remove(&self, channel: String) {
        let _ = self.inner.commands.send(Command::Remove(channel));
    }

    /// Whether the subscription connection is up and every wanted channel has been (re)subscribed.
    ///
    /// Turns true once a connection is up and every channel wanted at that moment is subscribed;
    /// channels added later are subscribed in the next batch without flipping readiness (a
    /// failing SUBSCRIBE counts as a lost connection and does).
    pub fn is_ready(&self) -> bool {
        self.inner.shared.ready.load(Ordering::Acquire)
    }

    /// Channels currently subscribed on the server side (for tests and /api/info).
    pub fn subscribed(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .shared
            .subscribed
            .lock()
            .iter()
            .cloned()
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether `channel` is subscribed on the server right now (its messages reach this node).
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.inner.shared.subscribed.lock().contains(channel)
    }

    /// Waits until `channel` is subscribed on the server (after an [`add`](Self::add): every
    /// message published from then on reaches this node); `false` if that did not happen
    /// within `timeout` (Redis unreachable).
    pub async fn wait_subscribed(&self, channel: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            // Registered before the check, so a confirmation between the two is not missed.
            let confirmed = self.inner.shared.confirmed.notified();
            tokio::pin!(confirmed);
            confirmed.as_mut().enable();
            if self.is_subscribed(channel) {
                return true;
            }
            if tokio::time::timeout_at(deadline, confirmed).await.is_err() {
                return self.is_subscribed(channel);
            }
        }
    }

    /// Count of reconnects so far (for logs/metrics/tests): successful connections after a lost
    /// one. The first connection (even after Redis was down at start) is not a reconnect.
    pub fn reconnects(&self) -> u64 {
        self.inner.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Messages received on subscribed channels so far (every connection together).
    pub fn messages_received(&self) -> u64 {
        self.inner.shared.messages.load(Ordering::Relaxed)
    }

    /// Stops the actor (closing its connection). Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner.shared.ready.store(false, Ordering::Release);
    }
}

/// The subscription connection: one instance (SUBSCRIBE) or one cluster (SSUBSCRIBE).
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Subscribes `channels`, waiting for every confirmation.
    async fn subscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Conn::Single(conn) => {
                for chunk in channels.chunks(MAX_CHANNELS_PER_COMMAND) {
                    conn.subscribe(chunk).await?;
                }
                Ok(())
            }
            Conn::Cluster(conn) => cluster_slots::per_slot(conn, channels, true).await,
        }
    }

    /// Unsubscribes `channels`, waiting for every confirmation.
    async fn unsubscribe(&mut self, channels: &[String]) -> Result<(), RedisError> {
        match self {
            Conn::Single(conn) => {
                for chunk in channels.chunks(MAX_CHANNELS_PER_COMMAND) {
                    conn.unsubscribe(chunk).await?;
                }
                Ok(())
            }
            Conn::Cluster(conn) => cluster_slots::per_slot(conn, channels, false).await,
        }
    }
}

/// The push sender of one subscription connection: messages go to the handler at once, on the
/// connection's driver task; every other push goes to the actor (see "Where messages are
/// handled" in the module doc).
struct PushRouter {
    handler: MessageHandler,
    shared: Arc<Shared>,
    /// To the actor, which owns this connection: a fresh channel per connection, so a late push
    /// from a dead connection is never mistaken for the current one's.
    control: mpsc::UnboundedSender<PushInfo>,
}

impl AsyncPushSender for PushRouter {
    fn send(&self, push: PushInfo) -> Result<(), SendError> {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                self.deliver(push.data);
                Ok(())
            }
            _ => self.control.send(push).map_err(|_| SendError),
        }
    }
}

impl PushRouter {
    fn deliver(&self, data: Vec<Value>) {
        let mut it = data.into_iter();
        match (it.next(), it.next()) {
            (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) => {
                self.shared.messages.fetch_add(1, Ordering::Relaxed);
                match std::str::from_utf8(&channel) {
                    Ok(channel) => (self.handler)(channel, &payload),
                    Err(_) => tracing::debug!("redis message on a non-UTF-8 channel ignored"),
                }
            }
            other => tracing::debug!(?other, "unexpected redis message push ignored"),
        }
    }
}

/// The connection the actor currently holds.
struct Live {
    conn: Conn,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    ping: tokio::time::Interval,
}

struct Actor {
    config: SubscriberConfig,
    handler: MessageHandler,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    live: Option<Live>,
    /// Per channel, `add` notes minus `remove` notes so far (entries at 0 are dropped); a
    /// channel is wanted while its count is positive ([`Actor::wants`]). Notes from different
    /// tasks can arrive out of order; the count cannot be fooled by that.
    interest: HashMap<String, i64>,
    /// Channels the server confirmed on the current connection.
    server: HashSet<String>,
    /// Wanted, not yet on the server: the next SUBSCRIBE batch.
    pending: HashSet<String>,
    /// On the server without interest: channel -> when to unsubscribe.
    lingering: HashMap<String, Instant>,
    /// Linger deadlines in order (entries superseded in `lingering` are skipped).
    linger_queue: VecDeque<(Instant, String)>,
    backoff: Duration,
    next_attempt: Instant,
    failed_attempts: u32,
    lost_at: Option<Instant>,
    ever_connected: bool,
    /// Cluster mode: a node went away or a command failed; not ready until a probe of every
    /// master succeeds and everything is resubscribed.
    degraded: bool,
    /// Cluster mode, degraded: when to probe again.
    resync_at: Option<Instant>,
    /// Cluster mode: the running `cluster_slots::probe_masters` (a task, so that pushes keep flowing while a
    /// master does not answer).
    probe: Option<JoinHandle<Result<(), RedisError>>>,
}

enum Event {
    Command(Command),
    Push(Option<PushInfo>),
    LingerDue,
    Connect,
    Ping,
    Resync,
    ProbeDone(Result<(), RedisError>),
    Stop,
}

/// The result of the running probe (never, without one).
async fn probe_done(probe: &mut Option<JoinHandle<Result<(), RedisError>>>) -> Event {
    match probe {
        Some(task) => Event::ProbeDone(cluster_slots::slot_command_done(task.await)),
        None => std::future::pending().await,
    }
}

async fn stopped(rx: &mut watch::Receiver<bool>) {
    // An error means every handle is gone: stop as well.
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The next push, or the health-check tick, of the current connection (never, without one).
async fn next_on_connection(live: &mut Option<Live>) -> Event {
    match live {
        Some(l) => tokio::select! {
            push = l.pushes.recv() => Event::Push(push),
            _ = l.ping.tick() => Event::Ping,
        },
        None => std::future::pending().await,
    }
}

impl Actor {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            // Degraded, expired lingers wait for the resync (no flush meanwhile).
            let linger_due = (!self.degraded)
                .then(|| self.linger_queue.front().map(|(at, _)| *at))
                .flatten();
            let disconnected = self.live.is_none();
            let resync_at = self.resync_at.filter(|_| !disconnected);
            let event = tokio::select! {
                biased;
                _ = stopped(&mut shutdown) => Event::Stop,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => Event::Command(cmd),
                    None => Event::Stop,
                },
                _ = tokio::time::sleep_until(self.next_attempt), if disconnected => Event::Connect,
                event = next_on_connection(&mut self.live) => event,
                _ = tokio::time::sleep_until(linger_due.unwrap_or_else(Instant::now)), if linger_due.is_some() => Event::LingerDue,
                _ = tokio::time::sleep_until(resync_at.unwrap_or_else(Instant::now)), if resync_at.is_some() => Event::Resync,
                event = probe_done(&mut self.probe) => event,
            };
            match event {
                Event::Stop => break,
                Event::Command(cmd) => {
                    self.apply(cmd);
                    while let Ok(cmd) = self.commands.try_recv() {
                        self.apply(cmd);
                    }
                }
                Event::Push(first) => self.handle_pushes(first),
                Event::LingerDue => {}
                Event::Connect => {
                    let connected = tokio::select! {
                        biased;
                        _ = stopped(&mut shutdown) => break,
                        r = self.connect() => r,
                    };
                    if let Err(e) = connected {
                        self.connect_failed(&e);
                    }
                    continue;
                }
                Event::Ping if self.config.is_cluster() => self.start_probe(),
                Event::Ping => {
                    let pinged = tokio::select! {
                        biased;
                        _ = stopped(&mut shutdown) => break,
                        r = self.ping() => r,
                    };
                    if let Err(e) = pinged {
                        self.failed(&e.to_string());
                    }
                }
                Event::Resync => {
                    self.resync_at = None;
                    self.start_probe();
                }
                Event::ProbeDone(result) => {
                    self.probe = None;
                    match result {
                        Ok(()) if self.degraded => {
                            let resynced = tokio::select! {
                                biased;
                                _ = stopped(&mut shutdown) => break,
                                r = self.resubscribe_all() => r,
                            };
                            if let Err(e) = resynced {
                                self.resync_failed(&e);
                            }
                        }
                        Ok(()) => {}
                        Err(e) if self.degraded => self.resync_failed(&e),
                        Err(e) => self.failed(&e.to_string()),
                    }
                }
            }
            // While degraded, new subscriptions wait for the resync (which subscribes everything
            // wanted at once) rather than stall on a master that does not answer.
            if self.live.is_some() && !self.degraded {
                let flushed = tokio::select! {
                    biased;
                    _ = stopped(&mut shutdown) => break,
                    r = self.flush() => r,
                };
                if let Err(e) = flushed {
                    self.failed(&e.to_string());
                }
            }
        }
        self.shared.ready.store(false, Ordering::Release);
        self.shared.subscribed.lock().clear();
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        tracing::debug!(url = %self.config.target(), "redis subscriber stopped");
    }

    /// Whether somebody on this node wants `channel`.
    fn wants(&self, channel: &str) -> bool {
        self.interest.get(channel).is_some_and(|&n| n > 0)
    }

    /// The channels somebody on this node wants.
    fn wanted(&self) -> impl Iterator<Item = &String> {
        self.interest
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(channel, _)| channel)
    }

    fn apply(&mut self, cmd: Command) {
        let (channel, step) = match &cmd {
            Command::Add(channel) => (channel, 1),
            Command::Remove(channel) => (channel, -1),
        };
        let count = self.interest.entry(channel.clone()).or_insert(0);
        *count += step;
        let count = *count;
        if count == 0 {
            self.interest.remove(channel);
        }
        // Only the moves between "not wanted" (<= 0) and "wanted" (> 0) change anything.
        let crossed = match cmd {
            Command::Add(_) => count == 1,
            Command::Remove(_) => count == 0,
        };
        if !crossed {
            return;
        }
        match cmd {
            Command::Add(channel) => {
                self.lingering.remove(&channel);
                if self.server.contains(&channel) {
                    // Lingering until now: wanted again, and still on the server.
                    if self.shared.subscribed.lock().insert(channel.clone()) {
                        self.shared.confirmed.notify_waiters();
                    }
                } else if self.live.is_some() {
                    self.pending.insert(channel);
                }
            }
            Command::Remove(channel) => {
                if self.pending.remove(&channel) {
                    // Never reached the server: nothing to unsubscribe.
                    return;
                }
                if self.server.contains(&channel) {
                    // Still on the server, but no longer promised to anyone who waits.
                    self.shared.subscribed.lock().remove(&channel);
                    let at = Instant::now() + self.config.linger;
                    self.lingering.insert(channel.clone(), at);
                    self.linger_queue.push_back((at, channel));
                }
            }
        }
    }

    /// Handles `first` and whatever else is already queued (up to a bound). A push is taken
    /// from the channel only when it will be handled in this call: one taken past the bound
    /// would be dropped (under load, one lost message per full batch).
    fn handle_pushes(&mut self, first: Option<PushInfo>) {
        let mut next = first;
        for handled in 1..=PUSH_BATCH {
            let Some(push) = next else {
                self.lost("push channel closed");
                return;
            };
            match push.kind {
                PushKind::Disconnection => {
                    // Single: the connection is gone. Cluster: one node's connection is; the
                    // cluster connection repairs it and we resync.
                    self.failed("connection closed");
                    if self.live.is_none() {
                        return;
                    }
                }
                PushKind::SUnsubscribe => self.server_unsubscribed(push.data),
                // Subscribe/unsubscribe confirmations are awaited by the commands themselves.
                _ => {}
            }
            if handled == PUSH_BATCH {
                return;
            }
            next = match self.live.as_mut().map(|l| l.pushes.try_recv()) {
                Some(Ok(push)) => Some(push),
                Some(Err(mpsc::error::TryRecvError::Empty)) | None => return,
                Some(Err(mpsc::error::TryRecvError::Disconnected)) => None,
            };
        }
    }

    /// A new connection (single or cluster) whose pushes go to the returned receiver.
    async fn open(&self) -> Result<(Conn, mpsc::UnboundedReceiver<PushInfo>), RedisError> {
        let (control_tx, push_rx) = mpsc::unbounded_channel();
        let push_tx = PushRouter {
            handler: Arc::clone(&self.handler),
            shared: Arc::clone(&self.shared),
            control: control_tx,
        };
        if self.config.is_cluster() {
            let client =
                ClusterClient::builder(self.config.cluster_nodes.iter().map(String::as_str))
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .push_sender(push_tx)
                    .build()?;
            let conn = client.get_async_connection().await?;
            return Ok((Conn::Cluster(conn), push_rx));
        }
        let info = self.config.url.as_str().into_connection_info()?;
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(redis_settings))?;
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_push_sender(push_tx);
        let conn = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await?;
        Ok((Conn::Single(conn), push_rx))
    }

    async fn connect(&mut self) -> Result<(), RedisError> {
        let (mut conn, push_rx) = self.open().await?;
        if let Conn::Cluster(cluster) = &conn {
            // Ready means every master answers, from the start.
            cluster_slots::probe_masters(cluster.clone()).await?;
        }

        // A fresh connection has no subscriptions: everything wanted goes in one batch.
        self.server.clear();
        self.shared.subscribed.lock().clear();
        self.pending.clear();
        self.lingering.clear();
        self.linger_queue.clear();
        let all: Vec<String> = self.wanted().cloned().collect();
        conn.subscribe(&all).await?;
        self.shared.subscribed.lock().extend(all.iter().cloned());
        self.shared.confirmed.notify_waiters();
        self.server.extend(all);

        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.live = Some(Live {
            conn,
            pushes: push_rx,
            ping,
        });
        self.resync_at = None;
        self.shared.ready.store(true, Ordering::Release);
        let channels = self.server.len();
        let url = self.config.target();
        match self.lost_at.take() {
            Some(lost_at) => {
                self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    %url,
                    resubscribed = channels,
                    attempts = self.failed_attempts + 1,
                    down_ms = lost_at.elapsed().as_millis() as u64,
                    "redis subscription connection restored"
                );
            }
            None if self.ever_connected => {}
            None => tracing::info!(
                %url,
                subscribed = channels,
                attempts = self.failed_attempts + 1,
                "redis subscription connection up"
            ),
        }
        self.ever_connected = true;
        self.failed_attempts = 0;
        self.backoff = INITIAL_BACKOFF;
        Ok(())
    }

    fn connect_failed(&mut self, e: &RedisError) {
        crate::metrics::redis_error("subscription");
        self.live = None;
        self.failed_attempts += 1;
        let url = self.config.target();
        if self.failed_attempts == 1 && !self.ever_connected {
            tracing::warn!(%url, error = %e, "redis unreachable; retrying in the background");
        } else if self.failed_attempts.is_multiple_of(WARN_EVERY_ATTEMPTS) {
            tracing::warn!(%url, error = %e, attempts = self.failed_attempts, "redis still unreachable");
        } else {
            tracing::debug!(%url, error = %e, attempts = self.failed_attempts, "redis connect failed");
        }
        self.schedule_attempt();
    }

    fn schedule_attempt(&mut self) {
        self.next_attempt = self.backoff_deadline();
    }

    /// Now plus the current backoff (half of it fixed, half random), and doubles the backoff.
    fn backoff_deadline(&mut self) -> Instant {
        let half = self.backoff / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis() as u64);
        self.backoff = (self.backoff * 2).min(self.config.max_backoff.max(INITIAL_BACKOFF));
        Instant::now() + half + Duration::from_millis(jitter_ms)
    }

    /// A command failed or a connection closed: a single connection is lost; a cluster
    /// connection repairs itself, so it is only degraded until a resync succeeds.
    fn failed(&mut self, error: &str) {
        if self.config.is_cluster() && self.live.is_some() {
            self.degrade(error);
        } else {
            self.lost(error);
        }
    }

    /// Cluster mode: not ready until a probe of every master (scheduled with backoff) and
    /// [`resubscribe_all`](Self::resubscribe_all) succeed.
    fn degrade(&mut self, error: &str) {
        if self.degraded {
            return;
        }
        self.degraded = true;
        // A probe started before the failure proves nothing.
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        self.shared.ready.store(false, Ordering::Release);
        self.lost_at = Some(Instant::now());
        self.failed_attempts = 0;
        self.backoff = INITIAL_BACKOFF;
        self.resync_at = Some(self.backoff_deadline());
        tracing::warn!(
            url = %self.config.target(),
            error,
            channels = self.wanted().count(),
            "redis cluster subscriptions degraded; resubscribing once every master answers"
        );
    }

    /// Cluster mode: starts `cluster_slots::probe_masters` in a task unless one is running.
    fn start_probe(&mut self) {
        if self.probe.is_some() {
            return;
        }
        if let Some(Live {
            conn: Conn::Cluster(conn),
            ..
        }) = &self.live
        {
            let conn = conn.clone();
            self.probe = Some(tokio::spawn(async move {
                tokio::time::timeout(RESPONSE_TIMEOUT, cluster_slots::probe_masters(conn))
                    .await
                    .unwrap_or_else(|_| {
                        Err(RedisError::from((
                            redis::ErrorKind::Io,
                            "cluster probe timed out",
                        )))
                    })
            }));
        }
    }

    /// Cluster mode, after a successful probe: puts the server-side subscriptions back in line
    /// with what is wanted (SSUBSCRIBE is idempotent), then reports ready again.
    async fn resubscribe_all(&mut self) -> Result<(), RedisError> {
        let wanted: HashSet<String> = self
            .wanted()
            .chain(self.lingering.keys())
            .cloned()
            .collect();
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        let stale: Vec<String> = self.server.difference(&wanted).cloned().collect();
        live.conn.unsubscribe(&stale).await?;
        for channel in &stale {
            self.server.remove(channel);
        }
        // From here on they count as on the server even if a command fails halfway, so that a
        // channel whose interest ends before the next resync is still unsubscribed.
        self.server.extend(wanted.iter().cloned());
        let all: Vec<String> = wanted.iter().cloned().collect();
        live.conn.subscribe(&all).await?;
        self.pending.clear();
        // Lingering channels are subscribed again too, but not promised to waiters.
        *self.shared.subscribed.lock() = wanted
            .iter()
            .filter(|channel| !self.lingering.contains_key(*channel))
            .cloned()
            .collect();
        self.shared.confirmed.notify_waiters();
        self.server = wanted;
        self.degraded = false;
        self.resync_at = None;
        self.shared.ready.store(true, Ordering::Release);
        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            url = %self.config.target(),
            resubscribed = self.server.len(),
            attempts = self.failed_attempts + 1,
            down_ms = self.lost_at.take().map_or(0, |at| at.elapsed().as_millis() as u64),
            "redis cluster subscriptions restored"
        );
        self.failed_attempts = 0;
        self.backoff = INITIAL_BACKOFF;
        Ok(())
    }

    fn resync_failed(&mut self, e: &RedisError) {
        self.failed_attempts += 1;
        let attempts = self.failed_attempts;
        let url = self.config.target();
        tracing::debug!(%url, error = %e, attempts, "redis cluster resync failed");
        if attempts >= REBUILD_AFTER_ATTEMPTS {
            // Do not rely on the cluster connection repairing itself forever: rebuild it.
            self.lost(&format!("still degraded after {attempts} resyncs: {e}"));
            return;
        }
        self.resync_at = Some(self.backoff_deadline());
    }

    /// Cluster mode: the server dropped one of our sharded subscriptions (its slot moved). A
    /// channel still wanted goes back into the next batch (routed to the slot's new owner).
    fn server_unsubscribed(&mut self, data: Vec<Value>) {
        let Some(Value::BulkString(channel)) = data.into_iter().next() else {
            return;
        };
        let Ok(channel) = String::from_utf8(channel) else {
            return;
        };
        if self.wants(&channel) && self.server.remove(&channel) {
            self.shared.subscribed.lock().remove(&channel);
            self.pending.insert(channel);
        }
    }

    /// The connection is gone: forget server state and schedule a reconnect.
    fn lost(&mut self, error: &str) {
        if self.live.take().is_none() {
            return;
        }
        crate::metrics::redis_error("subscription");
        self.degraded = false;
        self.resync_at = None;
        if let Some(probe) = self.probe.take() {
            probe.abort();
        }
        self.shared.ready.store(false, Ordering::Release);
        self.shared.subscribed.lock().clear();
        self.server.clear();
        self.pending.clear();
        self.lingering.clear();
        self.linger_queue.clear();
        self.lost_at = Some(Instant::now());
        self.failed_attempts = 0;
        self.backoff = INITIAL_BACKOFF;
        tracing::warn!(
            url = %self.config.target(),
            error,
            channels = self.wanted().count(),
            "redis subscription connection lost; reconnecting"
        );
        self.schedule_attempt();
    }

    async fn ping(&mut self) -> Result<(), RedisError> {
        if let Some(Live {
            conn: Conn::Single(conn),
            ..
        }) = self.live.as_mut()
        {
            redis::cmd("PING").query_async::<Value>(conn).await?;
        }
        Ok(())
    }

    /// One SUBSCRIBE for everything new, one UNSUBSCRIBE for everything whose linger expired.
    async fn flush(&mut self) -> Result<(), RedisError> {
        let Some(live) = self.live.as_mut() else {
            return Ok(());
        };
        if !self.pending.is_empty() {
            let new: Vec<String> = self.pending.drain().collect();
            // Counted as on the server before the command: if it fails halfway (cluster mode,
            // some slots done), the resync then knows to unsubscribe those no longer wanted.
            self.server.extend(new.iter().cloned());
            live.conn.subscribe(&new).await?;
            self.shared.subscribed.lock().extend(new);
            self.shared.confirmed.notify_waiters();
        }
        // Lingers ending within a tenth of the linger from now go in the same UNSUBSCRIBE: a
        // burst of removes spread over a few milliseconds is one command, not one per wake-up.
        let horizon = Instant::now() + self.config.linger / 10;
        let mut due = Vec::new();
        while let Some((at, _)) = self.linger_queue.front() {
            if *at > horizon {
                break;
            }
            let Some((at, channel)) = self.linger_queue.pop_front() else {
                break;
            };
            if self.lingering.get(&channel) == Some(&at) {
                self.lingering.remove(&channel);
                due.push(channel);
            }
        }
        if !due.is_empty() {
            live.conn.unsubscribe(&due).await?;
            for channel in &due {
                self.server.remove(channel);
            }
        }
        Ok(())
    }
}
