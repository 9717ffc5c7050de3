/* cuda_bench: the CUDA backend's decode and prefill speed on generated weights (cuda_bench_run in
 * src/backend/cuda/cuda_bench.c: tokens/s against the measured device copy bandwidth, device span, variants,
 * per-kernel profiles), a one-step run for an external profiler, and a 70B-parameter Llama shape in bf16 split over
 * two GPUs.
 *
 * Built by scripts/gpu-check.sh (make build/cuda_bench); not part of `make`.
 *   cuda_bench [--config FILE] [--bits 8] [--device N] [--ctx 1024] [--prompt 128] [--gen 64] [--prefill 512]
 *              [--batches 1,8,32] [--variants] [--profile]
 *   cuda_bench --ncu [--batches 1,32]   one decode step per batch size between cudaProfilerStart/Stop
 *                                         (ncu --profile-from-start off)
 *   cuda_bench --split70b [--stage-layers 40] [--gen 16]
 * Output: markdown tables; the last lines are "SUMMARY key=value" lines. */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"
#include "engine/engine.h"
#include "model/model.h"
#include "sample/sample.h"
#ifdef STRATA_CUDA
#include "backend/cuda/cuda_backend.h"
#endif

#ifdef STRATA_CUDA

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return n ? v[n / 2] : 0;
}

struct opts {
    const char *config;
    int bits, split70b, stage_layers, ncu;
    struct cuda_bench_opts b;
};

static int read_config(struct model_config *c, const char *path, char *err)
{
    char *txt;
    size_t len;
    int rc = file_read_all(path, &txt, &len, 1 << 20, err);
    if (rc < 0) return rc;
    rc = model_config_parse(c, txt, len, err);
    free(txt);
    return rc;
}

/* --ncu: prefill every slot, then per batch size two unprofiled decode steps and one between the profiler
 * brackets (run with STRATA_CUDA_GRAPHS=0 so that every kernel is its own launch) */
