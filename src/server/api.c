/* api: OpenAI-compatible request parsing/validation and response building (no network here).
 *
 * Field semantics follow OpenAI's API, with vLLM's extensions where OpenAI has none (top_k, min_p,
 * repetition_penalty, ignore_eos, skip_special_tokens, stop_token_ids, return_tokens_as_token_ids,
 * chat_template_kwargs, add_special_tokens). A JSON null counts as absent. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "server/server.h"

/* ---- errors ---- */

static const char *error_type(int status)
{
    switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

int api_error_set(struct api_error *e, int status, const char *param, const char *fmt, ...)
{
    if (!e) return ST_EINVAL;
    e->status = status;
    e->type = error_type(status);
    e->code = NULL;
    snprintf(e->param, sizeof(e->param), "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
    va_end(ap);
    return ST_EINVAL;
}

json_t *api_error_json(const struct api_error *e)
{
    json_t *o = json_object();
    json_object_set_new(o, "message", json_string(e->message));
    json_object_set_new(o, "type", json_string(e->type ? e->type : error_type(e->status)));
    json_object_set_new(o, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(o, "code", e->code ? json_string(e->code) : json_integer(e->status));
    json_t *root = json_object();
    json_object_set_new(root, "error", o);
    return root;
}

/* ---- typed field access ---- */

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* The field, or NULL when absent or null. */
static json_t *field(const json_t *o, const char *key)
{
    json_t *v = json_object_get(o, key);
    return json_is_null(v) ? NULL : v;
}

static int get_bool(const json_t *o, const char *key, bool *out, struct api_error *e)
{
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_boolean(v)) return api_error_set(e, 400, key, "'%s' must be a boolean, got %s", key, json_kind(v));
    *out = json_is_true(v);
    return 1;
}

static int get_number(const json_t *o, const char *key, double lo, double hi, double *out, struct api_error *e)
{
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_number(v)) return api_error_set(e, 400, key, "'%s' must be a number, got %s", key, json_kind(v));
    double d = json_number_value(v);
    if (!(d >= lo && d <= hi)) return api_error_set(e, 400, key, "'%s' must be between %g and %g, got %g", key, lo, hi, d);
    *out = d;
    return 1;
}

static int get_int(const json_t *o, const char *key, long long lo, long long hi, long long *out, struct api_error *e)
{
    json_t *v = field(o, key);
    if (!v) return 0;
    long long x = 0;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == (double)(long long)json_real_value(v) &&
               json_real_value(v) > -9.2e18 && json_real_value(v) < 9.2e18) {
        x = (long long)json_real_value(v); /* 5.0 is an integer */
    } else {
        return api_error_set(e, 400, key, "'%s' must be an integer, got %s", key, json_kind(v));
    }
    if (x < lo || x > hi) return api_error_set(e, 400, key, "'%s' must be between %lld and %lld, got %lld", key, lo, hi, x);
    *out = x;
    return 1;
}

static int get_string(const json_t *o, const char *key, const char **out, struct api_error *e)
{
    json_t *v = field(o, key);
    if (!v) return 0;
    if (!json_is_string(v)) return api_error_set(e, 400, key, "'%s' must be a string, got %s", key, json_kind(v));
    *out = json_string_value(v);
    return 1;
}

/* A token id array element. */
static int get_id(const json_t *v, const char *param, int idx, int vocab, int32_t *out, struct api_error *e)
{
    if (!json_is_integer(v))
        return api_error_set(e, 400, param, "'%s'[%d] must be an integer token id, got %s", param, idx, json_kind(v));
    json_int_t x = json_integer_value(v);
    if (x < 0 || x >= vocab)
        return api_error_set(e, 400, param, "'%s'[%d]: token id %lld is outside the vocabulary [0, %d)", param, idx,
                             (long long)x, vocab);
    *out = (int32_t)x;
    return 0;
}

static int get_ids(const json_t *a, const char *param, int vocab, int32_t **out, int *n, struct api_error *e)
{
    size_t m = json_array_size(a);
    if (m > (size_t)1 << 24) return api_error_set(e, 400, param, "'%s' has too many tokens", param);
    int32_t *ids = malloc(sizeof(int32_t) * (m ? m : 1));
    if (!ids) return api_error_set(e, 500, NULL, "out of memory");
    for (size_t i = 0; i < m; i++) {
        if (get_id(json_array_get(a, i), param, (int)i, vocab, &ids[i], e) < 0) {
            free(ids);
            return ST_EINVAL;
        }
    }
    *out = ids;
    *n = (int)m;
    return 0;
}

/* ---- request parsing ---- */

static const char *kind_name(enum api_kind k)
{
    static const char *names[API_KIND_COUNT] = {"chat completion", "completion", "tokenize", "detokenize"};
    return (k >= 0 && k < API_KIND_COUNT) ? names[k] : "?";
}

/* content: a string, null (assistant/tool), or a list of {"type": "text", "text": ...} parts (joined by "\n",
 * as vLLM does). Returns the normalized content (new reference). */
