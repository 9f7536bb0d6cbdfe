//! A running node: wires the listener, hub, broker and admission together, and owns shutdown.
//!
//! [`start`] binds and serves in the background and returns a [`RunningNode`] handle (tests and
//! benches embed nodes this way); [`run_until_signal`] is what the binary does: start, wait for
//! SIGTERM or SIGINT, drain ([`RunningNode::drain`]), exit.
//!
//! A drain spreads the disconnects of a node's clients over `Settings.drain` (`--drain-seconds`),
//! so that a rolling restart does not send every client back to the load balancer at the same
//! instant: `/readyz` turns 503 and new upgrades are refused at once, while the clients already
//! connected keep being served until their turn, when each gets a `disconnect` notice
//! `{code: 1001, reconnect: true}` after whatever was queued for it, and a close frame.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::Broker;
use crate::config::Settings;
use crate::hub::{Connection, Hub};
use crate::limits::peer::PeerLimits;
use crate::limits::ConnectionSlots;
use crate::protocol::codes::CloseCode;
use crate::ws::flusher::Flushers;

/// How long shutdown waits for connections to take their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// The finest step of a drain: connections due within one step are closed together.
const DRAIN_STEP: Duration = Duration::from_millis(10);
/// The longest drain window honoured (a longer one is a configuration mistake, and would
/// overflow the clock arithmetic of the schedule).
const MAX_DRAIN: Duration = Duration::from_secs(24 * 3600);
/// The reason in the `disconnect` notice and close frame of a drain.
const DRAIN_REASON: &str = "server shutting down: reconnect";

/// State shared by every connection and request of one node.
pub struct NodeContext {
    pub settings: Arc<Settings>,
    /// Verifies client tokens (keys loaded once at start).
    pub auth: Authenticator,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub slots: Arc<ConnectionSlots>,
    /// Connection limits per client address and per user.
    pub peers: Arc<PeerLimits>,
    /// Write connections' queues after fan-out (see `ws::flusher`).
    pub flushers: Flushers,
    pub started_at: Instant,
    shutting_down: AtomicBool,
}

