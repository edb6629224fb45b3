// The browser client's `sync` and `conflict` notifications and its `compression` and `debug`
// options, against the real server with a Rust client on the other side of the room.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launchBrowser, makeEvent, pageClient, sharedServer, startPeer, waitFor } from './lib.mjs';

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

const ids = (events) => events.map((e) => e.id);

test('`sync` carries the events of a catch-up batch', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/sync-catch-up`;
  const history = [makeEvent('h', { n: 1 }), makeEvent('h', { n: 2 }), makeEvent('h', { n: 3 })];
  const writer = await pageClient(browser, server.http, room);
  try {
    for (const event of history) assert.equal((await writer.evaluate((e) => window.client.send(e), event)).status, 'stored');

    // A page reading the room from 0 gets the three in one catch-up batch, and one `sync`.
    const reader = await pageClient(browser, server.http, room, { since: 0 });
    const syncs = await waitFor(async () => {
      const all = await reader.evaluate(() => window.syncs);
      return all.length ? all : null;
    }, 5000, 'a sync notification');
    assert.deepEqual(syncs.map(ids), [ids(history)]);
    assert.deepEqual(syncs[0].map((e) => e.data), history.map((e) => e.data));
    assert.deepEqual(await reader.evaluate(() => window.received.map((r) => r.event.id)), ids(history));
    await reader.close();
  } finally {
    await writer.close();
    await server.stop();
  }
});

test('`sync` follows each acknowledged send (stored or duplicate) and each live batch', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/sync-acked`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const page = await pageClient(browser, server.http, room, {}, `(client) => {
      client.use('outgoing', (event) => ({ ...event, data: { ...event.data, stamped: true } }));
    }`);
    const syncs = () => page.evaluate(() => window.syncs);
    const mine = makeEvent('mine', { n: 1 });
    // Notified with the ack, before `send` resolves; as given to `send`, before middleware.
    assert.equal((await page.evaluate((e) => window.client.send(e), mine)).status, 'stored');
    assert.deepEqual(await syncs(), [[mine]]);
    await waitFor(() => rust.received().some((e) => e.id === mine.id), 5000, 'the Rust client got it');
    assert.deepEqual(rust.received().find((e) => e.id === mine.id).data, { n: 1, stamped: true });
    assert.equal((await page.evaluate((e) => window.client.send(e), mine)).status, 'duplicate');
    assert.deepEqual(await syncs(), [[mine], [mine]]);
    // A conflict is not in the room: no `sync`.
    const clash = { ...mine, data: { n: 2 } };
    assert.equal((await page.evaluate((e) => window.client.send(e), clash)).status, 'conflict');
    assert.equal((await syncs()).length, 2);

    // A live batch from the Rust client.
    const theirs = makeEvent('theirs', { from: 'rust' });
    rust.send(theirs);
    await waitFor(async () => (await syncs()).length === 3, 5000, 'a sync for the live batch');
    const live = (await syncs())[2];
    assert.deepEqual(live.map((e) => [e.id, e.data]), [[theirs.id, theirs.data]]);
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test('`conflict` is notified when the room holds other content under the same id and version', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/conflicted`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const page = await pageClient(browser, server.http, room);
    const theirs = makeEvent('doc', { text: 'written by rust' });
    rust.send(theirs);
    await waitFor(() => page.evaluate((id) => window.received.some((r) => r.event.id === id), theirs.id), 5000, 'the page saw the Rust revision');

    const ours = { ...theirs, data: { text: 'written by the page' } };
    const result = await page.evaluate((e) => window.client.send(e), ours);
    assert.equal(result.status, 'conflict');
    assert.deepEqual(result.held.data, theirs.data);
    const conflicts = await page.evaluate(() => window.conflicts);
    assert.equal(conflicts.length, 1, JSON.stringify(conflicts));
    assert.equal(conflicts[0].type, 'concurrent-edit');
    assert.equal(conflicts[0].ours.id, theirs.id);
    assert.deepEqual(conflicts[0].ours.data, ours.data);
    assert.deepEqual(conflicts[0].theirs.data, theirs.data);
    assert.equal(conflicts[0].theirs.version, 1);
    // The Rust client never got the page's revision: the room kept its own.
    assert.ok(!rust.received().some((e) => e.id === theirs.id));
    await page.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

// Page setup: an encode/decode middleware pair (the app's data goes out as `{enc}`, a reversed
// JSON text, and comes back decoded), as an encrypting app would have.
const ENCODING = `(client) => {
  const flip = (text) => [...text].reverse().join('');
  client.use('outgoing', (event) => ({ ...event, data: { enc: flip(JSON.stringify(event.data)) } }));
  client.use('incoming', (event) => ({ ...event, data: JSON.parse(flip(event.data.enc)) }));
}`;

test('`conflict` gives both sides in the app\'s form: ours before outgoing, theirs after incoming middleware', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/conflicted-encoded-${process.pid}`;
  const writer = await pageClient(browser, server.http, room, {}, ENCODING);
  const page = await pageClient(browser, server.http, room, {}, ENCODING);
  // A filter that keeps the room's revision from the app: the conflict comes without it.
  const filtered = await pageClient(browser, server.http, room, { filterSource: "(event) => event.data.text !== 'written first'" }, ENCODING);
  try {
    const theirs = makeEvent('doc', { text: 'written first' });
    assert.equal((await writer.evaluate((e) => window.client.send(e), theirs)).status, 'stored');
    await waitFor(() => page.evaluate((id) => window.received.some((r) => r.event.id === id), theirs.id), 5000, 'the page saw the first revision');
    // What the room holds is the encoded form.
    assert.ok(page.wsFrames.some((f) => !f.sent && f.text?.includes('"enc"') && f.text.includes(theirs.id)));

    const ours = { ...theirs, data: { text: 'written second' } };
    const result = await page.evaluate((e) => window.client.send(e), ours);
    assert.equal(result.status, 'conflict');
    assert.deepEqual(result.held.data, theirs.data);
    const conflicts = await page.evaluate(() => window.conflicts);
    assert.equal(conflicts.length, 1, JSON.stringify(conflicts));
    assert.equal(conflicts[0].type, 'concurrent-edit');
    assert.deepEqual(conflicts[0].ours, ours);
    assert.deepEqual(conflicts[0].theirs, theirs);

    const alsoOurs = { ...theirs, data: { text: 'written third' } };
    const refused = await filtered.evaluate((e) => window.client.send(e), alsoOurs);
    assert.deepEqual(refused, { status: 'conflict' });
    const seen = await filtered.evaluate(() => window.conflicts);
    assert.deepEqual(seen, [{ type: 'concurrent-edit', ours: alsoOurs, theirs: null }]);
    assert.deepEqual(await filtered.evaluate(() => window.received), []);
    assert.deepEqual(await page.evaluate(() => window.errors), []);
  } finally {
    for (const p of [writer, page, filtered]) await p.close();
    await server.stop();
  }
});

