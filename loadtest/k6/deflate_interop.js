// permessage-deflate interoperability with k6 (its WebSocket client is Go's gorilla/websocket):
// one connection with `compression: 'deflate'`, both directions compressed.
//
//   k6 run -e BASE=127.0.0.1:8080 loadtest/k6/deflate_interop.js
//
// BASE is the gateway (HTTP API and WebSocket); WS_BASE, when set, is where the WebSocket goes
// instead (`tests/interop_k6.rs` runs the script against the real binary on a free port, with
// the WebSocket through a relay that records the frames as they cross the wire).
//
// What it checks, each as a k6 `check` (the `checks` threshold requires all of them to pass, so
// k6 exits non-zero on any failure):
// - the upgrade answered 101 with `Sec-WebSocket-Extensions: permessage-deflate...`;
// - server to client: a ~4 KB publication posted through `POST /api/publish` arrives intact on
//   the subscribed socket (the gateway compresses it: it is over the 256-byte threshold);
// - client to server: a ~4 KB `ping` (padded with an unknown field) is inflated by the gateway and
//   answered with a `pong` carrying `requestId` `p1`.
// k6's byte counters prove that compression really happened on the wire, both ways (thresholds
// on `data_received` and `data_sent`: see `options`).
import ws from 'k6/ws';
import http from 'k6/http';
import { check, fail } from 'k6';
import { Counter } from 'k6/metrics';

const BASE = __ENV.BASE || '127.0.0.1:8080';
const WS_BASE = __ENV.WS_BASE || BASE;
const TOPIC = __ENV.TOPIC || 'k6-deflate';
// ~4 KB of JSON that compresses well (repeated structure, like real telemetry).
const PAD = 'abcdefgh-0123456789-'.repeat(205); // 4,100 bytes
const PUBLISHED = {
  kind: 'telemetry',
  rows: Array.from({ length: 40 }, (_, i) => ({ i, status: 'ACTIVE', note: 'lorem ipsum dolor' })),
  pad: PAD.slice(0, 1500),
};
const PUBLISHED_TEXT = JSON.stringify(PUBLISHED);
const PING_TEXT = JSON.stringify({ type: 'ping', id: 'p1', pad: PAD });
const PUBLISH_BODY = JSON.stringify({ topic: TOPIC, type: 'telemetry', data: PUBLISHED });

// Bytes of every text message the socket received (decompressed, as the script sees them).
const wsTextIn = new Counter('ws_text_bytes_in');

export const options = {
  vus: 1,
  iterations: 1,
  thresholds: {
    // Every check must pass; a single failure makes `k6 run` exit non-zero (code 99).
    checks: ['rate==1.0'],
    // All that k6 sends: the upgrade request, the ping frame, the (never compressed) HTTP
    // publish request. With the ping sent uncompressed this is over PUBLISH_BODY + 4,100 bytes;
    // compressed, the ping frame plus the upgrade and the HTTP headers take well under 1,500.
    data_sent: [`count<${PUBLISH_BODY.length + 1500}`],
    // All that k6 receives: the 101 response, the `connection` message, the pong, the HTTP
    // response and the publication. The publication alone is over 3,600 bytes uncompressed.
    data_received: [`count<${PUBLISHED_TEXT.length}`],
  },
};

export default function () {
  if (PING_TEXT.length < 4000 || PUBLISHED_TEXT.length < 3000) {
    fail(`payloads too small: ping ${PING_TEXT.length}, publication ${PUBLISHED_TEXT.length}`);
  }
  let gotPublication = false;
  let gotPong = false;
  let published = false;
  const url = `ws://${WS_BASE}/ws?clientId=k6-deflate&subscriptions=${TOPIC}`;

  const res = ws.connect(url, { compression: 'deflate' }, (socket) => {
    socket.on('message', (raw) => {
      wsTextIn.add(raw.length);
      let msg;
      try {
        msg = JSON.parse(raw);
      } catch (e) {
        check(raw, { 'every message is JSON': () => false });
        socket.close();
        return;
      }
      if (msg.type === 'connection' && !published) {
        published = true;
        check(msg, {
          'subscribed at connect': (m) => (m.data.subscriptions || []).includes(TOPIC),
        });
        // Client to server: a large message the gateway must inflate.
        socket.send(PING_TEXT);
        // Server to client: a large publication, published over HTTP.
        const r = http.post(
          `http://${BASE}/api/publish`,
          PUBLISH_BODY,
          { headers: { 'Content-Type': 'application/json' } },
        );
        check(r, { 'publish answered 200': (x) => x.status === 200 });
      } else if (msg.type === 'pong') {
        gotPong = check(msg, {
          'pong answers the 4 KB ping (requestId p1)': (m) => m.data && m.data.requestId === 'p1',
        });
      } else if (msg.topic === TOPIC) {
        gotPublication = check(msg, {
          'publication arrives intact': (m) =>
            m.type === 'telemetry' && JSON.stringify(m.data) === PUBLISHED_TEXT,
        });
      } else if (msg.type === 'error') {
        check(msg, { 'no error message': () => false });
        console.error(`gateway sent an error: ${raw}`);
      }
      if (gotPong && gotPublication) socket.close();
    });
    socket.on('error', (e) => {
      check(e, { 'no socket error': () => false });
      console.error(`socket error: ${e.error()}`);
    });
    socket.setTimeout(() => {
      console.error(`timed out: pong=${gotPong} publication=${gotPublication}`);
      socket.close();
    }, 10000);
  });

  const ext = (res && res.headers && (res.headers['Sec-Websocket-Extensions'] || '')) || '';
  console.log(`negotiated: ${ext}`);
  check(res, {
    'upgraded (101)': (r) => r && r.status === 101,
    'permessage-deflate negotiated': () => ext.toLowerCase().startsWith('permessage-deflate'),
  });
  check(null, {
    'pong received': () => gotPong,
    'publication received': () => gotPublication,
  });
}

export function handleSummary(data) {
  const m = data.metrics;
  const val = (name, key) => (m[name] ? m[name].values[key] : undefined);
  const lines = [
    `checks passed: ${val('checks', 'passes')}, failed: ${val('checks', 'fails')}`,
    `data_sent: ${val('data_sent', 'count')} bytes (limit ${PUBLISH_BODY.length + 1500};` +
      ` uncompressed ping ${PING_TEXT.length}, HTTP publish body ${PUBLISH_BODY.length})`,
    `data_received: ${val('data_received', 'count')} bytes (limit ${PUBLISHED_TEXT.length})`,
    `text received after inflation: ${val('ws_text_bytes_in', 'count')} bytes` +
      ` (publication data: ${PUBLISHED_TEXT.length})`,
  ];
  for (const [name, metric] of Object.entries(m)) {
    for (const [rule, result] of Object.entries(metric.thresholds || {})) {
      lines.push(`threshold ${name} ${rule}: ${result.ok ? 'ok' : 'CROSSED'}`);
    }
  }
  return { stdout: `${lines.join('\n')}\n` };
}
