/* CUDA backend tests (make test-cuda; exit 77 when built without CUDA or when no GPU is present).
 *   - every op against the CPU scalar reference on odd shapes and fresh seeded random data (matmul: Q8/Q4 with
 *     group 32/64/128 and bf16/f16/f32 scales, bf16, f16, f32 weights; batch sizes across the kernel's tiles);
 *   - a row's matmul result is bit-identical whatever batch it is computed in;
 *   - fusion, graphs, programmatic launch and the v2 kernels (streaming matmul under several grid caps, register
 *     q/k, cp.async attention) change no bit (op level and whole forwards);
 *   - the pipelined download, the profiler and the benchmark API;
 *   - the golden tests of tests/test_engine_golden.c and the shape fixtures of tests/test_shapes.c on the GPU;
 *   - a model split over two pipeline stages (two GPUs when present, else two stages on one) gives exactly the
 *     single-GPU tokens and logprobs.
 * Tolerances: ops that the GPU rounds like the CPU (embed, rope, KV store, add, gather) are compared exactly;
 * rmsnorm and silu within a few ulp (sqrt/exp); the matmul within 4e-5 of sum_k |w_k x_k| (x enters the tensor
 * cores as bf16 hi + lo, a relative error near 2^-17 per product); attention within 2e-5; the goldens keep
 * test_engine_golden's 1e-3 on logprobs.
 * STRATA_TEST_QUICK=1 runs a reduced set (for compute-sanitizer). */
#include <jansson.h>
#include <pthread.h>

#include "check.h"
#include "backend/backend.h"
#include "cluster/cluster.h"
#include "core/core.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "model/model.h"
#include "sample/sample.h"
#include "server/sched.h"
#ifdef STRATA_CUDA
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#endif

#ifdef STRATA_CUDA

#define LOGPROB_TOL 1e-3
#define V1_FLAGS (CUDA_FLAG_GRAPHS | CUDA_FLAG_FUSE | CUDA_FLAG_PDL)
#define MARGIN_MIN 0.02

static struct backend *g_cpu, *g_gpu;
static struct rng g_rng;
static bool g_quick;
static int g_n_gpus;

static float *rand_f(int64_t n, float lo, float hi)
{
    float *p = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) p[i] = rng_range(&g_rng, lo, hi);
    return p;
}

static void *to_dev(const void *h, size_t bytes)
{
    void *d = g_gpu->ops->alloc(g_gpu, bytes);
    if (d && h) g_gpu->ops->upload(g_gpu, d, h, bytes);
    return d;
}

static int from_dev(void *h, const void *d, size_t bytes) { return g_gpu->ops->download(g_gpu, h, d, bytes); }

/* ---- generated weights ---- */
struct hweight {
    struct weight w;
    void *data, *scales, *biases;
};

static void hw_make(struct hweight *h, enum wtype t, int64_t rows, int64_t cols, int gs, enum dtype sdt)
{
    memset(h, 0, sizeof(*h));
    struct weight *w = &h->w;
    w->type = t;
    w->rows = rows;
    w->cols = cols;
    w->name = "test";
    const float amp = 1.0f / sqrtf((float)cols);
    const int64_t n = rows * cols;
    if (t == WT_Q8 || t == WT_Q4) {
        const int bits = t == WT_Q8 ? 8 : 4;
        const int64_t words = n * bits / 32, ng = rows * (cols / gs);
        uint32_t *q = malloc(sizeof(uint32_t) * (size_t)words);
        for (int64_t i = 0; i < words; i++) q[i] = (uint32_t)rng_next(&g_rng);
        const size_t ss = dtype_size(sdt);
        uint8_t *s = malloc(ss * (size_t)ng), *b = malloc(ss * (size_t)ng);
        for (int64_t i = 0; i < ng; i++) {
            float sv = 2.0f * amp / (float)((1 << bits) - 1) * rng_range(&g_rng, 0.75f, 1.25f);
            float bv = -amp * rng_range(&g_rng, 0.9f, 1.1f);
            if (sdt == DT_BF16) {
                ((uint16_t *)s)[i] = f32_to_bf16(sv);
                ((uint16_t *)b)[i] = f32_to_bf16(bv);
            } else if (sdt == DT_F16) {
                ((uint16_t *)s)[i] = f32_to_f16(sv);
                ((uint16_t *)b)[i] = f32_to_f16(bv);
            } else {
                ((float *)s)[i] = sv;
                ((float *)b)[i] = bv;
            }
        }
        w->group_size = gs;
        w->sdtype = sdt;
        h->data = q;
        h->scales = s;
        h->biases = b;
    } else if (t == WT_F32) {
        h->data = rand_f(n, -amp, amp);
    } else {
        uint16_t *p = malloc(sizeof(uint16_t) * (size_t)n);
        for (int64_t i = 0; i < n; i++) {
            float v = rng_range(&g_rng, -amp, amp);
            p[i] = t == WT_BF16 ? f32_to_bf16(v) : f32_to_f16(v);
        }
        h->data = p;
    }
    w->data = h->data;
    w->scales = h->scales;
    w->biases = h->biases;
}

static void hw_free(struct hweight *h)
{
    free(h->data);
    free(h->scales);
    free(h->biases);
}

static const char *wt_desc(const struct weight *w, char *buf, size_t n)
{
    if (w->type == WT_Q8 || w->type == WT_Q4)
        snprintf(buf, n, "%s g%d %s %lldx%lld", wtype_name(w->type), w->group_size, dtype_name(w->sdtype),
                 (long long)w->rows, (long long)w->cols);
    else
        snprintf(buf, n, "%s %lldx%lld", wtype_name(w->type), (long long)w->rows, (long long)w->cols);
    return buf;
}

struct mm_case {
    enum wtype t;
    int rows, cols, gs;
    enum dtype sdt;
};

static const struct mm_case mm_cases[] = {
    {WT_Q8, 37, 64, 32, DT_BF16},    {WT_Q8, 16, 128, 64, DT_BF16},   {WT_Q8, 200, 256, 128, DT_BF16},
    {WT_Q8, 33, 2048, 64, DT_BF16},  {WT_Q8, 300, 320, 64, DT_F16},   {WT_Q8, 21, 192, 32, DT_F32},
    {WT_Q4, 37, 96, 32, DT_BF16},    {WT_Q4, 50, 192, 64, DT_BF16},   {WT_Q4, 17, 384, 128, DT_BF16},
    {WT_Q4, 64, 2048, 64, DT_BF16},  {WT_Q4, 40, 160, 32, DT_F16},    {WT_Q4, 9, 256, 128, DT_F32},
    {WT_BF16, 37, 48, 0, DT_BF16},   {WT_BF16, 129, 2048, 0, DT_BF16}, {WT_BF16, 5, 16, 0, DT_BF16},
    {WT_BF16, 7, 172, 0, DT_BF16},   {WT_F16, 19, 100, 0, DT_BF16},   {WT_F32, 23, 172, 0, DT_BF16},
    {WT_BF16, 129, 256, 0, DT_BF16}, {WT_BF16, 64, 2048, 0, DT_BF16}, {WT_BF16, 80, 1024, 0, DT_BF16},
    {WT_Q8, 1000, 6144, 64, DT_BF16},
};

