// Request/response through a backend: a node with the Redis broker forwards the client's
// `config_get` over the `wsgate:upstream` stream to examples/backend.py, which answers the
// connection on its node's channel with `data.requestId`; `request()` resolves with that answer.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { WsgateClient } from '../dist/index.js';
import { closeLater, startBackend, startGateway, startRedis, stopAll } from './harness.mjs';

after(stopAll);

describe('request/response through examples/backend.py', () => {
  let gw;
  before(async () => {
    const redis = await startRedis();
    gw = await startGateway({ redisUrl: redis.url, nodeId: 'edge-backend' });
    await startBackend(redis.url);
  });

  test('config_get is answered by the backend, matched by request id', async () => {
    const c = closeLater(new WsgateClient({ url: gw.url, WebSocket, userId: 'alice' }));
    await c.connect();
    const reply = await c.request('config_get', { configType: 'route_config' }, { timeout: 5000 });
    assert.equal(reply.type, 'config');
    assert.equal(reply.data.config.user, 'alice');
    assert.equal(reply.data.config.refreshSeconds, 30);
    assert.ok(typeof reply.data.requestId === 'string');

    // Several at once: each gets its own answer.
    const replies = await Promise.all(Array.from({ length: 5 }, () => c.request('config_get', {})));
    const ids = new Set(replies.map((r) => r.data.requestId));
    assert.equal(ids.size, 5);
    assert.ok(replies.every((r) => r.type === 'config'));
    await c.close();
  });

  test('a type no backend answers times out', async () => {
    const c = closeLater(new WsgateClient({ url: gw.url, WebSocket, userId: 'alice' }));
    await c.connect();
    const started = Date.now();
    await assert.rejects(c.request('route_create', { route: { id: 'r1' } }, { timeout: 400 }), { code: 'TIMEOUT' });
    assert.ok(Date.now() - started >= 380);
    await c.close();
  });
});
