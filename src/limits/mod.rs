//! Limits that refuse work: the per-connection inbound rate limiter and node admission;
//! [`peer`] holds the limits per client address and per user.

pub mod peer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second up to `burst`; one token per inbound message.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        TokenBucket {
            rate: rate_per_second,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`; on refusal returns how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether the bucket will be full at `now` (nothing taken from it is still owed): a full
    /// bucket behaves exactly like a new one, so it can be forgotten.
    pub fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// Node admission: at most `limit` live connections.
///
/// Alone (in-process broker) the limit is `max_connections`. With the Redis broker the limit is
/// the number of slots this node has reserved from the cluster-wide budget
/// (`broker::redis::admission`), raised and lowered block by block.
#[derive(Debug)]
pub struct ConnectionSlots {
    live: AtomicUsize,
    limit: AtomicUsize,
    max: usize,
}

/// One admitted connection; gives its slot back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<ConnectionSlots>,
}

impl ConnectionSlots {
    /// Slots with the limit at `max`.
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_limit(max, max)
    }

    /// Slots whose limit starts at `limit` (cluster admission starts at 0 and reserves).
    pub fn with_limit(max: usize, limit: usize) -> Arc<Self> {
        Arc::new(ConnectionSlots {
            live: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit),
            max,
        })
    }

    /// Admits one connection, or `None` when the node is at its limit.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit.load(Ordering::Acquire)).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot {
                slots: Arc::clone(self),
            })
    }

    /// Admits one connection, asking `grow` for room whenever the node is at its limit.
    ///
    /// `grow` answering `true` means the node had room when it looked, not that this caller
    /// got it: in a connect storm, every connect queued behind one block reservation sees the
    /// new block and they race for its few slots. The losers ask again (another block) rather
    /// than being refused while the cluster is far from its budget; only `false` (the budget is
    /// spent, or Redis is away) refuses.
    pub async fn acquire_or_grow<F, Fut>(self: &Arc<Self>, mut grow: F) -> Option<Slot>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        loop {
            if let Some(slot) = self.try_acquire() {
                return Some(slot);
            }
            if !grow().await {
                return None;
            }
        }
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// The configured `max_connections` (cluster-wide with Redis).
    pub fn max(&self) -> usize {
        self.max
    }

    /// How many connections this node may hold right now.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    /// Changes the limit (cluster admission after a reservation changed). Connections already
    /// admitted stay; only new ones see the new limit.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills_at_rate() {
        let start = Instant::now();
        let mut b = TokenBucket::new(10.0, 3);
        for _ in 0..3 {
            assert!(b.try_take(start).is_ok());
        }
        let wait = b.try_take(start).expect_err("empty");
        assert!(wait <= Duration::from_millis(100));
        assert!(b.try_take(start + Duration::from_millis(100)).is_ok());
        assert!(b.try_take(start + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn slots_stop_at_max_and_come_back_on_drop() {
        let slots = ConnectionSlots::new(2);
        let a = slots.try_acquire().expect("first");
        let _b = slots.try_acquire().expect("second");
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert!(slots.try_acquire().is_some());
    }

    /// The storm race, made deterministic: each time this caller's `grow` makes room, a
    /// competitor takes the new slot first. The caller keeps asking until it gets one, and is
    /// refused only when `grow` says the budget is spent.
    #[tokio::test]
    async fn acquire_or_grow_asks_again_when_a_competitor_took_the_new_room() {
        let slots = ConnectionSlots::with_limit(100, 0);
        let mut competitors = Vec::new();
        let mut grows = 0;
        let slot = slots
            .acquire_or_grow(|| {
                grows += 1;
                slots.set_limit(slots.limit() + 1);
                if grows <= 3 {
                    competitors.push(slots.try_acquire().expect("the competitor wins the slot"));
                }
                std::future::ready(true)
            })
            .await;
        assert!(slot.is_some(), "admitted after the competitors");
        assert_eq!(grows, 4);
        assert_eq!(slots.live(), 4);

        let spent = ConnectionSlots::with_limit(100, 0);
        assert!(spent
            .acquire_or_grow(|| std::future::ready(false))
            .await
            .is_none());
    }

    #[test]
    fn limit_moves_without_touching_admitted_connections() {
        let slots = ConnectionSlots::with_limit(100, 0);
        assert!(slots.try_acquire().is_none());
        slots.set_limit(1);
        let held = slots.try_acquire().expect("one reserved");
        slots.set_limit(0);
        assert!(slots.try_acquire().is_none());
        assert_eq!(slots.live(), 1);
        drop(held);
        assert_eq!(slots.live(), 0);
    }
}
