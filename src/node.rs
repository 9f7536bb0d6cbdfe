//! A running node: wires the listener, hub, broker and admission together, and owns shutdown.
//!
//! [`start`] binds and serves in the background and returns a [`RunningNode`] handle (tests and
//! benches embed nodes this way); [`run_until_signal`] is what the binary does: start, wait for
//! SIGTERM or SIGINT, shut down.

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
use crate::hub::Hub;
use crate::limits::peer::PeerLimits;
use crate::limits::ConnectionSlots;
use crate::protocol::codes::CloseCode;

/// How long shutdown waits for connections to take their close frames.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

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

/// Binds the listener and starts serving.
pub async fn start(settings: Settings) -> Result<RunningNode, NodeError> {
    let auth = Authenticator::from_settings(&settings.auth)?;
    // The recorder must exist before the first counter moves, not at the first scrape.
    crate::metrics::handle();
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| NodeError::Bind {
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
        let deadline = Instant::now() + CLOSE_GRACE;
        while self.ctx.hub.connection_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.ctx.broker.shutdown().await;
    }
}

/// Runs a node until SIGTERM or SIGINT, then shuts it down.
pub async fn run_until_signal(settings: Settings) -> Result<(), NodeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(NodeError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(NodeError::Signals)?;
    let node = start(settings).await?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    node.shutdown().await;
    Ok(())
}
