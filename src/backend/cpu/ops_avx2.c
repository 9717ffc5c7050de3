/* ops_avx2: AVX2 + FMA kernels (x86-64), selected at run time. Dequantization is fused into the dot product:
 * for an MLX group, sum_c (s*q_c + b) * x_c = s * sum_c q_c*x_c + b * sum_c x_c. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_kernels.h"
#include "core/core.h"

#define AVX2 __attribute__((target("avx2,fma,f16c")))

AVX2 static inline float hsum8(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

AVX2 static float avx2_dot(const float *a, const float *b, int n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float acc = hsum8(_mm256_add_ps(s0, s1));
    for (; i < n; i++) acc += a[i] * b[i];
    return acc;
}

AVX2 static void avx2_axpy(float *y, float a, const float *x, int n)
{
    __m256 va = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}

AVX2 static void avx2_rmsnorm_row(float *out, const float *x, const float *w, int dim, float eps)
{
    /* sum of squares in double for parity with the reference on long rows */
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int i = 0;
    for (; i + 8 <= dim; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        s0 = _mm256_fmadd_pd(lo, lo, s0);
        s1 = _mm256_fmadd_pd(hi, hi, s1);
    }
    double t[4];
    _mm256_storeu_pd(t, _mm256_add_pd(s0, s1));
    double ss = t[0] + t[1] + t[2] + t[3];
    for (; i < dim; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / dim + eps));
    __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= dim; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi), _mm256_loadu_ps(w + i)));
    for (; i < dim; i++) out[i] = x[i] * inv * w[i];
}

/* exp for x in the range SiLU needs; max relative error ~2e-7 (Cephes-style polynomial) */
AVX2 static inline __m256 exp256(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

AVX2 static void avx2_silu_mul(float *out, const float *gate, const float *up, int64_t n)
{
    int64_t i = 0;
    __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
    }
    if (i < n) { /* the tail through the same vector code, so an element's result never depends on n */
        float g8[8] = {0}, u8[8] = {0}, o8[8];
        int64_t m = n - i;
        memcpy(g8, gate + i, sizeof(float) * (size_t)m);
        memcpy(u8, up + i, sizeof(float) * (size_t)m);
        __m256 g = _mm256_loadu_ps(g8);
        __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(o8, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(u8)));
        memcpy(out + i, o8, sizeof(float) * (size_t)m);
    }
}

AVX2 static inline __m256 load_bf16x8(const uint16_t *p)
{
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

AVX2 static inline float load_sb(const void *p, enum dtype t, int64_t i)
{
    if (t == DT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (t == DT_F16) return _cvtsh_ss(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* dot of one quantized row with one activation row */
AVX2 static float q8_row_dot(const uint8_t *q, const void *sc, const void *bi, enum dtype sdt, int64_t g0, int gs,
                             int64_t ng, const float *x)
{
    __m256 total = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; g++) {
        __m256 aq = _mm256_setzero_ps(), ax = _mm256_setzero_ps();
        const uint8_t *qg = q + g * gs;
        const float *xg = x + g * gs;
        for (int c = 0; c < gs; c += 8) {
            __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c))));
            __m256 xv = _mm256_loadu_ps(xg + c);
            aq = _mm256_fmadd_ps(w, xv, aq);
            ax = _mm256_add_ps(ax, xv);
        }
        __m256 s = _mm256_set1_ps(load_sb(sc, sdt, g0 + g)), b = _mm256_set1_ps(load_sb(bi, sdt, g0 + g));
        total = _mm256_fmadd_ps(s, aq, total);
        total = _mm256_fmadd_ps(b, ax, total);
    }
    return hsum8(total);
}