test('`compression: true`: the server agrees and big batches arrive deflated and are inflated', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/deflated`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const zipped = await pageClient(browser, server.http, room, { compression: true });
    const plain = await pageClient(browser, server.http, room);
    assert.equal(await zipped.evaluate(() => window.welcome.compression), true);
    assert.equal(await plain.evaluate(() => window.welcome.compression), false);
    const hello = (page) => JSON.parse(page.wsFrames.find((f) => f.sent && f.text?.includes('"hello"')).text);
    assert.equal(hello(zipped).compression, true);
    assert.equal(hello(plain).compression, undefined);

    // Far past the 1 KiB threshold, and very compressible.
    const big = makeEvent('big', { text: 'compressible '.repeat(2000) });
    rust.send(big);
    for (const page of [zipped, plain]) {
      await waitFor(() => page.evaluate((id) => window.received.some((r) => r.event.id === id), big.id), 5000, 'the page got the big event');
      const got = await page.evaluate((id) => window.received.find((r) => r.event.id === id).event, big.id);
      assert.deepEqual(got.data, big.data);
    }
    const json = JSON.stringify(big).length;
    const deflated = zipped.wsFrames.filter((f) => !f.sent && f.binary);
    assert.equal(deflated.length, 1, JSON.stringify(zipped.wsFrames.map(({ sent, binary, bytes }) => ({ sent, binary, bytes }))));
    assert.ok(deflated[0].bytes * 10 < json, `${deflated[0].bytes} bytes for ${json} of JSON`);
    // The page without compression got the same batch as text.
    assert.ok(!plain.wsFrames.some((f) => f.binary));
    assert.ok(plain.wsFrames.some((f) => !f.sent && f.text?.includes(big.id) && f.bytes > json));
    assert.deepEqual(zipped.problems, []);
    await zipped.close();
    await plain.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});

test('`debug: true` logs what goes in and out with console.debug; the default logs nothing', async () => {
  const server = await sharedServer();
  const room = `${server.ws}/ws/debugged`;
  const rust = startPeer(room);
  try {
    await rust.waitConnected();
    const loud = await pageClient(browser, server.http, room, { debug: true });
    const quiet = await pageClient(browser, server.http, room);
    const sent = makeEvent('loud', { n: 1 });
    assert.equal((await loud.evaluate((e) => window.client.send(e), sent)).status, 'stored');
    const theirs = makeEvent('theirs', { n: 2 });
    rust.send(theirs);
    for (const page of [loud, quiet]) {
      await waitFor(() => page.evaluate((id) => window.received.some((r) => r.event.id === id), theirs.id), 5000, 'the page got the Rust event');
    }
    const lines = loud.debugLines.filter((line) => line.startsWith('[ksync] '));
    for (const expected of [/^\[ksync\] hello /, /^\[ksync\] received welcome \d+ bytes$/, /^\[ksync\] publish 1 1 events \d+ bytes$/,
      /^\[ksync\] received ack \d+ bytes$/, /^\[ksync\] received events \d+ bytes$/]) {
      assert.ok(lines.some((line) => expected.test(line)), `${expected} in ${JSON.stringify(lines)}`);
    }
    assert.deepEqual(quiet.debugLines.filter((line) => line.includes('[ksync]')), []);
    await loud.close();
    await quiet.close();
  } finally {
    await rust.quit();
    await server.stop();
  }
});
