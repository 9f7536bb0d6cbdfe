// The failover scenario of failover.test.mjs in headless Chromium (Debian's `chromium`, driven by
// playwright-core): a page served by a tiny local HTTP server loads the built package
// (dist/index.js, an ES module) and uses the browser's own WebSocket; the test kills the node the
// page is connected to mid-stream, then freezes the next one, and checks what the page's
// application saw: every message exactly once, in order.

import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

import { PACKAGE_DIR, stopAll } from './harness.mjs';
import { TOPIC, TOTAL, assertExactlyOnceInOrder, clientOptions, runStream, startCluster } from './scenario.mjs';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// The flags that work on this machine: no sandbox as root, no network besides loopback.
const FLAGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8"><title>wsgate client in Chromium</title></head>
<body>
<h1>ticker</h1><p id="count">0</p>
<script type="module">
  import { WsgateClient } from '/dist/index.js';
  // The application: a list of ticks, and what the client reported.
  window.app = { got: [], nodes: [], recovery: [], disconnected: [], errors: [], client: null };
  window.start = async (options, topic) => {
    const client = new WsgateClient(options);
    window.app.client = client;
    client.on('tick', (m) => {
      window.app.got.push(m.data.i);
      document.getElementById('count').textContent = String(window.app.got.length);
    });
    client.on('connected', (info) => window.app.nodes.push(info.node));
    client.on('recovery', (r) => window.app.recovery.push(r));
    client.on('disconnected', (d) => window.app.disconnected.push({ code: d.code, reason: d.reason }));
    client.on('error', (e) => window.app.errors.push(e.code + ': ' + e.message));
    await client.connect();
    await client.subscribe(topic);
    return client.connection.node;
  };
  window.ready = true;
</script>
</body></html>`;

/** Serves the page at / and the built package under /dist/. */
function serve() {
  const dist = path.join(PACKAGE_DIR, 'dist');
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    if (url.pathname === '/') {
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
      res.end(PAGE);
      return;
    }
    const file = path.join(dist, path.normalize(url.pathname.replace(/^\/dist\//, '')));
    if (url.pathname.startsWith('/dist/') && file.startsWith(dist) && existsSync(file)) {
      const type = file.endsWith('.js') ? 'text/javascript' : 'application/json';
      res.writeHead(200, { 'content-type': `${type}; charset=utf-8` });
      res.end(readFileSync(file));
      return;
    }
    res.writeHead(404);
    res.end();
  });
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server)));
}

let context;
let server;
let profile;
after(async () => {
  await context?.close().catch(() => undefined);
  server?.close();
  if (profile) rmSync(profile, { recursive: true, force: true });
  await stopAll();
});

describe('headless Chromium', () => {
  test('kill -9 and a frozen node mid-stream: the page sees every message exactly once, in order', async () => {
    assert.ok(
      existsSync(CHROMIUM),
      `Chromium is not installed at ${CHROMIUM}: scripts/test installs Debian's chromium (apt-get), or set CHROMIUM`,
    );
    const { nodes } = await startCluster(3);
    server = await serve();
    const origin = `http://127.0.0.1:${server.address().port}`;
    profile = mkdtempSync(path.join(os.tmpdir(), 'wsgate-chromium-'));
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
    });
    const page = context.pages()[0] ?? (await context.newPage());
    const console = [];
    page.on('console', (m) => console.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => console.push(`pageerror: ${e.message}`));
    await page.goto(origin);
    await page.waitForFunction(() => window.ready === true);
    const first = await page.evaluate(([options, topic]) => window.start(options, topic), [clientOptions(nodes), TOPIC]);
    assert.equal(first, 'edge-1');

    const currentNode = () => page.evaluate(() => window.app.client.connection?.node ?? null);
    await runStream({ nodes, currentNode });
    try {
      await page.waitForFunction((total) => window.app.got.length >= total, TOTAL, { timeout: 15000 });
    } catch (e) {
      const app = await page.evaluate(() => ({ ...window.app, client: undefined, got: window.app.got.length }));
      assert.fail(`the page did not get ${TOTAL} messages: ${JSON.stringify(app)}\n${console.join('\n')}`);
    }
    await page.waitForTimeout(200);
    const app = await page.evaluate(() => ({ ...window.app, client: undefined }));
    assertExactlyOnceInOrder(app.got);
    assert.deepEqual(app.nodes, ['edge-1', 'edge-2', 'edge-3'], JSON.stringify(app.disconnected));
    assert.equal(app.disconnected.length, 2);
    assert.match(app.disconnected[1].reason, /heartbeat/);
    assert.equal(app.recovery.length, 2);
    assert.ok(app.recovery.every((r) => r.recovered === true), JSON.stringify(app.recovery));
    assert.deepEqual(app.errors, []);
    assert.equal(await page.textContent('#count'), String(TOTAL));
    await page.evaluate(() => window.app.client.close());
  });
});
