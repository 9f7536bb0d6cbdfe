// Tokens against a gateway with JWT auth on (`--jwt-secret`, leeway 0 so that a connection ends
// right at its token's `exp`): the client refreshes short-lived tokens from its provider before
// they run out and keeps its one connection; a refused token is final with a fixed token, and
// retried once with a fresh one from a provider.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';

import { WsgateClient, jwtExpiry } from '../dist/index.js';
import { closeLater, publish, record, signJwt, sleep, startGateway, stopAll, waitFor } from './harness.mjs';

after(stopAll);

const SECRET = 'test-secret-for-the-js-client';
const now = () => Math.floor(Date.now() / 1000);

describe('auth', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      args: ['--jwt-secret', SECRET],
      config: 'auth:\n  leeway: 0s\n',
    });
  });

  test('decodes exp client-side', () => {
    const token = signJwt({ sub: 'x', exp: 2000000000 }, SECRET);
    assert.equal(jwtExpiry(token), 2000000000 * 1000);
    assert.equal(jwtExpiry('not a jwt'), null);
  });

  test('refreshes a 2-second token before it runs out and keeps the connection', async () => {
    const calls = [];
    const provider = ({ reason }) => {
      calls.push(reason);
      return signJwt({ sub: 'alice', exp: now() + 2 }, SECRET);
    };
    const c = closeLater(new WsgateClient({ url: gw.url, WebSocket, token: provider, reconnect: { minDelay: 50 } }));
    const seen = record(c, ['refresh', 'disconnected', 'error']);
    const info = await c.connect();
    assert.equal(info.userId, 'alice', 'the user comes from the token');
    await c.subscribe('news');
    // Without a refresh the server ends the connection (4004) at exp, within 2 s.
    await sleep(5000);
    assert.deepEqual(seen.disconnected, [], 'the connection never ended');
    assert.deepEqual(seen.error, []);
    assert.equal(c.connection.connectionId, info.connectionId, 'still the first connection');
    assert.ok(seen.refresh.length >= 3, `refreshed ${seen.refresh.length} times`);
    for (const r of seen.refresh) assert.ok(r.expiresAt > Date.now() - 5000, 'ack carries expiresAt');
    assert.equal(calls[0], 'connect');
    assert.ok(calls.slice(1).every((r) => r === 'refresh'), calls.join(','));
    // Still delivering.
    const got = [];
    c.on('headline', (m) => got.push(m));
    await publish(gw, 'news', 'headline', { t: 'still here' });
    await waitFor(() => got.length === 1, 'a publication after the refreshes');
    await c.close();
  });

  test('without a provider the same short token ends the connection at exp (4004)', async () => {
    const token = signJwt({ sub: 'alice', exp: now() + 2 }, SECRET);
    const c = closeLater(new WsgateClient({ url: gw.url, WebSocket, token, reconnect: { minDelay: 50 } }));
    const seen = record(c, ['disconnected', 'refresh']);
    await c.connect();
    await waitFor(() => seen.disconnected.length > 0, 'the expiry', 5000);
    assert.equal(seen.disconnected[0].code, 4004);
    assert.equal(seen.disconnected[0].willReconnect, true, '4004 is retryable');
    // ... but the fixed token has expired: the next attempt is refused for good.
    await waitFor(() => c.state === 'closed', 'the refusal', 5000);
    assert.equal(seen.disconnected.at(-1).code, 4001);
    assert.equal(seen.refresh.length, 0);
  });

  test('a refused fixed token is final', async () => {
    const bad = signJwt({ sub: 'mallory', exp: now() + 60 }, 'wrong-secret');
    const c = closeLater(new WsgateClient({ url: gw.url, WebSocket, token: bad, reconnect: { minDelay: 50 } }));
    const seen = record(c, ['error', 'disconnected', 'state']);
    await assert.rejects(c.connect(), (e) => {
      assert.equal(e.code, 'CLOSED');
      assert.equal(e.details.code, 4001);
      return true;
    });
    assert.equal(seen.error[0].code, 'UNAUTHORIZED');
    assert.equal(seen.disconnected.length, 1);
    assert.equal(seen.disconnected[0].willReconnect, false);
    await sleep(300);
    assert.equal(c.state, 'closed');
    assert.equal(seen.state.filter((s) => s.state === 'connecting').length, 1, 'one attempt only');
  });

  test('a token provider is asked again after UNAUTHORIZED, once', async () => {
    const calls = [];
    let good = false;
    const c = closeLater(new WsgateClient({
      url: gw.url,
      WebSocket,
      token: ({ reason }) => {
        calls.push(reason);
        const secret = good || reason === 'unauthorized' ? SECRET : 'stale-secret';
        return signJwt({ sub: 'bob', exp: now() + 60 }, secret);
      },
      reconnect: { minDelay: 50 },
    }));
    const info = await c.connect();
    assert.equal(info.userId, 'bob');
    assert.deepEqual(calls, ['connect', 'unauthorized']);
    await c.close();

    // A provider whose fresh token is refused too: the second refusal in a row is final.
    const always = [];
    const d = closeLater(new WsgateClient({
      url: gw.url,
      WebSocket,
      token: ({ reason }) => {
        always.push(reason);
        return signJwt({ sub: 'bob', exp: now() + 60 }, 'stale-secret');
      },
      reconnect: { minDelay: 50 },
    }));
    await assert.rejects(d.connect(), { code: 'CLOSED' });
    assert.deepEqual(always, ['connect', 'unauthorized']);
    good = true;
  });
});
