#!/usr/bin/env python3
"""Hold N idle WebSocket connections to a gateway and measure what they cost it in RSS.

    python3 loadtest/idle_clients.py --url ws://127.0.0.1:8080/ws --pid GATEWAY_PID \
        --n 10000 --compression deflate|none [--hold SECONDS]

Reads the gateway's VmRSS (/proc/PID/status) before connecting, opens N connections (Python
`websockets`, `compression="deflate"` offers permessage-deflate, `None` offers nothing), waits
for every `connection` message, lets the gateway settle, reads VmRSS again, and prints one line:

    RESULT compression=deflate n=10000 negotiated=10000 rss_before_kib=... rss_after_kib=...
           kib_per_connection=...

The connections are idle: the client sends nothing (its own keepalive pings are off); it answers
the gateway's WebSocket pings, as every client does. Needs `ulimit -n` above N (loadtest/rss.sh
raises it). Connects only to the URL given (use loopback).
"""

import argparse
import asyncio
import os
import sys
import time

from websockets.asyncio.client import connect


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def open_one(url: str, compression, i: int):
    ws = await connect(
        f"{url}?clientId=idle-{i}",
        compression=compression,
        ping_interval=None,  # idle: no client pings (the gateway's pings are still answered)
        open_timeout=60,
        max_size=2**20,
    )
    first = await asyncio.wait_for(ws.recv(), timeout=60)
    if '"type":"connection"' not in first:
        raise RuntimeError(f"connection {i}: expected the connection message, got {first[:200]}")
    ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    return ws, ext.startswith("permessage-deflate")


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--compression", choices=["deflate", "none"], required=True)
    ap.add_argument("--batch", type=int, default=200, help="connections opened concurrently")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading RSS")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds to hold after measuring")
    args = ap.parse_args()
    compression = "deflate" if args.compression == "deflate" else None

    before = vm_rss_kib(args.pid)
    t0 = time.monotonic()
    conns = []
    negotiated = 0
    for start in range(0, args.n, args.batch):
        batch = [open_one(args.url, compression, i) for i in range(start, min(args.n, start + args.batch))]
        for ws, deflate in await asyncio.gather(*batch):
            conns.append(ws)
            negotiated += deflate
    connect_s = time.monotonic() - t0
    await asyncio.sleep(args.settle)
    # Two readings a second apart must agree within 1 %; take the later one.
    after = vm_rss_kib(args.pid)
    for _ in range(10):
        await asyncio.sleep(1.0)
        again = vm_rss_kib(args.pid)
        stable = abs(again - after) <= after // 100
        after = again
        if stable:
            break
    per_conn = (after - before) / args.n
    print(
        f"RESULT compression={args.compression} n={args.n} negotiated={negotiated} "
        f"rss_before_kib={before} rss_after_kib={after} kib_per_connection={per_conn:.2f} "
        f"connect_seconds={connect_s:.1f}",
        flush=True,
    )
    if args.hold:
        await asyncio.sleep(args.hold)
    expected = args.n if compression else 0
    if negotiated != expected:
        print(f"error: {negotiated} of {args.n} connections negotiated deflate, expected {expected}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    code = asyncio.new_event_loop().run_until_complete(main())
    sys.stdout.flush()
    sys.stderr.flush()
    # Closing 10,000 connections politely takes a while and measures nothing: leave at once (the
    # kernel closes the sockets; the caller stops the gateway next).
    os._exit(code)