static json_t *normalize_content(const json_t *c, const char *role, int idx, struct api_error *e)
{
    char param[64];
    snprintf(param, sizeof(param), "messages[%d].content", idx);
    if (!c || json_is_null(c)) {
        if (!strcmp(role, "assistant") || !strcmp(role, "tool")) return json_null();
        api_error_set(e, 400, param, "'%s' is missing (a %s message needs content)", param, role);
        return NULL;
    }
    if (json_is_string(c)) return json_incref((json_t *)c);
    if (!json_is_array(c)) {
        api_error_set(e, 400, param, "'%s' must be a string or an array of content parts, got %s", param, json_kind(c));
        return NULL;
    }
    struct text_buf b = {0};
    size_t i;
    json_t *part;
    if (text_buf_append(&b, "", 0) < 0) goto oom;
    json_array_foreach(c, i, part) {
        const char *type = json_string_value(json_object_get(part, "type"));
        if (!json_is_object(part) || !type) {
            api_error_set(e, 400, param, "'%s'[%zu] must be an object with a \"type\"", param, i);
            goto fail;
        }
        if (strcmp(type, "text") != 0) {
            api_error_set(e, 400, param, "'%s'[%zu]: content part type \"%s\" is not supported (text only)", param, i,
                          type);
            goto fail;
        }
        const json_t *t = json_object_get(part, "text");
        if (!json_is_string(t)) {
            api_error_set(e, 400, param, "'%s'[%zu].text must be a string", param, i);
            goto fail;
        }
        if ((i > 0 && text_buf_append(&b, "\n", 1) < 0) ||
            text_buf_append(&b, json_string_value(t), json_string_length(t)) < 0)
            goto oom;
    }
    json_t *out = json_stringn(b.s, b.len);
    text_buf_free(&b);
    if (!out) api_error_set(e, 500, NULL, "out of memory");
    return out;
oom:
    api_error_set(e, 500, NULL, "out of memory");
fail:
    text_buf_free(&b);
    return NULL;
}

static int parse_messages(struct api_request *r, const json_t *root, struct api_error *e)
{
    const json_t *msgs = json_object_get(root, "messages");
    if (!msgs || json_is_null(msgs)) return api_error_set(e, 400, "messages", "'messages' is required");
    if (!json_is_array(msgs)) return api_error_set(e, 400, "messages", "'messages' must be an array, got %s", json_kind(msgs));
    if (json_array_size(msgs) == 0) return api_error_set(e, 400, "messages", "'messages' must not be empty");
    static const char *roles[] = {"system", "developer", "user", "assistant", "tool", "function"};
    r->messages = json_array();
    if (!r->messages) return api_error_set(e, 500, NULL, "out of memory");
    size_t i;
    const json_t *m;
    json_array_foreach(msgs, i, m) {
        char param[64];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!json_is_object(m)) return api_error_set(e, 400, param, "'%s' must be an object, got %s", param, json_kind(m));
        const json_t *rv = json_object_get(m, "role");
        snprintf(param, sizeof(param), "messages[%zu].role", i);
        if (!rv) return api_error_set(e, 400, param, "'%s' is required", param);
        if (!json_is_string(rv)) return api_error_set(e, 400, param, "'%s' must be a string, got %s", param, json_kind(rv));
        const char *role = json_string_value(rv);
        bool known = false;
        for (size_t k = 0; k < ST_ARRAY_LEN(roles); k++) known |= !strcmp(role, roles[k]);
        if (!known)
            return api_error_set(e, 400, param,
                                 "'%s': unknown role \"%.40s\" (expected system, developer, user, assistant or tool)",
                                 param, role);
        json_t *copy = json_copy((json_t *)m);
        if (!copy) return api_error_set(e, 500, NULL, "out of memory");
        json_array_append_new(r->messages, copy);
        if (!strcmp(role, "developer")) json_object_set_new(copy, "role", json_string("system"));
        json_t *content = normalize_content(json_object_get(m, "content"), role, (int)i, e);
        if (!content) return ST_EINVAL;
        json_object_set_new(copy, "content", content);
    }
    return 0;
}

static int parse_chat_template_args(struct api_request *r, const json_t *root, struct api_error *e)
{
    int rc;
    const json_t *kw = field(root, "chat_template_kwargs");
    if (kw) {
        if (!json_is_object(kw))
            return api_error_set(e, 400, "chat_template_kwargs", "'chat_template_kwargs' must be an object, got %s",
                                 json_kind(kw));
        r->template_kwargs = kw;
        bool think = false;
        if ((rc = get_bool(kw, "enable_thinking", &think, e)) < 0) {
            if (e) snprintf(e->param, sizeof(e->param), "chat_template_kwargs.enable_thinking");
            return rc;
        }
        if (rc) r->enable_thinking = think;
    }
    if ((rc = get_bool(root, "add_generation_prompt", &r->add_generation_prompt, e)) < 0) return rc;
    const json_t *tools = field(root, "tools");
    if (tools && !json_is_array(tools))
        return api_error_set(e, 400, "tools", "'tools' must be an array, got %s", json_kind(tools));
    r->tools = tools && json_array_size(tools) ? tools : NULL;
    const json_t *tc = field(root, "tool_choice");
    if (tc) {
        const char *s = json_string_value(tc);
        if (!s || (strcmp(s, "auto") != 0 && strcmp(s, "none") != 0))
            return api_error_set(e, 400, "tool_choice",
                                 "'tool_choice' must be \"auto\" or \"none\" (forced tool calls are not supported)");
        if (!strcmp(s, "none")) r->tools = NULL;
    }
    return 0;
}

