//! Keeps each topic's live stream whole on this node: every sequenced publication reaches the
//! hub exactly once and in `seq` order, even across a lost Redis subscription.
//!
//! Redis pub/sub delivers at most once: whatever is published while a node's subscription
//! connection is down (a reconnect, a failover) never reaches it. Every sequenced publication
//! is also in its topic's history stream, so the node can fetch what it missed:
//!
//! - **Gap detection.** A `Cursor` per topic remembers the last `seq` delivered here (and its
//!   epoch). A publication right after it is delivered at once; one at or below it is a
//!   duplicate and dropped; one further ahead reveals a gap: it is held, and a fill task reads
//!   the history after the cursor, delivers the missing publications, then the held ones, in
//!   order. Publications arriving meanwhile are held too.
//! - **Resync after a reconnect.** A topic that went quiet after the gap would never reveal it,
//!   so when a subscription connection comes back, every topic this node holds is filled from
//!   its cursor the same way.
//! - A new epoch (the topic's counter started over) resets the cursor.
//!
//! Unsequenced publications (a backend's plain `PUBLISH`) have no place in the stream and pass
//! straight through.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;

use crate::broker::BrokerError;
use crate::history::{HistoryPage, StreamPosition};
use crate::hub::{Hub, Publication};

/// A history read in progress.
pub type HistoryRead =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<HistoryPage, BrokerError>> + Send>>;

/// Reads a topic's history after a position (the Redis broker's `history`).
pub type HistoryReader = Arc<dyn Fn(String, StreamPosition) -> HistoryRead + Send + Sync>;

/// Attempts to read history for one gap before giving up on it (Redis may still be coming back).
const FILL_ATTEMPTS: u32 = 8;
/// First pause between attempts; doubles each time.
const FILL_BACKOFF: Duration = Duration::from_millis(50);

/// Where one topic's live stream stands on this node.
struct Cursor {
    epoch: Arc<str>,
    /// The last `seq` delivered to the hub.
    seq: u64,
    /// While a gap is being filled: the live publications held until it is.
    filling: Option<Vec<Publication>>,
}

pub struct GapFiller {
    hub: Arc<Hub>,
    cursors: DashMap<Arc<str>, Cursor>,
    reader: OnceLock<HistoryReader>,
}

impl GapFiller {
    pub fn new(hub: Arc<Hub>) -> Arc<Self> {
        Arc::new(GapFiller {
            hub,
            cursors: DashMap::new(),
            reader: OnceLock::new(),
        })
    }

    /// Sets how history is read (once the broker's connections exist).
    pub fn set_reader(&self, reader: HistoryReader) {
        let _ = self.reader.set(reader);
    }

    /// A publication arrived from Redis: deliver it, drop it as a duplicate, or hold it until
    /// the gap in front of it is filled.
    pub fn offer(self: &Arc<Self>, publication: Publication) {
        let (Some(seq), Some(epoch)) = (publication.seq, publication.epoch.clone()) else {
            self.hub.deliver(&publication);
            return;
        };
        let mut cursor = self
            .cursors
            .entry(Arc::clone(&publication.topic))
            .or_insert_with(|| Cursor {
                epoch: Arc::clone(&epoch),
                seq: seq.saturating_sub(1),
                filling: None,
            });
        if let Some(held) = &mut cursor.filling {
            held.push(publication);
            return;
        }
        if cursor.epoch != epoch {
            // The counter started over: nothing before this one can be recovered or compared.
            cursor.epoch = epoch;
            cursor.seq = seq;
            self.hub.deliver(&publication);
            return;
        }
        if seq <= cursor.seq {
            metrics::counter!(crate::metrics::DUPLICATES_DROPPED).increment(1);
            return;
        }
        if seq == cursor.seq + 1 {
            cursor.seq = seq;
            // Delivered under the cursor's lock: the next one cannot overtake it.
            self.hub.deliver(&publication);
            return;
        }
        let from = StreamPosition {
            seq: cursor.seq,
            epoch: cursor.epoch.to_string(),
        };
        cursor.filling = Some(vec![publication]);
        let topic = Arc::clone(cursor.key());
        drop(cursor);
        self.spawn_fill(topic, from);
    }

