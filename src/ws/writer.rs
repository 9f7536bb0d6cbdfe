//! A connection's outbound side: a queue of complete frames bounded in bytes, and who writes it.
//!
//! Producers (fan-out, replies, pings) push shared frame `Bytes` and never wait. Writing takes
//! everything queued at once and sends it with vectored writes, so a burst of publications costs
//! one syscall per connection rather than one per frame. Two parties write, never at once (the
//! `Turn`, decided under the queue's lock): on the fast path the node's flusher
//! (`ws::flusher`), which a push onto an idle queue schedules and which only ever tries a write;
//! and the connection's own writer task ([`run`]), which takes over when the socket is full (it
//! waits for room under the write timeout), sends pings, and writes the farewell when the
//! connection closes. Bytes count against the bound from the moment they are queued until the
//! kernel has accepted them; a push that would pass the bound marks the connection a slow
//! consumer: its queue is dropped and it gets a `disconnect` notice and close 4008, while every
//! other connection goes on untouched.

use std::io::IoSlice;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::flusher::Flusher;
use super::frame;
use crate::metrics::{Sent, TRAFFIC};
use crate::protocol::codes::CloseCode;
use crate::protocol::envelope::{server_message, DisconnectNotice};

/// Most slices handed to one `writev` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("send queue over its bound: slow consumer")]
    Overflow,
    #[error("connection is closing")]
    Closed,
}

/// How the writer should end the connection.
#[derive(Debug, Clone)]
struct Closing {
    /// Frames written after whatever is still queued: a `disconnect` notice and a close frame.
    farewell: Vec<Bytes>,
    /// Drop queued frames instead of flushing them (slow consumers, dead peers).
    discard_queue: bool,
    /// The close code the server sends (`None`: an echo of the client's close, or an abort).
    code: Option<u16>,
    /// The first farewell frame is a `disconnect` notice (counted as a message sent).
    notice: bool,
}

/// Who may write to the socket right now. Changed only under the queue's lock, so the flusher
/// and the writer task never write at once, and frames leave in the order they were queued.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Turn {
    /// Nothing queued, nobody writing: the next push schedules the flusher.
    #[default]
    Idle,
    /// On the flusher's list, or being written by it.
    Flusher,
    /// The writer task: the socket was full, a write failed, or the connection is closing.
    Writer,
}

#[derive(Default)]
struct QueueState {
    frames: Vec<Bytes>,
    /// Bytes queued plus bytes taken by a writer and not yet written.
    bytes: usize,
    turn: Turn,
    /// The socket, while the connection lives (`None` for a queue without one, in unit tests,
    /// and once the writer task has ended). Whoever has the turn writes to a clone of it.
    socket: Option<Arc<OwnedWriteHalf>>,
    closing: Option<Closing>,
    /// The code of the close the server decided on, once one was asked for (the first wins).
    close_code: Option<u16>,
    /// The writer took `closing` and is writing the farewell: nothing may follow it.
    ending: bool,
    /// Set once the writer has finished; pushes after that fail.
    finished: bool,
    /// Bytes ever queued, and ever written: positions in the connection's outbound stream.
    pushed: u64,
    written: u64,
    /// A fan-out latency sample: when its publication arrived, and the stream position its
    /// frame ends at (see `crate::metrics`).
    probe: Option<(StdInstant, u64)>,
}

impl QueueState {
    /// Drops every queued frame and its bytes (bytes already taken by a writer stay counted
    /// until they are written).
    fn discard_queued(&mut self) {
        let dropped: usize = self.frames.drain(..).map(|f| f.len()).sum();
        self.bytes -= dropped;
    }

    /// Accounts `n` bytes as written; returns a latency sample that they completed.
    fn wrote(&mut self, n: usize) -> Option<StdInstant> {
        self.bytes -= n;
        self.written += n as u64;
        match self.probe {
            Some((received, end)) if self.written >= end => {
                self.probe = None;
                Some(received)
            }
            _ => None,
        }
    }
}

