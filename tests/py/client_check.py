#!/usr/bin/env python3
"""An independent client for wsgate: Python `websockets` against a running gateway.

    python3 tests/py/client_check.py ws://127.0.0.1:PORT

Checks the connection message, ping/pong, subscribe + a publication published over HTTP,
an invalid-JSON error, and a direct message to itself; then permessage-deflate both ways (the
gateway must run with `namespaces: {chat: {client_publish: true}}`): the negotiated extension,
a large publication that arrives compressed (and equal to what a client without compression
gets), and large client messages (whole and fragmented) that websockets compresses and the
gateway must inflate. Prints what it checked; on the first mismatch prints what was expected and
what arrived, and exits 1. tests/python_client.rs runs it against the real binary.
"""

import asyncio
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

try:
    import websockets
except ImportError:
    print(
        "client_check.py: the Python package `websockets` is missing; "
        "run ./scripts/test (it installs it) or: python3 -m pip install websockets",
        file=sys.stderr,
    )
    sys.exit(1)

# How long to wait for one expected message.
WAIT = 5.0

# What the gateway answers to an offer it accepts (src/ws/deflate.rs RESPONSE).
DEFLATE_RESPONSE = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"

# Frames with RSV1 (compressed) that websockets inflated / produced, counted by wrapping its
# permessage-deflate extension: the proof that data crossed the wire compressed.
RSV1_IN = []
RSV1_OUT = []


def count_compressed_frames():
    from websockets.extensions import permessage_deflate as pmd

    decode, encode = pmd.PerMessageDeflate.decode, pmd.PerMessageDeflate.encode

    def counting_decode(self, frame, *args, **kwargs):
        if frame.rsv1:
            RSV1_IN.append(len(frame.data))
        return decode(self, frame, *args, **kwargs)

    def counting_encode(self, frame, *args, **kwargs):
        out = encode(self, frame, *args, **kwargs)
        if out.rsv1:
            RSV1_OUT.append(len(out.data))
        return out

    pmd.PerMessageDeflate.decode = counting_decode
    pmd.PerMessageDeflate.encode = counting_encode


class Mismatch(Exception):
    """A check failed; the message says what was expected and what arrived."""


def check(cond, what, got=None):
    if cond:
        return
    if got is None:
        raise Mismatch(what)
    shown = got if isinstance(got, str) else json.dumps(got)
    raise Mismatch(f"{what}\n  got: {shown}")


async def recv_json(ws, what):
    """The next text message as JSON, or a Mismatch naming what we waited for."""
    try:
        raw = await asyncio.wait_for(ws.recv(), WAIT)
    except asyncio.TimeoutError:
        raise Mismatch(f"timed out after {WAIT}s waiting for {what}") from None
    except websockets.ConnectionClosed as e:
        raise Mismatch(f"connection closed while waiting for {what}: {e}") from None
    check(isinstance(raw, str), f"{what}: expected a text message", repr(raw))
    try:
        msg = json.loads(raw)
    except ValueError:
        raise Mismatch(f"{what}: not JSON: {raw!r}") from None
    check(isinstance(msg, dict), f"{what}: expected a JSON object", msg)
    return msg


async def expect_type(ws, kind, what):
    msg = await recv_json(ws, what)
    check(msg.get("type") == kind, f"{what}: expected type {kind!r}", msg)
    check(isinstance(msg.get("id"), str) and msg["id"], f"{what}: server messages carry an id", msg)
    check(isinstance(msg.get("timestamp"), str) and msg["timestamp"].endswith("Z"),
          f"{what}: server messages carry an RFC 3339 UTC timestamp", msg)
    return msg


def http_post(base, path, body):
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


