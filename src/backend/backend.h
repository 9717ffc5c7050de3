/* backend: the small ops interface the engine runs on (CPU, CUDA).
 *
 * Contract:
 * - Activations are float32 in backend memory ("device pointers": host memory for the CPU backend). The engine
 *   allocates every buffer once, at init, through the backend; no op allocates.
 * - Ops are issued in order; a backend may run them asynchronously (CUDA streams) but backend_sync() and the
 *   copies to the host complete everything issued before them.
 * - Weights are prepared once (backend_weight_prepare): the CPU uses the mmapped bytes in place, CUDA uploads them.
 * - Every op has a scalar reference in backend/cpu (ops_ref.c); SIMD and GPU kernels are tested against it.
 */
#ifndef STRATA_BACKEND_H
#define STRATA_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "model/model.h"

enum backend_kind { BACKEND_CPU, BACKEND_CUDA, BACKEND_COUNT };

/* Most weights one matmul_multi call takes. */
#define BACKEND_MAX_MULTI 4

struct backend;

/* Per-forward metadata in device memory, set by backend_set_batch. */
struct backend_batch {
    int n;
    const int32_t *token; /* [n] */
    const int32_t *pos;   /* [n] */
    const int32_t *slot;  /* [n] */
};

struct backend_ops {
    const char *name;
    void (*free)(struct backend *b);
    void *(*alloc)(struct backend *b, size_t bytes);
    void (*dealloc)(struct backend *b, void *p);
    int (*upload)(struct backend *b, void *dst, const void *src, size_t bytes);
    int (*download)(struct backend *b, void *dst, const void *src, size_t bytes);
    int (*sync)(struct backend *b);
    /* Makes w usable by this backend's ops (in place for CPU; a device copy for CUDA). */
    int (*weight_prepare)(struct backend *b, struct weight *w, char *err);
    void (*weight_release)(struct backend *b, struct weight *w);
    /* Reserves per-thread scratch of at least floats_per_thread floats (load time only). */
    int (*reserve)(struct backend *b, size_t floats_per_thread, char *err);

    /* out[i][:] = row tokens[i] of emb */
    void (*embed)(struct backend *b, float *out, const struct weight *emb, const int32_t *tokens, int n);
    /* out[i][:] = x[i][:] / rms(x[i]) * w, rows of dim (in place allowed) */
    void (*rmsnorm)(struct backend *b, float *out, const float *x, const float *w, int n_rows, int dim, float eps);
    /* y[i][r] = sum_c x[i][c] * W[r][c] (+ bias[r] when bias != NULL), i < n */
    void (*matmul)(struct backend *b, float *y, const struct weight *w, const float *x, int n, const float *bias);
    /* Optional (NULL: call matmul per weight): matmul for n_w <= BACKEND_MAX_MULTI weights of equal cols that
     * share the input x, y[j] = x W[j]^T (+ bias[j] when not NULL), so the input is prepared (quantized) once
     * and all rows are split across threads in one pass (q/k/v, gate/up). */
    void (*matmul_multi)(struct backend *b, int n_w, float *const *y, const struct weight *const *w, const float *x,
                         int n, const float *const *bias);
    /* rotate-half RoPE in place on x[n][n_heads][head_dim]; cs[i][j] = {cos, sin} of token i's angle for
     * frequency j < head_dim/2 (computed once per forward by the engine, in double precision) */
    void (*rope)(struct backend *b, float *x, int n, int n_heads, int head_dim, const float *cs);
    /* k_cache/v_cache: [n_slots][n_ctx][kv_dim]; stores k[i], v[i] at (slot[i], pos[i]) */
    void (*kv_store)(struct backend *b, float *k_cache, float *v_cache, const float *k, const float *v,
                     const struct backend_batch *bb, int kv_dim, int n_ctx);
    /* out[i] = softmax(q[i] K^T * scale) V over positions [0, pos[i]] of slot[i]; GQA: head h uses kv head
     * h / (n_heads / n_kv_heads) */
    void (*attention)(struct backend *b, float *out, const float *q, const float *k_cache, const float *v_cache,
                      const struct backend_batch *bb, int n_heads, int n_kv_heads, int head_dim, int n_ctx,
                      float scale);
    /* out[i] = silu(gate[i]) * up[i], i < n */
    void (*silu_mul)(struct backend *b, float *out, const float *gate, const float *up, int64_t n);
    /* x[i] += y[i], i < n */
    void (*add)(struct backend *b, float *x, const float *y, int64_t n);
    /* dst[i][:] = src[idx[i]][:] for rows of dim floats (idx in host memory) */
    void (*gather_rows)(struct backend *b, float *dst, const float *src, const int32_t *idx, int n, int dim);
};

struct backend {
    const struct backend_ops *ops;
    enum backend_kind kind;
    int n_threads;
    char device_name[128];
    size_t total_mem_bytes, free_mem_bytes;
};

struct backend_opts {
    enum backend_kind kind;
    int n_threads;  /* CPU: 0 = all cores */
    int device;     /* CUDA device index */
    bool reference; /* CPU: scalar reference kernels only (tests) */
};

/* Creates a backend; ST_EUNSUPPORTED when the kind was not compiled in or no device is present. */
int backend_init(struct backend **out, const struct backend_opts *o, char *err);
void backend_free(struct backend *b);
/* "cpu", "cuda", "cuda:1" -> kind/device. */
int backend_parse_device(const char *s, enum backend_kind *kind, int *device, char *err);

int cpu_backend_init(struct backend **out, const struct backend_opts *o, char *err);
#ifdef STRATA_CUDA
int cuda_backend_init(struct backend **out, const struct backend_opts *o, char *err);
#endif

/* CPU features found at run time (x86-64); used for kernel dispatch and reported by bench. */
struct cpu_features {
    bool avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512vnni, avx512bf16, avxvnni;
};
const struct cpu_features *cpu_features_get(void);
/* Names of the kernel variants the CPU backend selected ("avx512-vnni", "avx2", "scalar"). */
const char *cpu_kernel_name(void);

#endif