/// The producer side of one connection's queue, shared by the hub, the session, the flusher
/// and the writer task.
pub struct Outbound {
    state: Mutex<QueueState>,
    /// Wakes the writer task: its turn came, or a close was asked for.
    wake: Notify,
    limit: usize,
    flusher: Option<Flusher>,
    /// This queue itself, for scheduling it with the flusher from `push(&self)`.
    me: Weak<Outbound>,
}

impl Outbound {
    /// A queue without a socket that holds at most `limit_bytes` (unit tests read it).
    pub fn new(limit_bytes: usize) -> Arc<Self> {
        Self::build(limit_bytes, None, None)
    }

    /// A queue without a socket that schedules `flusher` (unit tests read where it went).
    #[cfg(test)]
    pub fn with_flusher(limit_bytes: usize, flusher: Flusher) -> Arc<Self> {
        Self::build(limit_bytes, None, Some(flusher))
    }

    /// The queue of a connection: `flusher` writes it on the fast path, and [`run`] (which
    /// must be started for it) does the rest.
    pub fn for_socket(limit_bytes: usize, socket: OwnedWriteHalf, flusher: Flusher) -> Arc<Self> {
        Self::build(limit_bytes, Some(Arc::new(socket)), Some(flusher))
    }

    fn build(
        limit: usize,
        socket: Option<Arc<OwnedWriteHalf>>,
        flusher: Option<Flusher>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Outbound {
            state: Mutex::new(QueueState {
                socket,
                ..QueueState::default()
            }),
            wake: Notify::new(),
            limit,
            flusher,
            me: me.clone(),
        })
    }

    /// Queues one frame. Over the bound, the connection is closed as a slow consumer.
    pub fn push(&self, frame: Bytes) -> Result<(), PushError> {
        let mut st = self.state.lock();
        if st.closing.is_some() || st.ending || st.finished {
            return Err(PushError::Closed);
        }
        if st.bytes + frame.len() > self.limit {
            TRAFFIC.slow_consumers.add(1);
            st.discard_queued();
            st.closing = Some(farewell(
                CloseCode::SlowConsumer,
                "send queue full: slow consumer",
                true,
            ));
            st.close_code = st.close_code.or(Some(CloseCode::SlowConsumer.as_u16()));
            drop(st);
            self.wake.notify_one();
            return Err(PushError::Overflow);
        }
        st.bytes += frame.len();
        st.pushed += frame.len() as u64;
        st.frames.push(frame);
        // Only the push that finds the queue idle schedules a write; the rest of a burst joins
        // it (no wake-up per frame).
        let schedule = st.turn == Turn::Idle;
        if schedule {
            st.turn = Turn::Flusher;
        }
        drop(st);
        if schedule {
            self.schedule();
        }
        Ok(())
    }

    /// Gives the flusher's turn (just taken by the caller) to the flusher, or to the writer task
    /// when there is no flusher to take it.
    fn schedule(&self) {
        let scheduled = match (&self.flusher, self.me.upgrade()) {
            (Some(flusher), Some(me)) => flusher.schedule(me),
            _ => false,
        };
        if !scheduled {
            self.hand_to_writer(self.state.lock());
        }
    }

    /// The flusher's turn: tries to write everything queued, without waiting. Returns the
    /// queue when more was pushed meanwhile (the caller schedules it again); hands the turn to
    /// the writer task when the socket is full, a write fails, or a close was asked for.
    /// `scratch` is the flusher's spare vector (left empty).
    pub(super) fn flush(&self, scratch: &mut Vec<Bytes>) -> Option<Arc<Outbound>> {
        let socket = {
            let mut st = self.state.lock();
            if st.turn != Turn::Flusher {
                return None;
            }
            let socket = match &st.socket {
                Some(socket) if st.closing.is_none() => Arc::clone(socket),
                _ => {
                    self.hand_to_writer(st);
                    return None;
                }
            };
            std::mem::swap(&mut st.frames, scratch);
            socket
        };
        let mut first = 0;
        let mut written = 0;
        while first < scratch.len() {
            match try_write_frames(&socket, &scratch[first..]) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    written += n;
                    first = advance(scratch, first, n);
                }
            }
        }
        // The writer task must hold the last clone of the socket when it ends (dropping it is
        // the shutdown), so this one goes before the turn does.
        drop(socket);
        let mut st = self.state.lock();
        let sample = st.wrote(written);
        let result = if first < scratch.len() {
            // Full socket, or a failed write (the writer task meets the error itself): the
            // unwritten frames go back in front of whatever was queued meanwhile.
            scratch.drain(..first);
            scratch.append(&mut st.frames);
            std::mem::swap(&mut st.frames, scratch);
            self.hand_to_writer(st);
            None
        } else if st.closing.is_some() {
            self.hand_to_writer(st);
            None
        } else if st.frames.is_empty() {
            st.turn = Turn::Idle;
            None
        } else {
            drop(st);
            self.me.upgrade()
        };
        scratch.clear();
        if scratch.capacity() > MAX_IOVECS {
            // One connection's backlog should not stay with the flusher for good.
            *scratch = Vec::new();
        }
        if let Some(received) = sample {
            crate::metrics::fanout_latency(received.elapsed());
        }
        result
    }

    /// Gives the turn to the writer task (the caller holds the lock, and the turn).
    fn hand_to_writer(&self, mut st: MutexGuard<'_, QueueState>) {
        st.turn = Turn::Writer;
        drop(st);
        self.wake.notify_one();
    }

    /// Queues one server message (a plain frame the server built: a reply, an error, a notice)
    /// and counts it in `wsgate_messages_sent_total` as `kind`.
    pub fn send(&self, kind: Sent, frame: Bytes) -> Result<(), PushError> {
        let payload = frame::payload_of(&frame).len() as u64;
        self.push(frame)?;
        TRAFFIC.sent(kind, 1, payload);
        Ok(())
    }

    /// Asks for a fan-out latency sample of the frame pushed last (by the caller): recorded as
    /// `received.elapsed()` when the writer has written it. Ignored while an earlier sample is
    /// still waiting (see `crate::metrics`).
    pub fn probe(&self, received: StdInstant) {
        let mut st = self.state.lock();
        if st.written >= st.pushed {
            // Already written (the writer was quicker than the fan-out loop): it left about now.
            drop(st);
            crate::metrics::fanout_latency(received.elapsed());
        } else if st.probe.is_none() {
            st.probe = Some((received, st.pushed));
        }
    }

    /// Bytes queued or in flight right now.
    pub fn queued_bytes(&self) -> usize {
        self.state.lock().bytes
    }

    /// The code of the close the server asked for (a limit, a slow consumer, an operator, a
    /// shutdown), if any; `None` for an echoed client close or an abort.
    pub fn close_code(&self) -> Option<u16> {
        self.state.lock().close_code
    }

    /// Takes every queued frame and returns the `seq` of each publication among them (unit
    /// tests of fan-out, recovery and gap filling read a queue without a writer).
    #[cfg(test)]
    pub fn queued_seqs(&self) -> Vec<u64> {
        self.drain_for_test()
            .iter()
            .filter_map(|frame| {
                let v: serde_json::Value = serde_json::from_slice(frame::payload_of(frame)).ok()?;
                v["seq"].as_u64()
            })
            .collect()
    }

    /// The writer task has the turn (the socket filled up, or the connection is closing).
    #[cfg(test)]
    pub fn writer_has_turn(&self) -> bool {
        self.state.lock().turn == Turn::Writer
    }

    /// Nothing queued or in flight, and nobody's turn.
    #[cfg(test)]
    pub fn is_idle(&self) -> bool {
        let st = self.state.lock();
        st.turn == Turn::Idle && st.bytes == 0
    }

    /// Takes every queued frame (unit tests read a queue without a writer).
    #[cfg(test)]
    pub fn drain_for_test(&self) -> Vec<Bytes> {
        let mut st = self.state.lock();
        let frames = std::mem::take(&mut st.frames);
        st.bytes -= frames.iter().map(Bytes::len).sum::<usize>();
        frames
    }

    /// Asks the writer to flush what is queued, send a `disconnect` notice (unless `code` is a
    /// plain echo of the client's close) and a close frame, then end. The first close wins.
    pub fn close(&self, code: CloseCode, reason: &str) {
        self.close_with(farewell(code, reason, false));
    }

    /// Echoes a client's close frame (no notice: the client chose to leave). `None` answers a
    /// close frame that carried no status code with one that carries none either.
    pub fn close_echo(&self, code: Option<u16>) {
        let close = match code {
            Some(code) => frame::close(code, ""),
            None => frame::frame(frame::OpCode::Close, b""),
        };
        self.close_with(Closing {
            farewell: vec![close],
            discard_queue: false,
            code: None,
            notice: false,
        });
    }

    /// Like [`Outbound::close`] without the `disconnect` notice: only the close frame follows
    /// what is queued (echo sessions, which speak no JSON protocol).
    pub fn close_bare(&self, code: CloseCode, reason: &str) {
        self.close_with(Closing {
            farewell: vec![frame::close(code.as_u16(), reason)],
            discard_queue: false,
            code: Some(code.as_u16()),
            notice: false,
        });
    }

    /// Ends the writer at once, dropping anything queued (the peer is gone).
    pub fn abort(&self) {
        self.close_with(Closing {
            farewell: Vec::new(),
            discard_queue: true,
            code: None,
            notice: false,
        });
    }

    fn close_with(&self, closing: Closing) {
        let mut st = self.state.lock();
        if st.closing.is_none() && !st.ending && !st.finished {
            if closing.discard_queue {
                st.discard_queued();
            }
            st.close_code = st.close_code.or(closing.code);
            st.closing = Some(closing);
        }
        drop(st);
        self.wake.notify_one();
    }
}

