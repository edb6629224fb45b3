// Credentials that expire, the browser way: the server closes a connection whose JWT expired
// (4401) and the browser client stops there instead of reconnecting with the stale token; it
// never opens a connection with a token it can see has expired; `setAuth` + `connect()` go on.
// The dashboard, whose monitor feed is closed the same way, asks for credentials again.
import assert from 'node:assert/strict';
import { createHmac } from 'node:crypto';
import { after, before, test } from 'node:test';

import { launchBrowser, refusedCount, startServer, waitFor } from './lib.mjs';

const JWT_SECRET = 'browser-expiry-secret-0123456789abcdef-xyz';

function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  const body = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${body}.${createHmac('sha256', JWT_SECRET).update(body).digest('base64url')}`;
}
const now = () => Math.floor(Date.now() / 1000);

let server;
let browser;

before(async () => {
  server = await startServer({
    // No leeway: the token's `exp` is the moment the connection closes.
    args: ['--in-memory', '--jwt-leeway-secs', '0', '--auth-max-failures', '100'],
    env: { KSYNC_JWT_SECRET: JWT_SECRET },
  });
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test('a connection whose JWT expires is closed with 4401 and not reopened with it', async () => {
  const exp = now() + 5;
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  await page.evaluate(async ({ url, token }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { auth: { type: 'jwt', token }, reconnectDelay: { min: 10, max: 20 } });
    window.seen = [];
    for (const type of ['connected', 'disconnected', 'reconnecting', 'error']) {
      client.on(type, (detail) => window.seen.push({ type, code: detail?.code, closeCode: detail?.closeCode }));
    }
    await client.connect();
    window.client = client;
  }, { url: `${server.ws}/ws/expiring`, token: jwt({ sub: 'short', exp }) });

  const error = await waitFor(
    () => page.evaluate(() => window.seen.find((n) => n.type === 'error')),
    15000,
    'the expiry reported',
  );
  assert.deepEqual(error, { type: 'error', code: 'closed', closeCode: 4401 });
  const refusedBefore = await refusedCount(server);
  // Many reconnect delays later: still stopped, nothing sent to the server with that token.
  await new Promise((resolve) => setTimeout(resolve, 300));
  const seen = await page.evaluate(() => window.seen.map((n) => n.type));
  assert.deepEqual(seen, ['connected', 'disconnected', 'error']);
  assert.equal(await page.evaluate(() => window.client.connected), false);
  assert.equal(await refusedCount(server), refusedBefore);

  // `connect()` again with the same token once it is visibly expired (past its exp plus the 5 s
  // of a server's default leeway, which the client allows for): refused without a request.
  await waitFor(() => Date.now() > (exp + 5) * 1000 + 100, 10000, 'the token past exp + 5 s');
  const outcome = await page.evaluate(() => window.client.connect().then(() => 'connected', (e) => e.code));
  assert.equal(outcome, 'token_expired');
  assert.equal(await refusedCount(server), refusedBefore);

  // Fresh credentials: connected again.
  await page.evaluate(async (token) => {
    window.client.setAuth({ type: 'jwt', token });
    await window.client.connect();
  }, jwt({ sub: 'fresh', exp: now() + 3600 }));
  assert.equal(await page.evaluate(() => window.client.connected), true);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('the dashboard asks for credentials again when its token expires', async () => {
  const page = await browser.newPage();
  await page.goto(`${server.http}/`);
  await page.waitForSelector('#auth-panel', { state: 'visible', timeout: 10000 });
  await page.selectOption('#auth-type', 'jwt');
  await page.fill('#auth-secret', jwt({ sub: 'dash', exp: now() + 5 }));
  await page.click('#auth-form button');
  await page.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
  // The monitor feed is closed with 4401 at expiry, and the page says so instead of
  // "reconnecting" for ever.
  await page.waitForSelector('#auth-panel', { state: 'visible', timeout: 15000 });
  assert.match(await page.textContent('#auth-error'), /expired/);
  assert.equal(await page.getAttribute('#status', 'data-state'), 'unauthorized');
  await page.close();
});
