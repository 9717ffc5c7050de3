/* strata: command dispatch. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>

#include "cli/cli.h"
#include "core/core.h"

#ifndef STRATA_VERSION
#define STRATA_VERSION "0.1.0"
#endif

struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
};

static const struct command commands[] = {
    {"run", cmd_run, "generate from a prompt (text, chat or token ids)"},
    {"serve", cmd_serve, "OpenAI-compatible API server (one node, or a coordinator over workers)"},
    {"tokenize", cmd_tokenize, "text -> token ids (or ids -> text with --decode)"},
    {"template", cmd_template, "render the model's chat template for a message list"},
    {"worker", cmd_worker, "serve one pipeline stage for a coordinator"},
    {"cluster", cmd_cluster, "start, stop, inspect or migrate a cluster described by a cluster file"},
    {"verify", cmd_verify, "print the weight manifest (XXH3-128 per tensor)"},
    {"convert", cmd_convert, "quantize bf16 safetensors to MLX affine 8/4-bit"},
};

static void usage(FILE *f)
{
    fprintf(f, "strata %s: distributed LLM inference\n\nusage: strata <command> [options]   (strata <command> --help)\n\n", STRATA_VERSION);
    for (size_t i = 0; i < ST_ARRAY_LEN(commands); i++) fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nwith no -m, commands use the bundled model (%s)\n", cli_default_model());
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN);
    const char *lvl = getenv("STRATA_LOG");
    if (lvl && log_level_parse(lvl) >= 0) log_set_level((enum log_level)log_level_parse(lvl));
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("strata %s\n", STRATA_VERSION);
        return 0;
    }
    for (size_t i = 0; i < ST_ARRAY_LEN(commands); i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "strata: unknown command \"%s\"\n\n", argv[1]);
    usage(stderr);
    return 2;
}
