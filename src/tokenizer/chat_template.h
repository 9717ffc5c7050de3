/* chat_template: runs a model's own Jinja chat_template (a Jinja2 subset interpreter written for this), so that
 * rendered prompts are byte-identical to Hugging Face's apply_chat_template(..., tokenize=False).
 *
 * A template is compiled once (parse errors name the construct, line and column) and can be rendered many times,
 * from many threads at once (rendering does not modify the compiled template). Variables come in as a jansson
 * object; the usual ones are messages, add_generation_prompt, enable_thinking, tools, bos_token, eos_token.
 * Rendering is bounded: loops, recursion depth and output size have limits, so a hostile template or input cannot
 * hang or exhaust the process.
 */
#ifndef STRATA_CHAT_TEMPLATE_H
#define STRATA_CHAT_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

struct chat_template;

int chat_template_compile(struct chat_template **out, const char *source, char *err);
void chat_template_free(struct chat_template *t);

/* Renders with vars (a JSON object; not modified). *out is malloc'd and NUL-terminated (caller frees). */
int chat_template_render(const struct chat_template *t, const json_t *vars, char **out, size_t *out_len,
                         char *err);

/* Convenience for the common call: messages (JSON array), tools (JSON array or NULL), enable_thinking
 * (-1: leave undefined, 0: false, 1: true), bos/eos token strings (NULL: empty), extra: more variables to
 * merge (JSON object, e.g. the API's chat_template_kwargs; may be NULL). */
int chat_template_apply(const struct chat_template *t, const json_t *messages, const json_t *tools,
                        bool add_generation_prompt, int enable_thinking, const char *bos_token,
                        const char *eos_token, const json_t *extra, char **out, size_t *out_len, char *err);

#endif
