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
// 4403 or 4429): a browser cannot see the HTTP status of a refused upgrade. Also its answer to
// a `hello` of another protocol version (close 4001): one error, carrying the close code.
const REFUSAL_CODES = new Set(['unauthorized', 'forbidden', 'rate_limited', 'bad_room', 'unsupported_protocol']);
// Most events per `publish` (the relay's own limit per message is larger).
const MAX_BATCH = 256;
// Bytes of a `publish` besides its events: `{"type":"publish","ref":N,"events":[...]}`.
const PUBLISH_OVERHEAD = 64;
// What the relay takes when its `welcome` does not say (docs/PROTOCOL.md, limits).
const DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024;
// The range of `welcome.maxMessageSize` (a relay refuses to start with another value): a
// `welcome` outside it would have every queued event refused as too large (or let publishes
// grow past what the relay reads), so it is refused, as by the Rust client.
const MIN_SERVER_MESSAGE_SIZE = 1024;
const MAX_SERVER_MESSAGE_SIZE = 8 * 1024 * 1024;
// The most bytes a compressed frame may inflate to (the Rust client's CLIENT_MAX_MESSAGE_SIZE:
// twice the largest `maxMessageSize`). Past it the frame is refused (`bad_binary`), and so is a
// text frame larger than it (`bad_message`).
const MAX_INFLATED_SIZE = 16 * 1024 * 1024;
// What frames received and not yet read may hold by default (`maxIncomingBytes`): four of the
// largest frames a relay sends. Each frame also counts `FRAME_OVERHEAD` (what holding it on
// the chain costs besides its text), so a flood of tiny frames is bounded too.
const DEFAULT_MAX_INCOMING_BYTES = 64 * 1024 * 1024;
const FRAME_OVERHEAD = 256;
// After a failed upgrade, the answers to a plain GET of the URL that say there is no endpoint
// there at all (see `#probe`), and how long that GET may take.
const NO_ENDPOINT_STATUSES = new Set([404, 405, 410]);
const PROBE_TIMEOUT_MS = 5000;
// The event rules (ksync-core's `Event::validate`, which the relay applies to every publish):
// checked on the events the app sends and on those received.
const MAX_NAME_BYTES = 256;
const MAX_DATA_DEPTH = 100;
// Received events (ksync-core's `Event::validate_received`) may nest deeper: older builds took
// data up to 128 levels deep, their relays still serve what they stored and older replicas keep
// it; skipping those here would leave this replica without what the others hold.
const MAX_RECEIVED_DATA_DEPTH = 128;
const STRATEGIES = new Set(['event-level', 'batch', 'state-based']);
// The clock leeway a server gives a JWT's `exp` unless configured otherwise (ksync-server's
// `AuthConfig::leeway`, `--jwt-leeway-secs`): the client refuses a token up front only past it.
const JWT_LEEWAY_MS = 5000;

const UTF8 = new TextEncoder();
/** Bytes of `text` on the wire (UTF-8; `text.length` counts UTF-16 units). */
function utf8Length(text) {
  return UTF8.encode(text).byteLength;
}

/** Whether this browser can inflate raw DEFLATE (`DecompressionStream('deflate-raw')`). */
function canInflateRaw() {
  if (typeof DecompressionStream === 'undefined') return false;
  try {
    new DecompressionStream('deflate-raw');
    return true;
  } catch {
    return false; // The API without the format (older browsers): ask for no compression.
  }
}

// The longest delay a timer takes: past it `setTimeout` and `setInterval` fire at once (a
// `heartbeat` or reconnect delay of 2^31 ms would spin).
const MAX_DELAY_MS = 2 ** 31 - 1;

/** `value` (`fallback` when absent), an integer of 1 to `max`; a TypeError else (`0`, `-1`,
 * `'abc'`, `1.5`, `NaN` ...: a size or delay that cannot be meant). */
function positiveInteger(value, name, fallback, max = Number.MAX_SAFE_INTEGER) {
  if (value === undefined || value === null) return fallback;
  if (!Number.isSafeInteger(value) || value < 1 || value > max) {
    throw new TypeError(`${name} must be an integer from 1 to ${max}, not ${JSON.stringify(value) ?? String(value)}`);
  }
  return value;
}

/** A delay in ms (1 ms to `MAX_DELAY_MS`). */
function delayOption(value, name, fallback) {
  return positiveInteger(value, name, fallback, MAX_DELAY_MS);
}

/**
 * The `reconnectDelay` option ({min, max} ms; either may be left out): both delays of at least
 * 1 ms and `min <= max`, as the Rust builder asks (a zero or non-numeric `min` made the backoff
 * retry a failing server as fast as the browser could). A left-out bound follows the other
 * when the default would cross it (`{max: 100}` is 100 to 100).
 */
function reconnectDelayOption(value, defaults) {
  if (value === undefined || value === null) return { ...defaults };
  if (typeof value !== 'object' || Array.isArray(value)) {
    throw new TypeError(`reconnectDelay must be an object {min, max} (ms), not ${JSON.stringify(value) ?? String(value)}`);
  }
  const given = {
    min: delayOption(value.min, 'reconnectDelay.min', undefined),
    max: delayOption(value.max, 'reconnectDelay.max', undefined),
  };
  const min = given.min ?? Math.min(defaults.min, given.max ?? defaults.min);
  const max = given.max ?? Math.max(defaults.max, min);
  if (min > max) throw new TypeError(`reconnectDelay.min (${min}) must not be above reconnectDelay.max (${max})`);
  return { min, max };
}

/**
 * The spec's `filter` option as a predicate. `'public-only'` is the spec's `!event.data.private`:
 * an event whose `data.private` is truthy (`true`, `1`, `"yes"`, `{}` ...) stays home, as in the
 * Rust client, so both keep the same events private.
 */
function filterFor(filter) {
  if (filter === undefined || filter === null) return null;
  if (filter === 'public-only') return (event) => !event?.data?.private;
  if (typeof filter === 'function') return filter;
  throw new TypeError(`filter must be a function or 'public-only', not ${JSON.stringify(filter)}`);
}

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
    // `exp` in whole seconds as the server reads it (RFC 7519's NumericDate may have a fraction,
    // which ksync-server rounds): taken as is, a token the server already refuses (exp 99.4:
    // 99) was still sent, and refused as `unauthorized`, for up to half a second, and one it
    // still takes (exp 99.6: 100) refused here up to half a second early. A negative one the
    // server refuses as malformed: no expiry to foresee.
    const exp = claims?.exp;
    return Number.isFinite(exp) && exp >= 0 ? new Date(Math.round(exp) * 1000) : null;
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

// A room name (ksync-core's `Name`): 1 to 128 of `[A-Za-z0-9._-]`, not starting with a dot.
const ROOM_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$/;

/**
 * `url` as a WebSocket URL (`http(s):` becomes `ws(s):`). Refuses (`bad_room`) a path with
 * `.` or `..` segments, raw or percent-encoded (`%2e`): `URL` resolves them, so
 * `ws://h/ws/%2e%2e` would open `ws://h/` (the default room) and `/ws/.%2e/x` open `/x`,
 * where the server refuses `/ws/%2e%2e` as a bad room name (the Rust client sends the path as
 * given). Refuses a room (the segment after `ws`, percent-decoded) that breaks the name rules:
 * the server would refuse it too (`bad_room`, 400).
 */
