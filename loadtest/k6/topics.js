// k6, many topics: SUBSCRIBERS virtual users, each subscribed to a topic of its own; one
// publisher posts PUBLISHES messages round-robin over those topics at RATE per second. Checks
// missing/duplicated messages per connection and publish-to-receive latency.
//
//   k6 run -e BASE=127.0.0.1:8080 -e SUBSCRIBERS=200 -e PUBLISHES=2000 -e RATE=200 loadtest/k6/topics.js
//
// Thresholds: every connect upgraded, every publish 200, nothing missing or duplicated, latency
// p99 under LAT_P99_MS (default 50).
import ws from 'k6/ws';
import { check } from 'k6';
import * as lib from './lib.js';

const SUBSCRIBERS = parseInt(__ENV.SUBSCRIBERS || '100', 10);
const PUBLISHES = parseInt(__ENV.PUBLISHES || '1000', 10);
const RATE = parseFloat(__ENV.RATE || '100');
const HOLD_SECONDS = Math.ceil(PUBLISHES / RATE) + 6;
const topic = (s) => `${lib.PREFIX}-t${s}`;

export const options = lib.subscribersAndPublisher(SUBSCRIBERS, HOLD_SECONDS, 50);

export function subscriber() {
  const s = __VU - 1; // VUs are numbered from 1 within the run
  const t = lib.tracker();
  const res = ws.connect(`ws://${lib.BASE}/ws?user_id=${lib.PREFIX}-${__VU}`, lib.wsParams(), (socket) => {
    socket.on('open', () => socket.send(lib.subscribeMessage(topic(s))));
    socket.on('message', (raw) => t.seen(raw));
    socket.setTimeout(() => socket.close(), HOLD_SECONDS * 1000);
  });
  lib.connectOk.add(res && res.status === 101);
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
  t.finish(lib.perStream(PUBLISHES, SUBSCRIBERS, s));
}

export function publisher() {
  lib.paced(PUBLISHES, SUBSCRIBERS, RATE, (s, n) => lib.publish(topic(s), n));
}
