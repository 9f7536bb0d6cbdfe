//! The raw client byte stream, checked and inflated below the frame reader
//! ([`super::reader`]): every header rule is enforced here, and permessage-deflate messages
//! are inflated, so the reader above only splits plain, valid frames.
//!
//! It follows the raw client byte stream frame header by frame header and refuses, before the
//! payload is buffered anywhere:
//! - a client frame without the mask bit (RFC 6455 5.1: close 1002);
//! - a data message whose fragments together pass `max_message_size` (close 1009);
//! - a control frame longer than 125 bytes, reserved bits that no extension defined, RSV1 on a
//!   control or continuation frame, a new message before the last one ended (close 1002).
//!
//! Plain frames pass through in place, untouched (no copy). When permessage-deflate was
//! negotiated, a compressed message (RSV1 on its first frame) is taken out of the stream,
//! unmasked, inflated with a bound (an inflation bomb stops at `max_message_size`: close 1009;
//! corrupt data: close 1007) and put back as one plain frame, so the reader above only ever
//! sees frames it understands. Control frames between its fragments pass through in order.
//!
//! Bytes before a refused header are still handed up, so messages the client sent earlier are
//! handled before the connection is closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};

use super::deflate::{self, InflateError};

/// What the guard refused; carried inside an `io::Error` through the frame reader.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuardError {
    #[error("client frame is not masked")]
    Unmasked,
    #[error("control frame payload of {0} bytes is over 125")]
    ControlTooLong(u64),
    #[error("message of at least {size} bytes is over the {max}-byte limit")]
    MessageTooBig { size: u64, max: u64 },
    #[error("{0}")]
    Protocol(&'static str),
    #[error("compressed message is not valid deflate data")]
    BadCompressedData,
}

impl GuardError {
    /// The guard's refusal inside an `io::Error`, if that is what `e` is.
    pub fn from_io(e: &io::Error) -> Option<&GuardError> {
        e.get_ref()
            .and_then(|inner| inner.downcast_ref::<GuardError>())
    }
}

/// A compressed message being collected from its frames.
struct Capture {
    opcode: u8,
    data: Vec<u8>,
}

/// Frame-boundary tracking (and inflation) over a client byte stream.
pub struct FrameGuard<R> {
    inner: R,
    max_message: u64,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// Header bytes of the frame being read (at most 14).
    header: [u8; 14],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// The current frame's payload belongs to a compressed message (taken out of the stream).
    captured: bool,
    frame_fin: bool,
    mask: [u8; 4],
    mask_pos: usize,
    /// Wire bytes of the plain data message being assembled so far (across fragments).
    plain_bytes: u64,
    plain_in_message: bool,
    capture: Option<Capture>,
    /// Output that could not stay in the caller's buffer (inflated messages and what follows
    /// them in the same read); served before anything new is read.
    out: BytesMut,
    /// A refusal found after some good bytes; reported once those are handed up.
    pending: Option<GuardError>,
}

/// Where processed bytes go: compacted in place in the caller's buffer, or (once an inflated
/// message had to be inserted) appended to `out`.
struct Sink {
    write: usize,
    diverted: bool,
}

impl<R> FrameGuard<R> {
    pub fn new(inner: R, max_message: usize, deflate: bool) -> Self {
        FrameGuard {
            inner,
            max_message: max_message as u64,
            deflate,
            header: [0; 14],
            header_len: 0,
            payload_left: 0,
            captured: false,
            frame_fin: false,
            mask: [0; 4],
            mask_pos: 0,
            plain_bytes: 0,
            plain_in_message: false,
            capture: None,
            out: BytesMut::new(),
            pending: None,
        }
    }

    /// Compressed bytes allowed for one message: a little over the limit, since incompressible
    /// data grows slightly when deflated. The inflated size is what the limit is about.
    fn compressed_limit(&self) -> u64 {
        self.max_message + self.max_message / 64 + 64
    }