/* prompt: "text", ["text"], [ids...] or [[ids...]] */
static int parse_prompt(struct api_request *r, const json_t *root, int vocab, struct api_error *e)
{
    const json_t *p = field(root, "prompt");
    if (!p) return api_error_set(e, 400, "prompt", "'prompt' is required");
    if (json_is_array(p) && json_array_size(p) == 1 &&
        (json_is_string(json_array_get(p, 0)) || json_is_array(json_array_get(p, 0))))
        p = json_array_get(p, 0);
    if (json_is_string(p)) {
        r->prompt = json_string_value(p);
        r->prompt_len = json_string_length(p);
        if (r->prompt_len == 0) return api_error_set(e, 400, "prompt", "'prompt' must not be empty");
        return 0;
    }
    if (!json_is_array(p)) return api_error_set(e, 400, "prompt", "'prompt' must be a string or an array of token ids, got %s", json_kind(p));
    if (json_array_size(p) == 0) return api_error_set(e, 400, "prompt", "'prompt' must not be empty");
    const json_t *first = json_array_get(p, 0);
    if (json_is_string(first) || json_is_array(first))
        return api_error_set(e, 400, "prompt", "batched prompts are not supported: send one prompt per request");
    return get_ids(p, "prompt", vocab, &r->prompt_ids, &r->n_prompt_ids, e);
}

static int parse_stop(struct api_request *r, const json_t *root, int vocab, struct api_error *e)
{
    const json_t *s = field(root, "stop");
    if (s) {
        if (json_is_string(s)) {
            r->stop[r->n_stop++] = json_string_value(s);
        } else if (json_is_array(s)) {
            if (json_array_size(s) > API_MAX_STOP)
                return api_error_set(e, 400, "stop", "'stop' has %zu strings (at most %d)", json_array_size(s), API_MAX_STOP);
            size_t i;
            const json_t *v;
            json_array_foreach(s, i, v) {
                if (!json_is_string(v)) return api_error_set(e, 400, "stop", "'stop'[%zu] must be a string, got %s", i, json_kind(v));
                r->stop[r->n_stop++] = json_string_value(v);
            }
        } else {
            return api_error_set(e, 400, "stop", "'stop' must be a string or an array of strings, got %s", json_kind(s));
        }
        for (int i = 0; i < r->n_stop; i++) {
            size_t n = strlen(r->stop[i]);
            if (n == 0) return api_error_set(e, 400, "stop", "stop strings must not be empty");
            if (n > API_MAX_STOP_BYTES)
                return api_error_set(e, 400, "stop", "a stop string is %zu bytes long (at most %d)", n, API_MAX_STOP_BYTES);
        }
    }
    const json_t *ids = field(root, "stop_token_ids");
    if (ids) {
        if (!json_is_array(ids)) return api_error_set(e, 400, "stop_token_ids", "'stop_token_ids' must be an array of token ids");
        if (json_array_size(ids) > API_MAX_STOP_IDS)
            return api_error_set(e, 400, "stop_token_ids", "'stop_token_ids' has too many ids (at most %d)", API_MAX_STOP_IDS);
        size_t i;
        const json_t *v;
        json_array_foreach(ids, i, v) {
            if (get_id(v, "stop_token_ids", (int)i, vocab, &r->stop_ids[r->n_stop_ids], e) < 0) return ST_EINVAL;
            r->n_stop_ids++;
        }
    }
    return 0;
}

static int parse_logit_bias(struct api_request *r, const json_t *root, int vocab, struct api_error *e)
{
    const json_t *lb = field(root, "logit_bias");
    if (!lb) return 0;
    if (!json_is_object(lb)) return api_error_set(e, 400, "logit_bias", "'logit_bias' must be an object mapping token ids to numbers");
    if (json_object_size(lb) > SAMPLE_MAX_BIAS)
        return api_error_set(e, 400, "logit_bias", "'logit_bias' has %zu entries (at most %d)", json_object_size(lb), SAMPLE_MAX_BIAS);
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)lb, key, v) {
        char *end;
        errno = 0;
        long id = strtol(key, &end, 10);
        if (!key[0] || *end || errno || key[0] == ' ' || key[0] == '+')
            return api_error_set(e, 400, "logit_bias", "'logit_bias' key \"%.40s\" is not a token id", key);
        if (id < 0 || id >= vocab)
            return api_error_set(e, 400, "logit_bias", "'logit_bias': token id %ld is outside the vocabulary [0, %d)", id, vocab);
        if (!json_is_number(v)) return api_error_set(e, 400, "logit_bias", "'logit_bias'[\"%s\"] must be a number", key);
        double b = json_number_value(v);
        if (!(b >= -100.0 && b <= 100.0))
            return api_error_set(e, 400, "logit_bias", "'logit_bias'[\"%s\"] must be between -100 and 100, got %g", key, b);
        r->sp.bias[r->sp.n_bias++] = (struct logit_bias){(int32_t)id, (float)b};
    }
    return 0;
}

