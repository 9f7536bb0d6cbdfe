//! The Redis subscription actor (`broker::redis::pubsub`) against a real redis-server: batching,
//! linger, reconnect with resubscribe, Redis down at start; and the local cluster harness.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::redis::{free_port, RedisCluster, RedisServer};
use wsgate::broker::redis::pubsub::{MessageHandler, Subscriber, SubscriberConfig};

const WAIT: Duration = Duration::from_secs(10);
const LINGER: Duration = Duration::from_millis(200);

type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

fn recorder() -> (MessageHandler, Received) {
    let received: Received = Arc::default();
    let sink = received.clone();
    let handler: MessageHandler = Arc::new(move |channel: &str, payload: &[u8]| {
        sink.lock()
            .unwrap()
            .push((channel.to_string(), payload.to_vec()));
    });
    (handler, received)
}

fn start(url: String) -> (Subscriber, Received) {
    start_with(url, Vec::new())
}

/// [`start`], with `channels` wanted from the start (`SubscriberConfig::channels`).
fn start_with(url: String, channels: Vec<String>) -> (Subscriber, Received) {
    let (handler, received) = recorder();
    let config = SubscriberConfig {
        url,
        linger: LINGER,
        max_backoff: Duration::from_millis(500),
        channels,
        ..SubscriberConfig::default()
    };
    (Subscriber::start(config, handler), received)
}

/// Polls `cond` until it holds; panics with `what` after [`WAIT`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn got(received: &Received, channel: &str, payload: &str) -> bool {
    received
        .lock()
        .unwrap()
        .iter()
        .any(|(c, p)| c == channel && p == payload.as_bytes())
}

/// Publishes until the subscriber got it (a publish may race a just-confirmed subscription
/// only in tests that do not wait for the server side; here it is a plain check).
async fn publish_arrives(server: &RedisServer, received: &Received, channel: &str, payload: &str) {
    assert_eq!(
        server.cli(&["PUBLISH", channel, payload]),
        "1",
        "one subscriber on {channel}"
    );
    eventually(
        &format!("{payload} on {channel} reaches the handler"),
        || got(received, channel, payload),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_publish_then_remove_after_linger() {
    let server = RedisServer::start();
    let (sub, received) = start(server.url());
    let ch = "wsgate:t:{news}";
    sub.add(ch.to_string());
    eventually("subscribed", || sub.is_ready() && sub.subscribed() == [ch]).await;
    assert_eq!(server.channels(), [ch]);
    publish_arrives(&server, &received, ch, "x").await;

    sub.remove(ch.to_string());
    eventually("unsubscribed on the server", || {
        server.channels().is_empty()
    })
    .await;
    assert!(sub.subscribed().is_empty());
    assert_eq!(server.command_calls("unsubscribe"), 1);
    sub.shutdown();
}

/// The channels given at start (the node's broadcast, control and own channels) are part of
/// the first connection's SUBSCRIBE: the subscriber is never ready without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_given_at_start_are_subscribed_before_it_is_ready() {
    let server = RedisServer::start();
    let channels = ["wsgate:broadcast", "wsgate:node:{n1}"];
    let (sub, received) = start_with(
        server.url(),
        channels.iter().map(|c| c.to_string()).collect(),
    );
    eventually("ready", || sub.is_ready()).await;
    // Read after readiness, which is set only once the confirmed set holds the first batch.
    assert_eq!(sub.subscribed(), channels);
    assert_eq!(server.channels(), channels);
    assert_eq!(server.command_calls("subscribe"), 1);
    publish_arrives(&server, &received, channels[0], "to every node").await;
    sub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_then_add_within_linger_never_unsubscribes() {
    let server = RedisServer::start();
    let (sub, received) = start(server.url());
    let ch = "wsgate:u:{alice}";
    sub.add(ch.to_string());
    eventually("subscribed", || server.channels() == [ch]).await;

    sub.remove(ch.to_string());
    sub.add(ch.to_string());
    // Proving a negative: wait well past the linger.
    tokio::time::sleep(LINGER * 3).await;
    assert_eq!(server.channels(), [ch]);
    assert_eq!(server.command_calls("unsubscribe"), 0);
    assert_eq!(server.command_calls("subscribe"), 1);
    publish_arrives(&server, &received, ch, "still here").await;

    // A second cycle that is not cancelled does unsubscribe.
    sub.remove(ch.to_string());
    eventually("unsubscribed after linger", || server.channels().is_empty()).await;
    sub.shutdown();
}

/// One connection leaves a topic (the hub's "last one gone") while another joins it ("first
/// one"): the two notes come from different tasks and may arrive the other way round. Counted,
/// add + add + remove leaves the channel wanted; applied as edges it would be unsubscribed
/// after the linger while a client holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notes_arriving_out_of_order_keep_a_held_channel() {
    let server = RedisServer::start();
    let (sub, received) = start(server.url());
    let ch = "wsgate:t:{busy}";
    sub.add(ch.to_string());
    eventually("subscribed", || server.channels() == [ch]).await;

    // The joining connection's note overtakes the leaving one's.
    sub.add(ch.to_string());
    sub.remove(ch.to_string());
    tokio::time::sleep(LINGER * 3).await;
    assert_eq!(server.channels(), [ch], "a held channel was unsubscribed");
    assert_eq!(server.command_calls("unsubscribe"), 0);
    publish_arrives(&server, &received, ch, "still held").await;

    // A remove that overtakes its add: the channel is not wanted, and stays unsubscribed.
    let other = "wsgate:t:{quiet}";
    sub.remove(other.to_string());
    sub.add(other.to_string());
    // The real last one leaving.
    sub.remove(ch.to_string());
    eventually("unsubscribed after linger", || server.channels().is_empty()).await;
    tokio::time::sleep(LINGER * 2).await;
    assert!(server.channels().is_empty(), "{:?}", server.channels());
    sub.shutdown();
}

/// `wait_subscribed` returns once the server confirmed the channel, and `false` at its
/// timeout for a channel nobody added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_subscribed_returns_at_the_confirmation() {
    let server = RedisServer::start();
    let (sub, _received) = start(server.url());
    eventually("ready", || sub.is_ready()).await;
    let ch = "wsgate:t:{waited}";
    sub.add(ch.to_string());
    assert!(sub.wait_subscribed(ch, WAIT).await);
    assert_eq!(server.cli(&["PUBLISH", ch, "x"]), "1");
    let started = Instant::now();
    assert!(
        !sub.wait_subscribed("wsgate:t:{never}", Duration::from_millis(100))
            .await
    );
    assert!(started.elapsed() >= Duration::from_millis(100));
    sub.shutdown();
}

