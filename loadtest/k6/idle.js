// k6, idle connections: CONNECTIONS virtual users connect (ramping over RAMP_SECONDS), subscribe
// to one topic, and hold their connection quietly for HOLD_SECONDS (answering the server's pings,
// which k6 does by itself). Watch the gateway's RSS meanwhile (loadtest/README.md; the native
// generator's `--scenario idle` reads it for you).
//
//   k6 run -e BASE=127.0.0.1:8080 -e CONNECTIONS=500 -e HOLD_SECONDS=30 loadtest/k6/idle.js
//
// Thresholds: every connect upgraded and subscribed; no connection closed by the server while
// held (ws_unexpected_close).
import ws from 'k6/ws';
import { check, sleep } from 'k6';
import { Rate } from 'k6/metrics';
import * as lib from './lib.js';

const CONNECTIONS = parseInt(__ENV.CONNECTIONS || '200', 10);
const HOLD_SECONDS = parseInt(__ENV.HOLD_SECONDS || '20', 10);
const RAMP_SECONDS = parseInt(__ENV.RAMP_SECONDS || '5', 10);
const TOPIC = `${lib.PREFIX}-idle`;
const subscribed = new Rate('ws_subscribed');

export const options = {
  scenarios: {
    idle: {
      executor: 'per-vu-iterations', vus: CONNECTIONS, iterations: 1,
      maxDuration: `${HOLD_SECONDS + RAMP_SECONDS + 30}s`,
    },
  },
  thresholds: {
    ws_connect_ok: ['rate==1'],
    ws_subscribed: ['rate==1'],
    ws_unexpected_close: ['count==0'],
    checks: ['rate==1'],
  },
};

export default function () {
  // Spread the connects over the ramp.
  const delay = ((__VU - 1) / CONNECTIONS) * RAMP_SECONDS;
  let acked = false;
  let closing = false;
  sleep(delay);
  const res = ws.connect(`ws://${lib.BASE}/ws?user_id=${lib.PREFIX}-${__VU}`, lib.wsParams(), (socket) => {
    socket.on('open', () => socket.send(lib.subscribeMessage(TOPIC)));
    socket.on('message', (raw) => {
      if (raw.indexOf('"type":"ack"') >= 0) acked = true;
    });
    socket.on('close', () => {
      if (!closing) lib.unexpectedClose.add(1);
    });
    socket.setTimeout(() => {
      closing = true;
      socket.close();
    }, (HOLD_SECONDS + RAMP_SECONDS - delay) * 1000);
  });
  lib.connectOk.add(res && res.status === 101);
  subscribed.add(acked);
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
}
