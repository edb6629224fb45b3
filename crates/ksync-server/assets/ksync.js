// kSync browser client: one ES module, no dependencies, no build step.
//
// Speaks the WebSocket protocol of docs/PROTOCOL.md: `hello` / `welcome`, catch-up and live
// `events`, `publish` / `ack`, `error`, close codes. Served by `ksync serve` at `/ksync.js`:
//
//   import { WebSocketSyncClient } from '/ksync.js';
//   const client = new WebSocketSyncClient('ws://localhost:8080/ws/chat', {
//     auth: { type: 'jwt', token: '...' },          // or { type: 'apikey', key: '...' }
//   });
//   client.on('event', (event, meta) => console.log(meta.seq, event));
//   await client.connect();
//   await client.send({ id: '1', type: 'message', data: { text: 'hi' },
//                       timestamp: Date.now(), version: 1 });
//
// Browsers cannot set headers on a WebSocket, so credentials travel as subprotocol entries
// (`ksync.v1` plus `ksync.auth.<token>` or `ksync.apikey.<key>`); the server answers with
// `ksync.v1` only and never logs the entries.
//
// Delivery: every sent event stays in an in-memory outbox until the server acknowledges it,
// and goes out again after a reconnect (the server drops exact duplicates). The client
// remembers the highest sequence number it saw (`cursor`, from `events` and from its own
// `ack`s) and resumes from it after a reconnect, so nothing published meanwhile is missed.

/** The protocol version this module speaks. */
export const PROTOCOL_VERSION = 1;
/** The WebSocket subprotocol of kSync. */
export const SUBPROTOCOL = 'ksync.v1';
const AUTH_PREFIX = 'ksync.auth.';
const APIKEY_PREFIX = 'ksync.apikey.';
// RFC 7230 token characters: what a Sec-WebSocket-Protocol entry may hold.
const TOKEN_CHARS = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
// Close codes after which reconnecting cannot help (docs/PROTOCOL.md, "Close codes"): a
// client the server cannot read (1002, 1003, 1007, 4000), another protocol version (4001),
// missing, wrong or expired credentials (4401: the same ones would be refused), a bad room
// name (4400) or a room the credentials do not cover (4403). The Rust client stops on the
// same ones.
const FATAL_CLOSE_CODES = new Set([1002, 1003, 1007, 4000, 4001, 4400, 4401, 4403]);
// `error` codes the relay sends just before refusing a connection in-band (close 4400, 4401,
// 4403 or 4429): a browser cannot see the HTTP status of a refused upgrade.
const REFUSAL_CODES = new Set(['unauthorized', 'forbidden', 'rate_limited', 'bad_room']);
// Events per `publish` when the outbox is flushed after a reconnect.
const RESEND_BATCH = 256;

/**
 * The `Sec-WebSocket-Protocol` entries for `auth` (`{type: 'jwt', token}`,
 * `{type: 'apikey', key}`, or nothing).
 */
export function protocolsFor(auth) {
  if (!auth) return [SUBPROTOCOL];
  let entry;
  if (auth.type === 'jwt' || auth.type === 'token' || auth.type === 'bearer') {
    entry = AUTH_PREFIX + String(auth.token ?? '');
  } else if (auth.type === 'apikey' || auth.type === 'apiKey') {
    entry = APIKEY_PREFIX + String(auth.key ?? '');
  } else {
    throw new TypeError(`unknown auth type ${JSON.stringify(auth.type)} (use 'jwt' or 'apikey')`);
  }
  if (!TOKEN_CHARS.test(entry) || entry.endsWith('.')) {
    throw new TypeError('the credential must be non-empty and made of letters, digits and -._~+ (a JWT is)');
  }
  return [SUBPROTOCOL, entry];
}

/**
 * When a JWT in `auth` expires (its `exp`, as a Date), or null: not a JWT, or no `exp`.
 * Only read, never verified: the server decides; this spares it a token known to be stale.
 */
