// The browser client (`/ksync.js`) in headless Chromium against the real server, with a Rust
// WebSocketSyncClient on the other side of the room.
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { after, before, test } from 'node:test';

import { appendAsOlderRelay, launchBrowser, makeEvent, pageClient, sharedServer, startPeer, startServer, tempDir, waitFor } from './lib.mjs';

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

const receivedIds = (page) => page.evaluate(() => window.received.map((r) => r.event.id));

test('a page publishes to a Rust client and receives what the Rust client sends', async () => {
  const server = await sharedServer();
  const rust = startPeer(`${server.ws}/ws/interop`);
  try {
    await rust.waitConnected();
    const page = await pageClient(browser, server.http, `${server.ws}/ws/interop`);
    assert.equal(await page.evaluate(() => window.client.room), 'interop');

    const fromPage = makeEvent('page', { text: 'hello from the browser', nested: { list: [1, 2, 3] } });
    const result = await page.evaluate((event) => window.sendTracked(event), fromPage);
    assert.equal(result.status, 'stored');
    await waitFor(() => rust.received().some((e) => e.id === fromPage.id), 5000, 'the Rust client received the page event');
    const got = rust.received().find((e) => e.id === fromPage.id);
    assert.deepEqual(got.data, fromPage.data);
    assert.equal(got.type, fromPage.type);

    // on() returns the unsubscribe function; off(type, handler) does the same.
    await page.evaluate(() => {
      window.removedCalls = 0;
      const removed = () => { window.removedCalls += 1; };
      const unsubscribe = window.client.on('event', removed);
      unsubscribe();
      window.client.on('event', removed);
      window.client.off('event', removed);
    });
    const fromRust = makeEvent('rust', { text: 'hello from rust' });
    rust.send(fromRust);
    await waitFor(async () => (await receivedIds(page)).includes(fromRust.id), 5000, 'the page received the Rust event');
    const seen = await page.evaluate(() => window.received.at(-1));
    assert.deepEqual(seen.event.data, fromRust.data);
    assert.equal(seen.seq, result.seq + 1);
    assert.equal(await page.evaluate(() => window.client.cursor), result.seq + 1);
    assert.equal(await page.evaluate(() => window.removedCalls), 0);

    // Duplicates are acknowledged as such; refused events reject the promise.
    const again = await page.evaluate((event) => window.client.send(event), fromPage);
    assert.deepEqual(again, { status: 'duplicate', seq: result.seq });
    const refused = await page.evaluate(() => window.client
      .send({ id: 'x', type: 't', data: 1, timestamp: 1, version: 0 })
      .then(() => 'accepted', (error) => error.message));
    assert.match(refused, /version/);
    assert.deepEqual(page.problems, []);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test('a page whose room was reset reads it again from 0, even once it grew past the cursor', async () => {
  // In memory: the restarted server's room starts empty; by the time the page comes back it
  // holds more than the page's cursor, so only `welcome.logId` tells it is another log.
  const first = await startServer();
  const url = `${first.ws}/ws/reset`;
  let server = first;
  try {
    const page = await pageClient(browser, first.http, url);
    for (let i = 0; i < 3; i++) await page.evaluate((e) => window.sendTracked(e), makeEvent('old', { i }));
    assert.equal(await page.evaluate(() => window.client.cursor), 3);
    await page.evaluate(() => window.client.disconnect());
    await first.stop();

    server = await startServer({ bind: first.addr });
    const other = await pageClient(browser, server.http, url);
    const fresh = [0, 1, 2, 3, 4].map((i) => makeEvent('fresh', { i }));
    const results = await other.evaluate((events) => Promise.all(events.map((e) => window.sendTracked(e))), fresh);
    assert.deepEqual(results.map((r) => r.seq), [1, 2, 3, 4, 5]);

    // The page comes back with since 3 and another logId: it reads the new room from 0.
    await page.evaluate(() => window.client.connect());
    await waitFor(async () => (await receivedIds(page)).length === 5, 10000, 'the page got the new room\'s events');
    assert.deepEqual(await receivedIds(page), fresh.map((e) => e.id));
    assert.deepEqual(await page.evaluate(() => window.received.map((r) => r.seq)), [1, 2, 3, 4, 5]);
    assert.equal(await page.evaluate(() => window.client.cursor), 5);
    assert.ok((await page.evaluate(() => window.errors)).some((e) => e.startsWith('room_reset')));
    // Live events keep coming after the resync.
    const later = makeEvent('later');
    await other.evaluate((e) => window.sendTracked(e), later);
    await waitFor(async () => (await receivedIds(page)).includes(later.id), 10000, 'the page got a live event');
    await page.evaluate(() => window.client.disconnect());
    await other.evaluate(() => window.client.disconnect());
    await page.close();
    await other.close();
  } finally {
    await server.stop();
  }
});

test('after a server restart the page resumes from its cursor without losing events', async () => {
  const dataDir = tempDir('ksync-browser-data-');
  let server = await startServer({ args: ['--data-dir', dataDir] });
  const addr = server.addr;
  const rust = startPeer(`${server.ws}/ws/resume`);
  try {
    await rust.waitConnected(1);
    const page = await pageClient(browser, server.http, `${server.ws}/ws/resume`);
    const pageSent = [];
    const rustSent = [];
    for (let i = 0; i < 5; i++) {
      const event = makeEvent('before-page', { i });
      pageSent.push(event.id);
      await page.evaluate((e) => window.sendTracked(e), event);
      const other = makeEvent('before-rust', { i });
      rustSent.push(other.id);
      rust.send(other);
    }
    await waitFor(async () => (await receivedIds(page)).length === 5, 5000, 'the page got the first 5 Rust events');

    // Stop the server; both sides notice and start reconnecting.
    const stopped = await server.stop();
    assert.equal(stopped.code, 0, `clean shutdown:\n${server.stderr}`);
    await waitFor(() => page.evaluate(() => !window.client.connected), 5000, 'the page noticed the restart');
    // Sent while the server is down: they wait in the page's outbox.
    const whileDown = [0, 1, 2].map((i) => makeEvent('down-page', { i }));
    pageSent.push(...whileDown.map((e) => e.id));
    await page.evaluate((events) => { window.pendingDown = Promise.all(events.map((e) => window.sendTracked(e))); }, whileDown);
    for (let i = 0; i < 3; i++) {
      const event = makeEvent('down-rust', { i });
      rustSent.push(event.id);
      rust.send(event);
    }

    server = await startServer({ args: ['--data-dir', dataDir], bind: addr });
    await waitFor(() => page.evaluate(() => window.connects >= 2), 10000, 'the page reconnected');
    await rust.waitConnected(2);
    const results = await page.evaluate(() => window.pendingDown);
    assert.ok(results.every((r) => r.status === 'stored'), JSON.stringify(results));
    for (let i = 0; i < 3; i++) {
      const event = makeEvent('after-rust', { i });
      rustSent.push(event.id);
      rust.send(event);
    }

    // Everything the Rust client sent reached the page exactly once, and the other way round.
    await waitFor(async () => (await receivedIds(page)).length >= rustSent.length, 10000,
      'the page received every Rust event');
    assert.deepEqual((await receivedIds(page)).sort(), [...rustSent].sort());
    await waitFor(() => pageSent.every((id) => rust.received().some((e) => e.id === id)), 10000,
      'the Rust client received every page event');
    // No gap: the page saw every sequence number of the room, in its acks or its events.
    const seqs = await page.evaluate(() => [...window.received.map((r) => r.seq), ...window.acked.map((a) => a.seq)]);
    const total = rustSent.length + pageSent.length;
    assert.deepEqual([...new Set(seqs)].sort((a, b) => a - b), Array.from({ length: total }, (_, i) => i + 1));
    assert.equal(await page.evaluate(() => window.client.cursor), total);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test('events older builds stored deeper than the publish limit (101-128 levels) are received; a new one that deep is refused (invalid)', async () => {
  const nest = (levels) => {
    let data = 'innermost';
    for (let i = 0; i < levels; i += 1) data = i % 2 === 0 ? [data] : { k: data };
    return data;
  };
  const dataDir = tempDir('ksync-browser-deep-');
  // Older builds took data 128 levels deep; their relays stored and still serve such events
  // (the deepest one took: 126, with the publish frame's levels around it).
  const old = { ...makeEvent('old'), data: nest(110) };
  const deepest = { ...makeEvent('deepest'), data: nest(126) };
  appendAsOlderRelay(dataDir, 'deep', [old, deepest]);
  const server = await startServer({ args: ['--data-dir', dataDir] });
  try {
    const page = await pageClient(browser, server.http, `${server.ws}/ws/deep`, { since: 0 });
    await waitFor(() => page.evaluate(() => window.client.cursor === 2), 5000, 'the cursor past both stored events');
    // As JSON text: playwright does not pass back values this deep.
    const received = JSON.parse(await page.evaluate(() => JSON.stringify(window.received.map((r) => [r.seq, r.event]))));
    assert.deepEqual(received, [[1, old], [2, deepest]], JSON.stringify(await page.evaluate(() => window.errors)));
    assert.deepEqual(await page.evaluate(() => window.errors), []);
    // What the app sends keeps the publish limit (100).
    const refused = await page.evaluate((e) => window.client.send(e).then(
      (result) => `sent ${result.status}`,
      (error) => `${error.code}: ${error.message}`,
    ), { ...makeEvent('new'), data: nest(110) });
    assert.match(refused, /^invalid: .*more than 100 levels deep/);
    assert.equal(await page.evaluate(() => window.client.pending), 0);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  } finally {
    await server.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("a URL with '.' or '..' path segments, or a room name the server refuses, is refused up front (bad_room): nothing is opened", async () => {
  const server = await sharedServer();
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  const seen = await page.evaluate(async (base) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const opened = [];
    const Base = window.WebSocket;
    window.WebSocket = class extends Base {
      constructor(url, protocols) {
        opened.push(url);
        super(url, protocols);
      }
    };
    const outcomes = {};
    // `URL` would resolve the first three (to `/`, the default room, and to `/x`); the server
    // refuses the last one's name. Each outcome within 3 s (a 404 is retried for ever).
    for (const path of ['/ws/%2e%2e', '/ws/..', '/ws/.%2e/x', '/ws/.hidden']) {
      let client;
      try {
        client = new WebSocketSyncClient(base + path, { reconnectDelay: { min: 10, max: 20 } });
      } catch (error) {
        outcomes[path] = `${error.name} ${error.code}`;
        continue;
      }
      const timeout = new Promise((resolve) => setTimeout(() => resolve('no outcome in 3 s'), 3000));
      outcomes[path] = await Promise.race([client.connect().then(() => `connected to ${client.room}`, (e) => `connect() rejected: ${e.code}`), timeout]);
      await client.disconnect();
    }
    const refused = opened.splice(0);
    // The server's address alone is still the default room.
    const plain = new WebSocketSyncClient(base, { reconnectDelay: { min: 10, max: 20 } });
    await plain.connect();
    const room = plain.room;
    await plain.disconnect();
    // A relative URL's leading `./` or `../` resolves against the page, as meant.
    const relative = [];
    for (const url of ['./ws/relative-room', '../ws/relative-room']) {
      const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 10, max: 20 } });
      await client.connect();
      relative.push(client.room);
      await client.disconnect();
    }
    return { outcomes, refused, room, relative };
  }, server.ws);
  assert.deepEqual(seen.outcomes, {
    '/ws/%2e%2e': 'KSyncError bad_room',
    '/ws/..': 'KSyncError bad_room',
    '/ws/.%2e/x': 'KSyncError bad_room',
    '/ws/.hidden': 'KSyncError bad_room',
  });
  assert.deepEqual(seen.refused, []);
  assert.equal(seen.room, 'default');
  assert.deepEqual(seen.relative, ['relative-room', 'relative-room']);
  await page.close();
});

test('disconnect() then connect() at once, before the old socket has closed: connected again, and a send is acknowledged', async () => {
  const server = await sharedServer();
  const page = await pageClient(browser, server.http, `${server.ws}/ws/rejoined-${process.pid}`);
  await page.evaluate(async () => {
    window.client.disconnect();
    await window.client.connect();
  });
  const event = makeEvent('rejoined');
  // Within 5 s (the old socket's close must not end the new session; a client left
  // disconnected would keep the event queued for ever).
  const result = await page.evaluate((e) => Promise.race([
    window.sendTracked(e),
    new Promise((resolve) => setTimeout(() => resolve('no ack in 5 s'), 5000)),
  ]), event);
  assert.equal(result.status, 'stored', JSON.stringify(result));
  const state = await page.evaluate(() => ({ connected: window.client.connected, connects: window.connects, statuses: window.statuses }));
  assert.equal(state.connected, true, JSON.stringify(state));
  assert.equal(state.connects, 2, JSON.stringify(state));
  assert.equal(state.statuses.at(-1), 'idle', JSON.stringify(state));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});
