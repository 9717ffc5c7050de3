/* strata run: generate from token ids, text, or an interactive chat, on one node. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "engine/engine.h"
#include "model/model.h"
#include "sample/sample.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata run [-m MODEL_DIR] (--prompt-ids 1,2,3 | -p TEXT | --chat) [options]\n"
            "\n"
            "input:\n"
            "  -m, --model DIR        model directory (default: the bundled %s)\n"
            "  --prompt-ids IDS       prompt as comma-separated token ids (no tokenizer needed)\n"
            "  -p, --prompt TEXT      prompt text (tokenized as is; '-' reads stdin)\n"
            "  --chat                 interactive chat on stdin/stdout with the model's chat template\n"
            "  --system TEXT          system message for --chat\n"
            "  --no-think             Qwen3: enable_thinking=false in the chat template\n"
            "  --add-special          add the tokenizer's special tokens (e.g. BOS) to -p text\n"
            "generation:\n"
            "  -n, --max-tokens N     tokens to generate (default 128)\n"
            "  --temp T               temperature (default 0.8; 0 = greedy)\n"
            "  --top-k K  --top-p P  --min-p P  --seed S\n"
            "  --repeat-penalty R  --presence-penalty P  --frequency-penalty P\n"
            "  --ignore-eos           keep generating past end-of-sequence tokens\n"
            "  --top-logprobs K       report the K most likely tokens at each step (with --json)\n"
            "  --json                 print one JSON object: prompt_ids, ids, top_logprobs (and text)\n"
            "engine:\n"
            "  --device D             cpu (default), cuda, cuda:N\n"
            "  --threads N            CPU threads (default: all cores)\n"
            "  --ctx N                context length (default min(4096, model max))\n"
            "  --batch N              prefill chunk size (default 256)\n"
            "  --reference            scalar reference kernels (slow; for checking)\n"
            "  --random-weights       generated weights instead of a model directory; needs --config\n"
            "  --config FILE          config.json for --random-weights\n"
            "  --bits B               0 (bf16), 4 or 8 for --random-weights (default 8)\n",
            cli_default_model());
}

struct run_opts {
    const char *model_dir, *prompt_ids, *prompt, *system, *config;
    bool chat, no_think, add_special, json, ignore_eos, random_weights, reference;
    long max_tokens, top_logprobs, threads, ctx, batch, bits;
    const char *device;
    struct sample_params sp;
};

struct runner {
    struct model model;
    struct engine *engine;
    struct tokenizer *tok;
    struct chat_template *tmpl;
    int32_t *cached; /* tokens whose KV is in slot 0 */
    int n_cached;
    float *logits;
    int vocab;
};

static bool is_eos(const struct model_config *c, int32_t id)
{
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id) return true;
    return false;
}

/* Forwards ids[from..n) into slot 0 in chunks; leaves the last token's logits in r->logits. */
static int feed(struct runner *r, const int32_t *ids, int from, int n, char *err)
{
    const struct engine_opts *eo = engine_opts(r->engine);
    int32_t *pos = malloc(sizeof(int32_t) * (size_t)eo->max_batch), *slot = calloc((size_t)eo->max_batch, sizeof(int32_t));
    uint8_t *want = calloc((size_t)eo->max_batch, 1);
    int rc = ST_OK;
    if (!pos || !slot || !want) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto done;
    }
    if (n > eo->n_ctx) {
        rc = err_set(err, ST_ERANGE, "%d tokens do not fit the context of %d (use --ctx)", n, eo->n_ctx);
        goto done;
    }
    for (int i = from; i < n; i += eo->max_batch) {
        int m = ST_MIN(eo->max_batch, n - i);
        for (int j = 0; j < m; j++) {
            pos[j] = i + j;
            want[j] = (i + j == n - 1);
        }
        struct batch b = {.n = m, .token = ids + i, .pos = pos, .slot = slot, .want_logits = want};
        if ((rc = engine_forward(r->engine, &b, NULL, r->logits, err)) < 0) goto done;
    }
