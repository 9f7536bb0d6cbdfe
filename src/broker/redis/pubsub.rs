//! This node's subscription connection to ONE Redis instance.
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
//! The handler runs on the actor task. It may be called for a channel whose interest just ended
//! (a message already in flight, or during linger); callers must tolerate that.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, IntoConnectionInfo, ProtocolVersion, PushInfo, PushKind,
    RedisError, Value,
};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, MissedTickBehavior};

/// Called for every message on a subscribed channel (channel name, payload bytes). Runs on the actor task: must not block.
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

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// `redis://[user:pass@]host:port[/db]`; RESP3 is forced whatever the URL says.
    pub url: String,
    /// How long a channel stays subscribed after its interest ended.
    pub linger: Duration,
    /// The longest reconnect delay (before jitter).
    pub max_backoff: Duration,
}

impl SubscriberConfig {
    /// A config for `url` with the default linger (2 s) and max backoff (5 s).
    pub fn new(url: impl Into<String>) -> SubscriberConfig {
        SubscriberConfig {
            url: url.into(),
            ..SubscriberConfig::default()
        }
    }
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        SubscriberConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            linger: Duration::from_secs(2),
            max_backoff: Duration::from_secs(5),
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
    /// Mirror of the server-side subscriptions of the current connection.
    subscribed: Mutex<HashSet<String>>,
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
    pub fn start(config: SubscriberConfig, handler: MessageHandler) -> Subscriber {
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::default());
        let actor = Actor {
            config,
            handler,
            shared: shared.clone(),
            commands: commands_rx,
            live: None,
            interest: HashSet::new(),
            server: HashSet::new(),
            pending: HashSet::new(),
            lingering: HashMap::new(),
            linger_queue: VecDeque::new(),
            backoff: INITIAL_BACKOFF,
            next_attempt: Instant::now(),
            failed_attempts: 0,
            lost_at: None,
            ever_connected: false,
        };
        tokio::spawn(actor.run(shutdown_rx));
        Subscriber {
            inner: Arc::new(Inner {
                commands,
                shutdown,
                shared,
            }),
        }
    }

    /// Interest in `channel` begins (the caller reference-counts; this is called once per 0->1). Non-blocking.
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

    /// Count of reconnects so far (for logs/metrics/tests): successful connections after a lost
    /// one. The first connection (even after Redis was down at start) is not a reconnect.
    pub fn reconnects(&self) -> u64 {
        self.inner.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Stops the actor (closing its connection). Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        self.inner.shared.ready.store(false, Ordering::Release);
    }
}

/// The connection the actor currently holds.
struct Live {
    conn: MultiplexedConnection,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    ping: tokio::time::Interval,
}

struct Actor {
    config: SubscriberConfig,
    handler: MessageHandler,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    live: Option<Live>,
    /// Channels somebody on this node wants.
    interest: HashSet<String>,
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
}

