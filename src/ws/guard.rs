//! A reader below fastwebsockets that enforces what fastwebsockets 0.10 does not.
//!
//! fastwebsockets checks its size limit per frame and accepts unmasked client frames. This reader
//! watches the raw byte stream frame header by frame header (payloads pass through untouched)
//! and refuses, before any payload is buffered:
//! - a client frame without the mask bit (RFC 6455 5.1: close 1002);
//! - a data message whose fragments together pass `max_message_size` (close 1009);
//! - a control frame longer than 125 bytes (close 1002).
//!
//! Bytes of frames before the offending header are still handed up, so messages the client sent
//! earlier are handled before the connection is closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// What the guard refused; carried inside an `io::Error` through fastwebsockets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("control frame payload of {0} bytes is over 125")]
    ControlTooLong(u64),
    #[error("message of at least {size} bytes is over the {max}-byte limit")]
    MessageTooBig { size: u64, max: u64 },
}

impl GuardError {
    /// The guard's refusal inside an `io::Error`, if that is what `e` is.
    pub fn from_io(e: &io::Error) -> Option<&GuardError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<GuardError>())
    }
}

/// Frame-boundary tracking over a client byte stream.
pub struct FrameGuard<R> {
    inner: R,
    max_message: u64,
    /// Header bytes of the frame being read (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to pass through.
    payload_left: u64,
    /// Bytes of the data message being assembled so far (across fragments).
    message_bytes: u64,
    /// A refusal found after some good bytes were returned; reported on the next read.
    pending: Option<GuardError>,
}

impl<R> FrameGuard<R> {
    pub fn new(inner: R, max_message: usize) -> Self {
        FrameGuard {
            inner,
            max_message: max_message as u64,
            header: [0; 14],
            header_len: 0,
            payload_left: 0,
            message_bytes: 0,
            pending: None,
        }
    }

    /// Scans `bytes`; returns the offset of the first byte of an offending frame header.
    fn scan(&mut self, bytes: &[u8]) -> Result<(), (usize, GuardError)> {
        let mut i = 0;
        while i < bytes.len() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min((bytes.len() - i) as u64);
                self.payload_left -= skip;
                i += skip as usize;
                continue;
            }
            let header_start = i.saturating_sub(self.header_len);
            self.header[self.header_len] = bytes[i];
            self.header_len += 1;
            i += 1;
            let Some(needed) = header_size(&self.header[..self.header_len]) else {
                continue;
            };
            if self.header_len < needed {
                continue;
            }
            self.header_len = 0;
            if let Err(e) = self.check_header(needed) {
                return Err((header_start, e));
            }
        }
        Ok(())
    }

    /// Validates a complete header of `len` bytes and arms the payload skip.
    fn check_header(&mut self, len: usize) -> Result<(), GuardError> {
        let h = &self.header[..len];
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0F;
        if h[1] & 0x80 == 0 {
            return Err(GuardError::Unmasked);
        }
        let payload = match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        if opcode >= 0x8 {
            if payload > 125 {
                return Err(GuardError::ControlTooLong(payload));
            }
        } else {
            // Text/binary start a message; continuation frames add to it.
            let so_far = if opcode == 0x0 { self.message_bytes } else { 0 };
            let size = so_far.saturating_add(payload);
            if size > self.max_message {
                return Err(GuardError::MessageTooBig {
                    size,
                    max: self.max_message,
                });
            }
            self.message_bytes = if fin { 0 } else { size };
        }
        self.payload_left = payload;
        Ok(())
    }
}

/// Total header length once enough of it is known (`None` until the first two bytes are in).
fn header_size(partial: &[u8]) -> Option<usize> {
    if partial.len() < 2 {
        return None;
    }
    let extended = match partial[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if partial[1] & 0x80 != 0 { 4 } else { 0 };
    Some(2 + extended + mask)
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameGuard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.pending.take() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
        }
        let start = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        if let Err((offset, e)) = this.scan(&buf.filled()[start..]) {
            if offset == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
            }
            buf.set_filled(start + offset);
            this.pending = Some(e);
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_header(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut h = vec![(if fin { 0x80 } else { 0 }) | opcode];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = masked_header(fin, opcode, len);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn whole_message_size_counts_every_fragment() {
        let mut g = FrameGuard::new(tokio::io::empty(), 300);
        let mut stream = frame(false, 0x1, 200);
        stream.extend(frame(true, 0x0, 100)); // exactly 300: allowed
        assert_eq!(g.scan(&stream), Ok(()));
        let at = stream.len();
        stream.extend(frame(false, 0x1, 200));
        stream.extend(frame(true, 0x9, 4)); // a ping between fragments does not count
        let second_start = stream.len();
        stream.extend(frame(true, 0x0, 101));
        let mut g = FrameGuard::new(tokio::io::empty(), 300);
        let err = g.scan(&stream).expect_err("301 bytes refused");
        assert_eq!(err.0, second_start);
        assert!(at < second_start);
        assert_eq!(
            err.1,
            GuardError::MessageTooBig {
                size: 301,
                max: 300
            }
        );
    }

    #[test]
    fn headers_split_across_reads_are_tracked() {
        let stream = frame(true, 0x1, 130);
        let mut g = FrameGuard::new(tokio::io::empty(), 1000);
        for byte in stream.chunks(1) {
            assert_eq!(g.scan(byte), Ok(()));
        }
        assert_eq!((g.header_len, g.payload_left), (0, 0));
    }

    #[test]
    fn unmasked_and_long_control_frames_are_refused() {
        let mut g = FrameGuard::new(tokio::io::empty(), 1000);
        assert_eq!(g.scan(&[0x81, 0x01, b'a']), Err((0, GuardError::Unmasked)));
        let mut g = FrameGuard::new(tokio::io::empty(), 1000);
        let f = frame(true, 0x9, 126);
        assert_eq!(g.scan(&f), Err((0, GuardError::ControlTooLong(126))));
    }
}
