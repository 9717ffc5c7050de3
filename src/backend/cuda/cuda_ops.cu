/* cuda_ops: the small ops (embedding, RMSNorm, RoPE, KV store, attention, SiLU*mul, add, row gather) and the
 * fused q/k post-processing. Each computes a row's values in an order that depends on that row alone. Where the
 * CPU reference rounds an expression step by step (x * inv * w, a*c - b*s, g / (1 + e^-g) * u) the kernels use
 * the same roundings (__fmul_rn & co.), so these ops agree with the CPU to the last bit except for exp/sqrt. */
#include "backend/cuda/cuda_common.cuh"

#include <float.h>
#include <math.h>

static unsigned blocks_of(int64_t n, int t) { return (unsigned)((n + t - 1) / t); }

/* ---- embedding: one block per token ---- */
__global__ void __launch_bounds__(256) embed_kernel(const __grid_constant__ struct embed_args a)
{
    pdl_launch();
    pdl_wait();
    const int i = blockIdx.x;
    const int64_t r = a.tok[i];
    float *o = a.out + (size_t)i * a.w.cols;
    for (int64_t k = threadIdx.x; k < a.w.cols; k += blockDim.x) o[k] = w_elem(a.w, r, k);
}

extern "C" cudaError_t cuda_embed_launch(const struct embed_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(embed_kernel, dim3(a->n), dim3(256), 0, s, pdl, *a);
}

/* ---- RMSNorm: one warp per row (in place allowed) ---- */
__global__ void __launch_bounds__(256) rmsnorm_kernel(const __grid_constant__ struct rms_args a)
{
    pdl_launch();
    pdl_wait();
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= a.rows) return;
    const float *x = a.x + (size_t)row * a.dim;
    float *o = a.out + (size_t)row * a.dim;
    const float inv = warp_inv_rms(x, a.dim, a.eps, lane);
    for (int k = lane; k < a.dim; k += 32) o[k] = norm_apply(x[k], inv, a.w[k]);
}

extern "C" cudaError_t cuda_rmsnorm_launch(const struct rms_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(rmsnorm_kernel, dim3(blocks_of(a->rows, 8)), dim3(256), 0, s, pdl, *a);
}

/* ---- RoPE: one thread per rotated pair ---- */
__global__ void __launch_bounds__(256) rope_kernel(const __grid_constant__ struct rope_args a)
{
    pdl_launch();
    pdl_wait();
    const int half = a.hd / 2;
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (int64_t)a.n * a.heads * half) return;
    const int j = (int)(t % half);
    const int64_t ih = t / half;
    const int i = (int)(ih / a.heads);
    const float *cs = a.cs + ((size_t)i * half + j) * 2;
    rope_pair(a.x + ih * a.hd, j, half, cs[0], cs[1]);
}

extern "C" cudaError_t cuda_rope_launch(const struct rope_args *a, cudaStream_t s, int pdl)
{
    const int64_t n = (int64_t)a->n * a->heads * (a->hd / 2);
    if (n == 0) return cudaSuccess;
    return cu_launch(rope_kernel, dim3(blocks_of(n, 256)), dim3(256), 0, s, pdl, *a);
}

/* ---- KV store ---- */
__global__ void __launch_bounds__(256) kv_kernel(const __grid_constant__ struct kv_args a)
{
    pdl_launch();
    pdl_wait();
    const int i = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (d >= a.kv_dim) return;
    const size_t off = ((size_t)a.slot[i] * a.n_ctx + a.pos[i]) * a.kv_dim + d;
    a.kc[off] = a.k[(size_t)i * a.kv_dim + d];
    a.vc[off] = a.v[(size_t)i * a.kv_dim + d];
}

extern "C" cudaError_t cuda_kv_launch(const struct kv_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(kv_kernel, dim3(blocks_of(a->kv_dim, 256), a->n), dim3(256), 0, s, pdl, *a);
}

