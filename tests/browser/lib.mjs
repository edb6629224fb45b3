// Helpers for the browser tests: the real `ksync` server, Rust peers (the `browser_peer`
// example, a WebSocketSyncClient driven over stdin/stdout) and a headless Chromium driven by
// playwright-core. `cargo xtask browser` sets the environment:
//   KSYNC_BIN         the ksync binary
//   KSYNC_PEER_BIN    the browser_peer example binary
//   KSYNC_URL         http://addr of a running `ksync serve --in-memory` (tests that need their
//                     own server, e.g. with auth or file storage, start it here)
//   KSYNC_PLAYWRIGHT  the playwright-core package directory
//   KSYNC_CHROMIUM    the Chromium executable (default /usr/bin/chromium)
//   KSYNC_ARTIFACTS   where screenshots go (default target/artifacts)
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

const require = createRequire(import.meta.url);

export const ARTIFACTS = process.env.KSYNC_ARTIFACTS ?? path.resolve('target/artifacts');

function need(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests with \`cargo xtask browser\``);
  return value;
}

/** Resolves once `check()` is truthy (returns its value); rejects with `message` after `ms`. */
export async function waitFor(check, ms, message) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms: ${message}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Starts `ksync serve` with `args` and `env`; resolves once it printed its address. */
export async function startServer({ args = ['--in-memory'], env = {}, bind = '127.0.0.1:0' } = {}) {
  const child = spawn(need('KSYNC_BIN'), ['serve', '--bind', bind, ...args], {
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const server = { child, stderr: '', stdout: '' };
  child.stderr.on('data', (chunk) => { server.stderr += chunk; });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  server.exited = exited;
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`ksync serve printed no address in 20 s:\n${server.stderr}`)), 20000);
    child.stdout.on('data', (chunk) => {
      server.stdout += chunk;
      const match = /listening on ws:\/\/([^\s]+)/.exec(server.stdout);
      if (match) {
        clearTimeout(timer);
        resolve(match[1]);
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`ksync serve exited (${code ?? signal}) before listening:\n${server.stderr}`));
    });
  });
  server.addr = addr;
  server.http = `http://${addr}`;
  server.ws = `ws://${addr}`;
  server.stop = async () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 15000);
    const result = await exited;
    clearTimeout(timer);
    return result;
  };
  return server;
}

