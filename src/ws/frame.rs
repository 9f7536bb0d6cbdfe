//! Server-to-client WebSocket frame encoding (RFC 6455 section 5.2).
//!
//! Frames are built as complete wire bytes (`bytes::Bytes`) so one publication's frame can be
//! queued to every subscriber without copying. fastwebsockets' writer is not used on this path:
//! it writes one `Frame` per call to a stream it owns, while our writers drain many shared frames
//! in one vectored write. Server frames are never masked, so a frame is just a header and payload.

use bytes::{BufMut, Bytes, BytesMut};

/// Longest server frame header: 2 bytes + 8-byte extended length (server frames carry no mask).
pub const MAX_HEADER_LEN: usize = 10;

/// Frame opcodes the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Text = 0x1,
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Writes a frame header for a final frame of `payload_len` bytes into `out`, returning its length.
fn write_header(out: &mut [u8; MAX_HEADER_LEN], opcode: OpCode, payload_len: usize) -> usize {
    out[0] = 0x80 | opcode as u8;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// A buffer that a payload is written into after room for the largest header, so the finished
/// frame needs no second copy: the header is written right in front of the payload.
pub struct FrameBuf {
    buf: BytesMut,
}

impl FrameBuf {
    /// A buffer expecting about `payload_hint` payload bytes.
    pub fn with_capacity(payload_hint: usize) -> Self {
        let mut buf = BytesMut::with_capacity(MAX_HEADER_LEN + payload_hint);
        buf.put_bytes(0, MAX_HEADER_LEN);
        FrameBuf { buf }
    }

    /// The payload written so far.
    pub fn payload(&self) -> &[u8] {
        &self.buf[MAX_HEADER_LEN..]
    }

    /// Seals the buffer into one final frame of `opcode`.
    pub fn finish(self, opcode: OpCode) -> Bytes {
        self.seal(opcode, false)
    }

    /// Seals the buffer into one final frame, with RSV1 set when the payload is compressed.
    fn seal(mut self, opcode: OpCode, rsv1: bool) -> Bytes {
        let payload_len = self.buf.len() - MAX_HEADER_LEN;
        let mut header = [0u8; MAX_HEADER_LEN];
        let header_len = write_header(&mut header, opcode, payload_len);
        if rsv1 {
            header[0] |= 0x40;
        }
        let start = MAX_HEADER_LEN - header_len;
        self.buf[start..MAX_HEADER_LEN].copy_from_slice(&header[..header_len]);
        self.buf.freeze().slice(start..)
    }
}

impl std::io::Write for FrameBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One frame carrying a copy of `payload`.
pub fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = FrameBuf::with_capacity(payload.len());
    buf.buf.extend_from_slice(payload);
    buf.finish(opcode)
}

/// A text frame serialized straight from `value` (one JSON encoding, no intermediate string).
pub fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> Bytes {
    let mut buf = FrameBuf::with_capacity(128);
    // Serializing our own plain structs into memory cannot fail.
    if let Err(e) = serde_json::to_writer(&mut buf, value) {
        tracing::error!(error = %e, "serializing an outbound message failed");
    }
    buf.finish(OpCode::Text)
}

/// A final frame with RSV1 set (permessage-deflate) carrying an already compressed payload.
pub fn compressed(opcode: OpCode, deflated: &[u8]) -> Bytes {
    let mut buf = FrameBuf::with_capacity(deflated.len());
    buf.buf.extend_from_slice(deflated);
    buf.seal(opcode, true)
}

/// The data opcode of a complete frame built by this module: binary for a binary frame, text
/// for anything else.
pub fn data_opcode_of(frame: &[u8]) -> OpCode {
    match frame.first().map(|b| b & 0x0F) {
        Some(0x2) => OpCode::Binary,
        _ => OpCode::Text,
    }
}

/// The payload of a complete unmasked frame built by this module.
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return &[],
    };
    frame.get(header..).unwrap_or(&[])
}

/// A close frame with a status code and a reason (truncated to fit the 125-byte control limit).
pub fn close(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    frame(OpCode::Close, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths_at_their_edges() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let f = frame(OpCode::Text, &vec![b'a'; len]);
            assert_eq!(f.len(), len + header, "payload {len}");
            assert_eq!(f[0], 0x81);
        }
    }

    #[test]
    fn close_reason_is_cut_on_a_char_boundary() {
        let f = close(1000, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
