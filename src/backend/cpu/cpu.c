/* cpu backend: the ops interface on host memory, work split across a persistent thread pool by rows. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_kernels.h"
#include "core/core.h"

struct cpu_backend {
    struct backend base;
    struct threadpool *pool;
    const struct cpu_kernels *k;
    float *scratch;          /* [n_threads][scratch_floats] */
    size_t scratch_floats;
};

static struct cpu_backend *cpu(struct backend *b) { return (struct cpu_backend *)b; }

static void cpu_free(struct backend *b)
{
    struct cpu_backend *c = cpu(b);
    threadpool_free(c->pool);
    st_free(c->scratch);
    free(c);
}

static void *cpu_alloc(struct backend *b, size_t bytes) { return st_alloc(bytes); }
static void cpu_dealloc(struct backend *b, void *p) { st_free(p); }

static int cpu_copy(struct backend *b, void *dst, const void *src, size_t bytes)
{
    memcpy(dst, src, bytes);
    return ST_OK;
}

static int cpu_sync(struct backend *b) { return ST_OK; }

static int cpu_weight_prepare(struct backend *b, struct weight *w, char *err)
{
    struct cpu_backend *c = cpu(b);
    size_t need = (size_t)w->cols + 64;
    if (need > c->scratch_floats) {
        /* called at load time only: grow the per-thread scratch to the widest matrix */
        float *s = st_alloc(sizeof(float) * need * (size_t)b->n_threads);
        if (!s) return err_set(err, ST_ENOMEM, "cpu: cannot allocate scratch");
        st_free(c->scratch);
        c->scratch = s;
        c->scratch_floats = need;
    }
    return ST_OK;
}

static void cpu_weight_release(struct backend *b, struct weight *w) {}

/* Grows per-thread scratch (attention scores need n_ctx floats). Load time only. */
static int cpu_reserve(struct backend *b, size_t floats_per_thread, char *err)
{
    struct weight w = {.cols = (int64_t)floats_per_thread};
    return cpu_weight_prepare(b, &w, err);
}

static void cpu_embed(struct backend *b, float *out, const struct weight *emb, const int32_t *tokens, int n)
{
    for (int i = 0; i < n; i++) weight_row_f32(emb, tokens[i], out + (size_t)i * (size_t)emb->cols);
}

struct rms_task {
    const struct cpu_kernels *k;
    float *out;
    const float *x, *w;
    int n_rows, dim;
    float eps;
};

static void rms_worker(void *arg, int ith, int nth)
{
    struct rms_task *t = arg;
    int64_t r0, r1;
    split_range(t->n_rows, ith, nth, 1, &r0, &r1);
    for (int64_t r = r0; r < r1; r++)
        t->k->rmsnorm_row(t->out + r * t->dim, t->x + r * t->dim, t->w, t->dim, t->eps);
}

static void cpu_rmsnorm(struct backend *b, float *out, const float *x, const float *w, int n_rows, int dim, float eps)
{
    struct cpu_backend *c = cpu(b);
    struct rms_task t = {c->k, out, x, w, n_rows, dim, eps};
    if ((int64_t)n_rows * dim < 65536) rms_worker(&t, 0, 1);
    else threadpool_run(c->pool, rms_worker, &t);
}

struct matmul_task {
    struct cpu_backend *c;
    float *y;
    const struct weight *w;
    const float *x;
    int n;
    const float *bias;
};

static void matmul_worker(void *arg, int ith, int nth)
{
    struct matmul_task *t = arg;
    int64_t r0, r1;
    split_range(t->w->rows, ith, nth, 16, &r0, &r1);
    if (r0 >= r1) return;
    float *scratch = t->c->scratch + (size_t)ith * t->c->scratch_floats;
    t->c->k->matmul_rows(t->y, t->w->rows, t->w, t->x, t->w->cols, t->n, r0, r1, scratch);
    if (t->bias)
        for (int i = 0; i < t->n; i++)
            for (int64_t r = r0; r < r1; r++) t->y[(int64_t)i * t->w->rows + r] += t->bias[r];
}

static void cpu_matmul(struct backend *b, float *y, const struct weight *w, const float *x, int n, const float *bias)
{
    struct cpu_backend *c = cpu(b);
    ST_ASSERT((size_t)w->cols + 64 <= c->scratch_floats);
    struct matmul_task t = {c, y, w, x, n, bias};
    threadpool_run(c->pool, matmul_worker, &t);
}

static void cpu_rope(struct backend *b, float *x, int n, int n_heads, int head_dim, const float *cs)
{
    int half = head_dim / 2;
    for (int i = 0; i < n; i++) {
        const float *csi = cs + (size_t)i * half * 2;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)i * n_heads + h) * head_dim;
            for (int j = 0; j < half; j++) {
                float c0 = csi[2 * j], s0 = csi[2 * j + 1];
                float a = v[j], bb = v[j + half];
                v[j] = a * c0 - bb * s0;
                v[j + half] = bb * c0 + a * s0;
            }
        }
    }
}

static void cpu_kv_store(struct backend *b, float *k_cache, float *v_cache, const float *k, const float *v,
                         const struct backend_batch *bb, int kv_dim, int n_ctx)
{
    for (int i = 0; i < bb->n; i++) {
        size_t off = ((size_t)bb->slot[i] * (size_t)n_ctx + (size_t)bb->pos[i]) * (size_t)kv_dim;
        memcpy(k_cache + off, k + (size_t)i * kv_dim, sizeof(float) * (size_t)kv_dim);
        memcpy(v_cache + off, v + (size_t)i * kv_dim, sizeof(float) * (size_t)kv_dim);
    }
}

