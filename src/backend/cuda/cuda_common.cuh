/* cuda_common: what the CUDA backend's .cu files share (C++ only; internal to backend/cuda).
 *
 * - struct cuda_weight: a weight as uploaded by weight_prepare (the layout the kernels read).
 * - kernel argument structs (passed by value as __grid_constant__ parameters) and the launchers (extern "C").
 * - small device functions that must give the same bits wherever they are used: a fused kernel computes a value
 *   with exactly the code the stand-alone op uses, so fusing never changes a result.
 *
 * Packed matrix layout (MMA path, types Q8, Q4, BF16): rows in tiles of 16, K in k16-steps; every lane of a warp
 * loads 16 bytes per "chunk" (Q8: 2 k16-steps, Q4: 4, BF16: 1), already in the register order of the A operand
 * of mma.m16n8k16 (element e of lane l is row (l>>2) + 8*((e>>1)&1), column 2*(l&3) + (e&1) + 8*(e>>2) of the
 * step). Chunk c of tile t for lane l is at ((t * chunks + c) * 32 + l) * 16 bytes. Quantized codes are stored
 * as they are (Q8 one byte, Q4 one nibble: order a0 a2 a4 a6 a1 a3 a5 a7 in a word per step). Scales/biases are
 * [tiles][groups][16 rows] pairs (s, b): bf16x2 when the file's scales are bf16, else float2.
 */
#ifndef STRATA_CUDA_COMMON_CUH
#define STRATA_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <utility>

extern "C" {
#include "backend/backend.h"
#include "core/core.h"
#include "model/model.h"
}
#include "backend/cuda/cuda_backend.h"

/* ---- prepared weights ---- */
enum cw_kind { CW_Q8, CW_Q4, CW_BF16, CW_F32, CW_COUNT }; /* Q8..BF16: tensor-core path; F32: FMA path */

struct cuda_weight {
    const void *key;                          /* w->data after prepare (device) */
    struct weight *owner;                     /* the struct weight given to weight_prepare */
    const void *h_data, *h_scales, *h_biases; /* the owner's host pointers, restored at release */
    int kind;
    int64_t rows, cols;
    int mtiles, chunks, kpad;                 /* 16-row tiles, 16-byte chunks per tile (per lane), padded K */
    int group_size, gsteps, groups, sb_f32;   /* quantized: group, k16-steps per group, groups per row */
    int units, unit_chunks, slices;           /* K is split over `slices` warps in units of unit_chunks chunks */
    uint4 *a;                                 /* packed tiles */
    void *sb;                                 /* packed scale/bias pairs */
    float *f;                                 /* CW_F32: [rows][cols] */
    size_t dev_bytes;
};

/* Where a kernel reads single elements of a prepared weight (the embedding). */
struct wref {
    int kind, chunks, groups, group_size, sb_f32, pad_;
    int64_t rows, cols;
    const uint4 *a;
    const void *sb;
    const float *f;
};

/* ---- kernel arguments ---- */
enum { MM_PRO_NONE, MM_PRO_NORM };
enum { MM_EPI_NONE, MM_EPI_ADD, MM_EPI_GLU };
#define MM_MAX_PARTS 3
#define MM_NORM_FUSE_MAX_N 32 /* the norm prologue recomputes rms per block: only worth it for small batches */

struct mm_part {
    const uint4 *a, *a2;           /* a2: the up projection of a GLU pair */
    const void *sb, *sb2;
    const float *bias, *bias2;
    float *y, *y2;
    int m, mtiles, block0, pad_;
};

/* y_j[n][m_j] = W_j x (+ bias_j) for up to 3 weights of one K sharing x. Prologue NORM: x is rmsnorm(x_raw) * nw
 * computed on the fly (and written to xb by block 0). Epilogue ADD: x2 += y. GLU: y = silu(W x) * (W2 x),
 * y2 = W2 x.
 * v2 (the streaming kernel): a block of `warps` warps owns groups of `tb` consecutive tiles (groups blockIdx.x,
 * + grid, ...); a work item is one (tile, slice) pair, items of a group go to the warps round-robin (slice-major,
 * so that warps of one round share x); every warp keeps its next item's first chunks and scale pairs in flight
 * while it computes the current one. gmax: most scale groups of one slice (the per-warp scale buffer). */
struct mm_args {
    struct mm_part part[MM_MAX_PARTS];
    const float *x;
    const float *nw;
    float *xb, *x2;
    int n_parts, n, k, chunks, units, unit_chunks, slices, gsteps, groups, sb_f32, kind;
    int pro, epi, nt, r, grid, smem;
    float eps;
    int v2, tb, warps, tiles, ngroups, gmax;
    /* tma: weights and scale pairs of an item arrive by bulk copy (the TMA engine) into one of nb shared buffers of
     * the warp (bufb bytes each: R x nchmax chunks of 512 bytes, then R x gmax x 16 scale pairs), instead of the
     * register ring: the weight stream then stays out of the L1 request path that x's loads use. */
    int tma, nb, nchmax, bufb;
};

