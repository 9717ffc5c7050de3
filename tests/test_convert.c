/* strata convert / MLX affine quantizer: byte-for-byte against the MLX-quantized fixtures (8-bit and 4-bit),
 * the SIMD quantizer against the scalar reference, hand-derived edge cases, and the converter's handling of
 * sharded input and output, skipped tensors, copied files and bad input. */
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "core/core.h"
#include "model/model.h"
#include "model/quantize.h"

static char tmp_root[256];

/* tmp_root/rel in one of 8 rotating buffers. */
static const char *tmp(const char *rel)
{
    static char buf[8][512];
    static int slot;
    char *b = buf[slot++ & 7];
    snprintf(b, sizeof(buf[0]), "%s/%s", tmp_root, rel);
    return b;
}

static int rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void rm_rf(const char *path) { nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS); }

static bool write_bytes(const char *path, const void *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) return false;
    bool ok = fwrite(data, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

static bool write_text(const char *path, const char *text) { return write_bytes(path, text, strlen(text)); }

static bool files_equal(const char *a, const char *b)
{
    char *x = NULL, *y = NULL;
    size_t nx = 0, ny = 0;
    bool eq = file_read_all(a, &x, &nx, 1u << 30, NULL) == 0 && file_read_all(b, &y, &ny, 1u << 30, NULL) == 0 &&
              nx == ny && memcmp(x, y, nx) == 0;
    free(x);
    free(y);
    return eq;
}

static struct convert_opts opts(int bits, int gs, int n_threads)
{
    struct convert_opts o = {.bits = bits, .group_size = gs, .n_threads = n_threads};
    return o;
}

/* Every tensor of want is in got with the same dtype, shape and bytes, and got has nothing else. */
static void check_same_tensors(const char *want_dir, const char *got_dir)
{
    char err[ST_ERR_LEN];
    struct safetensors want, got;
    REQUIRE_MSG(safetensors_open(&want, want_dir, err) == 0, "%s", err);
    if (safetensors_open(&got, got_dir, err) != 0) {
        CHECK_FAIL_("%s", err);
        safetensors_free(&want);
        return;
    }
    CHECK_EQ_INT(got.n_tensors, want.n_tensors);
    int n_bad = 0;
    for (int i = 0; i < want.n_tensors; i++) {
        const struct st_tensor *w = &want.tensors[i], *g = safetensors_find(&got, w->name);
        if (!g) {
            CHECK_MSG(g, "tensor %s missing from %s", w->name, got_dir);
            continue;
        }
        bool same = g->dtype == w->dtype && g->n_dims == w->n_dims && g->nbytes == w->nbytes &&
                    memcmp(g->shape, w->shape, sizeof(w->shape[0]) * (size_t)w->n_dims) == 0;
        size_t diff = 0;
        if (same)
            for (size_t b = 0; b < w->nbytes; b++) diff += ((const uint8_t *)g->data)[b] != ((const uint8_t *)w->data)[b];
        if ((!same || diff) && n_bad++ < 10)
            CHECK_FAIL_("tensor %s: %s %s [%lld, %lld] vs %s [%lld, %lld], %zu of %zu bytes differ", w->name,
                        same ? "same layout," : "layout differs:", dtype_name(g->dtype), (long long)g->shape[0],
                        (long long)(g->n_dims > 1 ? g->shape[1] : 0), dtype_name(w->dtype), (long long)w->shape[0],
                        (long long)(w->n_dims > 1 ? w->shape[1] : 0), diff, w->nbytes);
    }
    CHECK_EQ_INT(n_bad, 0);
    safetensors_free(&want);
    safetensors_free(&got);
}

static void check_fixture(int bits, int n_threads)
{
    char err[ST_ERR_LEN], out[64], want[128];
    snprintf(out, sizeof(out), "q%d-t%d", bits, n_threads);
    snprintf(want, sizeof(want), "models/kjv-qwen3-21m-%dbit", bits);
    const char *in = fixture_path("models/kjv-qwen3-21m"), *ref = fixture_path(want), *dir = tmp(out);
    if (!file_exists(fixture_path("models/kjv-qwen3-21m/model.safetensors"))) SKIP("fixtures missing: run make fixtures");
    struct convert_opts o = opts(bits, 64, n_threads);
    struct convert_stats s;
    int rc = model_convert(in, dir, &o, &s, err);
    REQUIRE_MSG(rc == 0, "convert: %s", err);
    CHECK_EQ_INT(s.n_quantized, 1 + 8 * 7); /* embed_tokens + 7 matrices per layer */
    CHECK_EQ_INT(s.n_copied, 1 + 8 * 4);    /* final norm + 4 norms per layer */
    CHECK_EQ_INT(s.n_shards, 1);
    check_same_tensors(ref, dir);
    /* the header too: keys sorted, no metadata, like the fixtures */
    char a[1024], b[1024];
    snprintf(a, sizeof(a), "%s/model.safetensors", dir);
    snprintf(b, sizeof(b), "%s/model.safetensors", ref);
    CHECK_MSG(files_equal(a, b), "%s differs from %s", a, b);
    snprintf(a, sizeof(a), "%s/config.json", dir);
    snprintf(b, sizeof(b), "%s/config.json", ref);
    json_t *ja = json_load_file(a, 0, NULL), *jb = json_load_file(b, 0, NULL);
    CHECK_MSG(ja && jb && json_equal(ja, jb), "config.json differs from the fixture's");
    json_decref(ja);
    json_decref(jb);
    CHECK_MSG(files_equal(a, b), "config.json bytes differ from the fixture's");
    static const char *copied[] = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"};
    for (size_t i = 0; i < ST_ARRAY_LEN(copied); i++) {
        snprintf(a, sizeof(a), "%s/%s", dir, copied[i]);
        snprintf(b, sizeof(b), "%s/%s", in, copied[i]);
        CHECK_MSG(files_equal(a, b), "%s not copied", copied[i]);
    }
    struct model m;
    rc = model_load(&m, dir, 0, -1, true, true, err);
    CHECK_MSG(rc == 0, "model_load: %s", err);
    if (rc == 0) {
        CHECK_EQ_INT(m.cfg.q_bits, bits);
        CHECK_EQ_INT(m.cfg.q_group_size, 64);
        CHECK_EQ_INT(m.embed.type, bits == 8 ? WT_Q8 : WT_Q4);
        model_free(&m);
    }
}

static void test_fixture_8bit(void) { check_fixture(8, 3); }
static void test_fixture_4bit(void) { check_fixture(4, 1); }

/* The scalar reference and the SIMD path each reproduce every quantized tensor of both fixtures. */
static void test_fixture_rows_ref_and_simd(void)
{
    char err[ST_ERR_LEN], name[256];
    struct safetensors in, q[2];
    if (!file_exists(fixture_path("models/kjv-qwen3-21m/model.safetensors"))) SKIP("fixtures missing");
    REQUIRE_MSG(safetensors_open(&in, fixture_path("models/kjv-qwen3-21m"), err) == 0, "%s", err);
    REQUIRE_MSG(safetensors_open(&q[0], fixture_path("models/kjv-qwen3-21m-8bit"), err) == 0, "%s", err);
    REQUIRE_MSG(safetensors_open(&q[1], fixture_path("models/kjv-qwen3-21m-4bit"), err) == 0, "%s", err);
    int n_checked = 0, n_diff[2] = {0, 0};
    for (int i = 0; i < in.n_tensors; i++) {
        const struct st_tensor *t = &in.tensors[i];
        if (t->n_dims != 2) continue;
        int64_t rows = t->shape[0], cols = t->shape[1], ng = cols / 64;
        float *w = malloc(sizeof(float) * (size_t)(rows * cols));
        uint32_t *codes = malloc((size_t)(rows * cols));
        uint16_t *sc = malloc(sizeof(uint16_t) * (size_t)(rows * ng)), *bi = malloc(sizeof(uint16_t) * (size_t)(rows * ng));
        REQUIRE(w && codes && sc && bi);
        for (int64_t k = 0; k < rows * cols; k++) w[k] = bf16_to_f32(((const uint16_t *)t->data)[k]);
        size_t base = strlen(t->name) - strlen(".weight");
        for (int b = 0; b < 2; b++) {
            int bits = b == 0 ? 8 : 4;
            for (int ref = 0; ref < 2; ref++) {
                int rc = (ref ? mlx_quantize_rows_ref : mlx_quantize_rows)(w, rows, cols, bits, 64, DT_BF16, codes, sc,
                                                                            bi, err);
                CHECK_MSG(rc == 0, "%s", err);
                const char *suffix[3] = {".weight", ".scales", ".biases"};
                const void *got[3] = {codes, sc, bi};
                size_t bytes[3] = {(size_t)(rows * cols * bits / 8), sizeof(uint16_t) * (size_t)(rows * ng),
                                   sizeof(uint16_t) * (size_t)(rows * ng)};
                for (int k = 0; k < 3; k++) {
                    snprintf(name, sizeof(name), "%.*s%s", (int)base, t->name, suffix[k]);
                    const struct st_tensor *f = safetensors_find(&q[b], name);
                    bool same = f && f->nbytes == bytes[k] && memcmp(f->data, got[k], bytes[k]) == 0;
                    n_diff[ref] += !same;
                    if (!same && n_diff[ref] <= 3)
                        CHECK_FAIL_("%s (%d-bit, %s) differs from the fixture", name, bits, ref ? "reference" : "simd");
                }
            }
        }
        n_checked++;
        free(w);
        free(codes);
        free(sc);
        free(bi);
    }
    CHECK_EQ_INT(n_checked, 1 + 8 * 7);
    CHECK_MSG(n_diff[0] == 0, "simd: %d of %d tensors differ from the fixtures", n_diff[0], n_checked * 6);
    CHECK_MSG(n_diff[1] == 0, "reference: %d of %d tensors differ from the fixtures", n_diff[1], n_checked * 6);
    safetensors_free(&in);
    safetensors_free(&q[0]);
    safetensors_free(&q[1]);
}

/* Random groups of many kinds: the SIMD quantizer equals the scalar reference bit for bit. */
static void test_simd_matches_reference(void)
{
    char err[ST_ERR_LEN];
    struct rng r;
    rng_seed(&r, 20240607);
    static const int gss[] = {32, 64, 128};
    static const enum dtype sdts[] = {DT_BF16, DT_F16, DT_F32};
    int n_cases = 0, n_diff = 0;
    for (int iter = 0; iter < 300; iter++) {
        int bits = (iter & 1) ? 4 : 8, gs = gss[iter % 3];
        enum dtype sdt = sdts[(iter / 3) % 3];
        int64_t rows = 1 + (int64_t)(rng_next(&r) % 7), cols = gs * (int64_t)(1 + rng_next(&r) % 4);
        int64_t n = rows * cols, ng = rows * cols / gs;
        float *w = malloc(sizeof(float) * (size_t)n);
        uint32_t *q1 = malloc((size_t)n), *q2 = malloc((size_t)n);
        float *s1 = malloc(sizeof(float) * (size_t)ng), *s2 = malloc(sizeof(float) * (size_t)ng);
        float *b1 = malloc(sizeof(float) * (size_t)ng), *b2 = malloc(sizeof(float) * (size_t)ng);
        REQUIRE(w && q1 && q2 && s1 && s2 && b1 && b2);
        int kind = iter % 8;
        float amp = kind == 5 ? 1e-9f : kind == 6 ? 1e30f : 1.0f;
        for (int64_t i = 0; i < n; i++) {
            float v = rng_range(&r, -amp, amp);
            if (kind == 1) v = fabsf(v);                          /* all positive: edge w_max */
            if (kind == 2) v = -fabsf(v);                         /* all negative: edge w_min */
            if (kind == 3) v = (float)(int)(v * 16.0f) * 0.125f;  /* a coarse grid: exact .5 ties */
            if (kind == 4 && (i / gs) % 2) v = 0.375f;            /* constant groups */
            if (kind == 7) v = bf16_to_f32(f32_to_bf16(v * 0.02f)); /* bf16 weights, like a model */
            w[i] = v;
        }
        memset(q1, 0, (size_t)n);
        memset(q2, 0xff, (size_t)n);
        int rc1 = mlx_quantize_rows(w, rows, cols, bits, gs, sdt, q1, s1, b1, err);
        int rc2 = mlx_quantize_rows_ref(w, rows, cols, bits, gs, sdt, q2, s2, b2, err);
        CHECK(rc1 == 0 && rc2 == 0);
        size_t sb = dtype_size(sdt) * (size_t)ng;
        bool same = memcmp(q1, q2, (size_t)(n * bits / 8)) == 0 && memcmp(s1, s2, sb) == 0 && memcmp(b1, b2, sb) == 0;
        if (!same && ++n_diff <= 3)
            CHECK_FAIL_("iter %d (bits %d, gs %d, %s, kind %d): SIMD differs from the reference", iter, bits, gs,
                        dtype_name(sdt), kind);
        n_cases++;
        free(w);
        free(q1);
        free(q2);
        free(s1);
        free(s2);
        free(b1);
        free(b2);
    }
    CHECK_EQ_INT(n_cases, 300);
    CHECK_EQ_INT(n_diff, 0);
}

static uint32_t code_at(const uint32_t *q, int bits, int i)
{
    int per = 32 / bits;
    return (q[i / per] >> (bits * (i % per))) & ((1u << bits) - 1);
}

/* Quantizes one group with both paths (they must agree) and returns the codes, scale and bias (float32). */
static void quant_group(const float *w, int gs, int bits, uint32_t *codes, float *scale, float *bias)
{
    char err[ST_ERR_LEN];
    uint32_t q[2][MLX_MAX_GROUP_SIZE / 4];
    float s[2], b[2];
    CHECK(mlx_quantize_rows(w, 1, gs, bits, gs, DT_F32, q[0], &s[0], &b[0], err) == 0);
    CHECK(mlx_quantize_rows_ref(w, 1, gs, bits, gs, DT_F32, q[1], &s[1], &b[1], err) == 0);
    CHECK(memcmp(q[0], q[1], (size_t)(gs * bits / 8)) == 0 && memcmp(s, s + 1, 4) == 0 && memcmp(b, b + 1, 4) == 0);
    for (int i = 0; i < gs; i++) codes[i] = code_at(q[0], bits, i);
    *scale = s[0];
    *bias = b[0];
}

/* w_max == w_min: the scale falls to -1e-7, the bias is the value, codes 0: dequantizes exactly. */
static void test_constant_group(void)
{
    for (int sign = -1; sign <= 1; sign += 2) {
        float w[64], s, b;
        uint32_t c[64];
        for (int i = 0; i < 64; i++) w[i] = 0.75f * (float)sign;
        quant_group(w, 64, 8, c, &s, &b);
        for (int i = 0; i < 64; i++) CHECK_EQ_INT(c[i], 0);
        CHECK(b == 0.75f * (float)sign);
        CHECK(s < 0.0f && fabsf(s + 1e-7f) < 1e-9f);
        /* stored in bf16: bias 0.75 is exact, so the group dequantizes exactly */
        uint16_t qs, qb;
        uint32_t q[16];
        char err[ST_ERR_LEN];
        CHECK(mlx_quantize_rows(w, 1, 64, 4, 64, DT_BF16, q, &qs, &qb, err) == 0);
        CHECK(bf16_to_f32(qs) * 0.0f + bf16_to_f32(qb) == 0.75f * (float)sign);
        CHECK(q[0] == 0 && q[7] == 0);
    }
}

/* All zeros: q0 is 0, so the bias stays 0 and the scale is -1e-7 (stored as bf16). */
static void test_zero_group(void)
{
    float w[32] = {0}, s, b;
    uint32_t c[32];
    quant_group(w, 32, 4, c, &s, &b);
    for (int i = 0; i < 32; i++) CHECK_EQ_INT(c[i], 0);
    CHECK(b == 0.0f && !signbit(b));
    CHECK(s == -1e-7f);
    uint16_t qs, qb;
    uint32_t q[8];
    char err[ST_ERR_LEN];
    CHECK(mlx_quantize_rows(w, 1, 32, 8, 32, DT_BF16, q, &qs, &qb, err) == 0);
    CHECK_EQ_INT(qs, f32_to_bf16(-1e-7f));
    CHECK_EQ_INT(qb, 0);
    /* tiny values: |edge / 1e-7| < 0.5 -> q0 = 0, bias 0, codes 0 */
    for (int i = 0; i < 32; i++) w[i] = (i % 3) ? 1e-9f : 5e-10f;
    quant_group(w, 32, 8, c, &s, &b);
    CHECK(b == 0.0f && s == -1e-7f);
    for (int i = 0; i < 32; i++) CHECK_EQ_INT(c[i], 0);
}

/* |w_min| > |w_max|: edge w_min, positive scale: w_min -> 0, w_max -> 255. */
static void test_min_edge_group(void)
{
    float w[64], s, b;
    uint32_t c[64];
    for (int i = 0; i < 64; i++) w[i] = -0.5f;
    w[3] = -1.0f;
    w[40] = 0.5f;
    quant_group(w, 64, 8, c, &s, &b);
    CHECK(b == -1.0f);
    CHECK(s == -1.0f / -170.0f); /* q0 = rint(-1 / (1.5/255)) = -170 */
    CHECK_EQ_INT(c[3], 0);
    CHECK_EQ_INT(c[40], 255);
    CHECK_EQ_INT(c[0], 85);
}

/* |w_max| >= |w_min|: edge w_max, negative scale: w_max -> 0, w_min -> 255 (and 15 at 4 bits). */
static void test_max_edge_group(void)
{
    float w[64], s, b;
    uint32_t c[64];
    for (int i = 0; i < 64; i++) w[i] = 0.5f;
    w[7] = 1.0f;
    w[63] = -0.5f;
    quant_group(w, 64, 8, c, &s, &b);
    CHECK(b == 1.0f);
    CHECK(s == 1.0f / -170.0f);
    CHECK_EQ_INT(c[7], 0);
    CHECK_EQ_INT(c[63], 255);
    CHECK_EQ_INT(c[0], 85);
    quant_group(w, 64, 4, c, &s, &b); /* 15 bins: q0 = rint(1 / -0.1) = -10 */
    CHECK(b == 1.0f && s == 1.0f / -10.0f);
    CHECK_EQ_INT(c[7], 0);
    CHECK_EQ_INT(c[63], 15);
}

/* Codes and q0 that land exactly on .5 round half to even, like rint. */
static void test_round_half_even(void)
{
    float w[32], s, b;
    uint32_t c[64];
    for (int i = 0; i < 32; i++) w[i] = 7.0f;
    w[0] = 0.0f;
    w[1] = 15.0f;
    w[2] = 2.5f;  /* (w - 15) / -1 = 12.5 -> 12 */
    w[3] = 3.5f;  /* 11.5 -> 12 */
    w[4] = 0.5f;  /* 14.5 -> 14 */
    w[5] = 1.5f;  /* 13.5 -> 14 */
    w[6] = 14.5f; /* 0.5 -> 0 */
    quant_group(w, 32, 4, c, &s, &b);
    CHECK(s == -1.0f && b == 15.0f);
    static const uint32_t want[7] = {15, 0, 12, 12, 14, 14, 0};
    for (int i = 0; i < 7; i++) CHECK_MSG(c[i] == want[i], "code %d: %u, want %u", i, c[i], want[i]);
    CHECK_EQ_INT(c[31], 8);
    /* q0 = rint(-509 / 2) = rint(-254.5) = -254 (not -255) */
    float v[64];
    for (int i = 0; i < 64; i++) v[i] = 0.0f;
    v[10] = -509.0f;
    v[20] = 1.0f;
    quant_group(v, 64, 8, c, &s, &b);
    CHECK(b == -509.0f);
    CHECK(s == -509.0f / -254.0f);
    CHECK_EQ_INT(c[10], 0);
    CHECK_EQ_INT(c[0], 254);
}

static void test_bad_arguments(void)
{
    char err[ST_ERR_LEN];
    float w[256];
    uint32_t q[256];
    uint16_t s[8], b[8];
    for (int i = 0; i < 256; i++) w[i] = (float)i / 256.0f;
    static const int bad_bits[] = {0, 1, 2, 3, 5, 6, 16, 32};
    for (size_t i = 0; i < ST_ARRAY_LEN(bad_bits); i++)
        CHECK_EQ_INT(mlx_quantize_rows(w, 1, 128, bad_bits[i], 64, DT_BF16, q, s, b, err), ST_EINVAL);
    static const int bad_gs[] = {0, 1, 16, 48, 96, 256, -64};
    for (size_t i = 0; i < ST_ARRAY_LEN(bad_gs); i++)
        CHECK_EQ_INT(mlx_quantize_rows(w, 1, 128, 8, bad_gs[i], DT_BF16, q, s, b, err), ST_EINVAL);
    CHECK_EQ_INT(mlx_quantize_rows(w, 1, 96, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL); /* 96 % 64 */
    CHECK(strstr(err, "multiple") != NULL);
    CHECK_EQ_INT(mlx_quantize_rows(w, 1, 0, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL);
    CHECK_EQ_INT(mlx_quantize_rows(w, 1, 128, 8, 64, DT_U8, q, s, b, err), ST_EINVAL);
    CHECK_EQ_INT(mlx_quantize_check(8, 64, err), 0);
    CHECK_EQ_INT(mlx_quantize_check(4, 128, err), 0);
    CHECK_EQ_INT(mlx_quantize_check(4, 32, err), 0);
    /* non-finite values are rejected, naming where */
    w[70] = NAN;
    CHECK_EQ_INT(mlx_quantize_rows(w, 2, 128, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "row 0, columns 64..127") != NULL, "%s", err);
    CHECK_EQ_INT(mlx_quantize_rows_ref(w, 2, 128, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL);
    w[70] = 0.5f;
    w[200] = -INFINITY;
    CHECK_EQ_INT(mlx_quantize_rows(w, 2, 128, 4, 32, DT_BF16, q, s, b, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "row 1, columns 64..95") != NULL, "%s", err);
    w[200] = 0.5f;
    w[0] = -3e38f; /* finite, but the range overflows float32 */
    w[1] = 3e38f;
    CHECK_EQ_INT(mlx_quantize_rows(w, 1, 128, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL);
    CHECK_EQ_INT(mlx_quantize_rows_ref(w, 1, 128, 8, 64, DT_BF16, q, s, b, err), ST_EINVAL);
}

/* ---- the converter on small generated models ---- */

struct gen_tensor {
    const char *name;
    enum dtype dt;
    int n_dims;
    int64_t d0, d1, d2;
};

/* Writes dir/model.safetensors with seeded values (float dtypes in [-0.1, 0.1]) and the given config text. */
static bool make_model(const char *dir, const struct gen_tensor *g, int n, const char *config)
{
    char err[ST_ERR_LEN], path[600];
    struct st_writer_entry e[16];
    void *bufs[16] = {0};
    struct rng r;
    rng_seed(&r, 7);
    mkdir(dir, 0755);
    bool ok = n <= 16;
    for (int i = 0; ok && i < n; i++) {
        int64_t count = g[i].d0 * (g[i].n_dims > 1 ? g[i].d1 : 1) * (g[i].n_dims > 2 ? g[i].d2 : 1);
        size_t nbytes = (size_t)count * dtype_size(g[i].dt);
        bufs[i] = calloc(1, nbytes + 1);
        if (!bufs[i]) {
            ok = false;
            break;
        }
        for (int64_t k = 0; k < count; k++) {
            float v = rng_range(&r, -0.1f, 0.1f);
            switch (g[i].dt) {
            case DT_F32: ((float *)bufs[i])[k] = v; break;
            case DT_F16: ((uint16_t *)bufs[i])[k] = f32_to_f16(v); break;
            case DT_BF16: ((uint16_t *)bufs[i])[k] = f32_to_bf16(v); break;
            case DT_I32: ((int32_t *)bufs[i])[k] = (int32_t)k; break;
            default: break;
            }
        }
        memset(&e[i], 0, sizeof(e[i]));
        e[i].name = (char *)g[i].name;
        e[i].dtype = g[i].dt;
        e[i].n_dims = g[i].n_dims;
        e[i].shape[0] = g[i].d0;
        e[i].shape[1] = g[i].d1;
        e[i].shape[2] = g[i].d2;
        e[i].data = bufs[i];
        e[i].nbytes = nbytes;
    }
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    if (ok && safetensors_write(path, e, n, NULL, err) != 0) {
        fprintf(stderr, "make_model: %s\n", err);
        ok = false;
    }
    for (int i = 0; i < n; i++) free(bufs[i]);
    snprintf(path, sizeof(path), "%s/config.json", dir);
    return ok && (!config || write_text(path, config));
}

/* What is quantized and what is copied; dtypes of scales; values; which files travel; a one-line config. */
static void test_convert_tensor_selection(void)
{
    char err[ST_ERR_LEN], path[600];
    static const struct gen_tensor g[] = {
        {"model.embed_tokens.weight", DT_BF16, 2, 10, 64, 0}, /* quantized */
        {"a.weight", DT_BF16, 2, 4, 96, 0},                   /* 96 % 64: skipped, as MLX's nn.quantize does */
        {"b.weight", DT_F32, 2, 3, 128, 0},                   /* quantized, F32 scales */
        {"c.weight", DT_F16, 2, 2, 64, 0},                    /* quantized, F16 scales */
        {"n.weight", DT_BF16, 1, 64, 0, 0},                   /* a norm: copied */
        {"p.bias", DT_BF16, 1, 3, 0, 0},                      /* copied */
        {"p.proj", DT_BF16, 2, 2, 64, 0},                     /* not a .weight: copied */
        {"e.weight", DT_BF16, 3, 2, 2, 64},                   /* 3-D: copied */
        {"i.weight", DT_I32, 2, 2, 64, 0},                    /* not float: copied */
    };
    const char *in = tmp("sel-in"), *out = tmp("sel-out");
    REQUIRE(make_model(in, g, (int)ST_ARRAY_LEN(g), "{\"model_type\":\"x\",\"torch_dtype\":\"bfloat16\"}"));
    snprintf(path, sizeof(path), "%s/tokenizer.json", in);
    REQUIRE(write_text(path, "{\"version\":\"1.0\"}"));
    snprintf(path, sizeof(path), "%s/pytorch_model.bin", in);
    REQUIRE(write_text(path, "not copied"));
    snprintf(path, sizeof(path), "%s/.hidden", in);
    REQUIRE(write_text(path, "not copied"));
    snprintf(path, sizeof(path), "%s/sub", in);
    mkdir(path, 0755);
    struct convert_opts o = opts(4, 64, 2);
    struct convert_stats s;
    REQUIRE_MSG(model_convert(in, out, &o, &s, err) == 0, "%s", err);
    CHECK_EQ_INT(s.n_quantized, 3);
    CHECK_EQ_INT(s.n_copied, 6);
    CHECK_EQ_INT(s.n_files_copied, 1);
    snprintf(path, sizeof(path), "%s/tokenizer.json", out);
    CHECK(file_exists(path));
    snprintf(path, sizeof(path), "%s/pytorch_model.bin", out);
    CHECK(!file_exists(path));
    snprintf(path, sizeof(path), "%s/.hidden", out);
    CHECK(!file_exists(path));
    snprintf(path, sizeof(path), "%s/config.json", out);
    json_t *cfg = json_load_file(path, 0, NULL);
    CHECK(cfg && json_integer_value(json_object_get(json_object_get(cfg, "quantization"), "bits")) == 4 &&
          json_integer_value(json_object_get(json_object_get(cfg, "quantization_config"), "group_size")) == 64 &&
          strcmp(json_string_value(json_object_get(cfg, "model_type")), "x") == 0);
    json_decref(cfg);

    struct safetensors si, so;
    REQUIRE_MSG(safetensors_open(&si, in, err) == 0, "%s", err);
    if (safetensors_open(&so, out, err) != 0) {
        CHECK_FAIL_("%s", err);
        safetensors_free(&si);
        return;
    }
    CHECK_EQ_INT(so.n_tensors, 6 + 3 * 3);
    static const char *copied[] = {"a.weight", "n.weight", "p.bias", "p.proj", "e.weight", "i.weight"};
    for (size_t i = 0; i < ST_ARRAY_LEN(copied); i++) {
        const struct st_tensor *a = safetensors_find(&si, copied[i]), *b = safetensors_find(&so, copied[i]);
        CHECK_MSG(a && b && a->dtype == b->dtype && a->n_dims == b->n_dims && a->nbytes == b->nbytes &&
                      memcmp(a->data, b->data, a->nbytes) == 0 && memcmp(a->shape, b->shape, sizeof(a->shape)) == 0,
                  "%s not copied as is", copied[i]);
    }
    static const struct {
        const char *base;
        enum dtype sdt;
    } quantized[] = {{"model.embed_tokens", DT_BF16}, {"b", DT_F32}, {"c", DT_F16}};
    for (size_t i = 0; i < ST_ARRAY_LEN(quantized); i++) {
        char n[3][128];
        snprintf(n[0], sizeof(n[0]), "%s.weight", quantized[i].base);
        snprintf(n[1], sizeof(n[1]), "%s.scales", quantized[i].base);
        snprintf(n[2], sizeof(n[2]), "%s.biases", quantized[i].base);
        const struct st_tensor *t = safetensors_find(&si, n[0]), *qw = safetensors_find(&so, n[0]);
        const struct st_tensor *qs = safetensors_find(&so, n[1]), *qb = safetensors_find(&so, n[2]);
        if (!t || !qw || !qs || !qb) {
            CHECK_MSG(0, "%s: quantized triple missing", quantized[i].base);
            continue;
        }
        int64_t rows = t->shape[0], cols = t->shape[1], ng = cols / 64;
        CHECK(qw->dtype == DT_U32 && qw->shape[0] == rows && qw->shape[1] == cols * 4 / 32);
        CHECK(qs->dtype == quantized[i].sdt && qs->shape[0] == rows && qs->shape[1] == ng);
        CHECK(qb->dtype == quantized[i].sdt && qb->shape[0] == rows && qb->shape[1] == ng);
        /* the same bytes as quantizing the float32 values directly, and close to them dequantized */
        float *w = malloc(sizeof(float) * (size_t)(rows * cols)), *row = malloc(sizeof(float) * (size_t)cols);
        uint32_t *q = malloc((size_t)(rows * cols));
        uint8_t *sc = malloc(4 * (size_t)(rows * ng)), *bi = malloc(4 * (size_t)(rows * ng));
        REQUIRE(w && row && q && sc && bi);
        struct weight src = {.type = t->dtype == DT_F32 ? WT_F32 : t->dtype == DT_F16 ? WT_F16 : WT_BF16,
                             .rows = rows, .cols = cols, .data = t->data};
        for (int64_t r = 0; r < rows; r++) weight_row_f32(&src, r, w + r * cols);
        CHECK(mlx_quantize_rows(w, rows, cols, 4, 64, quantized[i].sdt, q, sc, bi, err) == 0);
        CHECK(memcmp(q, qw->data, qw->nbytes) == 0 && memcmp(sc, qs->data, qs->nbytes) == 0 &&
              memcmp(bi, qb->data, qb->nbytes) == 0);
        struct weight qm = {.type = WT_Q4, .rows = rows, .cols = cols, .data = qw->data, .scales = qs->data,
                            .biases = qb->data, .sdtype = quantized[i].sdt, .group_size = 64};
        double max_err = 0;
        for (int64_t r = 0; r < rows; r++) {
            weight_row_f32(&qm, r, row);
            for (int64_t k = 0; k < cols; k++) max_err = fmax(max_err, fabs((double)row[k] - w[r * cols + k]));
        }
        /* range 0.2 over 15 bins, a step of 0.0133: rounding costs half a step, but MLX's snapping of the scale
         * to edge/q0 can push the far end past code 15 where it is clamped: up to a step, plus bf16 rounding */
        CHECK_MSG(max_err < 0.015, "%s: dequantized max error %g", quantized[i].base, max_err);
        free(w);
        free(row);
        free(q);
        free(sc);
        free(bi);
    }
    safetensors_free(&si);
    safetensors_free(&so);
}

/* Sharded input (an index over 3 files) converts to the same bytes; a small shard limit gives sharded output
 * that loads to the same tensors; converting again with overwrite to one file removes the stale shards. */
static void test_convert_sharded(void)
{
    char err[ST_ERR_LEN], path[600];
    if (!file_exists(fixture_path("models/kjv-qwen3-21m/model.safetensors"))) SKIP("fixtures missing");
    struct safetensors st;
    REQUIRE_MSG(safetensors_open(&st, fixture_path("models/kjv-qwen3-21m"), err) == 0, "%s", err);
    const char *in = tmp("shard-in"), *out = tmp("shard-out");
    mkdir(in, 0755);
    /* three shards: embed_tokens alone, then the rest split in two */
    json_t *wm = json_object();
    struct st_writer_entry *e = calloc((size_t)st.n_tensors, sizeof(*e));
    REQUIRE(wm && e);
    for (int part = 0; part < 3; part++) {
        int n = 0;
        char shard[64];
        snprintf(shard, sizeof(shard), "model-%05d-of-00003.safetensors", part + 1);
        for (int i = 0; i < st.n_tensors; i++) {
            const struct st_tensor *t = &st.tensors[i];
            int p = strcmp(t->name, "model.embed_tokens.weight") == 0 ? 0 : strstr(t->name, "layers.") && atoi(strstr(t->name, "layers.") + 7) < 4 ? 1 : 2;
            if (p != part) continue;
            e[n].name = t->name;
            e[n].dtype = t->dtype;
            e[n].n_dims = t->n_dims;
            memcpy(e[n].shape, t->shape, sizeof(t->shape));
            e[n].data = t->data;
            e[n].nbytes = t->nbytes;
            json_object_set_new(wm, t->name, json_string(shard));
            n++;
        }
        snprintf(path, sizeof(path), "%s/%s", in, shard);
        CHECK_MSG(safetensors_write(path, e, n, NULL, err) == 0, "%s", err);
    }
    json_t *idx = json_pack("{s:{s:I},s:o}", "metadata", "total_size", (json_int_t)0, "weight_map", wm);
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", in);
    CHECK(json_dump_file(idx, path, JSON_INDENT(2)) == 0);
    json_decref(idx);
    free(e);
    safetensors_free(&st);
    static const char *files[] = {"config.json", "tokenizer_config.json", "generation_config.json"};
    for (size_t i = 0; i < ST_ARRAY_LEN(files); i++) {
        char *text = NULL;
        size_t len = 0;
        snprintf(path, sizeof(path), "%s/%s", fixture_path("models/kjv-qwen3-21m"), files[i]);
        REQUIRE(file_read_all(path, &text, &len, 1u << 20, NULL) == 0);
        snprintf(path, sizeof(path), "%s/%s", in, files[i]);
        CHECK(write_bytes(path, text, len));
        free(text);
    }

    struct convert_opts o = opts(8, 64, 2);
    o.max_shard_bytes = 8u << 20;
    struct convert_stats s;
    REQUIRE_MSG(model_convert(in, out, &o, &s, err) == 0, "%s", err);
    CHECK_EQ_INT(s.n_shards, 3); /* 22.8 MB in 8 MB shards; the 20.6 MB embedding goes over on its own */
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out);
    json_t *ix = json_load_file(path, 0, NULL);
    CHECK(ix && (uint64_t)json_integer_value(json_object_get(json_object_get(ix, "metadata"), "total_size")) == s.out_bytes);
    CHECK(ix && json_object_size(json_object_get(ix, "weight_map")) == 57 * 3 + 33);
    json_decref(ix);
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    CHECK(!file_exists(path));
    check_same_tensors(fixture_path("models/kjv-qwen3-21m-8bit"), out);

    /* again into the same folder: refused without overwrite, then one file with it */
    o.max_shard_bytes = 0;
    CHECK_EQ_INT(model_convert(in, out, &o, &s, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "already holds a model") != NULL, "%s", err);
    o.overwrite = true;
    REQUIRE_MSG(model_convert(in, out, &o, &s, err) == 0, "%s", err);
    CHECK_EQ_INT(s.n_shards, 1);
    snprintf(path, sizeof(path), "%s/model.safetensors.index.json", out);
    CHECK(!file_exists(path));
    snprintf(path, sizeof(path), "%s/model-00001-of-00003.safetensors", out);
    CHECK(!file_exists(path));
    char a[600];
    snprintf(path, sizeof(path), "%s/model.safetensors", out);
    snprintf(a, sizeof(a), "%s/model.safetensors", fixture_path("models/kjv-qwen3-21m-8bit"));
    CHECK_MSG(files_equal(path, a), "sharded input: output differs from the fixture");
}

static void test_convert_rejects(void)
{
    char err[ST_ERR_LEN], path[600];
    struct convert_opts o = opts(8, 64, 1);
    /* an MLX-quantized model */
    if (file_exists(fixture_path("models/kjv-qwen3-21m-8bit/model.safetensors"))) {
        CHECK_EQ_INT(model_convert(fixture_path("models/kjv-qwen3-21m-8bit"), tmp("rej-q"), &o, NULL, err), ST_EINVAL);
        CHECK_MSG(strstr(err, "already quantized") != NULL, "%s", err);
    }
    /* quantized tensors under a config that does not say so */
    static const struct gen_tensor gq[] = {{"x.weight", DT_U32, 2, 4, 16, 0}, {"x.scales", DT_BF16, 2, 4, 2, 0},
                                           {"x.biases", DT_BF16, 2, 4, 2, 0}};
    REQUIRE(make_model(tmp("rej-qt"), gq, 3, "{}"));
    CHECK_EQ_INT(model_convert(tmp("rej-qt"), tmp("rej-qt-out"), &o, NULL, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "already quantized") != NULL, "%s", err);
    /* output into the input */
    static const struct gen_tensor g[] = {{"w.weight", DT_BF16, 2, 2, 64, 0}};
    const char *in = tmp("rej-in");
    REQUIRE(make_model(in, g, 1, "{\n  \"a\": 1\n}\n"));
    CHECK_EQ_INT(model_convert(in, in, &o, NULL, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "input directory") != NULL, "%s", err);
    /* bad bits / group size */
    struct convert_opts bad = opts(3, 64, 1);
    CHECK_EQ_INT(model_convert(in, tmp("rej-out"), &bad, NULL, err), ST_EINVAL);
    bad = opts(8, 100, 1);
    CHECK_EQ_INT(model_convert(in, tmp("rej-out"), &bad, NULL, err), ST_EINVAL);
    /* missing input, missing config, config not an object, no weights */
    CHECK(model_convert(tmp("no-such-dir"), tmp("rej-out"), &o, NULL, err) < 0);
    const char *nocfg = tmp("rej-nocfg");
    REQUIRE(make_model(nocfg, g, 1, NULL));
    CHECK_EQ_INT(model_convert(nocfg, tmp("rej-out"), &o, NULL, err), ST_EIO);
    CHECK_MSG(strstr(err, "config.json") != NULL, "%s", err);
    snprintf(path, sizeof(path), "%s/config.json", nocfg);
    REQUIRE(write_text(path, "[1, 2]"));
    CHECK_EQ_INT(model_convert(nocfg, tmp("rej-out"), &o, NULL, err), ST_EFORMAT);
    REQUIRE(write_text(path, "{\"a\": "));
    CHECK_EQ_INT(model_convert(nocfg, tmp("rej-out"), &o, NULL, err), ST_EFORMAT);
    const char *noweights = tmp("rej-nowt");
    mkdir(noweights, 0755);
    snprintf(path, sizeof(path), "%s/config.json", noweights);
    REQUIRE(write_text(path, "{}"));
    CHECK(model_convert(noweights, tmp("rej-out"), &o, NULL, err) < 0);
    /* a truncated safetensors file */
    snprintf(path, sizeof(path), "%s/model.safetensors", noweights);
    REQUIRE(write_bytes(path, "\x40\x00\x00\x00\x00\x00\x00\x00{\"w.weight\"", 19));
    CHECK_EQ_INT(model_convert(noweights, tmp("rej-out"), &o, NULL, err), ST_EFORMAT);
    /* a NaN in a weight: rejected with the tensor named, nothing left behind */
    const char *nan_in = tmp("rej-nan"), *nan_out = tmp("rej-nan-out");
    REQUIRE(make_model(nan_in, g, 1, "{}"));
    struct safetensors st;
    snprintf(path, sizeof(path), "%s/model.safetensors", nan_in);
    char *bytes = NULL;
    size_t len = 0;
    REQUIRE(file_read_all(path, &bytes, &len, 1u << 20, NULL) == 0);
    REQUIRE(safetensors_open_file(&st, path, err) == 0);
    size_t off = (size_t)((const uint8_t *)st.tensors[0].data - (const uint8_t *)st.files[0].map);
    safetensors_free(&st);
    uint16_t nan_bf16 = 0x7fc0;
    memcpy(bytes + off + 2 * (64 + 5), &nan_bf16, 2); /* row 1, column 5 */
    REQUIRE(write_bytes(path, bytes, len));
    free(bytes);
    CHECK_EQ_INT(model_convert(nan_in, nan_out, &o, NULL, err), ST_EINVAL);
    CHECK_MSG(strstr(err, "w.weight") && strstr(err, "row 1") && strstr(err, "non-finite"), "%s", err);
    snprintf(path, sizeof(path), "%s/model.safetensors", nan_out);
    CHECK(!file_exists(path));
    snprintf(path, sizeof(path), "%s/model.safetensors.tmp", nan_out);
    CHECK(!file_exists(path));
    snprintf(path, sizeof(path), "%s/config.json", nan_out);
    CHECK(!file_exists(path));
}

/* Config text: the keys follow the file's indentation; a one-line or empty object stays valid JSON. */
static void test_convert_config_forms(void)
{
    char err[ST_ERR_LEN], path[600];
    static const struct gen_tensor g[] = {{"w.weight", DT_BF16, 2, 2, 128, 0}};
    static const struct {
        const char *in, *want;
    } cases[] = {
        {"{}", "{\"quantization\":{\"group_size\":128,\"bits\":4},\"quantization_config\":{\"group_size\":128,\"bits\":4}}"},
        {"{\"a\":1}\n", "{\"a\":1,\"quantization\":{\"group_size\":128,\"bits\":4},\"quantization_config\":{\"group_size\":128,\"bits\":4}}\n"},
        {"{\n    \"a\": [1, 2]\n}\n",
         "{\n    \"a\": [1, 2],\n    \"quantization\": {\n        \"group_size\": 128,\n        \"bits\": 4\n    },\n"
         "    \"quantization_config\": {\n        \"group_size\": 128,\n        \"bits\": 4\n    }\n}\n"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char in[64], out[64];
        snprintf(in, sizeof(in), "cfg-in-%zu", i);
        snprintf(out, sizeof(out), "cfg-out-%zu", i);
        REQUIRE(make_model(tmp(in), g, 1, cases[i].in));
        struct convert_opts o = opts(4, 128, 1);
        REQUIRE_MSG(model_convert(tmp(in), tmp(out), &o, NULL, err) == 0, "%s", err);
        char *text = NULL;
        snprintf(path, sizeof(path), "%s/config.json", tmp(out));
        REQUIRE(file_read_all(path, &text, NULL, 1u << 20, NULL) == 0);
        CHECK_STR(text, cases[i].want);
        free(text);
        json_t *j = json_loads(cases[i].want, 0, NULL);
        CHECK(json_is_object(j) && json_object_size(j) >= 2);
        json_decref(j);
    }
    /* a config that names quantization_config as null: the keys are set once, not appended twice */
    REQUIRE(make_model(tmp("cfg-null"), g, 1, "{\"quantization_config\": null, \"eps\": 1e-06}"));
    struct convert_opts o = opts(8, 32, 1);
    REQUIRE_MSG(model_convert(tmp("cfg-null"), tmp("cfg-null-out"), &o, NULL, err) == 0, "%s", err);
    snprintf(path, sizeof(path), "%s/config.json", tmp("cfg-null-out"));
    json_error_t je;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
    CHECK_MSG(j, "%s", je.text);
    CHECK(json_integer_value(json_object_get(json_object_get(j, "quantization_config"), "bits")) == 8);
    CHECK(json_integer_value(json_object_get(json_object_get(j, "quantization"), "group_size")) == 32);
    CHECK(json_real_value(json_object_get(j, "eps")) == 1e-06);
    json_decref(j);
}

int main(void)
{
    snprintf(tmp_root, sizeof(tmp_root), "%s/strata-convert-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(tmp_root)) {
        fprintf(stderr, "mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    log_set_level(LOG_ERROR);
    RUN(test_constant_group);
    RUN(test_zero_group);
    RUN(test_min_edge_group);
    RUN(test_max_edge_group);
    RUN(test_round_half_even);
    RUN(test_bad_arguments);
    RUN(test_simd_matches_reference);
    RUN(test_fixture_rows_ref_and_simd);
    RUN(test_fixture_8bit);
    RUN(test_fixture_4bit);
    RUN(test_convert_tensor_selection);
    RUN(test_convert_sharded);
    RUN(test_convert_rejects);
    RUN(test_convert_config_forms);
    rm_rf(tmp_root);
    return check_done();
}
