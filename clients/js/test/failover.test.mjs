// A gateway node dies while a steady stream is published: the client reconnects to another node,
// subscribes again with `since`, and the application sees every message exactly once, in order.
// Then the same for a node that hangs (SIGSTOP): only the missing pong tells, and the client
// moves on. And a drain (SIGTERM): the client comes back at once, without backing off.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { WsgateClient } from '../dist/index.js';
import { closeLater, publish, record, sleep, startGateway, stopAll, waitFor } from './harness.mjs';
import { TOPIC, TOTAL, assertExactlyOnceInOrder, clientOptions, runStream, startCluster } from './scenario.mjs';

after(stopAll);

describe('failover', () => {
  test('kill -9 and a frozen node mid-stream: every message exactly once, in order', async () => {
    const { nodes } = await startCluster(3);
    const client = closeLater(new WsgateClient({ ...clientOptions(nodes), WebSocket }));
    const seen = record(client, ['connected', 'disconnected', 'recovery', 'error']);
    const got = [];
    client.on('tick', (m) => got.push(m.data.i));
    await client.connect();
    const ack = await client.subscribe(TOPIC);
    assert.equal(ack.recovery[TOPIC].position, null, 'nothing published yet');

    await runStream({ nodes, currentNode: () => client.connection?.node ?? null });
    await waitFor(() => got.length >= TOTAL, `${TOTAL} messages (got ${got.length})`, 15000);
    await sleep(200); // a late duplicate would show now
    assertExactlyOnceInOrder(got);

    assert.deepEqual(
      seen.connected.map((c) => c.node),
      ['edge-1', 'edge-2', 'edge-3'],
    );
    assert.equal(seen.disconnected.length, 2);
    assert.equal(seen.disconnected[0].code, 1006, 'killed: no close frame');
    assert.match(seen.disconnected[1].reason, /heartbeat/);
    assert.ok(seen.disconnected.every((d) => d.willReconnect));
    assert.equal(seen.recovery.length, 2, 'recovered after each reconnect');
    for (const r of seen.recovery) {
      assert.equal(r.topic, TOPIC);
      assert.equal(r.recovered, true, JSON.stringify(r));
      assert.ok(r.since.seq > 0 && r.position.seq >= r.since.seq);
    }
    assert.equal(client.position(TOPIC).seq, TOTAL);
    assert.deepEqual(seen.error, []);
    await client.close();
  });

  test('drain (SIGTERM): an immediate, jittered reconnect to the other node, nothing lost', async () => {
    // --drain-seconds 0: the drain closes every connection at once.
    const { nodes } = await startCluster(2, ['--drain-seconds', '0']);
    const [a, b] = nodes;
    // A backoff that would show: the first retry after a failure waits 4-8 s.
    const client = closeLater(new WsgateClient({
      url: [a.url, b.url],
      WebSocket,
      reconnect: { minDelay: 8000, drainJitter: 300 },
    }));
    const seen = record(client, ['connected', 'disconnected', 'recovery']);
    const got = [];
    client.on('tick', (m) => got.push(m.data.i));
    await client.connect();
    await client.subscribe(TOPIC);
    const total = 100;
    let drainedAt = 0;
    for (let i = 1; i <= total; i++) {
      await publish(b, TOPIC, 'tick', { i });
      if (i === 40) {
        drainedAt = Date.now();
        a.signal('SIGTERM');
      }
      await sleep(10);
    }
    await waitFor(() => got.length >= total, `${total} messages (got ${got.length})`, 10000);
    await sleep(100);
    assert.deepEqual(
      got,
      Array.from({ length: total }, (_, k) => k + 1),
    );
    assert.deepEqual(
      seen.connected.map((c) => c.node),
      ['edge-1', 'edge-2'],
    );
    const d = seen.disconnected[0];
    assert.equal(d.code, 1001);
    assert.deepEqual({ code: d.notice.code, reconnect: d.notice.reconnect }, { code: 1001, reconnect: true });
    assert.ok(d.delay < 300, `reconnect delay ${d.delay} ms`);
    assert.equal(seen.recovery[0].recovered, true);
    assert.ok(seen.connected[1].serverTime - drainedAt < 2000, 'back within the jitter, not the backoff');
    await a.waitExit();
    await client.close();
  });

  test('backoff: attempts against dead addresses grow, are jittered and capped', async () => {
    const gw = await startGateway();
    const dead = gw.url;
    gw.kill();
    await gw.waitExit();
    const client = closeLater(new WsgateClient({
      url: dead,
      WebSocket,
      reconnect: { minDelay: 40, maxDelay: 300, factor: 2, jitter: 0.5, maxAttempts: 6 },
    }));
    const seen = record(client, ['disconnected']);
    await assert.rejects(client.connect(), { code: 'CLOSED' });
    const delays = seen.disconnected.filter((d) => d.willReconnect).map((d) => d.delay);
    assert.equal(delays.length, 6);
    const caps = [40, 80, 160, 300, 300, 300];
    delays.forEach((delay, k) => {
      assert.ok(delay >= caps[k] / 2 && delay <= caps[k], `attempt ${k}: ${delay} ms, cap ${caps[k]}`);
    });
    assert.equal(seen.disconnected.at(-1).willReconnect, false, 'gave up after maxAttempts');
  });
});
