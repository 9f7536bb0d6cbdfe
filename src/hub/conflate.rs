//! Interval conflation for one subscription: at most one message per interval, the latest wins.
//!
//! The first message after a quiet interval goes out at once; messages inside the interval
//! replace each other in a one-slot buffer that a timer flushes when the interval ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::metrics::{Sent, TRAFFIC};
use crate::ws::writer::Outbound;

#[derive(Default)]
struct State {
    last_sent: Option<Instant>,
    /// The held frame and its payload size before compression (counted when it goes out).
    pending: Option<(Bytes, usize)>,
    timer_armed: bool,
    cancelled: bool,
}

pub struct Conflator {
    interval: Duration,
    state: Mutex<State>,
}

impl Conflator {
    pub fn new(interval: Duration) -> Arc<Self> {
        Arc::new(Conflator {
            interval,
            state: Mutex::new(State::default()),
        })
    }

    /// Offers a frame whose payload is `payload_len` bytes before compression; it is queued now,
    /// held as the latest, or replaces the held one. Only what is queued counts as sent.
    pub fn offer(self: &Arc<Self>, frame: Bytes, payload_len: usize, outbound: &Arc<Outbound>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.cancelled {
            return;
        }
        let due = st.last_sent.is_none_or(|t| now >= t + self.interval);
        if due && !st.timer_armed {
            st.last_sent = Some(now);
            drop(st);
            push_counted(outbound, frame, payload_len);
            return;
        }
        st.pending = Some((frame, payload_len));
        if st.timer_armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime (benchmarks) there is no timer: deliver instead of holding.
            let frame = st.pending.take();
            drop(st);
            if let Some((frame, payload_len)) = frame {
                push_counted(outbound, frame, payload_len);
            }
            return;
        };
        st.timer_armed = true;
        let flush_at = st.last_sent.map_or(now, |t| t + self.interval);
        drop(st);
        let this = Arc::clone(self);
        let outbound = Arc::clone(outbound);
        runtime.spawn(async move {
            tokio::time::sleep_until(flush_at).await;
            let frame = {
                let mut st = this.state.lock();
                st.timer_armed = false;
                if st.cancelled {
                    return;
                }
                st.last_sent = Some(Instant::now());
                st.pending.take()
            };
            if let Some((frame, payload_len)) = frame {
                push_counted(&outbound, frame, payload_len);
            }
        });
    }

    /// Stops delivery: a held message is dropped (the client unsubscribed).
    pub fn cancel(&self) {
        let mut st = self.state.lock();
        st.cancelled = true;
        st.pending = None;
    }
}

/// Queues a conflated publication frame and counts it as sent.
fn push_counted(outbound: &Outbound, frame: Bytes, payload_len: usize) {
    if outbound.push(frame).is_ok() {
        TRAFFIC.sent(Sent::Publication, 1, payload_len as u64);
    }
}
