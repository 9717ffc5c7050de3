/* strata verify: print the weight manifest of a model directory (or of one layer range). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "core/core.h"
#include "model/model.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata verify [-m MODEL_DIR] [--layers A-B] [--compare MANIFEST.json]\n"
            "\n"
            "Prints the weight manifest as JSON: XXH3-128 of every tensor's bytes plus config.json and\n"
            "tokenizer.json. Two nodes serve together only when the hashes of the tensors they share agree.\n"
            "  --layers A-B        only the tensors of layers A..B (inclusive) and the embedding/head they need\n");
}

int cmd_verify(int argc, char **argv)
{
    const char *cmd = "verify", *dir = NULL, *layers = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
            if (!(v = cli_value(cmd, argc, argv, &i))) return 2;
            dir = v;
        } else if (!strcmp(a, "--layers")) {
            if (!(v = cli_value(cmd, argc, argv, &i))) return 2;
            layers = v;
        } else {
            fprintf(stderr, "strata verify: unknown option \"%s\" (see --help)\n", a);
            return 2;
        }
    }
    if (!dir) dir = cli_default_model();
    char err[ST_ERR_LEN];
    struct model_config cfg;
    if (model_config_load(&cfg, dir, err) < 0) {
        fprintf(stderr, "strata verify: %s\n", err);
        return 1;
    }
    int b = 0, e = -1;
    if (layers) {
        long lb, le;
        char *dash = strchr(layers, '-');
        if (!dash || sscanf(layers, "%ld-%ld", &lb, &le) != 2 || lb < 0 || le < lb || le >= cfg.n_layers) {
            fprintf(stderr, "strata verify: --layers: expected A-B within 0-%d\n", cfg.n_layers - 1);
            return 2;
        }
        b = (int)lb;
        e = (int)le + 1;
    }
    struct model m;
    struct manifest mf;
    bool first = b == 0, last = e < 0 || e == cfg.n_layers;
    if (model_load(&m, dir, b, e, first, last, err) < 0 || manifest_build(&mf, &m, err) < 0) {
        fprintf(stderr, "strata verify: %s\n", err);
        return 1;
    }
    char *json = manifest_to_json(&mf);
    if (json) printf("%s\n", json);
    free(json);
    manifest_free(&mf);
    model_free(&m);
    return json ? 0 : 1;
}
