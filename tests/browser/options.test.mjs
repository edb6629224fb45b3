// The spec's WebSocketSyncClient options in the browser client (`/ksync.js`): filter, middleware,
// strategies, status and metrics, and message size limits, against the real server with a Rust
// client on the other side of the room.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launchBrowser, makeEvent, pageClient, sharedServer, startPeer, startServer, waitFor } from './lib.mjs';

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

test("filter 'public-only' and middleware shape what leaves and what is taken in", async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/shaping`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const page = await pageClient(browser, server.http, room, { filter: 'public-only' }, `(client) => {
      client.use('outgoing', (event) => ({ ...event, data: { ...event.data, sealed: true } }));
      client.use('outgoing', (event) => (event.data.drop ? null : event));
      client.use('incoming', async (event) => ({ ...event, data: { ...event.data, opened: true } }));
      client.use('incoming', (event) => { if (event.data.explode) throw new Error('boom'); return event; });
    }`);

    const secret = makeEvent('secret', { private: true, text: 'stays in the page' });
    const dropped = makeEvent('dropped', { drop: true });
    const open = makeEvent('open', { text: 'for everyone' });
    assert.deepEqual(await page.evaluate((e) => window.client.send(e), secret), { status: 'filtered' });
    assert.deepEqual(await page.evaluate((e) => window.client.send(e), dropped), { status: 'filtered' });
    const sent = await page.evaluate((e) => window.client.send(e), open);
    assert.equal(sent.status, 'stored');
    await waitFor(() => rust.received().some((e) => e.id === open.id), 5000, 'the Rust client got the public event');
    assert.deepEqual(rust.received().find((e) => e.id === open.id).data, { text: 'for everyone', sealed: true });
    assert.ok(!rust.received().some((e) => e.id === secret.id || e.id === dropped.id), 'nothing filtered left the page');

    // 'public-only' is `!data.private`, as in the Rust client: truthy flags stay home, falsy go out.
    const truthy = [makeEvent('one', { private: 1 }), makeEvent('yes', { private: 'yes' })];
    const falsy = [makeEvent('zero', { private: 0 }), makeEvent('false', { private: false }), makeEvent('absent', {})];
    for (const event of truthy) {
      assert.deepEqual(await page.evaluate((e) => window.client.send(e), event), { status: 'filtered' }, event.type);
    }
    for (const event of falsy) {
      assert.equal((await page.evaluate((e) => window.client.send(e), event)).status, 'stored', event.type);
    }
    await waitFor(() => falsy.every((f) => rust.received().some((e) => e.id === f.id)), 5000, 'the Rust client got the falsy-private events');
    assert.ok(!rust.received().some((e) => truthy.some((t) => t.id === e.id)), 'truthy-private events left the page');

    // Incoming: the chain runs (async too), then the filter; a throwing middleware is an error.
    const theirsPrivate = makeEvent('their-secret', { private: true });
    const theirsBad = makeEvent('bad', { explode: true });
    const theirs = makeEvent('theirs', { text: 'hello page' });
    for (const event of [theirsPrivate, theirsBad, theirs]) rust.send(event);
    await waitFor(() => page.evaluate((id) => window.received.some((r) => r.event.id === id), theirs.id), 5000, 'the page got the public event');
    const received = await page.evaluate(() => window.received.map((r) => r.event));
    assert.deepEqual(received.find((e) => e.id === theirs.id).data, { text: 'hello page', opened: true });
    assert.ok(!received.some((e) => e.id === theirsPrivate.id || e.id === theirsBad.id), JSON.stringify(received));
    assert.ok((await page.evaluate(() => window.errors)).some((e) => e.startsWith('middleware:') && e.includes('boom')));
    // Dropped ones still count as seen: the cursor is past all three.
    const seqs = await page.evaluate(() => window.received.map((r) => r.seq));
    assert.equal(await page.evaluate(() => window.client.cursor), Math.max(...seqs));
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test('status and metrics are notified; bad options are refused', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/metered`;
  const page = await pageClient(browser, server.http, room, { metricsInterval: 200 });
  try {
    for (let i = 0; i < 5; i += 1) await page.evaluate((e) => window.client.send(e), makeEvent('m', { i }));
    const metrics = await waitFor(async () => {
      const all = await page.evaluate(() => window.metrics);
      return all.find((m) => m.eventsPerSecond > 0 && m.averageLatency > 0 && m.bandwidthUsage > 0);
    }, 5000, 'a metrics notification with traffic');
    assert.ok(metrics.averageLatency < 5000, JSON.stringify(metrics));
    const statuses = await page.evaluate(() => window.statuses);
    assert.equal(statuses[0], 'connected');
    assert.ok(statuses.includes('syncing') && statuses.at(-1) === 'idle', statuses.join(','));
    assert.equal(await page.evaluate(() => window.client.status), 'idle');

    const refused = await page.evaluate(async () => {
      const { WebSocketSyncClient } = await import('/ksync.js');
      const bad = [{ strategy: 'eventual' }, { filter: 'private-only' }, { batchSize: 0 }, { snapshotInterval: -1 }];
      return bad.map((options) => {
        try {
          new WebSocketSyncClient('ws://127.0.0.1:9/ws/x', options);
          return 'accepted';
        } catch (error) {
          return error.name;
        }
      });
    });
    assert.deepEqual(refused, ['TypeError', 'TypeError', 'TypeError', 'TypeError']);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  } finally {
    await server.stop();
  }
});