static int ncu_steps(struct model *m, const struct opts *o, char *err)
{
    int max_b = 1;
    for (int i = 0; i < o->b.n_batches; i++) max_b = ST_MAX(max_b, o->b.batches[i]);
    struct engine *e = NULL;
    struct engine_opts eo = {.n_slots = max_b, .n_ctx = o->b.ctx, .max_batch = ST_MAX(max_b, o->b.prompt), .max_logits = max_b};
    eo.backend.kind = BACKEND_CUDA;
    eo.backend.device = o->b.device;
    int rc = engine_init(&e, m, &eo, err);
    if (rc < 0) return rc;
    const int vocab = m->cfg.vocab_size, P = o->b.prompt;
    float *logits = malloc(sizeof(float) * (size_t)max_b * vocab);
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)(P + max_b)), *pos = malloc(sizeof(int32_t) * (size_t)(P + max_b));
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)(P + max_b));
    uint8_t *want = calloc((size_t)(P + max_b), 1);
    for (int s = 0; s < max_b && rc >= 0; s++) {
        for (int i = 0; i < P; i++) tok[i] = (i * 7919 + s * 104729 + 11) % vocab, pos[i] = i, slot[i] = s, want[i] = i == P - 1;
        struct batch b = {.n = P, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
        rc = engine_forward(e, &b, NULL, logits, err);
    }
    for (int bi = 0; bi < o->b.n_batches && rc >= 0; bi++) {
        const int B = o->b.batches[bi];
        for (int it = 0; it < 3 && rc >= 0; it++) {
            for (int i = 0; i < B; i++) tok[i] = (it * 31 + i * 977 + 5) % vocab, pos[i] = P + it, slot[i] = i, want[i] = 1;
            struct batch b = {.n = B, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
            if (it == 2) cuda_profiler_range(1);
            rc = engine_forward(e, &b, NULL, logits, err);
            if (it == 2) cuda_profiler_range(0);
        }
    }
    free(logits);
    free(tok);
    free(pos);
    free(slot);
    free(want);
    engine_free(e);
    return rc < 0 ? rc : 0;
}

static int bench_model(const struct opts *o)
{
    char err[ST_ERR_LEN];
    struct model_config cfg;
    int rc;
    if ((rc = read_config(&cfg, o->config, err)) < 0) {
        fprintf(stderr, "cuda_bench: %s\n", err);
        return 1;
    }
    struct model m;
    double t0 = time_s();
    if ((rc = model_init_random(&m, &cfg, o->bits, 1, 0, -1, true, true, err)) < 0) {
        fprintf(stderr, "cuda_bench: %s\n", err);
        return 1;
    }
    printf("model: %s shape (%s), %s, generated weights (%.1f s)\n", model_arch_name(cfg.arch), o->config,
           o->bits ? (o->bits == 8 ? "MLX 8-bit g64" : "MLX 4-bit g64") : "bf16", time_s() - t0);
    if (o->ncu) {
        rc = ncu_steps(&m, o, err);
        if (rc < 0) fprintf(stderr, "cuda_bench: %s\n", err);
        model_free(&m);
        return rc < 0 ? 1 : 0;
    }
    struct cuda_bench_result *r = calloc(1, sizeof(*r));
    size_t cap = 1 << 16;
    char *txt = malloc(cap);
    if (!r || !txt || (rc = cuda_bench_run(&m, &o->b, r, err)) < 0) {
        fprintf(stderr, "cuda_bench: %s\n", r && txt ? err : "out of memory");
        free(r);
        free(txt);
        model_free(&m);
        return 1;
    }
    cuda_bench_format(r, txt, cap);
    fputs(txt, stdout);
    free(r);
    free(txt);
    model_free(&m);
    return 0;
}

/* ---- 70B bf16 over two GPUs ---- */
static const char *llama70b_config =
    "{\"architectures\":[\"LlamaForCausalLM\"],\"model_type\":\"llama\",\"hidden_size\":8192,"
    "\"intermediate_size\":28672,\"num_hidden_layers\":80,\"num_attention_heads\":64,\"num_key_value_heads\":8,"
    "\"vocab_size\":128256,\"max_position_embeddings\":131072,\"rms_norm_eps\":1e-05,\"rope_theta\":500000.0,"
    "\"rope_scaling\":{\"factor\":8.0,\"low_freq_factor\":1.0,\"high_freq_factor\":4.0,"
    "\"original_max_position_embeddings\":8192,\"rope_type\":\"llama3\"},\"tie_word_embeddings\":false,"
    "\"bos_token_id\":128000,\"eos_token_id\":128001,\"torch_dtype\":\"bfloat16\"}";

struct gen_job {
    struct model m;
    const struct model_config *cfg;
    int layer, first, last;
    int rc;
    char err[ST_ERR_LEN];
};

static void *gen_thread(void *arg)
{
    struct gen_job *j = arg;
    j->rc = model_init_random(&j->m, j->cfg, 0, 7, j->layer, j->layer + 1, j->first, j->last, j->err);
    return NULL;
}

struct load_job {
    struct model *m;
    struct engine *e;
    int device, rc;
    double s;
    char err[ST_ERR_LEN];
};

static void *load_thread(void *arg)
{
    struct load_job *j = arg;
    struct engine_opts eo = {.n_slots = 1, .n_ctx = 256, .max_batch = 64, .max_logits = 1};
    eo.backend.kind = BACKEND_CUDA;
    eo.backend.device = j->device;
    const double t0 = time_s();
    j->rc = engine_init(&j->e, j->m, &eo, j->err);
    j->s = time_s() - t0;
    return NULL;
}

/* Each stage holds stage_layers copies of one generated layer (every copy uploaded to its own device memory):
 * generating 70B values on the host takes tens of minutes, generating two layers takes seconds, and the GPUs hold
 * and read exactly what a 70B model makes them hold and read. */
static int bench_split70b(const struct opts *o)
{
    char err[ST_ERR_LEN];
    struct model_config cfg;
    int rc = model_config_parse(&cfg, llama70b_config, strlen(llama70b_config), err);
    if (rc < 0) {
        fprintf(stderr, "cuda_bench: %s\n", err);
        return 1;
    }
    if (cuda_device_count() < 2) {
        fprintf(stderr, "cuda_bench: --split70b needs two GPUs (found %d)\n", cuda_device_count());
        return 1;
    }
    const int L = o->stage_layers > 0 ? o->stage_layers : cfg.n_layers / 2;
    cfg.n_layers = 2 * L;
    double t0 = time_s();
    struct gen_job g[2] = {{.cfg = &cfg, .layer = 0, .first = 1, .last = 0}, {.cfg = &cfg, .layer = 2 * L - 1, .first = 0, .last = 1}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, gen_thread, &g[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++)
        if (g[i].rc < 0) {
            fprintf(stderr, "cuda_bench: %s\n", g[i].err);
            return 1;
        }
    printf("split70b: Llama 70B shape, bf16, %d layers (2 x %d), generated %.1f s\n", cfg.n_layers, L, time_s() - t0);
    struct model st[2];
    for (int i = 0; i < 2; i++) {
        st[i] = g[i].m;
        st[i].layers = calloc((size_t)L, sizeof(struct layer_weights));
        for (int l = 0; l < L; l++) st[i].layers[l] = g[i].m.layers[0];
        st[i].layer_begin = i * L;
        st[i].layer_end = (i + 1) * L;
    }
    const double total = (double)model_bytes_per_token(&st[0]) + (double)model_bytes_per_token(&st[1]);
    size_t fr = 0, tot = 0;
    cuda_device_mem(0, &fr, &tot);
    printf("weights: %.1f GB in all (a GPU has %.1f GB): stage 0 = layers 0-%d + embedding on cuda:0, stage 1 = layers %d-%d + "
           "head on cuda:1\n",
           total / 1e9, tot / 1e9, L - 1, L, 2 * L - 1);
    struct load_job lj[2] = {{.m = &st[0], .device = 0}, {.m = &st[1], .device = 1}};
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, load_thread, &lj[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    int ret = 1;
    float *hidden = NULL, *logits = NULL;
    for (int i = 0; i < 2; i++)
        if (lj[i].rc < 0) {
            fprintf(stderr, "cuda_bench: stage %d: %s\n", i, lj[i].err);
            goto done;
        }
    for (int i = 0; i < 2; i++) {
        cuda_device_mem(i, &fr, &tot);
        printf("cuda:%d: loaded in %.1f s, %.1f of %.1f GB in use\n", i, lj[i].s, (tot - fr) / 1e9, tot / 1e9);
    }
    {
        const int n_prompt = 32, steps = o->b.gen > 0 ? o->b.gen : 16;
        hidden = malloc(sizeof(float) * (size_t)n_prompt * cfg.dim);
        logits = malloc(sizeof(float) * (size_t)cfg.vocab_size);
        int32_t tok[32], pos[32], slot[32] = {0};
        uint8_t want[32] = {0};
        for (int i = 0; i < n_prompt; i++) tok[i] = i == 0 ? 128000 : 1000 + i * 17, pos[i] = i;
        want[n_prompt - 1] = 1;
        struct batch b = {.n = n_prompt, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
        t0 = time_s();
        if ((rc = engine_forward(lj[0].e, &b, NULL, hidden, err)) < 0 || (rc = engine_forward(lj[1].e, &b, hidden, logits, err)) < 0) {
            fprintf(stderr, "cuda_bench: prefill: %s\n", err);
            goto done;
        }
        const double pre_s = time_s() - t0;
        double *t = malloc(sizeof(double) * (size_t)steps);
        int32_t ids[64];
        bool finite = true;
        for (int s = 0; s < steps; s++) {
            for (int i = 0; i < cfg.vocab_size; i++) finite &= isfinite(logits[i]) != 0;
            ids[s % 64] = sample_argmax(logits, cfg.vocab_size);
            int32_t p = n_prompt + s, sl = 0, tk = ids[s % 64];
            uint8_t w = 1;
            struct batch d = {.n = 1, .token = &tk, .pos = &p, .slot = &sl, .want_logits = &w};
            const double ts = time_s();
            if ((rc = engine_forward(lj[0].e, &d, NULL, hidden, err)) < 0 ||
                (rc = engine_forward(lj[1].e, &d, hidden, logits, err)) < 0) {
                fprintf(stderr, "cuda_bench: decode: %s\n", err);
                free(t);
                goto done;
            }
            t[s] = time_s() - ts;
        }
        const double step = median(t, steps);
        free(t);
        printf("prefill %d tokens: %.2f s (first call, includes graph capture); decode batch 1: %.1f tok/s (%.1f ms/token, "
               "%.0f GB/s over both GPUs)\n",
               n_prompt, pre_s, 1.0 / step, step * 1e3, total / step / 1e9);
        printf("greedy ids:");
        for (int s = 0; s < steps && s < 64; s++) printf(" %d", ids[s]);
        printf("\nlogits finite: %s\n", finite ? "yes" : "NO");
        printf("SUMMARY split70b_decode_tok_s=%.2f weights_gb=%.1f finite=%d\n", 1.0 / step, total / 1e9, finite ? 1 : 0);
        ret = finite ? 0 : 1;
    }
done:
    for (int i = 0; i < 2; i++) {
        engine_free(lj[i].e);
        free(st[i].layers);
        model_free(&g[i].m);
    }
    free(hidden);
    free(logits);
    return ret;
}

int main(int argc, char **argv)
{
    struct opts o = {.config = "configs/qwen3-1.7b.config.json", .bits = 8};
    cuda_bench_opts_default(&o.b);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEXT() (v ? (i++, v) : (fprintf(stderr, "%s needs a value\n", a), exit(2), v))
        if (!strcmp(a, "--config")) o.config = NEXT();
        else if (!strcmp(a, "--bits")) o.bits = atoi(NEXT());
        else if (!strcmp(a, "--device")) o.b.device = atoi(NEXT());
        else if (!strcmp(a, "--ctx")) o.b.ctx = atoi(NEXT());
        else if (!strcmp(a, "--prompt")) o.b.prompt = atoi(NEXT());
        else if (!strcmp(a, "--gen")) o.b.gen = atoi(NEXT());
        else if (!strcmp(a, "--prefill")) o.b.prefill = atoi(NEXT());
        else if (!strcmp(a, "--variants")) o.b.variants = 1;
        else if (!strcmp(a, "--profile")) o.b.profile = 1;
        else if (!strcmp(a, "--ncu")) o.ncu = 1;
        else if (!strcmp(a, "--split70b")) o.split70b = 1;
        else if (!strcmp(a, "--stage-layers")) o.stage_layers = atoi(NEXT());
        else if (!strcmp(a, "--batches")) {
            const char *s = NEXT();
            o.b.n_batches = 0;
            while (*s && o.b.n_batches < CUDA_BENCH_MAX_B) {
                o.b.batches[o.b.n_batches++] = atoi(s);
                s = strchr(s, ',');
                if (!s) break;
                s++;
            }
        } else {
            fprintf(stderr, "usage: cuda_bench [--config F] [--bits 0|4|8] [--device N] [--ctx N] [--prompt N] [--gen N] "
                            "[--prefill N] [--batches 1,8,32] [--variants] [--profile] | --ncu [--batches 1,32] | "
                            "--split70b [--stage-layers N] [--gen N]\n");
            return 2;
        }
    }
    log_set_level(LOG_WARN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (cuda_device_count() == 0) {
        fprintf(stderr, "cuda_bench: no CUDA device\n");
        return 1;
    }
    return o.split70b ? bench_split70b(&o) : bench_model(&o);
}

#else

int main(void)
{
    fprintf(stderr, "cuda_bench: built without CUDA\n");
    return 1;
}

#endif