static void test_matmul_parity(void)
{
    char err[ST_ERR_LEN], desc[96];
    static const int ns[] = {1, 5, 8, 9, 17, 33, 70};
    double worst_all = 0;
    for (size_t ci = 0; ci < ST_ARRAY_LEN(mm_cases); ci++) {
        const struct mm_case *mc = &mm_cases[ci];
        if (g_quick && mc->rows * mc->cols > 100000) continue;
        struct hweight h;
        hw_make(&h, mc->t, mc->rows, mc->cols, mc->gs, mc->sdt);
        wt_desc(&h.w, desc, sizeof(desc));
        struct weight wg = h.w;
        REQUIRE_MSG(g_cpu->ops->weight_prepare(g_cpu, &h.w, err) == 0, "%s", err);
        int rc = g_gpu->ops->weight_prepare(g_gpu, &wg, err);
        CHECK_MSG(rc == 0, "%s: %s", desc, err);
        if (rc < 0) {
            hw_free(&h);
            continue;
        }
        /* |w| per element, for the error bound */
        float *wrow = malloc(sizeof(float) * (size_t)mc->cols);
        float *wabs = malloc(sizeof(float) * (size_t)mc->rows * mc->cols);
        for (int r = 0; r < mc->rows; r++) {
            weight_row_f32(&h.w, r, wrow);
            for (int c = 0; c < mc->cols; c++) wabs[(size_t)r * mc->cols + c] = fabsf(wrow[c]);
        }
        for (size_t ni = 0; ni < ST_ARRAY_LEN(ns); ni++) {
            const int n = ns[ni];
            if (g_quick && n > 17) continue;
            const bool with_bias = (ni + ci) % 3 == 0;
            float *x = rand_f((int64_t)n * mc->cols, -2.0f, 2.0f);
            float *bias = with_bias ? rand_f(mc->rows, -1.0f, 1.0f) : NULL;
            float *y_ref = malloc(sizeof(float) * (size_t)n * mc->rows);
            float *y_gpu = malloc(sizeof(float) * (size_t)n * mc->rows);
            g_cpu->ops->matmul(g_cpu, y_ref, &h.w, x, n, bias);
            float *dx = to_dev(x, sizeof(float) * (size_t)n * mc->cols);
            float *dy = to_dev(NULL, sizeof(float) * (size_t)n * mc->rows);
            float *db = bias ? to_dev(bias, sizeof(float) * (size_t)mc->rows) : NULL;
            for (int i = 0; i < n * mc->rows; i++) y_gpu[i] = NAN;
            from_dev(y_gpu, dy, 0);
            g_gpu->ops->upload(g_gpu, dy, y_gpu, sizeof(float) * (size_t)n * mc->rows); /* poison */
            g_gpu->ops->matmul(g_gpu, dy, &wg, dx, n, db);
            rc = from_dev(y_gpu, dy, sizeof(float) * (size_t)n * mc->rows);
            CHECK_MSG(rc == 0, "%s n=%d: download failed", desc, n);
            /* against the exact product of the dequantized weights (double), and the CPU reference likewise */
            double worst = 0, worst_cpu = 0;
            int bad = 0;
            for (int r = 0; r < mc->rows && rc == 0; r++) {
                weight_row_f32(&h.w, r, wrow);
                for (int i = 0; i < n; i++) {
                    double mag = 0, exact = bias ? (double)bias[r] : 0.0;
                    for (int c = 0; c < mc->cols; c++) {
                        const double xv = x[(size_t)i * mc->cols + c];
                        mag += (double)wabs[(size_t)r * mc->cols + c] * fabs(xv);
                        exact += (double)wrow[c] * xv;
                    }
                    const double g = y_gpu[(size_t)i * mc->rows + r], cpu = y_ref[(size_t)i * mc->rows + r];
                    const double e = fabs(g - exact) / (mag + 1e-6), ec = fabs(cpu - exact) / (mag + 1e-6);
                    if (!(e <= 4e-5) && bad++ < 3)
                        fprintf(stderr, "    %s n=%d batch row %d, output %d: gpu %.7g exact %.7g cpu %.7g (sum|wx| %.3g)\n", desc,
                                n, i, r, g, exact, cpu, mag);
                    if (e > worst || e != e) worst = e != e ? 1e30 : e;
                    if (ec > worst_cpu || ec != ec) worst_cpu = ec != ec ? 1e30 : ec;
                }
            }
            CHECK_MSG(bad == 0, "%s n=%d%s: %d outputs off, worst %.2e of sum|wx|", desc, n, with_bias ? " +bias" : "", bad,
                      worst);
            if (bad) { /* diagnosis: the same without fusion, graphs and PDL */
                cuda_backend_set_flags(g_gpu, 0);
                g_gpu->ops->matmul(g_gpu, dy, &wg, dx, n, db);
                float *y2 = malloc(sizeof(float) * (size_t)n * mc->rows);
                from_dev(y2, dy, sizeof(float) * (size_t)n * mc->rows);
                fprintf(stderr, "    same call with fusion/graphs/PDL off: %s\n",
                        memcmp(y2, y_gpu, sizeof(float) * (size_t)n * mc->rows) ? "DIFFERENT result" : "same result");
                free(y2);
                cuda_backend_set_flags(g_gpu, CUDA_FLAG_DEFAULT);
            }
            if (worst_cpu > 4e-5)
                fprintf(stderr, "    note: the CPU scalar reference is %.2e of sum|wx| from the exact product for %s n=%d\n",
                        worst_cpu, desc, n);
            if (worst > worst_all) worst_all = worst;
            g_gpu->ops->dealloc(g_gpu, dx);
            g_gpu->ops->dealloc(g_gpu, dy);
            if (db) g_gpu->ops->dealloc(g_gpu, db);
            free(x);
            free(bias);
            free(y_ref);
            free(y_gpu);
        }
        g_gpu->ops->weight_release(g_gpu, &wg);
        free(wrow);
        free(wabs);
        hw_free(&h);
    }
    fprintf(stderr, "  matmul: worst error %.2e of sum_k |w_k x_k|\n", worst_all);
}

/* y for a row must be the same bits whatever batch it is part of */
static void test_matmul_batch_invariance(void)
{
    char err[ST_ERR_LEN], desc[96];
    static const struct mm_case cs[] = {{WT_Q8, 67, 320, 64, DT_BF16}, {WT_Q4, 45, 192, 32, DT_BF16},
                                        {WT_BF16, 33, 96, 0, DT_BF16}, {WT_F32, 19, 100, 0, DT_BF16},
                                        {WT_Q8, 2048, 2048, 64, DT_BF16}, {WT_Q8, 300, 6144, 64, DT_BF16},
                                        {WT_Q4, 200, 1024, 128, DT_F16}};
    /* batches: rows [0,1) [1,2) [2,11) [11,31) [31,37) [0,37) */
    static const int split[][2] = {{0, 1}, {1, 1}, {2, 9}, {11, 20}, {31, 6}};
    const int N = 37;
    /* the whole batch with the v1 kernels is the reference; then every schedule of the v2 matmul, each split */
    static const struct {
        unsigned flags;
        int bps, grid_max, tb;
    } sched[] = {{V1_FLAGS, -1, 0, 0},      {CUDA_FLAG_ALL, -1, 0, 0}, {CUDA_FLAG_ALL, 0, 0, 0},
                 {CUDA_FLAG_ALL, 2, 3, 0},       {CUDA_FLAG_ALL, 1, 1, 3},  {CUDA_FLAG_ALL, 1, 5, 2},
                 {CUDA_FLAG_ALL, 1, 7, 4},       {CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_MMTMA, -1, 0, 0},
                 {CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_MMTMA, 1, 3, 4}};
    for (size_t ci = 0; ci < ST_ARRAY_LEN(cs); ci++) {
        struct hweight h;
        hw_make(&h, cs[ci].t, cs[ci].rows, cs[ci].cols, cs[ci].gs, cs[ci].sdt);
        wt_desc(&h.w, desc, sizeof(desc));
        struct weight wg = h.w;
        REQUIRE_MSG(g_gpu->ops->weight_prepare(g_gpu, &wg, err) == 0, "%s", err);
        const int M = cs[ci].rows, K = cs[ci].cols;
        float *x = rand_f((int64_t)N * K, -2.0f, 2.0f);
        float *all = malloc(sizeof(float) * (size_t)N * M), *part = malloc(sizeof(float) * (size_t)N * M);
        float *dx = to_dev(x, sizeof(float) * (size_t)N * K), *dy = to_dev(NULL, sizeof(float) * (size_t)N * M);
        cuda_backend_set_flags(g_gpu, V1_FLAGS);
        g_gpu->ops->matmul(g_gpu, dy, &wg, dx, N, NULL);
        from_dev(all, dy, sizeof(float) * (size_t)N * M);
        for (size_t sc = 0; sc < ST_ARRAY_LEN(sched); sc++) {
            cuda_backend_set_flags(g_gpu, sched[sc].flags);
            cuda_backend_set_mm_schedule(g_gpu, sched[sc].bps, sched[sc].grid_max, sched[sc].tb);
            for (int i = 0; i < N * M; i++) part[i] = NAN;
            g_gpu->ops->upload(g_gpu, dy, part, sizeof(float) * (size_t)N * M); /* poison */
            if (sc > 0) { /* the whole batch in one call */
                g_gpu->ops->matmul(g_gpu, dy, &wg, dx, N, NULL);
                from_dev(part, dy, sizeof(float) * (size_t)N * M);
                CHECK_MSG(memcmp(all, part, sizeof(float) * (size_t)N * M) == 0,
                          "%s: flags %u, %d blocks/SM, grid <= %d: differs from the v1 kernel", desc, sched[sc].flags,
                          sched[sc].bps, sched[sc].grid_max);
            }
            for (size_t s = 0; s < ST_ARRAY_LEN(split); s++) {
                const int r0 = split[s][0], n = split[s][1];
                g_gpu->ops->matmul(g_gpu, dy + (size_t)r0 * M, &wg, dx + (size_t)r0 * K, n, NULL);
            }
            from_dev(part, dy, sizeof(float) * (size_t)N * M);
            CHECK_MSG(memcmp(all, part, sizeof(float) * (size_t)N * M) == 0,
                      "%s: a row's result depends on its batch (flags %u, %d blocks/SM, grid <= %d)", desc, sched[sc].flags,
                      sched[sc].bps, sched[sc].grid_max);
        }
        cuda_backend_set_flags(g_gpu, CUDA_FLAG_DEFAULT);
        cuda_backend_set_mm_schedule(g_gpu, -1, 0, 0);
        g_gpu->ops->dealloc(g_gpu, dx);
        g_gpu->ops->dealloc(g_gpu, dy);
        g_gpu->ops->weight_release(g_gpu, &wg);
        free(x);
        free(all);
        free(part);
        hw_free(&h);
    }
}