export function tokenExpiry(auth) {
  if (!auth || auth.type === 'apikey' || auth.type === 'apiKey') return null;
  const parts = String(auth.token ?? '').split('.');
  if (parts.length !== 3) return null;
  try {
    const base64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    const claims = JSON.parse(atob(base64.padEnd(Math.ceil(base64.length / 4) * 4, '=')));
    return Number.isFinite(claims?.exp) ? new Date(claims.exp * 1000) : null;
  } catch {
    return null;
  }
}

/** HTTP headers carrying `auth`, for `fetch` (which, unlike WebSocket, may set headers). */
export function headersFor(auth) {
  if (!auth) return {};
  if (auth.type === 'apikey' || auth.type === 'apiKey') return { 'X-Api-Key': String(auth.key ?? '') };
  return { Authorization: `Bearer ${auth.token ?? ''}` };
}

/** `on` / `off` / `emit`, as in the spec's SyncClient interface. */
class Emitter {
  #handlers = new Map();

  /** Adds `handler` for `type`; returns a function that removes it. */
  on(type, handler) {
    if (typeof handler !== 'function') throw new TypeError('handler must be a function');
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(handler);
    return () => this.off(type, handler);
  }

  /** Removes `handler` from `type`. */
  off(type, handler) {
    this.#handlers.get(type)?.delete(handler);
  }

  emit(type, ...args) {
    const handlers = this.#handlers.get(type);
    if (!handlers || handlers.size === 0) return false;
    for (const handler of [...handlers]) {
      try {
        handler(...args);
      } catch (error) {
        // A failing handler must not break the connection; report it on the next tick.
        setTimeout(() => { throw error; }, 0);
      }
    }
    return true;
  }
}

/** An error the server sent (`error` message) or a connection failure. */
export class KSyncError extends Error {
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'KSyncError';
    this.code = code;
    Object.assign(this, details);
  }
}

function toWebSocketUrl(url) {
  const parsed = new URL(url, typeof location === 'undefined' ? undefined : location.href);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError(`not a WebSocket URL: ${url}`);
  }
  return parsed;
}

function backoff(attempt, min, max) {
  const base = Math.min(max, min * 2 ** Math.min(attempt - 1, 16));
  // Jitter (50-100%) so that clients dropped together do not come back together.
  return base / 2 + Math.random() * (base / 2);
}

function checkEvent(event) {
  if (!event || typeof event !== 'object') throw new TypeError('an event is an object');
  if (typeof event.id !== 'string' || event.id === '') throw new TypeError('event.id must be a non-empty string');
  if (typeof event.type !== 'string' || event.type === '') throw new TypeError('event.type must be a non-empty string');
  if (!Number.isSafeInteger(event.version) || event.version < 1) throw new TypeError('event.version must be an integer >= 1');
  if (!Number.isSafeInteger(event.timestamp) || event.timestamp < 0) throw new TypeError('event.timestamp must be milliseconds since the epoch');
}

async function inflateRaw(data) {
  const stream = new Blob([data]).stream().pipeThrough(new DecompressionStream('deflate-raw'));
  return new Response(stream).text();
}

/**
 * The spec's WebSocketSyncClient for browsers.
 *
 * Options (defaults): `auth` (none), `reconnect` (true), `heartbeat` (30000: the server pings,
 * the browser answers by itself), `compression` (false; deflated batches need
 * `DecompressionStream`), `since` (undefined: start with the live stream; 0: the whole room
 * history; N: after seq N), `logId` (the `logId` that `since` counts in, from a saved `cursor` and
 * `logId`: another log is read from 0), `reconnectDelay` ({min: 250, max: 30000} ms),
 * `maxOutbox` (10000).
 *
 * Notifications (`on(type, handler)`): `connected` (welcome), `disconnected` ({code, reason}),
 * `reconnecting` (attempt), `event` (event, {seq, room}), `sync` (events of a catch-up batch),
 * `ack` (results), `conflict` ({ours, theirs}), `error` (KSyncError).
 */
