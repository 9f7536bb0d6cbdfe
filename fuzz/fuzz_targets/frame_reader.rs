//! Fuzzes the read path of a client connection: arbitrary bytes, delivered in arbitrary chunks,
//! through `wsgate::ws::guard::FrameGuard` (frame checks and permessage-deflate inflation) under
//! fastwebsockets' split reader, set up exactly as `src/ws/session.rs` does it (auto close and
//! auto pong off, fastwebsockets' limit one byte over `max_message_size`), on a current-thread
//! tokio runtime. Every input runs twice: with deflate negotiated and without.
//!
//! Input layout: byte 0 seeds the chunking (0: the whole stream in one read; otherwise reads of
//! pseudo-random sizes up to that many bytes, some preceded by a `Pending`), bytes 1-2 (little
//! endian) plus 128 are `max_message_size` (the config minimum is 128), the rest is the client's
//! byte stream.
//!
//! Checks:
//! - nothing panics, in the guard, the inflater or fastwebsockets;
//! - memory stays bounded: the payload bytes handed up for one message (summed over its
//!   fragments; control frames aside) never pass `max_message_size`, so an inflation bomb must
//!   be refused by the guard, and a control frame never carries more than 125 bytes;
//! - the guard refuses a new data message inside an unfinished one before fastwebsockets sees it;
//! - reading terminates: every frame costs at least two input bytes, so there are never more
//!   frames than input bytes, and the end of input ends the loop.

#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use fastwebsockets::OpCode;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use wsgate::ws::guard::FrameGuard;
use wsgate::ws::reader::FrameReader;

/// An in-memory client stream: hands out `chunks` one read at a time (a read takes at most one
/// chunk), optionally returning `Pending` once before a chunk, then the end of stream.
struct Chunked<'a> {
    chunks: Vec<(&'a [u8], bool)>,
    next: usize,
    /// Bytes of `chunks[next]` already handed out.
    offset: usize,
    /// `Pending` was returned for `chunks[next]` already.
    waited: bool,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(&(chunk, pending_first)) = this.chunks.get(this.next) else {
            return Poll::Ready(Ok(())); // end of stream
        };
        if pending_first && !this.waited && this.offset == 0 {
            this.waited = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let rest = &chunk[this.offset..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.offset += n;
        if this.offset == chunk.len() {
            this.next += 1;
            this.offset = 0;
            this.waited = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// Splits `stream` into reads as `seed` says (see the module doc).
fn chunks(stream: &[u8], seed: u8) -> Vec<(&[u8], bool)> {
    if seed == 0 {
        return vec![(stream, false)];
    }
    let mut state = u32::from(seed) | 0x9E37_7900; // xorshift32: never zero
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state as usize % usize::from(seed)) + 1;
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.push((chunk, state & 0x100 != 0));
        rest = tail;
    }
    out
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime")
    })
}

async fn read_all(stream: &[u8], seed: u8, max_message: usize, deflate: bool) {
    let reader = Chunked {
        chunks: chunks(stream, seed),
        next: 0,
        offset: 0,
        waited: false,
    };
    let guard = FrameGuard::new(reader, max_message, deflate);
    let mut ws = FrameReader::new(guard, max_message);

    // Payload bytes of the unfinished data message so far (fragments handed up).
    let mut message: Option<usize> = None;
    let mut frames = 0usize;
    while let Ok(frame) = ws.read_frame().await {
        frames += 1;
        assert!(
            frames <= stream.len(),
            "{frames} frames out of {} bytes",
            stream.len()
        );
        let len = frame.payload.len();
        match frame.opcode {
            OpCode::Text | OpCode::Binary => {
                assert!(
                    message.is_none(),
                    "a new message was handed up inside an unfinished one (deflate {deflate})"
                );
                assert!(
                    len <= max_message,
                    "a {len}-byte message passed the {max_message}-byte limit (deflate {deflate})"
                );
                message = (!frame.fin).then_some(len);
            }
            OpCode::Continuation => {
                // A continuation without a message counts from zero, as the guard counts it (the
                // session then closes the connection).
                let size = message.unwrap_or(0) + len;
                assert!(
                    size <= max_message,
                    "a {size}-byte fragmented message passed the {max_message}-byte limit \
                     (deflate {deflate})"
                );
                message = (!frame.fin).then_some(size);
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                assert!(len <= 125, "a {len}-byte control frame was handed up");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [seed, lo, hi, stream @ ..] = data else {
        return;
    };
    let max_message = 128 + usize::from(u16::from_le_bytes([*lo, *hi]));
    for deflate in [false, true] {
        runtime().block_on(read_all(stream, *seed, max_message, deflate));
    }
});
