// The dashboard: polls the daemon's read-only JSON API and draws it. Changes nothing.
// Every value from the API goes into the page as text (textContent), never as markup.
'use strict';

const POLL_MS = 2000;
const SVG = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : String(c));
  return e;
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function bytes(n) {
  if (n == null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + ' ' + units[i];
}

function count(n) {
  return n == null ? '—' : Number(n).toLocaleString('en-US');
}

function duration(secs) {
  const s = Math.floor(secs);
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d} d ${h} h`;
  if (h > 0) return `${h} h ${m} min`;
  if (m > 0) return `${m} min ${s % 60} s`;
  return `${s} s`;
}

// Sets an element's text, and its raw value in data-value (what the tests compare).
function show(id, text, raw) {
  const e = $(id);
  e.textContent = text;
  if (raw === undefined || raw === null) e.removeAttribute('data-value');
  else e.dataset.value = String(raw);
}

function list(id, items) {
  $(id).replaceChildren(...(items.length ? items : ['none']).map((t) => el('li', {}, t)));
}

// ---------------------------------------------------------------------------------------------

function renderStatus(s) {
  $('version').textContent = s.version;
  show('peer-id', s.peer_id || 'P2P off', s.peer_id || '');
  show('role', s.role, s.role);
  show('share', s.share, s.share);
  show('announce', s.announce, s.announce);
  let reach;
  if (s.reachability) reach = String(s.reachability);
  else if (!s.p2p) reach = 'P2P off (no --p2p-listen)';
  else reach = 'not measured yet: only the listen addresses are known';
  show('reachability', reach, s.reachability || '');
  list('addresses', s.p2p_addresses || []);
  list('upstreams', s.upstreams || []);
  show('uptime', duration(s.uptime_secs), s.uptime_secs);

  const st = s.store;
  show('narinfos', count(st.narinfos), st.narinfos);
  show('nars', count(st.nars), st.nars);
  show('nar-bytes', bytes(st.nar_bytes), st.nar_bytes);
  show('stored-bytes', bytes(st.stored_bytes), st.stored_bytes);
  if (st.nar_bytes > 0) {
    const saved = st.nar_bytes - st.stored_bytes;
    const pct = (100 * saved) / st.nar_bytes;
    show('dedup', `${bytes(Math.max(saved, 0))} (${pct.toFixed(1)} % of the NAR bytes)`, saved);
  } else {
    show('dedup', 'nothing stored yet', 0);
  }
  show('pinned', `${count(st.pinned_paths)} paths (${count(st.pinned_nars)} NARs)`, st.pinned_paths);
  const quota = $('quota');
  if (s.max_cache_size) {
    const used = st.cache_bytes;
    const bar = el('progress', { max: String(s.max_cache_size), value: String(Math.min(used, s.max_cache_size)) });
    quota.replaceChildren(bar, ` ${bytes(used)} of ${bytes(s.max_cache_size)}`);
    quota.dataset.value = String(s.max_cache_size);
  } else {
    show('quota', s.role === 'seed' ? 'none (a seed keeps everything)' : 'none', '');
  }
  show('dead', bytes(st.dead_bytes), st.dead_bytes);
  $('nix-conf').textContent =
    `substituters = ${location.protocol}//${location.host} https://cache.nixos.org`;

  const p = s.p2p;
  $('p2p-totals').textContent = p
    ? `connected ${count(p.connected_peers)} · sent ${bytes(p.bytes_up)} · received ${bytes(p.bytes_down)}` +
      ` · NARs fetched ${count(p.nars_fetched)} (failed ${count(p.nar_fetch_failures)})` +
      ` · requests answered ${count(p.requests_in)}, refused ${count(p.requests_refused)}` +
      ` · banned ${count(p.peers_banned)}`
    : 'P2P is off: start the daemon with --p2p-listen to share with peers.';
}

