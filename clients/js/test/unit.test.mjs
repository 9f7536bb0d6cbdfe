// The client against a scripted fake socket, for what a healthy gateway rarely shows: a gap in
// a live stream, a publish cut off by a reconnect, the close-code table, a refused recovery, a
// server that stops answering pings, a backend answer that overtakes the gateway's ack.

import { after, afterEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';

import { FINAL_CLOSE_CODES, WsgateClient } from '../dist/index.js';
import { closeLater, sleep, stopAll, waitFor } from './harness.mjs';

after(stopAll);

/** A WebSocket whose server side is the test. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
    setTimeout(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen?.({});
    }, 0);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000, reason = '') {
    if (this.readyState >= 2) return;
    this.readyState = 3;
    setTimeout(() => this.onclose?.({ code, reason }), 0);
  }
  // The server's side.
  deliver(message) {
    this.onmessage?.({ data: JSON.stringify(message) });
  }
  hello(node = 'fake-1', heartbeatInterval = 25000) {
    this.deliver({
      type: 'connection',
      data: { status: 'connected', connectionId: FakeSocket.all.length, clientId: 'c', userId: null, node, heartbeatInterval, subscriptions: [] },
    });
  }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  last(type) {
    return this.sent.filter((m) => m.type === type).at(-1);
  }
  ack(request, data = {}) {
    this.deliver({ type: 'ack', data: { ...data, requestId: request.id } });
  }
}

const latest = () => FakeSocket.all.at(-1);
const claimed = new Set();
/** The next open socket no test has taken yet. */
const open = () =>
  waitFor(() => {
    const s = FakeSocket.all.find((x) => x.readyState === 1 && !claimed.has(x));
    if (s) claimed.add(s);
    return s;
  }, 'a new open socket');

// Each test's clients are closed after it, so that none reconnects into the next test.
let made = [];
afterEach(async () => {
  await Promise.all(made.map((c) => c.close()));
  made = [];
});

function make(options) {
  const c = closeLater(new WsgateClient({ WebSocket: FakeSocket, ...options }));
  made.push(c);
  return c;
}

function fake(options = {}) {
  return make({ url: 'ws://fake/ws', reconnect: { minDelay: 10, maxDelay: 20 }, ...options });
}

const pub = (topic, seq, extra = {}) => ({ type: 'tick', id: `e:${seq}`, topic, seq, epoch: 'e', data: { seq }, ...extra });

describe('with a fake server', { timeout: 10000 }, () => {
  test('a gap in a live stream: subscribe again with since, hold later ones, no duplicate', async () => {
    const c = fake();
    const got = [];
    c.on('tick', (m) => got.push(m.seq));
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const s = latest();
    const subscribed = c.subscribe('t');
    const first = s.last('subscribe');
    assert.equal(first.data.recover, true);
    s.ack(first, { action: 'subscribe', topics: ['t'], recovered: true, recovery: { t: { position: { seq: 5, epoch: 'e' } } } });
    await subscribed;
    s.deliver(pub('t', 6));
    s.deliver(pub('t', 8)); // 7 went missing
    const again = s.last('subscribe');
    assert.notEqual(again.id, first.id, 'subscribed again');
    assert.deepEqual(again.data.since, { seq: 6, epoch: 'e' });
    s.deliver(pub('t', 9)); // before the ack: the server replays or holds it
    s.ack(again, { action: 'subscribe', topics: ['t'], recovered: true, recovery: { t: { recovered: true, position: { seq: 9, epoch: 'e' } } } });
    for (const seq of [7, 8, 9, 9, 10]) s.deliver(pub('t', seq));
    assert.deepEqual(got, [6, 7, 8, 9, 10]);
  });

  test('a publish cut off by a reconnect goes again with its idempotency key; a direct message does not', async () => {
    const c = fake();
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const s1 = latest();
    const published = c.publish('chat:r', 'chat_message', { text: 'hi' });
    const sent = c.send('bob', 'chat', { text: 'hi' });
    const p1 = s1.last('publish');
    assert.ok(p1.data.idempotencyKey);
    s1.drop(1006);
    await assert.rejects(sent, { code: 'DISCONNECTED' });
    const s2 = await open();
    assert.notEqual(s2, s1);
    s2.hello('fake-2');
    const p2 = s2.last('publish');
    assert.equal(p2.data.idempotencyKey, p1.data.idempotencyKey);
    s2.ack(p2, { action: 'publish', topic: 'chat:r', seq: 3, epoch: 'e', duplicate: true });
    assert.deepEqual(await published, { topic: 'chat:r', seq: 3, epoch: 'e', duplicate: true });
  });

  test('subscribe while offline settles with the ack after connecting; unsubscribe offline at once', async () => {
    const c = fake({ subscriptions: ['a'] });
    const pending = c.subscribe(['b', 'c'], { filters: { level: ['x'] } });
    assert.deepEqual(await c.unsubscribe('a'), { topics: ['a'] });
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const s = latest();
    const subs = s.sent.filter((m) => m.type === 'subscribe');
    assert.equal(subs.length, 1, 'one request for the topics that share options');
    assert.deepEqual(subs[0].data, { topics: ['b', 'c'], filters: { level: ['x'] }, recover: true });
    s.ack(subs[0], { action: 'subscribe', topics: ['b', 'c'], recovered: true, recovery: { b: { position: null }, c: { position: null } } });
    const result = await pending;
    assert.deepEqual(result.topics, ['b', 'c']);
    // Nothing on record: after a reconnect the client says it has seen nothing (seq 0), so that
    // a publication made meanwhile is reported as missed rather than skipped silently.
    s.drop(1006);
    (await open()).hello();
    const again = latest().last('subscribe');
    assert.deepEqual(again.data.since, { b: { seq: 0, epoch: '' }, c: { seq: 0, epoch: '' } });
  });

  test('per-topic filters are split per topic, so each keeps its own options', async () => {
    const c = fake();
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const s = latest();
    const subscribed = c.subscribe(['routes', 'metrics'], {
      filters: { routes: { status: ['ACTIVE', 'PENDING'] }, metrics: { interval: 5000 } },
    });
    const [a, b] = s.sent.filter((m) => m.type === 'subscribe');
    assert.deepEqual(a.data, { topics: ['routes'], filters: { status: ['ACTIVE', 'PENDING'] }, recover: true });
    assert.deepEqual(b.data, { topics: ['metrics'], interval: 5000, recover: true });
    s.ack(a, { action: 'subscribe', topics: ['routes'], recovered: true, recovery: { routes: { position: null } } });
    s.ack(b, { action: 'subscribe', topics: ['metrics'], recovered: true, recovery: { metrics: { position: null } } });
    assert.deepEqual((await subscribed).topics, ['routes', 'metrics']);
    // Unsubscribing one leaves the other's filter as it was.
    await Promise.all([c.unsubscribe('metrics'), Promise.resolve().then(() => s.ack(s.last('unsubscribe'), { topics: ['metrics'] }))]);
    s.drop(1006);
    (await open()).hello();
    assert.deepEqual(latest().last('subscribe').data, {
      topics: ['routes'],
      filters: { status: ['ACTIVE', 'PENDING'] },
      since: { seq: 0, epoch: '' },
    });
  });

  test('recovered: false is reported, and the stream goes on from the current position', async () => {
    const c = fake();
    const recoveries = [];
    const got = [];
    c.on('recovery', (r) => recoveries.push(r));
    c.on('tick', (m) => got.push(m.seq));
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const subscribed = c.subscribe('t', { since: { seq: 3, epoch: 'old' } });
    const s = latest();
    const req = s.last('subscribe');
    assert.deepEqual(req.data.since, { seq: 3, epoch: 'old' });
    s.ack(req, { action: 'subscribe', topics: ['t'], recovered: false, recovery: { t: { recovered: false, position: { seq: 40, epoch: 'e' } } } });
    const result = await subscribed;
    assert.equal(result.recovered, false);
    assert.deepEqual(recoveries, [{ topic: 't', recovered: false, since: { seq: 3, epoch: 'old' }, position: { seq: 40, epoch: 'e' } }]);
    s.deliver(pub('t', 41));
    assert.deepEqual(got, [41]);
  });

  test('close codes: final ones stop, the others back off, a drain comes back at once', async () => {
    const codes = [...FINAL_CLOSE_CODES].filter((c) => c !== 4001);
    for (const code of codes) {
      const c = fake();
      const connected = c.connect();
      (await open()).hello();
      await connected;
      const seen = [];
      c.on('disconnected', (d) => seen.push(d));
      latest().drop(code);
      assert.equal(c.state, 'closed', `close ${code}`);
      assert.equal(seen[0].willReconnect, false);
    }
    for (const code of [1006, 1011, 1013, 4002, 4004, 4008]) {
      const c = fake({ reconnect: { minDelay: 1000, maxDelay: 1000, jitter: 0 } });
      const connected = c.connect();
      (await open()).hello();
      await connected;
      const seen = [];
      c.on('disconnected', (d) => seen.push(d));
      latest().drop(code);
      assert.equal(c.state, 'reconnecting', `close ${code}`);
      assert.equal(seen[0].delay, 1000, `close ${code} backs off`);
      await c.close();
    }
    // A drain: the notice says reconnect, and the client does within drainJitter.
    const c = fake({ reconnect: { minDelay: 5000, drainJitter: 50 } });
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const seen = [];
    c.on('disconnected', (d) => seen.push(d));
    const s = latest();
    s.deliver({ type: 'disconnect', data: { code: 1001, reason: 'draining', reconnect: true } });
    s.drop(1001, 'draining');
    assert.ok(seen[0].delay < 50);
    assert.equal(seen[0].notice.reconnect, true);
    const next = await open();
    assert.notEqual(next, s);
    // A notice that says no wins over the code.
    next.hello();
    next.deliver({ type: 'disconnect', data: { code: 4003, reason: 'kicked', reconnect: false } });
    next.drop(4003);
    assert.equal(c.state, 'closed');
  });

  test('a server that accepts and drops at once is backed off from; a stable connection resets', async () => {
    const c = fake({ reconnect: { minDelay: 10, maxDelay: 1000, jitter: 0, stableAfter: 200 } });
    const delays = [];
    c.on('disconnected', (d) => delays.push(d.delay));
    const connected = c.connect();
    for (let i = 0; i < 3; i++) {
      const s = await open();
      s.hello();
      s.drop(1011);
    }
    await connected;
    const s = await open();
    s.hello();
    await sleep(250);
    s.drop(1011);
    assert.deepEqual(delays, [10, 20, 40, 10]);
  });

  test('a server that stops answering pings counts as dead', async () => {
    const c = fake({ heartbeatInterval: 50, heartbeatTimeout: 50 });
    const seen = [];
    c.on('disconnected', (d) => seen.push(d));
    const connected = c.connect();
    const s = await open();
    s.hello();
    await connected;
    // Answer the first ping only.
    await waitFor(() => s.last('ping'), 'a ping');
    s.deliver({ type: 'pong', data: { requestId: s.last('ping').id } });
    await waitFor(() => seen.length === 1, 'the heartbeat timeout', 2000);
    assert.match(seen[0].reason, /heartbeat/);
    assert.equal(seen[0].code, 1006);
    assert.equal(s.sent.filter((m) => m.type === 'ping').length, 2);
    await waitFor(() => latest() !== s, 'a new socket');
  });

  test('requireAck ids go out together in one ack', async () => {
    const c = fake({ ackDelay: 30 });
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const subscribed = c.subscribe('t');
    const s = latest();
    s.ack(s.last('subscribe'), { action: 'subscribe', topics: ['t'], recovered: true, recovery: { t: { position: { seq: 0, epoch: 'e' } } } });
    await subscribed;
    for (const seq of [1, 2, 3, 2]) s.deliver(pub('t', seq, { requireAck: true }));
    await sleep(60);
    const acks = s.sent.filter((m) => m.type === 'ack');
    assert.deepEqual(acks, [{ type: 'ack', data: { ids: ['e:1', 'e:2', 'e:3'] } }]);
  });

  test('a backend answer that overtakes the forwarded ack resolves the request', async () => {
    const c = fake();
    const connected = c.connect();
    (await open()).hello();
    await connected;
    const answered = c.request('config_get', { configId: 'x' });
    const s = latest();
    const req = s.last('config_get');
    assert.deepEqual(req.data, { configId: 'x' });
    s.deliver({ type: 'config', id: 'srv-1', data: { requestId: req.id, config: { a: 1 } } });
    s.ack(req, { action: 'forwarded' });
    const reply = await answered;
    assert.equal(reply.type, 'config');
    assert.deepEqual(reply.data.config, { a: 1 });
    // A request with the forwarded ack first, then the answer.
    const second = c.request('metrics_query', {});
    const req2 = s.last('metrics_query');
    s.ack(req2, { action: 'forwarded' });
    s.deliver({ type: 'metrics_result', data: { requestId: req2.id, rows: [] } });
    assert.equal((await second).type, 'metrics_result');
  });

  test('URLs are tried in turn', async () => {
    const c = make({ url: ['ws://one/ws', 'ws://two/ws'], reconnect: { minDelay: 5, maxDelay: 5 } });
    const connected = c.connect();
    const s1 = await open();
    assert.ok(s1.url.startsWith('ws://one/ws?clientId='));
    s1.drop(1006);
    const s2 = await waitFor(() => latest() !== s1 && latest(), 'the second socket');
    assert.ok(s2.url.startsWith('ws://two/ws'));
    await waitFor(() => s2.readyState === 1, 'open');
    s2.hello();
    await connected;
    assert.equal(c.connection.url.startsWith('ws://two/ws'), true);
  });
});