AVX2 static float q4_row_dot(const uint8_t *q, const void *sc, const void *bi, enum dtype sdt, int64_t g0, int gs,
                             int64_t ng, const float *x)
{
    __m256 total = _mm256_setzero_ps();
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    const __m256i mask = _mm256_set1_epi32(15);
    for (int64_t g = 0; g < ng; g++) {
        __m256 aq = _mm256_setzero_ps(), ax = _mm256_setzero_ps();
        const uint8_t *qg = q + g * gs / 2;
        const float *xg = x + g * gs;
        for (int c = 0; c < gs; c += 8) {
            uint32_t word;
            memcpy(&word, qg + c / 2, 4);
            __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), mask);
            __m256 w = _mm256_cvtepi32_ps(codes);
            __m256 xv = _mm256_loadu_ps(xg + c);
            aq = _mm256_fmadd_ps(w, xv, aq);
            ax = _mm256_add_ps(ax, xv);
        }
        __m256 s = _mm256_set1_ps(load_sb(sc, sdt, g0 + g)), b = _mm256_set1_ps(load_sb(bi, sdt, g0 + g));
        total = _mm256_fmadd_ps(s, aq, total);
        total = _mm256_fmadd_ps(b, ax, total);
    }
    return hsum8(total);
}

AVX2 static float bf16_row_dot(const uint16_t *w, const float *x, int64_t cols)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        s0 = _mm256_fmadd_ps(load_bf16x8(w + c), _mm256_loadu_ps(x + c), s0);
        s1 = _mm256_fmadd_ps(load_bf16x8(w + c + 8), _mm256_loadu_ps(x + c + 8), s1);
    }
    for (; c + 8 <= cols; c += 8) s0 = _mm256_fmadd_ps(load_bf16x8(w + c), _mm256_loadu_ps(x + c), s0);
    float acc = hsum8(_mm256_add_ps(s0, s1));
    for (; c < cols; c++) acc += bf16_to_f32(w[c]) * x[c];
    return acc;
}

AVX2 static void avx2_matmul_rows(float *y, int64_t ldy, const struct weight *w, const float *x, int64_t ldx, int n,
                                  int64_t r0, int64_t r1, float *scratch)
{
    int64_t cols = w->cols;
    switch (w->type) {
    case WT_Q8:
    case WT_Q4: {
        int gs = w->group_size;
        int64_t ng = cols / gs, row_bytes = cols * (w->type == WT_Q8 ? 8 : 4) / 8;
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *q = (const uint8_t *)w->data + r * row_bytes;
            for (int i = 0; i < n; i++)
                y[i * ldy + r] = w->type == WT_Q8 ? q8_row_dot(q, w->scales, w->biases, w->sdtype, r * ng, gs, ng, x + i * ldx)
                                                  : q4_row_dot(q, w->scales, w->biases, w->sdtype, r * ng, gs, ng, x + i * ldx);
        }
        break;
    }
    case WT_BF16:
        for (int64_t r = r0; r < r1; r++)
            for (int i = 0; i < n; i++)
                y[i * ldy + r] = bf16_row_dot((const uint16_t *)w->data + r * cols, x + i * ldx, cols);
        break;
    default: /* F32, F16: convert the row once, then dot */
        for (int64_t r = r0; r < r1; r++) {
            const float *row = scratch;
            if (w->type == WT_F32) row = (const float *)w->data + r * cols;
            else weight_row_f32(w, r, scratch);
            for (int i = 0; i < n; i++) y[i * ldy + r] = avx2_dot(row, x + i * ldx, (int)cols);
        }
        break;
    }
}

static const struct cpu_kernels cpu_kernels_avx2 = {
    .name = "avx2",
    .matmul_rows = avx2_matmul_rows,
    .rmsnorm_row = avx2_rmsnorm_row,
    .dot = avx2_dot,
    .axpy = avx2_axpy,
    .silu_mul = avx2_silu_mul,
};

const struct cpu_kernels *cpu_kernels_simd(void)
{
    const struct cpu_features *f = cpu_features_get();
    if (f->avx2 && f->fma && f->f16c) return &cpu_kernels_avx2;
    return NULL;
}
#else
#include "backend/cpu/cpu_kernels.h"
const struct cpu_kernels *cpu_kernels_simd(void) { return NULL; }
#endif