static int parse_sampling(struct api_request *r, const json_t *root, const struct api_limits *lim, struct api_error *e)
{
    int rc;
    double d = 0;
    long long x = 0;
    if ((rc = get_number(root, "temperature", 0, 100, &d, e)) < 0) return rc;
    if (rc) r->sp.temperature = (float)d;
    if ((rc = get_number(root, "top_p", 0, 1, &d, e)) < 0) return rc;
    if (rc) {
        if (d <= 0) return api_error_set(e, 400, "top_p", "'top_p' must be in (0, 1], got %g", d);
        r->sp.top_p = (float)d;
    }
    if ((rc = get_int(root, "top_k", -1, 1 << 30, &x, e)) < 0) return rc;
    if (rc) r->sp.top_k = x < 0 ? 0 : (int)x; /* -1 (vLLM) and 0: off */
    if ((rc = get_number(root, "min_p", 0, 1, &d, e)) < 0) return rc;
    if (rc) r->sp.min_p = (float)d;
    if ((rc = get_number(root, "repetition_penalty", 0, 100, &d, e)) < 0) return rc;
    if (rc) {
        if (d <= 0) return api_error_set(e, 400, "repetition_penalty", "'repetition_penalty' must be in (0, 100], got %g", d);
        r->sp.repetition_penalty = (float)d;
    }
    if ((rc = get_number(root, "presence_penalty", -2, 2, &d, e)) < 0) return rc;
    if (rc) r->sp.presence_penalty = (float)d;
    if ((rc = get_number(root, "frequency_penalty", -2, 2, &d, e)) < 0) return rc;
    if (rc) r->sp.frequency_penalty = (float)d;
    if ((rc = get_int(root, "seed", INT64_MIN, INT64_MAX, &x, e)) < 0) return rc;
    if (rc) {
        r->sp.seed = (uint64_t)x;
    } else {
        uint64_t seed = 0;
        if (getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) seed = time_ns();
        r->sp.seed = seed;
    }
    if ((rc = parse_logit_bias(r, root, lim->vocab, e)) < 0) return rc;
    /* the sampler's own check is the last word on ranges */
    char err[ST_ERR_LEN];
    if (sample_params_check(&r->sp, lim->vocab, err) < 0) {
        char param[64];
        size_t n = ST_MIN(strcspn(err, " :"), sizeof(param) - 1);
        memcpy(param, err, n);
        param[n] = 0;
        return api_error_set(e, 400, param, "%s", err);
    }
    return 0;
}