async def run(ws_base):
    parsed = urllib.parse.urlparse(ws_base)
    http_base = f"http://{parsed.netloc}"
    url = f"{ws_base}/ws?user_id=py1&clientId=pyc"

    async with websockets.connect(url, open_timeout=WAIT) as ws:
        # 1. The connection message.
        hello = await expect_type(ws, "connection", "the connection message")
        data = hello.get("data") or {}
        check(data.get("status") == "connected", "connection.data.status == 'connected'", hello)
        check(data.get("clientId") == "pyc", "connection.data.clientId == 'pyc'", hello)
        check(data.get("userId") == "py1", "connection.data.userId == 'py1'", hello)
        check(isinstance(data.get("node"), str) and data["node"], "connection.data.node is a name", hello)
        check(isinstance(data.get("serverTime"), int), "connection.data.serverTime is ms", hello)
        check(isinstance(data.get("heartbeatInterval"), int) and data["heartbeatInterval"] > 0,
              "connection.data.heartbeatInterval is positive ms", hello)
        check(data.get("subscriptions") == [], "connection.data.subscriptions is []", hello)
        print("ok: connection message")

        # 2. ping -> pong with requestId.
        await ws.send(json.dumps({"type": "ping", "id": "p-1"}))
        pong = await expect_type(ws, "pong", "pong")
        check(pong["data"].get("requestId") == "p-1", "pong.data.requestId == 'p-1'", pong)
        print("ok: ping -> pong")

        # 3. subscribe -> ack.
        await ws.send(json.dumps({"type": "subscribe", "id": "s-1", "data": {"topics": ["news"]}}))
        ack = await expect_type(ws, "ack", "subscribe ack")
        check(ack["data"].get("requestId") == "s-1", "ack.data.requestId == 's-1'", ack)
        check(ack["data"].get("action") == "subscribe", "ack.data.action == 'subscribe'", ack)
        check(ack["data"].get("topics") == ["news"], "ack.data.topics == ['news']", ack)
        print("ok: subscribe -> ack")

        # 4. HTTP publish -> publication.
        payload = {"title": "hello from python", "n": 1}
        status, body = http_post(http_base, "/api/publish",
                                 {"topic": "news", "type": "headline", "data": payload})
        check(status == 200, "POST /api/publish answers 200", f"{status} {body}")
        check(isinstance(body, dict) and body.get("ok") is True and body.get("seq") == 1,
              "POST /api/publish answers ok with seq 1", body)
        pub = await expect_type(ws, "headline", "the publication")
        check(pub.get("topic") == "news", "publication.topic == 'news'", pub)
        check(pub.get("seq") == 1, "publication.seq == 1", pub)
        check(pub.get("epoch") == body.get("epoch") and isinstance(pub.get("epoch"), str),
              "publication.epoch matches the publish answer", pub)
        check(pub.get("data") == payload, "publication.data is what was published", pub)
        print("ok: HTTP publish -> publication")

        # 5. Invalid JSON -> error, connection stays.
        await ws.send("{this is not json")
        err = await expect_type(ws, "error", "error for invalid JSON")
        check(err["data"].get("code") == "INVALID_MESSAGE_FORMAT",
              "error.data.code == 'INVALID_MESSAGE_FORMAT'", err)
        check(err["data"].get("numericCode") == 2000, "error.data.numericCode == 2000", err)
        check(isinstance(err["data"].get("message"), str) and err["data"]["message"],
              "error.data.message says why", err)
        print("ok: invalid JSON -> INVALID_MESSAGE_FORMAT")

        # 6. Direct message to itself: arrives with from set by the server; then the ack.
        await ws.send(json.dumps({"type": "chat", "id": "d-1", "to": "py1",
                                  "from": "someone-else", "data": {"text": "note to self"}}))
        got = {}
        for _ in range(2):
            msg = await recv_json(ws, "the direct message and its ack")
            got[msg.get("type")] = msg
        chat = got.get("chat")
        check(chat is not None, "a `chat` message arrives", list(got.values()))
        check(chat.get("from") == "py1", "direct message from == 'py1' (set by the server)", chat)
        check(chat.get("to") == "py1", "direct message to == 'py1'", chat)
        check(chat.get("data") == {"text": "note to self"}, "direct message data as sent", chat)
        dack = got.get("ack")
        check(dack is not None and dack["data"].get("requestId") == "d-1",
              "the direct message is acked with requestId 'd-1'", list(got.values()))
        print("ok: direct message to self")

        # 7. The connection is still usable after all that.
        await ws.send(json.dumps({"type": "ping", "messageId": "p-2"}))
        pong = await expect_type(ws, "pong", "pong after the error")
        check(pong["data"].get("requestId") == "p-2", "messageId is echoed as requestId", pong)
        print("ok: connection still open; messageId alias")

    await check_compression(ws_base, http_base)


def extensions_of(ws):
    return ws.response.headers.get("Sec-WebSocket-Extensions")