    /// Processes `buf[start..]` (fresh bytes) in place; returns where the kept bytes end.
    /// Refusals land in `pending`, diverted output in `out`.
    fn process(&mut self, buf: &mut [u8], start: usize) -> usize {
        let mut sink = Sink {
            write: start,
            diverted: !self.out.is_empty(),
        };
        let mut read = start;
        // Where the current frame's header began in the output, to take it back on refusal. A
        // header begun in an earlier read is partly handed up already: its part from this read
        // is taken back, so the frame reader never holds a refused header whole.
        let mut header_mark: Option<(bool, usize)> = (self.header_len > 0).then(|| {
            if sink.diverted {
                (true, self.out.len())
            } else {
                (false, start)
            }
        });
        while read < buf.len() {
            if self.payload_left > 0 {
                let n = self.payload_left.min((buf.len() - read) as u64) as usize;
                if self.captured {
                    self.capture_payload(&buf[read..read + n]);
                } else {
                    self.emit(buf, &mut sink, read, n);
                }
                read += n;
                self.payload_left -= n as u64;
                if self.payload_left == 0 && self.captured && self.frame_fin {
                    if let Err(e) = self.finish_compressed(&mut sink) {
                        self.pending = Some(e);
                        return sink.write;
                    }
                }
                continue;
            }
            if self.header_len == 0 {
                header_mark = Some(if sink.diverted {
                    (true, self.out.len())
                } else {
                    (false, sink.write)
                });
                self.captured = self.starts_capture(buf[read]);
            }
            self.header[self.header_len] = buf[read];
            self.header_len += 1;
            if !self.captured {
                self.emit(buf, &mut sink, read, 1);
            }
            read += 1;
            let Some(needed) = header_size(&self.header[..self.header_len]) else {
                continue;
            };
            if self.header_len < needed {
                continue;
            }
            self.header_len = 0;
            if let Err(e) = self.check_header(needed) {
                // Take back the refused frame's header bytes if they are still ours to drop.
                match header_mark {
                    Some((true, at)) => self.out.truncate(at),
                    Some((false, at)) if !sink.diverted => sink.write = at,
                    _ => {}
                }
                self.pending = Some(e);
                return sink.write;
            }
            if self.payload_left == 0 && self.captured && self.frame_fin {
                if let Err(e) = self.finish_compressed(&mut sink) {
                    self.pending = Some(e);
                    return sink.write;
                }
            }
        }
        sink.write
    }

    /// Whether a frame whose first byte is `b0` belongs to a compressed message.
    fn starts_capture(&self, b0: u8) -> bool {
        let opcode = b0 & 0x0F;
        let rsv1 = b0 & 0x40 != 0;
        match opcode {
            0x1 | 0x2 => self.deflate && rsv1 && self.capture.is_none() && !self.plain_in_message,
            0x0 => self.capture.is_some(),
            _ => false,
        }
    }

    /// Moves `n` bytes at `from` to the output.
    fn emit(&mut self, buf: &mut [u8], sink: &mut Sink, from: usize, n: usize) {
        if sink.diverted {
            self.out.extend_from_slice(&buf[from..from + n]);
        } else {
            buf.copy_within(from..from + n, sink.write);
            sink.write += n;
        }
    }

    fn capture_payload(&mut self, bytes: &[u8]) {
        if let Some(capture) = self.capture.as_mut() {
            let start = capture.data.len();
            capture.data.extend_from_slice(bytes);
            unmask(&mut capture.data[start..], self.mask, self.mask_pos);
        }
        self.mask_pos = (self.mask_pos + bytes.len()) % 4;
    }

