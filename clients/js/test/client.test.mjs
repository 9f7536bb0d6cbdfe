// The client against one real gateway node with the in-process broker: connect, subscribe and
// receive, filters, unsubscribe, refusals settled by the server's error, client publish, direct
// messages, heartbeat, requireAck acknowledgements and duplicates, final close codes.

import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import WebSocket from 'ws';

import { WsgateClient, WsgateError } from '../dist/index.js';
import { closeLater, api, publish, record, sleep, startGateway, stopAll, waitFor } from './harness.mjs';

after(stopAll);

function client(gw, options = {}) {
  return closeLater(new WsgateClient({ url: gw.url, WebSocket, reconnect: { minDelay: 50, maxDelay: 500 }, ...options }));
}

describe('one node', () => {
  let gw;
  before(async () => {
    gw = await startGateway({
      config: [
        'websocket:',
        '  heartbeat_interval: 400ms',
        '  ack_timeout: 300ms',
        '  ack_retries: 5',
        'namespaces:',
        '  chat: { publish: anyone }',
        '',
      ].join('\n'),
    });
  });

  test('connects, subscribes with recover, receives typed publications in order, unsubscribes', async () => {
    await publish(gw, 'routes', 'route_update', { id: 'r0' });
    const c = client(gw, { userId: 'alice', clientId: 'admin-client-001' });
    const seen = record(c, ['state', 'connected', 'message']);
    const routes = [];
    c.on('route_update', (m) => routes.push(m));
    const info = await c.connect();
    assert.equal(info.userId, 'alice');
    assert.equal(info.clientId, 'admin-client-001');
    assert.equal(info.heartbeatInterval, 400);
    assert.equal(c.state, 'connected');
    assert.deepEqual(
      seen.state.map((s) => s.state),
      ['connecting', 'connected'],
    );

    const ack = await c.subscribe(['routes', 'metrics']);
    assert.deepEqual(ack.topics, ['routes', 'metrics']);
    // recover: true tells where each topic stands; routes has one publication already.
    assert.equal(ack.recovery.routes.position.seq, 1);
    assert.equal(ack.recovery.metrics.position, null);
    assert.equal(c.position('routes').seq, 1);

    for (let i = 1; i <= 5; i++) await publish(gw, 'routes', 'route_update', { id: `r${i}` });
    await publish(gw, 'metrics', 'metrics', { cpu: 1 });
    await waitFor(() => routes.length === 5 && seen.message.length === 6, 'six publications');
    assert.deepEqual(
      routes.map((m) => m.data.id),
      ['r1', 'r2', 'r3', 'r4', 'r5'],
    );
    assert.deepEqual(
      routes.map((m) => m.seq),
      [2, 3, 4, 5, 6],
    );
    assert.equal(routes[0].id, `${routes[0].epoch}:2`);
    assert.equal(routes[0].topic, 'routes');
    assert.deepEqual(c.position('routes'), { seq: 6, epoch: routes[0].epoch });
    assert.equal(c.position('metrics').seq, 1);

    const un = await c.unsubscribe('metrics');
    assert.deepEqual(un.topics, ['metrics']);
    assert.deepEqual(c.topics, ['routes']);
    await publish(gw, 'metrics', 'metrics', { cpu: 2 });
    await publish(gw, 'routes', 'route_update', { id: 'r6' });
    await waitFor(() => routes.length === 6, 'r6');
    assert.equal(seen.message.filter((m) => m.type === 'metrics').length, 1, 'nothing after unsubscribe');
    await c.close();
    assert.equal(c.state, 'closed');
  });

  test('filters and conflation intervals (the monitoring dashboard, the gateway admin client)', async () => {
    const c = client(gw);
    await c.connect();
    const alerts = [];
    c.on('alert', (m) => alerts.push(m.data));
    await c.subscribe(['alert.cpu', 'alert.memory'], { filters: { level: ['warning', 'critical'] } });
    for (const [topic, level] of [
      ['alert.cpu', 'info'],
      ['alert.cpu', 'warning'],
      ['alert.memory', 'debug'],
      ['alert.memory', 'critical'],
    ]) {
      await publish(gw, topic, 'alert', { level });
    }
    await waitFor(() => alerts.length === 2, 'the two alerts that pass the filter');
    await sleep(100);
    assert.deepEqual(
      alerts.map((a) => a.level),
      ['warning', 'critical'],
    );
    // The gateway admin client's per-topic form: a status filter on routes, conflation on metrics.
    const routes = [];
    const metrics = [];
    c.on('route_update', (m) => routes.push(m.data.route.id));
    c.on('metrics', (m) => metrics.push(m.data.n));
    await c.subscribe(['routes-f', 'metrics-f'], {
      filters: { 'routes-f': { 'route.status': ['ACTIVE', 'PENDING'] }, 'metrics-f': { interval: 400 } },
    });
    for (const [id, status] of [['a', 'ACTIVE'], ['b', 'INACTIVE'], ['c', 'PENDING']]) {
      await publish(gw, 'routes-f', 'route_update', { action: 'updated', route: { id, status } });
    }
    for (let n = 1; n <= 5; n++) await publish(gw, 'metrics-f', 'metrics', { n });
    await waitFor(() => routes.length === 2 && metrics.at(-1) === 5, 'filtered routes and the latest metrics');
    assert.deepEqual(routes, ['a', 'c']);
    assert.ok(metrics.length < 5, `conflated: ${metrics}`);
    await c.close();
  });

  test('refusals settle the promise with the server error', async () => {
    const c = client(gw);
    const errors = record(c, ['error']).error;
    await c.connect();
    await assert.rejects(c.subscribe('bad topic'), (e) => {
      assert.ok(e instanceof WsgateError);
      assert.equal(e.code, 'INVALID_TOPIC');
      assert.equal(e.numericCode, 3004);
      return true;
    });
    assert.deepEqual(c.topics, [], 'a refused topic is not kept');
    // The default namespace does not let clients publish.
    await assert.rejects(c.publish('news', 'headline', { t: 1 }), { code: 'PERMISSION_DENIED' });
    // No Redis: no backend to forward a request to.
    await assert.rejects(c.request('config_get', {}), { code: 'INVALID_OPERATION' });
    // Types the gateway handles itself are refused before they leave.
    await assert.rejects(c.send('bob', 'subscribe', {}), { code: 'INVALID_ARGUMENT' });
    assert.equal(errors.length, 0, 'errors that settle a call are not emitted again');
    await c.close();
  });

  test('publish where the namespace allows it, with idempotency', async () => {
    const c = client(gw, { userId: 'alice' });
    await c.connect();
    const got = [];
    c.on('chat_message', (m) => got.push(m));
    await c.subscribe('chat:room-1');
    const first = await c.publish('chat:room-1', 'chat_message', { text: 'hi' }, { idempotencyKey: 'k-1' });
    assert.equal(first.topic, 'chat:room-1');
    assert.equal(first.seq, 1);
    assert.equal(first.duplicate, false);
    const again = await c.publish('chat:room-1', 'chat_message', { text: 'hi' }, { idempotencyKey: 'k-1' });
    assert.equal(again.duplicate, true);
    assert.equal(again.seq, 1);
    await c.publish('chat:room-1', 'chat_message', { text: 'second' });
    await waitFor(() => got.length === 2, 'two chat messages');
    assert.deepEqual(
      got.map((m) => m.data.text),
      ['hi', 'second'],
    );
    await c.close();
  });

  test('direct messages between users (the chat client)', async () => {
    const alice = client(gw, { userId: 'alice' });
    const bob = client(gw, { userId: 'bob' });
    await Promise.all([alice.connect(), bob.connect()]);
    const chats = [];
    alice.on('chat', (m) => chats.push(m));
    const ack = await bob.send('alice', 'chat', { text: 'Hello!' });
    assert.equal(ack.to, 'alice');
    await waitFor(() => chats.length === 1, 'the chat message');
    assert.equal(chats[0].from, 'bob');
    assert.equal(chats[0].to, 'alice');
    assert.deepEqual(chats[0].data, { text: 'Hello!' });
    // The framework guide's shape: the payload under `content`.
    await bob.send('alice', 'chat', 'Hello World!', { content: true });
    await waitFor(() => chats.length === 2, 'the second chat message');
    assert.equal(chats[1].content, 'Hello World!');
    // A backend notification through the HTTP API, `content` style.
    const notes = [];
    alice.on('notification', (m) => notes.push(m));
    await api(gw, '/api/ws/send', { type: 'notification', to: 'alice', content: { title: 'hi' } });
    await waitFor(() => notes.length === 1, 'the notification');
    assert.deepEqual(notes[0].content, { title: 'hi' });
    await Promise.all([alice.close(), bob.close()]);
  });

  test('heartbeat: pings at the advertised interval and measures the round trip', async () => {
    const c = client(gw);
    await c.connect();
    assert.equal(c.latency, null);
    await waitFor(() => c.latency !== null, 'a pong', 3000);
    assert.ok(c.latency >= 0 && c.latency < 400, `latency ${c.latency}`);
    await c.close();
  });

  test('requireAck publications are acknowledged, re-sends are dropped as duplicates', async () => {
    const metric = async (name) => {
      const text = await (await fetch(`${gw.http}/metrics`)).text();
      const line = text.split('\n').find((l) => l.startsWith(name + ' ') || l.startsWith(name + '{'));
      return line ? Number(line.split(' ').pop()) : 0;
    };
    // Acks held back longer than the server's ack_timeout (300 ms): the server sends again, the
    // application sees each publication once, and the late acks end the re-sends.
    const c = client(gw, { ackDelay: 900 });
    await c.connect();
    const orders = [];
    c.on('order', (m) => orders.push(m));
    await c.subscribe('orders');
    const resendsBefore = await metric('wsgate_ack_resends_total');
    for (let i = 1; i <= 3; i++) await publish(gw, 'orders', 'order', { ref: `A-${i}` }, { requireAck: true });
    await waitFor(() => orders.length === 3, 'three orders');
    await waitFor(async () => (await metric('wsgate_ack_resends_total')) > resendsBefore, 'a re-send', 3000);
    await waitFor(async () => (await metric('wsgate_ack_pending')) === 0, 'every order acknowledged', 5000);
    await sleep(700);
    assert.deepEqual(
      orders.map((m) => m.data.ref),
      ['A-1', 'A-2', 'A-3'],
    );
    assert.ok(orders.every((m) => m.requireAck === true));
    const resendsAfter = await metric('wsgate_ack_resends_total');
    await sleep(800);
    assert.equal(await metric('wsgate_ack_resends_total'), resendsAfter, 'no re-send after the acks');
    await c.close();
  });

  test('initial subscriptions are made at connect', async () => {
    const c = client(gw, {
      subscriptions: ['health', { topics: ['events'], filters: { severity: ['high'] } }],
    });
    const got = [];
    c.on('message', (m) => got.push(`${m.topic}/${m.data.severity ?? '-'}`));
    await c.connect();
    await waitFor(async () => (await api(gw, '/api/presence?topic=events')).body.count === 1, 'the subscription');
    await publish(gw, 'health', 'health_update', { status: 'UP' });
    await publish(gw, 'events', 'system_event', { severity: 'low' });
    await publish(gw, 'events', 'system_event', { severity: 'high' });
    await waitFor(() => got.length === 2, 'two messages');
    assert.deepEqual(got, ['health/-', 'events/high']);
    await c.close();
  });

  test('offline gaps: recovered from a known position and from a topic that was empty', async () => {
    // A URL provider that keeps the client offline until the test lets it go.
    let gate = Promise.resolve();
    const c = client(gw, { url: async () => (await gate, gw.url) });
    const recoveries = [];
    const got = [];
    c.on('recovery', (r) => recoveries.push(r));
    c.on('message', (m) => got.push(`${m.topic}:${m.seq}`));
    await c.connect();
    await publish(gw, 'known', 'tick', {});
    await c.subscribe(['known', 'empty']);
    assert.equal(c.position('known').seq, 1);
    assert.equal(c.position('empty'), null);

    let open;
    gate = new Promise((resolve) => (open = resolve));
    c.reconnect();
    await waitFor(() => c.state === 'connecting', 'the client to wait for its URL');
    await publish(gw, 'known', 'tick', {});
    await publish(gw, 'known', 'tick', {});
    await publish(gw, 'empty', 'tick', {});
    open();
    await waitFor(() => got.length === 3 && recoveries.length === 2, 'the recovery');
    const known = recoveries.find((r) => r.topic === 'known');
    assert.equal(known.recovered, true);
    assert.deepEqual(got.filter((k) => k.startsWith('known')), ['known:2', 'known:3']);
    // A topic that was empty at subscribe time is recovered from "nothing seen" (seq 0): its
    // first publication is replayed even though the client never knew its epoch.
    const empty = recoveries.find((r) => r.topic === 'empty');
    assert.equal(empty.recovered, true);
    assert.equal(empty.since, null);
    assert.equal(empty.position.seq, 1);
    assert.ok(got.includes('empty:1'), JSON.stringify(got));
    await publish(gw, 'empty', 'tick', {});
    await waitFor(() => got.includes('empty:2'), 'live publications after the position');
    await c.close();
  });

  test('close() while the socket is still connecting', async () => {
    // A listener that takes the TCP connection and never answers the upgrade keeps the socket
    // in CONNECTING for as long as the test needs (a real gateway may answer before close()).
    const held = [];
    const stalled = net.createServer((socket) => held.push(socket));
    await new Promise((resolve) => stalled.listen(0, '127.0.0.1', resolve));
    try {
      const c = client(gw, { url: `ws://127.0.0.1:${stalled.address().port}/ws` });
      const connecting = c.connect();
      await waitFor(() => held.length === 1, 'the TCP connection');
      assert.equal(c.state, 'connecting');
      await c.close();
      await assert.rejects(connecting, { code: 'CLOSED' });
      assert.equal(c.state, 'closed');
      await sleep(100);
      assert.equal(c.state, 'closed');
      assert.equal(held.length, 1, 'no reconnect');
    } finally {
      for (const socket of held) socket.destroy();
      stalled.close();
    }
  });

  test('a final close code (4003, disconnected by an operator) stops the client', async () => {
    const c = client(gw, { clientId: 'kick-me' });
    const seen = record(c, ['disconnected', 'state']);
    await c.connect();
    const { body } = await api(gw, '/api/disconnect', { clientId: 'kick-me' });
    assert.equal(body.disconnected, 1);
    await waitFor(() => c.state === 'closed', 'the client to close');
    assert.equal(seen.disconnected.length, 1);
    assert.equal(seen.disconnected[0].code, 4003);
    assert.equal(seen.disconnected[0].willReconnect, false);
    assert.equal(seen.disconnected[0].notice.reconnect, false);
    await sleep(300);
    assert.equal(c.state, 'closed', 'no reconnect');
    await assert.rejects(c.publish('news', 't', {}), { code: 'CLOSED' });
  });
});