static void test_embed(void)
{
    char err[ST_ERR_LEN], desc[96];
    static const struct mm_case cs[] = {{WT_Q8, 300, 128, 64, DT_BF16}, {WT_Q4, 77, 192, 32, DT_F16},
                                        {WT_Q8, 50, 256, 128, DT_F32},  {WT_BF16, 100, 64, 0, DT_BF16},
                                        {WT_BF16, 31, 10, 0, DT_BF16},  {WT_F16, 40, 24, 0, DT_BF16},
                                        {WT_F32, 64, 20, 0, DT_BF16}};
    for (size_t ci = 0; ci < ST_ARRAY_LEN(cs); ci++) {
        struct hweight h;
        hw_make(&h, cs[ci].t, cs[ci].rows, cs[ci].cols, cs[ci].gs, cs[ci].sdt);
        wt_desc(&h.w, desc, sizeof(desc));
        struct weight wg = h.w;
        REQUIRE_MSG(g_gpu->ops->weight_prepare(g_gpu, &wg, err) == 0, "%s", err);
        const int n = 13, dim = cs[ci].cols;
        int32_t tok[13];
        for (int i = 0; i < n; i++) tok[i] = (int32_t)(rng_next(&g_rng) % (uint64_t)cs[ci].rows);
        tok[0] = cs[ci].rows - 1;
        float *ref = malloc(sizeof(float) * (size_t)n * dim), *got = malloc(sizeof(float) * (size_t)n * dim);
        g_cpu->ops->embed(g_cpu, ref, &h.w, tok, n);
        int32_t *dt = to_dev(tok, sizeof(tok));
        float *dout = to_dev(NULL, sizeof(float) * (size_t)n * dim);
        g_gpu->ops->embed(g_gpu, dout, &wg, dt, n);
        CHECK(from_dev(got, dout, sizeof(float) * (size_t)n * dim) == 0);
        CHECK_MSG(memcmp(ref, got, sizeof(float) * (size_t)n * dim) == 0, "embed %s differs from the CPU", desc);
        g_gpu->ops->dealloc(g_gpu, dt);
        g_gpu->ops->dealloc(g_gpu, dout);
        g_gpu->ops->weight_release(g_gpu, &wg);
        free(ref);
        free(got);
        hw_free(&h);
    }
}

static void check_close(const char *what, const float *ref, const float *got, int64_t n, double rel, double abs_tol)
{
    int bad = 0;
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)ref[i] - got[i]);
        if (!(d <= rel * fabs((double)ref[i]) + abs_tol)) {
            if (bad++ < 3) fprintf(stderr, "    %s[%lld]: gpu %.8g cpu %.8g\n", what, (long long)i, got[i], ref[i]);
        }
        if (d > worst || d != d) worst = d != d ? 1e30 : d;
    }
    CHECK_MSG(bad == 0, "%s: %d of %lld values off (worst abs %.3g)", what, bad, (long long)n, worst);
}

static void test_rmsnorm(void)
{
    static const int shapes[][2] = {{1, 64}, {7, 100}, {33, 2048}, {130, 8}, {3, 8192}};
    for (size_t s = 0; s < ST_ARRAY_LEN(shapes); s++) {
        const int rows = shapes[s][0], dim = shapes[s][1];
        float *x = rand_f((int64_t)rows * dim, -3.0f, 3.0f), *w = rand_f(dim, 0.5f, 1.5f);
        float *ref = malloc(sizeof(float) * (size_t)rows * dim), *got = malloc(sizeof(float) * (size_t)rows * dim);
        g_cpu->ops->rmsnorm(g_cpu, ref, x, w, rows, dim, 1e-6f);
        float *dx = to_dev(x, sizeof(float) * (size_t)rows * dim), *dw = to_dev(w, sizeof(float) * (size_t)dim);
        float *dout = to_dev(NULL, sizeof(float) * (size_t)rows * dim);
        g_gpu->ops->rmsnorm(g_gpu, dout, dx, dw, rows, dim, 1e-6f);
        CHECK(from_dev(got, dout, sizeof(float) * (size_t)rows * dim) == 0);
        check_close("rmsnorm", ref, got, (int64_t)rows * dim, 3e-7, 1e-30);
        /* in place */
        g_gpu->ops->rmsnorm(g_gpu, dx, dx, dw, rows, dim, 1e-6f);
        CHECK(from_dev(got, dx, sizeof(float) * (size_t)rows * dim) == 0);
        check_close("rmsnorm in place", ref, got, (int64_t)rows * dim, 3e-7, 1e-30);
        g_gpu->ops->dealloc(g_gpu, dx);
        g_gpu->ops->dealloc(g_gpu, dw);
        g_gpu->ops->dealloc(g_gpu, dout);
        free(x);
        free(w);
        free(ref);
        free(got);
    }
}

static void test_rope(void)
{
    static const int shapes[][3] = {{1, 16, 128}, {5, 3, 8}, {9, 7, 64}, {2, 2, 6}};
    for (size_t s = 0; s < ST_ARRAY_LEN(shapes); s++) {
        const int n = shapes[s][0], heads = shapes[s][1], hd = shapes[s][2], half = hd / 2;
        const int64_t cnt = (int64_t)n * heads * hd;
        float *x = rand_f(cnt, -2.0f, 2.0f), *cs = malloc(sizeof(float) * (size_t)n * half * 2);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < half; j++) {
                const double a = (double)(i * 37 + 5) / pow(10000.0, 2.0 * j / hd);
                cs[((size_t)i * half + j) * 2] = (float)cos(a);
                cs[((size_t)i * half + j) * 2 + 1] = (float)sin(a);
            }
        float *ref = malloc(sizeof(float) * (size_t)cnt), *got = malloc(sizeof(float) * (size_t)cnt);
        memcpy(ref, x, sizeof(float) * (size_t)cnt);
        g_cpu->ops->rope(g_cpu, ref, n, heads, hd, cs);
        float *dx = to_dev(x, sizeof(float) * (size_t)cnt), *dcs = to_dev(cs, sizeof(float) * (size_t)n * half * 2);
        g_gpu->ops->rope(g_gpu, dx, n, heads, hd, dcs);
        CHECK(from_dev(got, dx, sizeof(float) * (size_t)cnt) == 0);
        CHECK_MSG(memcmp(ref, got, sizeof(float) * (size_t)cnt) == 0, "rope %dx%dx%d differs from the CPU", n, heads, hd);
        g_gpu->ops->dealloc(g_gpu, dx);
        g_gpu->ops->dealloc(g_gpu, dcs);
        free(x);
        free(cs);
        free(ref);
        free(got);
    }
}

/* kv_store then attention, against the CPU, over slots and positions that cross the GPU's 512-position chunks */
static void attention_case(int n_slots, int n_ctx, int nh, int nkv, int hd, int n, bool chunked_rows)
{
    const int kv_dim = nkv * hd;
    const int64_t cache = (int64_t)n_slots * n_ctx * kv_dim;
    float *kc = rand_f(cache, -1.0f, 1.0f), *vc = rand_f(cache, -1.0f, 1.0f);
    float *q = rand_f((int64_t)n * nh * hd, -1.0f, 1.0f);
    float *k = rand_f((int64_t)n * kv_dim, -1.0f, 1.0f), *v = rand_f((int64_t)n * kv_dim, -1.0f, 1.0f);
    int32_t pos[64], slot[64];
    for (int i = 0; i < n; i++) {
        slot[i] = (int32_t)(rng_next(&g_rng) % (uint64_t)n_slots);
        pos[i] = chunked_rows ? n_ctx - 1 - (int32_t)(rng_next(&g_rng) % 700) : (int32_t)(rng_next(&g_rng) % (uint64_t)n_ctx);
        for (int j = 0; j < i; j++) /* one row per (slot, position) */
            if (slot[j] == slot[i] && pos[j] == pos[i]) pos[i] = (pos[i] + 1) % n_ctx;
    }
    pos[0] = 0;
    if (n > 1) pos[1] = n_ctx - 1;
    float *kc_ref = malloc(sizeof(float) * (size_t)cache), *vc_ref = malloc(sizeof(float) * (size_t)cache);
    memcpy(kc_ref, kc, sizeof(float) * (size_t)cache);
    memcpy(vc_ref, vc, sizeof(float) * (size_t)cache);
    const int64_t on = (int64_t)n * nh * hd;
    float *ref = malloc(sizeof(float) * (size_t)on), *got = malloc(sizeof(float) * (size_t)on);
    char err[ST_ERR_LEN];
    REQUIRE(g_cpu->ops->reserve(g_cpu, (size_t)n_ctx + 64, err) == 0);
    struct backend_batch hb = {n, NULL, pos, slot};
    const float scale = 1.0f / sqrtf((float)hd);
    g_cpu->ops->kv_store(g_cpu, kc_ref, vc_ref, k, v, &hb, kv_dim, n_ctx);
    g_cpu->ops->attention(g_cpu, ref, q, kc_ref, vc_ref, &hb, nh, nkv, hd, n_ctx, scale);
    float *dkc = to_dev(kc, sizeof(float) * (size_t)cache), *dvc = to_dev(vc, sizeof(float) * (size_t)cache);
    float *dq = to_dev(q, sizeof(float) * (size_t)on), *dk = to_dev(k, sizeof(float) * (size_t)n * kv_dim);
    float *dv = to_dev(v, sizeof(float) * (size_t)n * kv_dim), *dout = to_dev(NULL, sizeof(float) * (size_t)on);
    int32_t *dpos = to_dev(pos, sizeof(int32_t) * (size_t)n), *dslot = to_dev(slot, sizeof(int32_t) * (size_t)n);
    struct backend_batch db = {n, NULL, dpos, dslot};
    g_gpu->ops->kv_store(g_gpu, dkc, dvc, dk, dv, &db, kv_dim, n_ctx);
    g_gpu->ops->attention(g_gpu, dout, dq, dkc, dvc, &db, nh, nkv, hd, n_ctx, scale);
    CHECK(from_dev(got, dout, sizeof(float) * (size_t)on) == 0);
    char what[96];
    snprintf(what, sizeof(what), "attention n=%d heads %d/%d hd %d ctx %d", n, nh, nkv, hd, n_ctx);
    check_close(what, ref, got, on, 0.0, 2e-5);
    { /* the first kernel version gives the same bits */
        float *got1 = malloc(sizeof(float) * (size_t)on);
        cuda_backend_set_flags(g_gpu, CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_ATTNV2);
        g_gpu->ops->attention(g_gpu, dout, dq, dkc, dvc, &db, nh, nkv, hd, n_ctx, scale);
        CHECK(from_dev(got1, dout, sizeof(float) * (size_t)on) == 0);
        cuda_backend_set_flags(g_gpu, CUDA_FLAG_DEFAULT);
        CHECK_MSG(memcmp(got, got1, sizeof(float) * (size_t)on) == 0, "%s: v1 and v2 kernels differ", what);
        free(got1);
    }
    float *kc_got = malloc(sizeof(float) * (size_t)cache);
    CHECK(from_dev(kc_got, dkc, sizeof(float) * (size_t)cache) == 0);
    CHECK_MSG(memcmp(kc_got, kc_ref, sizeof(float) * (size_t)cache) == 0, "kv_store: k cache differs");
    CHECK(from_dev(kc_got, dvc, sizeof(float) * (size_t)cache) == 0);
    CHECK_MSG(memcmp(kc_got, vc_ref, sizeof(float) * (size_t)cache) == 0, "kv_store: v cache differs");
    void *bufs[] = {dkc, dvc, dq, dk, dv, dout, dpos, dslot};
    for (size_t i = 0; i < ST_ARRAY_LEN(bufs); i++) g_gpu->ops->dealloc(g_gpu, bufs[i]);
    free(kc);
    free(vc);
    free(q);
    free(k);
    free(v);
    free(kc_ref);
    free(vc_ref);
    free(kc_got);
    free(ref);
    free(got);
}