/* ---- q/k norm + rope + KV store: one warp per head vector (q heads, k heads, v heads) ---- */
__global__ void __launch_bounds__(256) qk_kernel(const __grid_constant__ struct qk_args a)
{
    pdl_launch();
    pdl_wait();
    const int per = a.nh + 2 * a.nkv;
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (item >= (int64_t)a.n * per) return;
    const int i = (int)(item / per), t = (int)(item % per), hd = a.hd, half = hd / 2, kv_dim = a.nkv * hd;
    const size_t cache = ((size_t)a.slot[i] * a.n_ctx + a.pos[i]) * kv_dim;
    if (t >= a.nh + a.nkv) { /* v: store only */
        const int h = t - a.nh - a.nkv;
        const float *v = a.v + ((size_t)i * a.nkv + h) * hd;
        for (int d = lane; d < hd; d += 32) a.vc[cache + (size_t)h * hd + d] = v[d];
        return;
    }
    const bool is_q = t < a.nh;
    const int h = is_q ? t : t - a.nh;
    float *v = is_q ? a.q + ((size_t)i * a.nh + h) * hd : a.k + ((size_t)i * a.nkv + h) * hd;
    const float *nw = is_q ? a.qn : a.kn;
    if (nw) {
        const float inv = warp_inv_rms(v, hd, a.eps, lane);
        for (int d = lane; d < hd; d += 32) v[d] = norm_apply(v[d], inv, nw[d]);
        __syncwarp();
    }
    const float *cs = a.cs + (size_t)i * half * 2;
    for (int jj = lane; jj < half; jj += 32) rope_pair(v, jj, half, cs[2 * jj], cs[2 * jj + 1]);
    if (!is_q) {
        __syncwarp();
        for (int d = lane; d < hd; d += 32) a.kc[cache + (size_t)h * hd + d] = v[d];
    }
}

/* v2: the same values with the head vector in registers: one load, one store, no round trips through memory
 * between norm, rope and the KV store. A lane holds float4 number f = lane + 32 j (j < hd / 128, or lane < hd / 4
 * for hd <= 128), the order warp_inv_rms sums in; rope pairs element e with e + hd/2, i.e. float4 f with f + hd/8:
 * lane ^ (hd/8) for hd <= 128, the same lane's next float4 for hd >= 256. Taken when hd is 16, 32, 64, 128, 256 or
 * 512 and every pointer allows 16-byte accesses (qk_v2_ok). */
#define QK_MAXJ 4
__global__ void __launch_bounds__(256) qk2_kernel(const __grid_constant__ struct qk_args a)
{
    pdl_launch();
    pdl_wait();
    const int per = a.nh + 2 * a.nkv;
    const int64_t item = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (item >= (int64_t)a.n * per) return;
    const int i = (int)(item / per), t = (int)(item % per), hd = a.hd, kv_dim = a.nkv * hd;
    const int F = hd / 4, J = F > 32 ? F / 32 : 1, pf = F / 2; /* float4s, per lane, rope partner offset */
    const bool act = lane < F;
    const bool is_q = t < a.nh, is_v = t >= a.nh + a.nkv;
    const int h = is_q ? t : is_v ? t - a.nh - a.nkv : t - a.nh;
    const float *src = is_q ? a.q + ((size_t)i * a.nh + h) * hd : is_v ? a.v + ((size_t)i * a.nkv + h) * hd
                                                                       : a.k + ((size_t)i * a.nkv + h) * hd;
    size_t cache = 0;
    if (!is_q) cache = ((size_t)a.slot[i] * a.n_ctx + a.pos[i]) * kv_dim + (size_t)h * hd;
    float4 v[QK_MAXJ];
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        v[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (j < J && act) v[j] = ((const float4 *)src)[lane + 32 * j];
    }
    if (is_v) {
#pragma unroll
        for (int j = 0; j < QK_MAXJ; j++)
            if (j < J && act) ((float4 *)(a.vc + cache))[lane + 32 * j] = v[j];
        return;
    }
    const float *nw = is_q ? a.qn : a.kn;
    if (nw) {
        /* warp_inv_rms's arithmetic on the registers */
        double ss = 0.0;
#pragma unroll
        for (int j = 0; j < QK_MAXJ; j++)
            if (j < J && act) {
                ss = fma((double)v[j].x, (double)v[j].x, ss);
                ss = fma((double)v[j].y, (double)v[j].y, ss);
                ss = fma((double)v[j].z, (double)v[j].z, ss);
                ss = fma((double)v[j].w, (double)v[j].w, ss);
            }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        const float inv = (float)(1.0 / sqrt(ss / (double)hd + (double)a.eps));
#pragma unroll
        for (int j = 0; j < QK_MAXJ; j++)
            if (j < J && act) {
                const float4 w = ((const float4 *)nw)[lane + 32 * j];
                v[j].x = norm_apply(v[j].x, inv, w.x);
                v[j].y = norm_apply(v[j].y, inv, w.y);
                v[j].z = norm_apply(v[j].z, inv, w.z);
                v[j].w = norm_apply(v[j].w, inv, w.w);
            }
    }
    /* rope: this lane's float4 f pairs with f + pf (first half) or f - pf (second half) */
    const float *cs = a.cs + (size_t)i * hd; /* [hd/2][2] */
    float4 pv[QK_MAXJ];
    if (F <= 32) {
#pragma unroll
        for (int j = 0; j < QK_MAXJ; j++)
            if (j < J) {
                pv[j].x = __shfl_xor_sync(0xffffffffu, v[j].x, pf);
                pv[j].y = __shfl_xor_sync(0xffffffffu, v[j].y, pf);
                pv[j].z = __shfl_xor_sync(0xffffffffu, v[j].z, pf);
                pv[j].w = __shfl_xor_sync(0xffffffffu, v[j].w, pf);
            }
    } else {
        if (J == 2) {
            pv[0] = v[1];
            pv[1] = v[0];
        } else {
            pv[0] = v[2];
            pv[1] = v[3];
            pv[2] = v[0];
            pv[3] = v[1];
        }
    }
    float4 o4[QK_MAXJ];
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++) {
        if (!(j < J && act)) continue;
        const int f = lane + 32 * j;
        const bool first = f < pf;
        const int fj = first ? f : f - pf; /* pair index / 4 */
        const float4 c01 = ((const float4 *)cs)[2 * fj], c23 = ((const float4 *)cs)[2 * fj + 1];
        const float cc[4] = {c01.x, c01.z, c23.x, c23.z}, sn[4] = {c01.y, c01.w, c23.y, c23.w};
        const float me[4] = {v[j].x, v[j].y, v[j].z, v[j].w}, ot[4] = {pv[j].x, pv[j].y, pv[j].z, pv[j].w};
        float r[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            if (first) r[e] = __fsub_rn(__fmul_rn(me[e], cc[e]), __fmul_rn(ot[e], sn[e])); /* a c - b s */
            else r[e] = __fadd_rn(__fmul_rn(me[e], cc[e]), __fmul_rn(ot[e], sn[e]));     /* b c + a s */
        }
        o4[j] = make_float4(r[0], r[1], r[2], r[3]);
    }
    float *dst = (float *)src;
