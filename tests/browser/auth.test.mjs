// With auth configured: the dashboard and the browser client need credentials, sent the
// browser way (subprotocol entries), and the server never logs them.
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { after, before, test } from 'node:test';

import { launchBrowser, makeEvent, refusedCount, startPeer, startServer, waitFor } from './lib.mjs';

const API_KEY = 'dashKey7f3a9c2e41b8d605';
const WRONG_KEY = 'wrongKey0a1b2c3d4e5f6789';
const JWT_SECRET = 'browser-test-secret-0123456789abcdef-xyz';

function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', JWT_SECRET).update(body).digest('base64url')}`;
}
const TOKEN = jwt({ sub: 'browser-user', exp: Math.floor(Date.now() / 1000) + 3600 });

let server;
let browser;

before(async () => {
  server = await startServer({
    args: ['--in-memory', '--auth-max-failures', '100'],
    // Secrets through the environment, as the CLI recommends; debug logs to catch any leak.
    env: { KSYNC_API_KEYS: `dashboard=${API_KEY}`, KSYNC_JWT_SECRET: JWT_SECRET, RUST_LOG: 'debug' },
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('without a token the dashboard is refused and asks for one', async () => {
  const page = await browser.newPage();
  await page.goto(`${server.http}/`);
  await page.waitForSelector('#auth-panel', { state: 'visible', timeout: 10000 });
  assert.equal(await page.getAttribute('#status', 'data-state'), 'unauthorized');
  assert.equal(await page.isVisible('#main'), false);
  assert.match(await page.textContent('#auth-error'), /credentials/i);
  // The feed itself refuses an upgrade without credentials (the browser only sees a close).
  const outcome = await page.evaluate((url) => new Promise((resolve) => {
    const socket = new WebSocket(url, ['ksync.v1']);
    socket.onopen = () => resolve('open');
    socket.onclose = (close) => resolve(`closed ${close.code}`);
  }), `${server.ws}/monitor`);
  assert.equal(outcome, 'closed 1006');
  const status = await page.evaluate(async (url) => (await fetch(url)).status, `${server.http}/monitor`);
  assert.equal(status, 401);

  // A wrong key is refused too.
  await page.selectOption('#auth-type', 'apikey');
  await page.fill('#auth-secret', WRONG_KEY);
  await page.click('#auth-form button');
  await waitFor(async () => /Refused \(401\)/.test(await page.textContent('#auth-error')), 5000, 'wrong key refused');
  assert.equal(await page.isVisible('#main'), false);

  // The right key opens the live dashboard, which counts an authenticated Rust client.
  await page.fill('#auth-secret', API_KEY);
  await page.click('#auth-form button');
  await page.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
  assert.match(await page.textContent('#subject'), /dashboard/);
  const rust = startPeer(`${server.ws}/ws/secure`, { apiKey: API_KEY });
  await rust.waitConnected();
  await waitFor(async () => (await page.textContent('#clients-count')) === '1', 5000, 'the Rust client counted');
  await rust.quit();
  await page.close();
});

test('the browser client authenticates with a JWT and exchanges events with a Rust client', async () => {
  const rust = startPeer(`${server.ws}/ws/secure`, { token: TOKEN });
  await rust.waitConnected();
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  const result = await page.evaluate(async ({ url, token, event }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { auth: { type: 'jwt', token } });
    await client.connect();
    window.client = client;
    return client.send(event);
  }, { url: `${server.ws}/ws/secure`, token: TOKEN, event: makeEvent('jwt-page') });
  assert.equal(result.status, 'stored');
  await waitFor(() => rust.received().length === 1, 5000, 'the Rust client received the page event');

  // Without credentials the browser client cannot connect, and is told why (in-band: a
  // browser cannot read the HTTP status of a refused upgrade).
  const refused = await page.evaluate(async (url) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { reconnect: false });
    return client.connect().then(() => 'connected', (error) => `${error.code} ${error.closeCode}`);
  }, `${server.ws}/ws/secure`);
  assert.equal(refused, 'unauthorized 4401');
  await page.evaluate(() => window.client.disconnect());
  await rust.quit();
  await page.close();
});

test('a wrong key stops the browser client once, with the reason, instead of retrying it forever', async () => {
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  const before = await refusedCount(server);
  const outcome = await page.evaluate(async ({ url, key }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    // Reconnect on, with short delays: a client that retried would try many times below.
    const client = new WebSocketSyncClient(url, {
      auth: { type: 'apikey', key },
      reconnectDelay: { min: 50, max: 100 },
    });
    const errors = [];
    let reconnecting = 0;
    client.on('error', (error) => errors.push(`${error.code} ${error.closeCode}`));
    client.on('reconnecting', () => { reconnecting += 1; });
    const rejected = await client.connect().then(() => 'connected', (error) => `${error.code} ${error.closeCode} ${error.message}`);
    await new Promise((resolve) => setTimeout(resolve, 1500));
    return { rejected, errors, reconnecting };
  }, { url: `${server.ws}/ws/secure`, key: WRONG_KEY });
  assert.match(outcome.rejected, /^unauthorized 4401 /);
  assert.deepEqual(outcome.errors, ['unauthorized 4401'], 'one error notification');
  assert.equal(outcome.reconnecting, 0, 'no reconnect with refused credentials');
  assert.equal(await refusedCount(server), before + 1, 'the server saw one attempt');

  // A token limited to other rooms: `forbidden` (4403), also final.
  const roomToken = jwt({ sub: 'lobby-only', rooms: ['lobby'], exp: Math.floor(Date.now() / 1000) + 3600 });
  const forbidden = await page.evaluate(async ({ url, token }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { auth: { type: 'jwt', token }, reconnectDelay: { min: 50, max: 100 } });
    let reconnecting = 0;
    client.on('reconnecting', () => { reconnecting += 1; });
    const rejected = await client.connect().then(() => 'connected', (error) => `${error.code} ${error.closeCode}`);
    await new Promise((resolve) => setTimeout(resolve, 500));
    return { rejected, reconnecting };
  }, { url: `${server.ws}/ws/secure`, token: roomToken });
  assert.deepEqual(forbidden, { rejected: 'forbidden 4403', reconnecting: 0 });

  // The same room with the right key still works from this page.
  const stored = await page.evaluate(async ({ url, key, event }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { auth: { type: 'apikey', key } });
    await client.connect();
    const result = await client.send(event);
    await client.disconnect();
    return result.status;
  }, { url: `${server.ws}/ws/secure`, key: API_KEY, event: makeEvent('after-refusals') });
  assert.equal(stored, 'stored');
  await page.close();
});