static int parse_generation(struct api_request *r, const json_t *root, const struct api_limits *lim, struct api_error *e)
{
    int rc;
    long long x = 0;
    bool b = false;
    if ((rc = get_int(root, "n", 1, 1 << 20, &x, e)) < 0) return rc;
    if (rc && x != 1) return api_error_set(e, 400, "n", "'n' must be 1 (one choice per request), got %lld", x);
    if ((rc = get_int(root, "best_of", 1, 1 << 20, &x, e)) < 0) return rc;
    if (rc && x != 1) return api_error_set(e, 400, "best_of", "'best_of' must be 1, got %lld", x);
    const char *mt_key = "max_tokens";
    if ((rc = get_int(root, mt_key, 1, INT32_MAX, &x, e)) < 0) return rc;
    if (!rc) {
        mt_key = "max_completion_tokens";
        if ((rc = get_int(root, mt_key, 1, INT32_MAX, &x, e)) < 0) return rc;
    }
    if (rc) r->max_tokens = (int)x;
    else if (r->kind == API_COMPLETION) r->max_tokens = 16; /* OpenAI's legacy default */
    if ((rc = get_bool(root, "stream", &r->stream, e)) < 0) return rc;
    const json_t *so = field(root, "stream_options");
    if (so) {
        if (!r->stream)
            return api_error_set(e, 400, "stream_options", "'stream_options' is only allowed when 'stream' is true");
        if (!json_is_object(so)) return api_error_set(e, 400, "stream_options", "'stream_options' must be an object, got %s", json_kind(so));
        if ((rc = get_bool(so, "include_usage", &r->include_usage, e)) < 0) {
            if (e) snprintf(e->param, sizeof(e->param), "stream_options.include_usage");
            return rc;
        }
    }
    if (r->kind == API_CHAT) {
        if ((rc = get_bool(root, "logprobs", &r->logprobs, e)) < 0) return rc;
        if ((rc = get_int(root, "top_logprobs", 0, lim->max_top, &x, e)) < 0) return rc;
        if (rc) {
            if (!r->logprobs && x > 0)
                return api_error_set(e, 400, "top_logprobs", "'top_logprobs' needs 'logprobs' set to true");
            r->top_logprobs = (int)x;
        }
    } else {
        const json_t *lp = field(root, "logprobs");
        if (lp && json_is_boolean(lp))
            return api_error_set(e, 400, "logprobs", "'logprobs' must be an integer (top alternatives per token) for completions");
        if ((rc = get_int(root, "logprobs", 0, lim->max_top, &x, e)) < 0) return rc;
        if (rc) {
            r->logprobs = true;
            r->top_logprobs = (int)x;
        }
        if ((rc = get_bool(root, "echo", &b, e)) < 0) return rc;
        if (rc && b) return api_error_set(e, 400, "echo", "'echo' is not supported");
        const char *suffix = NULL;
        if ((rc = get_string(root, "suffix", &suffix, e)) < 0) return rc;
        if (suffix && suffix[0]) return api_error_set(e, 400, "suffix", "'suffix' is not supported");
    }
    if ((rc = get_bool(root, "return_tokens_as_token_ids", &r->tokens_as_ids, e)) < 0) return rc;
    if ((rc = get_bool(root, "ignore_eos", &r->ignore_eos, e)) < 0) return rc;
    if ((rc = get_bool(root, "skip_special_tokens", &r->skip_special, e)) < 0) return rc;
    const json_t *rf = field(root, "response_format");
    if (rf) {
        const char *t = json_string_value(json_object_get(rf, "type"));
        if (!json_is_object(rf) || !t)
            return api_error_set(e, 400, "response_format", "'response_format' must be an object with a \"type\"");
        if (strcmp(t, "text") != 0)
            return api_error_set(e, 400, "response_format", "'response_format' type \"%.40s\" is not supported (only \"text\")", t);
    }
    const char *user;
    if ((rc = get_string(root, "user", &user, e)) < 0) return rc;
    if ((rc = parse_stop(r, root, lim->vocab, e)) < 0) return rc;
    return parse_sampling(r, root, lim, e);
}

int api_request_parse(struct api_request *r, enum api_kind kind, const char *body, size_t len,
                      const struct api_limits *lim, struct api_error *e)
{
    memset(r, 0, sizeof(*r));
    if (e) memset(e, 0, sizeof(*e));
    r->kind = kind;
    r->enable_thinking = -1;
    r->add_generation_prompt = true;
    r->skip_special = true;
    r->add_special = kind != API_CHAT;
    sample_params_default(&r->sp);
    if (kind < 0 || kind >= API_KIND_COUNT) return api_error_set(e, 500, NULL, "unknown request kind");
    json_error_t je;
    if (len == 0) return api_error_set(e, 400, NULL, "the request body is empty (expected a JSON object)");
    r->root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!r->root) {
        api_error_set(e, 400, NULL, "invalid JSON in the request body: %s (line %d, column %d)", je.text, je.line, je.column);
        goto fail;
    }
    if (!json_is_object(r->root)) {
        api_error_set(e, 400, NULL, "the request body must be a JSON object, got %s", json_kind(r->root));
        goto fail;
    }
    const json_t *root = r->root;
    if (get_string(root, "model", &r->model, e) < 0) goto fail;
    if (r->model && lim->model_name && strcmp(r->model, lim->model_name) != 0) {
        api_error_set(e, 404, "model", "The model `%.200s` does not exist.", r->model);
        if (e) e->code = "model_not_found";
        goto fail;
    }
    switch (kind) {
    case API_CHAT:
        if (parse_messages(r, root, e) < 0 || parse_chat_template_args(r, root, e) < 0) goto fail;
        if (parse_generation(r, root, lim, e) < 0) goto fail;
        break;
    case API_COMPLETION:
        if (parse_prompt(r, root, lim->vocab, e) < 0) goto fail;
        if (get_bool(root, "add_special_tokens", &r->add_special, e) < 0) goto fail;
        if (parse_generation(r, root, lim, e) < 0) goto fail;
        break;
    case API_TOKENIZE:
        if (field(root, "messages")) {
            r->add_special = false;
            if (parse_messages(r, root, e) < 0 || parse_chat_template_args(r, root, e) < 0) goto fail;
        } else if (field(root, "prompt")) {
            if (parse_prompt(r, root, lim->vocab, e) < 0) goto fail;
        } else {
            api_error_set(e, 400, "prompt", "'prompt' (text) or 'messages' is required");
            goto fail;
        }
        if (get_bool(root, "add_special_tokens", &r->add_special, e) < 0) goto fail;
        break;
    case API_DETOKENIZE: {
        const json_t *t = field(root, "tokens");
        if (!t) {
            api_error_set(e, 400, "tokens", "'tokens' is required");
            goto fail;
        }
        if (!json_is_array(t)) {
            api_error_set(e, 400, "tokens", "'tokens' must be an array of token ids, got %s", json_kind(t));
            goto fail;
        }
        if (get_ids(t, "tokens", lim->vocab, &r->prompt_ids, &r->n_prompt_ids, e) < 0) goto fail;
        break;
    }
    default:
        break;
    }
    return ST_OK;
