//! The node's flushers: the tasks that write queued frames to sockets on the fast path.
//!
//! A fan-out queues one publication to thousands of connections. Waking each connection's own
//! writer task for that costs a task wake-up, a poll and a `Notify` per delivery, and the writer
//! writes whatever it finds the moment it runs, often a single frame. Instead, a push onto an
//! idle queue puts the connection on a flusher's list, and the flusher walks the list after the
//! producer has moved on: everything queued for a connection by then (a whole burst of
//! publications) goes out in one vectored write, and the per-delivery work left is a queue push.
//! It is the end-of-tick flush of an event loop (Node's `cork`/`uncork`, nginx's posted events)
//! written for tokio, which has no such hook.
//!
//! A flusher only ever tries a write. When a socket is full, or a connection is closing, the
//! connection's turn passes to its own writer task (`writer::run`), which waits for the socket
//! under the write timeout and hands the turn back once its queue is empty. Which side may write
//! is decided under the queue's lock (see `writer::Turn`), so the two never write at once.
//!
//! There is one flusher per tokio worker thread; connections are dealt to them in turn, so a
//! large fan-out's writes spread over the cores. A small one is better kept together: waking a
//! second flusher from the producer's thread makes tokio unpark another worker to steal it (a
//! futex wake, and on a VM an inter-processor interrupt), which costs more than the handful of
//! writes it takes over. So while a fan-out to fewer than [`SPREAD_AT`] connections is queued
//! under [`gather`], every connection it schedules goes to one flusher, the first one's: one
//! task wake-up per publication instead of one per flusher.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::writer::Outbound;

/// One flusher: its list and the task's wake-up.
struct Shard {
    pending: Mutex<Pending>,
    wake: Notify,
}

impl Shard {
    fn new() -> Arc<Self> {
        Arc::new(Shard {
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
        })
    }

    /// Puts `outbound` on the list; `false` when the flusher has stopped.
    fn enqueue(&self, outbound: Arc<Outbound>) -> bool {
        let first = {
            let mut pending = self.pending.lock();
            if pending.closed {
                return false;
            }
            pending.outbounds.push(outbound);
            pending.outbounds.len() == 1
        };
        // The flusher empties its whole list before it waits again, so only the first entry
        // since it last looked needs to wake it.
        if first {
            self.wake.notify_one();
        }
        true
    }
}

/// Connections with frames to write, in the order they were scheduled.
#[derive(Default)]
struct Pending {
    outbounds: Vec<Arc<Outbound>>,
    /// Set when the node's [`Flushers`] are dropped: the task ends once the list is empty, and
    /// later connections go to their writer tasks instead.
    closed: bool,
}

/// Fan-outs to this many connections or more spread over every flusher; smaller ones go to one
/// (see [`gather`]). At ~10 us per loopback write, 64 writes are well under a millisecond of one
/// thread's time, and over a few wake-ups' worth.
pub const SPREAD_AT: usize = 64;

thread_local! {
    /// While a [`Gathered`] fan-out is being queued on this thread: `Some`, holding the flusher
    /// of the first connection it scheduled once there is one.
    static GATHERING: RefCell<Option<Option<Arc<Shard>>>> = const { RefCell::new(None) };
}

/// Starts queueing one fan-out to `recipients` connections on this thread: below
/// [`SPREAD_AT`], until the returned guard is dropped, every connection scheduled goes to one
/// flusher. `None` for a larger fan-out, or inside another one (which keeps its flusher). The
/// guard cannot cross an `await` (it is not `Send`), so it covers exactly one delivery loop.
pub fn gather(recipients: usize) -> Option<Gathered> {
    if recipients >= SPREAD_AT {
        return None;
    }
    GATHERING.with(|g| {
        let mut g = g.borrow_mut();
        if g.is_some() {
            return None;
        }
        *g = Some(None);
        Some(Gathered {
            _not_send: PhantomData,
        })
    })
}

/// A small fan-out being queued (see [`gather`]); dropping it (also by a panic) ends it.
#[must_use = "the fan-out is gathered only while the guard lives"]
pub struct Gathered {
    _not_send: PhantomData<*const ()>,
}

