//! Client frames off the guarded byte stream, with a buffer that exists only while a frame is
//! in flight.
//!
//! Written here rather than taken from fastwebsockets: its reader (0.10) allocates an 8 KiB
//! buffer for every connection, for the connection's whole life, and that buffer was more than
//! half of an idle connection's memory. [`super::guard::FrameGuard`] below has already checked
//! every header (the mask bit, reserved bits, control frame rules, the message size limit) and
//! inflated compressed messages, so what is left here is small: split the stream into frames,
//! unmask them (fastwebsockets' SIMD `unmask`), and hand them up as fastwebsockets `Frame`s.
//!
//! The buffer:
//! - while nothing is pending, a read goes into a small array on the stack, and only the bytes
//!   that arrived are copied into a buffer of their size: an idle connection owns no buffer;
//! - once a frame's length is known, room for the rest of it is reserved and read into directly;
//! - when every byte read has been handed out, the buffer is released (the payloads handed up
//!   keep their own part of it until the session drops them).
//!
//! [`FrameReader::read_frame`] is cancel safe: bytes are only ever moved into the buffer by a
//! read that completed, so a read dropped by the session's `select!` (idle timeout, writer end)
//! loses nothing.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, BytesMut};
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// Bytes read at once while no frame is pending (on the stack, not kept between reads).
const IDLE_READ: usize = 2048;
/// The least room reserved for the rest of a frame (so a frame split over many small TCP
/// segments does not cost a reallocation each).
const MIN_RESERVE: usize = 512;

/// Reads frames from `R` (the connection's [`FrameGuard`](super::guard::FrameGuard)).
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
    /// A frame's payload may be at most this long (the guard enforces the message limit; this
    /// only bounds a single frame before anything is reserved for it).
    max_frame: u64,
}

