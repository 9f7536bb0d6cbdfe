// k6, connect storm with JWTs: new connections arrive at RATE per second for SECONDS (k6's
// constant-arrival-rate), each with its own HS256 token (`sub` k6-..-<n>, `exp` in an hour) in
// the `token` query parameter, waits for the `connection` message and leaves. The gateway must
// run with the same secret (`wsgate --jwt-secret SECRET`).
//
//   k6 run -e BASE=127.0.0.1:8080 -e JWT_SECRET=s3cret -e RATE=200 -e SECONDS=20 loadtest/k6/storm.js
//
// Thresholds: at least 99.9 % of connects accepted (`connection` message received), the
// upgrade-to-`connection` time p99 under CONNECT_P99_MS (default 200), no dropped iterations
// (k6 had the VUs to keep the rate).
import ws from 'k6/ws';
import { check } from 'k6';
import { Trend } from 'k6/metrics';
import * as lib from './lib.js';

const SECRET = __ENV.JWT_SECRET || 's3cret';
const RATE = parseInt(__ENV.RATE || '100', 10);
const SECONDS = parseInt(__ENV.SECONDS || '10', 10);
const accepted = new Trend('ws_accept_ms', true);

export const options = {
  scenarios: {
    storm: {
      executor: 'constant-arrival-rate', rate: RATE, timeUnit: '1s',
      duration: `${SECONDS}s`, preAllocatedVUs: Math.max(10, RATE), maxVUs: RATE * 4,
    },
  },
  thresholds: {
    ws_connect_ok: ['rate>0.999'],
    ws_accept_ms: [`p(99)<${__ENV.CONNECT_P99_MS || 200}`],
    dropped_iterations: ['count==0'],
  },
};

export default function () {
  const sub = `${lib.PREFIX}-${__VU}-${__ITER}`;
  const token = lib.jwt(SECRET, sub);
  const start = Date.now();
  let ok = false;
  const res = ws.connect(`ws://${lib.BASE}/ws?token=${token}`, lib.wsParams(), (socket) => {
    socket.on('message', (raw) => {
      if (raw.indexOf('"type":"connection"') >= 0) {
        ok = true;
        accepted.add(Date.now() - start);
      }
      socket.close();
    });
    socket.setTimeout(() => socket.close(), 5000);
  });
  lib.connectOk.add(ok);
  check(res, { 'upgraded (101)': (r) => r && r.status === 101 });
}