struct f32mm_args {
    float *y;
    const float *w, *x, *bias;
    int n, rows, cols, pad_;
};
struct rms_args {
    float *out;
    const float *x, *w;
    int rows, dim;
    float eps;
    int pad_;
};
struct rope_args {
    float *x;
    const float *cs;
    int n, heads, hd, pad_;
};
struct kv_args {
    float *kc, *vc;
    const float *k, *v;
    const int32_t *pos, *slot;
    int n, kv_dim, n_ctx, pad_;
};
/* q/k rmsnorm (when qn/kn) + rope + K/V store, one warp per head vector */
struct qk_args {
    float *q, *k;
    const float *v, *qn, *kn, *cs;
    float *kc, *vc;
    const int32_t *pos, *slot;
    int n, nh, nkv, hd, n_ctx;
    float eps;
};
#define ATT_T 128    /* threads per attention block */
#define ATT_GB 8     /* q heads per attention block at most (they share the block's K/V reads) */
#define ATT_MAXC 16  /* chunks per row at most */
#define ATT_MINP 32  /* positions per chunk at least */
/* positions per chunk of a row with npos positions: 32 up to 512 positions, then growing so that a row has at most
 * 16 chunks. It depends on the row alone, so the row's result does not depend on its batch. */
static inline __host__ __device__ int att_chunk(int npos) { return ATT_MINP * ((npos + ATT_MINP * ATT_MAXC - 1) / (ATT_MINP * ATT_MAXC)); }
struct attn_args {
    float *out;
    const float *q, *kc, *vc;
    const int32_t *pos, *slot;
    float *ws; /* [n][nh][ATT_MAXC][hd + 2] partials of rows with several chunks */
    int *cnt;  /* [n][nkv * qgroups] chunks done (the last block combines, then resets it) */
    int n, nh, nkv, hd, n_ctx, gb, qgroups;
    float scale;
};
#define UP_MAX 16 /* pieces of one upload kernel */
/* dst[i] = src[i] (bytes[i]) for i < n; src points into the pinned, mapped staging buffer */
struct upload_args {
    int n, pad_;
    void *dst[UP_MAX];
    const void *src[UP_MAX];
    unsigned long long bytes[UP_MAX];
};
struct ew_args {
    float *out;
    const float *a, *b;
    int64_t cnt;
};
struct embed_args {
    float *out;
    struct wref w;
    const int32_t *tok;
    int n, pad_;
};
struct gather_args {
    float *dst;
    const float *src;
    const int32_t *idx;
    int n, dim, overlap, pad_;
};

/* Argument structs are hashed byte for byte to recognise a repeated op sequence (graph replay): no padding. */
static_assert(sizeof(struct mm_part) == 80 && sizeof(struct mm_args) == 3 * 80 + 32 + 28 * 4, "mm_args padding");
static_assert(sizeof(struct qk_args) == 104 && sizeof(struct attn_args) == 96 && sizeof(struct embed_args) == 88,
              "argument padding");

