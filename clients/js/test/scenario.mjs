// The failover scenario shared by the Node and the Chromium test: three gateway nodes on one
// Redis, a steady stream published on a topic through the HTTP API of the node that survives,
// and, mid-stream, the node the client is connected to killed with SIGKILL, then the next one
// frozen with SIGSTOP (its sockets stay open and silent: only the heartbeat can tell).

import assert from 'node:assert/strict';
import { publish, sleep, startGateway, startRedis, waitFor } from './harness.mjs';

export const TOPIC = 'ticker';
export const TOTAL = 300;
const KILL_AT = 80;
const FREEZE_AT = 190;
const EVERY_MS = 10;

/** Every node shares these: a 1 s heartbeat (so a frozen node is noticed quickly) and a
 * history that outlasts the outage. */
const CONFIG = [
  'websocket:',
  '  heartbeat_interval: 1s',
  'default_namespace:',
  '  history: { size: 1000, ttl: 5m }',
  '',
].join('\n');

/** Redis and `count` nodes edge-1, edge-2, ... on it, each with `args` too. */
export async function startCluster(count = 3, args = []) {
  const redis = await startRedis();
  const nodes = [];
  for (let i = 1; i <= count; i++) {
    nodes.push(await startGateway({ redisUrl: redis.url, nodeId: `edge-${i}`, config: CONFIG, args }));
  }
  return { redis, nodes };
}

/** The client settings both tests use: every node's URL, in order; quick reconnects; a pong
 * must come within a second. */
export function clientOptions(nodes) {
  return {
    url: nodes.map((n) => n.url),
    heartbeatTimeout: 1000,
    reconnect: { minDelay: 100, maxDelay: 1000 },
  };
}

/**
 * Publishes 1..TOTAL (`{i}` in `data`) through the third node, kills the node the client is on
 * at KILL_AT, and freezes the one it moved to at FREEZE_AT. `currentNode()` says which node the
 * client is connected to (null while it is not).
 */
export async function runStream({ nodes, currentNode, log = () => {} }) {
  const [a, b, c] = nodes;
  for (let i = 1; i <= TOTAL; i++) {
    await publish(c, TOPIC, 'tick', { i });
    if (i === KILL_AT) {
      assert.equal(await currentNode(), a.nodeId, 'the client starts on the first node');
      log(`kill -9 ${a.nodeId} after publication ${i}`);
      a.kill();
    }
    if (i === FREEZE_AT) {
      await waitFor(async () => (await currentNode()) === b.nodeId, `the client on ${b.nodeId}`, 5000);
      log(`kill -STOP ${b.nodeId} after publication ${i}`);
      b.freeze();
    }
    await sleep(EVERY_MS);
  }
  log(`published ${TOTAL}`);
}

/** What the application saw: every publication once, in order. */
export function assertExactlyOnceInOrder(got) {
  const expected = Array.from({ length: TOTAL }, (_, k) => k + 1);
  if (got.length !== TOTAL || got.some((v, k) => v !== k + 1)) {
    const dups = got.filter((v, k) => got.indexOf(v) !== k);
    const missing = expected.filter((v) => !got.includes(v));
    const disorder = got.findIndex((v, k) => k > 0 && v <= got[k - 1]);
    assert.fail(
      `expected 1..${TOTAL} once each in order; got ${got.length} messages, ` +
        `duplicates ${JSON.stringify(dups.slice(0, 10))}, missing ${JSON.stringify(missing.slice(0, 10))}, ` +
        `first out of order at index ${disorder}`,
    );
  }
}
