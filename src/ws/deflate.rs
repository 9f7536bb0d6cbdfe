//! permessage-deflate (RFC 7692): negotiating it, and compressing and inflating whole messages.
//!
//! The server always answers with `server_no_context_takeover` (so a message compresses the same
//! for every recipient: one compressed frame per publication serves all of them) and with
//! `client_no_context_takeover` (so no connection keeps an inflater between messages). Both are
//! allowed in a response even when the client did not offer them (RFC 7692 sections 7.1.1.1 and
//! 7.1.1.2). Compressors and inflaters are therefore stateless between messages and live one per
//! worker thread (a pool of as many as there are threads), not one per connection: a zlib-rs
//! compressor holds about 380 KB and an inflater about 50 KB (shared/CRATE-NOTES.md).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The response parameters for an accepted offer that did not limit the server's window.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The deflate window the server compresses with (unless a client asked for a smaller one) and
/// always inflates with (a full window inflates data made with any smaller one).
pub const WINDOW_BITS: u8 = 15;

/// The smallest window the server can compress with: zlib has no raw deflate with 8 bits.
const MIN_SERVER_WINDOW_BITS: u8 = 9;

/// An accepted `permessage-deflate` offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The window the server compresses with: 15, or the client's `server_max_window_bits`.
    pub server_window_bits: u8,
    /// The offer carried `server_max_window_bits`; accepting it means repeating it (RFC 7692
    /// 7.1.2.1).
    limits_server_window: bool,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` value of the response.
    pub fn response(&self) -> String {
        if self.limits_server_window {
            format!(
                "{RESPONSE}; server_max_window_bits={}",
                self.server_window_bits
            )
        } else {
            RESPONSE.to_string()
        }
    }
}

/// The empty stored block that ends every sync-flushed message; removed on the wire (RFC 7692
/// section 7.2.1) and put back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Picks the first `permessage-deflate` offer in the `Sec-WebSocket-Extensions` values that the
/// server can honour; `None` declines them all (the connection then runs uncompressed).
///
/// An offer is declined when it repeats or does not know a parameter, gives a bad value, or asks
/// the server to compress with an 8-bit window (`server_max_window_bits=8`, which zlib cannot
/// do). A smaller server window (9-14) is honoured: a message is compressed once per window size
/// in use, so such connections share theirs just as everybody else shares the full-window one.
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>) -> Option<Agreement> {
    header_values
        .into_iter()
        .flat_map(|value| value.split(','))
        .find_map(acceptable)
}

fn acceptable(offer: &str) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
    {
        return None;
    }
    let mut agreement = Agreement {
        server_window_bits: WINDOW_BITS,
        limits_server_window: false,
    };
    let mut seen: Vec<String> = Vec::new();
    for param in parts {
        if param.is_empty() {
            return None;
        }
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (
                n.trim().to_ascii_lowercase(),
                Some(v.trim().trim_matches('"')),
            ),
            None => (param.to_ascii_lowercase(), None),
        };
        if seen.contains(&name) {
            return None;
        }
        let ok = match (name.as_str(), value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            // The client may limit its own window; we inflate with the full window regardless.
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(v)) => window_bits(v).is_some(),
            ("server_max_window_bits", Some(v)) => match window_bits(v) {
                Some(bits) if bits >= MIN_SERVER_WINDOW_BITS => {
                    agreement.server_window_bits = bits;
                    agreement.limits_server_window = true;
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if !ok {
            return None;
        }
        seen.push(name);
    }
    Some(agreement)
}

/// A window-bits value: 8 to 15, digits only (RFC 7692 section 7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|n| (8..=15).contains(n))
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    /// For the rare client that limited the server's window: (level, window bits, compressor).
    static SMALL_WINDOW_COMPRESSOR: RefCell<Option<(u32, u8, Compress)>> =
        const { RefCell::new(None) };
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Compresses one whole message payload for a frame with RSV1 set (without the 4-byte tail),
/// with the full 15-bit window.
pub fn compress(payload: &[u8], level: u32) -> Vec<u8> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some((l, c)) if *l == level => c,
            other => {
                let fresh =
                    Compress::new_with_window_bits(Compression::new(level), false, WINDOW_BITS);
                &mut other.insert((level, fresh)).1
            }
        };
        compress_with(compressor, payload)
    })
}

/// Like [`compress`], with a window of `window_bits` (clamped to 9-15) instead of 15.
pub fn compress_with_window(payload: &[u8], level: u32, window_bits: u8) -> Vec<u8> {
    let bits = window_bits.clamp(MIN_SERVER_WINDOW_BITS, WINDOW_BITS);
    if bits == WINDOW_BITS {
        return compress(payload, level);
    }
    SMALL_WINDOW_COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let compressor = match &mut *slot {
            Some((l, b, c)) if *l == level && *b == bits => c,
            other => {
                let fresh = Compress::new_with_window_bits(Compression::new(level), false, bits);
                &mut other.insert((level, bits, fresh)).2
            }
        };
        compress_with(compressor, payload)
    })
}

fn compress_with(compressor: &mut Compress, payload: &[u8]) -> Vec<u8> {
    compressor.reset();
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    loop {
        let consumed = compressor.total_in() as usize;
        // A sync flush is complete once a call leaves output room unused.
        if compressor
            .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .is_err()
            || (compressor.total_in() as usize == payload.len() && out.len() < out.capacity())
        {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("compressed message inflates past the {0}-byte limit")]
    TooBig(usize),
    #[error("compressed message is not valid deflate data")]
    Corrupt,
}

/// Inflates one whole message (the payloads of all its frames, concatenated), refusing to
/// produce more than `max` bytes: memory stays bounded whatever the compressed data claims.
pub fn inflate(compressed: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let mut input = Vec::with_capacity(compressed.len() + TAIL.len());
    input.extend_from_slice(compressed);
    input.extend_from_slice(&TAIL);
    INFLATER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let inflater =
            slot.get_or_insert_with(|| Decompress::new_with_window_bits(false, WINDOW_BITS));
        inflater.reset(false);
        // Never more than one byte past the limit: enough to tell that it was passed.
        let cap = max + 1;
        let mut out: Vec<u8> = Vec::with_capacity((input.len() * 4).max(64).min(cap));
        loop {
            let consumed = inflater.total_in() as usize;
            let produced = out.len();
            let status = inflater
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            if out.len() > max {
                return Err(InflateError::TooBig(max));
            }
            let all_in = inflater.total_in() as usize == input.len();
            if status == Status::StreamEnd || (all_in && out.len() < out.capacity()) {
                return Ok(out);
            }
            if out.len() == out.capacity() {
                if out.capacity() >= cap {
                    return Err(InflateError::TooBig(max));
                }
                out.reserve_exact((out.capacity() * 2).min(cap) - out.len());
            } else if inflater.total_in() as usize == consumed && out.len() == produced {
                // Room to spare and no progress: the data is truncated or invalid.
                return Err(InflateError::Corrupt);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(header: &str) -> Option<String> {
        negotiate([header]).map(|a| a.response())
    }

    #[test]
    fn offers_browsers_and_libraries_send_are_accepted() {
        for offer in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
            "permessage-deflate; client_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=\"10\"",
        ] {
            assert_eq!(response(offer).as_deref(), Some(RESPONSE), "{offer}");
            assert_eq!(negotiate([offer]).map(|a| a.server_window_bits), Some(15));
        }
    }

    #[test]
    fn a_limited_server_window_is_honoured_and_repeated() {
        let offer = "permessage-deflate; server_max_window_bits=15; client_max_window_bits=12";
        assert_eq!(
            response(offer),
            Some(format!("{RESPONSE}; server_max_window_bits=15"))
        );
        let agreed = negotiate(["permessage-deflate; server_max_window_bits=9"]);
        assert_eq!(agreed.map(|a| a.server_window_bits), Some(9));
        assert_eq!(
            agreed.map(|a| a.response()),
            Some(format!("{RESPONSE}; server_max_window_bits=9"))
        );
        // Data made with the small window inflates with the full one.
        let text = b"abcdefghij".repeat(500);
        let small = compress_with_window(&text, 6, 9);
        assert_eq!(inflate(&small, text.len()).expect("inflates"), text);
    }

    #[test]
    fn the_first_offer_the_server_can_honour_wins() {
        // The first asks for an 8-bit server window (declined), the second is fine.
        let header = "permessage-deflate; server_max_window_bits=8, permessage-deflate";
        assert_eq!(response(header).as_deref(), Some(RESPONSE));
        // Offers may also come as separate header values.
        assert_eq!(
            negotiate([
                "x-webkit-deflate-frame",
                "permessage-deflate; client_max_window_bits"
            ])
            .map(|a| a.response())
            .as_deref(),
            Some(RESPONSE)
        );
    }

    #[test]
    fn bad_offers_are_declined() {
        for offer in [
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=1a",
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "x-webkit-deflate-frame",
            "",
        ] {
            assert_eq!(negotiate([offer]), None, "{offer:?}");
        }
    }

    #[test]
    fn round_trip_and_the_tail_is_stripped() {
        let text = br#"{"type":"metrics","data":{"cpu":[1,2,3,4,5,6,7,8,9,10]}}"#.repeat(20);
        let compressed = compress(&text, 1);
        assert!(compressed.len() < text.len() / 4);
        assert!(!compressed.ends_with(&TAIL));
        assert_eq!(inflate(&compressed, text.len()).expect("inflates"), text);
        // Empty message (RFC 7692 7.2.3.6).
        let empty = compress(b"", 1);
        assert_eq!(inflate(&empty, 10).expect("inflates"), b"");
    }

    #[test]
    fn inflation_bombs_stop_at_the_limit() {
        let bomb = compress(&vec![0u8; 10_000_000], 9);
        assert!(bomb.len() < 20_000);
        assert_eq!(inflate(&bomb, 65_536), Err(InflateError::TooBig(65_536)));
        // Exactly at the limit is fine.
        let edge = compress(&vec![b'a'; 65_536], 9);
        assert_eq!(inflate(&edge, 65_536).map(|v| v.len()), Ok(65_536));
        assert_eq!(inflate(&edge, 65_535), Err(InflateError::TooBig(65_535)));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0x00, 0x12], 1000),
            Err(InflateError::Corrupt)
        );
    }
}