#pragma unroll
    for (int j = 0; j < QK_MAXJ; j++)
        if (j < J && act) {
            ((float4 *)dst)[lane + 32 * j] = o4[j];
            if (!is_q) ((float4 *)(a.kc + cache))[lane + 32 * j] = o4[j];
        }
}

static bool qk_v2_ok(const struct qk_args *a)
{
    const int hd = a->hd;
    if (hd != 16 && hd != 32 && hd != 64 && hd != 128 && hd != 256 && hd != 512) return false;
    const uintptr_t al = (uintptr_t)a->q | (uintptr_t)a->k | (uintptr_t)a->v | (uintptr_t)a->kc | (uintptr_t)a->vc |
                         (uintptr_t)a->cs | (uintptr_t)a->qn | (uintptr_t)a->kn;
    return (al & 15) == 0;
}

extern "C" cudaError_t cuda_qk_launch(const struct qk_args *a, cudaStream_t s, int pdl, int v2)
{
    const int64_t warps = (int64_t)a->n * (a->nh + 2 * a->nkv);
    if (v2 && qk_v2_ok(a)) return cu_launch(qk2_kernel, dim3(blocks_of(warps, 8)), dim3(256), 0, s, pdl, *a);
    return cu_launch(qk_kernel, dim3(blocks_of(warps, 8)), dim3(256), 0, s, pdl, *a);
}

/* ---- attention ----
 * Block (row i, kv head, q-head group, chunk c of the row's positions; att_chunk() positions per chunk):
 *   scores: 8 lanes per position, each summing its share of the dimensions in order, then a 3-step xor tree;
 *   max and sum of exp over the chunk (one warp per head, lane partials then a tree);
 *   out[d] = sum_t w_t v_t[d] in position order (one thread per dimension, all heads of the group at once).
 * A row of one chunk writes its output; otherwise each block writes (acc, max, sum) and the block that finishes
 * last (a counter per row and head group) merges the chunks in chunk order and resets the counter. Every step
 * depends only on the row's own position. */
