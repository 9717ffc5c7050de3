/* strata convert: bf16/f16/f32 Hugging Face safetensors -> MLX affine 8/4-bit (see model/quantize.h). */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/core.h"
#include "model/quantize.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata convert --bits 8|4 [options] IN_DIR OUT_DIR\n"
            "\n"
            "Quantizes a Hugging Face model directory (config.json + model.safetensors or sharded, bf16/f16/f32)\n"
            "to MLX's affine format, with exactly the codes, scales and biases of MLX's quantizer. Linear and\n"
            "embedding weights (2-D *.weight whose input dim is a multiple of the group size) are quantized;\n"
            "norms and the rest are copied. config.json gains \"quantization\"; tokenizer files are copied.\n"
            "\n"
            "options:\n"
            "  --bits B             8 or 4 (required)\n"
            "  --group-size G       32, 64 or 128 (default 64)\n"
            "  --threads N          threads (default: all cores)\n"
            "  --max-shard-size MB  split the output into shards of at most MB megabytes (default 5120 = 5 GB)\n"
            "  -f, --force          replace a model already in OUT_DIR\n"
            "  -q, --quiet          no progress\n"
            "  -h, --help           this help\n");
}

struct progress {
    bool tty, quiet;
    int last_pct;
};

static void on_progress(void *ctx, const char *tensor, uint64_t done, uint64_t total)
{
    struct progress *p = ctx;
    if (p->quiet) return;
    int pct = total ? (int)(done * 100 / total) : 100;
    if (p->tty) {
        fprintf(stderr, "\r\033[Kconvert: %3d%%  %s", pct, tensor);
    } else if (pct / 10 != p->last_pct / 10) {
        fprintf(stderr, "convert: %3d%%  %s\n", pct, tensor);
    }
    p->last_pct = pct;
}

int cmd_convert(int argc, char **argv)
{
    const char *cmd = "convert";
    struct convert_opts o = {.bits = 0, .group_size = 64};
    const char *dirs[2] = {NULL, NULL};
    int n_dirs = 0;
    bool quiet = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
        long x;
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        } else if (strcmp(a, "--bits") == 0) {
            if (!(v = cli_value(cmd, argc, argv, &i)) || cli_int(cmd, a, v, 1, 64, &x) < 0) return 2;
            o.bits = (int)x;
        } else if (strcmp(a, "--group-size") == 0) {
            if (!(v = cli_value(cmd, argc, argv, &i)) || cli_int(cmd, a, v, 1, 1 << 20, &x) < 0) return 2;
            o.group_size = (int)x;
        } else if (strcmp(a, "--threads") == 0) {
            if (!(v = cli_value(cmd, argc, argv, &i)) || cli_int(cmd, a, v, 1, 1024, &x) < 0) return 2;
            o.n_threads = (int)x;
        } else if (strcmp(a, "--max-shard-size") == 0) {
            if (!(v = cli_value(cmd, argc, argv, &i)) || cli_int(cmd, a, v, 1, 1L << 30, &x) < 0) return 2;
            o.max_shard_bytes = (uint64_t)x << 20;
        } else if (strcmp(a, "-f") == 0 || strcmp(a, "--force") == 0) {
            o.overwrite = true;
        } else if (strcmp(a, "-q") == 0 || strcmp(a, "--quiet") == 0) {
            quiet = true;
        } else if (a[0] == '-' && a[1]) {
            fprintf(stderr, "strata convert: unknown option %s\n\n", a);
            usage(stderr);
            return 2;
        } else if (n_dirs < 2) {
            dirs[n_dirs++] = a;
        } else {
            fprintf(stderr, "strata convert: unexpected argument \"%s\" (IN_DIR and OUT_DIR already given)\n", a);
            return 2;
        }
    }
    if (n_dirs != 2) {
        fprintf(stderr, "strata convert: need IN_DIR and OUT_DIR\n\n");
        usage(stderr);
        return 2;
    }
    if (o.bits == 0) {
        fprintf(stderr, "strata convert: --bits 8 or --bits 4 is required\n");
        return 2;
    }
    char err[ST_ERR_LEN];
    if (mlx_quantize_check(o.bits, o.group_size, err) < 0) {
        fprintf(stderr, "strata: %s\n", err);
        return 2;
    }
    struct progress p = {.tty = isatty(2) == 1, .quiet = quiet, .last_pct = -1};
    o.progress = on_progress;
    o.progress_ctx = &p;
    struct convert_stats s;
    int rc = model_convert(dirs[0], dirs[1], &o, &s, err);
    if (p.tty && !quiet && p.last_pct >= 0) fprintf(stderr, "\r\033[K");
    if (rc < 0) {
        fprintf(stderr, "strata: %s\n", err);
        return 1;
    }
    fprintf(stderr,
            "strata convert: %s -> %s: %d-bit, group %d: %d tensors quantized, %d copied, %.1f MB -> %.1f MB "
            "in %d file%s (+%d other files), %.2f s\n",
            dirs[0], dirs[1], o.bits, o.group_size, s.n_quantized, s.n_copied, (double)s.in_bytes / 1e6,
            (double)s.out_bytes / 1e6, s.n_shards, s.n_shards == 1 ? "" : "s", s.n_files_copied, s.seconds);
    return 0;
}
