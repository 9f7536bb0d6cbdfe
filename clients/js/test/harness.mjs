// Test support: the real `wsgate` binary, a real redis-server and the example backend as child
// processes on free loopback ports, HS256 tokens signed with node:crypto, and small helpers.
// Every process started here is killed when the test file ends (and on exit, whatever happens).

import { spawn, execFileSync } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const REPO_ROOT = path.resolve(PACKAGE_DIR, '..', '..');

const children = new Set();
const tempDirs = new Set();
const clients = new Set();

/** Remembers a client so that `stopAll` closes it (a failed test must not leave one
 * reconnecting, which would keep the test process alive). Returns the client. */
export function closeLater(client) {
  clients.add(client);
  return client;
}

function killAll() {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch {
      /* gone */
    }
  }
  children.clear();
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}
process.on('exit', killAll);

/** Closes every client given to `closeLater` and kills every process this file started (call
 * it from `after`). */
export async function stopAll() {
  await Promise.all([...clients].map((c) => c.close().catch(() => undefined)));
  clients.clear();
  killAll();
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Polls `check` until it returns a truthy value; throws with `what` after `timeout` ms. */
export async function waitFor(check, what, timeout = 10000, step = 20) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(step);
  }
}

/** A loopback port nobody listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** The wsgate binary: $WSGATE_BIN, or target/debug/wsgate of this repository (cargo's target
 * directory, also when CARGO_TARGET_DIR moves it). */
export function wsgateBinary() {
  if (process.env.WSGATE_BIN) return process.env.WSGATE_BIN;
  let target = process.env.CARGO_TARGET_DIR
    ? path.resolve(REPO_ROOT, process.env.CARGO_TARGET_DIR)
    : path.join(REPO_ROOT, 'target');
  const bin = path.join(target, 'debug', 'wsgate');
  if (!existsSync(bin)) {
    throw new Error(
      `no wsgate binary at ${bin}: build it with \`cargo build --bin wsgate\` (scripts/test does), or set WSGATE_BIN`,
    );
  }
  return bin;
}

function tempDir() {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'wsgate-js-'));
  tempDirs.add(dir);
  return dir;
}

function track(child, name) {
  children.add(child);
  const out = [];
  const collect = (chunk) => {
    out.push(chunk.toString());
    if (out.length > 2000) out.splice(0, out.length - 2000);
  };
  child.stdout?.on('data', collect);
  child.stderr?.on('data', collect);
  child.on('exit', () => children.delete(child));
  return {
    output: () => out.join(''),
    name,
  };
}

function tcpSays(port, send, expect) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let got = '';
    socket.setTimeout(500, () => {
      socket.destroy();
      resolve(false);
    });
    socket.on('error', () => resolve(false));
    socket.on('connect', () => socket.write(send));
    socket.on('data', (d) => {
      got += d.toString();
      if (got.includes(expect)) {
        socket.destroy();
        resolve(true);
      }
    });
  });
}

/** A redis-server on a free port without persistence. */
export async function startRedis() {
  const port = await freePort();
  const dir = tempDir();
  const child = spawn(
    'redis-server',
    ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', dir],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const t = track(child, 'redis');
  child.on('error', () => {});
  await waitFor(() => tcpSays(port, 'PING\r\n', '+PONG'), `redis-server on ${port}\n${t.output()}`, 10000, 50);
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    /** One redis-cli command, its output trimmed. */
    cli(...args) {
      return execFileSync('redis-cli', ['-p', String(port), ...args], { encoding: 'utf8' }).trim();
    },
    stop() {
      child.kill('SIGKILL');
    },
  };
}

/**
 * A gateway node: `wsgate --listen 127.0.0.1:PORT` with `args`, and `config` (YAML text) as its
 * config file when given. Resolves once /readyz answers 200.
 */
export async function startGateway({ args = [], config, nodeId, redisUrl, log = 'warn', env = {} } = {}) {
  const port = await freePort();
  const all = ['--listen', `127.0.0.1:${port}`, '--log', log];
  if (nodeId) all.push('--node-id', nodeId);
  if (redisUrl) all.push('--redis-url', redisUrl);
  if (config) {
    const file = path.join(tempDir(), 'wsgate.yaml');
    writeFileSync(file, config);
    all.push('--config', file);
  }
  all.push(...args);
  // The run must not depend on the caller's environment (an API key, a Redis URL, ...).
  const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('WSGATE_')));
  const child = spawn(wsgateBinary(), all, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...cleanEnv, ...env } });
  const t = track(child, nodeId ?? `wsgate:${port}`);
  let exited = null;
  child.on('exit', (code, signal) => {
    exited = { code, signal };
  });
  const http = `http://127.0.0.1:${port}`;
  await waitFor(
    async () => {
      if (exited) throw new Error(`wsgate exited during start-up (${JSON.stringify(exited)}):\n${t.output()}`);
      try {
        const r = await fetch(`${http}/readyz`);
        return r.status === 200;
      } catch {
        return false;
      }
    },
    `wsgate on ${port} to be ready\n${t.output()}`,
    15000,
    50,
  );
  return {
    port,
    nodeId,
    http,
    url: `ws://127.0.0.1:${port}/ws`,
    pid: child.pid,
    output: t.output,
    get exited() {
      return exited;
    },
    signal(sig) {
      child.kill(sig);
    },
    /** kill -9 */
    kill() {
      child.kill('SIGKILL');
    },
    /** Freezes the process (its sockets stay open and silent), like a hung node. */
    freeze() {
      child.kill('SIGSTOP');
    },
    thaw() {
      child.kill('SIGCONT');
    },
    waitExit(timeout = 10000) {
      return waitFor(() => exited, `wsgate ${nodeId ?? port} to exit`, timeout);
    },
  };
}

/** POST /api/publish on a node; returns the JSON answer. */
export async function publish(node, topic, type, data, extra = {}) {
  const r = await fetch(`${node.http}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ topic, type, data, ...extra }),
  });
  const body = await r.json();
  if (r.status !== 200) throw new Error(`publish answered ${r.status}: ${JSON.stringify(body)}`);
  return body;
}

/** POST to any API route; returns {status, body}. */
export async function api(node, route, body) {
  const r = await fetch(`${node.http}${route}`, {
    method: body === undefined ? 'GET' : 'POST',
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

function b64url(value) {
  return Buffer.from(typeof value === 'string' ? value : JSON.stringify(value)).toString('base64url');
}

/** An HS256 JWT for `claims` signed with `secret`. */
export function signJwt(claims, secret) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url(claims);
  const sig = createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** examples/backend.py against `redisUrl`; resolves once it reads the upstream stream. */
export async function startBackend(redisUrl) {
  const script = path.join(REPO_ROOT, 'examples', 'backend.py');
  const child = spawn('python3', ['-u', script, '--redis', redisUrl], { stdio: ['ignore', 'pipe', 'pipe'] });
  const t = track(child, 'backend');
  let exited = null;
  child.on('exit', (code) => {
    exited = code;
  });
  await waitFor(
    () => {
      if (exited !== null) {
        throw new Error(
          `examples/backend.py exited (${exited}); it needs the Python package redis (scripts/test installs it):\n${t.output()}`,
        );
      }
      return t.output().includes('reading wsgate:upstream');
    },
    `examples/backend.py to start\n${t.output()}`,
    15000,
    50,
  );
  return { output: t.output, stop: () => child.kill('SIGKILL') };
}

/** Collects what a client emits, for assertions. */
export function record(client, events) {
  const seen = Object.fromEntries(events.map((e) => [e, []]));
  for (const e of events) client.on(e, (x) => seen[e].push(x));
  return seen;
}
