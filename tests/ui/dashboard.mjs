// Drives Debian's chromium through the daemon's dashboard (tests/tests/ui.rs starts the daemon
// and runs this). Environment: UI_URL (the daemon's http://127.0.0.1:PORT), UI_PROFILE (a fresh
// empty directory for --user-data-dir), UI_SCREENSHOT (where to write the PNG).
//
// Talks to the test over stdio: prints "READY" once the page shows the daemon's numbers, then
// waits for a "GO" line (a slow NAR download has started), follows the transfer on the page,
// and prints "PASS" at the end. Any failure prints "FAIL: <why>" and exits 1.
import { chromium } from 'playwright-core';
import readline from 'node:readline';

const URL_BASE = process.env.UI_URL;
const PROFILE = process.env.UI_PROFILE;
const SHOT = process.env.UI_SCREENSHOT;
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
// Generous: a loaded 2-core machine.
const WAIT_MS = 120000;

const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise((resolve) => lines.once('line', resolve));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(why) {
  throw new Error(why);
}

async function api(path) {
  const r = await fetch(URL_BASE + path, { cache: 'no-store' });
  if (!r.ok) fail(`${path}: HTTP ${r.status}`);
  return r.json();
}

// Polls `check` (async, returns a truthy value or a string saying what is still wrong) until it
// passes or WAIT_MS is over.
async function until(what, check) {
  const end = Date.now() + WAIT_MS;
  let last = '';
  for (;;) {
    const r = await check();
    if (r === true || (r && typeof r === 'object')) return r;
    last = r;
    if (Date.now() > end) fail(`${what}: still ${last} after ${WAIT_MS / 1000} s`);
    await sleep(250);
  }
}

const problems = [];
let ctx;
try {
  try {
    ctx = await chromium.launchPersistentContext(PROFILE, {
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: ARGS,
      viewport: { width: 1280, height: 1000 },
      timeout: WAIT_MS,
    });
  } catch (e) {
    fail(`chromium (/usr/bin/chromium) did not start: ${e.message}`);
  }
  const page = ctx.pages()[0] || (await ctx.newPage());
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') problems.push(`console ${m.type()}: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on('response', (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()} for ${r.url()}`);
    if (/^https?:/.test(r.url()) && !r.url().startsWith(URL_BASE)) problems.push(`a request left the daemon: ${r.url()}`);
  });

  // `/` redirects to the dashboard.
  const resp = await page.goto(URL_BASE + '/', { timeout: WAIT_MS });
  if (!page.url().endsWith('/ui/')) fail(`/ went to ${page.url()}, not /ui/`);
  if (!resp.ok()) fail(`the dashboard answered ${resp.status()}`);

  const value = (id) => page.getAttribute(`[data-testid="${id}"]`, 'data-value');
  const text = (id) => page.textContent(`[data-testid="${id}"]`);

  // A complete poll, then the numbers shown match /api/status and /api/peers right now.
  await until('the first complete poll', async () => (Number(await value('updated')) >= 1) || 'no poll');
  const shown = await until('the page matching /api/status', async () => {
    const s = await api('/api/status');
    const peers = await api('/api/peers');
    const errors = await api('/api/errors');
    if (peers.length < 1) return 'no peer connected yet';
    if (errors.events.length < 1) return 'no error logged yet';
    const want = {
      'errors-count': errors.events.length,
      'store-narinfos': s.store.narinfos,
      'store-nars': s.store.nars,
      'store-nar-bytes': s.store.nar_bytes,
      'store-stored-bytes': s.store.stored_bytes,
      'store-pinned': s.store.pinned_paths,
      'peers-count': peers.length,
      'node-role': s.role,
      'node-share': s.share,
      'node-peer-id': s.peer_id || '',
    };
    for (const [id, v] of Object.entries(want)) {
      const got = await value(id);
      if (got !== String(v)) return `${id} = ${got}, /api/status says ${v}`;
    }
    // What a person reads: the count as text, the peer id, every listen address.
    const paths = (await text('store-narinfos')).replace(/,/g, '');
    if (paths !== String(s.store.narinfos)) return `stored paths read "${paths}"`;
    if ((await text('node-peer-id')) !== s.peer_id) return `peer id reads ${await text('node-peer-id')}`;
    const addrs = await text('node-addresses');
    for (const a of s.p2p_addresses) if (!addrs.includes(a)) return `address ${a} not shown`;
    if (!(await text('store-dedup')).includes('%')) return 'no dedup figure';
    const rows = await page.locator('[data-testid="peer-row"]').count();
    if (rows !== peers.length) return `${rows} peer rows for ${peers.length} peers`;
    const lastError = errors.events[errors.events.length - 1].message;
    if (!(await text('errors')).includes(lastError)) return `the last error is not shown: ${lastError}`;
    return { narinfos: s.store.narinfos, nars: s.store.nars };
  });
  if (shown.narinfos < 1) fail('the test stores paths before the page loads');
  const svgPaths = await page.locator('[data-testid="chart-hits"] path').count();
  if (svgPaths < 1) fail('the hits graph draws no line');
  console.log(`READY ${JSON.stringify(shown)}`);

  // The test starts a slow download now.
  const go = await nextLine();
  if (go.trim() !== 'GO') fail(`expected GO, got ${go}`);

  // The fetch shows up with a progress bar, and the bar moves.
  const row = page.locator('[data-testid="transfer-row"][data-direction="fetch"]').first();
  const first = await until('a running fetch on the page', async () =>
    (await row.count()) > 0 && Number(await row.getAttribute('data-done')) > 0
      ? { done: Number(await row.getAttribute('data-done')) }
      : 'no fetch with bytes shown');
  if ((await row.locator('[data-testid="transfer-progress"]').count()) !== 1) fail('no progress bar');
  await until('the fetch moving on the page', async () => {
    if ((await row.count()) === 0) return 'the fetch row is gone before it moved';
    const d = Number(await row.getAttribute('data-done'));
    return d > first.done || `at ${d} bytes`;
  });
  const serving = await page.locator('[data-testid="transfer-row"][data-direction="serve"]').count();
  if (serving < 1) fail('the body going to the client is not listed');
  // The screenshot half-way, when the graphs have a few samples.
  await until('the fetch half-way on the page', async () => {
    if ((await row.count()) === 0) return 'the fetch row is gone';
    const [d, t] = [Number(await row.getAttribute('data-done')), Number(await row.getAttribute('data-total'))];
    return d * 2 >= t || `at ${d} of ${t} bytes`;
  });
  if (SHOT) await page.screenshot({ path: SHOT, fullPage: true });

  // Done: the list empties and the store counts one more path.
  await until('the stored NAR on the page', async () => {
    const n = Number(await value('store-narinfos'));
    const rows = await page.locator('[data-testid="transfer-row"]').count();
    return (n === shown.narinfos + 1 && rows === 0) || `${n} paths, ${rows} transfers listed`;
  });
  if (problems.length) fail(problems.join('\n'));
  console.log('PASS');
} catch (e) {
  console.log(`FAIL: ${e.message}`);
  if (problems.length) console.log(problems.join('\n'));
  process.exitCode = 1;
} finally {
  if (ctx) await ctx.close().catch(() => {});
  lines.close();
}