/* ---- launchers (cuda_matmul.cu, cuda_ops.cu) ---- */
extern "C" {
cudaError_t cuda_mm_launch(const struct mm_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_f32mm_launch(const struct f32mm_args *a, cudaStream_t s, int pdl);
/* Fills the layout of cw for w (no device work); ST_EUNSUPPORTED for a layout the kernels do not take. */
int cuda_weight_plan(struct cuda_weight *cw, const struct weight *w, char *err);
/* Uploads w's host bytes and packs them into cw's device buffers (allocated here; freed with cuda_weight_free). */
int cuda_weight_upload(struct cuda_weight *cw, const struct weight *w, cudaStream_t s, char *err);
void cuda_weight_free(struct cuda_weight *cw);
/* Sets the kernels' shared-memory limits (once per device). */
cudaError_t cuda_matmul_setup(int max_smem);
size_t cuda_mm_smem_bytes(const struct mm_args *a);

cudaError_t cuda_embed_launch(const struct embed_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_rmsnorm_launch(const struct rms_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_rope_launch(const struct rope_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_kv_launch(const struct kv_args *a, cudaStream_t s, int pdl);
/* v2: the register-resident q/k kernel and the attention kernel that stages K/V tiles through shared memory
 * (cp.async, every load of a chunk in flight at once); both give the same bits as the first versions. */
cudaError_t cuda_qk_launch(const struct qk_args *a, cudaStream_t s, int pdl, int v2);
cudaError_t cuda_attn_launch(const struct attn_args *a, cudaStream_t s, int pdl, int v2);
size_t cuda_attn_smem_bytes(int hd, int n_ctx, int v2);
cudaError_t cuda_attn_setup(int max_smem);
cudaError_t cuda_silu_launch(const struct ew_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_add_launch(const struct ew_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_gather_launch(const struct gather_args *a, cudaStream_t s, int pdl);
cudaError_t cuda_upload_launch(const struct upload_args *a, cudaStream_t s, int pdl);
}

/* ---- launching with programmatic dependent launch ---- */
template <typename... KArgs, typename... Args>
static inline cudaError_t cu_launch(void (*kern)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s,
                                    int pdl, Args &&...args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    if (pdl) {
        at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        at[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = at;
        cfg.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&cfg, kern, std::forward<Args>(args)...);
}

/* ---- device helpers ---- */
/* Every kernel calls pdl_wait() before its first access to memory another kernel writes (and before any early
 * exit, so that a kernel's completion always implies its predecessor's); pdl_launch() lets the next kernel start
 * its prologue (weight prefetch) early. Both are no-ops without the launch attribute. */
static __device__ __forceinline__ void pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
static __device__ __forceinline__ void pdl_launch(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* 1 / rms(x) as the CPU reference computes it (double sum of squares, explicit fma so that every kernel that
 * inlines it rounds alike), by one warp (all 32 lanes call; all get the same value). float4 loads, several in flight, when x allows; the order depends only on dim and x's alignment,
 * which are the same wherever a given row is normalized. */
static __device__ __forceinline__ float warp_inv_rms(const float *x, int dim, float eps, int lane)
{
    double ss = 0.0;
    if ((dim & 3) == 0 && ((uintptr_t)x & 15) == 0) {
        const float4 *x4 = (const float4 *)x;
#pragma unroll 8
        for (int i = lane; i < dim / 4; i += 32) {
            const float4 v = x4[i];
            ss = fma((double)v.x, (double)v.x, ss);
            ss = fma((double)v.y, (double)v.y, ss);
            ss = fma((double)v.z, (double)v.z, ss);
            ss = fma((double)v.w, (double)v.w, ss);
        }
    } else {
        for (int i = lane; i < dim; i += 32) {
            const double v = (double)x[i];
            ss = fma(v, v, ss);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    return (float)(1.0 / sqrt(ss / (double)dim + (double)eps));
}

/* x * inv * w, rounded as the CPU computes it */
static __device__ __forceinline__ float norm_apply(float x, float inv, float w) { return __fmul_rn(__fmul_rn(x, inv), w); }

/* silu(g) * u as the CPU computes it: g / (1 + exp(-g)) * u */
static __device__ __forceinline__ float silu_mul_f(float g, float u)
{
    return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
}

/* rotate-half RoPE of the pair (j, j + half) */
static __device__ __forceinline__ void rope_pair(float *v, int j, int half, float c, float s)
{
    float a = v[j], b = v[j + half];
    v[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    v[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

/* Element e of lane l's A fragment: row within the tile and column within the k16-step. The columns are
 * permuted inside each step (the dot product does not care, as long as x follows): lane l's B fragment is then
 * x[n][4(l&3) .. 4(l&3)+3], one float4, with b0 b1 = the first two and b2 b3 = the last two. */
static __device__ __host__ __forceinline__ void frag_rc(int lane, int e, int *rr, int *kk)
{
    *rr = (lane >> 2) + ((e >> 1) & 1) * 8;
    *kk = (lane & 3) * 4 + ((e >> 2) & 1) * 2 + (e & 1);
}

static __device__ __forceinline__ float bf16_bits_f(uint32_t b) { return __uint_as_float(b << 16); }

/* Element (r, k) of a prepared weight as float, computed like weight_row_f32 (s * q + b, rounded twice). */
static __device__ float w_elem(const struct wref &w, int64_t r, int64_t k)
{
    if (w.kind == CW_F32) return w.f[r * w.cols + k];
    const int mt = (int)(r >> 4), rr = (int)(r & 15);
    const int ck = w.kind == CW_Q8 ? 32 : w.kind == CW_Q4 ? 64 : 16;
    const int c = (int)(k / ck), kin = (int)(k % ck), ks = kin >> 4, kk = kin & 15;
    const int lane = (rr & 7) * 4 + (kk >> 2); /* inverse of frag_rc */
    const int e = (kk & 1) | (((rr >> 3) & 1) << 1) | (((kk >> 1) & 1) << 2);
    const unsigned char *chunk = (const unsigned char *)(w.a + ((size_t)mt * w.chunks + c) * 32 + lane);
    if (w.kind == CW_BF16) return bf16_bits_f(((const uint16_t *)chunk)[e]);
    uint32_t code;
    if (w.kind == CW_Q8) {
        code = chunk[ks * 8 + e];
    } else {
        const uint32_t word = ((const uint32_t *)chunk)[ks];
        const int nib = (e & 1) ? 4 + (e >> 1) : (e >> 1);
        code = (word >> (4 * nib)) & 15u;
    }
    const size_t si = ((size_t)mt * w.groups + (size_t)(k / w.group_size)) * 16 + rr;
    float s, b;
    if (w.sb_f32) {
        const float2 p = ((const float2 *)w.sb)[si];
        s = p.x;
        b = p.y;
    } else {
        const uint32_t p = ((const uint32_t *)w.sb)[si];
        s = bf16_bits_f(p & 0xffffu);
        b = bf16_bits_f(p >> 16);
    }
    return __fadd_rn(__fmul_rn(s, (float)code), b);
}

#endif
