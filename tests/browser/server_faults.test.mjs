// The browser client (`/ksync.js`) against faults: a filter that throws (with the real server),
// and a relay that breaks the protocol, scripted inside the browser (`fakeRelayClient`, with
// playwright's routeWebSocket). Nothing sent or received may be lost silently: what the client
// cannot follow ends the session, is notified as a KSyncError, and the next session (after the
// reconnect delay) reads from the cursor and resends what is not acknowledged.
import assert from 'node:assert/strict';
import { deflateRawSync } from 'node:zlib';
import { after, before, test } from 'node:test';
import { createServer } from 'node:net';
import { readFileSync } from 'node:fs';

import { errorsOf, FAKE_WELCOME, fakeRelayClient, launchBrowser, makeEvent, pageClient, sharedServer, startServer, waitFor, storedAck } from './lib.mjs';

let browser;
let server;

before(async () => {
  browser = await launchBrowser();
  server = await sharedServer();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

const receivedOf = (page) => page.evaluate(() => window.received.map((r) => [r.seq, r.event.id]));
/** Waits for `count` errors whose "code: message" starts with `prefix`. */
const waitErrors = (page, prefix, count = 1) => waitFor(async () => {
  const errors = await errorsOf(page);
  return errors.filter((e) => e.startsWith(prefix)).length >= count && errors;
}, 10000, `${count} error(s) ${prefix}`);

test('a filter that throws skips that event only: the rest of the batch and of the snapshot page arrive', async () => {
  const room = `${server.ws}/ws/filter-throws-${process.pid}`;
  const publisher = await pageClient(browser, server.http, room);
  const events = [1, 2, 3].map((n) => makeEvent('f', { n }));
  for (const event of events) {
    assert.equal((await publisher.evaluate((e) => window.client.send(e), event)).status, 'stored');
  }
  const seqs = [];
  // One catch-up batch holds all three; the filter throws on the second.
  const filterSource = "(event) => { if (event.data.n === 2) throw new Error('filter boom'); return true; }";
  for (const options of [{ since: 0 }, { strategy: 'state-based' }]) {
    const page = await pageClient(browser, server.http, room, { ...options, filterSource });
    await waitFor(async () => (await receivedOf(page)).some(([, id]) => id === events[2].id), 5000,
      `${JSON.stringify(options)}: the event after the one the filter threw on`);
    const received = await receivedOf(page);
    // Catch-up in seq order; a snapshot in an order of its own.
    const ids = received.map(([, id]) => id);
    if (options.strategy) ids.sort((a, b) => events.findIndex((e) => e.id === a) - events.findIndex((e) => e.id === b));
    assert.deepEqual(ids, [events[0].id, events[2].id], JSON.stringify(options));
    seqs.push(received.map(([seq]) => seq));
    const errors = await errorsOf(page);
    assert.ok(errors.some((e) => e.startsWith('middleware:') && e.includes('filter boom')), errors.join('\n'));
    await waitFor(() => page.evaluate(() => window.client.cursor >= 3), 5000, 'the cursor past the three');
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  }
  assert.equal(seqs[0][1], seqs[0][0] + 2);
  assert.deepEqual(seqs[1], [null, null]);
  await publisher.evaluate(() => window.client.disconnect());
  await publisher.close();
});

test("an ack result 'failed' ends the session: the event goes again after the reconnect delay", async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    onMessage: (session, message) => {
      if (message.type !== 'publish') return;
      if (session.index === 0) {
        session.send({
          type: 'ack', ref: message.ref, serverVersion: 0,
          results: message.events.map(() => ({ status: 'failed', message: 'storage failed: disk full' })),
        });
      } else {
        session.send(storedAck(message));
      }
    },
  });
  await relay.waitSessions(1);
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  const event = makeEvent('retry');
  await page.evaluate((e) => { window.sendTracked(e).catch(() => {}); }, event);
  const acked = await waitFor(() => page.evaluate(() => window.acked[0]), 10000, 'the event acknowledged after a reconnect');
  assert.deepEqual(acked, { id: event.id, status: 'stored', seq: 1 });
  assert.deepEqual(relay.publishes().map((p) => [p.session, p.events.map((e) => e.id)]), [[0, [event.id]], [1, [event.id]]]);
  assert.deepEqual(relay.sessions[0].closed, { code: 1000, reason: 'ending the session' });
  assert.ok((await errorsOf(page)).some((e) => e.startsWith('failed:') && e.includes('disk full')));
  assert.equal(await page.evaluate(() => window.client.pending), 0);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('binary frames: refused without negotiated compression, when they do not inflate, or inflate past 16 MiB', async () => {
  const [e1, e2] = [makeEvent('b1'), makeEvent('b2')];
  const batch = (...entries) => JSON.stringify({ type: 'events', events: entries });
  const bomb = deflateRawSync(Buffer.from(`{"type":"pong"${' '.repeat(17 * 1024 * 1024)}}`));
  for (const compression of [false, true]) {
    const { page, relay } = await fakeRelayClient(browser, server.http, {
      options: { since: 0, compression },
      welcome: () => ({ serverVersion: 2, compression }),
      onMessage: (session, message) => {
        if (message.type !== 'hello') return;
        if (compression && session.index === 0) session.send(Buffer.from([0xff, 0xfe, 0xfd, 0xfc, 0xfb]));
        else if (compression && session.index === 1) session.send(bomb);
        else if (!compression && session.index === 0) session.send(deflateRawSync(Buffer.from(batch({ seq: 1, event: e1 }))));
        // A text frame that is not JSON may have held events too.
        else if (!compression && session.index === 1) session.send('{"type":"events","events":[{"seq":1');
        // The refused frame's events must come again: only what follows it is sent here.
        if (session.index < 2) session.send(batch({ seq: 2, event: e2 }));
        else session.send(batch({ seq: 1, event: e1 }, { seq: 2, event: e2 }));
      },
    });
    await relay.waitSessions(3);
    await waitFor(async () => (await receivedOf(page)).length >= 2, 10000, 'both events');
    assert.deepEqual(await receivedOf(page), [[1, e1.id], [2, e2.id]], `compression ${compression}`);
    assert.deepEqual(relay.sessions.slice(0, 3).map((s) => s.messages[0].since), [0, 0, 0]);
    assert.deepEqual(relay.sessions.slice(0, 2).map((s) => s.closed?.code), [1000, 1000]);
    const errors = await errorsOf(page);
    const expected = compression
      ? ['bad_binary: a compressed frame does not inflate', 'bad_binary: a compressed frame inflates past 16777216 bytes']
      : ['bad_binary: the server sent a binary frame without negotiated compression', 'bad_message: the server sent a frame that is not a JSON message'];
    for (const prefix of expected) assert.ok(errors.some((e) => e.startsWith(prefix)), `${prefix}\n${errors.join('\n')}`);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  }
});

test('a text frame past 16 MiB is refused as one inflating past it is (bad_message), as the Rust client refuses it: its events come again', async () => {
  const [e1, e2] = [makeEvent('t1'), makeEvent('t2')];
  const batch = (...entries) => JSON.stringify({ type: 'events', events: entries });
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0 },
    // The page's sockets, to hand one a frame made in the page (16 MiB through the scripted
    // relay took seconds): the client reads it as any frame from the network.
    setup: `() => {
      window.sockets = [];
      const Base = window.WebSocket;
      window.WebSocket = class extends Base {
        constructor(...args) { super(...args); window.sockets.push(this); }
      };
    }`,
    welcome: () => ({ serverVersion: 2 }),
    onMessage: (session, message) => {
      if (message.type === 'hello' && session.index > 0) session.send(batch({ seq: 1, event: e1 }, { seq: 2, event: e2 }));
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  // The first session's copy of e1 makes its frame 16 MiB + 1 KiB of JSON; e2 follows it.
  await page.evaluate(({ e1 }) => {
    const padded = { ...e1, data: { pad: 'x'.repeat(16 * 1024 * 1024 + 1024) } };
    window.sockets[0].dispatchEvent(new MessageEvent('message', { data: JSON.stringify({ type: 'events', events: [{ seq: 1, event: padded }] }) }));
  }, { e1 });
  relay.sessions[0].send(batch({ seq: 2, event: e2 }));
  await relay.waitSessions(2);
  await waitFor(async () => (await receivedOf(page)).length >= 2, 10000, 'both events');
  assert.deepEqual(await page.evaluate(() => window.received.map((r) => [r.seq, r.event.id, r.event.data.pad === undefined])),
    [[1, e1.id, true], [2, e2.id, true]]);
  assert.deepEqual(relay.sessions[1].messages[0].since, 0);
  const errors = await errorsOf(page);
  assert.ok(errors.some((e) => e.startsWith('bad_message: the server sent a frame of') && e.includes('past 16777216')), errors.join('\n'));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('sequence numbers: entries without a valid seq are skipped, and acks and welcomes with bad ones refused', async () => {
  const [e1, e2, bad] = [makeEvent('s1'), makeEvent('s2'), makeEvent('bad')];

  // `events` entries: skipped with an error, the cursor untouched.
  {
    const { page, relay } = await fakeRelayClient(browser, server.http, {
      options: { since: 0 },
      welcome: () => ({ serverVersion: 2 }),
      onMessage: (session, message) => {
        if (message.type !== 'hello') return;
        session.send({ type: 'events', events: [{ seq: '1', event: bad }, { event: bad }, 7, null, { seq: 1.5, event: bad }, { seq: 0, event: bad }] });
      },
    });
    await relay.waitSessions(1);
    await waitErrors(page, 'protocol:', 6);
    assert.equal(await page.evaluate(() => window.client.cursor), 0);
    assert.deepEqual(await receivedOf(page), []);
    relay.sessions[0].send({ type: 'events', events: [{ seq: 1, event: e1 }, { seq: 2, event: e2 }] });
    await waitFor(async () => (await receivedOf(page)).length === 2, 5000, 'the valid events');
    assert.deepEqual(await receivedOf(page), [[1, e1.id], [2, e2.id]]);
    assert.equal(await page.evaluate(() => window.client.cursor), 2);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  }

  // `ack`: a seq past the ack's serverVersion, or none, is not believed: sent again.
  {
    const { page, relay } = await fakeRelayClient(browser, server.http, {
      onMessage: (session, message) => {
        if (message.type !== 'publish') return;
        if (session.index === 0) session.send({ type: 'ack', ref: message.ref, serverVersion: 1, results: [{ status: 'stored', seq: 1000 }] });
        else if (session.index === 1) session.send({ type: 'ack', ref: message.ref, serverVersion: 1, results: [{ status: 'duplicate' }] });
        else session.send(storedAck(message));
      },
    });
    await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
    const event = makeEvent('acked');
    await page.evaluate((e) => { window.sendTracked(e).catch(() => {}); }, event);
    const acked = await waitFor(() => page.evaluate(() => window.acked[0]), 10000, 'the event acknowledged believably');
    assert.deepEqual(acked, { id: event.id, status: 'stored', seq: 1 });
    assert.deepEqual(relay.publishes().map((p) => p.session), [0, 1, 2]);
    assert.equal(await page.evaluate(() => window.client.cursor), 1);
    assert.equal((await errorsOf(page)).filter((e) => e.startsWith('protocol:') && e.includes('past its serverVersion')).length, 2);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  }

  // `welcome`: a serverVersion that is not an integer >= 0 is refused (the first rejects connect()).
  {
    const versions = [undefined, '12', -1, 3];
    const { page, relay } = await fakeRelayClient(browser, server.http, {
      welcome: (session) => ({ serverVersion: versions[Math.min(session.index, 3)] }),
    });
    await relay.waitSessions(4);
    await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected to the fourth');
    assert.equal(await page.evaluate(() => window.client.cursor), 3);
    assert.deepEqual(await page.evaluate(() => window.connectErrors), ['protocol']);
    assert.equal((await errorsOf(page)).filter((e) => e.startsWith("protocol: the server's welcome was refused")).length, 3);
    await page.evaluate(() => window.client.disconnect());
    await page.close();
  }
});

test("welcome.maxMessageSize outside 1 KiB..8 MiB is refused; a welcome without it means the default", async () => {
  const sizes = [100, 8 * 1024 * 1024 + 1, 1024, undefined];
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    welcome: (session) => ({ maxMessageSize: sizes[Math.min(session.index, 3)] }),
    onMessage: (session, message) => {
      // The third (1 KiB) goes away at once; the fourth does not say its limit.
      if (message.type === 'hello' && session.index === 2) session.close(1001, 'going away');
      if (message.type === 'publish') session.send(storedAck(message));
    },
  });
  await relay.waitSessions(4);
  await waitFor(() => page.evaluate(() => window.connects === 2), 10000, 'connected to the third and fourth');
  const errors = await errorsOf(page);
  assert.equal(errors.filter((e) => e.startsWith('protocol:') && e.includes('maxMessageSize')).length, 2, errors.join('\n'));
  // 2 KB: more than the third's limit, within the default.
  const event = makeEvent('sized', { text: 'x'.repeat(2000) });
  assert.deepEqual(await page.evaluate((e) => window.sendTracked(e).catch((error) => error.code), event), { status: 'stored', seq: 1 });
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a welcome of another protocol version is refused: the client closes with 4001 and stops, as after the relay\'s 4001', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { reconnectDelay: { min: 10, max: 20 } },
    welcome: () => ({ protocol: 2 }),
    onMessage: (session, message) => {
      if (message.type === 'publish') session.send(storedAck(message));
    },
  });
  await relay.waitSessions(1);
  await waitFor(() => page.evaluate(() => window.connectErrors.length === 1), 5000, 'connect() rejected');
  assert.deepEqual(await page.evaluate(() => window.connectErrors), ['unsupported_protocol']);
  await waitFor(() => relay.sessions[0].closed, 5000, 'the client closed the connection');
  assert.equal(relay.sessions[0].closed.code, 4001);
  // Nothing of the welcome was taken, and reconnecting would get the same answer: it stops.
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(relay.sessions.length, 1, 'no reconnect after a welcome of another version');
  assert.equal(await page.evaluate(() => window.connects), 0);
  const errors = await errorsOf(page);
  assert.deepEqual(errors.filter((e) => e.startsWith('unsupported_protocol:')).length, 1, errors.join('\n'));
  assert.equal(await page.evaluate(() => window.client.connected), false);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a welcome without an integer protocol >= 0 announces no version: a broken welcome (error protocol), retried, not a stop (as the Rust client)', async () => {
  // Missing, a string, negative; numbers written as no integer (`2.0`, `1.0`, `1e0`, which
  // JSON.parse reads as 2 and 1, and the Rust client, as serde reads a u64, as no version);
  // then a good one.
  const protocols = [undefined, '1', -1, '2.0', '1.0', '1e0', 1];
  const written = ['2.0', '1.0', '1e0'];
  const protocolOf = (session) => protocols[Math.min(session.index, protocols.length - 1)];
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { reconnectDelay: { min: 10, max: 20 } },
    welcome: (session) => (written.includes(protocolOf(session)) ? null : { protocol: protocolOf(session) }),
    onMessage: (session, message) => {
      if (message.type !== 'hello' || !written.includes(protocolOf(session))) return;
      session.send(JSON.stringify({ ...FAKE_WELCOME, protocol: 7 }).replace('"protocol":7', `"protocol":${protocolOf(session)}`));
    },
  });
  await relay.waitSessions(protocols.length);
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected to the last');
  assert.deepEqual(await page.evaluate(() => window.connectErrors), ['protocol']);
  const errors = await errorsOf(page);
  const refused = errors.filter((e) => e.startsWith("protocol: the server's welcome was refused: its protocol"));
  assert.equal(refused.length, protocols.length - 1, errors.join('\n'));
  for (const text of written) assert.ok(refused.some((e) => e.includes(`its protocol ${text} is not`)), errors.join('\n'));
  assert.equal(errors.filter((e) => e.startsWith('unsupported_protocol:')).length, 0, errors.join('\n'));
  for (const session of relay.sessions.slice(0, protocols.length - 1)) assert.notEqual(session.closed?.code, 4001);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a client of another protocol version against the relay: one unsupported_protocol error (closeCode 4001), connect() rejected with it, no reconnect', async () => {
  // This module as a client of version 2 would be (the real relay speaks 1).
  const page = await browser.newPage();
  const v1 = process.env.KSYNC_CLIENT_JS
    ? readFileSync(process.env.KSYNC_CLIENT_JS, 'utf8')
    : await (await fetch(`${server.http}/ksync.js`)).text();
  const v2 = v1.replace('export const PROTOCOL_VERSION = 1;', 'export const PROTOCOL_VERSION = 2;');
  assert.notEqual(v2, v1);
  await page.route('**/ksync.js', (route) => route.fulfill({ body: v2, contentType: 'text/javascript' }));
  await page.goto(`${server.http}/health`);
  const rejected = await page.evaluate(async (url) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 10, max: 20 } });
    Object.assign(window, { errors: [], attempts: [], client });
    client.on('error', (error) => window.errors.push([error.code, error.closeCode ?? null]));
    client.on('reconnecting', (attempt) => window.attempts.push(attempt));
    return client.connect().then(() => 'connected', (error) => [error.code, error.closeCode ?? null]);
  }, `${server.ws}/ws/newer-client`);
  assert.deepEqual(rejected, ['unsupported_protocol', 4001]);
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.deepEqual(await page.evaluate(() => ({ errors: window.errors, attempts: window.attempts })),
    { errors: [['unsupported_protocol', 4001]], attempts: [] });
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test("an error naming a publish: 'storage' and unknown codes send it again, 'forbidden' rejects it", async () => {
  const [kept, refused] = [makeEvent('kept'), makeEvent('refused')];
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    onMessage: (session, message) => {
      if (message.type !== 'publish') return;
      const error = (code) => session.send({ type: 'error', code, message: `${code} (scripted)`, ref: message.ref });
      if (message.events[0].id === refused.id) error('forbidden');
      else if (session.index === 0) error('storage');
      else if (session.index === 1) error('mystery');
      else session.send(storedAck(message));
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  await page.evaluate((e) => { window.sendTracked(e).catch(() => {}); }, kept);
  const acked = await waitFor(() => page.evaluate(() => window.acked[0]), 10000, 'acknowledged on the third session');
  assert.deepEqual(acked, { id: kept.id, status: 'stored', seq: 1 });
  assert.deepEqual(relay.publishes().map((p) => p.session), [0, 1, 2]);
  const errors = await errorsOf(page);
  for (const code of ['storage', 'mystery']) assert.ok(errors.includes(`${code}: ${code} (scripted)`), errors.join('\n'));

  const code = await page.evaluate((e) => window.client.send(e).then(() => 'sent', (error) => error.code), refused);
  assert.equal(code, 'forbidden');
  assert.equal(await page.evaluate(() => window.client.pending), 0);
  assert.equal(relay.sessions.length, 3);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('received events that break the event rules are skipped with an error; the cursor moves past them', async () => {
  const nest = (levels) => {
    let data = 1;
    for (let i = 0; i < levels; i += 1) data = [data];
    return data;
  };
  const good = makeEvent('good');
  // Received events may nest 128 levels (older builds stored that deep), not more.
  const deep = { ...makeEvent('deep'), data: nest(128) };
  const { data: _, ...noData } = makeEvent('nodata');
  const entries = [
    good,
    { ...makeEvent('x'), id: '' },
    { ...makeEvent('x'), version: 0 },
    { ...makeEvent('x'), type: 't'.repeat(257) },
    noData,
    { ...makeEvent('x'), data: nest(129) },
    deep,
    // 86 characters, 258 bytes of UTF-8.
    { ...makeEvent('x'), id: '€'.repeat(86) },
    'not an event',
  ].map((event, i) => ({ seq: i + 1, event }));
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0 },
    welcome: () => ({ serverVersion: entries.length }),
    onMessage: (session, message) => {
      if (message.type === 'hello') session.send({ type: 'events', events: entries });
    },
  });
  await relay.waitSessions(1);
  await waitFor(() => page.evaluate(() => window.client.cursor === 9), 5000, 'the cursor past the batch');
  assert.deepEqual(await receivedOf(page), [[1, good.id], [7, deep.id]]);
  const errors = (await errorsOf(page)).filter((e) => e.startsWith('protocol:'));
  assert.equal(errors.length, 7, errors.join('\n'));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('cursor_ahead to since 0 is a protocol error: the next session comes after the reconnect delay', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 5, reconnectDelay: { min: 400, max: 400 } },
    onMessage: (session, message) => {
      if (message.type === 'hello') session.send({ type: 'error', code: 'cursor_ahead', message: 'since is past the last seq 0' });
    },
  });
  await relay.waitSessions(4);
  assert.deepEqual(relay.sessions.slice(0, 4).map((s) => s.messages[0].since), [5, 0, 0, 0]);
  // Backoff of 400 ms with jitter: 200 to 400 ms between the sessions from 0.
  for (const i of [2, 3]) {
    const gap = relay.sessions[i].at - relay.sessions[i - 1].at;
    assert.ok(gap >= 150, `session ${i} came ${gap} ms after the one before`);
  }
  await waitErrors(page, 'protocol: the server answered cursor_ahead to since 0', 2);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