function toWebSocketUrl(url) {
  // The URL as `URL` reads it: without tabs and newlines (anywhere) or spaces and controls
  // at its ends, `\` taken for `/`, the path ending at `?` or `#`.
  const written = String(url).replace(/[\t\n\r]/g, '').replace(/^[\0- ]+|[\0- ]+$/g, '').split(/[?#]/)[0];
  const dots = (segment) => /^(\.|%2e){1,2}$/i.test(segment);
  const writtenSegments = written.split(/[/\\]/);
  // A relative URL's leading `./` or `../` (`'./ws/chat'`) is how it is meant to resolve:
  // only dot segments after the first other one are refused.
  const first = writtenSegments.findIndex((segment) => segment !== '' && !dots(segment));
  if (first >= 0 && writtenSegments.slice(first).some(dots)) {
    throw new KSyncError('bad_room', `${url} has a '.' or '..' path segment: it would open another path than the one given`);
  }
  const parsed = new URL(url, typeof location === 'undefined' ? undefined : location.href);
  if (parsed.protocol === 'http:') parsed.protocol = 'ws:';
  if (parsed.protocol === 'https:') parsed.protocol = 'wss:';
  if (parsed.protocol !== 'ws:' && parsed.protocol !== 'wss:') {
    throw new TypeError(`not a WebSocket URL: ${url}`);
  }
  const segments = parsed.pathname.split('/');
  if (segments.length >= 2 && segments[segments.length - 2] === 'ws') {
    let room = null;
    try {
      room = decodeURIComponent(segments[segments.length - 1]);
    } catch {
      // Not percent-decodable: no name.
    }
    if (room === null || !ROOM_NAME.test(room)) {
      throw new KSyncError('bad_room', `${url} names a room the server refuses: a room name is 1 to 128 letters, digits, '.', '_' or '-', not starting with '.'`);
    }
  }
  return parsed;
}

function backoff(attempt, min, max) {
  const base = Math.min(max, min * 2 ** Math.min(attempt - 1, 16));
  // Jitter (50-100%) so that clients dropped together do not come back together.
  return base / 2 + Math.random() * (base / 2);
}

/** The fields of `event` that go on the wire. */
function wireForm(event) {
  const wire = { id: event.id, type: event.type, data: event.data ?? null, timestamp: event.timestamp, version: event.version };
  if (event.origin !== undefined) wire.origin = event.origin;
  return wire;
}

/** Whether `value` nests arrays and objects more than `max` levels deep (`[[1]]` is two). */
function depthExceeds(value, max) {
  if (value === null || typeof value !== 'object') return false;
  if (max === 0) return true;
  for (const item of Array.isArray(value) ? value : Object.values(value)) {
    if (depthExceeds(item, max - 1)) return true;
  }
  return false;
}

/**
 * Why `event` breaks the event rules, or null when it keeps them: the one rule set for the
 * events the app sends (refused before they are queued) and those received (skipped). Those of
 * `Event::validate` (non-empty id and type of at most 256 UTF-8 bytes, version >= 1, data nested
 * at most `maxDepth` levels: 100 for what the app sends, `MAX_RECEIVED_DATA_DEPTH` for what it
 * receives), plus what its types ask of JSON (integers for version and timestamp).
 * Not its size rule (8 MiB of JSON as serde_json writes it, whose numbers JavaScript does not
 * print the same way): the relay answers a larger event `invalid`, and never sends one.
 */
function eventFault(event, maxDepth = MAX_DATA_DEPTH) {
  if (event === null || typeof event !== 'object' || Array.isArray(event)) return 'it is not an object';
  for (const field of ['id', 'type']) {
    const value = event[field];
    if (typeof value !== 'string' || value === '') return `its ${field} is not a non-empty string`;
    const bytes = utf8Length(value);
    if (bytes > MAX_NAME_BYTES) return `its ${field} is ${bytes} bytes of UTF-8, the limit is ${MAX_NAME_BYTES}`;
  }
  if (!Number.isSafeInteger(event.version) || event.version < 1) return 'its version is not an integer >= 1';
  if (!Number.isSafeInteger(event.timestamp) || event.timestamp < 0) return 'its timestamp is not an integer >= 0 (milliseconds since the epoch)';
  if (depthExceeds(event.data, maxDepth)) return `its data nests arrays and objects more than ${maxDepth} levels deep`;
  return null;
}

/** Why a received `event` (or an ack's `held` revision) breaks the event rules, or null: its
 * data may nest up to `MAX_RECEIVED_DATA_DEPTH` levels (it was stored already, maybe by an older
 * build), and it carries all its fields (one the app sends without `data` goes with `data: null`). */
function receivedFault(event) {
  return eventFault(event, MAX_RECEIVED_DATA_DEPTH) ?? (event.data === undefined ? 'it has no data' : null);
}

/** Refuses (`invalid`) an event the app sends that breaks the event rules: the relay would
 * refuse it too, after a round trip (as the Rust client's `send`). */
function refuseInvalid(event) {
  const fault = eventFault(event);
  if (fault !== null) throw new KSyncError('invalid', `the event breaks the event rules: ${fault}`, { event });
}

/** A received event, named in an error (an over-long id is cut). */
function describe(event) {
  const id = typeof event?.id === 'string' ? JSON.stringify(event.id.slice(0, 64)) : String(event?.id);
  return `event ${id} version ${JSON.stringify(event?.version) ?? 'none'}`;
}

/**
 * Inflates a raw DEFLATE frame into its UTF-8 text. Refuses (`bad_binary`) one that does not
 * inflate, is not UTF-8 or inflates past `limit` bytes: read in chunks, since a small frame
 * can inflate to gigabytes.
 */
async function inflateRaw(data, limit) {
  const reader = new Blob([data]).stream().pipeThrough(new DecompressionStream('deflate-raw')).getReader();
  const chunks = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      total += value.byteLength;
      if (total > limit) {
        reader.cancel().catch(() => {});
        throw new KSyncError('bad_binary', `a compressed frame inflates past ${limit} bytes`);
      }
      chunks.push(value);
    }
  } catch (error) {
    if (error instanceof KSyncError) throw error;
    throw new KSyncError('bad_binary', `a compressed frame does not inflate: ${error?.message ?? error}`);
  }
  const bytes = new Uint8Array(total);
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.byteLength;
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new KSyncError('bad_binary', 'a compressed frame does not inflate to UTF-8 text');
  }
}

// The largest `protocol` a version can be: the Rust client and the relay read it as a u64.
const MAX_PROTOCOL = 2n ** 64n - 1n;

/**
 * The `protocol` a `welcome` (`message`, parsed from `text`) announces, as the Rust client and
 * the relay read a version (serde's u64, `protocol::welcome_protocol`): `{version, written}`,
 * `version` the integer its text writes, as a string (`'2'`), or null when it announces none,
 * and `written` how the text writes it (for errors). `2.0`, `1e0`, `-0` or a number past
 * 2^64 - 1 are JSON numbers but no u64: `JSON.parse` reads `2.0` as 2, which took it for a
 * server of version 2 (close 4001, stop) where the Rust client refuses a broken welcome and
 * retries (and took `1.0` for our version, whose welcome the Rust client refuses). The text of
 * the number comes from `JSON.parse`'s source access (its reviver's third argument); a browser
 * without it has only the value, and takes an integer value for an integer.
 */
function announcedProtocol(text, message) {
  const value = message.protocol;
  let written = JSON.stringify(value) ?? '(none)';
  if (typeof value !== 'number') return { version: null, written };
  let source = null;
  try {
    // Each object's own `protocol` text; the message's is that of the root, revived last.
    const sources = new Map();
    JSON.parse(text, function revive(key, revived, context) {
      if (key === 'protocol' && typeof context?.source === 'string') sources.set(this, context.source);
      if (key === '' && sources.has(revived)) source = sources.get(revived);
      return revived;
    });
  } catch {
    // Parsed once already: cannot fail; if it does, no source.
  }
  if (source === null) source = Number.isSafeInteger(value) && value >= 0 ? String(value) : written;
  written = source;
  const version = /^(0|[1-9][0-9]*)$/.test(source) && BigInt(source) <= MAX_PROTOCOL ? source : null;
  return { version, written };
}

/** Why a `welcome` cannot be followed, or null (`announced`: its `announcedProtocol`). */
function welcomeFault(welcome, announced) {
  // Another version is refused before this (`announcesOtherVersion`): here, no version at all.
  if (announced.version !== String(PROTOCOL_VERSION)) {
    return `its protocol ${announced.written} is not an integer >= 0`;
  }
  const { serverVersion } = welcome;
  if (!Number.isSafeInteger(serverVersion) || serverVersion < 0) {
    return `its serverVersion ${JSON.stringify(serverVersion)} is not an integer >= 0`;
  }
  const { maxMessageSize } = welcome;
  if (maxMessageSize !== undefined && (!Number.isSafeInteger(maxMessageSize)
    || maxMessageSize < MIN_SERVER_MESSAGE_SIZE || maxMessageSize > MAX_SERVER_MESSAGE_SIZE)) {
    return `its maxMessageSize ${JSON.stringify(maxMessageSize)} is not within ${MIN_SERVER_MESSAGE_SIZE} to ${MAX_SERVER_MESSAGE_SIZE} bytes`;
  }
  return null;
}

/**
 * Whether a `welcome` announces a protocol version other than ours (`announced`: its
 * `announcedProtocol`, an integer >= 0 written as one, as the relay reads a `hello`'s). One
 * without such a `protocol` announces none: it is a broken welcome (`welcomeFault`), not one of
 * another version.
 */
function announcesOtherVersion(announced) {
  return announced.version !== null && announced.version !== String(PROTOCOL_VERSION);
}

/** What kind of JSON value `value` is, for an error (`null`, `an array`, `a string` ...). */
function kindOf(value) {
  if (value === null) return 'null';
  if (value === undefined) return 'missing';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}

/** Whether `seq` is a sequence number (an integer >= 1). */
function isSeq(seq) {
  return Number.isSafeInteger(seq) && seq >= 1;
}

