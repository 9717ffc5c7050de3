/* chat_template: compile and render a model's Jinja chat_template (see chat_template.h). The interpreter lives in
 * jinja_*.c; this file holds the public API: source normalization like jinja2's lexer, the compiled template
 * object, and the variables Hugging Face's apply_chat_template passes. */
#include "tokenizer/chat_template.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tokenizer/jinja.h"

#define CHAT_TEMPLATE_MAX_SOURCE (4u << 20)

struct chat_template {
    char *src;          /* newline-normalized source; DATA nodes point into it */
    size_t src_len;
    struct jpool pool;  /* the AST */
    struct jn_list body;
    struct chat_template_limits limits;
};

void chat_template_default_limits(struct chat_template_limits *l)
{
    l->max_output_bytes = JINJA_MAX_OUTPUT_BYTES;
    l->max_loop_iters = JINJA_MAX_LOOP_ITERS;
    l->max_steps = JINJA_MAX_STEPS;
    l->max_work_bytes = JINJA_MAX_WORK;
    l->max_depth = JINJA_MAX_EVAL_DEPTH;
}

void chat_template_set_limits(struct chat_template *t, const struct chat_template_limits *l)
{
    struct chat_template_limits d;
    chat_template_default_limits(&d);
    t->limits.max_output_bytes = l->max_output_bytes > 0 ? ST_MIN(l->max_output_bytes, (size_t)JINJA_HARD_MAX_BYTES / 2)
                                                         : d.max_output_bytes;
    t->limits.max_loop_iters = l->max_loop_iters > 0 ? l->max_loop_iters : d.max_loop_iters;
    t->limits.max_steps = l->max_steps > 0 ? l->max_steps : d.max_steps;
    t->limits.max_work_bytes = l->max_work_bytes > 0 ? l->max_work_bytes : d.max_work_bytes;
    /* deeper evaluation would risk the C stack (about 1 KB per level) */
    t->limits.max_depth = l->max_depth > 0 ? ST_MIN(l->max_depth, 4 * JINJA_MAX_EVAL_DEPTH) : d.max_depth;
}

int chat_template_compile(struct chat_template **out, const char *source, char *err)
{
    struct chat_template *t = NULL;
    struct jtoken_list toks = {0};
    int rc;
    *out = NULL;
    if (!source) return err_set(err, ST_EINVAL, "chat template: no source");
    size_t len = strlen(source);
    if (len > CHAT_TEMPLATE_MAX_SOURCE)
        return err_set(err, ST_ERANGE, "chat template: source is %zu bytes, over the %u byte limit", len,
                       CHAT_TEMPLATE_MAX_SOURCE);
    if (!jinja_utf8_valid(source, len)) return err_set(err, ST_EFORMAT, "chat template: source is not valid UTF-8");
    if (!(t = calloc(1, sizeof(*t))) || !(t->src = malloc(len + 1))) {
        rc = err_set(err, ST_ENOMEM, "chat template: out of memory");
        goto fail;
    }
    /* jinja2: \r\n and \r become \n; one trailing newline is dropped (keep_trailing_newline=False) */
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (source[i] == '\r') {
            t->src[n++] = '\n';
            if (i + 1 < len && source[i + 1] == '\n') i++;
        } else {
            t->src[n++] = source[i];
        }
    }
    if (n > 0 && t->src[n - 1] == '\n') n--;
    t->src[n] = 0;
    t->src_len = n;
    if ((rc = jinja_lex(t->src, n, &toks, err)) < 0) goto fail;
    if ((rc = jinja_parse(&t->pool, &toks, &t->body, err)) < 0) goto fail;
    jinja_tokens_free(&toks);
    chat_template_default_limits(&t->limits);
    *out = t;
    return 0;
fail:
    jinja_tokens_free(&toks);
    chat_template_free(t);
    return rc;
}

void chat_template_free(struct chat_template *t)
{
    if (!t) return;
    jpool_free(&t->pool);
    free(t->src);
    free(t);
}

int chat_template_render(const struct chat_template *t, const json_t *vars, char **out, size_t *out_len, char *err)
{
    struct jbuf b = {0};
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t) return err_set(err, ST_EINVAL, "chat template: no template");
    if (vars && !json_is_object(vars)) return err_set(err, ST_EINVAL, "chat template: variables must be a JSON object");
    int rc = jinja_render(&t->body, vars, &t->limits, &b, err);
    if (rc < 0) {
        jbuf_free(&b);
        return rc;
    }
    if (!b.p && !(b.p = calloc(1, 1))) return err_set(err, ST_ENOMEM, "chat template: out of memory");
    *out = b.p;
    if (out_len) *out_len = b.n;
    return 0;
}

int chat_template_apply(const struct chat_template *t, const json_t *messages, const json_t *tools,
                        bool add_generation_prompt, int enable_thinking, const char *bos_token,
                        const char *eos_token, const json_t *extra, char **out, size_t *out_len, char *err)
{
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!messages || !json_is_array(messages)) return err_set(err, ST_EINVAL, "chat template: messages must be a JSON array");
    if (tools && !json_is_array(tools) && !json_is_null(tools))
        return err_set(err, ST_EINVAL, "chat template: tools must be a JSON array");
    if (extra && !json_is_object(extra)) return err_set(err, ST_EINVAL, "chat template: extra variables must be a JSON object");
    json_t *vars = json_object();
    if (!vars) return err_set(err, ST_ENOMEM, "chat template: out of memory");
    int rc = 0;
    /* extra first, so that the explicit arguments win (as in apply_chat_template, where they are named parameters) */
    if (extra && json_object_update(vars, (json_t *)extra) != 0) goto nomem;
    if (bos_token || !json_object_get(vars, "bos_token"))
        if (json_object_set_new(vars, "bos_token", json_string(bos_token ? bos_token : "")) != 0) goto nomem;
    if (eos_token || !json_object_get(vars, "eos_token"))
        if (json_object_set_new(vars, "eos_token", json_string(eos_token ? eos_token : "")) != 0) goto nomem;
    if (json_object_set(vars, "messages", (json_t *)messages) != 0) goto nomem;
    if (json_object_set_new(vars, "tools", tools && json_is_array(tools) ? json_incref((json_t *)tools) : json_null()) != 0)
        goto nomem;
    if (!json_object_get(vars, "documents") && json_object_set_new(vars, "documents", json_null()) != 0) goto nomem;
    if (json_object_set_new(vars, "add_generation_prompt", json_boolean(add_generation_prompt)) != 0) goto nomem;
    if (enable_thinking >= 0 && json_object_set_new(vars, "enable_thinking", json_boolean(enable_thinking)) != 0)
        goto nomem;
    rc = chat_template_render(t, vars, out, out_len, err);
    json_decref(vars);
    return rc;
nomem:
    json_decref(vars);
    return err_set(err, ST_ENOMEM, "chat template: out of memory");
}
