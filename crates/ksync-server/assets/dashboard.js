// The kSync dashboard: reads the server's monitor feed (docs/PROTOCOL.md, "Monitor feed")
// over WebSocket and draws it. Everything arrives pushed by the server; nothing polls.
import { MonitorClient, whoAmI } from '/ksync.js';

const AUTH_KEY = 'ksync.dashboard.auth';
const TAIL_KEEP = 1000;      // events kept in memory for the filter
const TAIL_SHOWN = 200;      // rows in the DOM
const CHART_POINTS = 120;    // seconds of history in the chart

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const state = {
  monitor: null,
  clients: new Map(),
  rates: [],
  tail: [],
  dirty: false,
};

function setStatus(kind, text) {
  const status = $('status');
  status.className = `pill pill-${kind}`;
  status.textContent = text;
  status.dataset.state = text;
  document.body.dataset.state = text;
}

function loadAuth() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(AUTH_KEY) ?? 'null');
    if (saved && (saved.token || saved.key)) return saved;
  } catch {
    // Unreadable: ignore it.
  }
  return null;
}

function showAuth(message) {
  $('auth-panel').hidden = false;
  $('main').hidden = true;
  $('auth-error').textContent = message;
  $('auth-secret').focus();
}

async function start() {
  const auth = loadAuth();
  $('sign-out').hidden = !auth;
  let who;
  try {
    who = await whoAmI(location.origin, auth);
  } catch {
    setStatus('bad', 'unreachable');
    setTimeout(start, 2000);
    return;
  }
  if (!who.ok) {
    setStatus('bad', who.status === 429 ? 'rate limited' : 'unauthorized');
    showAuth(auth ? `Refused (${who.status}): ${who.error}` : `This server needs credentials (${who.error}).`);
    return;
  }
  $('auth-panel').hidden = true;
  $('main').hidden = false;
  $('subject').textContent = who.authRequired ? `as ${who.subject}` : '';
  connectMonitor(auth);
}

