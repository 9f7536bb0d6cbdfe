//! Interval conflation for one subscription: at most one message per interval, the latest wins.
//!
//! The first message after a quiet interval goes out at once; messages inside the interval
//! replace each other in a one-slot buffer that a timer flushes when the interval ends.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::time::Instant;

use crate::ws::writer::Outbound;

#[derive(Default)]
struct State {
    last_sent: Option<Instant>,
    pending: Option<Bytes>,
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

    /// Offers a frame; it is queued now, held as the latest, or replaces the held one.
    pub fn offer(self: &Arc<Self>, frame: Bytes, outbound: &Arc<Outbound>) {
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.cancelled {
            return;
        }
        let due = st.last_sent.is_none_or(|t| now >= t + self.interval);
        if due && !st.timer_armed {
            st.last_sent = Some(now);
            drop(st);
            let _ = outbound.push(frame);
            return;
        }
        st.pending = Some(frame);
        if st.timer_armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Outside a runtime (benchmarks) there is no timer: deliver instead of holding.
            let frame = st.pending.take();
            drop(st);
            if let Some(frame) = frame {
                let _ = outbound.push(frame);
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
            if let Some(frame) = frame {
                let _ = outbound.push(frame);
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