/// A parsed header: what the frame is and how many bytes it takes in all.
struct Header {
    fin: bool,
    opcode: OpCode,
    mask: Option<[u8; 4]>,
    header_len: usize,
    payload_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R, max_frame: usize) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::new(),
            max_frame: max_frame as u64,
        }
    }

    /// Bytes read and not handed out yet (0 for an idle connection).
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Capacity of the buffer (0 for an idle connection: nothing is held between frames).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The next frame, unmasked. `UnexpectedEOF` when the stream ends; the guard's refusals
    /// come as `IoError`.
    pub async fn read_frame(&mut self) -> Result<Frame<'static>, WebSocketError> {
        loop {
            let needed = match self.parse_header()? {
                Some(h) if self.buf.len() >= h.header_len + h.payload_len => {
                    return Ok(self.take(h));
                }
                Some(h) => h.header_len + h.payload_len,
                None => 0,
            };
            let read = if self.buf.is_empty() {
                self.read_idle().await?
            } else {
                // Room for the rest of the frame (or of its header) and then some.
                let missing = needed.saturating_sub(self.buf.len());
                self.buf.reserve(missing.max(MIN_RESERVE));
                self.inner.read_buf(&mut self.buf).await?
            };
            if read == 0 {
                return Err(WebSocketError::UnexpectedEOF);
            }
        }
    }

    /// One read into a stack array, copied into the (empty) buffer: no allocation is held
    /// while the connection waits for its client.
    async fn read_idle(&mut self) -> Result<usize, WebSocketError> {
        let inner = &mut self.inner;
        let buf = &mut self.buf;
        poll_fn(|cx| {
            let mut chunk = [0u8; IDLE_READ];
            let mut read_buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut *inner).poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => {
                    buf.extend_from_slice(read_buf.filled());
                    Poll::Ready(Ok(read_buf.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(WebSocketError::IoError(e))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// The header at the front of the buffer, once all of it is there.
    fn parse_header(&self) -> Result<Option<Header>, WebSocketError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(WebSocketError::ReservedBitsNotZero);
        }
        let opcode = OpCode::try_from(b[0] & 0x0F)?;
        let masked = b[1] & 0x80 != 0;
        let (length_len, short) = match b[1] & 0x7F {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let header_len = 2 + length_len + if masked { 4 } else { 0 };
        if b.len() < header_len {
            return Ok(None);
        }
        let payload_len = match (short, length_len) {
            (Some(n), _) => n,
            (None, 2) => u64::from(u16::from_be_bytes([b[2], b[3]])),
            (None, _) => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&b[2..10]);
                u64::from_be_bytes(n)
            }
        };
        let control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if control && !fin {
            return Err(WebSocketError::ControlFrameFragmented);
        }
        if opcode == OpCode::Ping && payload_len > 125 {
            return Err(WebSocketError::PingFrameTooLarge);
        }
        if payload_len > self.max_frame {
            return Err(WebSocketError::FrameTooLarge);
        }
        let mask = masked.then(|| {
            let at = 2 + length_len;
            [b[at], b[at + 1], b[at + 2], b[at + 3]]
        });
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            header_len,
            // At most `max_frame`, which came from a `usize`.
            payload_len: usize::try_from(payload_len).map_err(|_| WebSocketError::FrameTooLarge)?,
        }))
    }

    /// Takes the complete frame `h` off the front of the buffer.
    fn take(&mut self, h: Header) -> Frame<'static> {
        self.buf.advance(h.header_len);
        let payload = self.buf.split_to(h.payload_len);
        if self.buf.is_empty() {
            // Everything read is handed out: let the allocation go with the payload.
            self.buf = BytesMut::new();
        }
        let mut frame = Frame::new(h.fin, h.opcode, h.mask, Payload::Bytes(payload));
        frame.unmask();
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[tokio::test]
    async fn frames_split_anywhere_come_out_whole_and_the_buffer_is_released() {
        let big = vec![b'x'; 70_000];
        let mut wire = masked(true, 0x1, b"hello");
        wire.extend(masked(false, 0x2, &big));
        wire.extend(masked(true, 0x9, b"ping"));
        wire.extend(masked(true, 0x0, b"end"));
        // Delivered in 7-byte pieces: every header and payload is split somewhere.
        let (mut client, server) = tokio::io::duplex(7);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in wire.chunks(7) {
                client.write_all(piece).await.expect("write");
            }
        });
        let mut reader = FrameReader::new(server, 1 << 20);
        let f = reader.read_frame().await.expect("text");
        assert!(f.fin && f.opcode == OpCode::Text && &f.payload[..] == b"hello");
        let f = reader.read_frame().await.expect("binary");
        assert!(!f.fin && f.opcode == OpCode::Binary && f.payload[..] == big[..]);
        let f = reader.read_frame().await.expect("ping");
        assert!(f.opcode == OpCode::Ping && &f.payload[..] == b"ping");
        let f = reader.read_frame().await.expect("continuation");
        assert!(f.fin && f.opcode == OpCode::Continuation && &f.payload[..] == b"end");
        assert_eq!((reader.buffered(), reader.capacity()), (0, 0));
        writer.await.expect("writer");
        assert!(matches!(
            reader.read_frame().await,
            Err(WebSocketError::UnexpectedEOF)
        ));
    }

    #[tokio::test]
    async fn refusals_at_the_header() {
        async fn first(wire: Vec<u8>, max: usize) -> Result<Frame<'static>, WebSocketError> {
            FrameReader::new(&wire[..], max).read_frame().await
        }
        let mut fragmented_ping = masked(false, 0x9, b"x");
        assert!(matches!(
            first(std::mem::take(&mut fragmented_ping), 100).await,
            Err(WebSocketError::ControlFrameFragmented)
        ));
        assert!(matches!(
            first(masked(true, 0x9, &[0; 126]), 1000).await,
            Err(WebSocketError::PingFrameTooLarge)
        ));
        assert!(matches!(
            first(masked(true, 0x3, b"x"), 100).await,
            Err(WebSocketError::InvalidValue)
        ));
        let mut rsv = masked(true, 0x1, b"x");
        rsv[0] |= 0x20;
        assert!(matches!(
            first(rsv, 100).await,
            Err(WebSocketError::ReservedBitsNotZero)
        ));
        // At the limit it passes; one byte over, refused before anything is reserved.
        assert!(first(masked(true, 0x1, &[b'a'; 100]), 100).await.is_ok());
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert!(matches!(
            first(huge, 100).await,
            Err(WebSocketError::FrameTooLarge)
        ));
        assert!(matches!(
            first(masked(true, 0x1, &[b'a'; 101]), 100).await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }
}