/// A backlog far larger than one batch of pushes (the actor handles at most a bound per
/// wake-up, so that commands are not starved) is delivered whole and in order: nothing taken
/// from the push queue at a batch's end may be dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_many_batches_loses_nothing() {
    const MESSAGES: usize = 3000;
    let server = RedisServer::start();
    let received: Received = Arc::default();
    let sink = received.clone();
    let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handler: MessageHandler = Arc::new(move |channel: &str, payload: &[u8]| {
        // The first message stalls the actor while the rest pile up behind it.
        if !stalled.swap(true, std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(300));
        }
        sink.lock()
            .unwrap()
            .push((channel.to_string(), payload.to_vec()));
    });
    let config = SubscriberConfig {
        url: server.url(),
        linger: LINGER,
        ..SubscriberConfig::default()
    };
    let sub = Subscriber::start(config, handler);
    let ch = "wsgate:t:{backlog}";
    sub.add(ch.to_string());
    assert!(sub.wait_subscribed(ch, WAIT).await);

    let client = ::redis::Client::open(server.url()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("publisher connection");
    let mut pipe = ::redis::pipe();
    for n in 0..MESSAGES {
        pipe.cmd("PUBLISH").arg(ch).arg(n.to_string());
    }
    let receivers: Vec<u64> = pipe.query_async(&mut conn).await.expect("PUBLISH pipeline");
    assert!(receivers.iter().all(|&r| r == 1));
    eventually(&format!("{MESSAGES} messages"), || {
        received.lock().unwrap().len() >= MESSAGES
    })
    .await;
    let got: Vec<usize> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, p)| std::str::from_utf8(p).unwrap().parse().unwrap())
        .collect();
    assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>());
    assert_eq!(sub.messages_received(), MESSAGES as u64);
    sub.shutdown();
}

/// Makes Redis hold every client's commands for a second (`CLIENT PAUSE 1000 ALL`): far longer
/// than queueing 500 notes takes, far shorter than the actor's response timeout (5 s).
fn hold_commands(server: &RedisServer) {
    assert_eq!(server.cli(&["CLIENT", "PAUSE", "1000", "ALL"]), "OK");
}

