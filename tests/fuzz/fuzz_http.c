/* libFuzzer target for the server's request layer: the functions the HTTP server runs on every body.
 * The first byte picks the route (chat, completions, tokenize, detokenize); the rest is the body, given to
 * api_request_parse exactly as the server does. When it parses, the prompt is built with the bundled model's
 * tokenizer and chat template ($STRATA_FIXTURES/models/kjv-qwen3-21m-8bit, default build/fixtures; without them
 * only token-id prompts are built), the budget is computed, responses and stream chunks are rendered from a
 * made-up result, and the body's bytes are pushed through the stop-string / reasoning processor with the request's
 * stop strings.
 * Beyond "no crash, no leak, no hang", it checks: an error always has a 4xx status and a message; a parsed
 * request's values are in range; the processor's outputs are prefixes of the input (stop strings removed) and
 * never contain a stop string. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "server/server.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

#define FUZZ_CHECK(c)                                                                                                  \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "fuzz_http: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__);                          \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

static struct tokenizer *tok;
static struct chat_template *tmpl;
static bool loaded;

static void load(void)
{
    if (loaded) return;
    loaded = true;
    const char *root = getenv("STRATA_FIXTURES");
    char dir[1024], err[ST_ERR_LEN];
    snprintf(dir, sizeof(dir), "%s/models/kjv-qwen3-21m-8bit", root && *root ? root : "build/fixtures");
    if (tokenizer_load(&tok, dir, err) < 0) {
        fprintf(stderr, "fuzz_http: %s (text and chat prompts are not built)\n", err);
        tok = NULL;
        return;
    }
    const char *src = tokenizer_chat_template(tok);
    if (src && chat_template_compile(&tmpl, src, err) < 0) {
        fprintf(stderr, "fuzz_http: chat template: %s\n", err);
        tmpl = NULL;
    }
    if (tmpl) { /* small budgets: a fuzz input must not spend seconds in one render */
        struct chat_template_limits l;
        chat_template_default_limits(&l);
        l.max_output_bytes = 1 << 20;
        l.max_loop_iters = 100000;
        l.max_steps = 1000000;
        l.max_work_bytes = 32 << 20;
        chat_template_set_limits(tmpl, &l);
    }
}

static void render(const struct api_request *r, int n_prompt)
{
    struct api_token toks[3] = {
        {.id = 1, .logprob = -0.25f, .n_top = 2, .top_ids = {1, 2}, .top_lp = {-0.25f, -1.5f}},
        {.id = 151645, .logprob = -3.0f, .n_top = 1, .top_ids = {3}, .top_lp = {-0.1f}},
        {.id = 7, .logprob = -1e30f, .n_top = 0},
    };
    struct api_result res = {.id = "chatcmpl-fuzz", .created = 1, .model = "m", .content = "abc", .content_len = 3,
                             .reasoning = "r", .reasoning_len = 1, .tokens = toks, .n_tokens = 3, .n_prompt = n_prompt,
                             .n_completion = 3, .finish_reason = "stop", .stop_str = r->n_stop ? r->stop[0] : NULL,
                             .stop_id = -1, .first = true};
    json_t *j = api_response_json(r, &res, tok);
    FUZZ_CHECK(j != NULL);
    char *s = json_dumps(j, JSON_COMPACT);
    FUZZ_CHECK(s != NULL);
    free(s);
    json_decref(j);
    j = api_chunk_json(r, &res, tok);
    FUZZ_CHECK(j != NULL);
    json_decref(j);
    j = api_usage_chunk_json(r, &res);
    FUZZ_CHECK(j != NULL);
    json_decref(j);
}

/* The body as generated text, in pieces cut on character boundaries, through the stop / think processor. */
static void process_text(const struct api_request *r, const uint8_t *data, size_t size)
{
    struct textproc tp;
    if (textproc_init(&tp, r->stop, r->n_stop, true, size > 0 && (data[0] & 1)) < 0) return;
    size_t i = 0, n_in = 0;
    int stopped = 0;
    while (i < size && !stopped) {
        size_t j = i + 1 + (data[i] % 7);
        if (j > size) j = size;
        while (j < size && (data[j] & 0xC0) == 0x80) j++; /* the detokenizer never cuts a character */
        stopped = textproc_push(&tp, (const char *)data + i, j - i);
        FUZZ_CHECK(stopped >= 0);
        n_in = j;
        i = j;
    }
    FUZZ_CHECK(textproc_finish(&tp) >= 0);
    /* outputs never hold more than went in, and hold no stop string */
    FUZZ_CHECK(tp.content.len + tp.reasoning.len <= n_in);
    for (int k = 0; k < r->n_stop; k++) {
        FUZZ_CHECK(!memmem(tp.content.s, tp.content.len, r->stop[k], strlen(r->stop[k])));
        FUZZ_CHECK(!memmem(tp.reasoning.s, tp.reasoning.len, r->stop[k], strlen(r->stop[k])));
    }
    textproc_free(&tp);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    load();
    if (size < 1) return 0;
    enum api_kind kind = (enum api_kind)(data[0] % API_KIND_COUNT);
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    struct api_limits lim = {"m", tok ? 151936 : 1000, 256, 20};
    struct api_request r;
    struct api_error e;
    if (api_request_parse(&r, kind, body, len, &lim, &e) < 0) {
        FUZZ_CHECK(e.status >= 400 && e.status < 500 && e.message[0]);
        json_t *j = api_error_json(&e);
        FUZZ_CHECK(j != NULL);
        json_decref(j);
        api_request_free(&r);
        return 0;
    }
    FUZZ_CHECK(r.top_logprobs >= 0 && r.top_logprobs <= lim.max_top);
    FUZZ_CHECK(r.max_tokens >= 0 && r.n_stop <= API_MAX_STOP && r.n_stop_ids <= API_MAX_STOP_IDS);
    FUZZ_CHECK(sample_params_check(&r.sp, lim.vocab, NULL) == 0);
    for (int i = 0; i < r.n_prompt_ids; i++) FUZZ_CHECK(r.prompt_ids[i] >= 0 && r.prompt_ids[i] < lim.vocab);
    struct api_prompt p;
    if (api_prompt_build(&r, tok, tmpl, &p, &e) == 0) {
        int mt;
        if (api_request_budget(&r, p.n_ids, &lim, &mt, &e) == 0) FUZZ_CHECK(mt >= 1 && p.n_ids + mt <= lim.n_ctx);
        else FUZZ_CHECK(e.status == 400);
        for (int i = 0; i < p.n_ids; i++) FUZZ_CHECK(p.ids[i] >= 0 && p.ids[i] < lim.vocab);
        render(&r, p.n_ids);
        api_prompt_free(&p);
    } else {
        FUZZ_CHECK(e.status >= 400 && e.message[0]);
    }
    process_text(&r, data, size);
    api_request_free(&r);
    return 0;
}
