/* ops_ref: the scalar reference kernels, written for clarity; every other kernel is tested against these. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_kernels.h"
#include "core/core.h"

static void ref_matmul_rows(float *y, int64_t ldy, const struct weight *w, const float *x, int64_t ldx, int n,
                            int64_t r0, int64_t r1, float *scratch)
{
    int64_t cols = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        weight_row_f32(w, r, scratch);
        for (int i = 0; i < n; i++) {
            const float *xi = x + i * ldx;
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++) acc += scratch[c] * xi[c];
            y[i * ldy + r] = acc;
        }
    }
}

static void ref_rmsnorm_row(float *out, const float *x, const float *w, int dim, float eps)
{
    double ss = 0.0;
    for (int i = 0; i < dim; i++) ss += (double)x[i] * x[i];
    float inv = (float)(1.0 / sqrt(ss / dim + eps));
    for (int i = 0; i < dim; i++) out[i] = x[i] * inv * w[i];
}

static float ref_dot(const float *a, const float *b, int n)
{
    float acc = 0.0f;
    for (int i = 0; i < n; i++) acc += a[i] * b[i];
    return acc;
}

static void ref_axpy(float *y, float a, const float *x, int n)
{
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void ref_silu_mul(float *out, const float *gate, const float *up, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

const struct cpu_kernels cpu_kernels_ref = {
    .name = "scalar",
    .matmul_rows = ref_matmul_rows,
    .rmsnorm_row = ref_rmsnorm_row,
    .dot = ref_dot,
    .axpy = ref_axpy,
    .silu_mul = ref_silu_mul,
};
