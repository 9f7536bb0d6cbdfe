// k6 fan-out load: SUBSCRIBERS virtual users hold one WebSocket each on TOPIC and count what they
// receive, while one publisher posts PUBLISHES messages through the HTTP API.
//
//   k6 run -e BASE=127.0.0.1:8080 -e SUBSCRIBERS=200 -e PUBLISHES=100 loadtest/k6/fanout.js
//
// Reports `ws_publications_received` (count) and `ws_connect_ok` (rate); compare runs against a
// baseline measured in the same session (see PERF notes), never against absolute numbers.
import ws from 'k6/ws';
import http from 'k6/http';
import { check, sleep } from 'k6';
import { Counter, Rate } from 'k6/metrics';

const BASE = __ENV.BASE || '127.0.0.1:8080';
const TOPIC = __ENV.TOPIC || 'loadtest';
const SUBSCRIBERS = parseInt(__ENV.SUBSCRIBERS || '100', 10);
const PUBLISHES = parseInt(__ENV.PUBLISHES || '50', 10);
const HOLD_SECONDS = parseInt(__ENV.HOLD_SECONDS || '10', 10);

const received = new Counter('ws_publications_received');
const connectOk = new Rate('ws_connect_ok');

export const options = {
  scenarios: {
    subscribers: {
      executor: 'per-vu-iterations', vus: SUBSCRIBERS, iterations: 1,
      exec: 'subscriber', maxDuration: `${HOLD_SECONDS + 30}s`,
    },
    publisher: {
      executor: 'per-vu-iterations', vus: 1, iterations: 1,
      exec: 'publisher', startTime: '2s', maxDuration: `${HOLD_SECONDS + 30}s`,
    },
  },
};

export function subscriber() {
  const res = ws.connect(`ws://${BASE}/ws?user_id=k6-${__VU}`, {}, (socket) => {
    socket.on('open', () => {
      socket.send(JSON.stringify({ type: 'subscribe', id: 's', data: { topics: [TOPIC] } }));
    });
    socket.on('message', (raw) => {
      const msg = JSON.parse(raw);
      if (msg.topic === TOPIC) received.add(1);
    });
    socket.setTimeout(() => socket.close(), HOLD_SECONDS * 1000);
  });
  connectOk.add(res && res.status === 101);
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
}

export function publisher() {
  for (let i = 0; i < PUBLISHES; i++) {
    const r = http.post(`http://${BASE}/api/publish`,
      JSON.stringify({ topic: TOPIC, type: 'load', data: { i } }),
      { headers: { 'Content-Type': 'application/json' } });
    check(r, { 'published (200)': (x) => x.status === 200 });
    sleep(0.05);
  }
}