/** A local port nothing listens on (bound, then closed). */
async function closedPort() {
  const listener = createServer();
  await new Promise((resolve) => listener.listen(0, '127.0.0.1', resolve));
  const { port } = listener.address();
  await new Promise((resolve) => listener.close(resolve));
  return port;
}

// Page setup: records `reconnecting` attempts and `disconnected` closes.
const RECORD_RECONNECTS = `(client) => {
  window.attempts = [];
  window.disconnects = [];
  client.on('reconnecting', (n) => window.attempts.push(n));
  client.on('disconnected', (d) => window.disconnects.push(d.code));
}`;

test('every failed attempt and lost connection is an error, alongside reconnecting (as the Rust client)', async () => {
  // Nothing listens: the first attempt rejects connect(), and each one after is told too.
  const port = await closedPort();
  const page = await browser.newPage();
  await page.goto(`${server.http}/health`);
  await page.evaluate(async ({ url, setup }) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 50, max: 100 } });
    window.client = client;
    window.errors = [];
    window.statuses = [];
    client.on('error', (error) => window.errors.push({ code: error.code, name: error.name }));
    client.on('status', (status) => window.statuses.push(status));
    (0, eval)(`(${setup})`)(client);
    window.rejected = await client.connect().then(() => 'connected', (error) => error.code);
  }, { url: `ws://127.0.0.1:${port}/ws/unreachable`, setup: RECORD_RECONNECTS });
  assert.equal(await page.evaluate(() => window.rejected), 'connect');
  const seen = await waitFor(async () => {
    const now = await page.evaluate(() => ({ errors: window.errors, attempts: window.attempts }));
    return now.attempts.length >= 3 && now.errors.length >= 4 && now;
  }, 10000, 'three reconnect attempts that failed');
  // One error a failed attempt: the first, and one per retry (its `reconnecting` follows it).
  assert.ok(seen.errors.every((e) => e.code === 'connect' && e.name === 'KSyncError'), JSON.stringify(seen.errors));
  const counts = await page.evaluate(() => [window.errors.length, window.attempts.length]);
  assert.equal(counts[0], counts[1], `errors and reconnecting attempts: ${counts}`);
  assert.equal(await page.evaluate(() => window.client.status), 'error');
  await page.evaluate(() => window.client.disconnect());
  await page.close();

  // A session that was up and drops: `connection_lost`, then one `connect` error per attempt
  // while the server is away; back once it is.
  let own = await startServer();
  const addr = own.addr;
  const room = `${own.ws}/ws/dropped`;
  const live = await pageClient(browser, server.http, room, { reconnectDelay: { min: 50, max: 100 } }, RECORD_RECONNECTS);
  try {
    await own.stop();
    const errors = await waitFor(async () => {
      const all = await live.evaluate(() => window.errors);
      return all.filter((e) => e.startsWith('connect:')).length >= 2 && all;
    }, 10000, 'failed attempts while the server is away');
    assert.ok(errors[0].startsWith('connection_lost: connection lost ('), errors.join('\n'));
    assert.ok(errors.slice(1).every((e) => e.startsWith('connect:')), errors.join('\n'));
    assert.equal((await live.evaluate(() => window.disconnects)).length, 1);
    const counts = await live.evaluate(() => [window.errors.length, window.attempts.length]);
    assert.equal(counts[0], counts[1], `errors and reconnecting attempts: ${counts}`);

    own = await startServer({ bind: addr });
    await waitFor(() => live.evaluate(() => window.connects === 2), 10000, 'connected again');
    const event = makeEvent('back');
    assert.equal((await live.evaluate((e) => window.sendTracked(e), event)).status, 'stored');
    await live.evaluate(() => window.client.disconnect());
  } finally {
    await live.close();
    await own.stop();
  }
});

