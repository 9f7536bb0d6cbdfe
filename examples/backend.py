#!/usr/bin/env python3
"""An example wsgate backend: answers `config_get` requests from WebSocket clients.

How it fits together
--------------------
A client sends the gateway a message of a type the gateway does not handle itself, e.g.

    {"type": "config_get", "id": "c1", "data": {}}

The node the client is connected to appends it to the Redis stream ``wsgate:upstream`` with the
fields ``node`` (the node's id), ``connectionId``, ``clientId``, ``userId`` (empty when
anonymous), ``type`` and ``message`` (the client's message, verbatim JSON), and acks the client
with ``{"action": "forwarded"}``.

This backend reads that stream (``XREAD BLOCK``) and answers every ``config_get`` by publishing to
the channel of the node that holds the connection, ``wsgate:node:<node>``:

    {"connectionId": <id>, "type": "config",
     "data": {"requestId": "c1", "config": {...}}}

and the client receives ``{"type": "config", "id": ..., "timestamp": ..., "data": {"requestId":
"c1", "config": {...}}}``. Any Redis client in any language can do the same (README: "Publishing
from a backend").

Usage
-----
    python3 -m pip install redis
    python3 examples/backend.py --redis redis://127.0.0.1:6379

Options: ``--from ID`` starts reading the stream at an entry id (``0`` replays everything still in
the stream; the default, ``$``, reads only entries added after the backend started), ``--stream``
names another stream. With several Redis URLs configured on the gateway (sharding), the upstream
stream and the node channels live on the first URL: point ``--redis`` there.

Several copies of this script would each answer every request; to share the work between
backend instances use a consumer group (``XREADGROUP``) instead of ``XREAD``.
"""

import argparse
import json
import signal
import sys
import time

try:
    import redis
except ImportError:  # pragma: no cover - a message is better than a traceback
    sys.exit("examples/backend.py needs the Python package redis: python3 -m pip install redis")

UPSTREAM_STREAM = "wsgate:upstream"


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def shard_of(name: str, shards: int) -> int:
    """Which of the gateway's Redis URLs (in configured order) holds the channel of topic or
    user `name`: jump consistent hash of FNV-1a 64, as src/broker/redis/shard.rs computes it.
    Not needed here (the upstream stream and node channels live on the first URL); a backend
    that publishes to topics or users over several instances needs it."""
    key, b, j = fnv1a64(name.encode()), -1, 0
    while j < shards:
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def node_channel(node: str) -> str:
    """The channel of one gateway node: messages for connections held by that node."""
    return f"wsgate:node:{node}"


def config_for(fields: dict) -> dict:
    """The configuration this example hands out (a real backend would look it up)."""
    return {
        "refreshSeconds": 30,
        "features": {"routes": True, "metrics": True},
        "user": fields.get("userId") or None,
    }


def answer(r: "redis.Redis", fields: dict) -> None:
    """Answers one upstream entry if it is a `config_get`."""
    kind = fields.get("type")
    if kind != "config_get":
        print(f"backend: ignoring {kind!r} from connection {fields.get('connectionId')}", flush=True)
        return
    try:
        message = json.loads(fields.get("message", "{}"))
    except json.JSONDecodeError:
        message = {}
    request_id = message.get("id", message.get("messageId"))
    reply = {
        "connectionId": int(fields["connectionId"]),
        "type": "config",
        "data": {"requestId": request_id, "config": config_for(fields)},
    }
    receivers = r.publish(node_channel(fields["node"]), json.dumps(reply))
    if receivers == 0:
        # The node is gone (and with it the connection): nobody to answer.
        print(f"backend: node {fields['node']} is not listening; answer dropped", flush=True)
    else:
        print(
            f"backend: answered config_get {request_id!r} of connection "
            f"{fields['connectionId']} on node {fields['node']}",
            flush=True,
        )


def start_id(r: "redis.Redis", stream: str, requested: str) -> str:
    """`$` resolved to the stream's current last entry, so nothing added after start-up is
    missed between two XREAD calls (XREAD with `$` each time would skip entries)."""
    if requested != "$":
        return requested
    last = r.xrevrange(stream, count=1)
    return last[0][0] if last else "0-0"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="Redis URL (the gateway's first)")
    parser.add_argument("--stream", default=UPSTREAM_STREAM, help="upstream stream name")
    parser.add_argument("--from", dest="from_id", default="$", help="stream id to start after ($: now)")
    args = parser.parse_args()

    # SIGTERM ends the loop like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    r = redis.Redis.from_url(args.redis, decode_responses=True)
    last_id = start_id(r, args.stream, args.from_id)
    print(f"backend: reading {args.stream} after {last_id} on {args.redis}", flush=True)
    try:
        while True:
            try:
                batches = r.xread({args.stream: last_id}, block=5000, count=100)
            except redis.ConnectionError as e:
                # Redis restarting: try again shortly, from where we were.
                print(f"backend: redis unreachable ({e}); retrying", flush=True)
                time.sleep(1)
                continue
            for _stream, entries in batches or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    answer(r, fields)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