fail:
    if (e && e->status == 0) api_error_set(e, 400, NULL, "invalid %s request", kind_name(kind));
    api_request_free(r);
    return ST_EINVAL;
}

void api_request_free(struct api_request *r)
{
    json_decref(r->messages);
    json_decref(r->root);
    free(r->prompt_ids);
    r->messages = r->root = NULL;
    r->prompt_ids = NULL;
    r->n_prompt_ids = 0;
}

/* ---- prompts ---- */

/* True when the last "<think>" of the prompt is not closed by a "</think>" after it. */
static bool opens_think(const char *s, size_t n)
{
    const char *open = NULL, *p = s;
    while ((p = memmem(p, n - (size_t)(p - s), "<think>", 7)) != NULL) {
        open = p;
        p += 7;
    }
    if (!open) return false;
    return memmem(open, n - (size_t)(open - s), "</think>", 8) == NULL;
}

int api_prompt_build(const struct api_request *r, const struct tokenizer *tok, const struct chat_template *tmpl,
                     struct api_prompt *p, struct api_error *e)
{
    char err[ST_ERR_LEN];
    int rc;
    memset(p, 0, sizeof(*p));
    if (r->messages) {
        if (!tok) return api_error_set(e, 400, "messages", "this server has no tokenizer: send token ids to /v1/completions");
        if (!tmpl)
            return api_error_set(e, 400, "messages", "the model has no chat template: use /v1/completions with a text prompt");
        size_t len;
        rc = chat_template_apply(tmpl, r->messages, r->tools, r->add_generation_prompt, r->enable_thinking,
                                 tokenizer_bos_token(tok), tokenizer_eos_token(tok), r->template_kwargs, &p->text, &len,
                                 err);
        if (rc < 0) {
            p->text = NULL;
            return api_error_set(e, 400, "messages", "the chat template failed on these messages: %s", err);
        }
        if (tokenizer_encode(tok, p->text, len, r->add_special, &p->ids, &p->n_ids, err) < 0) {
            api_prompt_free(p);
            return api_error_set(e, 400, "messages", "cannot tokenize the prompt: %s", err);
        }
        p->think = tokenizer_find(tok, "<think>") >= 0 && tokenizer_find(tok, "</think>") >= 0;
        p->in_reasoning = p->think && opens_think(p->text, len);
    } else if (r->prompt) {
        if (!tok) return api_error_set(e, 400, "prompt", "this server has no tokenizer: send the prompt as token ids");
        if (tokenizer_encode(tok, r->prompt, r->prompt_len, r->add_special, &p->ids, &p->n_ids, err) < 0)
            return api_error_set(e, 400, "prompt", "cannot tokenize the prompt: %s", err);
    } else if (r->prompt_ids) {
        p->ids = malloc(sizeof(int32_t) * (size_t)(r->n_prompt_ids ? r->n_prompt_ids : 1));
        if (!p->ids) return api_error_set(e, 500, NULL, "out of memory");
        memcpy(p->ids, r->prompt_ids, sizeof(int32_t) * (size_t)r->n_prompt_ids);
        p->n_ids = r->n_prompt_ids;
    } else {
        return api_error_set(e, 400, "prompt", "the request has no prompt");
    }
    if (p->n_ids == 0 && r->kind != API_TOKENIZE) {
        api_prompt_free(p);
        return api_error_set(e, 400, r->messages ? "messages" : "prompt", "the prompt is empty after tokenization");
    }
    return ST_OK;
}

void api_prompt_free(struct api_prompt *p)
{
    free(p->ids);
    free(p->text);
    memset(p, 0, sizeof(*p));
}

int api_request_budget(const struct api_request *r, int n_prompt, const struct api_limits *lim, int *max_tokens,
                       struct api_error *e)
{
    const char *what = r->kind == API_CHAT ? "messages" : "prompt";
    if (n_prompt >= lim->n_ctx) {
        api_error_set(e, 400, what,
                      "This model's maximum context length is %d tokens. However, your request has %d input tokens. "
                      "Please reduce the length of the input %s.", lim->n_ctx, n_prompt, what);
        if (e) e->code = "context_length_exceeded";
        return ST_EINVAL;
    }
    if (r->max_tokens > 0 && (int64_t)n_prompt + r->max_tokens > lim->n_ctx) {
        api_error_set(e, 400, "max_tokens",
                      "This model's maximum context length is %d tokens. However, you requested %lld tokens (%d in the "
                      "%s, %d in the completion). Please reduce the length of the %s or completion.", lim->n_ctx,
                      (long long)n_prompt + r->max_tokens, n_prompt, what, r->max_tokens, what);
        if (e) e->code = "context_length_exceeded";
        return ST_EINVAL;
    }
    *max_tokens = r->max_tokens > 0 ? r->max_tokens : lim->n_ctx - n_prompt;
    return ST_OK;
}