impl Drop for Gathered {
    fn drop(&mut self) {
        GATHERING.with(|g| *g.borrow_mut() = None);
    }
}

/// A handle on one flusher, kept by each connection's queue.
#[derive(Clone)]
pub struct Flusher {
    shard: Arc<Shard>,
}

impl Flusher {
    /// Puts `outbound` on the flusher's list (the caller gave it the flusher's turn), or on the
    /// list of the flusher a [`gather`]ed fan-out uses. Returns `false` when the flusher has
    /// stopped: the caller must write another way.
    pub(super) fn schedule(&self, outbound: Arc<Outbound>) -> bool {
        // The borrow is held across `enqueue`, which only locks a list and wakes a task: nothing
        // in it schedules again.
        GATHERING.with(|g| match &mut *g.borrow_mut() {
            None => self.shard.enqueue(outbound),
            Some(first) => first
                .get_or_insert_with(|| Arc::clone(&self.shard))
                .enqueue(outbound),
        })
    }
}

/// The node's flushers (one per tokio worker thread), each running as a task.
pub struct Flushers {
    shards: Vec<Flusher>,
    next: AtomicUsize,
}

impl Flushers {
    /// Starts one flusher task per worker thread of the current tokio runtime.
    pub fn start() -> Self {
        let count = tokio::runtime::Handle::current()
            .metrics()
            .num_workers()
            .max(1);
        let flushers = Self::unstarted(count);
        for flusher in &flushers.shards {
            tokio::spawn(run(Arc::clone(&flusher.shard)));
        }
        flushers
    }

    /// `count` flushers without their tasks: their lists only fill (`start` spawns the tasks;
    /// unit tests read the lists).
    pub(crate) fn unstarted(count: usize) -> Self {
        let shards = (0..count)
            .map(|_| Flusher {
                shard: Shard::new(),
            })
            .collect();
        Flushers {
            shards,
            next: AtomicUsize::new(0),
        }
    }

    /// How many connections are on each flusher's list (unit tests).
    #[cfg(test)]
    pub fn listed(&self) -> Vec<usize> {
        self.shards
            .iter()
            .map(|f| f.shard.pending.lock().outbounds.len())
            .collect()
    }

    /// The flusher for a new connection (round robin).
    pub fn assign(&self) -> Flusher {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        self.shards[i].clone()
    }
}

impl Drop for Flushers {
    fn drop(&mut self) {
        for flusher in &self.shards {
            flusher.shard.pending.lock().closed = true;
            flusher.shard.wake.notify_one();
        }
    }
}