static void test_attention(void)
{
    attention_case(3, 64, 4, 2, 64, 7, false);      /* one chunk */
    attention_case(2, 40, 8, 4, 8, 5, false);       /* stories: head_dim 8 */
    attention_case(2, 1100, 16, 8, 128, 6, true);   /* rows of 2-3 chunks */
    attention_case(1, 600, 12, 1, 64, 4, true);     /* MQA: 12 q heads per kv head (two q-head groups) */
    attention_case(2, 96, 7, 7, 6, 9, false);       /* head_dim not a multiple of 4 */
    if (!g_quick) attention_case(4, 2100, 16, 8, 128, 33, false);
}

static void test_elementwise(void)
{
    const int64_t n = 100003;
    float *g = rand_f(n, -12.0f, 12.0f), *u = rand_f(n, -3.0f, 3.0f);
    float *ref = malloc(sizeof(float) * (size_t)n), *got = malloc(sizeof(float) * (size_t)n);
    float *dg = to_dev(g, sizeof(float) * (size_t)n), *du = to_dev(u, sizeof(float) * (size_t)n);
    float *dout = to_dev(NULL, sizeof(float) * (size_t)n);
    g_cpu->ops->silu_mul(g_cpu, ref, g, u, n);
    g_gpu->ops->silu_mul(g_gpu, dout, dg, du, n);
    CHECK(from_dev(got, dout, sizeof(float) * (size_t)n) == 0);
    check_close("silu_mul", ref, got, n, 1e-6, 1e-37);
    memcpy(ref, g, sizeof(float) * (size_t)n);
    g_cpu->ops->add(g_cpu, ref, u, n);
    g_gpu->ops->add(g_gpu, dg, du, n);
    CHECK(from_dev(got, dg, sizeof(float) * (size_t)n) == 0);
    CHECK_MSG(memcmp(ref, got, sizeof(float) * (size_t)n) == 0, "add differs from the CPU");
    /* gather: rows in any order, repeated */
    const int dim = 37, rows = 50, m = 9;
    float *src = rand_f((int64_t)rows * dim, -1, 1), *dst = malloc(sizeof(float) * (size_t)m * dim);
    int32_t idx[9] = {49, 0, 3, 3, 17, 48, 1, 2, 30};
    float *ds = to_dev(src, sizeof(float) * (size_t)rows * dim), *dd = to_dev(NULL, sizeof(float) * (size_t)m * dim);
    g_cpu->ops->gather_rows(g_cpu, dst, src, idx, m, dim);
    g_gpu->ops->gather_rows(g_gpu, dd, ds, idx, m, dim);
    float *gd = malloc(sizeof(float) * (size_t)m * dim);
    CHECK(from_dev(gd, dd, sizeof(float) * (size_t)m * dim) == 0);
    CHECK_MSG(memcmp(dst, gd, sizeof(float) * (size_t)m * dim) == 0, "gather_rows differs from the CPU");
    /* in place, as the CPU's memmove row by row */
    int32_t idx2[4] = {2, 0, 5, 1};
    g_cpu->ops->gather_rows(g_cpu, src, src, idx2, 4, dim);
    g_gpu->ops->gather_rows(g_gpu, ds, ds, idx2, 4, dim);
    float *all = malloc(sizeof(float) * (size_t)rows * dim);
    CHECK(from_dev(all, ds, sizeof(float) * (size_t)rows * dim) == 0);
    CHECK_MSG(memcmp(all, src, sizeof(float) * (size_t)rows * dim) == 0, "gather_rows in place differs from the CPU");
    void *bufs[] = {dg, du, dout, ds, dd};
    for (size_t i = 0; i < ST_ARRAY_LEN(bufs); i++) g_gpu->ops->dealloc(g_gpu, bufs[i]);
    free(g);
    free(u);
    free(ref);
    free(got);
    free(src);
    free(dst);
    free(gd);
    free(all);
}

/* One transformer layer's op sequence through the interface: outputs bit-identical with every feature set. */
static void layer_ops(struct backend *b, int n, int dim, int hidden, int nh, int nkv, int hd, struct weight *w,
                      float **buf, const float **vec, int32_t *dpos, int32_t *dslot, int n_ctx)
{
    const struct backend_ops *o = b->ops;
    struct backend_batch bb = {n, NULL, dpos, dslot};
    /* buf: x xb q k v att proj gate up kc vc cs */
    o->rmsnorm(b, buf[1], buf[0], vec[0], n, dim, 1e-6f);
    o->matmul(b, buf[2], &w[0], buf[1], n, NULL);
    o->matmul(b, buf[3], &w[1], buf[1], n, vec[4]);
    o->matmul(b, buf[4], &w[2], buf[1], n, NULL);
    o->rmsnorm(b, buf[2], buf[2], vec[2], n * nh, hd, 1e-6f);
    o->rmsnorm(b, buf[3], buf[3], vec[3], n * nkv, hd, 1e-6f);
    o->rope(b, buf[2], n, nh, hd, buf[11]);
    o->rope(b, buf[3], n, nkv, hd, buf[11]);
    o->kv_store(b, buf[9], buf[10], buf[3], buf[4], &bb, nkv * hd, n_ctx);
    o->attention(b, buf[5], buf[2], buf[9], buf[10], &bb, nh, nkv, hd, n_ctx, 0.125f);
    o->matmul(b, buf[6], &w[3], buf[5], n, NULL);
    o->add(b, buf[0], buf[6], (int64_t)n * dim);
    o->rmsnorm(b, buf[1], buf[0], vec[1], n, dim, 1e-6f);
    o->matmul(b, buf[7], &w[4], buf[1], n, NULL);
    o->matmul(b, buf[8], &w[5], buf[1], n, NULL);
    o->silu_mul(b, buf[7], buf[7], buf[8], (int64_t)n * hidden);
    o->matmul(b, buf[6], &w[6], buf[7], n, NULL);
    o->add(b, buf[0], buf[6], (int64_t)n * dim);
}