__global__ void __launch_bounds__(ATT_T) attn_kernel(const __grid_constant__ struct attn_args a)
{
    pdl_launch();
    pdl_wait();
    const int i = blockIdx.x, kvh = blockIdx.y / a.qgroups, qg = blockIdx.y % a.qgroups, c = blockIdx.z;
    const int G = a.nh / a.nkv, h0 = kvh * G + qg * a.gb, gb = min(a.gb, G - qg * a.gb);
    const int npos = a.pos[i] + 1, cs = att_chunk(npos), nch = (npos + cs - 1) / cs, p0 = c * cs;
    if (c >= nch) return;
    const int cnt = min(cs, npos - p0), hd = a.hd, kv_dim = a.nkv * hd, t = threadIdx.x;
    const int lane = t & 31, warp = t >> 5;
    extern __shared__ float sm[];
    float *sq = sm;               /* [gb][hd] */
    float *se = sq + ATT_GB * hd; /* [gb][cs] */
    __shared__ float s_ml[ATT_GB][2];
    __shared__ int s_last;
    for (int e = t; e < gb * hd; e += ATT_T) sq[e] = a.q[((size_t)i * a.nh + h0) * hd + e];
    __syncthreads();
    const size_t base = (size_t)a.slot[i] * a.n_ctx * kv_dim + (size_t)kvh * hd;
    const float *kb = a.kc + base + (size_t)p0 * kv_dim, *vb = a.vc + base + (size_t)p0 * kv_dim;
    /* scores: every thread runs the same number of rounds (the shuffles need the whole warp) */
    const int sub = t & 7;
    for (int r0 = 0; r0 < cnt; r0 += ATT_T / 8) {
        const int r = r0 + (t >> 3);
        const bool valid = r < cnt;
        const float *kr = kb + (size_t)(valid ? r : 0) * kv_dim;
        float acc[ATT_GB];
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) acc[g] = 0.0f;
        if (valid && (hd & 31) == 0) {
            for (int d = 4 * sub; d < hd; d += 32) {
                const float4 k4 = *(const float4 *)(kr + d);
#pragma unroll
                for (int g = 0; g < ATT_GB; g++) {
                    if (g < gb) {
                        const float *qq = sq + g * hd + d;
                        acc[g] = fmaf(qq[0], k4.x, acc[g]);
                        acc[g] = fmaf(qq[1], k4.y, acc[g]);
                        acc[g] = fmaf(qq[2], k4.z, acc[g]);
                        acc[g] = fmaf(qq[3], k4.w, acc[g]);
                    }
                }
            }
        } else if (valid) {
            for (int d = sub; d < hd; d += 8) {
                const float kv = kr[d];
#pragma unroll
                for (int g = 0; g < ATT_GB; g++)
                    if (g < gb) acc[g] = fmaf(sq[g * hd + d], kv, acc[g]);
            }
        }
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) {
            float v = acc[g];
            v += __shfl_xor_sync(0xffffffffu, v, 4);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            if (valid && g < gb && sub == 0) se[g * cs + r] = v * a.scale;
        }
    }
    __syncthreads();
    /* softmax statistics of the chunk: one warp per head */
    for (int g = warp; g < gb; g += ATT_T / 32) {
        float mx = -FLT_MAX;
        for (int r = lane; r < cnt; r += 32) mx = fmaxf(mx, se[g * cs + r]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int r = lane; r < cnt; r += 32) {
            const float e = expf(se[g * cs + r] - mx);
            se[g * cs + r] = e;
            sum += e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            s_ml[g][0] = mx;
            s_ml[g][1] = sum;
        }
    }
    __syncthreads();
    const bool single = nch == 1;
    if (single)
        for (int e = t; e < gb * cs; e += ATT_T)
            if (e % cs < cnt) se[e] *= 1.0f / s_ml[e / cs][1];
    __syncthreads();
    /* out = sum_t w_t v_t, one thread per dimension, every head of the group */
    for (int d = t; d < hd; d += ATT_T) {
        float acc[ATT_GB];
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) acc[g] = 0.0f;
#pragma unroll 8
        for (int r = 0; r < cnt; r++) {
            const float vv = vb[(size_t)r * kv_dim + d];
#pragma unroll
            for (int g = 0; g < ATT_GB; g++)
                if (g < gb) acc[g] = fmaf(se[g * cs + r], vv, acc[g]);
        }
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) {
            if (g >= gb) break;
            if (single) {
                a.out[((size_t)i * a.nh + h0 + g) * hd + d] = acc[g];
            } else {
                float *w = a.ws + (((size_t)i * a.nh + h0 + g) * ATT_MAXC + c) * (hd + 2);
                w[d] = acc[g];
                if (d == 0) {
                    w[hd] = s_ml[g][0];
                    w[hd + 1] = s_ml[g][1];
                }
            }
        }
    }
    if (single) return;
    /* the last block of this (row, head group) merges the chunks in order */
    __threadfence();
    __syncthreads();
    int *counter = a.cnt + (size_t)i * a.nkv * a.qgroups + blockIdx.y;
    if (t == 0) s_last = atomicAdd(counter, 1) == nch - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int g = 0; g < gb; g++) {
        const float *w = a.ws + ((size_t)i * a.nh + h0 + g) * ATT_MAXC * (hd + 2);
        float m = -FLT_MAX;
        for (int k = 0; k < nch; k++) m = fmaxf(m, __ldcg(w + (size_t)k * (hd + 2) + hd));
        float l = 0.0f;
        for (int k = 0; k < nch; k++)
            l = fmaf(__ldcg(w + (size_t)k * (hd + 2) + hd + 1), expf(__ldcg(w + (size_t)k * (hd + 2) + hd) - m), l);
        for (int d = t; d < hd; d += ATT_T) {
            float acc = 0.0f;
            for (int k = 0; k < nch; k++)
                acc = fmaf(__ldcg(w + (size_t)k * (hd + 2) + d), expf(__ldcg(w + (size_t)k * (hd + 2) + hd) - m), acc);
            a.out[((size_t)i * a.nh + h0 + g) * hd + d] = acc / l;
        }
    }
    if (t == 0) *counter = 0;
}