done:
    free(pos);
    free(slot);
    free(want);
    return rc < 0 ? rc : ST_OK;
}

static int remember(struct runner *r, const int32_t *ids, int n)
{
    int32_t *c = realloc(r->cached, sizeof(int32_t) * (size_t)(n > 0 ? n : 1));
    if (!c) return ST_ENOMEM;
    memcpy(c, ids, sizeof(int32_t) * (size_t)n);
    r->cached = c;
    r->n_cached = n;
    return ST_OK;
}

/* Generates from prompt ids; streams text to stdout unless json (then fills out_json). */
static int generate(struct runner *r, const struct run_opts *o, const int32_t *prompt, int n_prompt, json_t *out_json,
                    char **out_text, char *err)
{
    const struct model_config *c = &r->model.cfg;
    int rc, common = 0;
    struct sampler s;
    if (n_prompt < 1) return err_set(err, ST_EINVAL, "empty prompt");
    /* reuse the KV cache for the prefix shared with what slot 0 already holds (chat turns) */
    while (common < r->n_cached && common < n_prompt - 1 && r->cached[common] == prompt[common]) common++;
    if ((rc = sampler_init(&s, &o->sp, c->vocab_size, err)) < 0) return rc;
    sampler_add_prompt(&s, prompt, n_prompt);
    int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n_prompt + o->max_tokens + 1));
    float *work = malloc(sizeof(float) * (size_t)c->vocab_size);
    int32_t *tids = malloc(sizeof(int32_t) * (size_t)(o->top_logprobs + 1));
    float *tlp = malloc(sizeof(float) * (size_t)(o->top_logprobs + 1));
    json_t *ids_j = json_array(), *tlp_j = json_array();
    struct detok_stream ds;
    size_t text_cap = 4096, text_len = 0;
    char *text = malloc(text_cap);
    if (!seq || !work || !tids || !tlp || !text) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto done;
    }
    text[0] = 0;
    if (r->tok) detok_stream_init(&ds, r->tok, true);
    memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
    int n = n_prompt;
    if ((rc = feed(r, seq, common, n, err)) < 0) goto done;
    for (long step = 0; step < o->max_tokens; step++) {
        if (o->top_logprobs > 0) {
            int k = sample_top_logprobs(r->logits, c->vocab_size, (int)o->top_logprobs, tids, tlp);
            json_t *row = json_array();
            for (int i = 0; i < k; i++) {
                json_t *e = json_object();
                json_object_set_new(e, "id", json_integer(tids[i]));
                json_object_set_new(e, "logprob", json_real(tlp[i]));
                json_array_append_new(row, e);
            }
            json_array_append_new(tlp_j, row);
        }
        memcpy(work, r->logits, sizeof(float) * (size_t)c->vocab_size);
        int32_t id = sampler_sample(&s, work);
        sampler_accept(&s, id);
        bool stop = is_eos(c, id) && !o->ignore_eos;
        if (!stop) {
            json_array_append_new(ids_j, json_integer(id));
            seq[n++] = id;
        } else {
            json_array_append_new(ids_j, json_integer(id)); /* the EOS itself is reported, like the goldens */
        }
        if (r->tok && !stop) {
            char piece[1024];
            int w = detok_stream_push(&ds, id, piece, sizeof(piece));
            if (w > 0) {
                if (!out_json) {
                    fwrite(piece, 1, (size_t)w, stdout);
                    fflush(stdout);
                }
                if (text_len + (size_t)w + 1 > text_cap) {
                    text_cap = (text_len + (size_t)w + 1) * 2;
                    char *t2 = realloc(text, text_cap);
                    if (!t2) {
                        rc = err_set(err, ST_ENOMEM, "out of memory");
                        goto done;
                    }
                    text = t2;
                }
                memcpy(text + text_len, piece, (size_t)w);
                text_len += (size_t)w;
                text[text_len] = 0;
            }
        }
        if (stop || step + 1 == o->max_tokens) break;
        if (n >= engine_opts(r->engine)->n_ctx) {
            LOGW("run", "context of %d tokens is full; stopping", engine_opts(r->engine)->n_ctx);
            break;
        }
        if ((rc = feed(r, seq, n - 1, n, err)) < 0) goto done;
    }
    if ((rc = remember(r, seq, n)) < 0) {
        err_set(err, rc, "out of memory");
        goto done;
    }
    if (out_json) {
        json_t *pj = json_array();
        for (int i = 0; i < n_prompt; i++) json_array_append_new(pj, json_integer(prompt[i]));
        json_object_set_new(out_json, "prompt_ids", pj);
        json_object_set(out_json, "ids", ids_j);
        if (o->top_logprobs > 0) json_object_set(out_json, "top_logprobs", tlp_j);
        /* the text only for text prompts: --prompt-ids output stays exactly prompt_ids, ids, top_logprobs */
        if (r->tok && !o->prompt_ids) json_object_set_new(out_json, "text", json_stringn(text, text_len));
    }
    if (out_text) {
        *out_text = text;
        text = NULL;
    }
    rc = ST_OK;