test("'batch' waits for batchSize events; batches keep under the server's message size", async () => {
  // 64 KiB messages: four events of 30 KB (10,000 three-byte characters: 10,000 in
  // `text.length`) cannot share one publish.
  const server = await startServer({ args: ['--in-memory', '--max-message-bytes', '65536'] });
  const room = `${server.ws}/ws/batched`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const page = await pageClient(browser, server.http, room, { strategy: 'batch', batchSize: 4, batchInterval: 60000 });
    const events = Array.from({ length: 4 }, (_, i) => makeEvent('big', { i, blob: '€'.repeat(10000) }));
    await page.evaluate((list) => { window.results = list.slice(0, 3).map((e) => window.client.send(e)); }, events);
    // Three of four: nothing leaves before the batch is full (the interval is a minute).
    await new Promise((resolve) => setTimeout(resolve, 500));
    assert.equal(await page.evaluate(() => window.client.pending), 3);
    assert.equal(rust.received().length, 0);
    const results = await page.evaluate(async (last) => {
      window.results.push(window.client.send(last));
      return Promise.all(window.results);
    }, events[3]);
    assert.deepEqual(results.map((r) => r.status), ['stored', 'stored', 'stored', 'stored']);
    await waitFor(() => rust.received().length === 4, 5000, 'the Rust client got all four');
    assert.deepEqual(rust.received().map((e) => e.data.i), [0, 1, 2, 3]);
    // One event larger than a message is refused at once, not resent forever.
    const huge = makeEvent('huge', { blob: 'y'.repeat(70000) });
    const error = await page.evaluate((e) => window.client.send(e).then(() => 'sent', (err) => err.code), huge);
    assert.equal(error, 'invalid');
    assert.equal(await page.evaluate(() => window.client.pending), 0);
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test("'state-based' starts from the snapshot and sends only the latest version of each id", async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/state`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const doc = makeEvent('doc', { rev: 1 });
    rust.send(doc);
    rust.send({ ...doc, version: 2, data: { rev: 2 } });
    const other = makeEvent('other', { rev: 1 });
    rust.send(other);
    // The page joins after: it gets the latest of each id, not the history. The peer's events
    // are stored in order, so a snapshot with both ids has the second version of `doc`.
    const page = await waitFor(async () => {
      const p = await pageClient(browser, server.http, room, { strategy: 'state-based', snapshotInterval: 300 });
      const got = await p.evaluate(() => window.received.length);
      if (got === 2) return p;
      await p.close();
      return null;
    }, 10000, 'a snapshot of two ids');
    const snapshot = await page.evaluate(() => window.received.map((r) => [r.event.id, r.event.version, r.seq]));
    assert.deepEqual(snapshot.sort(), [[doc.id, 2, null], [other.id, 1, null]].sort());
    await waitFor(() => page.evaluate(() => window.client.status === 'idle'), 5000, 'idle after the snapshot');
    assert.ok((await page.evaluate(() => window.client.cursor)) >= 3);

    // Three versions of one id sent within an interval: one goes out, the others are superseded.
    const mine = makeEvent('mine', { rev: 1 });
    const results = await page.evaluate((e) => Promise.all([1, 2, 3].map((v) => window.client.send({ ...e, version: v, data: { rev: v } }))), mine);
    assert.deepEqual(results.map((r) => r.status), ['superseded', 'superseded', 'stored']);
    await waitFor(() => rust.received().some((e) => e.id === mine.id), 5000, 'the Rust client got the latest version');
    assert.deepEqual(rust.received().filter((e) => e.id === mine.id).map((e) => e.version), [3]);
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test('heartbeat: a server that stops answering is given up on, and joined again when it is back', async () => {
  const server = await startServer();
  const room = `${server.ws}/ws/heartbeat`;
  const options = { heartbeat: 300, heartbeatTimeout: 1500 };
  const setup = `(client) => {
    window.disconnects = [];
    client.on('disconnected', (d) => window.disconnects.push(d));
  }`;
  const page = await pageClient(browser, server.http, room, options, setup);
  try {
    // Several pings answered: nothing happens.
    await new Promise((resolve) => setTimeout(resolve, 1500));
    assert.deepEqual(await page.evaluate(() => window.disconnects), []);
    const bad = await page.evaluate(async () => {
      const { WebSocketSyncClient } = await import('/ksync.js');
      return [{ heartbeat: 0 }, { heartbeatTimeout: 'soon' }].map((options) => {
        try {
          new WebSocketSyncClient('ws://127.0.0.1:9/ws/x', options);
          return 'accepted';
        } catch (error) {
          return error.name;
        }
      });
    });
    assert.deepEqual(bad, ['TypeError', 'TypeError']);

    // A stopped process keeps its sockets open (the kernel still acknowledges): only the
    // heartbeat can tell.
    server.child.kill('SIGSTOP');
    const gone = await waitFor(async () => (await page.evaluate(() => window.disconnects))[0], 10000,
      'disconnected after the server stopped');
    assert.equal(gone.code, 4009, JSON.stringify(gone));
    assert.equal(await page.evaluate(() => window.client.status), 'error');
    assert.equal(await page.evaluate(() => window.client.connected), false);

    server.child.kill('SIGCONT');
    await waitFor(() => page.evaluate(() => window.connects >= 2), 15000, 'connected again');
    const event = makeEvent('hb');
    assert.equal((await page.evaluate((e) => window.sendTracked(e), event)).status, 'stored');
    assert.deepEqual(page.problems, []);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  } finally {
    server.child.kill('SIGCONT');
    await server.stop();
  }
});

test('non-positive, non-integer and crossed sizes and delays are a TypeError from the constructor', async () => {
  const server = await sharedServer();
  const page = await browser.newPage();
  try {
    await page.goto(`${server.http}/health`);
    const outcome = await page.evaluate(async () => {
      const { WebSocketSyncClient, MonitorClient } = await import('/ksync.js');
      const attempt = (Client, options) => {
        try {
          new Client('ws://127.0.0.1:9/ws/x', options);
          return 'accepted';
        } catch (error) {
          return error.name;
        }
      };
      const bad = [
        { maxOutbox: 0 }, { maxOutbox: -1 }, { maxOutbox: 'abc' }, { maxOutbox: 1.5 }, { maxOutbox: NaN },
        { reconnectDelay: { min: 0 } }, { reconnectDelay: { min: 'x' } }, { reconnectDelay: { min: -5 } },
        { reconnectDelay: { max: 0 } }, { reconnectDelay: { min: 500, max: 100 } },
        { reconnectDelay: 100 }, { reconnectDelay: { max: 2 ** 31 } },
        { batchSize: -2 }, { batchSize: '10' }, { batchInterval: 0 }, { batchInterval: Infinity },
        { snapshotInterval: 'later' }, { heartbeat: -1 }, { heartbeat: 2 ** 31 }, { heartbeatTimeout: 0 },
        { metricsInterval: 0 }, { metricsInterval: 0.5 },
        { connectTimeout: 0 }, { connectTimeout: 2 ** 31 }, { maxIncomingBytes: 0 }, { maxIncomingBytes: '1MB' },
      ];
      const good = [
        {}, { maxOutbox: 1 }, { reconnectDelay: { min: 1, max: 1 } }, { reconnectDelay: { min: 50000 } },
        { reconnectDelay: { max: 100 } }, { reconnectDelay: {} }, { batchSize: 3, batchInterval: 10 },
        { heartbeat: 2 ** 31 - 1 }, { metricsInterval: 1, snapshotInterval: 1 },
        { connectTimeout: 1 }, { maxIncomingBytes: 1 },
      ];
      return {
        bad: bad.map((options) => [JSON.stringify(options), attempt(WebSocketSyncClient, options)]),
        good: good.map((options) => [JSON.stringify(options), attempt(WebSocketSyncClient, options)]),
        monitor: [{ reconnectDelay: { min: 0 } }, { reconnectDelay: { min: 'x' } }, { reconnectDelay: { min: 20, max: 10 } }, { timeout: 0 }, { timeout: 2 ** 31 }, {}, { timeout: 1 }]
          .map((options) => attempt(MonitorClient, options)),
      };
    });
    for (const [options, result] of outcome.bad) assert.equal(result, 'TypeError', options);
    for (const [options, result] of outcome.good) assert.equal(result, 'accepted', options);
    assert.deepEqual(outcome.monitor, ['TypeError', 'TypeError', 'TypeError', 'TypeError', 'TypeError', 'accepted', 'accepted']);
  } finally {
    await page.close();
    await server.stop();
  }
});

test('the outbox is bounded by maxOutbox: the newest send is refused (outbox_full), the queued ones go out', async () => {
  const server = await sharedServer();
  const page = await browser.newPage();
  try {
    await page.goto(`${server.http}/health`);
    const events = [1, 2, 3].map((n) => makeEvent('bounded', { n }));
    const outcome = await page.evaluate(async ({ url, events }) => {
      const { WebSocketSyncClient } = await import('/ksync.js');
      // Not connected: whatever is sent waits in the outbox.
      const client = new WebSocketSyncClient(url, { maxOutbox: 2 });
      window.client = client;
      window.queued = events.slice(0, 2).map((e) => client.send(e));
      const refused = await client.send(events[2]).then(() => 'queued', (error) => `${error.name} ${error.code}`);
      return { refused, pending: client.pending };
    }, { url: `${server.ws}/ws/bounded-${process.pid}`, events });
    assert.deepEqual(outcome, { refused: 'KSyncError outbox_full', pending: 2 });
    // Once connected the two go out, and there is room again.
    const results = await page.evaluate(async (last) => {
      await window.client.connect();
      const first = await Promise.all(window.queued);
      const third = await window.client.send(last);
      return [...first, third].map((r) => r.status);
    }, events[2]);
    assert.deepEqual(results, ['stored', 'stored', 'stored']);
    assert.equal(await page.evaluate(() => window.client.pending), 0);
    await page.evaluate(() => window.client.disconnect());
  } finally {
    await page.close();
    await server.stop();
  }
});
