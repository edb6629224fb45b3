// Helpers for the browser tests: the real `ksync` server, Rust peers (the `browser_peer`
// example, a WebSocketSyncClient driven over stdin/stdout) and a headless Chromium driven by
// playwright-core. `cargo xtask browser` sets the environment:
//   KSYNC_BIN         the ksync binary
//   KSYNC_PEER_BIN    the browser_peer example binary
//   KSYNC_SLOW_LINK_BIN  testkit's slow_link example binary (a throttling TCP proxy)
//   KSYNC_URL         http://addr of a running `ksync serve --in-memory` (tests that need their
//                     own server, e.g. with auth or file storage, start it here)
//   KSYNC_PLAYWRIGHT  the playwright-core package directory
//   KSYNC_CHROMIUM    the Chromium executable (default /usr/bin/chromium)
//   KSYNC_ARTIFACTS   where screenshots go (default target/artifacts)
// and, when set, KSYNC_CLIENT_JS: a file the pages get as `/ksync.js` instead of the server's
// (to try a changed or an older client without rebuilding the server).
import { execFileSync, spawn } from 'node:child_process';
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

/**
 * Appends `events` to `room`'s log under `dataDir` as an older relay stored them (no publish
 * check; `browser_peer --append-to-log`), for a server started on `dataDir` afterwards.
 */
export function appendAsOlderRelay(dataDir, room, events) {
  const out = execFileSync(need('KSYNC_PEER_BIN'), ['--append-to-log', dataDir, room, ...events.map((e) => JSON.stringify(e))], { encoding: 'utf8' });
  const report = JSON.parse(out.trim());
  if (report.kind !== 'appended' || report.count !== events.length) throw new Error(`browser_peer --append-to-log: ${out}`);
}

/**
 * testkit's `SlowLink` in its own process: a TCP proxy in front of `upstream` (host:port) that
 * carries each direction at `bytesPerSecond`, its sockets keeping the browser's kernel buffer
 * to what a slow path allows. Resolves `{addr, cut(), stop()}`: `cut()` makes the link die
 * without a word (nothing moves, nothing is closed).
 */
export async function startSlowLink(upstream, bytesPerSecond) {
  const child = spawn(need('KSYNC_SLOW_LINK_BIN'), [upstream, String(bytesPerSecond)], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const addr = await new Promise((resolve, reject) => {
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      const match = /^slow link on (\S+)$/.exec(line);
      if (match) resolve(match[1]);
    });
    exited.then((code) => reject(new Error(`slow_link exited (${code}) before listening`)));
  });
  return {
    addr,
    cut: () => child.stdin.write('cut\n'),
    stop: async () => {
      child.kill('SIGKILL');
      await exited;
    },
  };
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
      if (process.env.KSYNC_CLIENT_JS) {
        await page.route('**/ksync.js', (route) => route.fulfill({ path: process.env.KSYNC_CLIENT_JS, contentType: 'text/javascript' }));
      }
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
 * `window.client`) with `options` (short reconnect delays unless given; `filterSource`, the
 * source of a function, becomes the `filter` option). `setup`, the source of a function of the
 * client, runs before `connect()` (e.g. to add middleware). The page records `received` ({seq,
 * event}), `connects`, `welcome` (the last), `errors` ("code: message"), `statuses`, `metrics`,
 * `syncs` (each `sync`'s events), `conflicts`, and `acked` (results) and `refused` ({id, code})
 * for sends made through `window.sendTracked(event)`.
 */
export async function pageClient(browser, http, url, options = {}, setup = '() => {}') {
  const page = await browser.newPage();
  // Any page of the server's origin can import the module; /health is a small one.
  await page.goto(`${http}/health`);
  await startClient(page, url, options, setup, true);
  return page;
}

/** Starts the client of `pageClient` in `page`; waits for its `connect()` if `wait`, else
 * records a rejected first `connect()` in `window.connectErrors` (codes). */
async function startClient(page, url, options, setup, wait) {
  await page.evaluate(async ({ url, options, setup, wait }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const { filterSource, ...rest } = options;
    if (filterSource !== undefined) rest.filter = (0, eval)(`(${filterSource})`);
    const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 100, max: 1000 }, ...rest });
    Object.assign(window, { received: [], acked: [], connects: 0, errors: [], statuses: [], metrics: [], syncs: [], conflicts: [], welcome: null, connectErrors: [], refused: [] });
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
    }, (error) => {
      window.refused.push({ id: event.id, code: error.code });
      throw error;
    });
    (0, eval)(`(${setup})`)(client);
    const connected = client.connect();
    if (wait) await connected;
    else connected.catch((error) => window.connectErrors.push(error.code));
  }, { url, options, setup, wait });
}

