#!/usr/bin/env python3
"""Gateway CPU per delivery over real sockets, compressed against plain fan-out, in one run.

    python3 loadtest/cpu_per_delivery.py --base 127.0.0.1:8080 --pid GATEWAY_PID \
        [--subscribers 2000] [--publications 200] [--blocks 4]

Opens S subscribers on topic `cpu:plain` without compression and S on `cpu:deflate` with
permessage-deflate (Python `websockets`, every connection checked), then alternates blocks of
publications to one topic and the other (`--blocks` each, `--publications` per topic in all),
paced: each publication (a ~1 KB compressible JSON `data`, the `deflate_fanout` bench's payload) is
posted with `POST /api/publish` only after every subscriber of that topic has received the
previous one, so the gateway writes one frame per write (the "paced" regime of PERF-NOTES).
For each block it reads the gateway's user+sys CPU from /proc/PID/stat and divides by the
deliveries (S per publication). Prints us per delivery for both modes and their ratio:

    plain: X us per delivery ... / deflate: Y us per delivery ... / ratio compressed/plain: R

The clients run on the same machine and take CPU too; only the gateway's own CPU is counted.
Connects only to the address given (use loopback).
"""

import argparse
import asyncio
import json
import os
import sys
import time

from websockets.asyncio.client import connect

