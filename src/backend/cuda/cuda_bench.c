/* cuda_bench: decode and prefill speed of one model on one GPU, against the measured device copy bandwidth.
 *
 * The decode roofline of a step is (bytes of weights + batch x bytes of KV each sequence reads) / copy bandwidth;
 * the copy bandwidth is measured here (1 GiB device-to-device, read + write, median of 21) in the same minute.
 * Figures: decode at each batch size (every slot prefilled with `prompt` tokens, then 4 warm-up steps that capture
 * the CUDA graphs and `gen` timed steps; the median of host wall-clock around engine_forward, which returns with
 * the logits of every sequence in host memory), the device span of the same steps, prefill of one sequence in
 * chunks of `prefill` and 128 tokens, optionally the variants (features switched off) and per-kernel profiles.
 * Every decode starts at position `prompt` in the slots prefilled once at the start, so all figures see the
 * same context lengths.
 * Plain C, compiled in every build: without CUDA, cuda_bench_run says so. Nothing is printed here. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_backend.h"
#include "core/core.h"
#include "engine/engine.h"

void cuda_bench_opts_default(struct cuda_bench_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->ctx = 1024;
    o->prompt = 128;
    o->gen = 64;
    o->prefill = 512;
    o->batches[0] = 1;
    o->batches[1] = 8;
    o->batches[2] = 32;
    o->n_batches = 3;
}

#ifdef STRATA_CUDA

#define WARM 4

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof(double), cmp_d);
    return v[n / 2];
}

/* slots [0, n_seq) each get `len` tokens at positions 0.. (one forward per slot) */
static int prefill_slots(struct engine *e, int n_seq, int len, int vocab, float *logits, char *err)
{
    int32_t *tok = malloc(sizeof(int32_t) * (size_t)len), *pos = malloc(sizeof(int32_t) * (size_t)len);
    int32_t *slot = malloc(sizeof(int32_t) * (size_t)len);
    uint8_t *want = calloc((size_t)len, 1);
    int rc = tok && pos && slot && want ? 0 : err_set(err, ST_ENOMEM, "out of memory");
    for (int s = 0; s < n_seq && rc >= 0; s++) {
        for (int i = 0; i < len; i++) {
            tok[i] = (int32_t)(((int64_t)i * 7919 + (int64_t)s * 104729 + 11) % vocab);
            pos[i] = i;
            slot[i] = s;
        }
        want[len - 1] = 1;
        struct batch b = {.n = len, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
        rc = engine_forward(e, &b, NULL, logits, err);
    }
    free(tok);
    free(pos);
    free(slot);
    free(want);
    return rc < 0 ? rc : 0;
}

/* Decode steps of B sequences (slots 0..B-1) at positions start, start + 1, ...: the median host seconds per
 * step over `steps` steps after `warm` (and, when span_s is given, the median device span, profile mode 2). */
static int decode_steps(struct engine *e, int B, int start, int warm, int steps, int vocab, float *logits,
                        double *step_s, double *span_s, char *err)
{
    int32_t tok[256], pos[256], slot[256];
    uint8_t want[256];
    struct backend *be = engine_backend(e);
    double *t = malloc(sizeof(double) * (size_t)(steps > 0 ? steps : 1));
    double *sp = malloc(sizeof(double) * (size_t)(steps > 0 ? steps : 1));
    int rc = t && sp ? 0 : err_set(err, ST_ENOMEM, "out of memory");
    if (B > 256) rc = err_set(err, ST_EINVAL, "batch %d (at most 256)", B);
    for (int it = 0; it < warm + steps && rc >= 0; it++) {
        for (int i = 0; i < B; i++) {
            tok[i] = (int32_t)(((int64_t)it * 31 + (int64_t)i * 977 + 5) % vocab);
            pos[i] = start + it;
            slot[i] = i;
            want[i] = 1;
        }
        struct batch b = {.n = B, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
        const bool span = span_s && it >= warm;
        if (span) cuda_backend_profile(be, 2);
        const double t0 = time_s();
        rc = engine_forward(e, &b, NULL, logits, err);
        const double dt = time_s() - t0;
        if (span) {
            struct cuda_prof_row row;
            sp[it - warm] = cuda_backend_profile_rows(be, &row, 1) == 1 ? row.ms * 1e-3 : 0;
            cuda_backend_profile(be, 0);
        }
        if (it >= warm) t[it - warm] = dt;
    }
    if (rc >= 0) {
        *step_s = median(t, steps);
        if (span_s) *span_s = median(sp, steps);
    }
    free(t);
    free(sp);
    return rc < 0 ? rc : 0;
}

/* A per-kernel profile of `steps` decode steps of batch B with the given flags. */
static int profile_steps(struct engine *e, const char *what, unsigned flags, int B, int start, int steps, int vocab,
                         float *logits, struct cuda_bench_profile *p, char *err)
{
    struct backend *be = engine_backend(e);
    const unsigned saved = cuda_backend_get_flags(be);
    double step = 0;
    cuda_backend_set_flags(be, flags);
    /* a warm-up step without events, then the profiled ones */
    int rc = decode_steps(e, B, start, 0, 1, vocab, logits, &step, NULL, err);
    if (rc >= 0) {
        cuda_backend_profile(be, 1);
        rc = decode_steps(e, B, start, 0, steps, vocab, logits, &step, NULL, err);
        struct cuda_prof_row all[256];
        const int n = rc >= 0 ? cuda_backend_profile_rows(be, all, 256) : 0;
        cuda_backend_profile(be, 0);
        memset(p, 0, sizeof(*p));
        snprintf(p->what, sizeof(p->what), "%s", what);
        p->batch = B;
        p->steps = steps;
        for (int i = 0; i < n; i++) p->total_ms += all[i].ms;
        p->n_rows = n < CUDA_BENCH_PROF_ROWS ? n : CUDA_BENCH_PROF_ROWS;
        memcpy(p->rows, all, sizeof(all[0]) * (size_t)p->n_rows);
    }
    cuda_backend_set_flags(be, saved);
    return rc;
}

int cuda_bench_run(struct model *m, const struct cuda_bench_opts *o, struct cuda_bench_result *r, char *err)
{
    const struct model_config *c = &m->cfg;
    memset(r, 0, sizeof(*r));
    if (!m->has_embed || !m->has_head) return err_set(err, ST_EINVAL, "cuda bench: the model must hold the embedding and the head");
    if (o->n_batches < 1 || o->n_batches > CUDA_BENCH_MAX_B) return err_set(err, ST_EINVAL, "cuda bench: 1..%d batch sizes", CUDA_BENCH_MAX_B);
    int max_b = 1;
    for (int i = 0; i < o->n_batches; i++) {
        if (o->batches[i] < 1 || o->batches[i] > 256) return err_set(err, ST_EINVAL, "cuda bench: batch %d (1..256)", o->batches[i]);
        max_b = ST_MAX(max_b, o->batches[i]);
    }
    if (o->prompt < 1 || o->gen < 1 || o->prompt + WARM + o->gen > o->ctx)
        return err_set(err, ST_EINVAL, "cuda bench: prompt %d + %d + gen %d must fit the context %d", o->prompt, WARM, o->gen, o->ctx);
    int rc;
    if ((rc = cuda_copy_bandwidth(o->device, (size_t)1 << 30, 21, &r->copy_bw, err)) < 0) return rc;
    struct engine *e = NULL;
    struct engine_opts eo = {.n_slots = max_b, .n_ctx = o->ctx, .max_batch = ST_MAX(ST_MAX(o->prefill, 128), ST_MAX(max_b, o->prompt)),
                             .max_logits = max_b};
    eo.backend.kind = BACKEND_CUDA;
    eo.backend.device = o->device;
    double t0 = time_s();
    if ((rc = engine_init(&e, m, &eo, err)) < 0) return rc;
    r->load_s = time_s() - t0;
    struct backend *be = engine_backend(e);
    snprintf(r->device, sizeof(r->device), "%s", be->device_name);
    r->weight_bytes = model_bytes_per_token(m);
    const int kv_dim = c->n_kv_heads * c->head_dim, vocab = c->vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)max_b * (size_t)vocab);
    if (!logits) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto done;
    }
    /* every slot once; all decodes start at `prompt` */
    if ((rc = prefill_slots(e, max_b, o->prompt, vocab, logits, err)) < 0) goto done;
    r->n_batches = o->n_batches;
    for (int bi = 0; bi < o->n_batches; bi++) {
        const int B = o->batches[bi];
        r->batches[bi] = B;
        if ((rc = decode_steps(e, B, o->prompt, WARM, o->gen, vocab, logits, &r->step_s[bi], &r->span_s[bi], err)) < 0) goto done;
        r->kv_bytes[bi] = 2.0 * sizeof(float) * kv_dim * c->n_layers * (o->prompt + WARM + o->gen / 2.0);
        r->tok_s[bi] = B / r->step_s[bi];
        r->frac[bi] = ((double)r->weight_bytes + B * r->kv_bytes[bi]) / r->step_s[bi] / r->copy_bw;
    }
    /* prefill of one sequence (slot 0), chunks of `prefill` and of 128 tokens */
    r->prefill_len[0] = o->prefill;
    r->prefill_len[1] = 128;
    for (int ci = 0; ci < 2; ci++) {
        const int len = r->prefill_len[ci];
        if (len < 1 || len > o->ctx || len > eo.max_batch || (ci == 1 && len == o->prefill)) continue;
        double t[5];
        for (int k = 0; k < 6 && rc >= 0; k++) {
            const double ts = time_s();
            rc = prefill_slots(e, 1, len, vocab, logits, err);
            if (k > 0) t[k - 1] = time_s() - ts;
        }
        if (rc < 0) goto done;
        r->prefill_tok_s[ci] = len / median(t, 5);
    }
    /* slot 0 again as the decodes expect it */
    if ((rc = prefill_slots(e, 1, o->prompt, vocab, logits, err)) < 0) goto done;
    if (o->variants) {
        const unsigned flags0 = cuda_backend_get_flags(be);
        static const struct {
            const char *name;
            unsigned flags;
            int bps, tb;
        } vs[] = {
            {"default (v1 matmul, ATTNV2, DLPIPE)", CUDA_FLAG_DEFAULT, -1, 0},
            {"v1 kernels (no MMV2, ATTNV2, DLPIPE)", CUDA_FLAG_GRAPHS | CUDA_FLAG_FUSE | CUDA_FLAG_PDL, -1, 0},
            {"all (MMV2 with TMA)", CUDA_FLAG_ALL, -1, 0},
            {"MMV2 register ring (no MMTMA)", CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_MMTMA, -1, 0},
            {"default, no ATTNV2", CUDA_FLAG_DEFAULT & ~(unsigned)CUDA_FLAG_ATTNV2, -1, 0},
            {"default, no DLPIPE", CUDA_FLAG_DEFAULT & ~(unsigned)CUDA_FLAG_DLPIPE, -1, 0},
            {"MMV2 1 block/SM", CUDA_FLAG_ALL, 1, 0},
            {"MMV2 2 blocks/SM", CUDA_FLAG_ALL, 2, 0},
            {"MMV2 3 blocks/SM", CUDA_FLAG_ALL, 3, 0},
            {"MMV2 uncapped grid", CUDA_FLAG_ALL, 0, 0},
            {"MMV2 2 tiles/group", CUDA_FLAG_ALL, -1, 2},
            {"MMV2 4 tiles/group", CUDA_FLAG_ALL, -1, 4},
            {"default, no PDL", CUDA_FLAG_DEFAULT & ~(unsigned)CUDA_FLAG_PDL, -1, 0},
            {"default, no graphs", CUDA_FLAG_DEFAULT & ~(unsigned)CUDA_FLAG_GRAPHS, -1, 0},
            {"default, no fusion", CUDA_FLAG_DEFAULT & ~(unsigned)CUDA_FLAG_FUSE, -1, 0},
            {"plain (no features)", 0, -1, 0},
        };
        const int bl[2] = {1, max_b};
        for (size_t v = 0; v < ST_ARRAY_LEN(vs) && v < CUDA_BENCH_MAX_VAR; v++) {
            struct cuda_bench_variant *cv = &r->var[r->n_variants++];
            snprintf(cv->name, sizeof(cv->name), "%s", vs[v].name);
            cv->flags = vs[v].flags;
            cv->mm_bps = vs[v].bps;
            cv->mm_tb = vs[v].tb;
            cuda_backend_set_flags(be, vs[v].flags);
            cuda_backend_set_mm_schedule(be, vs[v].bps, 0, vs[v].tb);
            for (int k = 0; k < 2; k++)
                if ((rc = decode_steps(e, bl[k], o->prompt, WARM, o->gen, vocab, logits, &cv->step_s[k], NULL, err)) < 0)
                    goto done;
        }
        cuda_backend_set_flags(be, flags0);
        cuda_backend_set_mm_schedule(be, -1, 0, 0);
    }
    if (o->profile) {
        const int bl[2] = {1, max_b};
        const unsigned fl[2] = {cuda_backend_get_flags(be), CUDA_FLAG_ALL};
        static const char *what[2] = {"configured kernels", "all flags (MMV2 with TMA)"};
        for (int f = 0; f < 2; f++)
            for (int k = 0; k < 2 && r->n_profiles < 4; k++) {
                if (k == 1 && max_b == 1) continue;
                if ((rc = profile_steps(e, what[f], fl[f], bl[k], o->prompt, 8, vocab, logits, &r->prof[r->n_profiles], err)) < 0)
                    goto done;
                r->n_profiles++;
            }
    }
