//! Topic history: where a topic's stream stands ([`StreamPosition`]), what a read of it returns
//! ([`HistoryPage`]), and [`HistoryRing`], the in-memory history of the embedded broker.
//!
//! Every sequenced publication has a place `(seq, epoch)` in its topic's stream: `seq` counts up
//! from 1 without gaps, and `epoch` names one run of that counter (a new epoch means the
//! counter, and the history with it, started over). A client that knows the position of the
//! last message it saw can ask for everything after it; the answer says whether that is
//! complete (`recovered`) or whether the history no longer reaches back that far.
//!
//! The Redis broker keeps the same semantics in Redis Streams (`broker::redis::history`).

use std::collections::VecDeque;
use std::time::Instant;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};

use crate::config::HistorySettings;
use crate::hub::Publication;

/// A place in a topic's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub seq: u64,
    pub epoch: String,
}

/// What a history read found.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    /// Where the stream stands now (`None`: nothing was ever published, or it all expired).
    pub position: Option<StreamPosition>,
    /// Publications after the asked-for position, oldest first.
    pub publications: Vec<Publication>,
    /// Whether `publications` is everything after the asked-for position: same epoch, and the
    /// history still reached back to the message right after it.
    pub complete: bool,
}

impl HistoryPage {
    /// Builds a page from the publications a store found after `since` (oldest first, at most
    /// `limit` of them taken from the front) and the stream's current position.
    pub fn after(
        since: Option<&StreamPosition>,
        position: Option<StreamPosition>,
        mut found: Vec<Publication>,
        limit: usize,
    ) -> HistoryPage {
        let Some(since) = since else {
            // No starting point: the newest `limit`.
            let skip = found.len().saturating_sub(limit);
            found.drain(..skip);
            return HistoryPage {
                position,
                publications: found,
                complete: true,
            };
        };
        let Some(current) = position.clone() else {
            // Nothing on record: complete only if the client had seen nothing either.
            return HistoryPage {
                position,
                publications: Vec::new(),
                complete: since.seq == 0,
            };
        };
        // Seq 0 means "nothing seen yet": any epoch's history from its start will do.
        if current.epoch != since.epoch && since.seq != 0 {
            return HistoryPage {
                position,
                publications: Vec::new(),
                complete: false,
            };
        }
        found.retain(|p| p.seq.is_some_and(|s| s > since.seq));
        let reaches_back = match found.first().and_then(|p| p.seq) {
            Some(first) => first == since.seq + 1,
            None => current.seq <= since.seq,
        };
        let truncated = found.len() > limit;
        found.truncate(limit);
        let reaches_top = found
            .last()
            .and_then(|p| p.seq)
            .is_none_or(|last| last >= current.seq);
        HistoryPage {
            position,
            complete: reaches_back && !truncated && reaches_top,
            publications: if reaches_back { found } else { Vec::new() },
        }
    }
}

/// One topic's kept publications and its position.
struct TopicRing {
    epoch: String,
    seq: u64,
    /// Oldest first, each with when it was added.
    kept: VecDeque<(Instant, Publication)>,
    last_write: Instant,
}

/// In-memory per-topic history with the same bounds as the Redis one: at most `size`
/// publications, none older than `ttl`, and a topic idle for `ttl` forgotten entirely (its
/// counter too, so the next publication starts a new epoch).
#[derive(Default)]
pub struct HistoryRing {
    topics: DashMap<String, TopicRing>,
}

impl HistoryRing {
    pub fn new() -> Self {
        HistoryRing::default()
    }

    /// Appends one publication to `topic`: takes the next position (seq + 1, or 1 in a fresh
    /// epoch), has `publish` encode and deliver the publication made for it, and keeps that
    /// within `bounds`. All of it happens under the topic's lock, so concurrent publishers of
    /// one topic are delivered in `seq` order.
    pub fn append(
        &self,
        topic: &str,
        bounds: HistorySettings,
        fresh_epoch: impl FnOnce() -> String,
        publish: impl FnOnce(&StreamPosition) -> Publication,
    ) -> StreamPosition {
        let now = Instant::now();
        let mut ring = self
            .topics
            .entry(topic.to_string())
            .or_insert_with(|| TopicRing {
                epoch: fresh_epoch(),
                seq: 0,
                kept: VecDeque::new(),
                last_write: now,
            });
        ring.seq += 1;
        ring.last_write = now;
        let position = StreamPosition {
            seq: ring.seq,
            epoch: ring.epoch.clone(),
        };
        let publication = publish(&position);
        if bounds.enabled() {
            ring.kept.push_back((now, publication));
            while ring.kept.len() > bounds.size {
                ring.kept.pop_front();
            }
            trim_older(&mut ring.kept, now, bounds);
        }
        position
    }

    /// Publications after `since` (see [`HistoryPage::after`]).
    pub fn read(
        &self,
        topic: &str,
        since: Option<&StreamPosition>,
        limit: usize,
        bounds: HistorySettings,
    ) -> HistoryPage {
        let now = Instant::now();
        let Some(mut ring) = self.topics.get_mut(topic) else {
            return HistoryPage::after(since, None, Vec::new(), limit);
        };
        trim_older(&mut ring.kept, now, bounds);
        let position = Some(StreamPosition {
            seq: ring.seq,
            epoch: ring.epoch.clone(),
        });
        let found = ring.kept.iter().map(|(_, p)| p.clone()).collect();
        HistoryPage::after(since, position, found, limit)
    }