export class WebSocketSyncClient extends Emitter {
  #url;
  #protocols;
  #expiry;
  #options;
  #socket = null;
  #connected = false;
  #stopped = true;
  #attempt = 0;
  #retryTimer = null;
  #cursor = null;
  // The room log `#cursor` belongs to (`welcome.logId`).
  #logId = null;
  #serverVersion = 0;
  // Set on `cursor_ahead`: this session ends and the next one reads the room from 0.
  #resyncing = false;
  // The `error` of an in-band refusal, until its close arrives.
  #refusal = null;
  #room = null;
  #nextRef = 1;
  #outbox = [];
  #inFlight = new Map();
  #waiters = [];
  #closeWaiters = [];
  #chain = Promise.resolve();

  constructor(url, options = {}) {
    super();
    this.#url = toWebSocketUrl(url).href;
    this.#options = {
      reconnect: options.reconnect ?? true,
      heartbeat: options.heartbeat ?? 30000,
      compression: Boolean(options.compression) && typeof DecompressionStream !== 'undefined',
      reconnectDelay: { min: 250, max: 30000, ...(options.reconnectDelay ?? {}) },
      maxOutbox: options.maxOutbox ?? 10000,
    };
    this.setAuth(options.auth);
    if (options.since !== undefined && options.since !== null) {
      if (!Number.isSafeInteger(options.since) || options.since < 0) throw new TypeError('since must be an integer >= 0');
      this.#cursor = options.since;
    }
    if (options.logId !== undefined && options.logId !== null) this.#logId = String(options.logId);
  }

  /** The highest sequence number seen (null before the first session without `since`). */
  get cursor() { return this.#cursor; }
  /** The room log the cursor belongs to (`welcome.logId`; keep it with a saved cursor). */
  get logId() { return this.#logId; }
  /** Whether a session is up (after `welcome`). */
  get connected() { return this.#connected; }
  /** The room of the current or last session. */
  get room() { return this.#room; }
  /** Sent events not yet acknowledged. */
  get pending() { return this.#outbox.length + [...this.#inFlight.values()].reduce((n, items) => n + items.length, 0); }

  /**
   * Replaces the credentials for the next connection (e.g. a fresh token after the server
   * closed the connection with 4401, credentials expired); call `connect()` afterwards if the
   * client stopped. The open connection, if any, goes on until the server closes it.
   */
  setAuth(auth) {
    this.#protocols = protocolsFor(auth);
    this.#expiry = tokenExpiry(auth);
  }

  /**
   * Connects and resolves on the server's `welcome`. When the first attempt fails it rejects,
   * and with `reconnect` the client keeps trying in the background (until `disconnect`).
   * It stops (rejecting, with an `error` notification) on close codes that reconnecting
   * cannot fix (1002, 1003, 1007, 4000, 4001, 4400, 4401, 4403): e.g. refused credentials
   * (code `unauthorized`, `closeCode` 4401) or a room they do not cover (`forbidden`, 4403),
   * and, without trying, on a JWT whose `exp` has passed (code `token_expired`): bring fresh
   * credentials with `setAuth`, then connect. Too many failed logins (`rate_limited`, 4429)
   * are retried later, with backoff.
   */
  connect() {
    if (this.#connected) return Promise.resolve();
    const result = new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
    if (this.#stopped) {
      this.#stopped = false;
      this.#attempt = 0;
      this.#open();
    }
    return result;
  }

  /** Closes the connection (1000) and stops reconnecting. Unacknowledged events stay queued. */
  disconnect() {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#settleWaiters(new KSyncError('disconnected', 'disconnect() was called'));
    const socket = this.#socket;
    if (!socket || socket.readyState === WebSocket.CLOSED) return Promise.resolve();
    const closed = new Promise((resolve) => this.#closeWaiters.push(resolve));
    socket.close(1000, 'client disconnect');
    return closed;
  }

  /**
   * Queues `event` and resolves with its result once the server acknowledged it
   * (`{status: 'stored', seq}`, `{status: 'duplicate', seq}` or `{status: 'conflict', held}`).
   * Rejects for an event the server refuses (`invalid`). While disconnected the event waits
   * and goes out on the next connection.
   */
  send(event) {
    try {
      checkEvent(event);
    } catch (error) {
      return Promise.reject(error);
    }
    if (this.pending >= this.#options.maxOutbox) {
      return Promise.reject(new KSyncError('outbox_full', `more than ${this.#options.maxOutbox} events wait for the server`));
    }
    const wire = { id: event.id, type: event.type, data: event.data ?? null, timestamp: event.timestamp, version: event.version };
    if (event.origin !== undefined) wire.origin = event.origin;
    return new Promise((resolve, reject) => {
      this.#outbox.push({ event: wire, resolve, reject });
      if (this.#connected) this.#flush();
    });
  }

  #open() {
    // A browser never sees the 401 of a refused upgrade (only a failed connection): a token
    // known to be expired would be retried, and counted as a failed login, forever.
    if (this.#expiry !== null && this.#expiry.getTime() <= Date.now()) {
      this.#stop(new KSyncError('token_expired', `the token expired at ${this.#expiry.toISOString()}; setAuth() a fresh one`));
      return;
    }
    let socket;
    try {
      socket = new WebSocket(this.#url, this.#protocols);
    } catch (error) {
      this.#failed(new KSyncError('connect', `cannot open ${this.#url}: ${error.message}`));
      return;
    }
    socket.binaryType = 'arraybuffer';
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      opened = true;
      const hello = { type: 'hello', protocol: PROTOCOL_VERSION };
      if (this.#cursor !== null) hello.since = this.#cursor;
      if (this.#options.compression) hello.compression = true;
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = (message) => {
      // Decompression is asynchronous: a chain keeps messages in arrival order.
      this.#chain = this.#chain.then(() => this.#receive(socket, message.data)).catch((error) => {
        this.emit('error', error instanceof KSyncError ? error : new KSyncError('bad_message', String(error?.message ?? error)));
      });
    };
    socket.onclose = (close) => {
      this.#chain = this.#chain.then(() => this.#closed(socket, close, opened));
    };
  }

  async #receive(socket, data) {
    if (socket !== this.#socket) return;
    const text = typeof data === 'string' ? data : await inflateRaw(data);
    const message = JSON.parse(text);
    switch (message.type) {
      case 'welcome': return this.#welcome(message);
      case 'events': return this.#events(message.events ?? []);
      case 'snapshot': return undefined;
      case 'ack': return this.#ack(message);
      case 'error': return this.#serverError(message);
      default: return undefined; // Newer servers may add messages: ignore what we do not know.
    }
  }

  #welcome(welcome) {
    const logId = typeof welcome.logId === 'string' ? welcome.logId : null;
    if (logId !== null && this.#logId !== null && logId !== this.#logId && this.#cursor > 0) {
      // Another log than the one our cursor counts in (the room was reset, or another server
      // answers here), even if it has grown past the cursor: read it again from 0.
      this.#logId = logId;
      this.#cursor = 0;
      this.#resyncing = true;
      this.emit('error', new KSyncError('room_reset', `the room's log changed (${logId}): syncing again from the start`));
      this.#socket?.close(1000, 'resync from 0');
      return;
    }
    if (logId !== null) this.#logId = logId;
    this.#serverVersion = welcome.serverVersion;
    this.#room = welcome.room;
    // Without a cursor the session starts with the live stream: we hold everything up to here.
    if (this.#cursor === null) this.#cursor = welcome.serverVersion;
    this.#connected = true;
    this.#attempt = 0;
    this.emit('connected', welcome);
    for (const waiter of this.#waiters.splice(0)) waiter.resolve();
    // Everything that was in flight when the last connection dropped goes out again first.
    const resend = [...this.#inFlight.values()].flat();
    this.#inFlight.clear();
    this.#outbox.unshift(...resend);
    this.#flush();
  }

  #events(batch) {
    // Ending a session to read the room again from 0: all of this comes again there.
    if (this.#resyncing) return;
    const events = [];
    for (const { seq, event } of batch) {
      // Each seq arrives once; anything at or below the cursor was already seen.
      if (this.#cursor !== null && seq <= this.#cursor) continue;
      this.#cursor = seq;
      events.push(event);
      this.emit('event', event, { seq, room: this.#room });
    }
    const last = batch.length ? batch[batch.length - 1].seq : 0;
    if (events.length && last <= this.#serverVersion) this.emit('sync', events);
  }

  #ack(ack) {
    const items = this.#inFlight.get(ack.ref);
    if (!items) return;
    this.#inFlight.delete(ack.ref);
    const results = ack.results ?? [];
    this.emit('ack', results);
    items.forEach((item, i) => {
      const result = results[i] ?? { status: 'failed', message: 'no result for this event' };
      switch (result.status) {
        case 'stored':
          if (this.#cursor === null || result.seq > this.#cursor) this.#cursor = result.seq;
          item.resolve(result);
          break;
        case 'duplicate':
          item.resolve(result);
          break;
        case 'conflict':
          // `held` is left out of acks past their size bound: the room's revision is in its stream.
          this.emit('conflict', { type: 'concurrent-edit', ours: item.event, theirs: result.held ?? null });
          item.resolve(result);
          break;
        case 'invalid':
          item.reject(new KSyncError('invalid', result.message ?? 'invalid event', { event: item.event }));
          break;
        default:
          // `failed`: the server could not store it; it goes out again after a reconnect.
          this.#outbox.push(item);
      }
    });
  }

  #serverError(message) {
    const error = new KSyncError(message.code, message.message, { ref: message.ref });
    if (REFUSAL_CODES.has(message.code) && !this.#connected) {
      // Told once, when the close that follows it arrives (see `#closed`).
      this.#refusal = error;
      return;
    }
    if (message.code === 'cursor_ahead' && this.#socket) {
      // The room is behind our cursor (reset, or another log at this address): what it holds
      // now is not what we saw. Read it again from 0, at once, on a new session.
      this.#cursor = 0;
      this.#resyncing = true;
      this.#socket.close(1000, 'resync from 0');
    }
    if (message.ref !== undefined && this.#inFlight.has(message.ref)) {
      for (const item of this.#inFlight.get(message.ref)) item.reject(error);
      this.#inFlight.delete(message.ref);
    }
    this.emit('error', error);
  }

  #flush() {
    const socket = this.#socket;
    while (this.#outbox.length && socket && socket.readyState === WebSocket.OPEN) {
      const items = this.#outbox.splice(0, RESEND_BATCH);
      const ref = this.#nextRef++;
      this.#inFlight.set(ref, items);
      socket.send(JSON.stringify({ type: 'publish', ref, events: items.map((item) => item.event) }));
    }
  }

  #closed(socket, close, opened) {
    // `disconnect()` waits for the socket it closed, even if `connect()` opened another since.
    for (const resolve of this.#closeWaiters.splice(0)) resolve();
    if (socket !== this.#socket) return;
    this.#socket = null;
    const wasConnected = this.#connected;
    this.#connected = false;
    if (wasConnected) this.emit('disconnected', { code: close.code, reason: close.reason });
    const resync = this.#resyncing;
    this.#resyncing = false;
    const refusal = this.#refusal;
    this.#refusal = null;
    if (this.#stopped) return;
    if (resync) {
      this.#open();
      return;
    }
    if (refusal !== null) {
      // Refused in-band: why (`unauthorized`, `forbidden`, `bad_room`: stop; `rate_limited`:
      // retry later, with backoff).
      refusal.closeCode = close.code;
      if (FATAL_CLOSE_CODES.has(close.code)) this.#stop(refusal);
      else this.#failed(refusal);
      return;
    }
    if (FATAL_CLOSE_CODES.has(close.code)) {
      this.#stop(new KSyncError('closed', `server closed the connection: ${close.code} ${close.reason}`, { closeCode: close.code }));
      return;
    }
    const reason = opened
      ? `connection closed (${close.code}${close.reason ? ` ${close.reason}` : ''})`
      : 'connection failed (server down, unreachable, or full)';
    this.#failed(new KSyncError('connect', reason, { closeCode: close.code }));
  }

  /** Stops reconnecting: `error` rejects the waiting `connect()` calls and is notified once. */
  #stop(error) {
    this.#stopped = true;
    this.#settleWaiters(error);
    this.emit('error', error);
  }

  #failed(error) {
    this.#settleWaiters(error);
    if (!this.#options.reconnect) {
      this.#stopped = true;
      this.emit('error', error);
      return;
    }
    this.#attempt += 1;
    const { min, max } = this.#options.reconnectDelay;
    this.emit('reconnecting', this.#attempt);
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      if (!this.#stopped) this.#open();
    }, backoff(this.#attempt, min, max));
  }

  #settleWaiters(error) {
    for (const waiter of this.#waiters.splice(0)) waiter.reject(error);
  }
}

/**
 * The server's monitor feed (`/monitor`, docs/PROTOCOL.md "Monitor feed"): `stats` every
 * second, `client` joins and leaves, and the `events` stored in every room the credentials may
 * read. Reconnects with backoff. Notifications: `open` (welcome), `stats`, `client`, `events`,
 * `error`, `close` ({code, reason, opened}), `reconnecting` (attempt, delay ms).
 */
export class MonitorClient extends Emitter {
  #url;
  #protocols;
  #options;
  #socket = null;
  #stopped = true;
  #attempt = 0;
  #timer = null;

  constructor(url, options = {}) {
    super();
    this.#url = toWebSocketUrl(url).href;
    this.#protocols = protocolsFor(options.auth);
    this.#options = {
      recent: options.recent ?? 20,
      tail: options.tail ?? true,
      reconnectDelay: { min: 250, max: 10000, ...(options.reconnectDelay ?? {}) },
    };
  }

  start() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#open();
  }

  stop() {
    this.#stopped = true;
    clearTimeout(this.#timer);
    this.#socket?.close(1000, 'monitor stopped');
    this.#socket = null;
  }

  #open() {
    const socket = new WebSocket(this.#url, this.#protocols);
    this.#socket = socket;
    let opened = false;
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: 'hello', protocol: PROTOCOL_VERSION, tail: this.#options.tail, recent: this.#options.recent }));
    };
    socket.onmessage = (message) => {
      if (socket !== this.#socket) return;
      let parsed;
      try {
        parsed = JSON.parse(message.data);
      } catch {
        this.emit('error', new KSyncError('bad_message', 'the monitor sent something that is not JSON'));
        return;
      }
      if (parsed.type === 'welcome') {
        opened = true;
        this.#attempt = 0;
        this.emit('open', parsed);
      } else if (parsed.type === 'error') {
        this.emit('error', new KSyncError(parsed.code, parsed.message));
      } else {
        this.emit(parsed.type, parsed);
      }
    };
    socket.onclose = (close) => {
      if (socket !== this.#socket) return;
      this.#socket = null;
      this.emit('close', { code: close.code, reason: close.reason, opened });
      if (this.#stopped || FATAL_CLOSE_CODES.has(close.code)) return;
      this.#attempt += 1;
      const { min, max } = this.#options.reconnectDelay;
      const delay = backoff(this.#attempt, min, max);
      this.emit('reconnecting', this.#attempt, delay);
      this.#timer = setTimeout(() => { if (!this.#stopped) this.#open(); }, delay);
    };
  }
}

/**
 * Asks the server who `auth` is (a plain GET of the monitor path, where headers can be set).
 * Resolves `{ok: true, subject, authRequired}` or `{ok: false, status, error}`.
 */
export async function whoAmI(baseUrl, auth, path = '/monitor') {
  const url = new URL(path, baseUrl);
  if (url.protocol === 'ws:') url.protocol = 'http:';
  if (url.protocol === 'wss:') url.protocol = 'https:';
  const response = await fetch(url, { headers: headersFor(auth), cache: 'no-store' });
  let body = {};
  try {
    body = await response.json();
  } catch {
    // Not JSON: keep the status only.
  }
  if (response.ok) return { ok: true, subject: body.subject, authRequired: body.authRequired };
  return { ok: false, status: response.status, error: body.error ?? response.statusText };
}