function renderPeers(peers) {
  show('peers-count', String(peers.length), peers.length);
  $('peers-empty').hidden = peers.length > 0;
  $('peers').replaceChildren(
    ...peers.map((p) => {
      const where = el('span', { class: p.lan ? 'tag lan' : 'tag' }, p.lan ? 'LAN' : 'WAN');
      let state;
      if (p.banned_secs != null) state = el('span', { class: 'tag banned' }, `banned ${duration(p.banned_secs)}`);
      else state = el('span', { class: p.connected ? 'tag' : 'tag off' }, p.connected ? 'connected' : 'gone');
      const id = el('td', { class: 'mono', title: p.peer_id }, p.peer_id.slice(0, 8) + '…' + p.peer_id.slice(-6));
      return el(
        'tr',
        { 'data-testid': 'peer-row' },
        id,
        el('td', {}, where),
        el('td', {}, state),
        el('td', { class: 'mono' }, p.address || '—'),
        el('td', {}, bytes(p.bytes_up)),
        el('td', {}, bytes(p.bytes_down)),
        el('td', {}, `${count(p.requests_in)} / ${count(p.requests_out)}`),
        el('td', {}, count(p.failures)),
      );
    }),
  );
}

function renderTransfers(t) {
  const rows = t.transfers;
  show('transfers-count', String(rows.length + t.untracked), rows.length + t.untracked);
  $('transfers-empty').hidden = rows.length > 0;
  $('transfers').replaceChildren(
    ...rows.map((x) => {
      const total = x.bytes_total;
      const bar = total
        ? el('progress', { max: String(total), value: String(Math.min(x.bytes_done, total)), 'data-testid': 'transfer-progress' })
        : el('progress', { 'data-testid': 'transfer-progress' });
      const done = total ? `${bytes(x.bytes_done)} of ${bytes(total)}` : bytes(x.bytes_done);
      const rate = x.elapsed_secs > 0 ? `${bytes(Math.round(x.bytes_done / x.elapsed_secs))}/s` : '—';
      const row = el(
        'tr',
        {
          'data-testid': 'transfer-row',
          'data-direction': x.direction,
          'data-done': String(x.bytes_done),
          'data-total': String(total ?? ''),
        },
        el('td', {}, x.direction === 'fetch' ? '↓ fetch' : '↑ serve'),
        el('td', { class: 'what mono', title: x.what }, x.what),
        el('td', {}, x.peer),
        el('td', {}, bar),
        el('td', {}, done),
        el('td', {}, rate),
      );
      return row;
    }),
  );
}