/* ---- responses ---- */

void api_make_id(char *out, size_t cap, const char *prefix)
{
    unsigned char rnd[16];
    if (getrandom(rnd, sizeof(rnd), GRND_NONBLOCK) != (ssize_t)sizeof(rnd)) {
        uint64_t a = time_ns(), b = (uint64_t)(uintptr_t)out ^ (a << 17);
        memcpy(rnd, &a, 8);
        memcpy(rnd + 8, &b, 8);
    }
    int n = snprintf(out, cap, "%s", prefix);
    for (size_t i = 0; i < sizeof(rnd) && n >= 0 && (size_t)n + 2 < cap; i++, n += 2)
        snprintf(out + n, cap - (size_t)n, "%02x", rnd[i]);
}

void api_token_str(const struct tokenizer *tok, int32_t id, bool as_ids, char *out, size_t cap)
{
    if (!cap) return;
    out[0] = 0;
    if (as_ids || !tok) {
        snprintf(out, cap, "token_id:%d", id);
        return;
    }
    char *text = NULL;
    size_t len = 0;
    if (tokenizer_decode(tok, &id, 1, false, &text, &len, NULL) < 0) {
        snprintf(out, cap, "token_id:%d", id);
        return;
    }
    if (len >= cap) { /* cut at a character boundary */
        len = cap - 1;
        while (len > 0 && ((unsigned char)text[len] & 0xC0) == 0x80) len--;
    }
    memcpy(out, text, len);
    out[len] = 0;
    free(text);
}

static json_t *bytes_json(const char *s)
{
    json_t *a = json_array();
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) json_array_append_new(a, json_integer(*p));
    return a;
}

static double clamp_lp(float lp) { return lp > API_LOGPROB_FLOOR ? (double)lp : API_LOGPROB_FLOOR; }

static size_t utf8_chars(const char *s)
{
    size_t n = 0;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) n += (*p & 0xC0) != 0x80;
    return n;
}

/* chat: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]} */
static json_t *chat_logprobs_json(const struct api_request *r, const struct api_result *res, const struct tokenizer *tok)
{
    char s[512];
    json_t *content = json_array();
    for (int i = 0; i < res->n_tokens; i++) {
        const struct api_token *t = &res->tokens[i];
        json_t *e = json_object();
        api_token_str(tok, t->id, r->tokens_as_ids, s, sizeof(s));
        json_object_set_new(e, "token", json_string(s));
        json_object_set_new(e, "logprob", json_real(clamp_lp(t->logprob)));
        json_object_set_new(e, "bytes", bytes_json(s));
        json_t *top = json_array();
        for (int k = 0; k < t->n_top && k < r->top_logprobs; k++) {
            json_t *a = json_object();
            api_token_str(tok, t->top_ids[k], r->tokens_as_ids, s, sizeof(s));
            json_object_set_new(a, "token", json_string(s));
            json_object_set_new(a, "logprob", json_real(clamp_lp(t->top_lp[k])));
            json_object_set_new(a, "bytes", bytes_json(s));
            json_array_append_new(top, a);
        }
        json_object_set_new(e, "top_logprobs", top);
        json_array_append_new(content, e);
    }
    json_t *o = json_object();
    json_object_set_new(o, "content", content);
    return o;
}

/* completions (legacy): {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset} */
static json_t *completion_logprobs_json(const struct api_request *r, const struct api_result *res,
                                        const struct tokenizer *tok)
{
    char s[512];
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(), *offs = json_array();
    size_t off = res->text_offset;
    for (int i = 0; i < res->n_tokens; i++) {
        const struct api_token *t = &res->tokens[i];
        api_token_str(tok, t->id, r->tokens_as_ids, s, sizeof(s));
        json_array_append_new(tokens, json_string(s));
        json_array_append_new(lps, json_real(clamp_lp(t->logprob)));
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += utf8_chars(s);
        json_t *d = json_object();
        bool has_sampled = false;
        for (int k = 0; k < t->n_top && k < r->top_logprobs; k++) {
            char ks[512];
            api_token_str(tok, t->top_ids[k], r->tokens_as_ids, ks, sizeof(ks));
            if (!json_object_get(d, ks)) json_object_set_new(d, ks, json_real(clamp_lp(t->top_lp[k])));
            has_sampled |= t->top_ids[k] == t->id;
        }
        /* as OpenAI and vLLM: the sampled token is always listed */
        if (!has_sampled && !json_object_get(d, s)) json_object_set_new(d, s, json_real(clamp_lp(t->logprob)));
        json_array_append_new(tops, d);
    }
    json_t *o = json_object();
    json_object_set_new(o, "tokens", tokens);
    json_object_set_new(o, "token_logprobs", lps);
    json_object_set_new(o, "top_logprobs", tops);
    json_object_set_new(o, "text_offset", offs);
    return o;
}