    /// Inflates the captured message and puts it back as one plain frame.
    fn finish_compressed(&mut self, sink: &mut Sink) -> Result<(), GuardError> {
        let Some(capture) = self.capture.take() else {
            return Ok(());
        };
        let payload =
            deflate::inflate(&capture.data, self.max_message as usize).map_err(|e| match e {
                InflateError::TooBig(max) => GuardError::MessageTooBig {
                    size: max as u64 + 1,
                    max: max as u64,
                },
                InflateError::Corrupt => GuardError::BadCompressedData,
            })?;
        // Without a mask: the guard has already checked that the client masked its frames, and
        // the frame reader (which never asks) then has nothing to unmask.
        let len = payload.len();
        sink.diverted = true;
        self.out.reserve(len + 10);
        self.out.extend_from_slice(&[0x80 | capture.opcode]);
        if len < 126 {
            self.out.extend_from_slice(&[len as u8]);
        } else if len <= u16::MAX as usize {
            self.out.extend_from_slice(&[126]);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.extend_from_slice(&[127]);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        self.out.extend_from_slice(&payload);
        Ok(())
    }

    /// Validates a complete header of `len` bytes and arms the payload.
    fn check_header(&mut self, len: usize) -> Result<(), GuardError> {
        let h = self.header;
        let fin = h[0] & 0x80 != 0;
        let rsv1 = h[0] & 0x40 != 0;
        let opcode = h[0] & 0x0F;
        if h[1] & 0x80 == 0 {
            return Err(GuardError::Unmasked);
        }
        if h[0] & 0x30 != 0 {
            return Err(GuardError::Protocol("reserved bits RSV2/RSV3 set"));
        }
        if rsv1 && !self.deflate {
            return Err(GuardError::Protocol(
                "RSV1 set, but no extension was negotiated",
            ));
        }
        let payload = match h[1] & 0x7F {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        };
        self.mask.copy_from_slice(&h[len - 4..len]);
        self.mask_pos = 0;
        self.frame_fin = fin;
        match opcode {
            0x8..=0xF => {
                if payload > 125 {
                    return Err(GuardError::ControlTooLong(payload));
                }
                if rsv1 {
                    return Err(GuardError::Protocol("RSV1 set on a control frame"));
                }
            }
            0x0 if rsv1 => {
                return Err(GuardError::Protocol("RSV1 set on a continuation frame"));
            }
            0x0 if self.captured => {
                let size = self
                    .capture
                    .as_ref()
                    .map_or(0, |c| c.data.len() as u64)
                    .saturating_add(payload);
                self.check_compressed(size)?;
            }
            0x1 | 0x2 if self.capture.is_some() || self.plain_in_message => {
                return Err(GuardError::Protocol(
                    "a new message started before the last one ended",
                ));
            }
            0x1 | 0x2 if self.captured => {
                self.check_compressed(payload)?;
                self.capture = Some(Capture {
                    opcode,
                    data: Vec::with_capacity(payload.min(self.compressed_limit()) as usize),
                });
            }
            0x0..=0x2 => {
                // Text/binary start a message; continuation frames add to it.
                let so_far = if opcode == 0x0 { self.plain_bytes } else { 0 };
                let size = so_far.saturating_add(payload);
                if size > self.max_message {
                    return Err(GuardError::MessageTooBig {
                        size,
                        max: self.max_message,
                    });
                }
                self.plain_bytes = if fin { 0 } else { size };
                self.plain_in_message = !fin;
            }
            // Reserved opcodes pass through; the frame reader refuses them.
            _ => {}
        }
        self.payload_left = payload;
        Ok(())
    }

    fn check_compressed(&self, size: u64) -> Result<(), GuardError> {
        if size > self.compressed_limit() {
            return Err(GuardError::MessageTooBig {
                size,
                max: self.max_message,
            });
        }
        Ok(())
    }
}

/// XORs `data` with the 4-byte `mask`, starting at mask byte `offset`, eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let key: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) % 4]);
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    // Whole chunks are a multiple of 4 bytes: the rest starts at key byte 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
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

fn refusal(e: GuardError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameGuard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.pending.take() {
                return Poll::Ready(Err(refusal(e)));
            }
            let start = buf.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
            if buf.filled().len() == start {
                return Poll::Ready(Ok(())); // end of stream
            }
            let kept = this.process(buf.filled_mut(), start);
            buf.set_filled(kept);
            if kept > start {
                return Poll::Ready(Ok(()));
            }
            // Everything read was taken out (a compressed frame still incomplete), moved to
            // `out`, or refused: loop, rather than report zero bytes (which means end of stream).
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked_frame(fin: bool, rsv1: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | (if rsv1 { 0x40 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            f.push(0x80 | len as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        masked_frame(fin, false, opcode, &vec![b'x'; len], [1, 2, 3, 4])
    }

    /// Feeds `input` in chunks of `chunk` bytes; returns what comes out and the refusal.
    fn run(
        guard: &mut FrameGuard<tokio::io::Empty>,
        input: &[u8],
        chunk: usize,
    ) -> (Vec<u8>, Option<GuardError>) {
        let mut output = Vec::new();
        for piece in input.chunks(chunk) {
            let mut buf = piece.to_vec();
            let kept = guard.process(&mut buf, 0);
            output.extend_from_slice(&buf[..kept]);
            output.extend_from_slice(&guard.out.split());
            if let Some(e) = guard.pending.take() {
                return (output, Some(e));
            }
        }
        (output, None)
    }

    fn plain(max: usize) -> FrameGuard<tokio::io::Empty> {
        FrameGuard::new(tokio::io::empty(), max, false)
    }

    #[test]
    fn whole_message_size_counts_every_fragment() {
        let mut stream = frame(false, 0x1, 200);
        stream.extend(frame(true, 0x0, 100)); // exactly 300: allowed
        let (out, err) = run(&mut plain(300), &stream, 4096);
        assert_eq!(
            (out.len(), err),
            (stream.len(), None),
            "plain frames pass untouched"
        );
        let good = stream.len();
        stream.extend(frame(false, 0x1, 200));
        stream.extend(frame(true, 0x9, 4)); // a ping between fragments does not count
        stream.extend(frame(true, 0x0, 101));
        let (out, err) = run(&mut plain(300), &stream, 4096);
        assert_eq!(
            err,
            Some(GuardError::MessageTooBig {
                size: 301,
                max: 300
            })
        );
        // Everything before the refused header was handed up.
        assert_eq!(
            out.len(),
            good + frame(false, 0x1, 200).len() + frame(true, 0x9, 4).len()
        );
    }

    #[test]
    fn headers_split_across_reads_are_tracked() {
        let stream = [frame(true, 0x1, 130), frame(true, 0x1, 3)].concat();
        let (out, err) = run(&mut plain(1000), &stream, 1);
        assert_eq!((out, err), (stream, None));
    }

    /// Found by tests/parsers_proptest.rs: the part of a refused header that arrived in the
    /// refusing read was handed up, so the frame reader had the whole header. It then read an
    /// empty refused frame as a message, or refused a long one itself (`FrameTooLarge`) instead
    /// of the guard. At most the bytes of earlier reads may reach it: never a complete header.
    #[test]
    fn a_refused_header_split_across_reads_never_reaches_the_reader_whole() {
        // Unmasked and empty: complete once its second byte is in.
        let (out, err) = run(&mut plain(1000), &[0x81, 0x00], 1);
        assert_eq!((out, err), (vec![0x81], Some(GuardError::Unmasked)));
        // A new message inside an unfinished one, its header split 3 + 3.
        let mut stream = frame(false, 0x1, 4);
        let good = stream.len();
        stream.extend(frame(true, 0x1, 0));
        for chunk in [1, 3, good + 3] {
            let (out, err) = run(&mut plain(1000), &stream, chunk);
            assert!(matches!(err, Some(GuardError::Protocol(_))), "{err:?}");
            assert!(
                out.len() < stream.len(),
                "chunk {chunk}: whole header handed up"
            );
            assert_eq!(out[..good], stream[..good], "chunk {chunk}");
        }
        // Over the limit, with a 16-bit length (8 header bytes) split 5 + 3.
        let stream = frame(true, 0x2, 300);
        let (out, err) = run(&mut plain(200), &stream[..8], 5);
        assert_eq!(out, stream[..5]);
        assert_eq!(
            err,
            Some(GuardError::MessageTooBig {
                size: 300,
                max: 200
            })
        );
    }

    #[test]
    fn unmasked_long_control_and_reserved_bits_are_refused() {
        let (_, err) = run(&mut plain(1000), &[0x81, 0x01, b'a'], 64);
        assert_eq!(err, Some(GuardError::Unmasked));
        let (_, err) = run(&mut plain(1000), &frame(true, 0x9, 126), 64);
        assert_eq!(err, Some(GuardError::ControlTooLong(126)));
        let rsv1 = masked_frame(true, true, 0x1, b"x", [0; 4]);
        let (_, err) = run(&mut plain(1000), &rsv1, 64);
        assert!(
            matches!(err, Some(GuardError::Protocol(_))),
            "RSV1 without deflate: {err:?}"
        );
    }

    fn inflating(max: usize) -> FrameGuard<tokio::io::Empty> {
        FrameGuard::new(tokio::io::empty(), max, true)
    }

    #[test]
    fn compressed_fragments_come_out_as_one_plain_frame_with_pings_in_order() {
        let text = br#"{"type":"publish","data":{"text":"hello hello hello hello"}}"#;
        let compressed = deflate::compress(text, 6);
        let (a, b) = compressed.split_at(compressed.len() / 2);
        let mut stream = masked_frame(false, true, 0x1, a, [9, 8, 7, 6]);
        let ping = masked_frame(true, false, 0x9, b"p", [1, 1, 1, 1]);
        stream.extend(&ping);
        stream.extend(masked_frame(true, false, 0x0, b, [5, 5, 5, 5]));
        let after = frame(true, 0x1, 5);
        stream.extend(&after);
        for chunk in [1, 3, 4096] {
            let (out, err) = run(&mut inflating(1000), &stream, chunk);
            assert_eq!(err, None);
            let mut expected = ping.clone();
            expected.extend([0x81, text.len() as u8]);
            expected.extend_from_slice(text);
            expected.extend(&after);
            assert_eq!(out, expected, "chunk {chunk}");
        }
    }

    /// Found by fuzzing (fuzz target `frame_reader`): a continuation of a compressed message with
    /// a 64-bit length near `u64::MAX` overflowed the message's running size. With overflow
    /// checks that panicked; without them (release) the size wrapped to a small number, passed
    /// the limit, and everything the client sent after it was captured without bound.
    #[test]
    fn a_huge_continuation_of_a_compressed_message_is_refused() {
        let mut stream = masked_frame(false, true, 0x1, b"abcde", [0; 4]);
        stream.extend([0x80, 0xFF]);
        stream.extend(u64::MAX.to_be_bytes());
        stream.extend([1, 2, 3, 4]);
        stream.extend([0; 64]);
        let (out, err) = run(&mut inflating(65_536), &stream, 4096);
        assert_eq!(out, b"");
        assert_eq!(
            err,
            Some(GuardError::MessageTooBig {
                size: u64::MAX,
                max: 65_536
            })
        );
    }

    #[test]
    fn inflation_past_the_limit_and_bad_rsv1_placement_are_refused() {
        let bomb = deflate::compress(&vec![b'a'; 100_000], 9);
        let stream = masked_frame(true, true, 0x1, &bomb, [1, 2, 3, 4]);
        let (_, err) = run(&mut inflating(1000), &stream, 4096);
        assert!(
            matches!(err, Some(GuardError::MessageTooBig { max: 1000, .. })),
            "{err:?}"
        );

        let ping = masked_frame(true, true, 0x9, b"", [0; 4]);
        let (_, err) = run(&mut inflating(1000), &ping, 64);
        assert_eq!(
            err,
            Some(GuardError::Protocol("RSV1 set on a control frame"))
        );

        let mut cont = masked_frame(false, true, 0x1, &deflate::compress(b"ab", 1), [0; 4]);
        cont.extend(masked_frame(true, true, 0x0, b"", [0; 4]));
        let (_, err) = run(&mut inflating(1000), &cont, 64);
        assert_eq!(
            err,
            Some(GuardError::Protocol("RSV1 set on a continuation frame"))
        );

        let garbage = masked_frame(true, true, 0x1, &[0xff, 0xfe, 0xfd], [0; 4]);
        let (_, err) = run(&mut inflating(1000), &garbage, 64);
        assert_eq!(err, Some(GuardError::BadCompressedData));
    }
}