function renderErrors(e) {
  const events = e.events.slice().reverse(); // newest first
  show('errors-count', String(events.length), events.length);
  $('errors-empty').hidden = events.length > 0;
  $('errors').replaceChildren(
    ...events.map((x) =>
      el(
        'li',
        { 'data-testid': 'error-row' },
        el('span', { class: 'time' }, new Date(x.time_ms).toLocaleTimeString()),
        el('span', { class: x.level }, x.level),
        el('span', { class: 'mono' }, `${x.target}: ${x.message}`),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------------------------
// Charts: lines of per-interval differences of the history's cumulative counters.

const BYTE_SERIES = [
  { name: 'to Nix (HTTP)', color: '#4a6fd8', value: (s) => s.http_bytes_out },
  { name: 'to peers', color: '#2f855a', value: (s) => s.p2p_bytes_up },
  { name: 'from peers', color: '#8e44ad', value: (s) => s.p2p_bytes_down },
  { name: 'from upstreams', color: '#d35400', value: (s) => s.upstream_bytes_down },
  { name: 'uploads', color: '#7f8c8d', value: (s) => s.http_bytes_in },
];
const HIT_SERIES = [
  { name: 'local store', color: '#4a6fd8', value: (s) => s.hits_store },
  { name: 'LAN', color: '#2f855a', value: (s) => s.hits_lan },
  { name: 'peers', color: '#8e44ad', value: (s) => s.hits_peers },
  { name: 'upstream', color: '#d35400', value: (s) => s.hits_upstream },
  { name: 'missed', color: '#c0392b', value: (s) => s.misses },
];

// Differences between neighbouring samples: per second (rate) or per interval.
function deltas(samples, value, perSecond) {
  const out = [];
  for (let i = 1; i < samples.length; i += 1) {
    const dt = samples[i].time - samples[i - 1].time;
    const dv = Math.max(0, value(samples[i]) - value(samples[i - 1]));
    out.push({ t: samples[i].time, v: perSecond ? (dt > 0 ? dv / dt : 0) : dv });
  }
  return out;
}

// 1, 2 or 5 times a power of ten, at least v.
function niceCeil(v) {
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  const m = v / p;
  return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
}

function ago(secs) {
  return secs >= 120 ? `−${Math.round(secs / 60)} min` : `−${Math.round(secs)} s`;
}

// The window is the last hour, or less while the daemon has been up less (at least 1 min).
function drawChart(svgId, legendId, samples, series, perSecond, fmt) {
  const svg = $(svgId);
  const [W, H] = [600, 180]; // the viewBox
  const [L, R, T, B] = [78, 10, 10, 22]; // margins: left (labels), right, top, bottom (labels)
  const now = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  const first = samples.length ? samples[0].time : now;
  const t0 = Math.min(now - 60, Math.max(now - 3600, first));
  const span = now - t0;
  const lines = series.map((s) => ({ ...s, points: deltas(samples, s.value, perSecond) }));
  let max = 0;
  for (const l of lines) for (const p of l.points) max = Math.max(max, p.v);
  max = max > 0 ? niceCeil(max) : 1;
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const parts = [];
  for (const f of [0, 0.5, 1]) {
    parts.push(svgEl('line', { class: 'grid', x1: L, x2: W - R, y1: y(max * f), y2: y(max * f) }));
    const label = svgEl('text', { x: L - 6, y: y(max * f) + 4, 'text-anchor': 'end' });
    label.textContent = fmt(max * f);
    parts.push(label);
  }
  for (const [at, text, anchor] of [[t0, ago(span), 'start'], [t0 + span / 2, ago(span / 2), 'middle'], [now, 'now', 'end']]) {
    const label = svgEl('text', { x: x(at), y: H - 6, 'text-anchor': anchor });
    label.textContent = text;
    parts.push(label);
  }
  for (const l of lines) {
    if (l.points.length === 0) continue;
    const d = l.points.map((p, i) => `${i ? 'L' : 'M'}${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(' ');
    parts.push(svgEl('path', { class: 'series', d, stroke: l.color, 'data-series': l.name }));
    if (l.points.length <= 60) {
      for (const p of l.points) {
        parts.push(svgEl('circle', { cx: x(p.t).toFixed(1), cy: y(p.v).toFixed(1), r: 2.5, fill: l.color }));
      }
    }
  }
  if (samples.length < 2) {
    const wait = svgEl('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle' });
    wait.textContent = 'collecting: one sample every 10 s';
    parts.push(wait);
  }
  svg.replaceChildren(...parts);
  const total = (s) => (samples.length ? s.value(samples[samples.length - 1]) - s.value(samples[0]) : 0);
  $(legendId).replaceChildren(
    ...series.map((s) => {
      const sw = el('span', { class: 'swatch' });
      sw.style.background = s.color;
      return el('li', {}, sw, `${s.name}: ${perSecond ? bytes(total(s)) : count(total(s))}`);
    }),
  );
}

function renderHistory(h) {
  const samples = h.samples;
  drawChart('chart-bytes', 'legend-bytes', samples, BYTE_SERIES, true, (v) => `${bytes(Math.round(v))}/s`);
  drawChart('chart-hits', 'legend-hits', samples, HIT_SERIES, false, (v) => count(Math.round(v * 10) / 10));
}

// ---------------------------------------------------------------------------------------------

async function getJson(path) {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

const VIEWS = [
  ['/api/status', renderStatus],
  ['/api/peers', renderPeers],
  ['/api/transfers', renderTransfers],
  ['/api/history', renderHistory],
  ['/api/errors', renderErrors],
];

let polls = 0;

async function poll() {
  const results = await Promise.allSettled(VIEWS.map(([path]) => getJson(path)));
  const failed = [];
  results.forEach((r, i) => {
    const [path, render] = VIEWS[i];
    if (r.status === 'fulfilled') render(r.value);
    else failed.push(path);
  });
  const conn = $('conn');
  if (failed.length) {
    conn.textContent = `the daemon does not answer ${failed.join(', ')}`;
    conn.className = 'down';
  } else {
    conn.textContent = 'connected';
    conn.className = '';
    polls += 1;
    show('updated', new Date().toLocaleTimeString(), polls);
  }
  setTimeout(poll, POLL_MS);
}

poll();