done:
    sampler_free(&s);
    free(seq);
    free(work);
    free(tids);
    free(tlp);
    free(text);
    json_decref(ids_j);
    json_decref(tlp_j);
    return rc;
}

static int chat_loop(struct runner *r, const struct run_opts *o, char *err)
{
    if (!r->tmpl) return err_set(err, ST_EINVAL, "--chat: the model has no chat_template in tokenizer_config.json");
    json_t *messages = json_array();
    if (o->system) {
        json_t *m = json_object();
        json_object_set_new(m, "role", json_string("system"));
        json_object_set_new(m, "content", json_string(o->system));
        json_array_append_new(messages, m);
    }
    char line[8192];
    int rc = ST_OK;
    fprintf(stderr, "chat with %s (Ctrl-D to quit)\n", r->model.dir[0] ? r->model.dir : "generated weights");
    for (;;) {
        fprintf(stderr, "> ");
        if (!fgets(line, sizeof(line), stdin)) break;
        size_t len = strlen(line);
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        if (!len) continue;
        json_t *m = json_object();
        json_object_set_new(m, "role", json_string("user"));
        json_object_set_new(m, "content", json_string(line));
        json_array_append_new(messages, m);
        char *prompt = NULL, *reply = NULL;
        size_t plen;
        int32_t *ids = NULL;
        int n_ids;
        if ((rc = chat_template_apply(r->tmpl, messages, NULL, true, o->no_think ? 0 : -1, tokenizer_bos_token(r->tok),
                                      tokenizer_eos_token(r->tok), NULL, &prompt, &plen, err)) < 0)
            break;
        rc = tokenizer_encode(r->tok, prompt, plen, false, &ids, &n_ids, err);
        free(prompt);
        if (rc < 0) break;
        rc = generate(r, o, ids, n_ids, NULL, &reply, err);
        free(ids);
        if (rc < 0) break;
        printf("\n");
        fflush(stdout);
        json_t *a = json_object();
        json_object_set_new(a, "role", json_string("assistant"));
        json_object_set_new(a, "content", json_string(reply ? reply : ""));
        json_array_append_new(messages, a);
        free(reply);
    }
    json_decref(messages);
    return rc;
}

static char *read_stdin_all(void)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    if (!buf) return NULL;
    size_t got;
    while ((got = fread(buf + len, 1, cap - len - 1, stdin)) > 0) {
        len += got;
        if (cap - len < 2) {
            cap *= 2;
            char *b2 = realloc(buf, cap);
            if (!b2) {
                free(buf);
                return NULL;
            }
            buf = b2;
        }
    }
    buf[len] = 0;
    return buf;
}

