// The browser client (`/ksync.js`) against a relay scripted inside the browser
// (`fakeRelayClient`): what it does when it gives up a socket, when the relay breaks the
// protocol, and with events that break the event rules (refused before they leave, skipped when
// they arrive), and how its reconnects are paced.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { errorsOf, FAKE_WELCOME, fakeRelayClient, launchBrowser, makeEvent, sharedServer, waitFor, storedAck } from './lib.mjs';

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


// Page setup (the source of a function of the client): while `window.holdFrames` is N > 0, the
// next N frames the relay sends are held back, then handed to the page together, in one task,
// as frames read from the network in one go are. So the client has them all before it acts on
// the first (the scripted relay cannot reach a socket the page has begun to close).
const HOLD_FRAMES = `() => {
  window.holdFrames = 0;
  const Base = window.WebSocket;
  window.WebSocket = class extends Base {
    #held = [];
    dispatchEvent(event) {
      if (event.type !== 'message' || window.holdFrames === 0) return super.dispatchEvent(event);
      this.#held.push(event);
      if (this.#held.length < window.holdFrames) return true;
      window.holdFrames = 0;
      for (const held of this.#held.splice(0)) super.dispatchEvent(held);
      return true;
    }
  };
}`;

test('cursor_ahead: an ack right behind it does not move the cursor; the resync asks from 0', async () => {
  const event = makeEvent('behind');
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 5 },
    setup: HOLD_FRAMES,
    welcome: (session) => ({ serverVersion: session.index === 0 ? 10 : 0 }),
    onMessage: (session, message) => {
      if (message.type !== 'publish') return;
      if (session.index === 0) {
        // The room was reset under us, and (a relay lying, or a reset between the two) an ack
        // at seq 7 follows: the resync must still read the new room from its start.
        session.send({ type: 'error', code: 'cursor_ahead', message: 'since 5 is past the last seq 0' });
        session.send({ type: 'ack', ref: message.ref, serverVersion: 7, results: [{ status: 'stored', seq: 7 }] });
      } else {
        session.send(storedAck(message));
      }
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  // The error and the ack reach the client together.
  await page.evaluate((e) => { window.holdFrames = 2; window.sendTracked(e).catch(() => {}); }, event);
  await relay.waitSessions(2);
  assert.deepEqual(relay.sessions.slice(0, 2).map((s) => s.messages[0].since), [5, 0]);
  assert.deepEqual(relay.sessions[0].closed, { code: 1000, reason: 'resync from 0' });
  // The event was not acknowledged by the ack that came after the reset: it goes again.
  const acked = await waitFor(() => page.evaluate(() => window.acked[0]), 10000, 'acknowledged in the new room');
  assert.deepEqual(acked, { id: event.id, status: 'stored', seq: 1 });
  assert.deepEqual(relay.publishes().map((p) => p.session), [0, 1]);
  assert.equal(await page.evaluate(() => window.client.cursor), 1);
  assert.ok((await errorsOf(page)).some((e) => e.startsWith('cursor_ahead:')));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('room reset at welcome: an ack right behind the welcome does not move the cursor; the resync asks from 0', async () => {
  const event = makeEvent('reset');
  let refOfFirst = null;
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 5 },
    setup: HOLD_FRAMES,
    welcome: (session) => ({ serverVersion: session.index === 0 ? 5 : 3, logId: session.index === 0 ? 'old-log' : 'new-log' }),
    onMessage: (session, message) => {
      if (session.index === 0 && message.type === 'publish') {
        // Not acknowledged here: the connection drops with the publish in flight.
        refOfFirst = message.ref;
        session.close(1001, 'going away');
      } else if (session.index === 1 && message.type === 'hello') {
        // Another log answers (the welcome went out before this), and an ack for the publish
        // of the old session follows it.
        session.send({ type: 'ack', ref: refOfFirst, serverVersion: 3, results: [{ status: 'stored', seq: 3 }] });
      } else if (message.type === 'publish') {
        session.send(storedAck(message));
      }
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  // The second session's welcome and ack reach the client together.
  await page.evaluate((e) => { window.holdFrames = 2; window.sendTracked(e).catch(() => {}); }, event);
  await relay.waitSessions(3);
  assert.deepEqual(relay.sessions.slice(0, 3).map((s) => s.messages[0].since), [5, 5, 0]);
  assert.deepEqual(relay.sessions[1].closed, { code: 1000, reason: 'resync from 0' });
  const acked = await waitFor(() => page.evaluate(() => window.acked[0]), 10000, 'acknowledged in the new log');
  assert.deepEqual(acked, { id: event.id, status: 'stored', seq: 1 });
  assert.deepEqual(relay.publishes().map((p) => p.session), [0, 2]);
  assert.ok((await errorsOf(page)).some((e) => e.startsWith('room_reset:')));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

/** `data` nested `levels` arrays deep (`[[1]]` is two). */
const nest = (levels) => {
  let data = 1;
  for (let i = 0; i < levels; i += 1) data = [data];
  return data;
};

test('an event the app sends that breaks the event rules is refused before it leaves (invalid)', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    // What the outgoing middleware makes of an event is checked too.
    setup: "(client) => client.use('outgoing', (e) => (e.data?.grow ? { ...e, type: 't'.repeat(300) } : e))",
    onMessage: (session, message) => {
      if (message.type === 'publish') session.send(storedAck(message));
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  const send = (event) => page.evaluate((e) => window.client.send(e).then(
    (result) => result.status,
    (error) => `${error.name} ${error.code}: ${error.message}`,
  ), event);
  const refused = {
    'id of 257 bytes': { ...makeEvent('r'), id: 'i'.repeat(257) },
    // 86 characters, 258 bytes of UTF-8.
    'id of 258 bytes in 86 characters': { ...makeEvent('r'), id: '€'.repeat(86) },
    'type of 257 bytes': { ...makeEvent('r'), type: 't'.repeat(257) },
    'data 101 levels deep': { ...makeEvent('r'), data: nest(101) },
    'empty id': { ...makeEvent('r'), id: '' },
    'version 0': { ...makeEvent('r'), version: 0 },
    'a type the middleware makes 300 bytes': makeEvent('r', { grow: true }),
  };
  for (const [what, event] of Object.entries(refused)) {
    const outcome = await send(event);
    assert.match(outcome, /^KSyncError invalid: the event breaks the event rules: /, what);
  }
  assert.match(await send(refused['id of 258 bytes in 86 characters']), /its id is 258 bytes of UTF-8, the limit is 256/);
  assert.match(await send(refused['data 101 levels deep']), /nests arrays and objects more than 100 levels deep/);
  // At the limits: sent and stored.
  const atLimits = [
    { ...makeEvent('ok'), id: `${'€'.repeat(85)}i`, type: 't'.repeat(256) },
    { ...makeEvent('ok'), data: nest(100) },
  ];
  for (const event of atLimits) assert.equal(await send(event), 'stored');
  // Only those left: nothing that breaks the rules reached the relay.
  assert.deepEqual(relay.publishes().flatMap((p) => p.events.map((e) => e.id)), atLimits.map((e) => e.id));
  assert.equal(await page.evaluate(() => window.client.pending), 0);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('received events are held to the same rules as sent ones: a timestamp that is not an integer >= 0 is skipped', async () => {
  const good = makeEvent('good');
  const entries = [
    { ...makeEvent('x'), timestamp: -1 },
    { ...makeEvent('x'), timestamp: 1.5 },
    { ...makeEvent('x'), timestamp: '2026-01-01' },
    good,
  ].map((event, i) => ({ seq: i + 1, event }));
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0 },
    welcome: () => ({ serverVersion: entries.length }),
    onMessage: (session, message) => {
      if (message.type === 'hello') session.send({ type: 'events', events: entries });
    },
  });
  await relay.waitSessions(1);
  await waitFor(() => page.evaluate(() => window.client.cursor === 4), 5000, 'the cursor past the batch');
  assert.deepEqual(await page.evaluate(() => window.received.map((r) => r.event.id)), [good.id]);
  const errors = (await errorsOf(page)).filter((e) => e.startsWith('protocol:') && e.includes('its timestamp is not an integer >= 0'));
  assert.equal(errors.length, 3, errors.join('\n'));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a second welcome on one connection is a protocol error: the session ends, the next one resumes', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0 },
    welcome: (session) => ({ serverVersion: session.index === 0 ? 0 : 1 }),
    onMessage: (session, message) => {
      if (message.type !== 'hello') return;
      if (session.index === 0) session.send({ ...FAKE_WELCOME, room: 'other', serverVersion: 1 });
      else session.send({ type: 'events', events: [{ seq: 1, event: makeEvent('after') }] });
    },
  });
  await relay.waitSessions(2);
  await waitFor(() => page.evaluate(() => window.received.length === 1), 5000, 'the event of the second session');
  const errors = await errorsOf(page);
  assert.ok(errors.includes('protocol: the server sent a second welcome on this connection'), errors.join('\n'));
  assert.deepEqual(relay.sessions[0].closed, { code: 1000, reason: 'ending the session' });
  // One `connected` per connection, and the second session resumes where the first stood.
  assert.equal(await page.evaluate(() => window.connects), 2);
  assert.deepEqual(relay.sessions.slice(0, 2).map((s) => s.messages[0].since), [0, 0]);
  assert.equal(await page.evaluate(() => window.client.room), 'fake');
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a session given up during incoming middleware: the events of its batch already taken get their sync', async () => {
  const [first, held, last] = [makeEvent('taken'), makeEvent('held', { hold: true }), makeEvent('last')];
  const entries = [first, held, last].map((event, i) => ({ seq: i + 1, event }));
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { since: 0, heartbeat: 200, heartbeatTimeout: 400 },
    // The middleware holds the second event the first time it sees it, until the test lets go.
    setup: `(client) => client.use('incoming', async (e) => {
      if (e.data?.hold && !window.heldOnce) {
        window.heldOnce = true;
        await new Promise((resolve) => { window.release = resolve; });
      }
      return e;
    })`,
    welcome: () => ({ serverVersion: entries.length }),
    onMessage: (session, message) => {
      if (message.type === 'hello' && session.index === 0) session.send({ type: 'events', events: entries });
    },
  });
  await relay.waitSessions(1);
  await waitFor(() => page.evaluate(() => typeof window.release === 'function'), 5000, 'the middleware holding the second event');
  // The relay goes silent while the middleware holds the batch, and the heartbeat gives the
  // socket up: the first event is past the cursor (the next session resumes after it) and
  // must not lose its `sync`.
  relay.sessions[0].silent = true;
  await waitFor(() => relay.sessions[0].closed !== null, 5000, 'the heartbeat giving the socket up');
  assert.equal(relay.sessions[0].closed.code, 4009);
  // The next session begins once the middleware returns (the session's end waits for it).
  await page.evaluate(() => window.release());
  await waitFor(() => page.evaluate(() => window.syncs.length === 1), 5000, "the first event's sync");
  await relay.waitSessions(2);
  assert.deepEqual(relay.sessions.slice(0, 2).map((s) => s.messages[0].since), [0, 1]);
  relay.sessions[1].send({ type: 'events', events: entries.slice(1) });
  await waitFor(() => page.evaluate(() => window.client.cursor === 3), 5000, 'the rest, from the second session');
  const ids = (events) => events.map((e) => e.id);
  assert.deepEqual(await page.evaluate(() => window.syncs.map((s) => s.map((e) => e.id))), [ids([first]), ids([held, last])]);
  assert.deepEqual(await page.evaluate(() => window.received.map((r) => r.event.id)), ids([first, held, last]));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test("an ack's held revision that breaks the event rules is not passed on: a protocol error, the conflict without it", async () => {
  const [valid, longType, deep] = [makeEvent('held-ok'), makeEvent('held-type'), makeEvent('held-deep')];
  // The room's revision under the same id and version, with other content (and broken for two).
  const heldFor = new Map([
    [valid.id, { ...valid, data: { theirs: true } }],
    [longType.id, { ...longType, type: 't'.repeat(300) }],
    // Past what received events may nest (128: older builds stored that deep).
    [deep.id, { ...deep, data: nest(129) }],
  ]);
  const { page } = await fakeRelayClient(browser, server.http, {
    onMessage: (session, message) => {
      if (message.type !== 'publish') return;
      session.send({
        type: 'ack', ref: message.ref, serverVersion: 1,
        results: message.events.map((e) => ({ status: 'conflict', held: heldFor.get(e.id) })),
      });
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected');
  for (const event of [valid, longType, deep]) await page.evaluate((e) => window.sendTracked(e), event);
  const acked = await page.evaluate(() => window.acked);
  assert.deepEqual(acked, [
    { id: valid.id, status: 'conflict', held: heldFor.get(valid.id) },
    { id: longType.id, status: 'conflict' },
    { id: deep.id, status: 'conflict' },
  ]);
  const conflicts = await page.evaluate(() => window.conflicts.map((c) => [c.ours.id, c.theirs]));
  assert.deepEqual(conflicts, [[valid.id, heldFor.get(valid.id)], [longType.id, null], [deep.id, null]]);
  const errors = (await errorsOf(page)).filter((e) => e.startsWith('protocol:') && e.includes('holds a revision'));
  assert.equal(errors.length, 2, errors.join('\n'));
  assert.ok(errors[0].includes('its type is 300 bytes of UTF-8') && errors[1].includes('more than 128 levels deep'), errors.join('\n'));
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('a snapshot page whose events are not a list is a protocol error: the session ends, the next asks for the snapshot again', async () => {
  const good = makeEvent('snap');
  const pages = [{}, 'not a list', [good]];
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { strategy: 'state-based' },
    welcome: () => ({ serverVersion: 1 }),
    onMessage: (session, message) => {
      if (message.type !== 'hello') return;
      session.send({ type: 'snapshot', serverVersion: 1, events: pages[Math.min(session.index, 2)], last: true });
    },
  });
  await relay.waitSessions(3);
  await waitFor(() => page.evaluate(() => window.client.cursor === 1), 5000, 'the snapshot of the third session');
  assert.deepEqual(await page.evaluate(() => window.received.map((r) => r.event.id)), [good.id]);
  assert.deepEqual(relay.sessions.slice(0, 3).map((s) => s.messages[0].state), [true, true, true]);
  assert.deepEqual(relay.sessions.slice(0, 2).map((s) => s.closed), [
    { code: 1000, reason: 'ending the session' }, { code: 1000, reason: 'ending the session' },
  ]);
  const errors = await errorsOf(page);
  for (const kind of ['an object', 'a string']) {
    assert.ok(errors.includes(`protocol: the server sent a snapshot page without a list of events (its events is ${kind})`), errors.join('\n'));
  }
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

// Page setup: records the attempt numbers of `reconnecting` in `window.attempts`.
const RECORD_ATTEMPTS = "(client) => { window.attempts = []; client.on('reconnecting', (n) => window.attempts.push(n)); }";

test('backoff: a server that welcomes and then closes keeps counting attempts; a session that stayed up starts them again', async () => {
  // Up for the backoff maximum: the fourth session, until the test closes it.
  const max = 300;
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { reconnectDelay: { min: 20, max } },
    setup: RECORD_ATTEMPTS,
    onMessage: (session, message) => {
      if (message.type === 'hello' && session.index < 3) session.close(1011, 'failing after the welcome');
    },
  });
  await relay.waitSessions(4);
  assert.deepEqual(await page.evaluate(() => window.attempts), [1, 2, 3]);
  // Each session was welcomed: counting on is not for failed connections only.
  await waitFor(() => page.evaluate(() => window.connects === 4), 5000, 'the fourth session connected');
  const fourth = relay.sessions[3];
  await waitFor(() => Date.now() - fourth.at >= max + 200, 5000, 'the fourth session up for the backoff maximum');
  fourth.close(1011, 'failing after a while');
  await relay.waitSessions(5);
  assert.deepEqual(await page.evaluate(() => window.attempts), [1, 2, 3, 1]);
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('backoff: the monitor feed also keeps counting attempts against a server that welcomes and then closes', async () => {
  const page = await browser.newPage();
  await page.routeWebSocket(/^ws:\/\/fake\.invalid\//, (ws) => {
    ws.onMessage(() => {
      ws.send(JSON.stringify({ type: 'welcome', protocol: 1 }));
      ws.close({ code: 1011, reason: 'failing after the welcome' });
    });
  });
  await page.goto(`${server.http}/health`);
  await page.evaluate(async () => {
    const { MonitorClient } = await import('/ksync.js');
    window.opens = 0;
    window.attempts = [];
    const monitor = new MonitorClient('ws://fake.invalid/monitor', { reconnectDelay: { min: 20, max: 60000 } });
    monitor.on('open', () => { window.opens += 1; });
    monitor.on('reconnecting', (attempt) => window.attempts.push(attempt));
    monitor.start();
    window.monitor = monitor;
  });
  const attempts = await waitFor(async () => {
    const seen = await page.evaluate(() => window.attempts);
    return seen.length >= 3 && seen;
  }, 5000, 'three reconnects of the monitor');
  assert.deepEqual(attempts.slice(0, 3), [1, 2, 3]);
  assert.ok(await page.evaluate(() => window.opens) >= 3);
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});

/**
 * A MonitorClient (reconnect delay 10-20 ms) against a feed scripted here: the welcome of
 * session i (from 0) is `welcomeFor(i)` (an array: several messages). `sessions[i].closed` is
 * how it closed; the page's `window` records `opens`, `attempts`, `errors` ([code, closeCode]),
 * `closes` and `stats` (a count).
 */
async function fakeMonitor(welcomeFor) {
  const page = await browser.newPage();
  const sessions = [];
  await page.routeWebSocket(/^ws:\/\/fake\.invalid\//, (ws) => {
    const session = { closed: null };
    const welcome = welcomeFor(sessions.length);
    sessions.push(session);
    // A string goes as it is written (a number JSON.stringify would not write so); an array is
    // several messages.
    ws.onMessage(() => {
      for (const message of Array.isArray(welcome) ? welcome : [welcome]) {
        ws.send(typeof message === 'string' ? message : JSON.stringify(message));
      }
    });
    ws.onClose((code, reason) => {
      session.closed = { code, reason };
      ws.close({ code, reason });
    });
  });
  await page.goto(`${server.http}/health`);
  await page.evaluate(async () => {
    const { MonitorClient } = await import('/ksync.js');
    Object.assign(window, { opens: 0, attempts: [], errors: [], closes: [], stats: 0 });
    const monitor = new MonitorClient('ws://fake.invalid/monitor', { reconnectDelay: { min: 10, max: 20 } });
    monitor.on('open', () => { window.opens += 1; });
    monitor.on('reconnecting', (attempt) => window.attempts.push(attempt));
    monitor.on('error', (error) => window.errors.push([error.code, error.closeCode]));
    monitor.on('close', (close) => window.closes.push(close.code));
    monitor.on('stats', () => { window.stats += 1; });
    monitor.start();
    window.monitor = monitor;
  });
  return { page, sessions };
}

test('the monitor feed refuses a welcome of another protocol version: close 4001, an error, no reconnect', async () => {
  const { page, sessions } = await fakeMonitor(() => ({ type: 'welcome', protocol: 2, feed: 'monitor' }));
  await waitFor(() => sessions[0]?.closed, 5000, 'the monitor closed the connection');
  assert.equal(sessions[0].closed.code, 4001);
  await new Promise((resolve) => setTimeout(resolve, 300));
  assert.equal(sessions.length, 1, 'no reconnect after a welcome of another version');
  const seen = await page.evaluate(() => ({ opens: window.opens, attempts: window.attempts, errors: window.errors, closes: window.closes }));
  assert.deepEqual(seen, { opens: 0, attempts: [], errors: [['unsupported_protocol', 4001]], closes: [4001] });
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});

test('the monitor feed takes a welcome without an integer protocol as broken: error protocol, reconnect (not unsupported_protocol)', async () => {
  // Missing, then written as no integer (`2.0`, which JSON.parse reads as 2; `1.0`), then a
  // good one.
  const welcomes = [
    { type: 'welcome', feed: 'monitor' },
    '{"type":"welcome","protocol":2.0,"feed":"monitor"}',
    '{"type":"welcome","protocol":1.0,"feed":"monitor"}',
    { type: 'welcome', protocol: 1, feed: 'monitor' },
  ];
  const { page, sessions } = await fakeMonitor((i) => welcomes[Math.min(i, 3)]);
  await waitFor(() => page.evaluate(() => window.opens === 1), 5000, 'the monitor opened on the fourth connection');
  assert.equal(sessions.length, 4);
  for (const session of sessions.slice(0, 3)) assert.notEqual(session.closed?.code, 4001);
  assert.deepEqual(await page.evaluate(() => window.errors.map(([code]) => code)), ['protocol', 'protocol', 'protocol']);
  assert.deepEqual(await page.evaluate(() => window.attempts), [1, 2, 3]);
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});

test("the monitor feed does not pass on a server message named as one of its own notifications (open, close, reconnecting)", async () => {
  const { page, sessions } = await fakeMonitor(() => [
    { type: 'welcome', protocol: 1, feed: 'monitor' },
    { type: 'close', code: 4401, reason: 'fake', opened: false },
    { type: 'open' },
    { type: 'reconnecting' },
    { type: 'stats', connections: 3 },
  ]);
  // The stats after them arrive: they were read, and not passed on.
  await waitFor(() => page.evaluate(() => window.stats === 1), 5000, 'the stats after them');
  const seen = await page.evaluate(() => ({ opens: window.opens, attempts: window.attempts, closes: window.closes }));
  assert.deepEqual(seen, { opens: 1, attempts: [], closes: [] });
  assert.equal(sessions.length, 1);
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});

test('the monitor feed gives up a feed that falls silent (no stats within its timeout) and one that never welcomes, and connects again', async () => {
  const page = await browser.newPage();
  const sessions = [];
  await page.routeWebSocket(/^ws:\/\/fake\.invalid\//, (ws) => {
    const session = { index: sessions.length, closed: null };
    sessions.push(session);
    ws.onMessage(() => {
      // The first welcomes, then says nothing more (a dead path); the second never welcomes;
      // the later ones welcome and send stats.
      if (session.index === 1) return;
      ws.send(JSON.stringify({ type: 'welcome', protocol: 1, feed: 'monitor', intervalMs: 50 }));
      if (session.index >= 2) ws.send(JSON.stringify({ type: 'stats', connections: 0 }));
    });
    ws.onClose((code, reason) => {
      session.closed = { code, reason };
      ws.close({ code, reason });
    });
  });
  await page.goto(`${server.http}/health`);
  await page.evaluate(async () => {
    const { MonitorClient } = await import('/ksync.js');
    Object.assign(window, { opens: 0, closes: [], stats: 0 });
    const monitor = new MonitorClient('ws://fake.invalid/monitor', { reconnectDelay: { min: 10, max: 20 }, timeout: 200 });
    monitor.on('open', () => { window.opens += 1; });
    monitor.on('close', (close) => window.closes.push([close.code, close.opened]));
    monitor.on('stats', () => { window.stats += 1; });
    monitor.start();
    window.monitor = monitor;
  });
  await waitFor(() => page.evaluate(() => window.stats === 1), 5000, 'stats from the third feed');
  // (The third falls silent too after its stats: it may have been given up since.)
  assert.deepEqual((await page.evaluate(() => window.closes)).slice(0, 2), [[4009, true], [4009, false]]);
  assert.ok(await page.evaluate(() => window.opens) >= 2);
  for (const session of sessions.slice(0, 2)) assert.equal(session.closed?.code, 4009);
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});

// Page setup: the page's wall clock (`Date.now`) runs `window.clockStep` ms off, as after an
// NTP step or a user's change of the clock.
const STEPPED_CLOCK = `() => {
  const real = Date.now;
  window.clockStep = 0;
  Date.now = () => real() + window.clockStep;
}`;

test('a wall-clock step back while a send is in flight: metrics stay sane (elapsed times on the monotonic clock)', async () => {
  let publish = null;
  const { page } = await fakeRelayClient(browser, server.http, {
    options: { metricsInterval: 300 },
    setup: STEPPED_CLOCK,
    onMessage: (session, message) => {
      if (message.type === 'publish') publish = { session, message };
    },
  });
  await waitFor(() => page.evaluate(() => window.connects === 1), 5000, 'connected to the scripted relay');
  const sent = page.evaluate((event) => window.sendTracked(event), makeEvent('stepped'));
  await waitFor(() => publish, 5000, 'the publish');
  // A minute back while the publish waits for its ack.
  await page.evaluate(() => { window.clockStep = -60000; });
  publish.session.send(storedAck(publish.message));
  assert.deepEqual(await sent, { status: 'stored', seq: 1 });
  const metrics = await waitFor(async () => {
    const all = await page.evaluate(() => window.metrics);
    return all.some((m) => m.averageLatency !== 0) && all;
  }, 5000, 'the metrics of the ack');
  for (const m of metrics) {
    // One event sent in some 300 ms, a round trip of a few ms: not 1000 events a second, nor
    // a negative latency.
    assert.ok(m.eventsPerSecond >= 0 && m.eventsPerSecond < 100, JSON.stringify(metrics));
    assert.ok(m.averageLatency >= 0 && m.averageLatency < 5000, JSON.stringify(metrics));
    assert.ok(m.bandwidthUsage >= 0 && m.bandwidthUsage < 100000, JSON.stringify(metrics));
  }
  await page.evaluate(() => window.client.disconnect());
  await page.close();
});

test('backoff: a wall-clock step forward does not make a session that failed at once count as one that stayed up', async () => {
  const { page, relay } = await fakeRelayClient(browser, server.http, {
    options: { reconnectDelay: { min: 20, max: 60000 } },
    // The clock jumps a minute (the backoff maximum) ahead during each session.
    setup: `(client) => {
      (${STEPPED_CLOCK})();
      (${RECORD_ATTEMPTS})(client);
      client.on('connected', () => { window.clockStep += 60000; });
    }`,
    onMessage: (session, message) => {
      if (message.type === 'hello') session.close(1011, 'failing after the welcome');
    },
  });
  await relay.waitSessions(4);
  assert.deepEqual((await page.evaluate(() => window.attempts)).slice(0, 3), [1, 2, 3]);
  await page.evaluate(() => window.client.disconnect());

  // The monitor feed the same way.
  await page.evaluate(async () => {
    const { MonitorClient } = await import('/ksync.js');
    window.monitorAttempts = [];
    const monitor = new MonitorClient('ws://fake.invalid/monitor', { reconnectDelay: { min: 20, max: 60000 } });
    monitor.on('open', () => { window.clockStep += 60000; });
    monitor.on('reconnecting', (attempt) => window.monitorAttempts.push(attempt));
    monitor.start();
    window.monitor = monitor;
  });
  const attempts = await waitFor(async () => {
    const seen = await page.evaluate(() => window.monitorAttempts);
    return seen.length >= 3 && seen;
  }, 5000, 'three reconnects of the monitor');
  assert.deepEqual(attempts.slice(0, 3), [1, 2, 3]);
  await page.evaluate(() => window.monitor.stop());
  await page.close();
});