test("a JWT just past its exp, within the server's leeway (5 s by default), connects; one long expired is refused up front", async () => {
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  const now = Math.floor(Date.now() / 1000);
  const before = await refusedCount(server);
  // The page's clock may run a little ahead of the server's: the server takes the first token
  // until exp + 5 s, so the client must not refuse it first.
  const outcomes = await page.evaluate(async ({ url, tokens }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const outcomes = [];
    for (const token of tokens) {
      const client = new WebSocketSyncClient(url, { auth: { type: 'jwt', token }, reconnect: false });
      outcomes.push(await client.connect().then(() => 'connected', (error) => error.code));
      await client.disconnect();
    }
    return outcomes;
  }, {
    url: `${server.ws}/ws/secure`,
    tokens: [jwt({ sub: 'skewed', exp: now - 2 }), jwt({ sub: 'stale', exp: now - 60 })],
  });
  assert.deepEqual(outcomes, ['connected', 'token_expired']);
  assert.equal(await refusedCount(server), before, 'no attempt with the stale token');
  await page.close();
});

test("a JWT whose exp has a fraction of a second is judged as the server rounds it: refused up front exactly when the server would refuse it", async () => {
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  // S: this second on the server's clock (the real one). The server rounds `exp`, then adds its
  // leeway (5 s): the first token (exp S - 4.6, rounded S - 5) ends at S, already past, and the
  // second (exp S + 4.6, rounded S + 5) at S + 10. The page's clock is set to S + 0.2 s, then
  // to S + 9.7 s (a page clock ahead of the server's): taken as is, the first exp had the page
  // send a token the server refuses (`unauthorized`), and the second refused one it takes.
  const S = Math.floor(Date.now() / 1000);
  const before = await refusedCount(server);
  const outcomes = [];
  for (const [exp, pageNow] of [[S - 4.6, S * 1000 + 200], [S + 4.6, S * 1000 + 9700]]) {
    await page.clock.setFixedTime(pageNow);
    outcomes.push(await page.evaluate(async ({ url, token }) => {
      const { WebSocketSyncClient } = await import('/ksync.js');
      const client = new WebSocketSyncClient(url, { auth: { type: 'jwt', token }, reconnect: false });
      const outcome = await client.connect().then(() => 'connected', (error) => error.code);
      await client.disconnect();
      return outcome;
    }, { url: `${server.ws}/ws/secure`, token: jwt({ sub: 'fraction', exp }) }));
  }
  assert.deepEqual(outcomes, ['token_expired', 'connected']);
  assert.equal(await refusedCount(server), before, 'no attempt with the expired token');
  await page.close();
});

test('the server never logs the credentials', async () => {
  // Give the log a moment to be written, then look for every secret we presented.
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.match(server.stderr, /auth refused/, 'refusals are logged (without the credential)');
  for (const secret of [API_KEY, WRONG_KEY, TOKEN, TOKEN.split('.')[2], JWT_SECRET]) {
    assert.equal(server.stderr.includes(secret), false, 'a credential appeared in the server log');
  }
});
