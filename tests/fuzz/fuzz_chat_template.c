/* libFuzzer target: compile arbitrary bytes as a chat template and render it against a fixed conversation.
 * Any input must give output or a clean error: no crash, no leak, no hang (small render limits keep every
 * iteration fast). Seed corpus: tests/fuzz/corpus/chat_template/. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/core.h"
#include "tokenizer/chat_template.h"

static const char *const messages_json =
    "[{\"role\": \"system\", \"content\": \"You are helpful.\"},"
    " {\"role\": \"user\", \"content\": \"H\\u00e9llo <b>world</b>\"},"
    " {\"role\": \"assistant\", \"content\": \"<think>\\nhmm\\n</think>\\n\\nHi!\","
    "  \"tool_calls\": [{\"type\": \"function\", \"function\": {\"name\": \"f\", \"arguments\": {\"x\": [1, 2.5, null, true]}}}]},"
    " {\"role\": \"tool\", \"content\": \"{\\\"ok\\\": 1}\"},"
    " {\"role\": \"user\", \"content\": \"again\"}]";
static const char *const tools_json =
    "[{\"type\": \"function\", \"function\": {\"name\": \"f\", \"description\": \"d\","
    " \"parameters\": {\"type\": \"object\", \"properties\": {\"x\": {\"type\": \"array\"}}}}}]";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static json_t *messages, *tools;
    if (!messages) {
        messages = json_loads(messages_json, 0, NULL);
        tools = json_loads(tools_json, 0, NULL);
        if (!messages || !tools) abort();
    }
    if (size > 64 * 1024) return 0;
    char *src = malloc(size + 1);
    if (!src) return 0;
    memcpy(src, data, size);
    src[size] = 0; /* a NUL inside ends the template early, as for any C string */

    char err[ST_ERR_LEN];
    struct chat_template *t = NULL;
    if (chat_template_compile(&t, src, err) == 0) {
        struct chat_template_limits lim;
        chat_template_default_limits(&lim);
        lim.max_output_bytes = 1 << 20;
        lim.max_loop_iters = 20000;
        lim.max_steps = 200000;
        lim.max_work_bytes = 16 << 20;
        chat_template_set_limits(t, &lim);
        char *out = NULL;
        size_t len = 0;
        int think = size % 3 == 0 ? -1 : (int)(size % 2);
        if (chat_template_apply(t, messages, size % 2 ? tools : NULL, size % 4 != 0, think, "<s>", "</s>", NULL, &out,
                                &len, err) == 0) {
            if (!out || out[len] != 0) abort();
            free(out);
        } else if (out) {
            abort(); /* no output on failure */
        }
        chat_template_free(t);
    } else if (t) {
        abort(); /* no template on failure */
    }
    free(src);
    return 0;
}
