//! The receiving half of a WebSocket connection without its socket: the bytes read so far, the
//! frame parser (RFC 6455), reassembly of fragments, and inflation (RFC 7692).
//!
//! Kept apart from the socket so that both ways of reading feed it: the tokio client
//! ([`crate::client::WsClient`], one `recvmsg` per readiness) and the io_uring receive loop
//! ([`crate::uring`], many sockets' reads per system call). Whoever reads puts the bytes in
//! with [`Frames::spare`]/[`Frames::filled`] or [`Frames::feed`] and takes messages out with
//! [`Frames::step`]; pongs to send back collect in [`Frames::take_out`].

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};

use crate::client::{encode_frame, ClientError};

/// Largest message accepted (after inflation).
const MAX_MESSAGE: usize = 16 << 20;

fn err<T>(msg: impl Into<String>) -> Result<T, ClientError> {
    Err(ClientError(msg.into()))
}

/// permessage-deflate as negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deflate {
    Off,
    /// Every message on its own (the server said `server_no_context_takeover`).
    NoContext,
    /// The server keeps its compression context between messages.
    Context,
}

/// What [`Frames::step`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// A complete message, in [`Frames::message`].
    Message,
    /// A close frame (its code, if any).
    Close(Option<u16>),
    /// No complete message in the bytes so far.
    NeedMore,
}

pub struct Frames {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// A fragmented message being put together: (compressed, bytes so far).
    partial: Option<(bool, Vec<u8>)>,
    /// The last message (inflated, or reassembled).
    message: Vec<u8>,
    pub deflate: Deflate,
    /// Per-connection inflater (context takeover only).
    inflater: Option<Box<Decompress>>,
    /// Frames to send (pongs) after the current read.
    out: Vec<u8>,
    /// The kernel's receive timestamp (ns since the epoch, `SO_TIMESTAMPNS`) of the newest
    /// bytes read: when the data reached this host, before the generator got to run. A message
    /// spanning reads gets the later one, so it never reads early.
    arrived_ns: Option<u64>,
}

enum Parsed {
    Message,
    Close(Option<u16>),
    Control,
    NeedMore,
}

impl Frames {
    /// A parser starting on `buf[start..end]` (what the upgrade read past its response).
    pub fn new(buf: Vec<u8>, start: usize, end: usize, deflate: Deflate) -> Frames {
        let inflater = (deflate == Deflate::Context).then(|| Box::new(Decompress::new(false)));
        Frames {
            buf,
            start,
            end,
            partial: None,
            message: Vec::new(),
            deflate,
            inflater,
            out: Vec::new(),
            arrived_ns: None,
        }
    }

    /// The message [`Step::Message`] announced, and when its last bytes arrived.
    pub fn message(&self) -> (&[u8], Option<u64>) {
        (&self.message, self.arrived_ns)
    }

    /// Pongs (and other frames) owed to the server; empty most of the time.
    pub fn take_out(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The next message, close, or [`Step::NeedMore`]; pings are answered (into
    /// [`Frames::take_out`]) and pongs skipped on the way. `shared` is the worker's inflater for
    /// messages compressed without context takeover.
    pub fn step(&mut self, shared: &RefCell<Decompress>) -> Result<Step, ClientError> {
        loop {
            match self.parse_one(shared)? {
                Parsed::Message => return Ok(Step::Message),
                Parsed::Close(code) => return Ok(Step::Close(code)),
                Parsed::Control => continue,
                Parsed::NeedMore => return Ok(Step::NeedMore),
            }
        }
    }

    /// Free space at the end of the buffer for the next read, at least one byte (compacting
    /// or growing the buffer as needed).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = (self.buf.len() * 2).max(4096);
            self.buf.resize(len, 0);
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`Frames::spare`], stamped on arrival with `stamp` if the kernel
    /// gave one.
    pub fn filled(&mut self, n: usize, stamp: Option<u64>) {
        self.end += n;
        self.arrived_ns = stamp.or(self.arrived_ns);
    }

    /// Appends bytes read elsewhere (a buffer the kernel filled).
    pub fn feed(&mut self, mut data: &[u8], stamp: Option<u64>) {
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            data = &data[n..];
            self.filled(n, stamp);
        }
    }

