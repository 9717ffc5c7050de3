/* strata template: render a model's own chat template for a message list, like Hugging Face's
 * tokenizer.apply_chat_template(messages, tokenize=False). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/cli.h"
#include "core/core.h"
#include "tokenizer/chat_template.h"

#define MAX_JSON_BYTES (64u << 20)

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata template [-m MODEL_DIR] --messages FILE.json [--tools FILE.json]\n"
            "                       [--no-generation-prompt] [--think | --no-think]\n"
            "\n"
            "Prints the prompt text the model's chat template makes of a conversation (no trailing newline is\n"
            "added). The template and the bos/eos tokens come from MODEL_DIR/tokenizer_config.json (or\n"
            "chat_template.jinja / chat_template.json next to it).\n"
            "  --messages FILE        a JSON array of {\"role\", \"content\", ...} messages, or an object with\n"
            "                         \"messages\" (and optionally \"tools\"); '-' reads standard input\n"
            "  --tools FILE           a JSON array of tool definitions\n"
            "  --no-generation-prompt do not open an assistant turn at the end\n"
            "  --think, --no-think    set enable_thinking to true / false (default: left undefined)\n");
}

/* Loads a JSON file ('-': stdin). Prints the error. */
static json_t *load_json(const char *what, const char *path, size_t flags)
{
    json_error_t je;
    json_t *j;
    if (!strcmp(path, "-")) {
        j = json_loadf(stdin, JSON_ALLOW_NUL | flags, &je);
    } else {
        char *text, err[ST_ERR_LEN];
        size_t len;
        if (file_read_all(path, &text, &len, MAX_JSON_BYTES, err) < 0) {
            fprintf(stderr, "strata template: %s: %s\n", what, err);
            return NULL;
        }
        j = json_loadb(text, len, JSON_ALLOW_NUL | flags, &je);
        free(text);
    }
    if (!j) fprintf(stderr, "strata template: %s: %s: line %d: %s\n", what, path, je.line, je.text);
    return j;
}

/* A special token in tokenizer_config.json: a string, {"content": "..."} or null. */
static const char *token_string(const json_t *cfg, const char *key)
{
    const json_t *t = json_object_get(cfg, key);
    if (json_is_object(t)) t = json_object_get(t, "content");
    return json_is_string(t) ? json_string_value(t) : NULL;
}

/* The template text: a string, or a list of {"name", "template"} (the "tool_use" one when there are tools). */
static const char *pick_template(const json_t *ct, bool have_tools)
{
    if (json_is_string(ct)) return json_string_value(ct);
    if (!json_is_array(ct)) return NULL;
    const char *dflt = NULL, *tool = NULL;
    size_t i;
    const json_t *e;
    json_array_foreach((json_t *)ct, i, e) {
        const char *name = json_string_value(json_object_get(e, "name"));
        const char *tmpl = json_string_value(json_object_get(e, "template"));
        if (!name || !tmpl) continue;
        if (!strcmp(name, "default")) dflt = tmpl;
        if (!strcmp(name, "tool_use")) tool = tmpl;
    }
    return have_tools && tool ? tool : dflt;
}

int cmd_template(int argc, char **argv)
{
    const char *cmd = "template", *dir = NULL, *messages_path = NULL, *tools_path = NULL;
    bool gen_prompt = true;
    int thinking = -1, status = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(v = cli_value(cmd, argc, argv, &i))) return 1;
            dir = v;
        } else if (!strcmp(a, "--messages")) {
            if (!(v = cli_value(cmd, argc, argv, &i))) return 1;
            messages_path = v;
        } else if (!strcmp(a, "--tools")) {
            if (!(v = cli_value(cmd, argc, argv, &i))) return 1;
            tools_path = v;
        } else if (!strcmp(a, "--no-generation-prompt")) {
            gen_prompt = false;
        } else if (!strcmp(a, "--no-think")) {
            thinking = 0;
        } else if (!strcmp(a, "--think")) {
            thinking = 1;
        } else {
            fprintf(stderr, "strata template: unknown option \"%s\" (see --help)\n", a);
            return 1;
        }
    }
    if (!messages_path) {
        fprintf(stderr, "strata template: --messages FILE is required (see --help)\n");
        return 1;
    }
    if (!dir) dir = cli_default_model();

    json_t *cfg = NULL, *side = NULL, *input = NULL, *tools = NULL;
    struct chat_template *t = NULL;
    char *side_text = NULL, *out = NULL, err[ST_ERR_LEN], path[4096];
    size_t out_len = 0, side_len;

    if (!(input = load_json("--messages", messages_path, 0))) goto done;
    const json_t *messages = input;
    if (json_is_object(input)) {
        messages = json_object_get(input, "messages");
        tools = json_incref(json_object_get(input, "tools"));
    }
    if (!json_is_array(messages)) {
        fprintf(stderr, "strata template: --messages: expected a JSON array of messages (or {\"messages\": [...]})\n");
        goto done;
    }
    if (tools_path) {
        json_decref(tools);
        if (!(tools = load_json("--tools", tools_path, 0))) goto done;
    }
    if (tools && !json_is_array(tools) && !json_is_null(tools)) {
        fprintf(stderr, "strata template: tools: expected a JSON array of tool definitions\n");
        goto done;
    }
    bool have_tools = tools && json_is_array(tools) && json_array_size(tools) > 0;

    if (path_join(path, sizeof(path), dir, "tokenizer_config.json") < 0) {
        fprintf(stderr, "strata template: model path too long\n");
        goto done;
    }
    /* configs hold integers beyond 64 bits (model_max_length); only strings are read from them */
    if (!(cfg = load_json("model", path, JSON_DECODE_INT_AS_REAL))) goto done;
    if (!json_is_object(cfg)) {
        fprintf(stderr, "strata template: %s: expected a JSON object\n", path);
        goto done;
    }
    const char *source = pick_template(json_object_get(cfg, "chat_template"), have_tools);
    if (!source) {
        /* newer transformers save the template next to the config */
        if (path_join(path, sizeof(path), dir, "chat_template.jinja") == 0 && file_exists(path)) {
            if (file_read_all(path, &side_text, &side_len, MAX_JSON_BYTES, err) < 0) {
                fprintf(stderr, "strata template: %s\n", err);
                goto done;
            }
            source = side_text;
        } else if (path_join(path, sizeof(path), dir, "chat_template.json") == 0 && file_exists(path)) {
            if (!(side = load_json("model", path, JSON_DECODE_INT_AS_REAL))) goto done;
            source = pick_template(json_object_get(side, "chat_template"), have_tools);
        }
    }
    if (!source) {
        fprintf(stderr, "strata template: %s has no chat_template\n", dir);
        goto done;
    }
    if (chat_template_compile(&t, source, err) < 0 ||
        chat_template_apply(t, messages, tools, gen_prompt, thinking, token_string(cfg, "bos_token"),
                            token_string(cfg, "eos_token"), NULL, &out, &out_len, err) < 0) {
        fprintf(stderr, "strata template: %s\n", err);
        goto done;
    }
    if (fwrite(out, 1, out_len, stdout) != out_len || fflush(stdout) != 0) {
        fprintf(stderr, "strata template: writing the output failed\n");
        goto done;
    }
    status = 0;
done:
    free(out);
    free(side_text);
    chat_template_free(t);
    json_decref(tools);
    json_decref(input);
    json_decref(side);
    json_decref(cfg);
    return status;
}