done:
    free(logits);
    engine_free(e);
    return rc < 0 ? rc : 0;
}

#else

int cuda_bench_run(struct model *m, const struct cuda_bench_opts *o, struct cuda_bench_result *r, char *err)
{
    (void)m;
    (void)o;
    memset(r, 0, sizeof(*r));
    return err_set(err, ST_EUNSUPPORTED, "strata was built without CUDA (nvcc not found, or CUDA=0)");
}

#endif

#define OUT(...)                                                                                                     \
    do {                                                                                                             \
        if (used < n) {                                                                                              \
            const int w_ = snprintf(buf + used, n - used, __VA_ARGS__);                                              \
            used += w_ > 0 ? (size_t)w_ : 0;                                                                         \
        }                                                                                                            \
    } while (0)

void cuda_bench_format(const struct cuda_bench_result *r, char *buf, size_t n)
{
    size_t used = 0;
    if (n == 0) return;
    buf[0] = 0;
    OUT("device: %s\n", r->device);
    OUT("copy bandwidth (device to device, read + write): %.0f GB/s; weights read per step: %.3f GB; engine load %.1f s\n",
        r->copy_bw / 1e9, r->weight_bytes / 1e9, r->load_s);
    OUT("\n| figure | tok/s | ms/step | device ms/step | weights + KV per step | GB/s | of copy bandwidth |\n");
    OUT("|---|---|---|---|---|---|---|\n");
    double b1 = 0;
    for (int i = 0; i < r->n_batches; i++) {
        const int B = r->batches[i];
        const double bytes = (double)r->weight_bytes + B * r->kv_bytes[i];
        if (B == 1) b1 = r->tok_s[i];
        OUT("| decode batch %d | %.0f | %.3f | %.3f | %.3f GB + %d x %.1f MB | %.0f | %.1f%% |\n", B, r->tok_s[i],
            r->step_s[i] * 1e3, r->span_s[i] * 1e3, r->weight_bytes / 1e9, B, r->kv_bytes[i] / 1e6,
            bytes / r->step_s[i] / 1e9, 100.0 * r->frac[i]);
    }
    for (int i = 0; i < 2; i++)
        if (r->prefill_tok_s[i] > 0)
            OUT("| prefill, chunks of %d | %.0f | %.2f per chunk | | | | |\n", r->prefill_len[i], r->prefill_tok_s[i],
                1e3 * r->prefill_len[i] / r->prefill_tok_s[i]);
    if (r->n_variants) {
        int bmax = 1;
        for (int i = 0; i < r->n_batches; i++) bmax = r->batches[i] > bmax ? r->batches[i] : bmax;
        OUT("\n| variant | flags | b1 ms/step | b1 tok/s | b%d ms/step | b%d tok/s |\n|---|---|---|---|---|---|\n", bmax, bmax);
        for (int v = 0; v < r->n_variants; v++) {
            const struct cuda_bench_variant *cv = &r->var[v];
            OUT("| %s | %u bps %d tb %d | %.3f | %.0f | %.3f | %.0f |\n", cv->name, cv->flags, cv->mm_bps, cv->mm_tb, cv->step_s[0] * 1e3,
                1.0 / cv->step_s[0], cv->step_s[1] * 1e3, bmax / cv->step_s[1]);
        }
    }
    for (int p = 0; p < r->n_profiles; p++) {
        const struct cuda_bench_profile *pr = &r->prof[p];
        OUT("\nprofile: %s, decode batch %d, per step (eager, no PDL, events around every kernel): %.3f ms in kernels\n",
            pr->what, pr->batch, pr->total_ms / pr->steps);
        OUT("| kernel | us/step | launches/step | us/launch | share |\n|---|---|---|---|---|\n");
        for (int i = 0; i < pr->n_rows; i++)
            OUT("| %s | %.1f | %.1f | %.2f | %.1f%% |\n", pr->rows[i].name, 1e3 * pr->rows[i].ms / pr->steps,
                pr->rows[i].count / pr->steps, pr->rows[i].count ? 1e3 * pr->rows[i].ms / pr->rows[i].count : 0.0,
                100.0 * pr->rows[i].ms / pr->total_ms);
    }
    OUT("\n");
    for (int i = 0; i < r->n_batches; i++) OUT("SUMMARY decode_b%d_tok_s=%.0f\n", r->batches[i], r->tok_s[i]);
    for (int i = 0; i < r->n_batches; i++)
        if (r->batches[i] == 1)
            OUT("SUMMARY decode_b1_fraction_of_copy_bw=%.3f (weights+KV %.3f GB/step, copy %.0f GB/s)\n", r->frac[i],
                (r->weight_bytes + r->kv_bytes[i]) / 1e9, r->copy_bw / 1e9);
    for (int i = 0; i < r->n_batches; i++)
        if (r->batches[i] > 1 && b1 > 0) OUT("SUMMARY decode_b%d_over_b1=%.1fx\n", r->batches[i], r->tok_s[i] / b1);
    if (r->prefill_tok_s[0] > 0) OUT("SUMMARY prefill_%d_tok_s=%.0f\n", r->prefill_len[0], r->prefill_tok_s[0]);
}