/**
 * The spec's WebSocketSyncClient for browsers.
 *
 * Options (defaults): `auth` (none), `reconnect` (true), `heartbeat` (30000: every this many ms
 * the client sends a `ping` message, and a server that sends nothing within `heartbeatTimeout`
 * (10000 ms) after it is given up on: `disconnected` with code 4009, then a reconnect; while
 * the page's earlier messages are still leaving (`bufferedAmount` going down), the wait goes
 * on by `heartbeatTimeout` at a time, as the ping waits behind them; the
 * server's own pings are answered by the browser), `connectTimeout` (10000: an attempt that has
 * no `welcome` this many ms after it began ends with an `error` of code `connect_timeout`, and
 * the next comes after the reconnect delay), `compression` (false; honoured where
 * `DecompressionStream('deflate-raw')` works), `strategy` ('event-level' with `batchSize` 1;
 * 'batch' with `batchSize` (50) and `batchInterval` (5000 ms); 'state-based': the first
 * session starts from the room's snapshot, and the latest version of each id sent goes out
 * every `snapshotInterval` (300000 ms)), `filter` (a predicate or 'public-only'), `debug`
 * (false: `console.debug` what goes in and out), `since` (undefined: start with the live
 * stream; 0: the whole room history; N: after seq N), `logId` (the `logId` that `since` counts
 * in, from a saved `cursor` and `logId`: another log is read from 0), `reconnectDelay`
 * ({min: 250, max: 30000} ms; the attempts count on until a session stays up `max` ms),
 * `maxOutbox` (10000: a `send` past it rejects with `outbox_full`), `maxIncomingBytes` (64 MiB
 * of received frames waiting for the incoming middleware: past it nothing more is read from
 * the socket, code `slow_consumer`; what arrived before is read, and the next session resumes
 * after it), `metricsInterval` (5000 ms).
 * Sizes and delays are integers >= 1 (delays at most 2^31 - 1 ms, reconnectDelay min <= max):
 * anything else is a TypeError from the constructor.
 *
 * Notifications (`on(type, handler)`): `connected` (welcome), `disconnected` ({code, reason}),
 * `reconnecting` (attempt), `event` (event, {seq, room}), `sync` (the events of one exchange:
 * a received batch or snapshot page, or an `ack`'s `stored` and `duplicate` events as given to
 * `send`), `ack` (results), `conflict` ({type, ours, theirs}: ours as given to `send`, theirs
 * as it would be received, after the incoming middleware and the filter; null when left out,
 * dropped or invalid), `error` (KSyncError; also one for every failed attempt, code `connect`,
 * and lost connection, `connection_lost`, before its `reconnecting`), `status`
 * ('connected', 'syncing', 'idle' or 'error'), `metrics` ({eventsPerSecond, averageLatency,
 * bandwidthUsage}: events and bytes sent plus received per second, mean ack round trip in ms).
 */
export class WebSocketSyncClient extends Emitter {
  #url;
  #protocols;
  #expiry;
  #options;
  #socket = null;
  #connected = false;
  #stopped = true;
  // Reconnects since the last session that stayed up (see `#sessionEnded`): paces the backoff.
  #attempt = 0;
  // When this session's `welcome` came (`performance.now()`, as every elapsed time here: a
  // monotonic clock, which a wall-clock step (NTP, a user's change) does not move).
  #upSince = 0;
  #retryTimer = null;
  // Runs from an attempt's `new WebSocket` until its `welcome` (`connectTimeout`).
  #connectTimer = null;
  #cursor = null;
  // The room log `#cursor` belongs to (`welcome.logId`).
  #logId = null;
  #serverVersion = 0;
  // The `since` of this session's `hello` (null: none).
  #sinceSent = null;
  // The `error` of an in-band refusal, until its close arrives.
  #refusal = null;
  // Whether this session's `welcome` agreed to compression (binary frames are refused else).
  #compressed = false;
  // Errors already notified (by `#endSession`), not notified again when the session ends.
  #notified = new WeakSet();
  #room = null;
  #nextRef = 1;
  #outbox = [];
  #inFlight = new Map();
  #waiters = [];
  // Counts `disconnect()` calls: the end of a session given up before one (`#dropSocket`),
  // still queued on `#chain`, is then not run (`disconnect()` ended the session).
  #disconnects = 0;
  #chain = Promise.resolve();
  #middleware = { incoming: [], outgoing: [] };
  #filter = null;
  #maxMessageSize = DEFAULT_MAX_MESSAGE_SIZE;
  #flushTimer = null;
  #status = null;
  // `state-based` without a cursor (or after a reset): the next session asks for the snapshot,
  // until its last page arrives (its `serverVersion` then becomes the cursor).
  #needSnapshot = false;
  // Outgoing middleware runs one send at a time, so events leave in the order of `send` calls.
  #sendChain = Promise.resolve();
  #metricsTimer = null;
  #heartbeatTimer = null;
  // Set while a `ping` waits for an answer (anything the server sends counts).
  #pongTimer = null;
  // The socket's `bufferedAmount` when `#pongTimer` was last set (see `#heartbeatLost`).
  #pongBuffered = 0;
  #pingRef = 0;
  #meter = { since: 0, events: 0, bytes: 0, rtt: 0, acks: 0 };

