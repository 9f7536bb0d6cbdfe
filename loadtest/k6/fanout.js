// k6 fan-out: SUBSCRIBERS virtual users hold one WebSocket each, subscribed to one topic; one
// publisher posts PUBLISHES messages at RATE per second through `POST /api/publish`. Every
// subscriber checks what it got: missing and duplicated messages (by the `lgn` number in the
// payload) and the publish-to-receive latency (from the `lgts` send time).
//
//   k6 run -e BASE=127.0.0.1:8080 -e SUBSCRIBERS=200 -e PUBLISHES=100 -e RATE=10 loadtest/k6/fanout.js
//   (+ -e COMPRESSION=1 to offer permessage-deflate, -e SIZE=1000 for larger payloads)
//
// Thresholds (k6 exits non-zero when one is crossed): every connect upgraded, every publish
// answered 200, nothing missing or duplicated, latency p99 under LAT_P99_MS (default 250).
// k6 spends far more CPU per connection than the gateway: for 10,000 connections use the
// native generator (`wsgate-loadgen run --scenario fanout`, loadtest/README.md).
import ws from 'k6/ws';
import { check } from 'k6';
import * as lib from './lib.js';

const TOPIC = __ENV.TOPIC || `${lib.PREFIX}-fanout`;
const SUBSCRIBERS = parseInt(__ENV.SUBSCRIBERS || '100', 10);
const PUBLISHES = parseInt(__ENV.PUBLISHES || '50', 10);
const RATE = parseFloat(__ENV.RATE || '10');
const HOLD_SECONDS = Math.ceil(PUBLISHES / RATE) + 6;

export const options = lib.subscribersAndPublisher(SUBSCRIBERS, HOLD_SECONDS, 250);

export function subscriber() {
  const t = lib.tracker();
  const res = ws.connect(`ws://${lib.BASE}/ws?user_id=${lib.PREFIX}-${__VU}`, lib.wsParams(), (socket) => {
    socket.on('open', () => socket.send(lib.subscribeMessage(TOPIC)));
    socket.on('message', (raw) => t.seen(raw));
    socket.on('close', () => {});
    socket.setTimeout(() => socket.close(), HOLD_SECONDS * 1000);
  });
  lib.connectOk.add(res && res.status === 101);
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
  t.finish(PUBLISHES);
}

export function publisher() {
  lib.paced(PUBLISHES, 1, RATE, (_s, n) => lib.publish(TOPIC, n));
}