/** The shared in-memory server started by `cargo xtask browser` (or one of our own). */
export async function sharedServer() {
  if (process.env.KSYNC_URL) {
    const http = process.env.KSYNC_URL.replace(/\/$/, '');
    const addr = http.replace(/^http:\/\//, '');
    return { addr, http, ws: `ws://${addr}`, stop: async () => {}, shared: true };
  }
  return startServer();
}

/** A Rust WebSocketSyncClient in its own process, connected to `url`. */
export function startPeer(url, { apiKey, token } = {}) {
  const args = [url];
  if (apiKey) args.push('--api-key', apiKey);
  if (token) args.push('--token', token);
  const child = spawn(need('KSYNC_PEER_BIN'), args, {
    env: { ...process.env, RUST_LOG: 'warn' },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const peer = { child, reports: [], stderr: '' };
  child.stderr.on('data', (chunk) => { peer.stderr += chunk; });
  readline.createInterface({ input: child.stdout }).on('line', (line) => {
    try {
      peer.reports.push(JSON.parse(line));
    } catch {
      peer.reports.push({ kind: 'unparsed', line });
    }
  });
  peer.exited = new Promise((resolve) => child.once('exit', resolve));
  peer.command = (command) => child.stdin.write(`${JSON.stringify(command)}\n`);
  peer.send = (event) => peer.command({ cmd: 'send', event });
  peer.received = () => peer.reports.filter((r) => r.kind === 'event').map((r) => r.event);
  peer.connects = () => peer.reports.filter((r) => r.kind === 'connected').length;
  peer.waitConnected = (n = 1, ms = 10000) => waitFor(() => peer.connects() >= n, ms,
    `Rust peer connected ${n} time(s); reports: ${JSON.stringify(peer.reports.slice(-5))} ${peer.stderr}`);
  peer.quit = async () => {
    if (child.exitCode === null) peer.command({ cmd: 'quit' });
    const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
    await peer.exited;
    clearTimeout(timer);
  };
  peer.kill = async () => {
    child.kill('SIGKILL');
    await peer.exited;
  };
  return peer;
}

/** Headless Chromium (the system one) with a fresh profile directory. */
export async function launchBrowser() {
  const { chromium } = require(need('KSYNC_PLAYWRIGHT'));
  const profile = mkdtempSync(path.join(tmpdir(), 'ksync-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.KSYNC_CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
    ],
  });
  return {
    context,
    async newPage() {
      const page = await context.newPage();
      const problems = [];
      page.on('console', (message) => {
        if (message.type() === 'error') problems.push(`console error: ${message.text()}`);
      });
      page.on('pageerror', (error) => problems.push(`page error: ${error.message}`));
      page.problems = problems;
      // What the page logs with console.debug (the client's `debug` option).
      page.debugLines = [];
      page.on('console', (message) => {
        if (message.type() === 'debug') page.debugLines.push(message.text());
      });
      // The page's WebSocket frames as the browser sent and received them: {sent, binary, bytes, text}.
      page.wsFrames = [];
      page.on('websocket', (socket) => {
        const record = (sent) => ({ payload }) => {
          const binary = typeof payload !== 'string';
          page.wsFrames.push({ sent, binary, bytes: binary ? payload.length : Buffer.byteLength(payload), text: binary ? null : payload });
        };
        socket.on('framesent', record(true));
        socket.on('framereceived', record(false));
      });
      return page;
    },
    async close() {
      await context.close();
      rmSync(profile, { recursive: true, force: true });
    },
  };
}

export function artifactPath(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return path.join(ARTIFACTS, name);
}

/** A fresh temporary directory (removed by the caller). */
export function tempDir(prefix) {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

let counter = 0;
/** An event in the spec's shape with a unique id. */
export function makeEvent(prefix, data = {}) {
  counter += 1;
  return {
    id: `${prefix}-${process.pid}-${counter}-${Math.random().toString(36).slice(2, 8)}`,
    type: `${prefix}_event`,
    data,
    timestamp: Date.now(),
    version: 1,
  };
}

/** The server's `ksync_auth_refused_total`. */
export async function refusedCount(server) {
  const metrics = await (await fetch(`${server.http}/metrics`)).text();
  return Number(/ksync_auth_refused_total (\d+)/.exec(metrics)[1]);
}

/**
 * Opens a page of the server at `http` and starts a WebSocketSyncClient for `url` there (as
 * `window.client`) with `options` (short reconnect delays unless given). `setup`, the source of
 * a function of the client, runs before `connect()` (e.g. to add middleware). The page records
 * `received` ({seq, event}), `connects`, `welcome` (the last), `errors` ("code: message"),
 * `statuses`, `metrics`, `syncs` (each `sync`'s events), `conflicts`, and `acked` for sends
 * made through `window.sendTracked(event)`.
 */
export async function pageClient(browser, http, url, options = {}, setup = '() => {}') {
  const page = await browser.newPage();
  // Any page of the server's origin can import the module; /health is a small one.
  await page.goto(`${http}/health`);
  await page.evaluate(async ({ url, options, setup }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 100, max: 1000 }, ...options });
    Object.assign(window, { received: [], acked: [], connects: 0, errors: [], statuses: [], metrics: [], syncs: [], conflicts: [], welcome: null });
    client.on('event', (event, meta) => window.received.push({ seq: meta.seq, event }));
    client.on('connected', (welcome) => { window.connects += 1; window.welcome = welcome; });
    client.on('sync', (events) => window.syncs.push(events));
    client.on('conflict', (conflict) => window.conflicts.push(conflict));
    client.on('error', (error) => window.errors.push(`${error.code}: ${error.message}`));
    client.on('status', (status) => window.statuses.push(status));
    client.on('metrics', (metrics) => window.metrics.push(metrics));
    window.client = client;
    window.sendTracked = (event) => client.send(event).then((result) => {
      window.acked.push({ id: event.id, ...result });
      return result;
    });
    (0, eval)(`(${setup})`)(client);
    await client.connect();
  }, { url, options, setup });
  return page;
}