    /// After a lost subscription came back: fills every topic from its cursor (what was
    /// published while the node was not listening is in history).
    pub fn resync_all(self: &Arc<Self>) {
        let mut starts = Vec::new();
        for mut cursor in self.cursors.iter_mut() {
            if cursor.filling.is_none() {
                cursor.filling = Some(Vec::new());
                let from = StreamPosition {
                    seq: cursor.seq,
                    epoch: cursor.epoch.to_string(),
                };
                starts.push((Arc::clone(cursor.key()), from));
            }
        }
        for (topic, from) in starts {
            self.spawn_fill(topic, from);
        }
    }

    /// This node no longer holds `topic`: forget where its stream stood. The note saying so
    /// may arrive after a new subscriber joined (notes from different tasks are not ordered),
    /// so a topic that has local subscribers again keeps its cursor.
    pub fn forget(&self, topic: &str) {
        self.cursors.remove_if(topic, |_, c| {
            c.filling.is_none() && self.hub.subscriber_count(topic) == 0
        });
    }

    /// Topics with a cursor (for tests and diagnostics).
    pub fn tracked(&self) -> usize {
        self.cursors.len()
    }

    fn spawn_fill(self: &Arc<Self>, topic: Arc<str>, from: StreamPosition) {
        let this = Arc::clone(self);
        tokio::spawn(async move { this.fill(topic, from).await });
    }

    /// Reads the history after `from`, page after page (a gap may be longer than one read
    /// returns), then delivers the missing publications and the held ones in `seq` order and
    /// releases the topic.
    async fn fill(self: Arc<Self>, topic: Arc<str>, from: StreamPosition) {
        let mut fetched: Vec<Publication> = Vec::new();
        let mut complete = false;
        if let Some(reader) = self.reader.get() {
            let mut next = from.clone();
            while let Some(page) = read_page(reader, &topic, &next).await {
                complete = page.complete;
                // A page that stops short (truncated by the read's limit) ends at a position
                // the next read continues from; an empty or incomplete one ends the fill.
                let last = page
                    .publications
                    .last()
                    .and_then(|p| Some((p.seq?, p.epoch.clone()?)));
                fetched.extend(page.publications);
                match last {
                    Some((seq, epoch)) if !complete => {
                        next = StreamPosition {
                            seq,
                            epoch: epoch.to_string(),
                        }
                    }
                    _ => break,
                }
            }
        }
        let Some(mut cursor) = self.cursors.get_mut(&topic) else {
            return;
        };
        let held = cursor.filling.take().unwrap_or_default();
        if !complete && !held.is_empty() {
            metrics::counter!(crate::metrics::HISTORY_GAPS_UNFILLED).increment(1);
            tracing::warn!(
                %topic,
                after = from.seq,
                "a gap in the live stream could not be filled from history"
            );
        }
        metrics::counter!(crate::metrics::HISTORY_BACKFILLED).increment(fetched.len() as u64);
        let mut ordered: Vec<Publication> = fetched.into_iter().chain(held).collect();
        ordered.sort_by_key(|p| p.seq);
        for publication in ordered {
            let (Some(seq), Some(epoch)) = (publication.seq, publication.epoch.clone()) else {
                continue;
            };
            if epoch != cursor.epoch {
                cursor.epoch = epoch;
                cursor.seq = seq;
                self.hub.deliver(&publication);
            } else if seq > cursor.seq {
                cursor.seq = seq;
                self.hub.deliver(&publication);
            } else {
                metrics::counter!(crate::metrics::DUPLICATES_DROPPED).increment(1);
            }
        }
    }
}

