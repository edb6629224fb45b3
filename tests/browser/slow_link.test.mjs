// The browser client over a slow but working link (testkit's `SlowLink` in front of the real
// server: each direction throttled, the browser's kernel buffer kept to what a slow path
// allows, so a large message waits in the page's `bufferedAmount` while it leaves).
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { launchBrowser, pageClient, sharedServer, startSlowLink, waitFor } from './lib.mjs';

let browser;

before(async () => {
  browser = await launchBrowser();
});

after(async () => {
  await browser?.close();
});

/** Publishes an event of `length` random letters (nothing for compression to shrink). */
const publishLarge = (page, id, length) => page.evaluate(({ id, length }) => {
  const letters = Array.from({ length }, () => String.fromCharCode(97 + Math.floor(Math.random() * 26))).join('');
  window.sendTracked({ id, type: 'large', data: { letters }, timestamp: Date.now(), version: 1 }).catch(() => {});
}, { id, length });

// A 700 KB publish takes ~1.4 s to cross a 512 KiB/s link, against a 500 ms heartbeatTimeout.
// Before, the ping sent behind it waited as long, the server was taken for dead at every
// ping (4009 heartbeat timeout), and the publish was sent again on the next session, for ever:
// never acknowledged. Its bytes leaving now keep the heartbeat waiting; a link that dies under
// a publish is still given up.
test('a publish longer than heartbeatTimeout to cross a slow link is acknowledged; a link dying under one is given up', async () => {
  const server = await sharedServer();
  const link = await startSlowLink(server.addr, 512 * 1024);
  const room = `ws://${link.addr}/ws/slow-publish-${process.pid}`;
  const setup = `(client) => {
    window.disconnects = [];
    client.on('disconnected', (d) => window.disconnects.push(d));
  }`;
  const page = await pageClient(browser, server.http, room, { heartbeat: 300, heartbeatTimeout: 500 }, setup);
  try {
    await publishLarge(page, 'large-1', 700_000);
    await waitFor(() => page.evaluate(() => window.acked.length === 1), 15000,
      'the large publish acknowledged');
    assert.deepEqual(await page.evaluate(() => window.acked.map((a) => a.status)), ['stored']);
    assert.deepEqual(await page.evaluate(() => window.disconnects), []);
    assert.equal(await page.evaluate(() => window.connects), 1);

    await publishLarge(page, 'large-2', 700_000);
    link.cut();
    const lost = await waitFor(() => page.evaluate(() => window.disconnects[0]), 10000,
      'the dead link given up');
    assert.equal(lost.code, 4009);
    assert.equal(await page.evaluate(() => window.acked.length), 1);
  } finally {
    await page.close();
    await link.stop();
  }
});