    fn parse_one(&mut self, shared: &RefCell<Decompress>) -> Result<Parsed, ClientError> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(Parsed::NeedMore);
        }
        let (b0, b1) = (avail[0], avail[1]);
        let fin = b0 & 0x80 != 0;
        let rsv1 = b0 & 0x40 != 0;
        let opcode = b0 & 0x0F;
        if b1 & 0x80 != 0 {
            return err("masked frame from the server");
        }
        let (len, header) = match b1 & 0x7F {
            126 => {
                if avail.len() < 4 {
                    return Ok(Parsed::NeedMore);
                }
                (u16::from_be_bytes([avail[2], avail[3]]) as usize, 4)
            }
            127 => {
                if avail.len() < 10 {
                    return Ok(Parsed::NeedMore);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            l => (l as usize, 2),
        };
        if len > MAX_MESSAGE {
            return err(format!("frame of {len} bytes"));
        }
        if avail.len() < header + len {
            // Make room for the whole frame.
            let need = header + len;
            if need > self.buf.len() - self.start {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if need > self.buf.len() {
                    self.buf.resize(need.next_power_of_two(), 0);
                }
            }
            return Ok(Parsed::NeedMore);
        }
        let payload_at = self.start + header;
        self.start += header + len;
        let payload = payload_at..payload_at + len;
        match opcode {
            0x8 => {
                let p = &self.buf[payload];
                let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                Ok(Parsed::Close(code))
            }
            0x9 => {
                let p = self.buf[payload].to_vec();
                encode_frame(&mut self.out, 0xA, &p);
                Ok(Parsed::Control)
            }
            0xA => Ok(Parsed::Control),
            0x0..=0x2 => {
                let compressed;
                if opcode == 0x0 {
                    let Some((c, mut data)) = self.partial.take() else {
                        return err("continuation without a first frame");
                    };
                    data.extend_from_slice(&self.buf[payload]);
                    if !fin {
                        self.partial = Some((c, data));
                        return Ok(Parsed::NeedMore);
                    }
                    compressed = c;
                    if compressed {
                        self.inflate_owned(data, shared)?;
                    } else {
                        self.message = data;
                    }
                    return Ok(Parsed::Message);
                }
                compressed = rsv1;
                if compressed && self.deflate == Deflate::Off {
                    return err("RSV1 without permessage-deflate");
                }
                if !fin {
                    self.partial = Some((compressed, self.buf[payload].to_vec()));
                    return Ok(Parsed::NeedMore);
                }
                if compressed {
                    let data = self.buf[payload].to_vec();
                    self.inflate_owned(data, shared)?;
                } else {
                    self.message.clear();
                    self.message.extend_from_slice(&self.buf[payload]);
                }
                Ok(Parsed::Message)
            }
            other => err(format!("opcode {other}")),
        }
    }

    fn inflate_owned(
        &mut self,
        mut data: Vec<u8>,
        shared: &RefCell<Decompress>,
    ) -> Result<(), ClientError> {
        data.extend_from_slice(&[0, 0, 0xff, 0xff]);
        // Borrowed only here, never across an await: every connection of the worker shares it.
        let mut shared = shared.borrow_mut();
        let inflater: &mut Decompress = match &mut self.inflater {
            Some(own) => own,
            None => {
                shared.reset(false);
                &mut shared
            }
        };
        self.message.clear();
        self.message.reserve(data.len() * 4);
        let mut input = &data[..];
        loop {
            if self.message.len() == self.message.capacity() {
                self.message.reserve(self.message.capacity().max(1024));
            }
            let before_in = inflater.total_in();
            let status = inflater
                .decompress_vec(input, &mut self.message, FlushDecompress::Sync)
                .map_err(|e| ClientError(format!("inflate: {e}")))?;
            let used = (inflater.total_in() - before_in) as usize;
            input = &input[used..];
            if self.message.len() > MAX_MESSAGE {
                return err("inflated message too large");
            }
            if input.is_empty() && self.message.len() < self.message.capacity() {
                break;
            }
            if status == Status::StreamEnd {
                break;
            }
        }
        Ok(())
    }
}

/// An unmasked frame as a server sends it (first byte: FIN, RSV1 and opcode), for the tests of
/// every read path.
#[cfg(test)]
pub fn server_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![first];
    if payload.len() < 126 {
        f.push(payload.len() as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fed_bytes_in_any_split_give_the_same_messages() {
        let mut stream = Vec::new();
        for text in ["one", "two", &"x".repeat(5000)] {
            stream.extend(server_frame(0x81, text.as_bytes()));
        }
        let shared = RefCell::new(Decompress::new(false));
        for chunk in [1, 7, 100, 10_000] {
            let mut frames = Frames::new(Vec::new(), 0, 0, Deflate::Off);
            let mut got = Vec::new();
            for (k, piece) in stream.chunks(chunk).enumerate() {
                frames.feed(piece, Some(k as u64));
                while frames.step(&shared).expect("parses") == Step::Message {
                    let (m, stamp) = frames.message();
                    got.push((m.len(), stamp));
                }
            }
            let lens: Vec<usize> = got.iter().map(|g| g.0).collect();
            assert_eq!(lens, [3, 3, 5000], "chunks of {chunk}");
            // The last message is stamped with the read that completed it.
            let last_read = (stream.len() - 1) / chunk;
            assert_eq!(got[2].1, Some(last_read as u64), "chunks of {chunk}");
        }
    }
}