/// One history read after `from`, retried while Redis comes back; `None` when it never did.
async fn read_page(
    reader: &HistoryReader,
    topic: &str,
    from: &StreamPosition,
) -> Option<HistoryPage> {
    let mut pause = FILL_BACKOFF;
    for attempt in 1..=FILL_ATTEMPTS {
        match reader(topic.to_string(), from.clone()).await {
            Ok(page) => return Some(page),
            Err(e) if attempt == FILL_ATTEMPTS => {
                tracing::warn!(%topic, error = %e, "could not read history to fill a gap");
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HistorySettings;
    use crate::history::HistoryRing;
    use crate::hub::Connection;
    use crate::protocol::filter::SubscriptionOptions;
    use crate::ws::writer::Outbound;
    use serde_json::value::RawValue;

    fn publication(seq: u64) -> Publication {
        Publication::encode("t", "x", seq, "e1", RawValue::NULL)
    }

    /// A hub with one subscriber of `t` whose queue we can read back as seqs.
    fn hub_with_subscriber() -> (Arc<Hub>, Arc<Outbound>) {
        let hub = Hub::new();
        let outbound = Outbound::new(1 << 20);
        let conn = Arc::new(Connection {
            id: 1,
            client_id: Arc::from("c"),
            user_id: None,
            outbound: Arc::clone(&outbound),
            connected_at: std::time::SystemTime::now(),
            deflate: None,
        });
        hub.register(Arc::clone(&conn));
        hub.subscribe(&Arc::from("t"), &conn, &SubscriptionOptions::default());
        (hub, outbound)
    }

    /// Reads `ring` as the broker reads Redis history: at most `page` publications per read.
    fn ring_reader(ring: &Arc<HistoryRing>, page: usize) -> HistoryReader {
        let ring = Arc::clone(ring);
        Arc::new(move |topic: String, from: StreamPosition| {
            let read = ring.read(&topic, Some(&from), page, HistorySettings::default());
            Box::pin(async move { Ok(read) })
        })
    }

    fn delivered(outbound: &Outbound) -> Vec<u64> {
        outbound.queued_seqs()
    }

    #[tokio::test]
    async fn in_order_passes_duplicates_drop_and_gaps_are_filled_from_history() {
        let (hub, outbound) = hub_with_subscriber();
        let ring = Arc::new(HistoryRing::new());
        let bounds = HistorySettings::default();
        for _ in 1..=6 {
            ring.append("t", bounds, || "e1".into(), |pos| publication(pos.seq));
        }
        let filler = GapFiller::new(hub);
        filler.set_reader(ring_reader(&ring, 100));
        filler.offer(publication(1));
        filler.offer(publication(2));
        filler.offer(publication(2));
        // 3 and 4 were lost; 5 reveals the gap; 6 arrives while it is being filled.
        filler.offer(publication(5));
        filler.offer(publication(6));
        tokio::time::sleep(Duration::from_millis(50)).await;
        filler.offer(publication(7));
        assert_eq!(delivered(&outbound), vec![1, 2, 3, 4, 5, 6, 7]);
    }

    /// A gap longer than one history read (pages of 10 here, 25 missing) is filled page
    /// after page, not cut at the first.
    #[tokio::test]
    async fn a_gap_longer_than_one_page_is_filled_whole() {
        let (hub, outbound) = hub_with_subscriber();
        let ring = Arc::new(HistoryRing::new());
        let bounds = HistorySettings::default();
        for _ in 1..=27 {
            ring.append("t", bounds, || "e1".into(), |pos| publication(pos.seq));
        }
        let filler = GapFiller::new(hub);
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&reads);
        let read = ring_reader(&ring, 10);
        filler.set_reader(Arc::new(move |topic: String, from: StreamPosition| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            read(topic, from)
        }));
        filler.offer(publication(1));
        // 2..=26 were lost; 27 reveals the gap.
        filler.offer(publication(27));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(delivered(&outbound), (1..=27).collect::<Vec<u64>>());
        assert_eq!(reads.load(std::sync::atomic::Ordering::Relaxed), 3);
    }

    /// A late "last subscriber gone" note does not drop the cursor of a topic that has a
    /// subscriber again; once nobody holds it, it is forgotten.
    #[tokio::test]
    async fn forget_keeps_the_cursor_of_a_topic_still_held() {
        let (hub, _outbound) = hub_with_subscriber();
        let filler = GapFiller::new(Arc::clone(&hub));
        filler.offer(publication(1));
        filler.forget("t");
        assert_eq!(filler.tracked(), 1, "t still has a subscriber");
        hub.unsubscribe("t", 1);
        filler.forget("t");
        assert_eq!(filler.tracked(), 0);
    }

    #[tokio::test]
    async fn resync_fills_a_quiet_topic_and_a_new_epoch_resets() {
        let (hub, outbound) = hub_with_subscriber();
        let ring = Arc::new(HistoryRing::new());
        let bounds = HistorySettings::default();
        let filler = GapFiller::new(hub);
        filler.set_reader(ring_reader(&ring, 100));
        for _ in 1..=3 {
            ring.append("t", bounds, || "e1".into(), |pos| publication(pos.seq));
        }
        filler.offer(publication(1));
        // 2 and 3 went out while the subscription was down; nothing else follows.
        filler.resync_all();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(delivered(&outbound), vec![1, 2, 3]);
        filler.offer(Publication::encode("t", "x", 1, "e2", RawValue::NULL));
        assert_eq!(delivered(&outbound), vec![1]);
    }
}