  constructor(url, options = {}) {
    super();
    this.#url = toWebSocketUrl(url).href;
    const strategy = options.strategy ?? 'event-level';
    if (!STRATEGIES.has(strategy)) throw new TypeError(`strategy must be one of ${[...STRATEGIES].join(', ')}`);
    this.#options = {
      reconnect: options.reconnect ?? true,
      heartbeat: delayOption(options.heartbeat, 'heartbeat', 30000),
      heartbeatTimeout: delayOption(options.heartbeatTimeout, 'heartbeatTimeout', 10000),
      connectTimeout: delayOption(options.connectTimeout, 'connectTimeout', 10000),
      compression: Boolean(options.compression) && canInflateRaw(),
      strategy,
      batchSize: positiveInteger(options.batchSize, 'batchSize', strategy === 'batch' ? 50 : 1),
      batchInterval: delayOption(options.batchInterval, 'batchInterval', 5000),
      snapshotInterval: delayOption(options.snapshotInterval, 'snapshotInterval', 300000),
      debug: Boolean(options.debug),
      reconnectDelay: reconnectDelayOption(options.reconnectDelay, { min: 250, max: 30000 }),
      maxOutbox: positiveInteger(options.maxOutbox, 'maxOutbox', 10000),
      maxIncomingBytes: positiveInteger(options.maxIncomingBytes, 'maxIncomingBytes', DEFAULT_MAX_INCOMING_BYTES),
      metricsInterval: delayOption(options.metricsInterval, 'metricsInterval', 5000),
    };
    this.#filter = filterFor(options.filter);
    this.setAuth(options.auth);
    if (options.since !== undefined && options.since !== null) {
      if (!Number.isSafeInteger(options.since) || options.since < 0) throw new TypeError('since must be an integer >= 0');
      this.#cursor = options.since;
    }
    if (options.logId !== undefined && options.logId !== null) this.#logId = String(options.logId);
    this.#needSnapshot = strategy === 'state-based' && this.#cursor === null;
  }

  /**
   * Adds `middleware` to the `incoming` or `outgoing` chain (run in the order added): it gets
   * an event and returns it (changed or not), or null/undefined to drop it; it may be async.
   * Outgoing: the filter first, then the chain, when `send` is called (a dropped event resolves
   * `{status: 'filtered'}` and never leaves). Incoming: the chain, then the filter, before
   * `event` is notified (a dropped event is still counted as seen). A middleware (or a filter)
   * that throws rejects that `send`, or skips that received event with an `error` (code
   * `middleware`).
   */
  use(direction, middleware) {
    if (direction !== 'incoming' && direction !== 'outgoing') throw new TypeError("direction must be 'incoming' or 'outgoing'");
    if (typeof middleware !== 'function') throw new TypeError('middleware must be a function');
    this.#middleware[direction].push(middleware);
    return this;
  }

  /** The last `status` notified ('connected', 'syncing', 'idle', 'error'; null before any). */
  get status() { return this.#status; }

  /** The highest sequence number seen (null before the first session without `since`). */
  get cursor() { return this.#cursor; }
  /** The room log the cursor belongs to (`welcome.logId`; keep it with a saved cursor). */
  get logId() { return this.#logId; }
  /** Whether a session is up (after `welcome`). */
  get connected() { return this.#connected; }
  /** The room of the current or last session. */
  get room() { return this.#room; }
  /** Sent events not yet acknowledged. */
  get pending() { return this.#outbox.length + [...this.#inFlight.values()].reduce((n, sent) => n + sent.items.length, 0); }

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
   * and, without trying, on a JWT whose `exp` plus 5 s (the server's default leeway) has
   * passed (code `token_expired`): bring fresh credentials with `setAuth`, then connect; and
   * on a URL with no WebSocket endpoint (code `no_endpoint`, `status` 404, 405 or 410; see
   * `#probe`). Too many failed logins (`rate_limited`, 4429) are retried later, with backoff.
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

  /**
   * Closes the connection (1000) and stops reconnecting; resolves once the session's socket
   * is closed (at once when there is none, e.g. one the heartbeat already gave up).
   * Unacknowledged events stay queued. The session ends at once (`disconnected` is notified
   * now): a `connect()` right after opens a new connection, instead of taking this one for
   * still up and then losing it to this close.
   */
  disconnect() {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#clearConnectTimer();
    this.#settleWaiters(new KSyncError('disconnected', 'disconnect() was called'));
    this.#disconnects += 1;
    this.#refusal = null;
    const socket = this.#socket;
    // Nothing more of it is read: `#receive` skips what it sent that is still queued.
    this.#socket = null;
    if (this.#connected) {
      this.#connected = false;
      this.#stopTimers();
      this.emit('disconnected', { code: 1000, reason: 'client disconnect' });
    }
    if (!socket || socket.readyState === WebSocket.CLOSED) return Promise.resolve();
    socket.onopen = null;
    socket.onmessage = null;
    const closed = new Promise((resolve) => { socket.onclose = () => resolve(); });
    socket.close(1000, 'client disconnect');
    return closed;
  }

  /**
   * Queues `event` and resolves with its result once the server acknowledged it
   * (`{status: 'stored', seq}`, `{status: 'duplicate', seq}` or `{status: 'conflict', held}`).
   * Rejects (`invalid`) for an event that breaks the event rules (before it leaves) or that
   * the server refuses. While disconnected the event waits
   * and goes out on the next connection.
   */
  send(event) {
    const queued = this.#sendChain.then(() => this.#enqueue(event));
    // The next send waits for this one's middleware, not for its ack.
    this.#sendChain = queued.then(() => undefined, () => undefined);
    return queued.then(({ ack }) => ack);
  }

  /** Runs `event` through the filter and the outgoing chain and queues it; resolves with
   * `{ack}`: the promise of its result (wrapped, so that waiting for the queueing does not
   * wait for the ack). */
  async #enqueue(event) {
    refuseInvalid(event);
    if (this.#filter !== null && !this.#filter(event)) return { ack: Promise.resolve({ status: 'filtered' }) };
    let out = event;
    for (const middleware of this.#middleware.outgoing) {
      try {
        out = await middleware(out);
      } catch (error) {
        throw new KSyncError('middleware', `outgoing middleware failed: ${error?.message ?? error}`, { event });
      }
      if (out === null || out === undefined) return { ack: Promise.resolve({ status: 'filtered' }) };
    }
    // What the middleware made of it goes on the wire: the same rules.
    refuseInvalid(out);
    if (this.pending >= this.#options.maxOutbox) {
      throw new KSyncError('outbox_full', `more than ${this.#options.maxOutbox} events wait for the server`);
    }
    const wire = wireForm(out);
    const bytes = utf8Length(JSON.stringify(wire));
    if (bytes + PUBLISH_OVERHEAD > this.#maxMessageSize) throw this.#tooLarge(wire, bytes);
    // The `sync` of its ack carries the event as given to `send`, as a received one's carries
    // it after the incoming middleware.
    const local = out === event ? wire : wireForm(event);
    const ack = new Promise((resolve, reject) => {
      this.#outbox.push({ event: wire, local, bytes, resolve, reject });
    });
    if (this.#connected) this.#schedule();
    this.#updateStatus();
    return { ack };
  }

  #tooLarge(event, bytes) {
    return new KSyncError('invalid', `the event is ${bytes} bytes of JSON; the server takes messages of at most ${this.#maxMessageSize}`, { event });
  }

  #debug(...args) {
    if (this.#options.debug) console.debug('[ksync]', ...args);
  }

  /** Sends now, or when the strategy says (`batch`: `batchSize` waiting, else the timer). */
  #schedule() {
    const { strategy, batchSize } = this.#options;
    if (strategy === 'event-level' || (strategy === 'batch' && this.#outbox.length >= batchSize)) this.#flush();
  }

  #startTimers() {
    const { strategy, batchInterval, snapshotInterval, metricsInterval } = this.#options;
    this.#stopTimers();
    if (strategy !== 'event-level') {
      this.#flushTimer = setInterval(() => this.#flush(), strategy === 'batch' ? batchInterval : snapshotInterval);
    }
    this.#meter = { since: performance.now(), events: 0, bytes: 0, rtt: 0, acks: 0 };
    this.#metricsTimer = setInterval(() => this.#reportMetrics(), metricsInterval);
    const socket = this.#socket;
    this.#heartbeatTimer = setInterval(() => this.#ping(socket), this.#options.heartbeat);
  }

  #clearConnectTimer() {
    clearTimeout(this.#connectTimer);
    this.#connectTimer = null;
  }

  #stopTimers() {
    clearInterval(this.#flushTimer);
    clearInterval(this.#metricsTimer);
    clearInterval(this.#heartbeatTimer);
    clearTimeout(this.#pongTimer);
    this.#flushTimer = null;
    this.#metricsTimer = null;
    this.#heartbeatTimer = null;
    this.#pongTimer = null;
  }

  // A page cannot send WebSocket pings (the browser answers the server's, unseen): a `ping`
  // message checks that the server, and the path to it, are still there. A dead path can take
  // minutes to close by itself, while the page believes it is connected.
  #ping(socket) {
    if (socket !== this.#socket || socket.readyState !== WebSocket.OPEN) return;
    // Armed before the ping is queued: its own bytes leaving are no sign of the server.
    if (this.#pongTimer === null) this.#awaitPong(socket);
    this.#pingRef += 1;
    this.#debug('sending', 'ping', this.#pingRef);
    socket.send(JSON.stringify({ type: 'ping', ref: this.#pingRef }));
  }

  #awaitPong(socket, wait = this.#options.heartbeatTimeout) {
    this.#pongBuffered = socket.bufferedAmount;
    this.#pongTimer = setTimeout(() => this.#heartbeatLost(socket), wait);
  }

  #heartbeatLost(socket) {
    this.#pongTimer = null;
    if (socket !== this.#socket) return;
    // The ping waits behind what this page sent before it (a large publish): while the
    // browser hands those bytes to the network (`bufferedAmount` went down since the timer
    // was set), the path is alive and the answer is waited for one more `heartbeatTimeout`;
    // twice that once all is handed over, as what the browser and the kernel still hold of
    // it (some 100-300 KiB) crosses the link unseen before the ping. Timed as a whole, a
    // publish longer than `heartbeatTimeout` to cross a slow link was taken for a dead server
    // at every ping, and sent again on the next session, for ever. An idle link's
    // `bufferedAmount` stays 0: a dead server is still given up after `heartbeatTimeout`.
    const buffered = socket.bufferedAmount;
    if (buffered < this.#pongBuffered) {
      this.#debug('heartbeat', `still sending (${buffered} bytes buffered): waiting for the answer`);
      this.#awaitPong(socket, Math.min(MAX_DELAY_MS, this.#options.heartbeatTimeout * (buffered === 0 ? 2 : 1)));
      return;
    }
    this.#debug('heartbeat', `nothing from the server within ${this.#options.heartbeatTimeout} ms`);
    this.#dropSocket(4009, 'heartbeat timeout', { told: 'heartbeat timeout: the server did not answer a ping' });
  }

  #reportMetrics() {
    const now = performance.now();
    const seconds = Math.max((now - this.#meter.since) / 1000, 0.001);
    const { events, bytes, rtt, acks } = this.#meter;
    this.emit('metrics', {
      eventsPerSecond: events / seconds,
      averageLatency: acks ? rtt / acks : 0,
      bandwidthUsage: bytes / seconds,
    });
    this.#meter = { since: now, events: 0, bytes: 0, rtt: 0, acks: 0 };
  }

  #setStatus(status) {
    if (this.#status === status) return;
    this.#status = status;
    this.emit('status', status);
  }

  #updateStatus() {
    if (!this.#connected) return;
    const busy = this.#inFlight.size > 0 || this.#outbox.length > 0 || this.#needSnapshot
      || (this.#cursor ?? 0) < this.#serverVersion;
    this.#setStatus(busy ? 'syncing' : 'idle');
  }

  #open() {
    // A browser never sees the 401 of a refused upgrade (only a failed connection): a token
    // known to be expired would be retried, and counted as a failed login, forever. Known to
    // be expired: past its `exp` plus the server's default leeway (a JWT is valid until then),
    // so a page whose clock runs ahead still uses the end of the token's life. (Wall time, as
    // `exp`; the server decides anyway.)
    if (this.#expiry !== null && this.#expiry.getTime() + JWT_LEEWAY_MS <= Date.now()) {
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
    // The heartbeat starts at the `welcome`: until then, a server (or a proxy) that takes the
    // connection and never answers, or a connection that never opens, would hold `connect()`
    // and every reconnect for good. As the Rust client's `connect_timeout`: the attempt ends
    // (`connect_timeout`) and the next comes after the reconnect delay.
    this.#clearConnectTimer();
    this.#connectTimer = setTimeout(() => {
      this.#connectTimer = null;
      if (socket === this.#socket && !this.#connected) {
        this.#endSession(new KSyncError('connect_timeout', `no welcome from the server within ${this.#options.connectTimeout} ms`));
      }
    }, this.#options.connectTimeout);
    this.#compressed = false;
    let opened = false;
    // Bytes of frames of this socket received and not yet read (see `onmessage`).
    let waiting = 0;
    socket.onopen = () => {
      opened = true;
      const hello = { type: 'hello', protocol: PROTOCOL_VERSION };
      // `state-based` starts from the room's snapshot; a client that holds a cursor resumes.
      if (this.#needSnapshot) hello.state = true;
      else if (this.#cursor !== null) hello.since = this.#cursor;
      this.#sinceSent = hello.since ?? null;
      if (this.#options.compression) hello.compression = true;
      this.#debug('hello', hello);
      socket.send(JSON.stringify(hello));
    };
    socket.onmessage = (message) => {
      if (socket === this.#socket) {
        // The server is alive: a waiting `ping` is answered (by this or the `pong` after it).
        clearTimeout(this.#pongTimer);
        this.#pongTimer = null;
      }
      // A page cannot slow a WebSocket down: what the server sends while the incoming
      // middleware (async, e.g. decryption) is still at an earlier frame waits here, in memory.
      // Bounded: a frame that would have more than `maxIncomingBytes` waiting is not taken,
      // and nothing more of this socket is (`slow_consumer`, as the relay closes a subscriber
      // whose queue overflowed with 4008; see `#stopReading`); the frames that arrived before
      // it are still read, and the next session resumes after them. A frame alone is never
      // refused (one catch-up page can be larger than a small bound).
      if (socket !== this.#socket) return;
      const charge = (typeof message.data === 'string' ? message.data.length : message.data.byteLength) + FRAME_OVERHEAD;
      if (waiting > 0 && waiting + charge > this.#options.maxIncomingBytes) {
        this.#stopReading(socket, new KSyncError('slow_consumer', `more than ${this.#options.maxIncomingBytes} bytes of frames wait for the incoming middleware: the rest comes on a new session, from the cursor`));
        return;
      }
      waiting += charge;
      // Decompression is asynchronous: a chain keeps messages in arrival order.
      this.#chain = this.#chain.then(() => {
        waiting -= charge;
        return this.#receive(socket, message.data);
      }).catch((error) => {
        this.emit('error', error instanceof KSyncError ? error : new KSyncError('bad_message', String(error?.message ?? error)));
      });
    };
    socket.onclose = (close) => {
      this.#chain = this.#chain.then(() => this.#socketClosed(socket, close, opened));
    };
  }

  async #receive(socket, data) {
    // Only the session's socket is read: one given up (`#dropSocket`) is no longer `#socket`,
    // and what it sent before that is still queued on `#chain` is skipped here.
    if (socket !== this.#socket) return;
    const binary = typeof data !== 'string';
    const bytes = binary ? data.byteLength : utf8Length(data);
    this.#meter.bytes += bytes;
    let text = data;
    if (!binary && bytes > MAX_INFLATED_SIZE) {
      // Past what any relay sends (about twice its `maxMessageSize`, at most 8 MiB), and what
      // the Rust client reads (its frame limit): refused as a frame inflating past it is. It
      // may hold events: the session ends and the next one reads from the cursor again.
      this.#endSession(new KSyncError('bad_message', `the server sent a frame of ${bytes} bytes, past ${MAX_INFLATED_SIZE}`));
      return;
    }
    if (binary) {
      // Binary frames only with negotiated compression (docs/PROTOCOL.md, Frames). A frame
      // refused may hold events: skipping it, the next batch would move the cursor past them,
      // so the session ends and the next one reads from the cursor again.
      if (!this.#compressed) {
        this.#endSession(new KSyncError('bad_binary', 'the server sent a binary frame without negotiated compression'));
        return;
      }
      try {
        text = await inflateRaw(data, MAX_INFLATED_SIZE);
      } catch (error) {
        // `inflateRaw` throws only `bad_binary` errors.
        this.#endSession(error);
        return;
      }
      if (socket !== this.#socket) return;
    }
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      message = null;
    }
    if (message === null || typeof message !== 'object' || Array.isArray(message)) {
      // Not a message: it may have held events (see above).
      this.#endSession(new KSyncError('bad_message', `the server sent a frame that is not a JSON message (${text.length} characters)`));
      return;
    }
    this.#debug('received', message.type, text.length, 'bytes');
    switch (message.type) {
      case 'welcome': return this.#welcome(message, announcedProtocol(text, message));
      case 'events': return this.#events(socket, message.events);
      case 'snapshot': return this.#snapshot(socket, message);
      case 'ack': return this.#ack(socket, message);
      case 'error': return this.#serverError(message);
      case 'pong': return undefined; // Seen in `onmessage`: the heartbeat.
      default: return undefined; // Newer servers may add messages: ignore what we do not know.
    }
  }

  #welcome(welcome, announced) {
    // One `welcome` a connection: a second one would start this session over mid-way (its
    // serverVersion, limits and log taken in, in-flight events sent twice). A protocol error,
    // as in the Rust client: the session ends, the next one comes after the reconnect delay.
    if (this.#connected) {
      this.#endSession(new KSyncError('protocol', 'the server sent a second welcome on this connection'));
      return;
    }
    // A server of another protocol version (docs/PROTOCOL.md: such a peer is refused): nothing
    // of its welcome is taken, and reconnecting would meet the same server, so the client
    // closes with 4001 and stops, as after the relay's own 4001 (as the Rust client). A welcome
    // without an integer `protocol` >= 0 announces no version: a broken welcome (below), retried.
    if (announcesOtherVersion(announced)) {
      this.#refusal = new KSyncError('unsupported_protocol', `the server speaks protocol ${announced.version}, this client ${PROTOCOL_VERSION}`);
      this.#dropSocket(4001, 'unsupported protocol version');
      return;
    }
    // A welcome this client cannot follow is refused: nothing of it is taken, and the next
    // session (after the reconnect delay) tries again (as the Rust client).
    const fault = welcomeFault(welcome, announced);
    if (fault !== null) {
      this.#endSession(new KSyncError('protocol', `the server's welcome was refused: ${fault}`));
      return;
    }
    const logId = typeof welcome.logId === 'string' ? welcome.logId : null;
    if (logId !== null && this.#logId !== null && logId !== this.#logId && this.#cursor > 0) {
      // Another log than the one our cursor counts in (the room was reset, or another server
      // answers here), even if it has grown past the cursor: read it again from 0.
      this.#logId = logId;
      this.#cursor = 0;
      this.#needSnapshot = this.#options.strategy === 'state-based';
      this.emit('error', new KSyncError('room_reset', `the room's log changed (${logId}): syncing again from the start`));
      this.#dropSocket(1000, 'resync from 0', { resync: true });
      return;
    }
    if (logId !== null) this.#logId = logId;
    this.#compressed = this.#options.compression && welcome.compression === true;
    this.#serverVersion = welcome.serverVersion;
    this.#room = welcome.room;
    // Without it, the relay's default (not a previous server's limit).
    this.#maxMessageSize = welcome.maxMessageSize ?? DEFAULT_MAX_MESSAGE_SIZE;
    // Without a cursor the session starts with the live stream: we hold everything up to here.
    // (A snapshot sets it at its last page: a session cut short asks for the snapshot again.)
    if (this.#cursor === null && !this.#needSnapshot) this.#cursor = welcome.serverVersion;
    this.#connected = true;
    this.#clearConnectTimer();
    this.#upSince = performance.now();
    this.#startTimers();
    this.emit('connected', welcome);
    this.#setStatus('connected');
    for (const waiter of this.#waiters.splice(0)) waiter.resolve();
    // Everything that was in flight when the last connection dropped goes out again first.
    const resend = [...this.#inFlight.values()].flatMap((sent) => sent.items);
    this.#inFlight.clear();
    this.#outbox.unshift(...resend);
    // What waited while offline goes out now, whatever the strategy.
    this.#flush();
    this.#updateStatus();
  }

  /** A received event after the incoming chain and the filter; null when dropped. `faulty`:
   * the message of the error for one that breaks the event rules (given it and the fault). */
  async #incoming(event, faulty = (current, fault) => `received ${describe(current)} is not a valid event (${fault}): skipped`) {
    if (event === null || typeof event !== 'object' || Array.isArray(event)) {
      this.emit('error', new KSyncError('protocol', `the server sent ${JSON.stringify(event) ?? 'nothing'} as an event: skipped`));
      return null;
    }
    let current = event;
    for (const middleware of this.#middleware.incoming) {
      try {
        current = await middleware(current);
      } catch (error) {
        this.emit('error', new KSyncError('middleware', `incoming middleware failed: ${error?.message ?? error}`, { event }));
        return null;
      }
      if (current === null || current === undefined) return null;
    }
    if (this.#filter !== null) {
      // A filter that throws is a middleware that throws: that event is skipped, and the rest
      // of its batch (the cursor has moved past all of it) is still delivered.
      let keep;
      try {
        keep = this.#filter(current);
      } catch (error) {
        this.emit('error', new KSyncError('middleware', `the filter failed: ${error?.message ?? error}`, { event }));
        return null;
      }
      if (!keep) return null;
    }
    // The event rules, after the incoming middleware (which may decrypt): an event that breaks
    // them is not taken in (the cursor moves past it), as in the Rust client.
    const fault = receivedFault(current);
    if (fault !== null) {
      this.emit('error', new KSyncError('protocol', faulty(current, fault), { event }));
      return null;
    }
    return current;
  }

  async #events(socket, batch) {
    if (!Array.isArray(batch)) {
      this.#endSession(new KSyncError('protocol', `the server sent an events message without a list of events (its events is ${kindOf(batch)})`));
      return;
    }
    const events = [];
    for (const entry of batch) {
      // An entry without a sequence number cannot move the cursor (an `undefined` or a
      // string there would let later events slip past the `seq <= cursor` check).
      if (entry === null || typeof entry !== 'object' || !isSeq(entry.seq)) {
        this.emit('error', new KSyncError('protocol', `the server sent an event without a valid seq (${JSON.stringify(entry?.seq) ?? 'none'}): skipped`));
        continue;
      }
      const { seq, event } = entry;
      // Each seq arrives once; anything at or below the cursor was already seen.
      if (this.#cursor !== null && seq <= this.#cursor) continue;
      this.#meter.events += 1;
      const taken = await this.#incoming(event);
      // Given up while the middleware ran (the heartbeat): the rest comes again, from the
      // cursor; those already taken (past the cursor, never sent again) get their `sync` now.
      if (socket !== this.#socket) {
        if (events.length) this.emit('sync', events);
        return;
      }
      this.#cursor = seq;
      if (taken === null) continue;
      events.push(taken);
      this.emit('event', taken, { seq, room: this.#room });
    }
    // One `sync` per batch received, catch-up or live (as the Rust client).
    if (events.length) this.emit('sync', events);
    this.#updateStatus();
  }

  /** A page of the room's snapshot (`state-based`): the latest version of each id, no seq. */
  async #snapshot(socket, page) {
    // A page whose events are not a list may have held some (a string would be read character
    // by character): the session ends and the next one asks for the snapshot again, as the
    // Rust client does (its protocol error).
    if (!Array.isArray(page.events)) {
      this.#endSession(new KSyncError('protocol', `the server sent a snapshot page without a list of events (its events is ${kindOf(page.events)})`));
      return;
    }
    const events = [];
    for (const event of page.events) {
      this.#meter.events += 1;
      const taken = await this.#incoming(event);
      // Given up while the middleware ran: the next session asks for the snapshot again.
      if (socket !== this.#socket) return;
      if (taken === null) continue;
      events.push(taken);
      this.emit('event', taken, { seq: null, room: this.#room });
    }
    if (events.length) this.emit('sync', events);
    if (page.last) {
      this.#needSnapshot = false;
      if (Number.isSafeInteger(page.serverVersion)) this.#cursor = Math.max(this.#cursor ?? 0, page.serverVersion);
    }
    this.#updateStatus();
  }

  async #ack(socket, ack) {
    const sent = this.#inFlight.get(ack.ref);
    if (!sent) return;
    // An ack that places an event at no seq, or past the ack's own serverVersion, is not
    // believed (the cursor would skip live events below that seq): nothing of this publish
    // counts as acknowledged, it stays in flight and the session ends, so it goes out again
    // (the room answers `duplicate` for what it holds). As the Rust client.
    const placed = Array.isArray(ack.results) ? ack.results.slice(0, sent.items.length) : [];
    const misplaced = placed.find((result) => (result?.status === 'stored' || result?.status === 'duplicate')
      && !(isSeq(result.seq) && Number.isSafeInteger(ack.serverVersion) && result.seq <= ack.serverVersion));
    if (misplaced !== undefined) {
      this.#endSession(new KSyncError('protocol', `the ack for publish ${ack.ref} places an event at seq ${JSON.stringify(misplaced.seq)}, past its serverVersion ${JSON.stringify(ack.serverVersion)}: sending it again`));
      return;
    }
    const { items } = sent;
    const results = Array.isArray(ack.results) ? ack.results : [];
    // The room's revision of each conflict in the app's form (its incoming middleware may
    // decrypt), taken before anything of this ack counts.
    const theirs = new Map();
    for (const [i, item] of items.entries()) {
      const held = results[i]?.status === 'conflict' ? results[i].held ?? null : null;
      if (held === null) continue;
      theirs.set(i, await this.#theirs(ack.ref, item, held));
      // Given up while the middleware ran (the heartbeat): the publish stays in flight and
      // goes out again on the next session.
      if (socket !== this.#socket) return;
    }
    this.#meter.rtt += performance.now() - sent.at;
    this.#meter.acks += 1;
    this.emit('ack', results);
    // The events now safely in the room: this exchange's `sync`.
    const synced = [];
    // Not stored (`failed`, or no result): sent again.
    const failed = [];
    let failure = null;
    items.forEach((item, i) => {
      const result = results[i] ?? { status: 'failed', message: 'no result for this event' };
      switch (result?.status) {
        case 'stored':
          if (this.#cursor === null || result.seq > this.#cursor) this.#cursor = result.seq;
          synced.push(item.local);
          item.resolve(result);
          break;
        case 'duplicate':
          synced.push(item.local);
          item.resolve(result);
          break;
        case 'conflict': {
          // Both sides in the app's form, as in the Rust client: ours as given to `send`
          // (before the outgoing middleware), theirs as the app would receive it (see
          // `#theirs`; null when the ack left `held` out, past its size bound: the room's
          // revision is in its stream).
          const { held: _held, ...conflict } = result;
          const their = theirs.get(i) ?? null;
          this.emit('conflict', { type: 'concurrent-edit', ours: item.local, theirs: their });
          item.resolve(their === null ? conflict : { ...conflict, held: their });
          break;
        }
        case 'invalid':
          item.reject(new KSyncError('invalid', result.message ?? 'invalid event', { event: item.event }));
          break;
        default:
          // `failed`: the server could not store it; it goes out again after a reconnect.
          failed.push(item);
          failure ??= String(result?.message ?? `result ${JSON.stringify(result?.status)}`);
      }
    });
    if (synced.length) this.emit('sync', synced);
    if (failed.length) {
      // The relay answers `failed` and keeps the connection: nothing would send these again
      // until the next send or disconnect. They stay in flight, in their place, and this
      // session ends: the next one (after the reconnect delay) sends them first, as the Rust
      // client does.
      sent.items = failed;
      // (No status update after it: the session is over, its status says `error`.)
      this.#endSession(new KSyncError('failed', `the server could not store ${failed.length} event(s): ${failure}`));
      return;
    }
    this.#inFlight.delete(ack.ref);
    this.#updateStatus();
  }

  /**
   * The room's revision in a conflict (an ack's `held`) as the app would receive it: a received
   * event, so through the incoming chain and the filter, then the event rules. Null when the
   * chain or the filter drops it (the app does not see it) or it breaks the rules (reported).
   */
  async #theirs(ref, item, held) {
    const faulty = (_, fault) => `the ack for publish ${ref} holds a revision of ${describe(item.local)} that is not a valid event (${fault}): left out`;
    if (typeof held !== 'object' || Array.isArray(held)) {
      this.emit('error', new KSyncError('protocol', faulty(held, 'it is not an object'), { event: held }));
      return null;
    }
    return this.#incoming(held, faulty);
  }

  #serverError(message) {
    const error = new KSyncError(message.code, message.message, { ref: message.ref });
    if (REFUSAL_CODES.has(message.code) && !this.#connected) {
      // Told once, when the close that follows it arrives (see `#sessionEnded`).
      this.#refusal = error;
      return;
    }
    if (message.code === 'cursor_ahead' && !(this.#sinceSent > 0)) {
      // Reading from 0 again cannot help (nothing is ahead of 0): a server that says so is
      // not followed; the next session comes after the reconnect delay, not at once.
      this.#endSession(new KSyncError('protocol', `the server answered cursor_ahead to since ${this.#sinceSent ?? '(none)'}`));
      return;
    }
    if (message.code === 'cursor_ahead') {
      // The room is behind our cursor (reset, or another log at this address): what it holds
      // now is not what we saw. Read it again from 0, at once, on a new session; nothing more
      // of this one is read (an `ack` behind this error would move the cursor again). A publish
      // this error names stays in flight and goes out again there.
      this.#cursor = 0;
      this.#needSnapshot = this.#options.strategy === 'state-based';
      this.#dropSocket(1000, 'resync from 0', { resync: true });
      this.emit('error', error);
      this.#setStatus('error');
      return;
    }
    if (message.ref !== undefined && this.#inFlight.has(message.ref)) {
      if (message.code !== 'forbidden') {
        // Nothing of that publish was stored (`storage`: a server's storage failure, or a
        // code this client does not know): its events stay in flight and the session ends,
        // so they go out again after the reconnect delay (the Rust client ends the session
        // for `storage` too; for an unknown code it stops publishing on that connection).
        this.#endSession(error);
        return;
      }
      // `forbidden`: these credentials may not write here; sending again would be refused.
      for (const item of this.#inFlight.get(message.ref).items) item.reject(error);
      this.#inFlight.delete(message.ref);
    }
    this.emit('error', error);
    this.#setStatus('error');
  }

  #flush() {
    const socket = this.#socket;
    if (!this.#connected || !socket || socket.readyState !== WebSocket.OPEN) return;
    if (this.#options.strategy === 'state-based') this.#coalesce();
    // Queued before this server said its limit (or under another server's): refused now, or
    // the relay would close with 1009 and the same message would go out after every reconnect.
    this.#outbox = this.#outbox.filter((item) => {
      if (item.bytes + PUBLISH_OVERHEAD <= this.#maxMessageSize) return true;
      item.reject(this.#tooLarge(item.event, item.bytes));
      return false;
    });
    // At most `batchSize` events (`state-based`: `MAX_BATCH`) and `maxMessageSize` bytes a
    // message: the relay closes with 1009 past its size, and the same batch would be resent
    // forever.
    const limit = this.#options.strategy === 'state-based' ? MAX_BATCH : Math.min(this.#options.batchSize, MAX_BATCH);
    while (this.#outbox.length) {
      let count = 0;
      let bytes = PUBLISH_OVERHEAD;
      while (count < this.#outbox.length && count < limit) {
        const next = this.#outbox[count].bytes + 1;
        if (count > 0 && bytes + next > this.#maxMessageSize) break;
        bytes += next;
        count += 1;
      }
      const items = this.#outbox.splice(0, count);
      const ref = this.#nextRef++;
      this.#inFlight.set(ref, { items, at: performance.now() });
      const text = JSON.stringify({ type: 'publish', ref, events: items.map((item) => item.event) });
      this.#meter.events += items.length;
      this.#meter.bytes += utf8Length(text);
      this.#debug('publish', ref, items.length, 'events', text.length, 'bytes');
      socket.send(text);
    }
    this.#updateStatus();
  }

  /** `state-based`: of several waiting versions of one id only the latest goes out; the
   * others resolve `{status: 'superseded'}`. */
  #coalesce() {
    const latest = new Map();
    for (const item of this.#outbox) {
      const held = latest.get(item.event.id);
      if (!held || item.event.version >= held.event.version) latest.set(item.event.id, item);
    }
    if (latest.size === this.#outbox.length) return;
    const kept = new Set(latest.values());
    for (const item of this.#outbox) if (!kept.has(item)) item.resolve({ status: 'superseded' });
    this.#outbox = this.#outbox.filter((item) => kept.has(item));
  }

  /**
   * Ends the session over `error` (something this client cannot follow or must retry): the
   * error is notified now and the socket is given up (`#dropSocket`); the next session comes
   * after the reconnect delay (`error` rejects a waiting `connect()`). What is in flight stays
   * there and goes out again at the next `welcome`.
   */
  #endSession(error) {
    if (this.#socket === null) return;
    this.#refusal = error;
    this.#notified.add(error);
    this.#debug('ending the session:', error.code, error.message);
    this.emit('error', error);
    this.#setStatus('error');
    this.#dropSocket(1000, 'ending the session', { told: `ending the session: ${error.code}` });
  }

  /**
   * Takes nothing more from the session's `socket` (`error`, notified now: why): it is closed,
   * and the frames that arrived before are still read, in order, on `#chain` (they are valid;
   * dropping them would only have the next session send them again); after them the session
   * ends over `error` (as `#endSession`), and the next one comes after the reconnect delay.
   * Ended otherwise meanwhile (`#endSession` for a frame among them, the heartbeat,
   * `disconnect()`): that end stands, and what is left of them is skipped.
   */
  #stopReading(socket, error) {
    socket.onmessage = null;
    socket.onclose = null;
    socket.close(1000, 'slow consumer');
    this.#notified.add(error);
    this.#debug('stopped reading the socket:', error.message);
    this.emit('error', error);
    const disconnects = this.#disconnects;
    this.#chain = this.#chain.then(() => {
      if (socket !== this.#socket || disconnects !== this.#disconnects) return;
      this.#socket = null;
      this.#refusal = error;
      this.#sessionEnded({ code: 1000, reason: `ending the session: ${error.code}` }, { opened: true, resync: false });
    });
  }

  /**
   * Gives up the session's socket: the one way this client drops a connection (`#endSession`,
   * the heartbeat, the resyncs). It stops being `#socket` at once, so nothing more of it is
   * read (its handlers are detached, and `#receive` skips what it sent that is still queued);
   * it closes with `code` and `reason`, and `#sessionEnded` follows on `#chain` without
   * waiting for the server's side of the close (`told`: the reason in `disconnected`).
   * `resync`: the next session opens at once, to read the room again from 0.
   */
  #dropSocket(code, reason, { told = reason, resync = false } = {}) {
    const socket = this.#socket;
    if (socket === null) return;
    this.#socket = null;
    socket.onmessage = null;
    socket.onclose = null;
    socket.close(code, reason);
    const close = { code, reason: told };
    const disconnects = this.#disconnects;
    this.#chain = this.#chain.then(() => {
      if (disconnects === this.#disconnects) this.#sessionEnded(close, { opened: true, resync });
    });
  }

  /** The socket's own close event (the server's: `disconnect()` and `#dropSocket` detach it). */
  #socketClosed(socket, close, opened) {
    // A socket given up already (`#dropSocket`, `disconnect()`) has had its session end.
    if (socket !== this.#socket) return;
    this.#socket = null;
    this.#sessionEnded(close, { opened, resync: false });
  }

  /** After the session's socket is gone: notifies, then reconnects (at once for a resync,
   * else after the reconnect delay) or stops. */
  #sessionEnded(close, { opened, resync }) {
    const wasConnected = this.#connected;
    this.#connected = false;
    this.#stopTimers();
    this.#clearConnectTimer();
    if (wasConnected) this.emit('disconnected', { code: close.code, reason: close.reason });
    const refusal = this.#refusal;
    this.#refusal = null;
    if (this.#stopped) return;
    if (resync) {
      // Part of joining the reset room, not a lost connection (as the Rust client).
      this.#attempt = 0;
      this.#open();
      return;
    }
    // The backoff starts again from its minimum only after a session that stayed up for its
    // maximum (as the Rust client): a server that welcomes and then fails at once (closes,
    // refuses every publish) keeps counting, and is not hit at the shortest delay forever.
    if (wasConnected && performance.now() - this.#upSince >= this.#options.reconnectDelay.max) this.#attempt = 0;
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
    // `connection_lost`: a session that was up ended; `connect`: an attempt got no session
    // (no connection, or one closed before its `welcome`: what rejects a waiting `connect()`).
    const closed = `${close.code}${close.reason ? ` ${close.reason}` : ''}`;
    if (wasConnected) {
      this.#failed(new KSyncError('connection_lost', `connection lost (${closed})`, { closeCode: close.code }));
      return;
    }
    if (opened) {
      this.#failed(new KSyncError('connect', `connection closed (${closed})`, { closeCode: close.code }));
      return;
    }
    this.#probe(new KSyncError('connect', 'connection failed (server down, unreachable, or full)', { closeCode: close.code }));
  }

  /**
   * After an attempt whose upgrade failed: a browser hides the HTTP answer to a refused upgrade
   * (every failure is a close 1006), so a URL with no WebSocket endpoint behind it (a wrong
   * path: 404) was retried forever, where the Rust client stops. A plain GET of the same URL
   * tells: 404, 405 or 410 (nothing takes a GET there, so no upgrade either) stops the client
   * with `no_endpoint` (`status`), as the Rust client stops on a 4xx upgrade answer; anything
   * else (kSync answers a plain GET of a room with 400 or 426, or 401 without credentials),
   * no answer, or one the page may not read (another origin without CORS) is `error` (the
   * `connect` one) and the next attempt, as before.
   */
  async #probe(error) {
    const disconnects = this.#disconnects;
    let status = null;
    try {
      const url = new URL(this.#url);
      url.protocol = url.protocol === 'wss:' ? 'https:' : 'http:';
      const signal = typeof AbortSignal.timeout === 'function' ? AbortSignal.timeout(PROBE_TIMEOUT_MS) : undefined;
      const response = await fetch(url, { cache: 'no-store', credentials: 'omit', redirect: 'manual', signal });
      status = response.status;
    } catch {
      // Nothing listening, or an answer this page may not read: no more known than before.
    }
    // Stopped or disconnected meanwhile (a `connect()` after `disconnect()` started anew).
    if (this.#stopped || disconnects !== this.#disconnects) return;
    if (NO_ENDPOINT_STATUSES.has(status)) {
      this.#stop(new KSyncError('no_endpoint', `nothing at ${this.#url} takes a WebSocket: a plain GET of it is answered ${status} (check the URL's path)`, { status, closeCode: error.closeCode }));
      return;
    }
    this.#failed(error);
  }

  /** Stops reconnecting: `error` rejects the waiting `connect()` calls and is notified once. */
  #stop(error) {
    this.#stopped = true;
    this.#settleWaiters(error);
    if (!this.#notified.has(error)) this.emit('error', error);
    this.#setStatus('error');
  }

  /** A session that ended, or an attempt that got none: `error` is notified (unless it was
   * already, by `#endSession`) for every one, as the Rust client does, and rejects the waiting
   * `connect()` calls; then the next attempt after the reconnect delay (`reconnecting`), or,
   * without `reconnect`, the client stops. */
  #failed(error) {
    this.#settleWaiters(error);
    this.#setStatus('error');
    if (!this.#notified.has(error)) this.emit('error', error);
    if (!this.#options.reconnect) {
      this.#stopped = true;
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

// What `MonitorClient` itself notifies: no server message is passed on under these names.
const OWN_MONITOR_NOTIFICATIONS = new Set(['open', 'close', 'reconnecting', 'welcome', 'error']);

/**
 * The server's monitor feed (`/monitor`, docs/PROTOCOL.md "Monitor feed"): `stats` every
 * second, `client` joins and leaves, and the `events` stored in every room the credentials may
 * read. Reconnects with backoff; a feed that says nothing for `timeout` ms (10000, or three of
 * its `intervalMs` if longer), or sends no `welcome` within it, is given up (`close` 4009) and
 * connected again. Notifications: `open` (welcome), `stats`, `client`, `events`,
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
  // Gives up a feed that says nothing for too long (see `#open`).
  #silence = null;

  constructor(url, options = {}) {
    super();
    this.#url = toWebSocketUrl(url).href;
    this.#protocols = protocolsFor(options.auth);
    this.#options = {
      recent: options.recent ?? 20,
      tail: options.tail ?? true,
      reconnectDelay: reconnectDelayOption(options.reconnectDelay, { min: 250, max: 10000 }),
      timeout: delayOption(options.timeout, 'timeout', 10000),
    };
  }

  start() {
    if (!this.#stopped) return;
    this.#stopped = false;
    this.#attempt = 0;
    this.#open();
  }

  stop() {
    this.#stopped = true;
    clearTimeout(this.#timer);
    clearTimeout(this.#silence);
    this.#socket?.close(1000, 'monitor stopped');
    this.#socket = null;
  }

  #open() {
    const socket = new WebSocket(this.#url, this.#protocols);
    this.#socket = socket;
    let opened = false;
    // A welcome without a version came: what follows on this connection is not read.
    let broken = false;
    // When the `welcome` came (`performance.now()`, monotonic; null before it).
    let upSince = null;
    socket.onopen = () => {
      socket.send(JSON.stringify({ type: 'hello', protocol: PROTOCOL_VERSION, tail: this.#options.tail, recent: this.#options.recent }));
    };
    // The feed sends `stats` every `intervalMs` (1 s) after its `welcome`, and a page cannot
    // ping: a feed silent for `timeout` ms (or three intervals, if longer), or with no
    // `welcome` within it, is a dead path or a hung server, which the browser may take minutes
    // to notice while the dashboard says "live". It is given up (`close` with code 4009, as the
    // sync client's heartbeat) and connected again after the reconnect delay.
    let silentFor = this.#options.timeout;
    const listen = () => {
      clearTimeout(this.#silence);
      this.#silence = setTimeout(() => {
        if (socket !== this.#socket) return;
        socket.onclose = null;
        socket.close(4009, 'heartbeat timeout');
        ended({ code: 4009, reason: 'heartbeat timeout: the monitor feed said nothing' });
      }, silentFor);
    };
    listen();
    socket.onmessage = (message) => {
      if (socket !== this.#socket || broken) return;
      listen();
      let parsed;
      try {
        parsed = JSON.parse(message.data);
      } catch {
        this.emit('error', new KSyncError('bad_message', 'the monitor sent something that is not JSON'));
        return;
      }
      const announced = parsed.type === 'welcome' ? announcedProtocol(message.data, parsed) : null;
      if (announced !== null && announced.version === null) {
        // No version at all: a broken welcome, not one of another version. As the sync client:
        // an error, and the connection is given up and tried again after the reconnect delay.
        broken = true;
        this.emit('error', new KSyncError('protocol', `the monitor's welcome was refused: its protocol ${announced.written} is not an integer >= 0`));
        socket.close(1000, 'broken welcome');
      } else if (announced !== null && announcesOtherVersion(announced)) {
        // A feed of another protocol version is refused as the sync client refuses one: close
        // 4001 and stop (reconnecting would meet the same server); `start()` tries again.
        this.#socket = null;
        this.#stopped = true;
        clearTimeout(this.#silence);
        socket.close(4001, 'unsupported protocol version');
        this.emit('error', new KSyncError('unsupported_protocol', `the server speaks protocol ${announced.version}, this client ${PROTOCOL_VERSION}`, { closeCode: 4001 }));
        this.emit('close', { code: 4001, reason: 'unsupported protocol version', opened });
      } else if (parsed.type === 'welcome') {
        opened = true;
        upSince = performance.now();
        if (Number.isSafeInteger(parsed.intervalMs) && parsed.intervalMs > 0) {
          silentFor = Math.min(MAX_DELAY_MS, Math.max(this.#options.timeout, 3 * parsed.intervalMs));
          listen();
        }
        this.emit('open', parsed);
      } else if (parsed.type === 'error') {
        this.emit('error', new KSyncError(parsed.code, parsed.message));
      } else if (!OWN_MONITOR_NOTIFICATIONS.has(parsed.type)) {
        // Feed messages (`stats`, `client`, `events`, and newer ones) pass on under their type;
        // not under a name of this client's own notifications: a message `{"type": "close",
        // "code": 4401}` was told as a close, and the dashboard asked for credentials again.
        this.emit(parsed.type, parsed);
      }
    };
    const ended = (close) => {
      if (socket !== this.#socket) return;
      this.#socket = null;
      clearTimeout(this.#silence);
      this.emit('close', { code: close.code, reason: close.reason, opened });
      if (this.#stopped || FATAL_CLOSE_CODES.has(close.code)) return;
      const { min, max } = this.#options.reconnectDelay;
      // As the sync client: the backoff starts again only after a connection that stayed up
      // for its maximum, so a server that welcomes and then drops is not hit ever faster.
      if (upSince !== null && performance.now() - upSince >= max) this.#attempt = 0;
      this.#attempt += 1;
      const delay = backoff(this.#attempt, min, max);
      this.emit('reconnecting', this.#attempt, delay);
      this.#timer = setTimeout(() => { if (!this.#stopped) this.#open(); }, delay);
    };
    socket.onclose = ended;
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