/// Notes that queue while a command is in flight go out together in the next one. Redis is
/// paused (`CLIENT PAUSE ... ALL`) around each burst, so the burst is sure to outrun the actor:
/// without the pause, how many notes queue per round trip depends on the machine (a loaded
/// 2-core CI runner once saw 30 SUBSCRIBEs for 500 channels, a quiet one 1-2). With it, the
/// actor sends at most two commands per burst: one with whatever it had drained when it first
/// woke (held by the pause), one with the rest. One per note would be 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_subscribes_is_batched() {
    let server = RedisServer::start();
    let (sub, received) = start(server.url());
    eventually("connected", || sub.is_ready()).await;

    let channels: Vec<String> = (0..500)
        .map(|i| format!("wsgate:t:{{burst-{i}}}"))
        .collect();
    hold_commands(&server);
    for ch in &channels {
        sub.add(ch.clone());
    }
    eventually("all 500 subscribed", || sub.subscribed().len() == 500).await;
    assert_eq!(server.channels().len(), 500);
    let calls = server.command_calls("subscribe");
    assert!(
        (1..=2).contains(&calls),
        "SUBSCRIBE ran {calls} times for 500 channels"
    );
    publish_arrives(&server, &received, &channels[499], "last").await;

    // Removing them all is batched too. The removes queue behind a SUBSCRIBE held by the
    // pause, so they are applied in at most two groups, and each group's lingers end together.
    hold_commands(&server);
    sub.add("wsgate:t:{burst-held}".to_string());
    for ch in &channels {
        sub.remove(ch.clone());
    }
    eventually("all unsubscribed", || {
        server.channels() == ["wsgate:t:{burst-held}"]
    })
    .await;
    let calls = server.command_calls("unsubscribe");
    assert!(
        (1..=2).contains(&calls),
        "UNSUBSCRIBE ran {calls} times for 500 channels"
    );
    sub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribes_everything_after_redis_restarts() {
    let mut server = RedisServer::start();
    let (sub, received) = start(server.url());
    let channels = ["wsgate:t:{a}", "wsgate:u:{b}", "wsgate:broadcast"];
    for ch in channels {
        sub.add(ch.to_string());
    }
    eventually("subscribed", || {
        sub.is_ready() && server.channels().len() == 3
    })
    .await;
    assert_eq!(sub.reconnects(), 0);

    server.kill();
    // Readiness drops first, the confirmed set is cleared just after: wait for both.
    eventually("not ready, nothing subscribed, while Redis is down", || {
        !sub.is_ready() && sub.subscribed().is_empty()
    })
    .await;
    // Interest changes while down are kept.
    sub.add("wsgate:control".to_string());

    server.restart();
    eventually("ready again", || sub.is_ready()).await;
    assert_eq!(sub.reconnects(), 1);
    let mut expected: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    expected.push("wsgate:control".to_string());
    expected.sort();
    assert_eq!(server.channels(), expected);
    assert_eq!(sub.subscribed(), expected);
    // Everything was resubscribed in one command.
    assert_eq!(server.command_calls("subscribe"), 1);
    for ch in &expected {
        publish_arrives(&server, &received, ch, "after restart").await;
    }
    sub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_is_retried() {
    let port = free_port();
    let (sub, received) = start(format!("redis://127.0.0.1:{port}"));
    sub.add("wsgate:node:n1".to_string());
    assert!(!sub.is_ready());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!sub.is_ready());
    assert!(sub.subscribed().is_empty());

    let server = RedisServer::start_on(port);
    eventually("ready once Redis is up", || sub.is_ready()).await;
    assert_eq!(server.channels(), ["wsgate:node:n1"]);
    assert_eq!(
        sub.reconnects(),
        0,
        "the first connection is not a reconnect"
    );
    publish_arrives(&server, &received, "wsgate:node:n1", "hello").await;
    sub.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_the_connection() {
    let server = RedisServer::start();
    let (sub, _received) = start(server.url());
    sub.add("wsgate:t:{x}".to_string());
    eventually("subscribed", || server.channels().len() == 1).await;
    sub.shutdown();
    assert!(!sub.is_ready());
    eventually("connection closed", || server.channels().is_empty()).await;
    // Calls after shutdown are harmless.
    sub.add("wsgate:t:{y}".to_string());
    sub.remove("wsgate:t:{x}".to_string());
}

#[test]
fn local_cluster_reaches_state_ok() {
    let cluster = RedisCluster::start();
    assert_eq!(cluster.urls().len(), 3);
    for node in 0..3 {
        let info = cluster.cli(node, &["CLUSTER", "INFO"]);
        assert!(info.contains("cluster_state:ok"), "node {node}: {info}");
        assert!(
            info.contains("cluster_known_nodes:3"),
            "node {node}: {info}"
        );
    }
}
