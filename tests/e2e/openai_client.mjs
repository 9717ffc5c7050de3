// The official `openai` npm client against a running `strata serve` (bundled 8-bit model, --api-key test-key).
// usage: node openai_client.mjs BASE_URL MODEL_NAME GOLDENS_JSON
// Chat and completions, streaming and not, must give the golden greedy texts of the q8 goldens; errors must come
// back as the client's typed errors. Prints one line per failed check and a summary; exit 0 only if all passed.
import fs from 'node:fs';
import OpenAI from 'openai';

const [base, model, goldensPath] = process.argv.slice(2);
const goldens = JSON.parse(fs.readFileSync(goldensPath, 'utf8'));
const cases = goldens.cases.q8;
const EOS = '<|im_end|>';
const strip = (s) => (s.endsWith(EOS) ? s.slice(0, -EOS.length) : s);

let passed = 0;
let failed = 0;
function check(cond, what) {
  if (cond) passed++;
  else {
    failed++;
    console.log(`  FAIL ${what}`);
  }
}

const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'test-key', maxRetries: 0, timeout: 120000 });

// models
const models = await client.models.list();
check(models.data.length === 1 && models.data[0].id === model, `models.list: ${JSON.stringify(models.data)}`);
const one = await client.models.retrieve(model);
check(one.id === model && one.object === 'model', `models.retrieve: ${JSON.stringify(one)}`);