static void test_fusion_ops(void)
{
    char err[ST_ERR_LEN];
    const int dim = 256, hidden = 512, nh = 4, nkv = 2, hd = 64, n_ctx = 64;
    for (int kind = 0; kind < 3; kind++) {
        const enum wtype t = kind == 0 ? WT_Q8 : kind == 1 ? WT_Q4 : WT_BF16;
        static const int nn[] = {3, 40};
        for (size_t ni = 0; ni < ST_ARRAY_LEN(nn); ni++) {
            const int n = nn[ni];
            struct hweight hw[7];
            const int shp[7][2] = {{nh * hd, dim}, {nkv * hd, dim}, {nkv * hd, dim}, {dim, nh * hd},
                                   {hidden, dim},  {hidden, dim},   {dim, hidden}};
            struct weight w[7];
            for (int i = 0; i < 7; i++) {
                hw_make(&hw[i], t, shp[i][0], shp[i][1], 64, DT_BF16);
                w[i] = hw[i].w;
                REQUIRE_MSG(g_gpu->ops->weight_prepare(g_gpu, &w[i], err) == 0, "%s", err);
            }
            const int64_t sz[12] = {(int64_t)n * dim, (int64_t)n * dim, (int64_t)n * nh * hd, (int64_t)n * nkv * hd,
                                    (int64_t)n * nkv * hd, (int64_t)n * nh * hd, (int64_t)n * dim, (int64_t)n * hidden,
                                    (int64_t)n * hidden, (int64_t)n * n_ctx * nkv * hd, (int64_t)n * n_ctx * nkv * hd,
                                    (int64_t)n * hd};
            float *init[12], *dev[12], *res[2][12];
            for (int i = 0; i < 12; i++) {
                init[i] = rand_f(sz[i], -1.0f, 1.0f);
                dev[i] = to_dev(NULL, sizeof(float) * (size_t)sz[i]);
                res[0][i] = malloc(sizeof(float) * (size_t)sz[i]);
                res[1][i] = malloc(sizeof(float) * (size_t)sz[i]);
            }
            float *hv[5] = {rand_f(dim, 0.5f, 1.5f), rand_f(dim, 0.5f, 1.5f), rand_f(hd, 0.5f, 1.5f),
                            rand_f(hd, 0.5f, 1.5f), rand_f(nkv * hd, -1, 1)};
            const float *dv[5];
            for (int i = 0; i < 5; i++) dv[i] = to_dev(hv[i], sizeof(float) * (size_t)(i == 4 ? nkv * hd : i < 2 ? dim : hd));
            int32_t pos[40], slot[40];
            for (int i = 0; i < n; i++) {
                slot[i] = i;
                pos[i] = (i * 7) % n_ctx;
            }
            int32_t *dpos = to_dev(pos, sizeof(int32_t) * (size_t)n), *dslot = to_dev(slot, sizeof(int32_t) * (size_t)n);
            /* the plain run (no fusion, graphs, PDL, first kernel versions) is the reference */
            static const struct {
                unsigned flags;
                int bps, grid_max, tb;
            } cfg[] = {{0, -1, 0, 0},
                       {CUDA_FLAG_ALL, -1, 0, 0},
                       {CUDA_FLAG_ALL, 0, 2, 1},
                       {CUDA_FLAG_ALL, 1, 3, 4},
                       {V1_FLAGS, -1, 0, 0},
                       {CUDA_FLAG_MMV2 | CUDA_FLAG_ATTNV2, 1, 1, 3},
                       {CUDA_FLAG_MMV2 | CUDA_FLAG_MMTMA, 2, 5, 2}};
            for (size_t f = 0; f < ST_ARRAY_LEN(cfg); f++) {
                cuda_backend_set_flags(g_gpu, cfg[f].flags);
                cuda_backend_set_mm_schedule(g_gpu, cfg[f].bps, cfg[f].grid_max, cfg[f].tb);
                const int o = f ? 1 : 0;
                for (int rep = 0; rep < (f ? 3 : 1); rep++) { /* the third run replays a graph */
                    for (int i = 0; i < 12; i++) g_gpu->ops->upload(g_gpu, dev[i], init[i], sizeof(float) * (size_t)sz[i]);
                    layer_ops(g_gpu, n, dim, hidden, nh, nkv, hd, w, dev, dv, dpos, dslot, n_ctx);
                    for (int i = 0; i < 11; i++) from_dev(res[o][i], dev[i], sizeof(float) * (size_t)sz[i]);
                    if (f)
                        for (int i = 0; i < 11; i++)
                            CHECK_MSG(memcmp(res[0][i], res[1][i], sizeof(float) * (size_t)sz[i]) == 0,
                                      "%s n=%d: buffer %d differs with flags %u (%d blocks/SM, grid <= %d), run %d",
                                      wtype_name(t), n, i, cfg[f].flags, cfg[f].bps, cfg[f].grid_max, rep);
                }
            }
            cuda_backend_set_flags(g_gpu, CUDA_FLAG_DEFAULT);
            cuda_backend_set_mm_schedule(g_gpu, -1, 0, 0);
            for (int i = 0; i < 12; i++) {
                g_gpu->ops->dealloc(g_gpu, dev[i]);
                free(init[i]);
                free(res[0][i]);
                free(res[1][i]);
            }
            for (int i = 0; i < 5; i++) {
                g_gpu->ops->dealloc(g_gpu, (void *)dv[i]);
                free(hv[i]);
            }
            g_gpu->ops->dealloc(g_gpu, dpos);
            g_gpu->ops->dealloc(g_gpu, dslot);
            for (int i = 0; i < 7; i++) {
                g_gpu->ops->weight_release(g_gpu, &w[i]);
                hw_free(&hw[i]);
            }
        }
    }
}

/* Downloads: pageable destinations through the pinned pipeline (several pieces, odd sizes, a misaligned
 * destination), a page-locked destination straight from the device, and small ones; every byte checked. */
static void test_download(void)
{
    static const size_t sizes[] = {1000, (256 << 10) - 4, (256 << 10) + 4, (5 << 20) + 12, (9 << 20) + 36};
    for (int f = 0; f < 2; f++) {
        cuda_backend_set_flags(g_gpu, f ? CUDA_FLAG_ALL : (CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_DLPIPE));
        for (size_t si = 0; si < ST_ARRAY_LEN(sizes); si++) {
            const size_t n = sizes[si] / 4;
            float *src = rand_f((int64_t)n, -1.0f, 1.0f);
            float *d = to_dev(src, sizeof(float) * n);
            unsigned char *raw = malloc(sizeof(float) * n + 16);
            float *dst = (float *)(raw + 4 * (si & 1)); /* every other one not 8-byte aligned */
            memset(dst, 0xff, sizeof(float) * n);
            CHECK(from_dev(dst, d, sizeof(float) * n) == 0);
            CHECK_MSG(memcmp(dst, src, sizeof(float) * n) == 0, "download of %zu bytes (pipeline %s) differs", sizeof(float) * n,
                      f ? "on" : "off");
            free(raw);
            float *pinned = NULL;
            if (cudaMallocHost((void **)&pinned, sizeof(float) * n) == cudaSuccess) {
                memset(pinned, 0xff, sizeof(float) * n);
                CHECK(from_dev(pinned, d, sizeof(float) * n) == 0);
                CHECK_MSG(memcmp(pinned, src, sizeof(float) * n) == 0, "download of %zu bytes into pinned memory differs",
                          sizeof(float) * n);
                cudaFreeHost(pinned);
            }
            g_gpu->ops->dealloc(g_gpu, d);
            free(src);
        }
    }
    cuda_backend_set_flags(g_gpu, CUDA_FLAG_DEFAULT);
}

/* The profiler's rows: mode 1 names and times every kernel, mode 2 the queue's device span. */
static void test_profile(void)
{
    char err[ST_ERR_LEN];
    struct hweight h;
    hw_make(&h, WT_Q8, 512, 1024, 64, DT_BF16);
    struct weight wg = h.w;
    REQUIRE_MSG(g_gpu->ops->weight_prepare(g_gpu, &wg, err) == 0, "%s", err);
    float *x = rand_f(3 * 1024, -1, 1);
    float *dx = to_dev(x, sizeof(float) * 3 * 1024), *dy = to_dev(NULL, sizeof(float) * 3 * 512);
    float y[3 * 512];
    struct cuda_prof_row rows[8];
    REQUIRE(cuda_backend_profile(g_gpu, 1) == 0);
    for (int it = 0; it < 3; it++) {
        g_gpu->ops->matmul(g_gpu, dy, &wg, dx, 3, NULL);
        g_gpu->ops->add(g_gpu, dy, dy, 3 * 512);
        CHECK(from_dev(y, dy, sizeof(y)) == 0);
    }
    int n = cuda_backend_profile_rows(g_gpu, rows, 8);
    CHECK_EQ_INT(n, 2);
    bool mm = false, add = false;
    for (int i = 0; i < n; i++) {
        CHECK_MSG(rows[i].count == 3 && rows[i].ms > 0, "profile row %s: %llu launches, %.4f ms", rows[i].name,
                  (unsigned long long)rows[i].count, rows[i].ms);
        mm |= strstr(rows[i].name, "matmul q8") && strstr(rows[i].name, "m=512 k=1024 n=3");
        add |= !strcmp(rows[i].name, "add");
    }
    CHECK_MSG(mm && add, "profile rows: %s / %s", n > 0 ? rows[0].name : "-", n > 1 ? rows[1].name : "-");
    if (n == 2) CHECK(rows[0].ms >= rows[1].ms);
    REQUIRE(cuda_backend_profile(g_gpu, 2) == 0);
    g_gpu->ops->matmul(g_gpu, dy, &wg, dx, 3, NULL);
    CHECK(from_dev(y, dy, sizeof(y)) == 0);
    n = cuda_backend_profile_rows(g_gpu, rows, 8);
    CHECK_MSG(n == 1 && !strcmp(rows[0].name, "queue (device span)") && rows[0].count == 1 && rows[0].ms > 0,
              "span profile: %d rows", n);
    cuda_backend_profile(g_gpu, 0);
    g_gpu->ops->matmul(g_gpu, dy, &wg, dx, 3, NULL);
    CHECK(from_dev(y, dy, sizeof(y)) == 0);
    g_gpu->ops->dealloc(g_gpu, dx);
    g_gpu->ops->dealloc(g_gpu, dy);
    g_gpu->ops->weight_release(g_gpu, &wg);
    hw_free(&h);
    free(x);
}