static json_t *usage_json(const struct api_result *res)
{
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(res->n_prompt));
    json_object_set_new(u, "completion_tokens", json_integer(res->n_completion));
    json_object_set_new(u, "total_tokens", json_integer((json_int_t)res->n_prompt + res->n_completion));
    return u;
}

static json_t *stop_reason_json(const struct api_result *res)
{
    if (res->stop_str) return json_string(res->stop_str);
    if (res->stop_id >= 0) return json_integer(res->stop_id);
    return json_null();
}

static json_t *envelope(const struct api_request *r, const struct api_result *res, const char *object)
{
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(res->id ? res->id : ""));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(res->created));
    json_object_set_new(o, "model", json_string(res->model ? res->model : ""));
    return o;
}

static json_t *text_json(const char *s, size_t n) { return json_stringn(s ? s : "", s ? n : 0); }

json_t *api_response_json(const struct api_request *r, const struct api_result *res, const struct tokenizer *tok)
{
    bool chat = r->kind == API_CHAT;
    json_t *o = envelope(r, res, chat ? "chat.completion" : "text_completion");
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    if (chat) {
        json_t *msg = json_object();
        json_object_set_new(msg, "role", json_string("assistant"));
        json_object_set_new(msg, "content", text_json(res->content, res->content_len));
        if (res->reasoning) json_object_set_new(msg, "reasoning_content", text_json(res->reasoning, res->reasoning_len));
        json_object_set_new(choice, "message", msg);
        json_object_set_new(choice, "logprobs", r->logprobs ? chat_logprobs_json(r, res, tok) : json_null());
    } else {
        json_object_set_new(choice, "text", text_json(res->content, res->content_len));
        json_object_set_new(choice, "logprobs", r->logprobs ? completion_logprobs_json(r, res, tok) : json_null());
    }
    json_object_set_new(choice, "finish_reason", res->finish_reason ? json_string(res->finish_reason) : json_null());
    json_object_set_new(choice, "stop_reason", stop_reason_json(res));
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", usage_json(res));
    return o;
}

json_t *api_chunk_json(const struct api_request *r, const struct api_result *res, const struct tokenizer *tok)
{
    bool chat = r->kind == API_CHAT;
    json_t *o = envelope(r, res, chat ? "chat.completion.chunk" : "text_completion");
    json_t *choice = json_object();
    json_object_set_new(choice, "index", json_integer(0));
    bool has_lp = r->logprobs && res->n_tokens > 0;
    if (chat) {
        json_t *delta = json_object();
        if (res->first) json_object_set_new(delta, "role", json_string("assistant"));
        if (res->reasoning && res->reasoning_len)
            json_object_set_new(delta, "reasoning_content", text_json(res->reasoning, res->reasoning_len));
        if ((res->content && res->content_len) || res->first)
            json_object_set_new(delta, "content", text_json(res->content, res->content_len));
        json_object_set_new(choice, "delta", delta);
        json_object_set_new(choice, "logprobs", has_lp ? chat_logprobs_json(r, res, tok) : json_null());
    } else {
        json_object_set_new(choice, "text", text_json(res->content, res->content_len));
        json_object_set_new(choice, "logprobs", has_lp ? completion_logprobs_json(r, res, tok) : json_null());
    }
    json_object_set_new(choice, "finish_reason", res->finish_reason ? json_string(res->finish_reason) : json_null());
    if (res->finish_reason) json_object_set_new(choice, "stop_reason", stop_reason_json(res));
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(o, "choices", choices);
    if (r->include_usage) json_object_set_new(o, "usage", json_null());
    return o;
}

json_t *api_usage_chunk_json(const struct api_request *r, const struct api_result *res)
{
    json_t *o = envelope(r, res, r->kind == API_CHAT ? "chat.completion.chunk" : "text_completion");
    json_object_set_new(o, "choices", json_array());
    json_object_set_new(o, "usage", usage_json(res));
    return o;
}

json_t *api_model_json(const char *model_name, int n_ctx, int64_t created)
{
    json_t *m = json_object();
    json_object_set_new(m, "id", json_string(model_name));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(created));
    json_object_set_new(m, "owned_by", json_string("strata"));
    json_object_set_new(m, "root", json_string(model_name));
    json_object_set_new(m, "parent", json_null());
    json_object_set_new(m, "max_model_len", json_integer(n_ctx));
    return m;
}

json_t *api_models_json(const char *model_name, int n_ctx, int64_t created)
{
    json_t *o = json_object(), *data = json_array();
    json_array_append_new(data, api_model_json(model_name, n_ctx, created));
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", data);
    return o;
}

json_t *api_tokenize_json(const int32_t *ids, int n, int n_ctx)
{
    json_t *o = json_object(), *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(ids[i]));
    json_object_set_new(o, "count", json_integer(n));
    json_object_set_new(o, "max_model_len", json_integer(n_ctx));
    json_object_set_new(o, "tokens", a);
    return o;
}