int cmd_run(int argc, char **argv)
{
    struct run_opts o = {.max_tokens = 128, .threads = 0, .ctx = 0, .batch = 256, .bits = 8, .device = "cpu"};
    sample_params_default(&o.sp);
    o.sp.temperature = 0.8f;
    o.sp.seed = (uint64_t)time_ns();
    const char *cmd = "run";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long l;
        double d;
#define VAL() do { if (!(v = cli_value(cmd, argc, argv, &i))) return 2; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { VAL(); o.model_dir = v; }
        else if (!strcmp(a, "--prompt-ids")) { VAL(); o.prompt_ids = v; }
        else if (!strcmp(a, "-p") || !strcmp(a, "--prompt")) { VAL(); o.prompt = v; }
        else if (!strcmp(a, "--chat")) o.chat = true;
        else if (!strcmp(a, "--system")) { VAL(); o.system = v; }
        else if (!strcmp(a, "--no-think")) o.no_think = true;
        else if (!strcmp(a, "--add-special")) o.add_special = true;
        else if (!strcmp(a, "--json")) o.json = true;
        else if (!strcmp(a, "--ignore-eos")) o.ignore_eos = true;
        else if (!strcmp(a, "--reference")) o.reference = true;
        else if (!strcmp(a, "--random-weights")) o.random_weights = true;
        else if (!strcmp(a, "--config")) { VAL(); o.config = v; }
        else if (!strcmp(a, "--device")) { VAL(); o.device = v; }
        else if (!strcmp(a, "-n") || !strcmp(a, "--max-tokens")) { VAL(); if (cli_int(cmd, a, v, 1, 1 << 20, &o.max_tokens)) return 2; }
        else if (!strcmp(a, "--top-logprobs")) { VAL(); if (cli_int(cmd, a, v, 0, 1000, &o.top_logprobs)) return 2; }
        else if (!strcmp(a, "--threads")) { VAL(); if (cli_int(cmd, a, v, 0, 1024, &o.threads)) return 2; }
        else if (!strcmp(a, "--ctx")) { VAL(); if (cli_int(cmd, a, v, 1, 1 << 22, &o.ctx)) return 2; }
        else if (!strcmp(a, "--batch")) { VAL(); if (cli_int(cmd, a, v, 1, 65536, &o.batch)) return 2; }
        else if (!strcmp(a, "--bits")) { VAL(); if (cli_int(cmd, a, v, 0, 8, &o.bits)) return 2; }
        else if (!strcmp(a, "--temp") || !strcmp(a, "--temperature")) { VAL(); if (cli_float(cmd, a, v, 0, 100, &d)) return 2; o.sp.temperature = (float)d; }
        else if (!strcmp(a, "--top-k")) { VAL(); if (cli_int(cmd, a, v, 0, 1 << 30, &l)) return 2; o.sp.top_k = (int)l; }
        else if (!strcmp(a, "--top-p")) { VAL(); if (cli_float(cmd, a, v, 1e-9, 1, &d)) return 2; o.sp.top_p = (float)d; }
        else if (!strcmp(a, "--min-p")) { VAL(); if (cli_float(cmd, a, v, 0, 1, &d)) return 2; o.sp.min_p = (float)d; }
        else if (!strcmp(a, "--seed")) { VAL(); if (cli_int(cmd, a, v, 0, __LONG_MAX__, &l)) return 2; o.sp.seed = (uint64_t)l; }
        else if (!strcmp(a, "--repeat-penalty")) { VAL(); if (cli_float(cmd, a, v, 1e-6, 100, &d)) return 2; o.sp.repetition_penalty = (float)d; }
        else if (!strcmp(a, "--presence-penalty")) { VAL(); if (cli_float(cmd, a, v, -2, 2, &d)) return 2; o.sp.presence_penalty = (float)d; }
        else if (!strcmp(a, "--frequency-penalty")) { VAL(); if (cli_float(cmd, a, v, -2, 2, &d)) return 2; o.sp.frequency_penalty = (float)d; }
        else { fprintf(stderr, "strata run: unknown option \"%s\" (see --help)\n", a); return 2; }
#undef VAL
    }
    int n_inputs = (o.prompt_ids != NULL) + (o.prompt != NULL) + o.chat;
    if (n_inputs != 1) {
        fprintf(stderr, "strata run: give exactly one of --prompt-ids, -p or --chat (see --help)\n");
        return 2;
    }
    if (o.random_weights && !o.config) {
        fprintf(stderr, "strata run: --random-weights needs --config FILE\n");
        return 2;
    }
    if (!o.model_dir) o.model_dir = cli_default_model();

    char err[ST_ERR_LEN] = "";
    int rc, status = 1;
    struct runner r;
    memset(&r, 0, sizeof(r));
    int32_t *ids = NULL;
    int n_ids = 0;
    json_t *out = NULL;
    if (o.random_weights) {
        struct model_config cfg;
        char *text = NULL;
        size_t len;
        if ((rc = file_read_all(o.config, &text, &len, 1 << 20, err)) < 0) goto fail;
        rc = model_config_parse(&cfg, text, len, err);
        free(text);
        if (rc < 0) goto fail;
        if ((rc = model_init_random(&r.model, &cfg, (int)o.bits, 1234, 0, -1, true, true, err)) < 0) goto fail;
    } else if ((rc = model_load(&r.model, o.model_dir, 0, -1, true, true, err)) < 0) {
        goto fail;
    }
    char tdir[1200];
    snprintf(tdir, sizeof(tdir), "%s/tokenizer.json", o.model_dir);
    if (!o.random_weights || file_exists(tdir)) {
        if (file_exists(tdir)) {
            if ((rc = tokenizer_load(&r.tok, o.model_dir, err)) < 0) goto fail;
            const char *src = tokenizer_chat_template(r.tok);
            if (src && (rc = chat_template_compile(&r.tmpl, src, err)) < 0) goto fail;
        }
    }
    struct engine_opts eo = {.n_slots = 1, .n_ctx = (int)o.ctx, .max_batch = (int)o.batch, .max_logits = 1};
    if ((rc = backend_parse_device(o.device, &eo.backend.kind, &eo.backend.device, err)) < 0) goto fail;
    eo.backend.n_threads = (int)o.threads;
    eo.backend.reference = o.reference;
    if (eo.n_ctx == 0) eo.n_ctx = ST_MIN(r.model.cfg.max_seq_len, 4096);
    if ((rc = engine_init(&r.engine, &r.model, &eo, err)) < 0) goto fail;
    r.vocab = r.model.cfg.vocab_size;
    r.logits = malloc(sizeof(float) * (size_t)r.vocab);
    if (!r.logits) {
        err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    if (o.chat) {
        if (!r.tok) {
            err_set(err, ST_EINVAL, "--chat needs tokenizer files in %s", o.model_dir);
            goto fail;
        }
        if ((rc = chat_loop(&r, &o, err)) < 0) goto fail;
        status = 0;
        goto fail;
    }
    if (o.prompt_ids) {
        if (cli_ids(cmd, "--prompt-ids", o.prompt_ids, &ids, &n_ids) < 0) goto fail_quiet;
    } else {
        if (!r.tok) {
            err_set(err, ST_EINVAL, "-p needs tokenizer files in %s (or use --prompt-ids)", o.model_dir);
            goto fail;
        }
        char *stdin_text = NULL;
        const char *text = o.prompt;
        if (!strcmp(text, "-")) {
            stdin_text = read_stdin_all();
            if (!stdin_text) {
                err_set(err, ST_ENOMEM, "cannot read stdin");
                goto fail;
            }
            text = stdin_text;
        }
        rc = tokenizer_encode(r.tok, text, strlen(text), o.add_special, &ids, &n_ids, err);
        free(stdin_text);
        if (rc < 0) goto fail;
    }
    if (o.json) out = json_object();
    if ((rc = generate(&r, &o, ids, n_ids, out, NULL, err)) < 0) goto fail;
    if (out) {
        char *s = json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(9));
        if (s) printf("%s\n", s);
        free(s);
    } else {
        printf("\n");
    }
    status = 0;
fail:
    if (status != 0 && err[0]) fprintf(stderr, "strata run: %s\n", err);
fail_quiet:
    json_decref(out);
    free(ids);
    free(r.logits);
    free(r.cached);
    engine_free(r.engine);
    chat_template_free(r.tmpl);
    tokenizer_free(r.tok);
    model_free(&r.model);
    return status;
}