    /// Forgets topics idle for longer than their `ttl` (`bounds_of` gives each topic's bounds):
    /// their counters restart in a new epoch. Returns how many were forgotten.
    pub fn expire_idle(&self, bounds_of: impl Fn(&str) -> HistorySettings) -> usize {
        let now = Instant::now();
        let before = self.topics.len();
        self.topics
            .retain(|topic, ring| now.duration_since(ring.last_write) < bounds_of(topic).ttl);
        before.saturating_sub(self.topics.len())
    }
}

fn trim_older(kept: &mut VecDeque<(Instant, Publication)>, now: Instant, bounds: HistorySettings) {
    while kept
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) >= bounds.ttl)
    {
        kept.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;
    use std::time::Duration;

    fn bounds(size: usize) -> HistorySettings {
        HistorySettings {
            size,
            ttl: Duration::from_secs(60),
        }
    }

    fn publish(ring: &HistoryRing, topic: &str, b: HistorySettings) -> StreamPosition {
        ring.append(
            topic,
            b,
            || "e1".into(),
            |pos| Publication::encode(topic, "t", pos.seq, &pos.epoch, RawValue::NULL),
        )
    }

    fn at(seq: u64) -> StreamPosition {
        StreamPosition {
            seq,
            epoch: "e1".into(),
        }
    }

    fn seqs(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().filter_map(|p| p.seq).collect()
    }

    #[test]
    fn reads_after_a_position_and_says_whether_it_reaches_back() {
        let ring = HistoryRing::new();
        let b = bounds(5);
        for _ in 0..8 {
            publish(&ring, "t", b);
        }
        // Kept: 4..=8.
        let page = ring.read("t", Some(&at(5)), 100, b);
        assert_eq!((seqs(&page), page.complete), (vec![6, 7, 8], true));
        let page = ring.read("t", Some(&at(3)), 100, b);
        assert_eq!((seqs(&page), page.complete), (vec![4, 5, 6, 7, 8], true));
        let page = ring.read("t", Some(&at(2)), 100, b);
        assert!(!page.complete, "3 was trimmed");
        assert!(page.publications.is_empty());
        let from_nothing = StreamPosition {
            seq: 0,
            epoch: String::new(),
        };
        assert!(
            !ring.read("t", Some(&from_nothing), 100, b).complete,
            "1-3 are gone"
        );
        let page = ring.read("t", Some(&at(8)), 100, b);
        assert_eq!((seqs(&page), page.complete), (vec![], true));
        let other_epoch = StreamPosition {
            seq: 6,
            epoch: "e0".into(),
        };
        assert!(!ring.read("t", Some(&other_epoch), 100, b).complete);
        // A limit below what is missing: not complete.
        let page = ring.read("t", Some(&at(4)), 2, b);
        assert_eq!((seqs(&page), page.complete), (vec![5, 6], false));
        // No position: the newest `limit`.
        let page = ring.read("t", None, 2, b);
        assert_eq!(seqs(&page), vec![7, 8]);
        assert_eq!(page.position, Some(at(8)));
    }

    #[test]
    fn an_unknown_topic_is_complete_only_from_the_start() {
        let ring = HistoryRing::new();
        assert!(ring.read("t", Some(&at(0)), 10, bounds(5)).complete);
        assert!(!ring.read("t", Some(&at(3)), 10, bounds(5)).complete);
    }

    #[test]
    fn seq_zero_recovers_from_the_start_of_any_epoch() {
        let ring = HistoryRing::new();
        let b = bounds(5);
        publish(&ring, "t", b);
        publish(&ring, "t", b);
        let from_nothing = StreamPosition {
            seq: 0,
            epoch: String::new(),
        };
        let page = ring.read("t", Some(&from_nothing), 10, b);
        assert_eq!((seqs(&page), page.complete), (vec![1, 2], true));
    }

    #[test]
    fn age_bound_and_idle_topics() {
        let ring = HistoryRing::new();
        let short = HistorySettings {
            size: 10,
            ttl: Duration::from_millis(30),
        };
        publish(&ring, "t", short);
        std::thread::sleep(Duration::from_millis(40));
        let page = ring.read("t", Some(&at(0)), 10, short);
        assert!(page.publications.is_empty());
        assert!(!page.complete, "seq 1 aged out");
        assert_eq!(ring.expire_idle(|_| short), 1);
        assert_eq!(
            publish(&ring, "t", short).seq,
            1,
            "a forgotten topic starts over"
        );
    }

    #[test]
    fn history_off_keeps_nothing_but_still_counts() {
        let ring = HistoryRing::new();
        let off = bounds(0);
        publish(&ring, "t", off);
        let pos = publish(&ring, "t", off);
        assert_eq!(pos.seq, 2);
        assert!(ring.read("t", None, 10, off).publications.is_empty());
    }
}
