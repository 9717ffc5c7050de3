/* strata tokenize: text -> token ids, or ids -> text, with the model's own tokenizer.json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/cli.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

#define MAX_STDIN_BYTES ((size_t)1 << 30)

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata tokenize [-m MODEL_DIR] --text TEXT [--add-special]\n"
            "       strata tokenize [-m MODEL_DIR] --decode ID,ID,... [--skip-special]\n"
            "\n"
            "Encodes TEXT with MODEL_DIR/tokenizer.json and prints {\"ids\":[...]}, or decodes a list of token ids\n"
            "and prints {\"text\":\"...\"}; one line of JSON on standard output.\n"
            "  -m, --model DIR   a folder with tokenizer.json (and tokenizer_config.json); default: the bundled model\n"
            "  --text TEXT       the text to encode; '-' reads it from standard input (all of it, as is)\n"
            "  --add-special     add the special tokens of the tokenizer's post-processor (e.g. BOS)\n"
            "  --decode LIST     token ids separated by commas or spaces (\"[1, 2, 3]\" works too)\n"
            "  --skip-special    leave special tokens out of the decoded text\n");
}

/* Reads all of stdin into a malloc'd buffer. */
static int read_stdin(char **out, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *b = malloc(cap);
    if (!b) return -1;
    for (;;) {
        if (n == cap) {
            if (cap >= MAX_STDIN_BYTES) {
                free(b);
                return -2;
            }
            char *nb = realloc(b, cap * 2);
            if (!nb) {
                free(b);
                return -1;
            }
            b = nb;
            cap *= 2;
        }
        size_t k = fread(b + n, 1, cap - n, stdin);
        n += k;
        if (k == 0) break;
    }
    if (ferror(stdin)) {
        free(b);
        return -3;
    }
    *out = b;
    *len = n;
    return 0;
}

int cmd_tokenize(int argc, char **argv)
{
    const char *cmd = "tokenize", *dir = NULL, *text = NULL, *decode_list = NULL;
    bool add_special = false, skip_special = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(dir = cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--text")) {
            if (!(text = cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--decode")) {
            if (!(decode_list = cli_value(cmd, argc, argv, &i))) return 1;
        } else if (!strcmp(a, "--add-special")) {
            add_special = true;
        } else if (!strcmp(a, "--skip-special")) {
            skip_special = true;
        } else {
            fprintf(stderr, "strata tokenize: unknown option \"%s\" (see strata tokenize --help)\n", a);
            return 1;
        }
    }
    if (!!text == !!decode_list) {
        fprintf(stderr, "strata tokenize: give exactly one of --text or --decode (see strata tokenize --help)\n");
        return 1;
    }
    if (!dir) dir = cli_default_model();

    int32_t *ids = NULL;
    int n_ids = 0;
    if (decode_list && cli_ids(cmd, "--decode", decode_list, &ids, &n_ids) < 0) return 1;

    char err[ST_ERR_LEN] = "";
    struct tokenizer *t = NULL;
    char *input = NULL, *out_text = NULL;
    int status = 1;
    if (tokenizer_load(&t, dir, err) < 0) {
        fprintf(stderr, "strata tokenize: %s\n", err);
        goto done;
    }
    if (text) {
        size_t len = strlen(text);
        if (!strcmp(text, "-")) {
            int rc = read_stdin(&input, &len);
            if (rc < 0) {
                fprintf(stderr, "strata tokenize: reading standard input: %s\n",
                        rc == -2 ? "over 1 GiB" : rc == -1 ? "out of memory" : "read error");
                goto done;
            }
            text = input;
        }
        if (tokenizer_encode(t, text, len, add_special, &ids, &n_ids, err) < 0) {
            fprintf(stderr, "strata tokenize: %s\n", err);
            goto done;
        }
        fputs("{\"ids\":[", stdout);
        for (int i = 0; i < n_ids; i++) printf(i ? ",%d" : "%d", (int)ids[i]);
        fputs("]}\n", stdout);
    } else {
        size_t len;
        if (tokenizer_decode(t, ids, n_ids, skip_special, &out_text, &len, err) < 0) {
            fprintf(stderr, "strata tokenize: %s\n", err);
            goto done;
        }
        json_t *o = json_pack("{s:s%}", "text", out_text, len);
        char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
        json_decref(o);
        if (!s) {
            fprintf(stderr, "strata tokenize: out of memory\n");
            goto done;
        }
        printf("%s\n", s);
        free(s);
    }
    if (fflush(stdout) != 0) {
        fprintf(stderr, "strata tokenize: writing standard output failed\n");
        goto done;
    }
    status = 0;
done:
    free(ids);
    free(input);
    free(out_text);
    tokenizer_free(t);
    return status;
}