test('frames waiting for a slow incoming middleware are bounded (maxIncomingBytes): past it the session ends (slow_consumer) and the next resumes from the cursor', async () => {
  // 20 live batches of about 10 kB, one event each, sent at once by a relay that does not wait
  // for the page; the page's middleware holds the first event until released.
  const events = Array.from({ length: 20 }, (_, n) => makeEvent('flood', { n, pad: 'x'.repeat(10000) }));
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0, maxIncomingBytes: 50000 },
    setup: `(client) => {
      window.held = new Promise((resolve) => { window.release = resolve; });
      client.use('incoming', async (event) => {
        if (event.data.n === 0) await window.held;
        return event;
      });
    }`,
    welcome: () => ({ serverVersion: 20 }),
    onMessage: (session, message) => {
      if (message.type !== 'hello') return;
      for (let i = message.since; i < events.length; i += 1) {
        session.send({ type: 'events', events: [{ seq: i + 1, event: events[i] }] });
      }
    },
  });
  await waitErrors(page, 'slow_consumer:');
  // The client stopped reading the socket and closed it; the frames that had arrived wait.
  await waitFor(() => relay.sessions[0].closed, 5000, 'the client closed the flooded session');
  assert.equal(await page.evaluate(() => window.client.cursor), 0);
  await page.evaluate(() => window.release());
  // Once the middleware goes on, the frames that arrived are read, and the next session
  // resumes after them: every event once, in order.
  await waitFor(async () => (await receivedOf(page)).length >= 20, 10000, 'every event received');
  assert.deepEqual(await receivedOf(page), events.map((e, i) => [i + 1, e.id]));
  assert.equal(await page.evaluate(() => window.client.cursor), 20);
  assert.ok(relay.sessions.length >= 2);
  const resumed = relay.sessions[1].messages[0].since;
  assert.ok(resumed >= 2 && resumed < 20, `the second session resumed from ${resumed}`);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a URL with no WebSocket endpoint (an upgrade answered 404) stops the client with no_endpoint, as the Rust client stops, from a page of any origin', async () => {
  // The browser hides the 404 of the upgrade; a plain GET of the same URL, from the page's own
  // origin, shows it.
  const probe = await browser.newPage();
  await probe.goto(`${server.http}/health`);
  const outcome = await probe.evaluate(async (url) => {
    const { WebSocketSyncClient } = await import('/ksync.js');
    const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 10, max: 20 } });
    const seen = { attempts: 0, errors: [] };
    client.on('reconnecting', () => { seen.attempts += 1; });
    client.on('error', (error) => seen.errors.push([error.code, error.status ?? null]));
    const rejected = await client.connect().then(() => 'connected', (error) => [error.code, error.status ?? null]);
    // Many reconnect delays later: still stopped.
    await new Promise((resolve) => setTimeout(resolve, 300));
    return { rejected, ...seen };
  }, `${server.ws}/wrong/chat`);
  assert.deepEqual(outcome, { rejected: ['no_endpoint', 404], attempts: 0, errors: [['no_endpoint', 404]] });

  // The same from a page of another origin (another server's port): kSync's 404 carries
  // `Access-Control-Allow-Origin: *`, so that page reads it too and the client stops.
  const other = await startServer();
  try {
    const outcome2 = await probe.evaluate(async (url) => {
      const { WebSocketSyncClient } = await import('/ksync.js');
      const client = new WebSocketSyncClient(url, { reconnectDelay: { min: 10, max: 20 } });
      const seen = { attempts: 0, errors: [] };
      client.on('reconnecting', () => { seen.attempts += 1; });
      client.on('error', (error) => seen.errors.push([error.code, error.status ?? null]));
      const rejected = await client.connect().then(() => 'connected', (error) => [error.code, error.status ?? null]);
      await new Promise((resolve) => setTimeout(resolve, 300));
      return { rejected, ...seen };
    }, `${other.ws}/wrong/chat`);
    assert.deepEqual(outcome2, { rejected: ['no_endpoint', 404], attempts: 0, errors: [['no_endpoint', 404]] });
  } finally {
    await other.stop();
  }
  await probe.close();
});

test('a server that takes the connection and never sends welcome: the attempt ends after connectTimeout (connect_timeout) and the next one connects', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { connectTimeout: 200 },
    // The first session is answered nothing at all.
    welcome: (session) => (session.index === 0 ? null : {}),
  });
  await relay.waitSessions(2);
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected to the second');
  assert.deepEqual(await page.evaluate(() => window.connectErrors), ['connect_timeout']);
  assert.deepEqual(relay.sessions[0].closed, { code: 1000, reason: 'ending the session' });
  const errors = await errorsOf(page);
  assert.equal(errors.filter((e) => e.startsWith('connect_timeout: no welcome from the server within 200 ms')).length, 1, errors.join('\n'));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});