function connectMonitor(auth) {
  const url = new URL('/monitor', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const monitor = new MonitorClient(url.href, { auth, recent: 20 });
  state.monitor = monitor;
  monitor.on('open', () => setStatus('ok', 'live'));
  monitor.on('close', ({ code, opened }) => {
    if (code === 4401) {
      // The credentials expired: the monitor stops (the same token would be refused).
      setStatus('bad', 'unauthorized');
      showAuth('The credentials expired: sign in again.');
      return;
    }
    setStatus(opened ? 'wait' : 'bad', opened ? 'reconnecting' : 'disconnected');
  });
  monitor.on('reconnecting', () => setStatus('wait', 'reconnecting'));
  monitor.on('stats', onStats);
  monitor.on('client', onClient);
  monitor.on('events', onEvents);
  monitor.on('error', (error) => console.warn('monitor:', error.code, error.message));
  monitor.start();
}

function onStats(stats) {
  state.clients = new Map(stats.clients.map((c) => [c.id, c]));
  renderClients(stats.clientsTotal);
  $('rate').textContent = formatRate(stats.eventsPerSecond);
  $('events-stored').textContent = stats.eventsStored.toLocaleString('en-US');
  $('log-counts').textContent = `${stats.roomsTotal} · ${stats.reposTotal}`;
  $('uptime').textContent = `up ${formatDuration(stats.uptimeSeconds)}`;
  state.rates.push(stats.eventsPerSecond);
  if (state.rates.length > CHART_POINTS) state.rates.shift();
  drawChart();
  renderRooms(stats.rooms);
  renderRepos(stats.repos);
  $('tail-note').textContent = stats.tailSkipped > 0 ? `${stats.tailSkipped} events/s not shown (busy)` : '';
}

function onClient({ change, client }) {
  if (change === 'joined') state.clients.set(client.id, client);
  else state.clients.delete(client.id);
  renderClients(state.clients.size);
}

function onEvents(message) {
  const log = message.room !== undefined ? message.room : `${message.repo}@${message.branch}`;
  for (const { seq, event } of message.events) {
    const data = JSON.stringify(event.data) ?? 'null';
    state.tail.push({
      log, seq, event, data,
      fresh: !message.recent,
      search: `${log} ${event.type} ${event.id} ${data}`.toLowerCase(),
    });
  }
  if (state.tail.length > TAIL_KEEP) state.tail.splice(0, state.tail.length - TAIL_KEEP);
  scheduleTail();
}

function scheduleTail() {
  if (state.dirty || $('tail-pause').checked) return;
  state.dirty = true;
  requestAnimationFrame(renderTail);
}

function renderTail() {
  state.dirty = false;
  const filter = $('tail-filter').value.trim().toLowerCase();
  const rows = [];
  for (let i = state.tail.length - 1; i >= 0 && rows.length < TAIL_SHOWN; i--) {
    const item = state.tail[i];
    if (filter && !item.search.includes(filter)) continue;
    const row = el('div', item.fresh ? 'row fresh' : 'row');
    row.dataset.log = item.log;
    row.dataset.id = item.event.id;
    row.append(
      el('span', 'time', formatTime(item.event.timestamp)),
      el('span', 'log', item.log),
      el('span', 'seq', `#${item.seq}`),
      el('span', 'type', item.event.type),
      el('span', 'id', item.event.id),
      el('span', 'data', item.data.length > 300 ? `${item.data.slice(0, 300)}…` : item.data),
    );
    rows.push(row);
    item.fresh = false;
  }
  $('tail').replaceChildren(...rows);
}

function renderClients(total) {
  $('clients-count').textContent = String(total);
  const body = $('clients').tBodies[0];
  const clients = [...state.clients.values()].sort((a, b) => a.id - b.id);
  body.replaceChildren(...clients.map((c) => {
    const tr = el('tr');
    tr.append(el('td', 'num', String(c.id)), el('td', '', c.room), el('td', '', c.subject),
      el('td', 'muted', formatTime(c.connectedAt)));
    return tr;
  }));
  $('clients-empty').hidden = clients.length > 0;
}

// A log not opened since the server started has no known seq (the server does not open every
// log on disk to count it).
function seqCell(seq) {
  const cell = el('td', 'num', seq === null ? '–' : String(seq));
  if (seq === null) cell.title = 'not loaded since the server started';
  return cell;
}

function renderRooms(rooms) {
  $('rooms').tBodies[0].replaceChildren(...rooms.map((r) => {
    const tr = el('tr');
    tr.dataset.room = r.name;
    tr.append(el('td', '', r.name), seqCell(r.seq), el('td', 'num', String(r.clients)));
    return tr;
  }));
  $('rooms-empty').hidden = rooms.length > 0;
}

function renderRepos(repos) {
  const rows = [];
  for (const repo of repos) {
    for (const branch of repo.branches) {
      const tr = el('tr');
      tr.append(el('td', '', repo.name), el('td', '', branch.name), seqCell(branch.seq));
      rows.push(tr);
    }
  }
  $('repos').tBodies[0].replaceChildren(...rows);
  $('repos-empty').hidden = rows.length > 0;
}

function drawChart() {
  const canvas = $('rate-chart');
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (width === 0 || height === 0) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.documentElement);
  const line = styles.getPropertyValue('--line').trim();
  const accent = styles.getPropertyValue('--accent').trim();
  const muted = styles.getPropertyValue('--muted').trim();
  const max = niceMax(Math.max(1, ...state.rates));
  const left = 44;
  const top = 8;
  const plotW = width - left - 8;
  const plotH = height - top - 18;
  ctx.font = '11px system-ui, sans-serif';
  ctx.fillStyle = muted;
  ctx.strokeStyle = line;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (plotH * i) / 4;
    ctx.beginPath();
    ctx.moveTo(left, Math.round(y) + 0.5);
    ctx.lineTo(left + plotW, Math.round(y) + 0.5);
    ctx.stroke();
    ctx.fillText(formatRate((max * i) / 4), 4, y + 4);
  }
  ctx.fillText(`-${CHART_POINTS}s`, left, height - 4);
  ctx.fillText('now', left + plotW - 22, height - 4);
  if (state.rates.length < 2) return;
  const step = plotW / (CHART_POINTS - 1);
  const x0 = left + plotW - step * (state.rates.length - 1);
  const point = (v, i) => [x0 + i * step, top + plotH - (plotH * v) / max];
  ctx.beginPath();
  state.rates.forEach((v, i) => {
    const [x, y] = point(v, i);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.strokeStyle = accent;
  ctx.lineWidth = 2;
  ctx.stroke();
  ctx.lineTo(left + plotW, top + plotH);
  ctx.lineTo(x0, top + plotH);
  ctx.closePath();
  ctx.globalAlpha = 0.15;
  ctx.fillStyle = accent;
  ctx.fill();
  ctx.globalAlpha = 1;
}

function niceMax(value) {
  const magnitude = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 5, 10]) if (value <= m * magnitude) return m * magnitude;
  return 10 * magnitude;
}

function formatRate(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)}k`;
  return value >= 10 || Number.isInteger(value) ? String(Math.round(value)) : value.toFixed(1);
}

function formatTime(ms) {
  const date = new Date(ms);
  return Number.isNaN(date.getTime()) ? '' : date.toISOString().slice(11, 23);
}

function formatDuration(seconds) {
  if (seconds < 60) return `${seconds}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m ${seconds % 60}s`;
  return `${Math.floor(seconds / 3600)}h ${Math.floor((seconds % 3600) / 60)}m`;
}

$('auth-form').addEventListener('submit', (submit) => {
  submit.preventDefault();
  const type = $('auth-type').value;
  const secret = $('auth-secret').value.trim();
  const auth = type === 'apikey' ? { type, key: secret } : { type, token: secret };
  sessionStorage.setItem(AUTH_KEY, JSON.stringify(auth));
  $('auth-secret').value = '';
  setStatus('wait', 'connecting…');
  start();
});
$('sign-out').addEventListener('click', () => {
  sessionStorage.removeItem(AUTH_KEY);
  state.monitor?.stop();
  location.reload();
});
$('tail-filter').addEventListener('input', () => { state.dirty = false; scheduleTail(); });
$('tail-pause').addEventListener('change', () => scheduleTail());
window.addEventListener('resize', drawChart);

start();
