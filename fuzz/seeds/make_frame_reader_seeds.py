#!/usr/bin/env python3
"""Writes the seed inputs of the `frame_reader` fuzz target into seeds/frame_reader/.

The seeds are committed; this script only documents how they were made (and remakes them).
Layout of one input (see fuzz/fuzz_targets/frame_reader.rs): one chunking-seed byte, the
max_message_size minus 128 as u16 little endian, then the client's byte stream: masked frames.
"""

import os
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "frame_reader")

TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


def frame(opcode, payload, fin=True, rsv1=False, mask=b"\x37\xfa\x21\x3d"):
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n <= 0xFFFF:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def deflate(payload, level=6):
    """Raw deflate, sync-flushed, with the RFC 7692 tail 00 00 ff ff removed."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def seed(name, stream, chunk_seed=0, max_message=65536):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(bytes([chunk_seed]) + struct.pack("<H", max_message - 128) + stream)


def main():
    os.makedirs(OUT, exist_ok=True)
    sub = b'{"type":"subscribe","id":"r1","data":{"topics":["alert.cpu"],"filters":{"level":["warning"]}}}'
    pub = b'{"type":"publish","topic":"chat.room1","data":{"text":"hello hello hello hello"}}'

    seed("text.bin", frame(TEXT, sub))
    seed("text_binary_ping_close.bin",
         frame(TEXT, pub) + frame(BINARY, bytes(range(200))) + frame(PING, b"p")
         + frame(CLOSE, struct.pack(">H", 1000) + b"bye"), chunk_seed=7)
    seed("fragmented.bin",
         frame(TEXT, pub[:10], fin=False) + frame(PING, b"") + frame(CONT, pub[10:40], fin=False)
         + frame(CONT, pub[40:]), chunk_seed=3)
    seed("compressed.bin", frame(TEXT, deflate(pub), rsv1=True))
    c = deflate(sub * 4)
    seed("compressed_fragmented.bin",
         frame(TEXT, c[:5], fin=False, rsv1=True) + frame(PONG, b"x")
         + frame(CONT, c[5:20], fin=False) + frame(CONT, c[20:]) + frame(TEXT, b"after"),
         chunk_seed=2)
    # Inflates to 1 MiB: must stop at the limit (1000 bytes here).
    seed("inflation_bomb.bin", frame(BINARY, deflate(bytes(1 << 20), 9), rsv1=True),
         max_message=1000, chunk_seed=200)
    # A message within the limit in fragments, then one over it across fragments.
    seed("over_limit_fragments.bin",
         frame(TEXT, b"a" * 100, fin=False) + frame(CONT, b"b" * 50)
         + frame(BINARY, b"c" * 100, fin=False) + frame(CONT, b"d" * 51), max_message=150)
    # Headers claiming more than the limit (16- and 64-bit lengths); the payload never comes.
    seed("over_limit_16bit.bin", frame(BINARY, b"e" * 300)[:40], max_message=200)
    seed("over_limit_64bit.bin", frame(BINARY, b"e" * 70000)[:40], max_message=65536,
         chunk_seed=255)
    seed("unmasked.bin", bytes([0x81, 0x02]) + b"hi")


if __name__ == "__main__":
    main()
