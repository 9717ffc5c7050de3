/* chat_template: runs a model's own Jinja chat_template (a Jinja2 subset interpreter written for this), so that
 * rendered prompts are byte-identical to Hugging Face's apply_chat_template(..., tokenize=False).
 *
 * A template is compiled once (parse errors name the construct, line and column) and can be rendered many times,
 * from many threads at once (rendering does not modify the compiled template). Variables come in as a jansson
 * object; the usual ones are messages, add_generation_prompt, enable_thinking, tools, bos_token, eos_token.
 *
 * Semantics are jinja2's in Hugging Face's environment (sandboxed, trim_blocks and lstrip_blocks on, one trailing
 * newline of the source dropped, loop controls break/continue, tojson = json.dumps(ensure_ascii=False) with
 * indent/separators/sort_keys, raise_exception(msg), strftime_now(fmt)): whitespace control, literals, the
 * operators, if/for/set/macro/call/filter/with/block, namespace(), loop.*, the common filters, tests and str/dict
 * methods. Strings are UTF-8; lengths, indexes and slices count code points like Python; numbers print like
 * Python. Differences, all on paths where jinja2 would fail or give something useless: integers are 64-bit
 * (overflow is an error, Python would grow them); an attribute or item of an undefined value is undefined
 * (jinja2 raises); generators from map/select/... are materialized (truthiness and len() still act as
 * jinja2's); range() and dict views print as lists.
 *
 * Rendering is bounded: loops, evaluation steps, bytes copied, recursion depth and output size have limits
 * (chat_template_set_limits), so a hostile template or input cannot hang or exhaust the process; source nesting
 * is limited at compile time. Errors are returned (never printed): ST_EFORMAT for a malformed template,
 * ST_EUNSUPPORTED for a construct this interpreter does not run (the message names it, with line and column),
 * ST_EINVAL for a render-time error (raise_exception's message is passed through unchanged), ST_ERANGE for a
 * limit, ST_ENOMEM.
 */
#ifndef STRATA_CHAT_TEMPLATE_H
#define STRATA_CHAT_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct chat_template;

/* Per-render budgets; a render that exceeds one fails with ST_ERANGE and a message naming it. */
struct chat_template_limits {
    size_t max_output_bytes;  /* the rendered text, and any one string value (default 16 MB) */
    long long max_loop_iters; /* loop iterations, all loops together (default 1,000,000) */
    long long max_steps;      /* expressions evaluated plus statements run (default 10,000,000) */
    long long max_work_bytes; /* bytes copied or scanned, with weights (default 512 MB) */
    int max_depth;            /* nesting of evaluation: expressions, blocks, macro calls (default 600) */
};

void chat_template_default_limits(struct chat_template_limits *l);
/* Sets the budgets of later renders (values <= 0 keep the default). Not to be called while the template is
 * being rendered on another thread. */
void chat_template_set_limits(struct chat_template *t, const struct chat_template_limits *l);

/* Compiles UTF-8 template source (at most 4 MB). On failure *out is NULL and err says why and where. */
int chat_template_compile(struct chat_template **out, const char *source, char *err);
/* Accepts NULL. */
void chat_template_free(struct chat_template *t);

/* Renders with vars (a JSON object or NULL; not modified). *out is malloc'd and NUL-terminated (caller frees);
 * *out_len (may be NULL) counts its bytes, which may include NULs that came from the input. On failure *out is
 * NULL. */
int chat_template_render(const struct chat_template *t, const json_t *vars, char **out, size_t *out_len,
                         char *err);

/* Convenience for the common call, with the variables apply_chat_template passes: messages (JSON array), tools
 * (JSON array, or NULL: the template sees tools = none), documents = none, add_generation_prompt,
 * enable_thinking (-1: leave undefined, 0: false, 1: true), bos/eos token strings (NULL: empty), extra: more
 * variables (JSON object, e.g. the API's chat_template_kwargs; may be NULL). extra cannot replace messages,
 * tools or add_generation_prompt; it sets enable_thinking only when the argument is -1 and the bos/eos tokens
 * only when those arguments are NULL. */
int chat_template_apply(const struct chat_template *t, const json_t *messages, const json_t *tools,
                        bool add_generation_prompt, int enable_thinking, const char *bos_token,
                        const char *eos_token, const json_t *extra, char **out, size_t *out_len, char *err);

#endif