# The deflate_fanout bench's 1001-byte `data`.
DATA = json.loads(
    '{"type":"route_update","routeId":"rt-5f2c9a0e","status":"ACTIVE","version":42'
    ',"updatedAt":"2026-11-23T10:15:32.123Z","driver":{"id":"drv-1093"'
    ',"name":"Ana M\\u00fcller","vehicle":{"plate":"B-WS 4711","model":"eSprinter"'
    ',"capacityKg":1200,"electric":true}},"stops":[{"seq":1,"id":"st-001","name":"Depot Nord"'
    ',"lat":52.5561,"lon":13.3472,"eta":"2026-11-23T10:30:00Z","status":"DONE","parcels":12}'
    ',{"seq":2,"id":"st-002","name":"Friedrichstra\\u00dfe 44","lat":52.5079,"lon":13.3904'
    ',"eta":"2026-11-23T10:52:00Z","status":"DONE","parcels":3},{"seq":3,"id":"st-003"'
    ',"name":"Alexanderplatz 1","lat":52.5219,"lon":13.4132,"eta":"2026-11-23T11:10:00Z"'
    ',"status":"PENDING","parcels":5},{"seq":4,"id":"st-004","name":"Warschauer Str. 70"'
    ',"lat":52.5058,"lon":13.4491,"eta":"2026-11-23T11:34:00Z","status":"PENDING"'
    ',"parcels":1}],"tags":["express","cold-chain","priority:high","zone:mitte"]'
    ',"metrics":{"distanceKm":38.7,"durationMin":95,"onTimeRate":0.97'
    ',"delays":[{"stop":"st-002","minutes":4,"reason":"traffic"}]}}'
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int):
    """(user, sys) CPU seconds of the whole process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15 (1-based).
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


class Topic:
    def __init__(self, name: str, subscribers: int):
        self.name = name
        self.subscribers = subscribers
        self.received = 0
        self.target = 0
        self.reached = asyncio.Event()

    def got(self):
        self.received += 1
        if self.received >= self.target:
            self.reached.set()


async def subscriber(url: str, topic: Topic, compression, i: int, ready: list):
    ws = await connect(
        f"{url}?clientId=cpu-{topic.name}-{i}&subscriptions={topic.name}",
        compression=compression,
        ping_interval=None,
        open_timeout=60,
        max_size=2**20,
    )
    first = json.loads(await ws.recv())
    assert first["type"] == "connection" and topic.name in first["data"]["subscriptions"], first
    ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    if ext.startswith("permessage-deflate") != (compression is not None):
        raise RuntimeError(f"{topic.name} connection {i}: extensions {ext!r}")
    ready.append(ws)
    needle = f'"topic":"{topic.name}"'
    async for msg in ws:
        if needle in msg:
            topic.got()


class Publisher:
    """One keep-alive HTTP/1.1 connection for POST /api/publish."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def publish(self, topic: str, seq: int):
        body = json.dumps({"topic": topic, "type": "route_update", "data": {**DATA, "version": seq}},
                          separators=(",", ":")).encode()
        self.writer.write(
            f"POST /api/publish HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"publish answered {status!r}")


async def run_block(pub: Publisher, topic: Topic, count: int, seq0: int, pid: int):
    user0, sys0 = cpu_seconds(pid)
    t0 = time.monotonic()
    for k in range(count):
        topic.target = topic.received + topic.subscribers
        topic.reached.clear()
        await pub.publish(topic.name, seq0 + k)
        await asyncio.wait_for(topic.reached.wait(), timeout=60)
    user1, sys1 = cpu_seconds(pid)
    return user1 - user0, sys1 - sys0, time.monotonic() - t0, count * topic.subscribers


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="HOST:PORT of the gateway")
    ap.add_argument("--pid", type=int, required=True, help="the gateway's process id")
    ap.add_argument("--subscribers", type=int, default=2000, help="per mode")
    ap.add_argument("--publications", type=int, default=200, help="per mode")
    ap.add_argument("--blocks", type=int, default=4, help="alternating blocks per mode")
    args = ap.parse_args()
    host, port = args.base.rsplit(":", 1)
    url = f"ws://{args.base}/ws"

    plain = Topic("cpu-plain", args.subscribers)
    deflate = Topic("cpu-deflate", args.subscribers)
    ready: list = []
    tasks = []
    for topic, compression in ((plain, None), (deflate, "deflate")):
        for start in range(0, args.subscribers, 200):
            before = len(ready)
            n = min(200, args.subscribers - start)
            tasks += [asyncio.create_task(subscriber(url, topic, compression, start + i, ready))
                      for i in range(n)]
            while len(ready) < before + n:
                await asyncio.sleep(0.01)
                for t in tasks:
                    if t.done() and t.exception():
                        raise t.exception()
    pub = Publisher(host, int(port))
    await pub.open()
    # Warm-up: a few publications each, not counted.
    for topic in (plain, deflate):
        await run_block(pub, topic, 5, 0, args.pid)

    per_block = max(1, args.publications // args.blocks)
    totals = {"plain": [0.0, 0.0, 0.0, 0], "deflate": [0.0, 0.0, 0.0, 0]}
    seq = 100
    for b in range(args.blocks):
        # Alternate which mode goes first so that drift cancels.
        order = [("plain", plain), ("deflate", deflate)]
        if b % 2:
            order.reverse()
        for name, topic in order:
            user, sys_, wall, deliveries = await run_block(pub, topic, per_block, seq, args.pid)
            seq += per_block
            t = totals[name]
            t[0] += user
            t[1] += sys_
            t[2] += wall
            t[3] += deliveries
            print(f"block {b + 1} {name}: {user + sys_:.2f} s CPU ({user:.2f} user, {sys_:.2f} "
                  f"sys), {wall:.2f} s wall, {deliveries} deliveries, "
                  f"{(user + sys_) / deliveries * 1e6:.2f} us per delivery", flush=True)
    us = {}
    for name, (user, sys_, wall, deliveries) in totals.items():
        cpu = user + sys_
        us[name] = cpu / deliveries * 1e6
        print(f"{name}: {us[name]:.2f} us per delivery (user {user / deliveries * 1e6:.2f}, sys "
              f"{sys_ / deliveries * 1e6:.2f}; {cpu:.2f} s CPU over {deliveries} deliveries, "
              f"{wall:.1f} s wall, {args.subscribers} subscribers, paced)")
    print(f"ratio compressed/plain: {us['deflate'] / us['plain']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    code = asyncio.new_event_loop().run_until_complete(main())
    sys.stdout.flush()
    os._exit(code)