fn farewell(code: CloseCode, reason: &str, discard_queue: bool) -> Closing {
    let notice = server_message(
        "disconnect",
        DisconnectNotice {
            code: code.as_u16(),
            reason,
            reconnect: code.reconnect(),
        },
    );
    Closing {
        farewell: vec![notice, frame::close(code.as_u16(), reason)],
        discard_queue,
        code: Some(code.as_u16()),
        notice: true,
    }
}

/// Why the writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("socket write failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("socket accepted nothing for {0:?}")]
    Stalled(Duration),
}

/// The connection's writer task: writes whenever the turn is its own (see `Turn`) until a
/// close is written or the socket fails, and sends a WebSocket ping every `ping_every` (if set)
/// so that idle clients answer with a pong. `outbound` must come from
/// [`Outbound::for_socket`]; a queue without a socket ends it at once.
pub async fn run(
    outbound: Arc<Outbound>,
    write_timeout: Duration,
    ping_every: Option<Duration>,
) -> Result<(), WriterError> {
    let socket = outbound.state.lock().socket.clone();
    let result = match &socket {
        Some(socket) => drain_loop(&outbound, socket, write_timeout, ping_every).await,
        None => Ok(()),
    };
    {
        let mut st = outbound.state.lock();
        st.finished = true;
        st.turn = Turn::Writer;
        st.frames.clear();
        st.bytes = 0;
        st.socket = None;
    }
    // The last clone of the write half: dropping it shuts the write side down, so the peer sees
    // the end even if it never answers our close frame.
    drop(socket);
    result
}