// chat, non-streaming and streaming, on the golden chat cases (greedy text up to a near-tie is compared by
// server_goldens.sh; these cases are the ones with no near-tie before the end)
const chatCases = cases.filter((c) => c.kind === 'chat' && Math.min(...c.greedy_margins) >= 0.02);
check(chatCases.length >= 2, `need at least 2 chat goldens without near-ties, got ${chatCases.length}`);
for (const c of chatCases) {
  const want = strip(c.greedy_text);
  const params = {
    model,
    messages: c.messages,
    temperature: 0,
    max_tokens: c.greedy_ids.length,
    chat_template_kwargs: { enable_thinking: c.enable_thinking },
  };
  const r = await client.chat.completions.create(params);
  const m = r.choices[0].message;
  const got = c.enable_thinking ? `<think>${m.reasoning_content ?? ''}</think>${m.content ?? ''}` : m.content;
  check(got === want, `chat ${JSON.stringify(c.messages)}: ${JSON.stringify(got)} != ${JSON.stringify(want)}`);
  check(r.object === 'chat.completion' && r.id.startsWith('chatcmpl-'), `chat object/id: ${r.object} ${r.id}`);
  check(r.choices[0].finish_reason === 'stop', `chat finish_reason ${r.choices[0].finish_reason}`);
  check(r.usage.prompt_tokens === c.prompt_ids.length, `chat usage.prompt_tokens ${r.usage.prompt_tokens} != ${c.prompt_ids.length}`);
  // the goldens end in EOS, which the completion leaves out (or reports as its last token)
  check([c.greedy_ids.length - 1, c.greedy_ids.length].includes(r.usage.completion_tokens),
    `chat usage.completion_tokens ${r.usage.completion_tokens} (goldens: ${c.greedy_ids.length} with EOS)`);
  check(r.usage.total_tokens === r.usage.prompt_tokens + r.usage.completion_tokens, 'chat usage.total_tokens');

  const s = await client.chat.completions.create({ ...params, stream: true, stream_options: { include_usage: true } });
  let content = '';
  let reasoning = '';
  let finish = null;
  let usage = null;
  let role = null;
  let chunks = 0;
  for await (const chunk of s) {
    chunks++;
    if (chunk.usage) usage = chunk.usage;
    for (const ch of chunk.choices) {
      if (ch.delta.role) role = ch.delta.role;
      content += ch.delta.content ?? '';
      reasoning += ch.delta.reasoning_content ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  const sgot = c.enable_thinking ? `<think>${reasoning}</think>${content}` : content;
  check(sgot === want, `chat stream: ${JSON.stringify(sgot)} != ${JSON.stringify(want)}`);
  check(role === 'assistant' && finish === 'stop' && chunks > 3, `chat stream role ${role} finish ${finish} chunks ${chunks}`);
  check(usage && usage.completion_tokens === r.usage.completion_tokens && usage.prompt_tokens === r.usage.prompt_tokens,
    `chat stream usage ${JSON.stringify(usage)}`);
}

// completions, on the golden text cases
const textCases = cases.filter((c) => c.kind === 'text' && Math.min(...c.greedy_margins) >= 0.02);
check(textCases.length >= 1, 'need a text golden without near-ties');
for (const c of textCases) {
  const want = strip(c.greedy_text);
  const params = { model, prompt: c.prompt, temperature: 0, max_tokens: c.greedy_ids.length, logprobs: 2 };
  const r = await client.completions.create(params);
  check(r.choices[0].text === want, `completion ${JSON.stringify(c.prompt)}: ${JSON.stringify(r.choices[0].text)} != ${JSON.stringify(want)}`);
  check(r.object === 'text_completion' && r.id.startsWith('cmpl-'), `completion object/id ${r.object} ${r.id}`);
  const lp = r.choices[0].logprobs;
  check(lp && lp.tokens.length === r.usage.completion_tokens && lp.token_logprobs.every((x) => x <= 0),
    `completion logprobs ${JSON.stringify(lp).slice(0, 200)}`);
  check(lp && lp.tokens.join('') === want, `completion logprob tokens join to the text: ${JSON.stringify(lp && lp.tokens)}`);

  const s = await client.completions.create({ ...params, logprobs: undefined, stream: true });
  let text = '';
  let finish = null;
  for await (const chunk of s) {
    for (const ch of chunk.choices) {
      text += ch.text ?? '';
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  check(text === want, `completion stream: ${JSON.stringify(text)} != ${JSON.stringify(want)}`);
  check(finish === r.choices[0].finish_reason, `completion stream finish ${finish}`);
}

// a stop string: the text ends before it, finish_reason stop, stop_reason names it
{
  const c = textCases[0];
  const want = strip(c.greedy_text);
  const cut = want.indexOf(' ', 3);
  const stop = want.slice(cut, cut + 4);
  const r = await client.completions.create({ model, prompt: c.prompt, temperature: 0, max_tokens: 40, stop: [stop] });
  check(r.choices[0].text === want.slice(0, want.indexOf(stop)) && r.choices[0].finish_reason === 'stop',
    `stop ${JSON.stringify(stop)}: ${JSON.stringify(r.choices[0].text)} ${r.choices[0].finish_reason}`);
}

// typed errors
async function expectError(fn, cls, status, what) {
  try {
    await fn();
    check(false, `${what}: no error`);
  } catch (e) {
    check(e instanceof cls && e.status === status, `${what}: got ${e.constructor.name} ${e.status} ${e.message}`);
  }
}
await expectError(() => client.chat.completions.create({ model, messages: [] }), OpenAI.BadRequestError, 400, 'empty messages');
await expectError(() => client.chat.completions.create({ model: 'gpt-4o', messages: [{ role: 'user', content: 'x' }] }),
  OpenAI.NotFoundError, 404, 'unknown model');
await expectError(() => client.completions.create({ model, prompt: 'x', temperature: -1 }), OpenAI.BadRequestError, 400, 'temperature');
const wrongKey = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'wrong', maxRetries: 0 });
await expectError(() => wrongKey.models.list(), OpenAI.AuthenticationError, 401, 'wrong API key');

// an aborted stream frees its slot
{
  const ac = new AbortController();
  const s = await client.completions.create({ model, prompt: 'And', max_tokens: 1000, ignore_eos: true, stream: true },
    { signal: ac.signal });
  let n = 0;
  try {
    for await (const chunk of s) {
      n += chunk.choices.length;
      if (n >= 3) ac.abort();
    }
  } catch (e) {
    check(e.name === 'APIUserAbortError' || e.name === 'AbortError', `abort: ${e.name} ${e.message}`);
  }
  let active = -1;
  for (let i = 0; i < 50 && active !== 0; i++) {
    await new Promise((res) => setTimeout(res, 100));
    const text = await (await fetch(`${base}/metrics`)).text();
    active = Number((text.match(/^strata_active_sequences (\d+)/m) || [])[1]);
  }
  check(active === 0, `after an aborted stream the slot must be free (active sequences ${active})`);
}

console.log(`openai client: ${passed} checks passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