struct attn_task {
    struct cpu_backend *c;
    float *out;
    const float *q, *k_cache, *v_cache;
    const struct backend_batch *bb;
    int n_heads, n_kv_heads, head_dim, n_ctx;
    float scale;
};

static void attn_worker(void *arg, int ith, int nth)
{
    struct attn_task *t = arg;
    const struct cpu_kernels *k = t->c->k;
    int64_t w0, w1;
    split_range((int64_t)t->bb->n * t->n_heads, ith, nth, 1, &w0, &w1);
    float *scores = t->c->scratch + (size_t)ith * t->c->scratch_floats;
    int hd = t->head_dim, kv_dim = t->n_kv_heads * hd, group = t->n_heads / t->n_kv_heads;
    for (int64_t wi = w0; wi < w1; wi++) {
        int i = (int)(wi / t->n_heads), h = (int)(wi % t->n_heads), kvh = h / group;
        int n_pos = t->bb->pos[i] + 1;
        const float *qi = t->q + ((size_t)i * t->n_heads + h) * hd;
        size_t base = (size_t)t->bb->slot[i] * (size_t)t->n_ctx * (size_t)kv_dim + (size_t)kvh * hd;
        float mx = -INFINITY;
        for (int p = 0; p < n_pos; p++) {
            float s = k->dot(qi, t->k_cache + base + (size_t)p * kv_dim, hd) * t->scale;
            scores[p] = s;
            if (s > mx) mx = s;
        }
        float sum = 0.0f;
        for (int p = 0; p < n_pos; p++) {
            scores[p] = expf(scores[p] - mx);
            sum += scores[p];
        }
        float inv = 1.0f / sum;
        float *oi = t->out + ((size_t)i * t->n_heads + h) * hd;
        memset(oi, 0, sizeof(float) * (size_t)hd);
        for (int p = 0; p < n_pos; p++) k->axpy(oi, scores[p] * inv, t->v_cache + base + (size_t)p * kv_dim, hd);
    }
}

static void cpu_attention(struct backend *b, float *out, const float *q, const float *k_cache, const float *v_cache,
                          const struct backend_batch *bb, int n_heads, int n_kv_heads, int head_dim, int n_ctx,
                          float scale)
{
    struct cpu_backend *c = cpu(b);
    ST_ASSERT((size_t)n_ctx <= c->scratch_floats);
    struct attn_task t = {c, out, q, k_cache, v_cache, bb, n_heads, n_kv_heads, head_dim, n_ctx, scale};
    threadpool_run(c->pool, attn_worker, &t);
}

struct ew_task {
    const struct cpu_kernels *k;
    float *out;
    const float *a, *b;
    int64_t n;
    int op; /* 0 silu_mul, 1 add */
};

static void ew_worker(void *arg, int ith, int nth)
{
    struct ew_task *t = arg;
    int64_t i0, i1;
    split_range(t->n, ith, nth, 64, &i0, &i1);
    if (i0 >= i1) return;
    if (t->op == 0) {
        t->k->silu_mul(t->out + i0, t->a + i0, t->b + i0, i1 - i0);
    } else {
        float *x = t->out;
        for (int64_t i = i0; i < i1; i++) x[i] += t->b[i];
    }
}

static void cpu_silu_mul(struct backend *b, float *out, const float *gate, const float *up, int64_t n)
{
    struct cpu_backend *c = cpu(b);
    struct ew_task t = {c->k, out, gate, up, n, 0};
    if (n < 16384) ew_worker(&t, 0, 1);
    else threadpool_run(c->pool, ew_worker, &t);
}

static void cpu_add(struct backend *b, float *x, const float *y, int64_t n)
{
    struct cpu_backend *c = cpu(b);
    struct ew_task t = {c->k, x, x, y, n, 1};
    if (n < 65536) ew_worker(&t, 0, 1);
    else threadpool_run(c->pool, ew_worker, &t);
}

static void cpu_gather_rows(struct backend *b, float *dst, const float *src, const int32_t *idx, int n, int dim)
{
    for (int i = 0; i < n; i++)
        memmove(dst + (size_t)i * dim, src + (size_t)idx[i] * dim, sizeof(float) * (size_t)dim);
}

static const struct backend_ops cpu_ops = {
    .name = "cpu",
    .free = cpu_free,
    .alloc = cpu_alloc,
    .dealloc = cpu_dealloc,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .weight_prepare = cpu_weight_prepare,
    .weight_release = cpu_weight_release,
    .reserve = cpu_reserve,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
    .silu_mul = cpu_silu_mul,
    .add = cpu_add,
    .gather_rows = cpu_gather_rows,
};

const char *cpu_kernel_name(void)
{
    const struct cpu_kernels *k = cpu_kernels_simd();
    return k ? k->name : cpu_kernels_ref.name;
}

int cpu_backend_init(struct backend **out, const struct backend_opts *o, char *err)
{
    *out = NULL;
    struct cpu_backend *c = calloc(1, sizeof(*c));
    if (!c) return err_set(err, ST_ENOMEM, "cpu: out of memory");
    int nt = o->n_threads > 0 ? o->n_threads : cpu_count();
    int rc = threadpool_init(&c->pool, nt, err);
    if (rc < 0) {
        free(c);
        return rc;
    }
    c->base.ops = &cpu_ops;
    c->base.kind = BACKEND_CPU;
    c->base.n_threads = nt;
    c->k = o->reference ? &cpu_kernels_ref : (cpu_kernels_simd() ? cpu_kernels_simd() : &cpu_kernels_ref);
    snprintf(c->base.device_name, sizeof(c->base.device_name), "cpu (%d threads, %s kernels)", nt, c->k->name);
    *out = &c->base;
    return ST_OK;
}