/** The errors a page's client notified (its setup collects them in `window.errors`). */
export const errorsOf = (page) => page.evaluate(() => window.errors);

/** A scripted relay's ack storing every event of `publish` at 1, 2, ... */
export const storedAck = (publish) => ({
  type: 'ack', ref: publish.ref, serverVersion: publish.events.length,
  results: publish.events.map((_, i) => ({ status: 'stored', seq: i + 1 })),
});

/** What a scripted relay's `welcome` says unless the script says otherwise. */
export const FAKE_WELCOME = {
  type: 'welcome', protocol: 1, room: 'fake', serverVersion: 0, compression: false,
  heartbeatMs: 30000, maxMessageSize: 1048576, logId: 'fake-log',
};

/**
 * A page whose client talks to a scripted relay instead of a server: playwright's
 * `page.routeWebSocket` answers the page's WebSockets to `ws://fake.invalid/...` from this
 * process (nothing goes to the network). The page is one of the real server at `http` (for
 * `/ksync.js`), with the recorders of `pageClient`; `connect()` is not waited for (a first
 * session the client refuses rejects it: `window.connectErrors`).
 *
 * Each WebSocket is a session: `{index, at (ms when it opened), messages (what the client sent,
 * parsed), closed ({code, reason} when the client closed it), send(object | string | Buffer),
 * close(code, reason)}`. A `hello` is answered with `FAKE_WELCOME` and the fields
 * `welcome(session, hello)` returns (null: no welcome; an `undefined` field leaves it out), a
 * `ping` with a `pong` (unless the test set `session.silent`); then `onMessage(session,
 * message)` sees every message (the `hello` too, after the welcome went out). Resolves `{page, relay}`: `relay.sessions`,
 * `relay.waitSessions(n)`, `relay.publishes()` (every `publish`, in order, with its session).
 */
export async function fakeRelayClient(browser, http, { room = 'fake', options = {}, setup = '() => {}', welcome = () => ({}), onMessage = () => {} } = {}) {
  const page = await browser.newPage();
  const relay = { sessions: [] };
  // A session counts once its first message (the client's `hello`) has arrived: the socket
  // opens before it, and a test reading `messages[0]` right after would race it.
  relay.waitSessions = (n, ms = 10000) => waitFor(
    () => relay.sessions.length >= n && relay.sessions.slice(0, n).every((s) => s.messages.length > 0),
    ms, `${n} session(s) with the scripted relay`)
    .catch((error) => {
      const seen = relay.sessions.map((s) => [s.messages.map((m) => m.type), s.closed]);
      throw new Error(`${error.message} (${relay.sessions.length}: ${JSON.stringify(seen)})`);
    });
  relay.publishes = () => relay.sessions.flatMap((session) => session.messages
    .filter((m) => m.type === 'publish').map((m) => ({ session: session.index, ...m })));
  await page.routeWebSocket(/^ws:\/\/fake\.invalid\//, (ws) => {
    const session = { index: relay.sessions.length, at: Date.now(), messages: [], closed: null };
    session.send = (message) => ws.send(typeof message === 'string' || Buffer.isBuffer(message) ? message : JSON.stringify(message));
    session.close = (code = 1000, reason = '') => ws.close({ code, reason });
    relay.sessions.push(session);
    ws.onMessage((raw) => {
      let message;
      try {
        message = JSON.parse(raw.toString());
      } catch {
        message = { type: '(not JSON)', raw: raw.toString() };
      }
      session.messages.push(message);
      if (message.type === 'hello') {
        const fields = welcome(session, message);
        if (fields !== null) session.send({ ...FAKE_WELCOME, ...fields });
      } else if (message.type === 'ping' && !session.silent) {
        session.send({ type: 'pong', ref: message.ref });
      }
      onMessage(session, message);
    });
    ws.onClose((code, reason) => {
      session.closed = { code, reason };
      ws.close({ code, reason });
    });
  });
  await page.goto(`${http}/health`);
  await startClient(page, `ws://fake.invalid/ws/${room}`, options, setup, false);
  return { page, relay };
}