/* cuda_bench_run on a small model: every figure filled in, the formatted report complete. */
static void test_bench_api(void)
{
    if (g_quick) return;
    char err[ST_ERR_LEN];
    struct model m;
    REQUIRE_MSG(model_load(&m, fixture_path("models/kjv-qwen3-21m-8bit"), 0, -1, true, true, err) == 0, "%s", err);
    struct cuda_bench_opts o;
    cuda_bench_opts_default(&o);
    o.ctx = 256;
    o.prompt = 8;
    o.gen = 4;
    o.prefill = 64;
    o.batches[0] = 1;
    o.batches[1] = 3;
    o.n_batches = 2;
    o.variants = 1;
    o.profile = 1;
    struct cuda_bench_result *r = calloc(1, sizeof(*r));
    const int rc = cuda_bench_run(&m, &o, r, err);
    CHECK_MSG(rc == 0, "cuda_bench_run: %s", err);
    if (rc == 0) {
        CHECK(r->copy_bw > 1e9 && r->weight_bytes > 0);
        for (int i = 0; i < 2; i++)
            CHECK_MSG(r->tok_s[i] > 0 && r->span_s[i] > 0 && r->span_s[i] < r->step_s[i] * 1.5 && r->frac[i] > 0,
                      "batch %d: %.1f tok/s, span %.3g s of %.3g s", r->batches[i], r->tok_s[i], r->span_s[i], r->step_s[i]);
        CHECK(r->prefill_tok_s[0] > 0 && r->prefill_tok_s[1] > 0);
        CHECK(r->n_variants >= 10 && r->var[0].step_s[0] > 0 && r->var[r->n_variants - 1].step_s[1] > 0);
        CHECK_EQ_INT(r->n_profiles, 4);
        for (int p = 0; p < r->n_profiles; p++) CHECK(r->prof[p].n_rows > 3 && r->prof[p].total_ms > 0);
        char *txt = malloc(1 << 16);
        cuda_bench_format(r, txt, 1 << 16);
        CHECK_MSG(strstr(txt, "SUMMARY decode_b1_tok_s=") && strstr(txt, "SUMMARY decode_b3_over_b1=") &&
                      strstr(txt, "| variant |") && strstr(txt, "profile: all flags"),
                  "report incomplete");
        free(txt);
    }
    free(r);
    model_free(&m);
}

/* ---- engine-level tests ---- */
static int32_t *json_ids(const json_t *a, int *n)
{
    *n = (int)json_array_size(a);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return ids;
}

static int feed(struct engine *e, const int32_t *ids, int from, int to, int chunk, float *logits, char *err)
{
    int32_t pos[512], slot[512] = {0};
    uint8_t want[512];
    for (int i = from; i < to; i += chunk) {
        const int m = ST_MIN(chunk, to - i);
        for (int j = 0; j < m; j++) {
            pos[j] = i + j;
            want[j] = (i + j == to - 1);
        }
        struct batch b = {.n = m, .token = ids + i, .pos = pos, .slot = slot, .want_logits = want};
        const int rc = engine_forward(e, &b, NULL, logits, err);
        if (rc < 0) return rc;
    }
    return 0;
}

static int open_gpu_engine(struct engine **e, struct model *m, int device, int n_slots, int chunk, char *err)
{
    struct engine_opts eo = {.n_slots = n_slots, .n_ctx = ST_MIN(256, m->cfg.max_seq_len), .max_batch = chunk < 8 ? 8 : chunk,
                             .max_logits = n_slots};
    eo.backend.kind = BACKEND_CUDA;
    eo.backend.device = device;
    return engine_init(e, m, &eo, err);
}

/* The golden comparison of test_engine_golden.c / test_shapes.c on the GPU. */
static void run_golden_cases(const char *model_dir, const json_t *cases, const char *logits_file, int chunk, const char *tag)
{
    char err[ST_ERR_LEN];
    struct model m;
    int rc = model_load(&m, fixture_path(model_dir), 0, -1, true, true, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    struct engine *e = NULL;
    rc = open_gpu_engine(&e, &m, 0, 1, chunk, err);
    if (rc < 0) {
        model_free(&m);
        REQUIRE_MSG(0, "%s: %s", tag, err);
    }
    const int vocab = m.cfg.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    double worst_all = 0;
    int checked = 0, total = 0;
    const size_t n_cases = g_quick && json_array_size(cases) > 2 ? 2 : json_array_size(cases);
    for (size_t ci = 0; ci < n_cases; ci++) {
        const json_t *c = json_array_get(cases, ci);
        int n_prompt, n_greedy, n_top;
        int32_t *prompt = json_ids(json_object_get(c, "prompt_ids"), &n_prompt);
        int32_t *greedy = json_ids(json_object_get(c, "greedy_ids"), &n_greedy);
        int32_t *ref_top = json_ids(json_object_get(c, "top20_ids"), &n_top);
        const json_t *ref_logits = json_object_get(c, "top20_logits"), *margins = json_object_get(c, "greedy_margins");
        const json_t *all = json_object_get(c, "all_logits");
        const double lse = json_number_value(json_object_get(c, "logsumexp"));
        if ((rc = feed(e, prompt, 0, n_prompt, chunk, logits, err)) < 0) {
            CHECK_MSG(0, "%s case %zu: %s", tag, ci, err);
            goto next;
        }
        double our_lse = sample_logsumexp(logits, vocab), worst = 0;
        for (int k = 0; k < n_top; k++) {
            const double ref_lp = json_number_value(json_array_get(ref_logits, (size_t)k)) - lse;
            const double d = fabs(((double)logits[ref_top[k]] - our_lse) - ref_lp);
            if (d > worst || d != d) worst = d != d ? 1e30 : d;
        }
        CHECK_MSG(worst <= LOGPROB_TOL, "%s case %zu: top-20 logprob error %.2e > %.0e", tag, ci, worst, LOGPROB_TOL);
        if (worst > worst_all) worst_all = worst;
        if (all && (int)json_array_size(all) == vocab) {
            double wa = 0;
            for (int i = 0; i < vocab; i++) {
                const double d = fabs((logits[i] - our_lse) - (json_number_value(json_array_get(all, (size_t)i)) - lse));
                if (d > wa) wa = d;
            }
            CHECK_MSG(wa <= LOGPROB_TOL, "%s case %zu: all-logprobs max error %.2e", tag, ci, wa);
        }
        if (ci == 0 && logits_file) {
            FILE *f = fopen(fixture_path(logits_file), "rb");
            CHECK_MSG(f != NULL, "cannot open %s", logits_file);
            if (f) {
                float *ref = malloc(sizeof(float) * (size_t)vocab);
                const size_t got = fread(ref, sizeof(float), (size_t)vocab, f);
                fclose(f);
                double maxd = 0;
                for (int i = 0; i < vocab && got == (size_t)vocab; i++)
                    if (fabs((double)ref[i] - logits[i]) > maxd) maxd = fabs((double)ref[i] - logits[i]);
                CHECK_MSG(got == (size_t)vocab && maxd <= LOGPROB_TOL, "%s: all-logits max error %.2e", tag, maxd);
                free(ref);
            }
        }
        {
            int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n_prompt + n_greedy + 1));
            memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
            int n = n_prompt;
            total += n_greedy;
            for (int step = 0; step < n_greedy; step++) {
                const int32_t id = sample_argmax(logits, vocab);
                const double margin = json_number_value(json_array_get(margins, (size_t)step));
                if (id != greedy[step]) {
                    CHECK_MSG(margin < MARGIN_MIN, "%s case %zu step %d: got %d, want %d (margin %.4f)", tag, ci, step, id,
                              greedy[step], margin);
                    break;
                }
                checked++;
                seq[n++] = id;
                if (step + 1 < n_greedy && (rc = feed(e, seq, n - 1, n, chunk, logits, err)) < 0) {
                    CHECK_MSG(0, "%s", err);
                    break;
                }
            }
            free(seq);
        }
    next:
        free(prompt);
        free(greedy);
        free(ref_top);
    }
    CHECK_MSG(checked * 4 >= total * 3, "%s: only %d of %d greedy steps compared", tag, checked, total);
    fprintf(stderr, "  golden %-40s chunk %2d: top-20 logprob err %.2e, %d/%d greedy ids\n", tag, chunk, worst_all, checked,
            total);
    free(logits);
    engine_free(e);
    model_free(&m);
}

static void golden(const char *model, const char *goldens, const char *key, const char *logits, int chunk)
{
    json_error_t je;
    json_t *root = json_load_file(fixture_path(goldens), 0, &je);
    REQUIRE_MSG(root, "cannot read %s: %s (make fixtures)", goldens, je.text);
    const json_t *cases = key ? json_object_get(json_object_get(root, "cases"), key) : json_object_get(root, "cases");
    REQUIRE(json_array_size(cases) > 0);
    char tag[128];
    snprintf(tag, sizeof(tag), "%s%s%s", model, key ? " " : "", key ? key : "");
    run_golden_cases(model, cases, logits, chunk, tag);
    json_decref(root);
}