async fn drain_loop(
    outbound: &Outbound,
    socket: &OwnedWriteHalf,
    write_timeout: Duration,
    ping_every: Option<Duration>,
) -> Result<(), WriterError> {
    let ping = frame::frame(frame::OpCode::Ping, b"");
    // Without pings the timer still has to be a time: one far enough away never to fire.
    let period = ping_every.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let mut next_ping = Instant::now() + period;
    let mut batch: Vec<Bytes> = Vec::new();
    // One timer for the connection's life, moved forward once per ping: waiting on a fresh
    // `sleep_until` each time would insert and remove a timer-wheel entry on every wake-up.
    let ping_timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(ping_timer);
    loop {
        // Checked on every round, not only when idle: a client that only receives must still
        // be pinged, or its idle timer would run out while it is busy reading.
        if ping_every.is_some() && (Instant::now() >= next_ping || ping_timer.is_elapsed()) {
            let _ = outbound.push(ping.clone());
            next_ping = Instant::now() + period;
            ping_timer.as_mut().reset(next_ping);
        }
        let taken = {
            let mut st = outbound.state.lock();
            if st.turn == Turn::Idle && st.closing.is_some() {
                st.turn = Turn::Writer;
            }
            (st.turn == Turn::Writer).then(|| {
                std::mem::swap(&mut batch, &mut st.frames);
                let closing = st.closing.take();
                st.ending |= closing.is_some();
                closing
            })
        };
        let Some(closing) = taken else {
            tokio::select! {
                _ = outbound.wake.notified() => {}
                _ = &mut ping_timer => {}
            }
            continue;
        };
        // Bytes leave the bound as the kernel takes them, not when the whole batch is out, so
        // a client that keeps reading is never cut off because one large batch is in flight.
        write_all(socket, &mut batch, write_timeout, |n| {
            let sample = outbound.state.lock().wrote(n);
            if let Some(received) = sample {
                crate::metrics::fanout_latency(received.elapsed());
            }
        })
        .await?;
        if let Some(closing) = closing {
            let mut farewell = closing.farewell;
            if closing.notice {
                let payload = farewell.first().map_or(0, |f| frame::payload_of(f).len());
                TRAFFIC.sent(Sent::Disconnect, 1, payload as u64);
            }
            write_all(socket, &mut farewell, write_timeout, |_| {}).await?;
            return Ok(());
        }
        // Back to the fast path once everything is out; otherwise write again.
        let mut st = outbound.state.lock();
        if st.frames.is_empty() && st.closing.is_none() {
            st.turn = Turn::Idle;
        }
    }
}