/* ---- attention v2 ----
 * The same arithmetic as attn_kernel (scores, softmax statistics, weighted sum and merge in the same order, so the
 * same bits), with the memory traffic reorganised: the chunk's K and V rows are copied into shared memory in tiles
 * of att2_tile(hd) positions with cp.async, K and V of the first tile issued together at the start, so a chunk of up
 * to 32 positions (every chunk of rows up to 512 positions) costs one memory round trip instead of one per 8-16
 * positions (longer chunks load their further tiles one after the other); the merge of a row's chunks loads every
 * partial's statistics at once. */
static __host__ __device__ inline int att2_tile(int hd) { return hd >= 128 ? 32 * 128 / hd : 32; }
#define ATT2_DU 2 /* dimensions per thread: v2 takes hd <= 256 */

static __device__ __forceinline__ void cp_async4(void *smem, const void *gmem)
{
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(sa), "l"(gmem) : "memory");
}
static __device__ __forceinline__ void cp_async16s(void *smem, const void *gmem)
{
    const unsigned sa = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(sa), "l"(gmem) : "memory");
}
static __device__ __forceinline__ void cp_commit(void) { asm volatile("cp.async.commit_group;" ::: "memory"); }
static __device__ __forceinline__ void cp_wait0(void) { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

/* rows [r0, r0 + rows) of a chunk (positions p0 + r) into dst[rows][hd] */
static __device__ __forceinline__ void att2_copy(float *dst, const float *src, int rows, int hd, int kv_dim, bool v16)
{
    if (v16) {
        const int q4 = hd / 4;
        for (int e = threadIdx.x; e < rows * q4; e += ATT_T) {
            const int r = e / q4, d = (e - r * q4) * 4;
            cp_async16s(dst + r * hd + d, src + (size_t)r * kv_dim + d);
        }
    } else {
        for (int e = threadIdx.x; e < rows * hd; e += ATT_T) {
            const int r = e / hd, d = e - r * hd;
            cp_async4(dst + e, src + (size_t)r * kv_dim + d);
        }
    }
}

__global__ void __launch_bounds__(ATT_T) attn2_kernel(const __grid_constant__ struct attn_args a)
{
    pdl_launch();
    pdl_wait();
    const int i = blockIdx.x, kvh = blockIdx.y / a.qgroups, qg = blockIdx.y % a.qgroups, c = blockIdx.z;
    const int G = a.nh / a.nkv, h0 = kvh * G + qg * a.gb, gb = min(a.gb, G - qg * a.gb);
    const int npos = a.pos[i] + 1, cs = att_chunk(npos), nch = (npos + cs - 1) / cs, p0 = c * cs;
    if (c >= nch) return;
    const int cnt = min(cs, npos - p0), hd = a.hd, kv_dim = a.nkv * hd, t = threadIdx.x;
    const int lane = t & 31, warp = t >> 5;
    const int T = att2_tile(hd), ntl = (cnt + T - 1) / T;
    extern __shared__ __align__(16) float sm[];
    float *kt = sm;                     /* [T][hd] */
    float *vt = kt + T * hd;            /* [T][hd] */
    float *sq = vt + T * hd;            /* [gb][hd] */
    float *se = sq + ATT_GB * hd;       /* [gb][cs] */
    __shared__ float s_ml[ATT_GB][2];
    __shared__ int s_last;
    const size_t base = (size_t)a.slot[i] * a.n_ctx * kv_dim + (size_t)kvh * hd;
    const float *kb = a.kc + base + (size_t)p0 * kv_dim, *vb = a.vc + base + (size_t)p0 * kv_dim;
    const bool v16 = ((hd | kv_dim) & 3) == 0 && (((uintptr_t)a.kc | (uintptr_t)a.vc) & 15) == 0;
    /* K and V of tile 0 together */
    att2_copy(kt, kb, min(T, cnt), hd, kv_dim, v16);
    att2_copy(vt, vb, min(T, cnt), hd, kv_dim, v16);
    cp_commit();
    for (int e = t; e < gb * hd; e += ATT_T) sq[e] = a.q[((size_t)i * a.nh + h0) * hd + e];
    const int sub = t & 7;
    for (int tl = 0; tl < ntl; tl++) {
        if (tl > 0) { /* the previous tile's K is no longer read (barrier at the end of the last iteration) */
            att2_copy(kt, kb + (size_t)tl * T * kv_dim, min(T, cnt - tl * T), hd, kv_dim, v16);
            cp_commit();
        }
        cp_wait0();      /* this thread's copies */
        __syncthreads(); /* everyone's copies, and sq */
        const float *kt_ = kt;
        const int rows = min(T, cnt - tl * T);
        /* scores: every thread runs the same number of rounds (the shuffles need the whole warp) */
        for (int r0 = 0; r0 < rows; r0 += ATT_T / 8) {
            const int rr = r0 + (t >> 3), r = tl * T + rr;
            const bool valid = rr < rows;
            const float *kr = kt_ + (valid ? rr : 0) * hd;
            float acc[ATT_GB];
#pragma unroll
            for (int g = 0; g < ATT_GB; g++) acc[g] = 0.0f;
            if (valid && (hd & 31) == 0) {
                for (int d = 4 * sub; d < hd; d += 32) {
                    const float4 k4 = *(const float4 *)(kr + d);
#pragma unroll
                    for (int g = 0; g < ATT_GB; g++) {
                        if (g < gb) {
                            const float *qq = sq + g * hd + d;
                            acc[g] = fmaf(qq[0], k4.x, acc[g]);
                            acc[g] = fmaf(qq[1], k4.y, acc[g]);
                            acc[g] = fmaf(qq[2], k4.z, acc[g]);
                            acc[g] = fmaf(qq[3], k4.w, acc[g]);
                        }
                    }
                }
            } else if (valid) {
                for (int d = sub; d < hd; d += 8) {
                    const float kv = kr[d];
#pragma unroll
                    for (int g = 0; g < ATT_GB; g++)
                        if (g < gb) acc[g] = fmaf(sq[g * hd + d], kv, acc[g]);
                }
            }
#pragma unroll
            for (int g = 0; g < ATT_GB; g++) {
                float v = acc[g];
                v += __shfl_xor_sync(0xffffffffu, v, 4);
                v += __shfl_xor_sync(0xffffffffu, v, 2);
                v += __shfl_xor_sync(0xffffffffu, v, 1);
                if (valid && g < gb && sub == 0) se[g * cs + r] = v * a.scale;
            }
        }
        __syncthreads(); /* done with this K tile */
    }
    /* softmax statistics of the chunk: one warp per head */
    for (int g = warp; g < gb; g += ATT_T / 32) {
        float mx = -FLT_MAX;
        for (int r = lane; r < cnt; r += 32) mx = fmaxf(mx, se[g * cs + r]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float sum = 0.0f;
        for (int r = lane; r < cnt; r += 32) {
            const float e = expf(se[g * cs + r] - mx);
            se[g * cs + r] = e;
            sum += e;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        if (lane == 0) {
            s_ml[g][0] = mx;
            s_ml[g][1] = sum;
        }
    }
    __syncthreads();
    const bool single = nch == 1;
    if (single)
        for (int e = t; e < gb * cs; e += ATT_T)
            if (e % cs < cnt) se[e] *= 1.0f / s_ml[e / cs][1];
    /* out = sum_t w_t v_t, one thread per dimension, every head of the group, positions in order */
    const int nd = (hd + ATT_T - 1) / ATT_T;
    float acc[ATT2_DU][ATT_GB]; /* dimensions t, t + 128 (hd <= 256) */
#pragma unroll
    for (int u = 0; u < ATT2_DU; u++)
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) acc[u][g] = 0.0f;
    for (int tl = 0; tl < ntl; tl++) {
        if (tl > 0) { /* tile 0 came with K's tile 0 */
            att2_copy(vt, vb + (size_t)tl * T * kv_dim, min(T, cnt - tl * T), hd, kv_dim, v16);
            cp_commit();
        }
        cp_wait0();
        __syncthreads(); /* the V tile, and (first time) the softmax weights */
        const float *vt_ = vt;
        const int rows = min(T, cnt - tl * T);
#pragma unroll
        for (int u = 0; u < ATT2_DU; u++) {
            const int d = t + u * ATT_T;
            if (u < nd && d < hd) {
#pragma unroll 8
                for (int rr = 0; rr < rows; rr++) {
                    const float vv = vt_[rr * hd + d];
                    const int r = tl * T + rr;
#pragma unroll
                    for (int g = 0; g < ATT_GB; g++)
                        if (g < gb) acc[u][g] = fmaf(se[g * cs + r], vv, acc[u][g]);
                }
            }
        }
        __syncthreads(); /* done with this V tile */
    }
#pragma unroll
    for (int u = 0; u < ATT2_DU; u++) {
        const int d = t + u * ATT_T;
        if (!(u < nd && d < hd)) continue;
#pragma unroll
        for (int g = 0; g < ATT_GB; g++) {
            if (g >= gb) break;
            if (single) {
                a.out[((size_t)i * a.nh + h0 + g) * hd + d] = acc[u][g];
            } else {
                float *w = a.ws + (((size_t)i * a.nh + h0 + g) * ATT_MAXC + c) * (hd + 2);
                w[d] = acc[u][g];
                if (d == 0) {
                    w[hd] = s_ml[g][0];
                    w[hd + 1] = s_ml[g][1];
                }
            }
        }
    }
    if (single) return;
    /* the last block of this (row, head group) merges the chunks in order */
    __threadfence();
    __syncthreads();
    int *counter = a.cnt + (size_t)i * a.nkv * a.qgroups + blockIdx.y;
    if (t == 0) s_last = atomicAdd(counter, 1) == nch - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int g = 0; g < gb; g++) {
        const float *w = a.ws + ((size_t)i * a.nh + h0 + g) * ATT_MAXC * (hd + 2);
        float mk[ATT_MAXC], lk[ATT_MAXC];
#pragma unroll
        for (int k = 0; k < ATT_MAXC; k++)
            if (k < nch) {
                mk[k] = __ldcg(w + (size_t)k * (hd + 2) + hd);
                lk[k] = __ldcg(w + (size_t)k * (hd + 2) + hd + 1);
            }
        float m = -FLT_MAX;
#pragma unroll
        for (int k = 0; k < ATT_MAXC; k++)
            if (k < nch) m = fmaxf(m, mk[k]);
        float l = 0.0f;
#pragma unroll
        for (int k = 0; k < ATT_MAXC; k++)
            if (k < nch) l = fmaf(lk[k], expf(mk[k] - m), l);
        for (int d = t; d < hd; d += ATT_T) {
            float ak[ATT_MAXC];
#pragma unroll
            for (int k = 0; k < ATT_MAXC; k++)
                if (k < nch) ak[k] = __ldcg(w + (size_t)k * (hd + 2) + d);
            float acc1 = 0.0f;
#pragma unroll
            for (int k = 0; k < ATT_MAXC; k++)
                if (k < nch) acc1 = fmaf(ak[k], expf(mk[k] - m), acc1);
            a.out[((size_t)i * a.nh + h0 + g) * hd + d] = acc1 / l;
        }
    }
    if (t == 0) *counter = 0;
}

extern "C" size_t cuda_attn_smem_bytes(int hd, int n_ctx, int v2)
{
    const size_t base = sizeof(float) * ((size_t)ATT_GB * hd + (size_t)ATT_GB * att_chunk(n_ctx));
    return v2 ? base + sizeof(float) * 2 * (size_t)att2_tile(hd) * hd : base;
}

extern "C" cudaError_t cuda_attn_setup(int max_smem)
{
    const void *ks[2] = {(const void *)attn_kernel, (const void *)attn2_kernel};
    for (int v = 0; v < 2; v++) {
        cudaFuncAttributes fa;
        cudaError_t e = cudaFuncGetAttributes(&fa, ks[v]);
        if (e == cudaSuccess)
            e = cudaFuncSetAttribute(ks[v], cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem - (int)fa.sharedSizeBytes);
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

extern "C" cudaError_t cuda_attn_launch(const struct attn_args *a, cudaStream_t s, int pdl, int v2)
{
    v2 = v2 && a->hd <= ATT2_DU * ATT_T;
    return cu_launch(v2 ? attn2_kernel : attn_kernel, dim3(a->n, a->nkv * a->qgroups, ATT_MAXC), dim3(ATT_T),
                     cuda_attn_smem_bytes(a->hd, a->n_ctx, v2), s, pdl, *a);
}

/* ---- element-wise ---- */
__global__ void __launch_bounds__(256) silu_kernel(const __grid_constant__ struct ew_args a)
{
    pdl_launch();
    pdl_wait();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.cnt; i += (int64_t)gridDim.x * blockDim.x)
        a.out[i] = silu_mul_f(a.a[i], a.b[i]);
}

__global__ void __launch_bounds__(256) add_kernel(const __grid_constant__ struct ew_args a)
{
    pdl_launch();
    pdl_wait();
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.cnt; i += (int64_t)gridDim.x * blockDim.x)
        a.out[i] += a.b[i];
}

static unsigned ew_blocks(int64_t n)
{
    const int64_t b = (n + 255) / 256;
    return (unsigned)(b < 1 ? 1 : b > 4096 ? 4096 : b);
}

extern "C" cudaError_t cuda_silu_launch(const struct ew_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(silu_kernel, dim3(ew_blocks(a->cnt)), dim3(256), 0, s, pdl, *a);
}

extern "C" cudaError_t cuda_add_launch(const struct ew_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(add_kernel, dim3(ew_blocks(a->cnt)), dim3(256), 0, s, pdl, *a);
}

/* ---- row gather (rows in order, like memmove per row, when source and destination overlap) ---- */
__global__ void __launch_bounds__(256) gather_kernel(const __grid_constant__ struct gather_args a)
{
    pdl_launch();
    pdl_wait();
    if (a.overlap) {
        for (int i = 0; i < a.n; i++) {
            const float *s = a.src + (size_t)a.idx[i] * a.dim;
            float *d = a.dst + (size_t)i * a.dim;
            for (int k = threadIdx.x; k < a.dim; k += blockDim.x) d[k] = s[k];
            __syncthreads();
        }
        return;
    }
    const int i = blockIdx.x;
    const float *s = a.src + (size_t)a.idx[i] * a.dim;
    float *d = a.dst + (size_t)i * a.dim;
    for (int k = threadIdx.x; k < a.dim; k += blockDim.x) d[k] = s[k];
}

extern "C" cudaError_t cuda_gather_launch(const struct gather_args *a, cudaStream_t s, int pdl)
{
    return cu_launch(gather_kernel, dim3(a->overlap ? 1 : a->n), dim3(256), 0, s, pdl, *a);
}

/* ---- uploads: copies out of the pinned staging buffer (mapped into the device's address space), so that a
 * captured graph holds kernels only; pieces of one forward travel in one launch ---- */
__global__ void __launch_bounds__(256) upload_kernel(const __grid_constant__ struct upload_args a)
{
    pdl_launch();
    pdl_wait(); /* the destination may still be read by the previous kernel */
    const int p = blockIdx.y;
    if (p >= a.n) return;
    const unsigned char *s = (const unsigned char *)a.src[p];
    unsigned char *d = (unsigned char *)a.dst[p];
    const unsigned long long bytes = a.bytes[p];
    const unsigned long long t = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x, stride = (unsigned long long)gridDim.x * blockDim.x;
    if ((((uintptr_t)s | (uintptr_t)d | bytes) & 15) == 0) {
        for (unsigned long long i = t; i < bytes / 16; i += stride) ((uint4 *)d)[i] = ((const uint4 *)s)[i];
    } else if ((((uintptr_t)s | (uintptr_t)d | bytes) & 3) == 0) {
        for (unsigned long long i = t; i < bytes / 4; i += stride) ((uint32_t *)d)[i] = ((const uint32_t *)s)[i];
    } else {
        for (unsigned long long i = t; i < bytes; i += stride) d[i] = s[i];
    }
}

extern "C" cudaError_t cuda_upload_launch(const struct upload_args *a, cudaStream_t s, int pdl)
{
    unsigned long long most = 0;
    for (int i = 0; i < a->n; i++) most = a->bytes[i] > most ? a->bytes[i] : most;
    unsigned long long blocks = (most + 16 * 256 - 1) / (16 * 256);
    blocks = blocks < 1 ? 1 : blocks > 256 ? 256 : blocks;
    return cu_launch(upload_kernel, dim3((unsigned)blocks, a->n), dim3(256), 0, s, pdl, *a);
}