async fn run(shard: Arc<Shard>) {
    let mut batch: Vec<Arc<Outbound>> = Vec::new();
    let mut scratch = Vec::new();
    loop {
        {
            let mut pending = shard.pending.lock();
            if pending.outbounds.is_empty() && pending.closed {
                return;
            }
            std::mem::swap(&mut batch, &mut pending.outbounds);
        }
        if batch.is_empty() {
            shard.wake.notified().await;
            continue;
        }
        for outbound in batch.drain(..) {
            if let Some(again) = outbound.flush(&mut scratch) {
                // More was queued while it was being written: after the others.
                shard.pending.lock().outbounds.push(again);
            }
            // A fan-out to many connections is long work: leave room for the rest of the node
            // (and for producers, whose frames then join the writes still to come).
            tokio::task::consume_budget().await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The flusher and the writer task together, on real loopback sockets.
    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::metrics::TRAFFIC;
    use crate::protocol::codes::CloseCode;
    use crate::ws::frame::{self, OpCode};
    use crate::ws::writer;

    /// These tests read the process-wide write counter: one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A connection's queue with its writer task started, and the client's end of the socket
    /// (the flushers must be kept alive).
    async fn connection() -> (Flushers, Arc<Outbound>, TcpStream) {
        let flushers = Flushers::start();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (read_half, write_half) = server.into_split();
        // The read half only has to stay open; the test never reads what the client sends.
        std::mem::forget(read_half);
        let outbound = Outbound::for_socket(256 << 20, write_half, flushers.assign());
        tokio::spawn(writer::run(
            Arc::clone(&outbound),
            Duration::from_secs(20),
            None,
        ));
        (flushers, outbound, client)
    }

    /// Queues frames numbered `numbers` with `len`-byte payloads, with no await in between (so
    /// only the first push schedules the flusher); returns them.
    fn queue(outbound: &Outbound, numbers: std::ops::Range<u32>, len: usize) -> Vec<Bytes> {
        let frames: Vec<Bytes> = numbers.map(|i| numbered_frame(i, len)).collect();
        for f in &frames {
            outbound.push(f.clone()).expect("queued");
        }
        frames
    }

    fn numbered_frame(i: u32, len: usize) -> Bytes {
        let mut payload = vec![(i % 251) as u8; len];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        frame::frame(OpCode::Binary, &payload)
    }

    async fn read_exactly(client: &mut TcpStream, len: usize) -> Vec<u8> {
        let mut got = vec![0; len];
        tokio::time::timeout(Duration::from_secs(20), client.read_exact(&mut got))
            .await
            .expect("the bytes arrive in time")
            .expect("read");
        got
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn frames_queued_together_go_out_in_one_write() {
        let _serial = SERIAL.lock().await;
        let (_flushers, outbound, mut client) = connection().await;
        let before = TRAFFIC.socket_writes.get();
        let frames = queue(&outbound, 0..100, 100);
        let expected: Vec<u8> = frames.concat();
        assert_eq!(read_exactly(&mut client, expected.len()).await, expected);
        assert_eq!(TRAFFIC.socket_writes.get() - before, 1);
        assert_eq!(outbound.queued_bytes(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_socket_passes_to_the_writer_and_back_losing_nothing() {
        let _serial = SERIAL.lock().await;
        let (_flushers, outbound, mut client) = connection().await;
        // 32 MiB while the client reads nothing: far more than loopback socket buffers take,
        // so the flusher's write comes back short and the writer task must take over.
        let frames = queue(&outbound, 0..512, 64 << 10);
        until("the writer task has the turn", || {
            outbound.writer_has_turn()
        })
        .await;
        // Frames queued while the writer task waits for room follow the others.
        let late = queue(&outbound, 512..520, 1000);
        let expected: Vec<u8> = frames.concat().into_iter().chain(late.concat()).collect();
        let got = read_exactly(&mut client, expected.len()).await;
        assert!(got == expected, "frames lost, repeated or out of order");
        until("the queue is idle again", || outbound.is_idle()).await;
        // Back on the fast path: the next frame still goes out.
        let last = numbered_frame(999, 10);
        outbound.push(last.clone()).expect("queued");
        assert_eq!(read_exactly(&mut client, last.len()).await, last.to_vec());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_close_asked_before_the_flusher_ran_writes_the_queue_then_the_farewell() {
        let _serial = SERIAL.lock().await;
        let (_flushers, outbound, mut client) = connection().await;
        let frames = queue(&outbound, 0..3, 50);
        outbound.close(CloseCode::GoingAway, "bye");
        assert!(outbound.push(numbered_frame(9, 50)).is_err());
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .expect("the connection ends in time")
            .expect("read");
        let queued = frames.concat();
        assert_eq!(&got[..queued.len()], &queued[..]);
        let rest = &got[queued.len()..];
        // A text `disconnect` notice, then the close frame with the code, then the end.
        assert_eq!(rest[0], 0x81);
        let (header, len) = match rest[1] & 0x7f {
            126 => (4, u16::from_be_bytes([rest[2], rest[3]]) as usize),
            n => (2, n as usize),
        };
        let notice = &rest[header..header + len];
        assert!(std::str::from_utf8(notice).is_ok_and(|s| s.contains("disconnect")));
        let close = &rest[header + len..];
        assert_eq!(close[0], 0x88);
        assert_eq!(
            u16::from_be_bytes([close[2], close[3]]),
            CloseCode::GoingAway.as_u16()
        );
    }
}
