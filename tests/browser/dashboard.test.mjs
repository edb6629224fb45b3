// The dashboard at `/` of a running `ksync serve --in-memory`, in headless Chromium.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { artifactPath, launchBrowser, makeEvent, sharedServer, startPeer, waitFor } from './lib.mjs';

let server;
let browser;
let page;
const peers = [];

const clientsShown = () => page.textContent('#clients-count').then((t) => Number.parseInt(t, 10));

before(async () => {
  server = await sharedServer();
  browser = await launchBrowser();
  page = await browser.newPage();
  await page.goto(`${server.http}/`);
  await page.waitForSelector('#status[data-state="live"]', { timeout: 10000 });
});

after(async () => {
  await Promise.all(peers.map((p) => p.kill().catch(() => {})));
  await browser?.close();
  await server?.stop();
});

test('the dashboard loads over the live feed with no console errors', async () => {
  assert.equal(await page.title(), 'kSync dashboard');
  // The first stats arrive right after the welcome.
  await waitFor(async () => (await page.textContent('#events-stored')) !== '–', 5000, 'stats shown');
  assert.equal(await page.isVisible('#auth-panel'), false);
  assert.deepEqual(page.problems, []);
});

// How fast is for the benchmarks; here a slow machine may take seconds (the latency is printed).
test('events a Rust client publishes appear in the live tail', async () => {
  const publisher = startPeer(`${server.ws}/ws/tail-room`);
  peers.push(publisher);
  await publisher.waitConnected();
  for (let round = 0; round < 3; round++) {
    const event = makeEvent('tail', { round, text: `hello from rust ${round}` });
    const sentAt = Date.now();
    publisher.send(event);
    await page.waitForSelector(`#tail .row[data-id="${event.id}"]`, { timeout: 10000 });
    console.log(`live tail: event ${round} shown ${Date.now() - sentAt} ms after sending`);
    const row = await page.textContent(`#tail .row[data-id="${event.id}"]`);
    assert.match(row, /tail-room/);
    assert.match(row, /tail_event/);
  }
  // The room and its sequence number are listed.
  await waitFor(async () => (await page.textContent('#rooms tr[data-room="tail-room"]'))?.includes('3'), 10000,
    'room tail-room listed at seq 3');
  // The filter box narrows the tail to matching rows.
  const other = makeEvent('other', { text: 'not matching' });
  publisher.send(other);
  await page.waitForSelector(`#tail .row[data-id="${other.id}"]`, { timeout: 10000 });
  await page.fill('#tail-filter', 'hello from rust 1');
  await waitFor(async () => (await page.$$('#tail .row')).length === 1, 10000, 'filtered to one row');
  assert.match(await page.textContent('#tail .row'), /hello from rust 1/);
  await page.fill('#tail-filter', '');
  await waitFor(async () => (await page.$$('#tail .row')).length >= 4, 10000, 'filter cleared');
  await publisher.quit();
  assert.deepEqual(page.problems, []);
});

test('the connected-clients count follows clients joining and leaving', async () => {
  await waitFor(async () => (await clientsShown()) === 0, 5000, 'no clients at first');
  const joined = [startPeer(`${server.ws}/ws/count-a`), startPeer(`${server.ws}/ws/count-a`), startPeer(`${server.ws}/ws/count-b`)];
  peers.push(...joined);
  await Promise.all(joined.map((p) => p.waitConnected()));
  await waitFor(async () => (await clientsShown()) === 3, 10000, 'three clients shown');
  assert.equal((await page.$$('#clients tbody tr')).length, 3);
  await joined[0].quit();
  await waitFor(async () => (await clientsShown()) === 2, 10000, 'two clients after one quit');
  // A client that vanishes without closing is counted out once its socket ends.
  await joined[1].kill();
  await waitFor(async () => (await clientsShown()) === 1, 5000, 'one client after one was killed');
  await joined[2].quit();
  await waitFor(async () => (await clientsShown()) === 0, 10000, 'none left');
  assert.deepEqual(page.problems, []);
});

test('a screenshot of the dashboard under load', async () => {
  const loaders = ['orders', 'chat', 'telemetry'].map((room) => startPeer(`${server.ws}/ws/${room}`));
  peers.push(...loaders);
  await Promise.all(loaders.map((p) => p.waitConnected()));
  loaders.forEach((p, i) => p.command({ cmd: 'burst', count: 1500, perSecond: 150 * (i + 1), type: ['order_placed', 'message', 'reading'][i], prefix: `load${i}` }));
  // A repository with two branches, pushed over the Git-like HTTP API.
  const git = (method, path, body) => fetch(`${server.http}/git/${path}`, {
    method, headers: { 'content-type': 'application/json', 'x-ksync-protocol': '1' },
    body: body === undefined ? undefined : JSON.stringify(body),
  }).then((r) => { assert.ok(r.ok, `${method} ${path}: ${r.status}`); });
  await git('PUT', 'inventory');
  await git('POST', 'inventory/branches/main/events', { baseVersion: 0, events: Array.from({ length: 40 }, (_, i) => makeEvent('sku', { i })) });
  await git('POST', 'inventory/branches', { name: 'restock', from: 'main' });
  await git('POST', 'inventory/branches/restock/events', { baseVersion: 40, events: [makeEvent('restock', { qty: 12 })] });
  await waitFor(async () => (await page.textContent('#repos')).includes('restock'), 10000, 'the repository and its branches listed');
  // Let the chart collect a few seconds of rates.
  await waitFor(async () => Number.parseFloat(await page.textContent('#rate')) > 50, 8000, 'a rate above 50 events/s shown');
  await new Promise((resolve) => setTimeout(resolve, 4000));
  assert.ok((await page.$$('#tail .row')).length > 20, 'the tail fills up');
  assert.equal(await clientsShown(), 3);
  await page.screenshot({ path: artifactPath('dashboard.png'), fullPage: true });
  await Promise.all(loaders.map((p) => p.kill()));
  assert.deepEqual(page.problems, []);
});
