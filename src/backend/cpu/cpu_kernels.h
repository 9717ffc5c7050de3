/* cpu_kernels: row-level CPU kernels. ops_ref.c holds the scalar reference (the oracle); SIMD variants provide the
 * same functions and are chosen at run time. The CPU backend (cpu.c) splits work across threads and calls these. */
#ifndef STRATA_CPU_KERNELS_H
#define STRATA_CPU_KERNELS_H

#include <stdint.h>

#include "backend/backend.h"

struct cpu_kernels {
    const char *name;
    /* y[i*ldy + r] = sum_c W[r][c] * x[i*ldx + c] for rows r in [r0, r1) and i < n.
     * scratch: at least w->cols floats, private to the calling thread. */
    void (*matmul_rows)(float *y, int64_t ldy, const struct weight *w, const float *x, int64_t ldx, int n,
                        int64_t r0, int64_t r1, float *scratch);
    void (*rmsnorm_row)(float *out, const float *x, const float *w, int dim, float eps);
    float (*dot)(const float *a, const float *b, int n);
    /* y[i] += a * x[i] */
    void (*axpy)(float *y, float a, const float *x, int n);
    void (*silu_mul)(float *out, const float *gate, const float *up, int64_t n);
};

extern const struct cpu_kernels cpu_kernels_ref;
/* The best SIMD kernels this CPU supports, or NULL when none applies. */
const struct cpu_kernels *cpu_kernels_simd(void);

#endif