impl NodeContext {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot load the JWT keys: {0}")]
    AuthKeys(#[from] crate::auth::KeyError),
    #[error("cannot start the broker: {0}")]
    Broker(#[from] crate::broker::BrokerError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// A node serving in the background.
pub struct RunningNode {
    pub local_addr: SocketAddr,
    ctx: Arc<NodeContext>,
    stop: watch::Sender<bool>,
    accept_loop: JoinHandle<()>,
}

/// The accept queue asked of the kernel (it caps it at `net.core.somaxconn`). tokio's
/// `TcpListener::bind` asks for 1024: a connect storm (a fleet reconnecting after a restart)
/// overflows that, and every dropped SYN costs its client a one-second retransmit.
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As `TcpListener::bind` does: a restarted node may bind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Binds the listener and starts serving.
pub async fn start(settings: Settings) -> Result<RunningNode, NodeError> {
    let auth = Authenticator::from_settings(&settings.auth)?;
    // The recorder must exist before the first counter moves, not at the first scrape.
    crate::metrics::handle();
    let listener = bind(settings.listen).map_err(|source| NodeError::Bind {
        addr: settings.listen,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: settings.listen,
        source,
    })?;
    let hub = Hub::new();
    let settings = Arc::new(settings);
    let (broker, slots): (Arc<dyn Broker>, _) = if settings.redis_urls.is_empty() {
        let slots = ConnectionSlots::new(settings.ws.max_connections);
        (
            Arc::new(MemoryBroker::new(Arc::clone(&hub), Arc::clone(&settings))),
            slots,
        )
    } else {
        // Cluster admission starts with no slots and reserves them from Redis block by block.
        let slots = ConnectionSlots::with_limit(settings.ws.max_connections, 0);
        let broker = RedisBroker::start(&settings, Arc::clone(&hub), Arc::clone(&slots))?;
        (Arc::new(broker), slots)
    };
    let peers = PeerLimits::new(&settings.ws.peer_limits);
    let ctx = Arc::new(NodeContext {
        peers,
        auth,
        slots,
        settings,
        hub,
        broker,
        flushers: Flushers::start(),
        started_at: Instant::now(),
        shutting_down: AtomicBool::new(false),
    });
    if ctx.settings.api_keys.is_empty() {
        tracing::warn!("no API key configured: the HTTP API answers loopback callers only");
    }
    let (stop, stop_rx) = watch::channel(false);
    // Ends with the accept loop: on shutdown, or when the node handle is dropped.
    tokio::spawn(crate::hub::acks::resend_loop(
        Arc::clone(&ctx.hub),
        ctx.settings.ws.ack_timeout,
        ctx.settings.ws.ack_retries,
        stop_rx.clone(),
    ));
    // The `$sys.metrics` / `$sys.health` snapshots, every `sys.interval` (none when zero).
    tokio::spawn(crate::sys::publish_loop(Arc::clone(&ctx), stop_rx.clone()));
    let accept_loop = tokio::spawn(accept_loop(Arc::clone(&ctx), listener, stop_rx));
    tracing::info!(
        node = %ctx.settings.node_id,
        addr = %local_addr,
        paths = ?ctx.settings.ws.paths,
        broker = ctx.broker.name(),
        "wsgate listening"
    );
    Ok(RunningNode {
        local_addr,
        ctx,
        stop,
        accept_loop,
    })
}

async fn accept_loop(
    ctx: Arc<NodeContext>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(crate::http::serve_connection(Arc::clone(&ctx), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
        }
    }
}

impl RunningNode {
    pub fn context(&self) -> &Arc<NodeContext> {
        &self.ctx
    }

    /// Stops accepting, closes every connection with 1001 (reconnect elsewhere) and waits up to
    /// a few seconds for them to go.
    pub async fn shutdown(self) {
        self.ctx.shutting_down.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let _ = self.accept_loop.await;
        let n = self
            .ctx
            .hub
            .disconnect_all(CloseCode::GoingAway, "server shutting down");
        tracing::info!(connections = n, "shutting down: closing connections");
        wait_closed(&self.ctx).await;
        self.ctx.broker.shutdown().await;
    }

    /// A graceful drain over `Settings.drain` (0: every connection at once), then the same end
    /// as [`RunningNode::shutdown`].
    ///
    /// At once: not ready (`/readyz` 503) and new WebSocket upgrades refused with 503; `/healthz`,
    /// `/metrics` and the HTTP API keep answering. The connections open at that moment are
    /// closed in even batches over the window (close 1001 with a `disconnect` notice
    /// `reconnect: true`, after what was queued for them); until its turn a connection is served
    /// as usual and keeps receiving publications. Then the listener closes, anything left is
    /// closed, and the node waits up to a few seconds for the close frames to go out.
    pub async fn drain(self) {
        self.drain_until(std::future::pending()).await;
    }

    /// [`RunningNode::drain`] that is cut short when `hurry` completes (the binary: a second
    /// SIGTERM or SIGINT): every connection still open is closed at once.
    pub async fn drain_until(self, hurry: impl Future<Output = ()>) {
        self.ctx.shutting_down.store(true, Ordering::Release);
        let window = self.ctx.settings.drain.min(MAX_DRAIN);
        let conns = self.ctx.hub.connections_snapshot();
        tracing::info!(
            connections = conns.len(),
            window_seconds = window.as_secs_f64(),
            "draining: not ready, refusing new connections, closing the open ones over the window"
        );
        let started = Instant::now();
        tokio::select! {
            () = close_spread(&conns, window) => {}
            () = hurry => tracing::warn!("drain cut short: closing every remaining connection now"),
        }
        drop(conns);
        let _ = self.stop.send(true);
        let _ = self.accept_loop.await;
        // Connections whose upgrade was under way when the drain began, and those the drain
        // did not reach before it was cut short.
        let rest = self
            .ctx
            .hub
            .disconnect_all(CloseCode::GoingAway, DRAIN_REASON);
        wait_closed(&self.ctx).await;
        tracing::info!(
            elapsed_seconds = started.elapsed().as_secs_f64(),
            closed_at_the_end = rest,
            "drain finished"
        );
        self.ctx.broker.shutdown().await;
    }
}

/// Closes `conns` in even batches over `window`: batch `k` of `steps` at `k / steps` of it (the
/// first at once), each batch `1 / steps` of the connections, one batch per [`DRAIN_STEP`] at
/// most. A connection that is already gone is skipped (closing it again does nothing).
async fn close_spread(conns: &[Arc<Connection>], window: Duration) {
    let n = conns.len();
    if n == 0 {
        return;
    }
    let fine_steps = window.as_nanos() / DRAIN_STEP.as_nanos();
    let steps = fine_steps.clamp(1, n as u128) as usize;
    let start = tokio::time::Instant::now();
    for k in 0..steps {
        tokio::time::sleep_until(start + window.mul_f64(k as f64 / steps as f64)).await;
        for c in &conns[k * n / steps..(k + 1) * n / steps] {
            c.outbound.close(CloseCode::GoingAway, DRAIN_REASON);
        }
    }
}

/// Waits until every connection has gone, at most [`CLOSE_GRACE`]; closes again now and then
/// what registered meanwhile (an upgrade that was already past its checks).
async fn wait_closed(ctx: &NodeContext) {
    let deadline = Instant::now() + CLOSE_GRACE;
    let mut sweep = Instant::now() + Duration::from_millis(500);
    while ctx.hub.connection_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() >= sweep {
            ctx.hub
                .disconnect_all(CloseCode::GoingAway, "server shutting down");
            sweep += Duration::from_millis(500);
        }
    }
}

/// Runs a node until SIGTERM or SIGINT, then drains it over `Settings.drain`; a second SIGTERM or
/// SIGINT during the drain closes what is left at once.
pub async fn run_until_signal(settings: Settings) -> Result<(), NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(NodeError::Signals)?;
    let node = start(settings).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    node.drain_until(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("second SIGTERM received"),
            _ = int.recv() => tracing::info!("second SIGINT received"),
        }
    })
    .await;
    Ok(())
}