static void test_golden_stories(void)
{
    golden("models/stories260K", "goldens/stories260K.goldens.json", NULL, NULL, 64);
    if (!g_quick) golden("models/stories260K", "goldens/stories260K.goldens.json", NULL, NULL, 1);
}
static void test_golden_qwen3_bf16(void)
{
    golden("models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16", "goldens/kjv-qwen3.bf16.logits-prompt0.f32", 64);
    if (!g_quick) golden("models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16", NULL, 3);
}
static void test_golden_qwen3_q8(void)
{
    golden("models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8", "goldens/kjv-qwen3.q8.logits-prompt0.f32", 64);
    if (!g_quick) golden("models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8", NULL, 7);
}
static void test_golden_qwen3_q4(void)
{
    if (g_quick) return;
    golden("models/kjv-qwen3-21m-4bit", "goldens/kjv-qwen3.goldens.json", "q4", "goldens/kjv-qwen3.q4.logits-prompt0.f32", 64);
    golden("models/kjv-qwen3-21m-4bit", "goldens/kjv-qwen3.goldens.json", "q4", NULL, 5);
}

static void test_golden_shapes(void)
{
    static const char *names[] = {"llama-gqa-untied", "llama-mqa-rope-llama3", "qwen3-q8-g32-newcfg",
                                  "qwen3-q4-g128-untied", "qwen2-bias-mha"};
    if (g_quick) return;
    for (size_t i = 0; i < ST_ARRAY_LEN(names); i++) {
        char dir[256], gold[256];
        snprintf(dir, sizeof(dir), "shapes/%s", names[i]);
        snprintf(gold, sizeof(gold), "shapes/%s/goldens.json", names[i]);
        golden(dir, gold, NULL, NULL, 64);
        golden(dir, gold, NULL, NULL, 3);
    }
}

/* A mixed prefill/decode schedule: prompts of sequences 0 and 1 together, then decode steps of both, sequence 2's
 * whole prompt joining at step 3 and decoding after. out gets every logit row in order. */
static int schedule_logits(struct engine *e, float *out, int *n_out, char *err)
{
    static const int32_t prompt[3][14] = {{641, 279, 7167, 4264, 3465, 13, 576, 17, 9},
                                          {3, 4, 5, 6, 7},
                                          {100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1100, 1200, 1300, 1400}};
    static const int plen[3] = {9, 5, 14};
    const int vocab = engine_model(e)->cfg.vocab_size;
    int len[3] = {0, 0, 0}, last_row[3] = {-1, -1, -1};
    *n_out = 0;
    for (int step = 0; step < 8; step++) {
        int32_t tok[32], pos[32], slot[32];
        uint8_t want[32];
        int who[32], k = 0;
        for (int s = 0; s < 3; s++) {
            const bool starts = (s < 2 && step == 0) || (s == 2 && step == 3);
            if (starts) {
                for (int i = 0; i < plen[s]; i++) {
                    tok[k] = prompt[s][i] % vocab, pos[k] = i, slot[k] = s, want[k] = i == plen[s] - 1, who[k] = s;
                    k++;
                }
                len[s] = plen[s];
            } else if (last_row[s] >= 0) {
                tok[k] = (int32_t)(sample_argmax(out + (size_t)last_row[s] * vocab, vocab) % 1000 % vocab);
                pos[k] = len[s]++, slot[k] = s, want[k] = 1, who[k] = s;
                k++;
            }
        }
        struct batch b = {.n = k, .token = tok, .pos = pos, .slot = slot, .want_logits = want};
        const int rc = engine_forward(e, &b, NULL, out + (size_t)*n_out * vocab, err);
        if (rc < 0) return rc;
        for (int i = 0, r = *n_out; i < k; i++)
            if (want[i]) last_row[who[i]] = r++;
        *n_out += rc;
    }
    return 0;
}

/* Fusion, graphs and PDL on/off give bit-identical logits over a mixed schedule, and a row's logits do not depend
 * on the other rows of its batch (each sequence alone gives the same bits). */
static void test_engine_invariance(void)
{
    char err[ST_ERR_LEN];
    static const char *models[] = {"models/kjv-qwen3-21m-8bit", "models/kjv-qwen3-21m-4bit", "models/kjv-qwen3-21m",
                                   "models/stories260K"};
    for (size_t mi = 0; mi < (g_quick ? 1 : ST_ARRAY_LEN(models)); mi++) {
        struct model m;
        REQUIRE_MSG(model_load(&m, fixture_path(models[mi]), 0, -1, true, true, err) == 0, "%s", err);
        const int vocab = m.cfg.vocab_size;
        float *ref = malloc(sizeof(float) * (size_t)vocab * 40), *got = malloc(sizeof(float) * (size_t)vocab * 40);
        int n_ref = 0, n_got = 0;
        static const unsigned fl[] = {CUDA_FLAG_DEFAULT, 0, CUDA_FLAG_FUSE, CUDA_FLAG_GRAPHS, CUDA_FLAG_PDL, V1_FLAGS,
                                      CUDA_FLAG_MMV2 | CUDA_FLAG_ATTNV2, CUDA_FLAG_ALL & ~(unsigned)CUDA_FLAG_MMTMA,
                                      CUDA_FLAG_ALL, CUDA_FLAG_DEFAULT};
        for (size_t f = 0; f < (g_quick ? 2 : ST_ARRAY_LEN(fl)); f++) {
            struct engine *e = NULL;
            int rc = open_gpu_engine(&e, &m, 0, 4, 32, err);
            REQUIRE_MSG(rc == 0, "%s", err);
            cuda_backend_set_flags(engine_backend(e), fl[f]);
            for (int rep = 0; rep < 2; rep++) { /* twice: the second run replays graphs */
                rc = schedule_logits(e, f == 0 && rep == 0 ? ref : got, f == 0 && rep == 0 ? &n_ref : &n_got, err);
                CHECK_MSG(rc == 0, "%s: %s", models[mi], err);
                if (f == 0 && rep == 0) continue;
                CHECK_MSG(n_got == n_ref && memcmp(ref, got, sizeof(float) * (size_t)vocab * n_ref) == 0,
                          "%s: logits differ with flags %u (run %d)", models[mi], fl[f], rep);
            }
            engine_free(e);
        }
        /* each sequence alone: prompt 1 then decode, against its rows in the mixed schedule */
        {
            struct engine *e = NULL;
            REQUIRE_MSG(open_gpu_engine(&e, &m, 0, 4, 32, err) == 0, "%s", err);
            static const int32_t p1[5] = {3, 4, 5, 6, 7};
            int32_t pos[5] = {0, 1, 2, 3, 4}, slot[5] = {3, 3, 3, 3, 3};
            uint8_t want[5] = {0, 0, 0, 0, 1};
            struct batch b = {.n = 5, .token = p1, .pos = pos, .slot = slot, .want_logits = want};
            CHECK(engine_forward(e, &b, NULL, got, err) == 1);
            CHECK_MSG(memcmp(got, ref + (size_t)vocab, sizeof(float) * (size_t)vocab) == 0,
                      "%s: prompt logits differ when the sequence is alone", models[mi]);
            /* first decode step of sequence 1 alone (row 1 of step 1 in the schedule) */
            int32_t t1 = (int32_t)(sample_argmax(ref + (size_t)vocab, vocab) % 1000 % vocab), p = 5, s = 3;
            uint8_t w1 = 1;
            struct batch b1 = {.n = 1, .token = &t1, .pos = &p, .slot = &s, .want_logits = &w1};
            CHECK(engine_forward(e, &b1, NULL, got, err) == 1);
            CHECK_MSG(memcmp(got, ref + (size_t)3 * vocab, sizeof(float) * (size_t)vocab) == 0,
                      "%s: decode logits differ when the sequence is alone", models[mi]);
            engine_free(e);
        }
        free(ref);
        free(got);
        model_free(&m);
    }
}

/* ---- pipeline: stages on GPUs give the single-GPU tokens ---- */
#define MAX_TOK 80
struct out {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int n;
    int32_t ids[MAX_TOK];
    float lp[MAX_TOK];
    int32_t top_ids[MAX_TOK][20];
    float top_lp[MAX_TOK][20];
    bool done;
    enum finish_reason why;
    char err[ST_ERR_LEN];
};

static bool on_token(void *ctx, const struct gen_token *t)
{
    struct out *o = ctx;
    if (o->n < MAX_TOK) {
        o->ids[o->n] = t->id;
        o->lp[o->n] = t->logprob;
        for (int k = 0; k < t->n_top && k < 20; k++) {
            o->top_ids[o->n][k] = t->top_ids[k];
            o->top_lp[o->n][k] = t->top_lp[k];
        }
    }
    o->n++;
    return false;
}

static void on_done(void *ctx, enum finish_reason why, const char *err)
{
    struct out *o = ctx;
    pthread_mutex_lock(&o->lock);
    o->done = true;
    o->why = why;
    snprintf(o->err, sizeof(o->err), "%s", err ? err : "");
    pthread_cond_signal(&o->cond);
    pthread_mutex_unlock(&o->lock);
}

static bool wait_out(struct out *o, int timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_s;
    pthread_mutex_lock(&o->lock);
    while (!o->done)
        if (pthread_cond_timedwait(&o->cond, &o->lock, &ts) != 0) break;
    const bool d = o->done;
    pthread_mutex_unlock(&o->lock);
    return d;
}

struct prompt_set {
    int n;
    int32_t *ids[16];
    int len[16], gen[16];
};