/// One write of as many of `frames` as one `writev` takes (a plain `write` for one frame: no
/// slice list to build, the usual case of paced fan-out). Every write of either writer goes through here, and is counted here.
fn try_write_frames(socket: &OwnedWriteHalf, frames: &[Bytes]) -> std::io::Result<usize> {
    let written = match frames {
        [] => return Ok(0),
        [one] => socket.try_write(one)?,
        _ => {
            let slices: Vec<IoSlice<'_>> = frames[..frames.len().min(MAX_IOVECS)]
                .iter()
                .map(|b| IoSlice::new(b))
                .collect();
            socket.try_write_vectored(&slices)?
        }
    };
    if written > 0 {
        TRAFFIC.sent_bytes.add(written as u64);
        TRAFFIC.socket_writes.add(1);
    }
    Ok(written)
}

/// Moves past the frames that `written` bytes (from `frames[first]` on) completed and trims a
/// partly written one in place; returns the index of the first frame not fully written.
fn advance(frames: &mut [Bytes], mut first: usize, written: usize) -> usize {
    let mut left = written;
    while left > 0 {
        let len = frames[first].len();
        if left >= len {
            left -= len;
            first += 1;
        } else {
            let rest = frames[first].slice(left..);
            frames[first] = rest;
            left = 0;
        }
    }
    first
}

/// Writes every frame of `frames` with as few vectored writes as the kernel allows; empties it.
/// `on_written` hears how many bytes each write got out. A write is tried first and only a full
/// socket is waited on (with `write_timeout`), so no timer is set up while the socket has room.
async fn write_all(
    socket: &OwnedWriteHalf,
    frames: &mut Vec<Bytes>,
    write_timeout: Duration,
    mut on_written: impl FnMut(usize),
) -> Result<(), WriterError> {
    let mut first = 0;
    while first < frames.len() {
        let written = loop {
            match try_write_frames(socket, &frames[first..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::timeout(write_timeout, socket.writable())
                        .await
                        .map_err(|_| WriterError::Stalled(write_timeout))??;
                }
                Err(e) => return Err(e.into()),
            }
        };
        if written == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        on_written(written);
        first = advance(frames, first, written);
    }
    frames.clear();
    Ok(())
}
