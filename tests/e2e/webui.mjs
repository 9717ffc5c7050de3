// The web page at / in headless Chromium (playwright-core), against `strata serve` with an API key and a 2-stage
// pipeline. usage: node webui.mjs BASE_URL API_KEY MODEL_NAME ARTIFACT_DIR USER_DATA_DIR
// Enters the key, chats (the answer must stream in, several partial lengths before the end, and equal the API's
// own greedy answer), shows an API error, stops a long generation (the page and the server must both stop),
// lists the cluster's nodes with layer bars that tile the model's depth, polls only while the cluster tab is
// shown, and fits a phone-width window. Any console error fails. Screenshots go to ARTIFACT_DIR/webui-*.png.
// Prints one line per check; exit 0 only if all passed.
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const [base, key, model, artifacts, userDataDir] = process.argv.slice(2);
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium';
let passed = 0;
let failed = 0;
function check(cond, what) {
  if (cond) {
    passed++;
    console.log(`  ok   ${what}`);
  } else {
    failed++;
    console.log(`  FAIL ${what}`);
  }
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(p, body) {
  const r = await fetch(base + p, {
    method: body ? 'POST' : 'GET',
    headers: { Authorization: `Bearer ${key}`, 'Content-Type': 'application/json' },
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!r.ok) throw new Error(`${p}: HTTP ${r.status} ${await r.text()}`);
  return r.json();
}
const generated = async () => (await api('/v1/cluster')).throughput.generated_tokens;

fs.mkdirSync(artifacts, { recursive: true });
const ctx = await chromium.launchPersistentContext(userDataDir, {
  executablePath: chromiumPath,
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  viewport: { width: 1280, height: 800 },
  timeout: 60000,
});
const page = ctx.pages()[0] || (await ctx.newPage());
page.setDefaultTimeout(15000);

const consoleErrors = [];
page.on('console', (m) => {
  if (m.type() === 'error') consoleErrors.push({ t: Date.now(), text: `${m.text()} (${m.location().url})` });
});
page.on('pageerror', (e) => consoleErrors.push({ t: Date.now(), text: `uncaught: ${e.message}` }));
const apiRequests = [];
page.on('request', (r) => {
  const u = new URL(r.url());
  if (u.pathname.startsWith('/v1/')) apiRequests.push({ t: Date.now(), path: u.pathname, auth: r.headers().authorization });
});

const shot = async (name) => {
  const f = path.join(artifacts, `webui-${name}.png`);
  await page.screenshot({ path: f });
  console.log(`  screenshot ${f}`);
};
const lastText = (role) => page.evaluate((r) => {
  const m = [...document.querySelectorAll(`#messages .msg.${r} .content`)].pop();
  return m ? m.textContent : null;
}, role);
const finished = async () => {
  await page.waitForFunction(() => {
    const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
    return m && m.dataset.state;
  }, null, { timeout: 60000 });
  return page.evaluate(() => {
    const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
    const d = m.querySelector('details');
    return {
      state: m.dataset.state,
      text: m.querySelector('.content').textContent,
      meta: m.querySelector('.meta').textContent,
      thinkingShown: !d.hidden,
      thinkingOpen: d.open,
      sendDisabled: document.getElementById('send').disabled,
      stopDisabled: document.getElementById('stop').disabled,
    };
  });
};
async function sendMessage(text) {
  await page.fill('#prompt', text);
  await page.click('#send');
}
// Records every length the last assistant message's text takes, and whether Stop was enabled meanwhile.
async function recordStream() {
  await page.evaluate(() => {
    window.__lens = [];
    window.__stopSeen = false;
    const m = document.getElementById('messages');
    if (window.__obs) window.__obs.disconnect();
    window.__obs = new MutationObserver(() => {
      const c = [...m.querySelectorAll('.msg.assistant .content')].pop();
      if (!c) return;
      window.__lens.push(c.textContent.length);
      if (c.textContent.length > 0 && !document.getElementById('stop').disabled) window.__stopSeen = true;
    });
    window.__obs.observe(m, { subtree: true, childList: true, characterData: true });
  });
}

async function phoneFits(what) {
  const r = await page.evaluate(() => {
    const w = window.innerWidth;
    const over = [];
    for (const e of document.querySelectorAll('body *')) {
      const b = e.getBoundingClientRect();
      if (b.width > 0 && b.height > 0 && (b.right > w + 0.5 || b.left < -0.5)) over.push(`${e.tagName}#${e.id}.${e.className} [${Math.round(b.left)}, ${Math.round(b.right)}]`);
    }
    return { sw: document.scrollingElement.scrollWidth, w, over: over.slice(0, 5) };
  });
  check(r.sw <= r.w, `${what}: no horizontal overflow at phone width (scrollWidth ${r.sw} <= innerWidth ${r.w})`);
  check(r.over.length === 0, `${what}: every element inside the viewport ${r.over.join('; ')}`);
}

try {
  // ---- the page itself ----
  const resp = await page.goto(`${base}/`, { waitUntil: 'load' });
  const h = resp.headers();
  check(resp.status() === 200, `GET / -> ${resp.status()}`);
  check(h['content-type'] === 'text/html; charset=utf-8', `Content-Type ${h['content-type']}`);
  const csp = h['content-security-policy'] || '';
  check(/default-src 'self'/.test(csp) && /script-src 'sha256-[A-Za-z0-9+/]{43}='/.test(csp) &&
    /style-src 'sha256-/.test(csp) && !csp.includes('unsafe'), `strict CSP: ${csp}`);
  check(await page.evaluate(() => document.querySelectorAll('script[src], link[rel=stylesheet], iframe').length === 0),
    'no external scripts or style sheets');

  // ---- the key: asked for before any API call, then sent as a Bearer token and kept in sessionStorage ----
  await page.waitForSelector('#keyform:not([hidden])');
  check(await page.evaluate(() => document.activeElement && document.activeElement.id === 'key'), 'the key field has the focus');
  check(apiRequests.length === 0, `no API call before the key is given (${apiRequests.length})`);
  check(await page.isDisabled('#send'), 'Send is disabled without a model');
  await shot('desktop-key');
  await page.fill('#key', key);
  await page.press('#key', 'Enter');
  await page.waitForFunction((m) => [...document.querySelectorAll('#model option')].some((o) => o.value === m), model);
  check(await page.isHidden('#keyform'), 'the key form closes');
  const store = await page.evaluate(() => ({ s: sessionStorage.getItem('strata.apiKey'), l: localStorage.length }));
  check(store.s === key && store.l === 0, `the key is in sessionStorage only (${JSON.stringify(store)})`);
  await page.waitForFunction(() => document.getElementById('health').textContent === 'ok');
  check(true, 'health pill says ok');

  // ---- a chat message streams in ----
  const prompt = 'Recite John 3:16';
  await page.fill('#temperature', '0');
  await page.fill('#max_tokens', '200');
  await recordStream();
  await sendMessage(prompt);
  const r1 = await finished();
  const lens = await page.evaluate(() => window.__lens);
  const partial = new Set(lens.filter((n) => n > 0 && n < r1.text.length));
  check(r1.state === 'done' && /finish: (stop|length)/.test(r1.meta), `the answer completes: ${r1.state} "${r1.meta}"`);
  check(r1.text.length > 0, `the answer has text: ${JSON.stringify(r1.text)}`);
  check(partial.size >= 2, `the text streamed in: ${partial.size} partial lengths before ${r1.text.length}`);
  check(lens.every((n, i) => i === 0 || n >= lens[i - 1]), 'the text only grew while streaming');
  check(await page.evaluate(() => window.__stopSeen), 'Stop was enabled while streaming');
  check(!r1.sendDisabled && r1.stopDisabled, 'Send is enabled and Stop disabled afterwards');
  check(!r1.thinkingShown || !r1.thinkingOpen, 'the thinking part, if any, is folded away');
  const userText = await lastText('user');
  check(userText === prompt, `the user message is shown: ${JSON.stringify(userText)}`);
  const ref = await api('/v1/chat/completions', {
    model, messages: [{ role: 'user', content: prompt }], temperature: 0, max_tokens: 200,
    chat_template_kwargs: { enable_thinking: true },
  });
  const want = ref.choices[0].message.content.replace(/^\s+/, '');
  check(r1.text === want, `the streamed text equals the API's greedy answer ${JSON.stringify(want)}`);

  // ---- text is never parsed as HTML ----
  const tricky = '<img src="/xss.png"><b>bold</b> & "quotes"';
  await sendMessage(tricky);
  const r2 = await finished();
  check(r2.state === 'done', `second turn completes: ${r2.meta}`);
  check(await page.evaluate(() => document.querySelectorAll('#messages img, #messages b').length === 0),
    'markup in messages stays text');
  check((await lastText('user')) === tricky, 'the user text is shown verbatim');

  // ---- the thinking part folds away, and an error event inside a stream is shown (canned streams) ----
  const sseBody = (...events) => events.map((e) => `data: ${typeof e === 'string' ? e : JSON.stringify(e)}\n\n`).join('');
  const chunk = (delta, finish = null) => ({
    id: 'chatcmpl-canned', object: 'chat.completion.chunk', created: 0, model,
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
  });
  const canned = (body) => page.route('**/v1/chat/completions',
    (route) => route.fulfill({ status: 200, contentType: 'text/event-stream', body }), { times: 1 });
  await canned(sseBody(chunk({ role: 'assistant', content: '' }), chunk({ reasoning_content: '\nLet me think ' }),
    chunk({ reasoning_content: '<i>about</i> it.\n' }), chunk({ content: '\n\nThe answer.' }), chunk({}, 'stop'), '[DONE]'));
  await sendMessage('Think first');
  const rt = await finished();
  const thought = await page.evaluate(() => {
    const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
    const d = m.querySelector('details');
    return { text: d.querySelector('.thought').textContent, summary: d.querySelector('summary').textContent, tags: m.querySelectorAll('i').length };
  });
  check(rt.state === 'done' && rt.text === 'The answer.', `canned stream: content ${JSON.stringify(rt.text)}`);
  check(rt.thinkingShown && !rt.thinkingOpen && /^Thinking/.test(thought.summary),
    `the thinking part is in a closed <details> ("${thought.summary}")`);
  check(thought.text === 'Let me think <i>about</i> it.\n' && thought.tags === 0, `the thinking text is kept as text: ${JSON.stringify(thought.text)}`);
  await canned(sseBody(chunk({ role: 'assistant', content: '' }), chunk({ content: 'partial' }),
    { error: { message: 'generation failed: stage 1 lost', type: 'server_error', param: null, code: null } }, '[DONE]'));
  await sendMessage('This one fails');
  const re = await finished();
  check(re.state === 'error' && re.meta === 'server_error: generation failed: stage 1 lost' && re.text === 'partial',
    `an error event is shown: ${re.state} "${re.meta}"`);

  // ---- an API error is shown with its status and message ----
  const tErr = Date.now();
  await page.fill('#max_tokens', '100000');
  await sendMessage('Recite Genesis 1:1');
  const r3 = await finished();
  const tErrEnd = Date.now();
  check(r3.state === 'error' && /^HTTP 400: \S/.test(r3.meta), `a 400 from the API is shown: "${r3.meta}"`);
  await page.fill('#max_tokens', '1900');
  await shot('desktop-chat');

  // ---- Stop ends a long generation, in the page and on the server ----
  await page.fill('#temperature', '');
  await page.check('#ignore_eos');
  await recordStream();
  const g0 = await generated();
  await sendMessage('Recite Psalm 119');
  await page.waitForFunction(() => {
    const c = [...document.querySelectorAll('#messages .msg.assistant .content')].pop();
    return c && c.textContent.length >= 20;
  });
  await page.click('#stop');
  const r4 = await finished();
  const l1 = (await lastText('assistant')).length;
  await sleep(1500);
  const l2 = (await lastText('assistant')).length;
  check(r4.state === 'stopped' && r4.meta === 'stopped', `the page says stopped: ${r4.state} "${r4.meta}"`);
  check(l1 === l2 && l1 >= 20, `no text after Stop (${l1} then ${l2} characters)`);
  check(!r4.sendDisabled && r4.stopDisabled, 'Send is enabled and Stop disabled after Stop');
  const gA = await generated();
  await sleep(1000);
  const gB = await generated();
  check(gA === gB && gB - g0 < 1900, `the server stopped generating (${gB - g0} of 1900 tokens, ${gA} then ${gB})`);
  await page.uncheck('#ignore_eos');
  await page.fill('#max_tokens', '200');

  // ---- the cluster view ----
  const truth = await api('/v1/cluster');
  const t0 = Date.now();
  await page.click('#tab-cluster');
  await page.waitForFunction((n) => document.querySelectorAll('#nodes .node').length === n, truth.nodes.length);
  const view = await page.evaluate(() => {
    const bars = [...document.querySelectorAll('#nodes .node')].map((card) => {
      const bar = card.querySelector('.layerbar');
      const fill = bar.querySelector('.fill');
      const b = bar.getBoundingClientRect();
      const f = fill ? fill.getBoundingClientRect() : { left: 0, width: 0 };
      return {
        name: card.dataset.name,
        badges: [...card.querySelectorAll('.badge')].map((x) => x.textContent),
        text: card.textContent,
        first: Number(bar.dataset.first),
        last: Number(bar.dataset.last),
        left: f.left - b.left,
        width: f.width,
        track: b.width,
      };
    });
    const d = document.getElementById('depth').getBoundingClientRect();
    const segs = [...document.querySelectorAll('#depth .seg')].map((s) => s.getBoundingClientRect().width);
    return { bars, depth: d.width, segs, summary: document.getElementById('summary').textContent };
  });
  check(truth.nodes.length === 2, `the pipeline has 2 nodes (${truth.nodes.length})`);
  check(JSON.stringify(view.bars.map((b) => b.name)) === JSON.stringify(truth.nodes.map((n) => n.name)),
    `the cluster view lists the nodes: ${view.bars.map((b) => b.name).join(', ')}`);
  view.bars.forEach((b, i) => {
    const n = truth.nodes[i];
    check(b.badges.includes(n.role) && b.badges.includes(n.verified ? 'verified' : 'unverified'),
      `${b.name}: role and verification shown (${b.badges.join(', ')})`);
    check(b.first === n.layers[0] && b.last === n.layers[1], `${b.name}: layers ${b.first}-${b.last}`);
    check(/s ago/.test(b.text) && b.text.includes(n.device) && /free of/.test(b.text) && /tokens\/s/.test(b.text),
      `${b.name}: heartbeat, device, memory and tokens/s shown`);
    const px = b.track / truth.n_layers;
    check(Math.abs(b.left - b.first * px) < 2 && Math.abs(b.width - (b.last - b.first + 1) * px) < 2,
      `${b.name}: its bar spans layers ${b.first}-${b.last} of ${truth.n_layers} (${b.left.toFixed(1)} + ${b.width.toFixed(1)} of ${b.track.toFixed(1)} px)`);
  });
  const sorted = [...view.bars].sort((a, b) => a.first - b.first);
  const tiles = sorted.length > 0 && sorted[0].first === 0 && sorted[sorted.length - 1].last === truth.n_layers - 1 &&
    sorted.every((b, i) => i === 0 || b.first === sorted[i - 1].last + 1);
  check(tiles, `the layer ranges cover the model's depth 0-${truth.n_layers - 1} without gaps or overlaps`);
  const segSum = view.segs.reduce((a, b) => a + b, 0);
  check(view.segs.length === 2 && Math.abs(segSum - view.depth) < 2, `the depth bar is filled (${segSum.toFixed(1)} of ${view.depth.toFixed(1)} px)`);
  check(view.summary.includes(model), 'the summary names the model');
  // polled every 2 s while shown, not at all once hidden
  await sleep(5000);
  const shown = apiRequests.filter((r) => r.path === '/v1/cluster' && r.t >= t0).length;
  check(shown >= 2 && shown <= 4, `/v1/cluster polled every 2 s while shown (${shown} requests in about 5 s)`);
  await shot('desktop-cluster');
  await page.focus('#tab-cluster');
  await page.keyboard.press('ArrowLeft');
  check(await page.isVisible('#view-chat') && await page.isHidden('#view-cluster'), 'ArrowLeft on the tabs goes back to the chat');
  const tHide = Date.now();
  await sleep(3000);
  const hidden = apiRequests.filter((r) => r.path === '/v1/cluster' && r.t > tHide + 100).length;
  check(hidden === 0, `no polling while the cluster tab is hidden (${hidden})`);
  check(apiRequests.every((r) => r.auth === `Bearer ${key}`), `every API request carried the key (${apiRequests.length})`);

  // ---- phone width: reload in the same tab (the key is remembered), chat, then the cluster ----
  await page.setViewportSize({ width: 390, height: 844 });
  await page.reload({ waitUntil: 'load' });
  await page.waitForFunction((m) => [...document.querySelectorAll('#model option')].some((o) => o.value === m), model);
  check(await page.isHidden('#keyform'), 'after a reload the key is remembered for this tab');
  check(!(await page.evaluate(() => document.getElementById('settings').open)), 'the settings start folded on a phone');
  await page.click('#settings summary');
  await page.fill('#temperature', '0');
  await phoneFits('settings open');
  await page.click('#settings summary');
  await sendMessage(prompt);
  const r5 = await finished();
  check(r5.state === 'done', `phone: the answer completes (${r5.meta})`);
  await phoneFits('chat');
  for (const id of ['#prompt', '#send', '#stop', '#tab-cluster']) {
    const b = await page.locator(id).boundingBox();
    check(b && b.x >= 0 && b.x + b.width <= 390 && b.y >= 0 && b.y + b.height <= 844, `phone: ${id} is on screen`);
  }
  await shot('phone-chat');
  await page.click('#tab-cluster');
  await page.waitForFunction(() => document.querySelectorAll('#nodes .node').length === 2);
  await phoneFits('cluster');
  await shot('phone-cluster');

  // ---- console: errors only where one was expected (the 400 of the error check) ----
  const unexpected = consoleErrors.filter((e) => !(e.t >= tErr && e.t <= tErrEnd && /status of 400/.test(e.text)));
  check(unexpected.length === 0, `no console errors ${unexpected.map((e) => e.text).join(' | ')}`);
} catch (e) {
  failed++;
  console.log(`  FAIL ${e.stack || e}`);
  await page.screenshot({ path: path.join(artifacts, 'webui-failure.png') }).catch(() => {});
  if (consoleErrors.length) console.log(`  console errors: ${consoleErrors.map((x) => x.text).join(' | ')}`);
}
await ctx.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