static void load_prompts(const char *goldens, const char *key, struct prompt_set *ps)
{
    memset(ps, 0, sizeof(*ps));
    json_t *root = json_load_file(fixture_path(goldens), 0, NULL);
    if (!root) return;
    const json_t *cases = key ? json_object_get(json_object_get(root, "cases"), key) : json_object_get(root, "cases");
    for (size_t i = 0; i < json_array_size(cases) && ps->n < 16; i++) {
        const json_t *c = json_array_get(cases, i);
        ps->ids[ps->n] = json_ids(json_object_get(c, "prompt_ids"), &ps->len[ps->n]);
        const int g = (int)json_array_size(json_object_get(c, "greedy_ids"));
        ps->gen[ps->n] = g < MAX_TOK ? g : MAX_TOK;
        ps->n++;
    }
    json_decref(root);
}

static void run_all(struct executor *x, const struct model_config *cfg, const struct prompt_set *ps, struct out *outs)
{
    char err[ST_ERR_LEN];
    struct sched *s = NULL;
    struct sched_opts so = {.max_queue = 64, .prefill_chunk = 16, .eos_ids = cfg->eos_ids, .n_eos = cfg->n_eos};
    REQUIRE_MSG(sched_init(&s, x, &so, err) == 0, "%s", err);
    static struct gen_request req[16];
    for (int i = 0; i < ps->n; i++) {
        memset(&outs[i], 0, sizeof(outs[i]));
        pthread_mutex_init(&outs[i].lock, NULL);
        pthread_cond_init(&outs[i].cond, NULL);
        memset(&req[i], 0, sizeof(req[i]));
        req[i].prompt = ps->ids[i];
        req[i].n_prompt = ps->len[i];
        sample_params_default(&req[i].sp);
        req[i].sp.temperature = 0;
        req[i].max_tokens = ps->gen[i];
        req[i].n_top = 20;
        req[i].ignore_eos = true;
        req[i].on_token = on_token;
        req[i].on_done = on_done;
        req[i].ctx = &outs[i];
        CHECK_MSG(sched_submit(s, &req[i], err) == 0, "%s", err);
    }
    for (int i = 0; i < ps->n; i++) CHECK_MSG(wait_out(&outs[i], 120), "prompt %d did not finish", i);
    sched_free(s);
}

static void split_matches_single(const char *model_dir, const char *goldens, const char *key)
{
    char err[ST_ERR_LEN];
    struct prompt_set ps;
    load_prompts(goldens, key, &ps);
    REQUIRE(ps.n > 0);
    struct model m;
    REQUIRE_MSG(model_load(&m, fixture_path(model_dir), 0, -1, true, true, err) == 0, "%s", err);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    struct engine *e = NULL;
    struct runner *r = NULL;
    struct executor *x = NULL;
    struct engine_opts eo = {.n_slots = 8, .n_ctx = 256, .max_batch = 64, .max_logits = 8};
    eo.backend.kind = BACKEND_CUDA;
    REQUIRE_MSG(engine_init(&e, &m, &eo, err) == 0, "%s", err);
    REQUIRE(runner_init(&r, e, err) == 0);
    REQUIRE(executor_local_init(&x, r, err) == 0);
    static struct out single[16], split[16];
    run_all(x, &m.cfg, &ps, single);
    x->ops->free(x);
    runner_free(r);
    engine_free(e);
    /* two workers (GPU 0 and GPU 1 when there are two), then one worker + a stage in the coordinator */
    for (int shape = 0; shape < 2; shape++) {
        struct worker *w[2] = {NULL, NULL};
        char addr[2][64];
        const int n_workers = shape == 0 ? 2 : 1;
        bool ok = true;
        for (int i = 0; i < n_workers && ok; i++) {
            char name[32];
            snprintf(name, sizeof(name), "gpu-w%d", i);
            struct worker_opts wo = {.host = "127.0.0.1", .port = 0, .name = name, .kind = BACKEND_CUDA,
                                     .device = g_n_gpus > 1 ? (shape == 0 ? i : 1) : 0, .n_threads = 1};
            ok = worker_start(&w[i], &wo, err) == 0;
            CHECK_MSG(ok, "worker: %s", err);
            if (ok) snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", worker_port(w[i]));
        }
        if (ok) {
            struct pipeline_opts po = {.model_dir = fixture_path(model_dir), .cfg = &m.cfg, .n_workers = n_workers,
                                       .coordinator_stage = shape == 1, .n_slots = 8, .n_ctx = 256, .max_batch = 64,
                                       .device = "cuda:0", .n_threads = 1};
            for (int i = 0; i < n_workers; i++) po.worker_addr[i] = addr[i];
            int rc = pipeline_init(&x, &po, &mf, err);
            CHECK_MSG(rc == 0, "%s", err);
            if (rc == 0) {
                struct pipeline_status st;
                pipeline_get_status(x, &st);
                CHECK_EQ_INT(st.n_stages, 2);
                run_all(x, &m.cfg, &ps, split);
                for (int i = 0; i < ps.n; i++) {
                    CHECK_MSG(split[i].why == FINISH_LENGTH, "prompt %d: finish %d (%s)", i, split[i].why, split[i].err);
                    const int n = ST_MIN(ST_MIN(single[i].n, split[i].n), MAX_TOK);
                    const bool same = single[i].n == split[i].n &&
                                      memcmp(single[i].ids, split[i].ids, sizeof(int32_t) * (size_t)n) == 0 &&
                                      memcmp(single[i].lp, split[i].lp, sizeof(float) * (size_t)n) == 0 &&
                                      memcmp(single[i].top_lp, split[i].top_lp, sizeof(single[i].top_lp[0]) * (size_t)n) == 0;
                    CHECK_MSG(same, "%s, %s: prompt %d: tokens or logprobs differ from the single-GPU run", model_dir,
                              shape == 0 ? "two GPU workers" : "coordinator stage + GPU worker", i);
                }
                fprintf(stderr, "  split %s over %s: %d prompts identical to one GPU\n", model_dir,
                        shape == 0 ? (g_n_gpus > 1 ? "cuda:0 + cuda:1 workers" : "two workers on cuda:0")
                                   : (g_n_gpus > 1 ? "coordinator cuda:0 + worker cuda:1" : "coordinator + worker on cuda:0"),
                        ps.n);
                x->ops->free(x);
            }
        }
        for (int i = 0; i < n_workers; i++)
            if (w[i]) worker_stop(w[i]);
    }
    manifest_free(&mf);
    model_free(&m);
    for (int i = 0; i < ps.n; i++) free(ps.ids[i]);
}

static void test_split_q8(void)
{
    if (!g_quick) split_matches_single("models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8");
}
static void test_split_bf16(void)
{
    if (!g_quick) split_matches_single("models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16");
}
static void test_split_stories(void)
{
    if (!g_quick) split_matches_single("models/stories260K", "goldens/stories260K.goldens.json", NULL);
}

int main(void)
{
    char err[ST_ERR_LEN];
    g_n_gpus = cuda_device_count();
    if (g_n_gpus == 0) {
        fprintf(stderr, "  SKIP test_cuda: no CUDA device on this machine (run make test-cuda on a GPU machine)\n");
        return 77;
    }
    g_quick = getenv("STRATA_TEST_QUICK") && strcmp(getenv("STRATA_TEST_QUICK"), "0") != 0;
    if (!getenv("STRATA_LOG")) log_set_level(LOG_WARN);
    rng_seed(&g_rng, 0x5eed0c0da5ull);
    struct backend_opts co = {.kind = BACKEND_CPU, .n_threads = 1, .reference = true};
    struct backend_opts go = {.kind = BACKEND_CUDA, .device = 0};
    if (backend_init(&g_cpu, &co, err) < 0) {
        fprintf(stderr, "cpu backend: %s\n", err);
        return 1;
    }
    int rc = backend_init(&g_gpu, &go, err);
    if (rc == ST_EUNSUPPORTED) {
        fprintf(stderr, "  SKIP test_cuda: %s\n", err);
        backend_free(g_cpu);
        return 77;
    }
    if (rc < 0) {
        fprintf(stderr, "cuda backend: %s\n", err);
        return 1;
    }
    fprintf(stderr, "  %s, %d GPU(s)%s\n", g_gpu->device_name, g_n_gpus, g_quick ? ", quick" : "");
    RUN(test_matmul_parity);
    RUN(test_matmul_batch_invariance);
    RUN(test_embed);
    RUN(test_rmsnorm);
    RUN(test_rope);
    RUN(test_attention);
    RUN(test_elementwise);
    RUN(test_fusion_ops);
    RUN(test_download);
    RUN(test_profile);
    backend_free(g_gpu);
    backend_free(g_cpu);
    RUN(test_golden_stories);
    RUN(test_golden_qwen3_bf16);
    RUN(test_golden_qwen3_q8);
    RUN(test_golden_qwen3_q4);
    RUN(test_golden_shapes);
    RUN(test_engine_invariance);
    RUN(test_bench_api);
    RUN(test_split_q8);
    RUN(test_split_bf16);
    RUN(test_split_stories);
    return check_done();
}

#else

static void test_cuda_skipped(void) { SKIP("built without CUDA (nvcc not found, or CUDA=0)"); }

int main(void)
{
    RUN(test_cuda_skipped);
    return check_done();
}

#endif
