// Shared by the k6 scenario scripts (fanout.js, topics.js, users.js, idle.js, storm.js): the
// same payload markers as the native generator (`lgts` send time, `lgn` number within the
// stream), per-connection accounting of missing and duplicated messages, and the metrics the
// thresholds look at.
//
// Environment (every script): BASE (gateway HOST:PORT, default 127.0.0.1:8080), COMPRESSION=1
// (offer permessage-deflate), SIZE (bytes of `data`, default 100), PREFIX (topic/user prefix,
// default k6-<random>).
import http from 'k6/http';
import { sleep } from 'k6';
import crypto from 'k6/crypto';
import encoding from 'k6/encoding';
import { Counter, Rate, Trend } from 'k6/metrics';

export const BASE = __ENV.BASE || '127.0.0.1:8080';
export const COMPRESSION = __ENV.COMPRESSION === '1';
export const SIZE = parseInt(__ENV.SIZE || '100', 10);
// The same prefix in every VU of one run (k6 evaluates init code once per VU).
export const PREFIX = __ENV.PREFIX || `k6-${Math.floor(Date.now() / 1000) % 100000}`;

export const latency = new Trend('ws_latency_ms', true);
export const received = new Counter('ws_received');
export const missing = new Counter('ws_missing');
export const duplicated = new Counter('ws_duplicated');
export const connectOk = new Rate('ws_connect_ok');
export const unexpectedClose = new Counter('ws_unexpected_close');
export const publishOk = new Rate('publish_ok');

// Publications stream s gets when `total` go round-robin over `streams` streams.
export function perStream(total, streams, s) {
  return Math.floor(total / streams) + (s < total % streams ? 1 : 0);
}

// `{"lgts":<ns>,"lgn":<n>,"pad":"xx.."}`, SIZE bytes.
export function payload(n) {
  const head = `{"lgts":${Date.now() * 1000000},"lgn":${n},"pad":"`;
  return `${head}${'x'.repeat(Math.max(0, SIZE - head.length - 2))}"}`;
}

const TS = /"lgts":(\d+)/;
const N = /"lgn":(\d+)/;

// Per-connection accounting: call `seen(raw)` on every message, `finish(expected)` at the end.
export function tracker() {
  const got = new Set();
  return {
    seen(raw) {
      const t = TS.exec(raw);
      const n = N.exec(raw);
      if (!t || !n) return false;
      latency.add(Date.now() - Number(t[1]) / 1e6);
      received.add(1);
      if (got.has(n[1])) duplicated.add(1);
      else got.add(n[1]);
      return true;
    },
    finish(expected) {
      missing.add(Math.max(0, expected - got.size));
    },
  };
}

export function wsParams() {
  return COMPRESSION ? { compression: 'deflate' } : {};
}

export function subscribeMessage(topic) {
  return JSON.stringify({ type: 'subscribe', id: 1, data: { topics: [topic] } });
}

const JSON_HEADERS = { headers: { 'Content-Type': 'application/json' } };

export function publish(topic, n) {
  const r = http.post(
    `http://${BASE}/api/publish`,
    `{"topic":"${topic}","type":"lg","data":${payload(n)}}`,
    JSON_HEADERS,
  );
  publishOk.add(r.status === 200);
}

export function sendToUser(user, n) {
  const r = http.post(
    `http://${BASE}/api/ws/send`,
    `{"type":"lg","to":"${user}","data":${payload(n)}}`,
    JSON_HEADERS,
  );
  publishOk.add(r.status === 200);
}

// An HS256 JWT with `sub` and `exp` (an hour from now).
export function jwt(secret, sub) {
  const b64 = (s) => encoding.b64encode(s, 'rawurl');
  const head = b64('{"alg":"HS256","typ":"JWT"}');
  const claims = b64(JSON.stringify({ sub, exp: Math.floor(Date.now() / 1000) + 3600 }));
  const sig = crypto.hmac('sha256', secret, `${head}.${claims}`, 'base64rawurl');
  return `${head}.${claims}.${sig}`;
}

// Publishes `total` messages round-robin over `streams` streams at `rate` per second.
export function paced(total, streams, rate, send) {
  const start = Date.now();
  for (let g = 0; g < total; g++) {
    const due = start + (g * 1000) / rate;
    const wait = due - Date.now();
    if (wait > 0) sleepMs(wait);
    send(g % streams, Math.floor(g / streams));
  }
}

function sleepMs(ms) {
  sleep(ms / 1000);
}

/** The options of a subscribers + one publisher run (fanout, topics, users): SUBSCRIBERS VUs
 * that subscribe and hold for `holdSeconds`, one publisher starting after 3 s, and the
 * thresholds every such run shares (p99 latency under LAT_P99_MS, else `defaultP99Ms`). */
export function subscribersAndPublisher(subscribers, holdSeconds, defaultP99Ms) {
  return {
    scenarios: {
      subscribers: {
        executor: 'per-vu-iterations', vus: subscribers, iterations: 1,
        exec: 'subscriber', maxDuration: `${holdSeconds + 30}s`,
      },
      publisher: {
        executor: 'per-vu-iterations', vus: 1, iterations: 1,
        exec: 'publisher', startTime: '3s', maxDuration: `${holdSeconds + 30}s`,
      },
    },
    thresholds: {
      ws_connect_ok: ['rate==1'],
      publish_ok: ['rate==1'],
      ws_missing: ['count==0'],
      ws_duplicated: ['count==0'],
      ws_latency_ms: [`p(99)<${__ENV.LAT_P99_MS || defaultP99Ms}`],
      checks: ['rate==1'],
    },
  };
}