async def check_compression(ws_base, http_base):
    """permessage-deflate both ways, next to a client that does not compress."""
    deflate_url = f"{ws_base}/ws?user_id=pyz&clientId=pyz"
    plain_url = f"{ws_base}/ws?user_id=pyp&clientId=pyp"
    async with websockets.connect(deflate_url, open_timeout=WAIT) as ws, \
            websockets.connect(plain_url, open_timeout=WAIT, compression=None) as plain:
        # 8. Negotiation: websockets offers `permessage-deflate; client_max_window_bits`.
        check(extensions_of(ws) == DEFLATE_RESPONSE,
              f"Sec-WebSocket-Extensions == {DEFLATE_RESPONSE!r}", str(extensions_of(ws)))
        check(extensions_of(plain) is None,
              "no Sec-WebSocket-Extensions without an offer", str(extensions_of(plain)))
        await expect_type(ws, "connection", "the deflate client's connection message")
        await expect_type(plain, "connection", "the plain client's connection message")
        print("ok: permessage-deflate negotiated (and not without an offer)")

        # 9. A large publication: compressed to the deflate client, plain to the other; the
        #    same message either way.
        for c, who in ((ws, "deflate"), (plain, "plain")):
            await c.send(json.dumps({"type": "subscribe", "id": "zs", "data": {"topics": ["big"]}}))
            await expect_type(c, "ack", f"the {who} client's subscribe ack")
        rows = [{"route": f"r-{i}", "status": "ACTIVE", "eta": i * 7} for i in range(400)]
        status, body = http_post(http_base, "/api/publish",
                                 {"topic": "big", "type": "routes", "data": {"rows": rows}})
        check(status == 200, "POST /api/publish of a large message answers 200", f"{status} {body}")
        got_deflate = await expect_type(ws, "routes", "the large publication (deflate client)")
        got_plain = await expect_type(plain, "routes", "the large publication (plain client)")
        check(got_deflate["data"] == {"rows": rows}, "the large publication inflates intact",
              json.dumps(got_deflate)[:300])
        check(got_deflate == got_plain, "both clients get the same message", got_plain)
        size = len(json.dumps(got_plain))
        check(any(n < size // 2 for n in RSV1_IN),
              f"the {size}-byte publication arrived as a compressed (RSV1) frame",
              f"compressed frames received: {RSV1_IN}")
        print(f"ok: large publication ({size} bytes) arrived compressed ({RSV1_IN[-1]} bytes)")

        # 10. A large client message (websockets compresses every message): a padded ping.
        sent_before = len(RSV1_OUT)
        await ws.send(json.dumps({"type": "ping", "id": "zp", "pad": "x" * 10_000}))
        check(len(RSV1_OUT) > sent_before, "websockets sent the ping compressed", RSV1_OUT)
        pong = await expect_type(ws, "pong", "pong to a compressed 10 KB ping")
        check(pong["data"].get("requestId") == "zp", "pong.data.requestId == 'zp'", pong)
        print("ok: compressed 10 KB ping -> pong")

        # 11. A client publish with a 10 KB payload, compressed, sent as three fragments: acked,
        #     and the publication comes back (compressed) to both subscribers.
        for c, who in ((ws, "deflate"), (plain, "plain")):
            await c.send(json.dumps({"type": "subscribe", "id": "zc",
                                     "data": {"topics": ["chat:room"]}}))
            await expect_type(c, "ack", f"the {who} client's chat subscribe ack")
        text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                       for i in range(200))[:10_000]
        message = json.dumps({"type": "publish", "id": "zpub", "topic": "chat:room",
                              "data": {"text": text}})
        third = len(message) // 3
        sent_before = len(RSV1_OUT)
        await ws.send([message[:third], message[third:2 * third], message[2 * third:]])
        check(len(RSV1_OUT) == sent_before + 1,
              "websockets sent the message compressed, RSV1 on its first fragment only", RSV1_OUT)
        got = {}
        for _ in range(2):
            msg = await recv_json(ws, "the publish ack and the publication")
            got[msg.get("type")] = msg
        ack = got.get("ack")
        check(ack is not None and ack["data"].get("requestId") == "zpub"
              and ack["data"].get("action") == "publish",
              "the compressed, fragmented publish is acked", list(got.values()))
        echoed = got.get("message")
        check(echoed is not None and echoed.get("data") == {"text": text},
              "the 10 KB publication comes back intact", list(got.values()))
        other = await expect_type(plain, "message", "the 10 KB publication (plain client)")
        check(other == echoed, "the plain client gets the same publication", other)
        print("ok: compressed, fragmented 10 KB publish -> ack and publication to both clients")


def main():
    if len(sys.argv) != 2:
        print("usage: client_check.py ws://HOST:PORT", file=sys.stderr)
        sys.exit(2)
    base = sys.argv[1].rstrip("/")
    count_compressed_frames()
    try:
        asyncio.run(run(base))
    except Mismatch as e:
        print(f"client_check.py: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except (OSError, websockets.WebSocketException) as e:
        print(f"client_check.py: FAILED: cannot talk to {base}: {e!r}", file=sys.stderr)
        sys.exit(1)
    print("client_check.py: all checks passed")


if __name__ == "__main__":
    main()