enum Event {
    Command(Command),
    Push(Option<PushInfo>),
    LingerDue,
    Connect,
    Ping,
    Stop,
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
            let linger_due = self.linger_queue.front().map(|(at, _)| *at);
            let disconnected = self.live.is_none();
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
                Event::Ping => {
                    let pinged = tokio::select! {
                        biased;
                        _ = stopped(&mut shutdown) => break,
                        r = self.ping() => r,
                    };
                    if let Err(e) = pinged {
                        self.lost(&e.to_string());
                    }
                }
            }
            if self.live.is_some() {
                let flushed = tokio::select! {
                    biased;
                    _ = stopped(&mut shutdown) => break,
                    r = self.flush() => r,
                };
                if let Err(e) = flushed {
                    self.lost(&e.to_string());
                }
            }
        }
        self.shared.ready.store(false, Ordering::Release);
        self.shared.subscribed.lock().clear();
        tracing::debug!(url = %redact(&self.config.url), "redis subscriber stopped");
    }

    fn apply(&mut self, cmd: Command) {
        match cmd {
            Command::Add(channel) => {
                self.lingering.remove(&channel);
                if self.live.is_some() && !self.server.contains(&channel) {
                    self.pending.insert(channel.clone());
                }
                self.interest.insert(channel);
            }
            Command::Remove(channel) => {
                if !self.interest.remove(&channel) {
                    return;
                }
                if self.pending.remove(&channel) {
                    // Never reached the server: nothing to unsubscribe.
                    return;
                }
                if self.server.contains(&channel) {
                    let at = Instant::now() + self.config.linger;
                    self.lingering.insert(channel.clone(), at);
                    self.linger_queue.push_back((at, channel));
                }
            }
        }
    }

    /// Handles `first` and whatever else is already queued (up to a bound).
    fn handle_pushes(&mut self, first: Option<PushInfo>) {
        let mut next = first;
        for _ in 0..PUSH_BATCH {
            let Some(push) = next else {
                self.lost("push channel closed");
                return;
            };
            match push.kind {
                PushKind::Message => self.deliver(push.data),
                PushKind::Disconnection => {
                    self.lost("connection closed");
                    return;
                }
                // Subscribe/unsubscribe confirmations are awaited by the commands themselves.
                _ => {}
            }
            next = match self.live.as_mut().map(|l| l.pushes.try_recv()) {
                Some(Ok(push)) => Some(push),
                Some(Err(mpsc::error::TryRecvError::Empty)) | None => return,
                Some(Err(mpsc::error::TryRecvError::Disconnected)) => None,
            };
        }
    }

    fn deliver(&self, data: Vec<Value>) {
        let mut it = data.into_iter();
        match (it.next(), it.next()) {
            (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) => {
                match std::str::from_utf8(&channel) {
                    Ok(channel) => (self.handler)(channel, &payload),
                    Err(_) => tracing::debug!("redis message on a non-UTF-8 channel ignored"),
                }
            }
            other => tracing::debug!(?other, "unexpected redis message push ignored"),
        }
    }

    async fn connect(&mut self) -> Result<(), RedisError> {
        let info = self.config.url.as_str().into_connection_info()?;
        let redis_settings = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let client = Client::open(info.set_redis_settings(redis_settings))?;
        let (push_tx, push_rx) = mpsc::unbounded_channel();
        let conn_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_push_sender(push_tx);
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&conn_config)
            .await?;

        // A fresh connection has no subscriptions: everything wanted goes in one batch.
        self.server.clear();
        self.shared.subscribed.lock().clear();
        self.pending.clear();
        self.lingering.clear();
        self.linger_queue.clear();
        let all: Vec<String> = self.interest.iter().cloned().collect();
        for chunk in all.chunks(MAX_CHANNELS_PER_COMMAND) {
            conn.subscribe(chunk).await?;
        }
        self.shared.subscribed.lock().extend(all.iter().cloned());
        self.server.extend(all);

        let mut ping = tokio::time::interval_at(Instant::now() + PING_INTERVAL, PING_INTERVAL);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.live = Some(Live {
            conn,
            pushes: push_rx,
            ping,
        });
        self.shared.ready.store(true, Ordering::Release);
        let channels = self.server.len();
        let url = redact(&self.config.url);
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
        self.live = None;
        self.failed_attempts += 1;
        let url = redact(&self.config.url);
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
        let half = self.backoff / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis() as u64);
        self.next_attempt = Instant::now() + half + Duration::from_millis(jitter_ms);
        self.backoff = (self.backoff * 2).min(self.config.max_backoff.max(INITIAL_BACKOFF));
    }

    /// The connection is gone: forget server state and schedule a reconnect.
    fn lost(&mut self, error: &str) {
        if self.live.take().is_none() {
            return;
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
            url = %redact(&self.config.url),
            error,
            channels = self.interest.len(),
            "redis subscription connection lost; reconnecting"
        );
        self.schedule_attempt();
    }

    async fn ping(&mut self) -> Result<(), RedisError> {
        if let Some(live) = self.live.as_mut() {
            redis::cmd("PING")
                .query_async::<Value>(&mut live.conn)
                .await?;
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
            for chunk in new.chunks(MAX_CHANNELS_PER_COMMAND) {
                live.conn.subscribe(chunk).await?;
                self.shared.subscribed.lock().extend(chunk.iter().cloned());
                self.server.extend(chunk.iter().cloned());
            }
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while let Some((at, _)) = self.linger_queue.front() {
            if *at > now {
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
        for chunk in due.chunks(MAX_CHANNELS_PER_COMMAND) {
            live.conn.unsubscribe(chunk).await?;
            let mut mirror = self.shared.subscribed.lock();
            for channel in chunk {
                mirror.remove(channel);
                self.server.remove(channel);
            }
        }
        Ok(())
    }
}

/// `url` without its password, for logs.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<invalid url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_password() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
    }
}
