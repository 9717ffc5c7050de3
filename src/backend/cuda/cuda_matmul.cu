/* cuda_matmul: y[n][m] = W[m][:] . x[n][:] for prepared weights, decode and prefill alike.
 *
 * One kernel serves every batch size, so that a row's result never depends on the batch it is in:
 *   - W (Q8/Q4 codes or bf16) is the A operand of mma.m16n8k16 (bf16 in, fp32 accumulate); quantized codes
 *     enter centred (q - 128, q - 8: exact in bf16) and each group's partial sum is scaled afterwards:
 *     sum_g [ s_g * sum_k (q - c) x + (b_g + c s_g) * sum_k x ].
 *   - x (fp32) is split into bf16 hi + lo (x - hi), two MMAs: about 16 significant bits per element, so the
 *     product carries a relative error near 2^-17 per term, comparable to float32 accumulation.
 *   - K is split over the block's warps in fixed slices chosen from the weight's shape alone; each warp walks its
 *     slice in order, the slices are summed in warp order through shared memory. The batch is walked in tiles of
 *     8 columns (8, 16 or 32 per pass): the arithmetic for an output element is the same whatever the batch.
 * A block owns one 16-row tile (two for a gate/up pair); its warps stream their slice's 16-byte chunks through a
 * register ring, prefetched before griddepcontrol.wait, i.e. while the previous kernel still runs.
 * F32 weights (and F16, converted at load) take a plain FMA kernel: one warp per output row.
 */
#include "backend/cuda/cuda_common.cuh"

#include <stdio.h>
#include <string.h>

/* ---- device helpers ---- */
static __device__ __forceinline__ uint32_t bf2_sub(uint32_t a, uint32_t b)
{
    __nv_bfloat162 x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    __nv_bfloat162 r = __hsub2(x, y);
    uint32_t o;
    memcpy(&o, &r, 4);
    return o;
}

/* two bytes (in the low byte of each 16-bit half) -> bf16x2 of (q - 128): 128 + (q & 127) minus 256 or 128 */
static __device__ __forceinline__ uint32_t q8_pair(uint32_t t)
{
    const uint32_t v = (t & 0x007f007fu) | 0x43004300u;
    const uint32_t c = (t & 0x00800080u) ^ 0x43804380u;
    return bf2_sub(v, c);
}

/* two nibbles (low nibble of each half) -> bf16x2 of (q - 8) */
static __device__ __forceinline__ uint32_t q4_pair(uint32_t t) { return bf2_sub((t & 0x000f000fu) | 0x43004300u, 0x43084308u); }

template <int WT>
static __device__ __forceinline__ void dequant(const uint4 &cur, int ks, uint32_t a[4])
{
    if (WT == CW_Q8) {
        const uint32_t lo = ks == 0 ? cur.x : cur.z, hi = ks == 0 ? cur.y : cur.w;
        a[0] = q8_pair(__byte_perm(lo, 0, 0x4140));
        a[1] = q8_pair(__byte_perm(lo, 0, 0x4342));
        a[2] = q8_pair(__byte_perm(hi, 0, 0x4140));
        a[3] = q8_pair(__byte_perm(hi, 0, 0x4342));
    } else if (WT == CW_Q4) {
        const uint32_t w = ks == 0 ? cur.x : ks == 1 ? cur.y : ks == 2 ? cur.z : cur.w;
        a[0] = q4_pair(w);
        a[1] = q4_pair(w >> 4);
        a[2] = q4_pair(w >> 8);
        a[3] = q4_pair(w >> 12);
    } else {
        a[0] = cur.x;
        a[1] = cur.y;
        a[2] = cur.z;
        a[3] = cur.w;
    }
}

/* fp32 pair -> bf16x2 hi and lo with x0 ~ hi + lo */
static __device__ __forceinline__ void split2(float x0, float x1, uint32_t &hi, uint32_t &lo)
{
    const __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
    const float2 hf = __bfloat1622float2(h);
    const __nv_bfloat162 l = __floats2bfloat162_rn(__fsub_rn(x0, hf.x), __fsub_rn(x1, hf.y));
    memcpy(&hi, &h, 4);
    memcpy(&lo, &l, 4);
}

static __device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

static __device__ __forceinline__ uint4 ld_w(const uint4 *p)
{
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

/* 16 bytes of x (or the norm weight), in one load when aligned */
static __device__ __forceinline__ float4 ld_f4(const float *p, bool aligned)
{
    if (aligned) return __ldg((const float4 *)p);
    return make_float4(__ldg(p), __ldg(p + 1), __ldg(p + 2), __ldg(p + 3));
}

static __device__ __forceinline__ void prefetch_l1(const void *p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
static __device__ __forceinline__ void cp_async_commit(void) { asm volatile("cp.async.commit_group;" ::: "memory"); }
static __device__ __forceinline__ void cp_async_wait_all(void) { asm volatile("cp.async.wait_all;" ::: "memory"); }

/* ---- the kernel ---- */
template <int WT, int NT, int R>
__global__ void __launch_bounds__(512) mm_kernel(const __grid_constant__ struct mm_args p)
{
    constexpr int KC = WT == CW_Q8 ? 2 : (WT == CW_Q4 ? 4 : 1); /* k16-steps per chunk */
    constexpr bool Q = WT != CW_BF16;
    constexpr int D = (NT == 1 ? 8 : 4) / R; /* chunks in flight per lane and weight */
    constexpr float CENTER = WT == CW_Q8 ? 128.0f : 8.0f;
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int j = 0;
    if (p.n_parts > 1 && (int)blockIdx.x >= p.part[1].block0) j = 1;
    if (p.n_parts > 2 && (int)blockIdx.x >= p.part[2].block0) j = 2;
    const int mt = (int)blockIdx.x - p.part[j].block0;
    const int M = p.part[j].m;
    const uint4 *A[R];
    A[0] = p.part[j].a + (size_t)mt * p.chunks * 32 + lane;
    if constexpr (R == 2) A[1] = p.part[j].a2 + (size_t)mt * p.chunks * 32 + lane;

    /* this warp's slice of K */
    const int u0 = warp * p.units / p.slices, u1 = (warp + 1) * p.units / p.slices;
    const int c0 = u0 * p.unit_chunks, nch = (u1 - u0) * p.unit_chunks;

    uint4 buf[R][D];
#pragma unroll
    for (int d = 0; d < D; d++)
#pragma unroll
        for (int r = 0; r < R; r++) buf[r][d] = d < nch ? ld_w(A[r] + (size_t)(c0 + d) * 32) : make_uint4(0, 0, 0, 0);

    /* shared memory: scale pairs of this tile (each warp copies its own groups), partial sums, 1/rms */
    const int sbw = p.sb_f32 ? 8 : 4;
    const size_t sb_bytes = Q ? (size_t)R * p.groups * 16 * sbw : 0;
    unsigned char *s_sb = smem;
    float *s_red = (float *)(smem + sb_bytes);
    float *s_inv = s_red + (size_t)p.slices * R * NT * 128;
    int g0 = 0;
    if (Q) {
        g0 = c0 * KC / p.gsteps;
        const int bytes = nch * KC / p.gsteps * 16 * sbw;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const unsigned char *src =
                (const unsigned char *)(r == 0 ? p.part[j].sb : p.part[j].sb2) + ((size_t)mt * p.groups + g0) * 16 * sbw;
            unsigned char *dst = s_sb + ((size_t)r * p.groups + g0) * 16 * sbw;
            for (int off = lane * 16; off < bytes; off += 512) cp_async16(dst + off, src + off);
        }
        cp_async_commit();
    }
    const bool x_al = ((uintptr_t)p.x & 15) == 0, nw_al = ((uintptr_t)p.nw & 15) == 0;
    if (p.pro == MM_PRO_NORM)
        for (int off = threadIdx.x * 32; off < p.k; off += blockDim.x * 32) prefetch_l1(p.nw + off);
    pdl_launch();
    pdl_wait();
    {
        /* a small x: every 128-byte line requested at once, instead of one miss per k-step and warp */
        const int rows = min(p.n, 8 * NT);
        if ((size_t)rows * p.k <= 32768)
            for (int off = threadIdx.x * 32; off < rows * p.k; off += blockDim.x * 32) prefetch_l1(p.x + off);
    }
    if (Q) {
        cp_async_wait_all();
        __syncwarp();
    }

    for (int n0 = 0; n0 < p.n; n0 += 8 * NT) {
        if (n0 > 0) {
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (d < nch) buf[r][d] = ld_w(A[r] + (size_t)(c0 + d) * 32);
        }
        if (p.pro == MM_PRO_NORM) {
            __syncthreads(); /* s_inv of the previous pass */
            for (int rr = warp; rr < 8 * NT; rr += p.slices) {
                const int row = n0 + rr;
                const float inv = row < p.n ? warp_inv_rms(p.x + (size_t)row * p.k, p.k, p.eps, lane) : 0.0f;
                if (lane == 0) s_inv[rr] = inv;
            }
            __syncthreads();
            if (blockIdx.x == 0 && p.xb) {
                for (int rr = 0; rr < 8 * NT && n0 + rr < p.n; rr++) {
                    const float *xr = p.x + (size_t)(n0 + rr) * p.k;
                    float *o = p.xb + (size_t)(n0 + rr) * p.k;
                    for (int kk = threadIdx.x; kk < p.k; kk += blockDim.x) o[kk] = norm_apply(xr[kk], s_inv[rr], p.nw[kk]);
                }
            }
        }
        float acc[R][NT][4], cg[R][NT][4], xsp[NT], inv[NT];
        const float *xr[NT];
        bool ok[NT];
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const int row = n0 + nt * 8 + (lane >> 2);
            ok[nt] = row < p.n;
            xr[nt] = p.x + (size_t)(ok[nt] ? row : 0) * p.k;
            inv[nt] = p.pro == MM_PRO_NORM ? s_inv[nt * 8 + (lane >> 2)] : 1.0f;
            xsp[nt] = 0.0f;
#pragma unroll
            for (int r = 0; r < R; r++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[r][nt][i] = cg[r][nt][i] = 0.0f;
        }
        int gstep = 0, g = g0;
        for (int cc = 0; cc < nch; cc += D) {
#pragma unroll
            for (int d = 0; d < D; d++) {
                const int c = cc + d;
                if (c < nch) {
                    uint4 cur[R];
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        cur[r] = buf[r][d];
                        if (c + D < nch) buf[r][d] = ld_w(A[r] + (size_t)(c0 + c + D) * 32);
                    }
#pragma unroll
                    for (int ks = 0; ks < KC; ks++) {
                        const int k = ((c0 + c) * KC + ks) * 16 + (lane & 3) * 4;
                        float4 w4 = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
                        if (p.pro == MM_PRO_NORM && k < p.k) w4 = ld_f4(p.nw + k, nw_al);
                        uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
                        for (int nt = 0; nt < NT; nt++) {
                            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                            if (n0 + nt * 8 < p.n) {
                                if (ok[nt] && k < p.k) v = ld_f4(xr[nt] + k, x_al);
                                if (p.pro == MM_PRO_NORM) {
                                    v.x = norm_apply(v.x, inv[nt], w4.x);
                                    v.y = norm_apply(v.y, inv[nt], w4.y);
                                    v.z = norm_apply(v.z, inv[nt], w4.z);
                                    v.w = norm_apply(v.w, inv[nt], w4.w);
                                }
                                if (Q) xsp[nt] += (v.x + v.y) + (v.z + v.w);
                            }
                            split2(v.x, v.y, bh[nt][0], bl[nt][0]);
                            split2(v.z, v.w, bh[nt][1], bl[nt][1]);
                        }
#pragma unroll
                        for (int r = 0; r < R; r++) {
                            uint32_t a[4];
                            dequant<WT>(cur[r], ks, a);
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                if (n0 + nt * 8 < p.n) {
                                    float *cc_ = Q ? cg[r][nt] : acc[r][nt];
                                    mma_bf16(cc_, a, bh[nt][0], bh[nt][1]);
                                    mma_bf16(cc_, a, bl[nt][0], bl[nt][1]);
                                }
                            }
                        }
                        if (Q && ++gstep == p.gsteps) {
                            /* fold the group: acc += s * C + (b + c s) * sum(x) */
                            gstep = 0;
#pragma unroll
                            for (int nt = 0; nt < NT; nt++) {
                                float t = xsp[nt];
                                t += __shfl_xor_sync(0xffffffffu, t, 1);
                                t += __shfl_xor_sync(0xffffffffu, t, 2);
                                const float xa = __shfl_sync(0xffffffffu, t, (lane & 3) * 8);
                                const float xb = __shfl_sync(0xffffffffu, t, (lane & 3) * 8 + 4);
                                xsp[nt] = 0.0f;
#pragma unroll
                                for (int r = 0; r < R; r++) {
                                    const size_t i0 = ((size_t)r * p.groups + g) * 16 + (lane >> 2);
                                    float s0, b0, s1, b1;
                                    if (p.sb_f32) {
                                        const float2 e0 = ((const float2 *)s_sb)[i0], e1 = ((const float2 *)s_sb)[i0 + 8];
                                        s0 = e0.x, b0 = e0.y, s1 = e1.x, b1 = e1.y;
                                    } else {
                                        const uint32_t e0 = ((const uint32_t *)s_sb)[i0], e1 = ((const uint32_t *)s_sb)[i0 + 8];
                                        s0 = bf16_bits_f(e0 & 0xffffu), b0 = bf16_bits_f(e0 >> 16);
                                        s1 = bf16_bits_f(e1 & 0xffffu), b1 = bf16_bits_f(e1 >> 16);
                                    }
                                    const float bc0 = fmaf(CENTER, s0, b0), bc1 = fmaf(CENTER, s1, b1);
                                    float *ac = acc[r][nt], *cq = cg[r][nt];
                                    ac[0] = fmaf(bc0, xa, fmaf(s0, cq[0], ac[0]));
                                    ac[1] = fmaf(bc0, xb, fmaf(s0, cq[1], ac[1]));
                                    ac[2] = fmaf(bc1, xa, fmaf(s1, cq[2], ac[2]));
                                    ac[3] = fmaf(bc1, xb, fmaf(s1, cq[3], ac[3]));
                                    cq[0] = cq[1] = cq[2] = cq[3] = 0.0f;
                                }
                            }
                            g++;
                        }
                    }
                }
            }
        }
        /* sum the slices in warp order, then the epilogue */
        float *red = s_red + (size_t)warp * (R * NT * 128);
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) red[((r * NT + nt) * 4 + i) * 32 + lane] = acc[r][nt][i];
        __syncthreads();
        const int E = NT * 128;
        for (int e = threadIdx.x; e < E; e += blockDim.x) {
            float v[R];
#pragma unroll
            for (int r = 0; r < R; r++) {
                float s = s_red[r * E + e];
                for (int w = 1; w < p.slices; w++) s += s_red[(size_t)w * (R * E) + r * E + e];
                v[r] = s;
            }
            const int q = e >> 5, ln = e & 31, nt = q >> 2, i = q & 3;
            const int m = mt * 16 + (ln >> 2) + (i >> 1) * 8;
            const int n = n0 + nt * 8 + (ln & 3) * 2 + (i & 1);
            if (m < M && n < p.n) {
                const size_t o = (size_t)n * M + m;
                float y = v[0];
                if (p.part[j].bias) y += p.part[j].bias[m];
                if (R == 2 && p.epi == MM_EPI_GLU) {
                    float u = v[R - 1];
                    if (p.part[j].bias2) u += p.part[j].bias2[m];
                    p.part[j].y2[o] = u;
                    p.part[j].y[o] = silu_mul_f(y, u);
                } else {
                    p.part[j].y[o] = y;
                    if (p.epi == MM_EPI_ADD) p.x2[o] += y;
                }
            }
        }
        __syncthreads(); /* s_red is reused by the next pass */
    }
}

/* ---- v2: the streaming kernel ----
 * The same arithmetic per output element as mm_kernel (same slices, same chunk order, same group folds, slices
 * summed in slice order, same epilogue): results are bit-identical. What changes is the schedule:
 *   - a block of p.warps warps (at most 8) owns groups of p.tb consecutive tiles: groups blockIdx.x, + gridDim.x,
 *     ... (the grid is capped near the SM count, so consecutive kernels can be resident together and the next
 *     one streams its weights under programmatic dependent launch while this one finishes);
 *   - a work item is one (tile, slice); the tb * slices items of a group go to the warps round-robin, slice-major
 *     (the warps of one round read the same slice of x: the L1 serves the other tiles);
 *   - each warp's register ring always holds the next chunks of its own item stream: when a chunk of the current
 *     item is consumed, its slot is refilled with a later chunk of the same item or, near the end, with the first
 *     chunks of the warp's next item; the next item's scale pairs are copied (cp.async) into the warp's other
 *     shared-memory buffer while the current item computes. */
struct mm2_item {
    const uint4 *a[2];
    const unsigned char *sb[2];
    int c0, nch;
};

/* The item (tile, slice) of position (group q, round) for this warp; false when the warp has none there. */
static __device__ __forceinline__ bool mm2_locate(const struct mm_args &p, int q, int round, int warp, int *tile, int *slice)
{
    const int i = round * p.warps + warp;
    if (i >= p.tb * p.slices) return false;
    const int t = i % p.tb, tl = q * p.tb + t;
    if (tl >= p.tiles) return false;
    *tile = tl;
    *slice = i / p.tb;
    return true;
}

/* Moves position (q, pass, round) to the warp's next item; false when it has no more. */
static __device__ __forceinline__ bool mm2_advance(const struct mm_args &p, int passes, int rounds, int warp, int &q, int &pass,
                                                   int &round, int *tile, int *slice)
{
    for (;;) {
        if (++round == rounds) {
            round = 0;
            if (++pass == passes) {
                pass = 0;
                q += (int)gridDim.x;
                if (q >= p.ngroups) return false;
            }
        }
        if (mm2_locate(p, q, round, warp, tile, slice)) return true;
    }
}

/* The warp's next item after position (q, pass, round); false when it has no more. */
static __device__ __forceinline__ bool mm2_next(const struct mm_args &p, int passes, int rounds, int warp, int q, int pass,
                                                int round, int *tile, int *slice)
{
    return mm2_advance(p, passes, rounds, warp, q, pass, round, tile, slice);
}

static __device__ __forceinline__ int mm2_part(const struct mm_args &p, int tile)
{
    int j = 0;
    if (p.n_parts > 1 && tile >= p.part[1].block0) j = 1;
    if (p.n_parts > 2 && tile >= p.part[2].block0) j = 2;
    return j;
}

template <int R, int KC>
static __device__ __forceinline__ void mm2_item_of(const struct mm_args &p, int tile, int s, int lane, int sbw, mm2_item &it)
{
    const int j = mm2_part(p, tile), mt = tile - p.part[j].block0;
    const int u0 = s * p.units / p.slices, u1 = (s + 1) * p.units / p.slices;
    it.c0 = u0 * p.unit_chunks;
    it.nch = (u1 - u0) * p.unit_chunks;
    it.a[0] = p.part[j].a + (size_t)mt * p.chunks * 32 + lane;
    it.a[1] = R == 2 ? p.part[j].a2 + (size_t)mt * p.chunks * 32 + lane : it.a[0];
    const size_t sbo = p.gsteps ? ((size_t)mt * p.groups + (size_t)(it.c0 * KC / p.gsteps)) * 16 * sbw : 0;
    it.sb[0] = (const unsigned char *)p.part[j].sb + sbo;
    it.sb[1] = R == 2 ? (const unsigned char *)p.part[j].sb2 + sbo : it.sb[0];
}

static __device__ __forceinline__ void cp_async_wait1(void) { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

/* ---- mbarrier + bulk copy (TMA) helpers ---- */
static __device__ __forceinline__ uint32_t smem_addr(const void *p) { return (uint32_t)__cvta_generic_to_shared(p); }
static __device__ __forceinline__ void mbar_init(uint64_t *bar)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}
static __device__ __forceinline__ void mbar_expect(uint64_t *bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
/* Waits for the phase of parity `parity` to complete. A copy that never lands (a bug) traps after ~10 s of waiting
 * instead of hanging the device: the launch then fails with an error. */
static __device__ __forceinline__ void mbar_wait(uint64_t *bar, uint32_t parity)
{
    uint32_t done = 0;
    long long t0 = 0;
    for (;;) {
        asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                     : "=r"(done)
                     : "r"(smem_addr(bar)), "r"(parity)
                     : "memory");
        if (done) return;
        if (t0 == 0) t0 = clock64();
        else if (clock64() - t0 > 20000000000ll) __trap();
    }
}
static __device__ __forceinline__ void bulk_g2s(void *dst, const void *src, uint32_t bytes, uint64_t *bar)
{
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}

template <int WT, int NT, int R, bool TMA>
__global__ void __launch_bounds__(256, 2) mm2_kernel(const __grid_constant__ struct mm_args p)
{
    constexpr int KC = WT == CW_Q8 ? 2 : (WT == CW_Q4 ? 4 : 1);
    constexpr bool Q = WT != CW_BF16;
    constexpr int D = (NT == 1 ? 8 : 4) / R;
    constexpr float CENTER = WT == CW_Q8 ? 128.0f : 8.0f;
    constexpr int E = NT * 128;
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int sbw = p.sb_f32 ? 8 : 4;
    const int passes = (p.n + 8 * NT - 1) / (8 * NT);
    const int items = p.tb * p.slices, rounds = (items + p.warps - 1) / p.warps;
    constexpr bool tma = TMA;
    /* shared memory. ring mode: [warps][2][R][gmax][16] scale pairs | red | s_inv.
     * tma mode: [warps][nb] mbarriers (padded to 128 B) | [warps][nb] buffers of bufb bytes | red | s_inv. */
    const size_t sb_one = Q ? (size_t)R * p.gmax * 16 * sbw : 0;
    size_t off = 0;
    uint64_t *bars = (uint64_t *)smem;
    unsigned char *s_sbw = smem + (size_t)warp * 2 * sb_one;
    unsigned char *wbase = smem;
    if (tma) {
        off = ((size_t)p.warps * p.nb * 8 + 127) & ~(size_t)127;
        wbase = smem + off + (size_t)warp * p.nb * p.bufb;
        off += (size_t)p.warps * p.nb * p.bufb;
    } else {
        off = (size_t)p.warps * 2 * sb_one;
    }
    float *s_red = (float *)(smem + off);
    float *s_inv = s_red + (size_t)items * R * E;
    uint64_t *wbar = bars + (size_t)warp * (tma ? p.nb : 0);

    /* ring mode: scale pairs of an item into buffer b of this warp, one commit group per item (empty when none) */
    auto copy_sb = [&](const mm2_item &it, int b) {
        if (Q) {
            const int bytes = it.nch * KC / p.gsteps * 16 * sbw;
#pragma unroll
            for (int r = 0; r < R; r++) {
                unsigned char *dst = s_sbw + (size_t)b * sb_one + (size_t)r * p.gmax * 16 * sbw;
                for (int o = lane * 16; o < bytes; o += 512) cp_async16(dst + o, it.sb[r] + o);
            }
        }
        cp_async_commit();
    };
    /* tma mode: item `it` into buffer b (lane 0 issues; the mbarrier counts the bytes) */
    auto issue_tma = [&](const mm2_item &it, int b) {
        if (lane == 0) {
            unsigned char *dst = wbase + (size_t)b * p.bufb;
            const uint32_t wb = (uint32_t)it.nch * 512u, sbb = Q ? (uint32_t)(it.nch * KC / p.gsteps * 16 * sbw) : 0u;
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); /* our reads of the buffer come first */
            mbar_expect(&wbar[b], (uint32_t)R * (wb + sbb));
#pragma unroll
            for (int r = 0; r < R; r++) {
                bulk_g2s(dst + (size_t)r * p.nchmax * 512, it.a[r] - lane + (size_t)it.c0 * 32, wb, &wbar[b]);
                if (Q) bulk_g2s(dst + (size_t)R * p.nchmax * 512 + (size_t)r * p.gmax * 16 * sbw, it.sb[r], sbb, &wbar[b]);
            }
        }
    };

    uint4 buf[R][D];
#pragma unroll
    for (int d = 0; d < D; d++)
#pragma unroll
        for (int r = 0; r < R; r++) buf[r][d] = make_uint4(0, 0, 0, 0);
    mm2_item cur;
    cur.nch = 0;
    /* tma mode: position of the last item issued (the warp's items are issued nb - 1 ahead of the one computed) */
    int iq = 0, ipass = 0, iround = 0;
    bool imore = false;
    int issued = 0;
    uint32_t phase = 0; /* bit b: parity to wait for on buffer b */
    {
        int t0, s0;
        bool have = (int)blockIdx.x < p.ngroups &&
                    (mm2_locate(p, blockIdx.x, 0, warp, &t0, &s0) || mm2_next(p, passes, rounds, warp, blockIdx.x, 0, 0, &t0, &s0));
        if (tma) {
            if (lane == 0)
                for (int b = 0; b < p.nb; b++) mbar_init(&wbar[b]);
            asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
            __syncwarp();
            if (have) {
                /* the issue cursor: position of the last item issued */
                iq = blockIdx.x;
                ipass = 0;
                iround = 0;
                int tt = t0, ss = s0;
                if (!mm2_locate(p, iq, 0, warp, &tt, &ss)) mm2_advance(p, passes, rounds, warp, iq, ipass, iround, &tt, &ss);
                mm2_item it;
                mm2_item_of<R, KC>(p, tt, ss, lane, sbw, it);
                issue_tma(it, 0);
                issued = 1;
                imore = true;
                while (issued < p.nb - 1) {
                    if (!mm2_advance(p, passes, rounds, warp, iq, ipass, iround, &tt, &ss)) {
                        imore = false;
                        break;
                    }
                    mm2_item_of<R, KC>(p, tt, ss, lane, sbw, it);
                    issue_tma(it, issued % p.nb);
                    issued++;
                }
            }
        } else if (have) {
            mm2_item_of<R, KC>(p, t0, s0, lane, sbw, cur);
#pragma unroll
            for (int d = 0; d < D; d++)
#pragma unroll
                for (int r = 0; r < R; r++)
                    if (d < cur.nch) buf[r][d] = ld_w(cur.a[r] + (size_t)(cur.c0 + d) * 32);
            copy_sb(cur, 0);
        } else {
            cp_async_commit();
        }
    }
    if (p.pro == MM_PRO_NORM)
        for (int o = threadIdx.x * 32; o < p.k; o += blockDim.x * 32) prefetch_l1(p.nw + o);
    pdl_launch();
    pdl_wait();
    const bool x_al = ((uintptr_t)p.x & 15) == 0, nw_al = ((uintptr_t)p.nw & 15) == 0;

    int kk_item = 0; /* items this warp has done: ring mode: item k's scales are in buffer k & 1; tma: buffer k % nb */
    for (int q = blockIdx.x; q < p.ngroups; q += gridDim.x) {
        const bool first_group = q == (int)blockIdx.x;
        for (int pass = 0; pass < passes; pass++) {
            const int n0 = pass * 8 * NT;
            if (first_group || passes > 1) {
                /* a small x: every 128-byte line requested at once */
                const int rows = min(p.n - n0, 8 * NT);
                if ((size_t)rows * p.k <= 32768)
                    for (int o = threadIdx.x * 32; o < rows * p.k; o += blockDim.x * 32) prefetch_l1(p.x + (size_t)n0 * p.k + o);
            }
            if (p.pro == MM_PRO_NORM && (first_group || passes > 1)) {
                __syncthreads(); /* s_inv of the previous pass */
                for (int rr = warp; rr < 8 * NT; rr += p.warps) {
                    const int row = n0 + rr;
                    const float inv = row < p.n ? warp_inv_rms(p.x + (size_t)row * p.k, p.k, p.eps, lane) : 0.0f;
                    if (lane == 0) s_inv[rr] = inv;
                }
                __syncthreads();
                if (blockIdx.x == 0 && q == 0 && p.xb) {
                    for (int rr = 0; rr < 8 * NT && n0 + rr < p.n; rr++) {
                        const float *xr = p.x + (size_t)(n0 + rr) * p.k;
                        float *o = p.xb + (size_t)(n0 + rr) * p.k;
                        for (int kk = threadIdx.x; kk < p.k; kk += blockDim.x) o[kk] = norm_apply(xr[kk], s_inv[rr], p.nw[kk]);
                    }
                }
            }
            for (int round = 0; round < rounds; round++) {
                int tile, sl;
                if (!mm2_locate(p, q, round, warp, &tile, &sl)) continue;
                mm2_item nx;
                nx.nch = 0;
                const unsigned char *s_sb;
                const uint4 *wsm = nullptr;
                if (tma) {
                    /* keep nb - 1 items in flight: issue the next one into the buffer the previous item used */
                    if (imore) {
                        int nt_, ns_;
                        if (mm2_advance(p, passes, rounds, warp, iq, ipass, iround, &nt_, &ns_)) {
                            mm2_item it;
                            mm2_item_of<R, KC>(p, nt_, ns_, lane, sbw, it);
                            issue_tma(it, issued % p.nb);
                            issued++;
                        } else {
                            imore = false;
                        }
                    }
                    mm2_item_of<R, KC>(p, tile, sl, lane, sbw, cur);
                    const int b = kk_item % p.nb;
                    mbar_wait(&wbar[b], (phase >> b) & 1u);
                    phase ^= 1u << b;
                    wsm = (const uint4 *)(wbase + (size_t)b * p.bufb);
                    s_sb = wbase + (size_t)b * p.bufb + (size_t)R * p.nchmax * 512;
                } else {
                    /* cur is this item; fetch the next one's scales into the other buffer */
                    int ntile = 0, nsl = 0;
                    const bool hn = mm2_next(p, passes, rounds, warp, q, pass, round, &ntile, &nsl);
                    if (hn) {
                        mm2_item_of<R, KC>(p, ntile, nsl, lane, sbw, nx);
                        copy_sb(nx, (kk_item + 1) & 1);
                    } else {
                        cp_async_commit();
                    }
                    /* ring slots this item does not use take the next item's first chunks now */
#pragma unroll
                    for (int d = 0; d < D; d++)
#pragma unroll
                        for (int r = 0; r < R; r++)
                            if (d >= cur.nch && d < nx.nch) buf[r][d] = ld_w(nx.a[r] + (size_t)(nx.c0 + d) * 32);
                    cp_async_wait1(); /* this item's scale pairs */
                    __syncwarp();
                    s_sb = s_sbw + (size_t)(kk_item & 1) * sb_one;
                }

                float acc[R][NT][4], cg[R][NT][4], xsp[NT], inv[NT];
                const float *xr[NT];
                bool ok[NT];
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    const int row = n0 + nt * 8 + (lane >> 2);
                    ok[nt] = row < p.n;
                    xr[nt] = p.x + (size_t)(ok[nt] ? row : 0) * p.k;
                    inv[nt] = p.pro == MM_PRO_NORM ? s_inv[nt * 8 + (lane >> 2)] : 1.0f;
                    xsp[nt] = 0.0f;
#pragma unroll
                    for (int r = 0; r < R; r++)
#pragma unroll
                        for (int i = 0; i < 4; i++) acc[r][nt][i] = cg[r][nt][i] = 0.0f;
                }
                int gstep = 0, g = 0;
                const int nch = cur.nch, c0 = cur.c0;
                for (int cc = 0; cc < nch; cc += D) {
#pragma unroll
                    for (int d = 0; d < D; d++) {
                        const int c = cc + d;
                        if (c < nch) {
                            uint4 cw[R];
#pragma unroll
                            for (int r = 0; r < R; r++) {
                                if (tma) {
                                    cw[r] = wsm[((size_t)r * p.nchmax + c) * 32 + lane];
                                } else {
                                    cw[r] = buf[r][d];
                                    if (c + D < nch) buf[r][d] = ld_w(cur.a[r] + (size_t)(c0 + c + D) * 32);
                                    else if (d < nx.nch) buf[r][d] = ld_w(nx.a[r] + (size_t)(nx.c0 + d) * 32);
                                }
                            }
#pragma unroll
                            for (int ks = 0; ks < KC; ks++) {
                                const int k = ((c0 + c) * KC + ks) * 16 + (lane & 3) * 4;
                                float4 w4 = make_float4(1.0f, 1.0f, 1.0f, 1.0f);
                                if (p.pro == MM_PRO_NORM && k < p.k) w4 = ld_f4(p.nw + k, nw_al);
                                uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
                                for (int nt = 0; nt < NT; nt++) {
                                    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                                    if (n0 + nt * 8 < p.n) {
                                        if (ok[nt] && k < p.k) v = ld_f4(xr[nt] + k, x_al);
                                        if (p.pro == MM_PRO_NORM) {
                                            v.x = norm_apply(v.x, inv[nt], w4.x);
                                            v.y = norm_apply(v.y, inv[nt], w4.y);
                                            v.z = norm_apply(v.z, inv[nt], w4.z);
                                            v.w = norm_apply(v.w, inv[nt], w4.w);
                                        }
                                        if (Q) xsp[nt] += (v.x + v.y) + (v.z + v.w);
                                    }
                                    split2(v.x, v.y, bh[nt][0], bl[nt][0]);
                                    split2(v.z, v.w, bh[nt][1], bl[nt][1]);
                                }
#pragma unroll
                                for (int r = 0; r < R; r++) {
                                    uint32_t a[4];
                                    dequant<WT>(cw[r], ks, a);
#pragma unroll
                                    for (int nt = 0; nt < NT; nt++) {
                                        if (n0 + nt * 8 < p.n) {
                                            float *cc_ = Q ? cg[r][nt] : acc[r][nt];
                                            mma_bf16(cc_, a, bh[nt][0], bh[nt][1]);
                                            mma_bf16(cc_, a, bl[nt][0], bl[nt][1]);
                                        }
                                    }
                                }
                                if (Q && ++gstep == p.gsteps) {
                                    gstep = 0;
#pragma unroll
                                    for (int nt = 0; nt < NT; nt++) {
                                        float t = xsp[nt];
                                        t += __shfl_xor_sync(0xffffffffu, t, 1);
                                        t += __shfl_xor_sync(0xffffffffu, t, 2);
                                        const float xa = __shfl_sync(0xffffffffu, t, (lane & 3) * 8);
                                        const float xb = __shfl_sync(0xffffffffu, t, (lane & 3) * 8 + 4);
                                        xsp[nt] = 0.0f;
#pragma unroll
                                        for (int r = 0; r < R; r++) {
                                            const size_t i0 = ((size_t)r * p.gmax + g) * 16 + (lane >> 2);
                                            float s0, b0, s1, b1;
                                            if (p.sb_f32) {
                                                const float2 e0 = ((const float2 *)s_sb)[i0], e1 = ((const float2 *)s_sb)[i0 + 8];
                                                s0 = e0.x, b0 = e0.y, s1 = e1.x, b1 = e1.y;
                                            } else {
                                                const uint32_t e0 = ((const uint32_t *)s_sb)[i0], e1 = ((const uint32_t *)s_sb)[i0 + 8];
                                                s0 = bf16_bits_f(e0 & 0xffffu), b0 = bf16_bits_f(e0 >> 16);
                                                s1 = bf16_bits_f(e1 & 0xffffu), b1 = bf16_bits_f(e1 >> 16);
                                            }
                                            const float bc0 = fmaf(CENTER, s0, b0), bc1 = fmaf(CENTER, s1, b1);
                                            float *ac = acc[r][nt], *cq = cg[r][nt];
                                            ac[0] = fmaf(bc0, xa, fmaf(s0, cq[0], ac[0]));
                                            ac[1] = fmaf(bc0, xb, fmaf(s0, cq[1], ac[1]));
                                            ac[2] = fmaf(bc1, xa, fmaf(s1, cq[2], ac[2]));
                                            ac[3] = fmaf(bc1, xb, fmaf(s1, cq[3], ac[3]));
                                            cq[0] = cq[1] = cq[2] = cq[3] = 0.0f;
                                        }
                                    }
                                    g++;
                                }
                            }
                        }
                    }
                }
                /* this item's partial sums, in its (tile, slice) slot */
                float *red = s_red + (size_t)((tile - q * p.tb) * p.slices + sl) * (R * E);
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int i = 0; i < 4; i++) red[((r * NT + nt) * 4 + i) * 32 + lane] = acc[r][nt][i];
                if (!tma) cur = nx;
                kk_item++;
                __syncwarp(); /* every lane is done with this item's buffers before they are refilled */
            }
            __syncthreads();
            /* sum the slices in slice order, then the epilogue (as mm_kernel) */
            for (int e = threadIdx.x; e < p.tb * E; e += blockDim.x) {
                const int t = e / E, ee = e - t * E, tile = q * p.tb + t;
                if (tile >= p.tiles) continue;
                const int j = mm2_part(p, tile), mt = tile - p.part[j].block0, M = p.part[j].m;
                const float *rb = s_red + (size_t)t * p.slices * (R * E);
                float v[R];
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float s = rb[r * E + ee];
                    for (int w = 1; w < p.slices; w++) s += rb[(size_t)w * (R * E) + r * E + ee];
                    v[r] = s;
                }
                const int qq = ee >> 5, ln = ee & 31, nt = qq >> 2, i = qq & 3;
                const int m = mt * 16 + (ln >> 2) + (i >> 1) * 8;
                const int n = n0 + nt * 8 + (ln & 3) * 2 + (i & 1);
                if (m < M && n < p.n) {
                    const size_t o = (size_t)n * M + m;
                    float y = v[0];
                    if (p.part[j].bias) y += p.part[j].bias[m];
                    if (R == 2 && p.epi == MM_EPI_GLU) {
                        float u = v[R - 1];
                        if (p.part[j].bias2) u += p.part[j].bias2[m];
                        p.part[j].y2[o] = u;
                        p.part[j].y[o] = silu_mul_f(y, u);
                    } else {
                        p.part[j].y[o] = y;
                        if (p.epi == MM_EPI_ADD) p.x2[o] += y;
                    }
                }
            }
            __syncthreads(); /* s_red is reused by the next pass */
        }
    }
    cp_async_wait_all();
}

typedef void (*mm_fn)(struct mm_args);
#define MM_K(WT, NT, R) (mm_fn) mm_kernel<WT, NT, R>
/* [kind][nt 1, 2, 4][r 1, 2]; a gate/up pair (r = 2) runs 16 batch columns per pass at most (registers) */
static const mm_fn mm_kernels[3][3][2] = {
    {{MM_K(CW_Q8, 1, 1), MM_K(CW_Q8, 1, 2)}, {MM_K(CW_Q8, 2, 1), MM_K(CW_Q8, 2, 2)}, {MM_K(CW_Q8, 4, 1), NULL}},
    {{MM_K(CW_Q4, 1, 1), MM_K(CW_Q4, 1, 2)}, {MM_K(CW_Q4, 2, 1), MM_K(CW_Q4, 2, 2)}, {MM_K(CW_Q4, 4, 1), NULL}},
    {{MM_K(CW_BF16, 1, 1), MM_K(CW_BF16, 1, 2)}, {MM_K(CW_BF16, 2, 1), MM_K(CW_BF16, 2, 2)}, {MM_K(CW_BF16, 4, 1), NULL}},
};

#define MM2_K(WT, NT, R, T) (mm_fn) mm2_kernel<WT, NT, R, T>
#define MM2_T(T)                                                                                                     \
    {{{MM2_K(CW_Q8, 1, 1, T), MM2_K(CW_Q8, 1, 2, T)}, {MM2_K(CW_Q8, 2, 1, T), MM2_K(CW_Q8, 2, 2, T)}, {MM2_K(CW_Q8, 4, 1, T), NULL}}, \
     {{MM2_K(CW_Q4, 1, 1, T), MM2_K(CW_Q4, 1, 2, T)}, {MM2_K(CW_Q4, 2, 1, T), MM2_K(CW_Q4, 2, 2, T)}, {MM2_K(CW_Q4, 4, 1, T), NULL}}, \
     {{MM2_K(CW_BF16, 1, 1, T), MM2_K(CW_BF16, 1, 2, T)},                                                       \
      {MM2_K(CW_BF16, 2, 1, T), MM2_K(CW_BF16, 2, 2, T)},                                                       \
      {MM2_K(CW_BF16, 4, 1, T), NULL}}}
/* [register ring, tma][kind][nt 1, 2, 4][r 1, 2] */
static const mm_fn mm2_kernels[2][3][3][2] = {MM2_T(false), MM2_T(true)};

static int nt_index(int nt) { return nt == 1 ? 0 : nt == 2 ? 1 : 2; }

extern "C" size_t cuda_mm_smem_bytes(const struct mm_args *a)
{
    const int sbw = a->sb_f32 ? 8 : 4;
    if (a->v2) {
        const size_t tail = sizeof(float) * ((size_t)a->tb * a->slices * a->r * a->nt * 128 + 8 * (size_t)a->nt);
        if (a->tma) return (((size_t)a->warps * a->nb * 8 + 127) & ~(size_t)127) + (size_t)a->warps * a->nb * a->bufb + tail;
        const size_t sb = a->kind == CW_BF16 ? 0 : (size_t)a->warps * 2 * a->r * a->gmax * 16 * sbw;
        return sb + tail;
    }
    size_t sb = a->kind == CW_BF16 ? 0 : (size_t)a->r * a->groups * 16 * sbw;
    return sb + sizeof(float) * ((size_t)a->slices * a->r * a->nt * 128 + 8 * (size_t)a->nt);
}

extern "C" cudaError_t cuda_matmul_setup(int max_smem)
{
    for (int v = 0; v < 3; v++)
        for (int w = 0; w < 3; w++)
            for (int t = 0; t < 3; t++)
                for (int r = 0; r < 2; r++) {
                    const mm_fn k = v ? mm2_kernels[v - 1][w][t][r] : mm_kernels[w][t][r];
                    if (!k) continue;
                    cudaFuncAttributes fa;
                    cudaError_t e = cudaFuncGetAttributes(&fa, (const void *)k);
                    if (e == cudaSuccess)
                        e = cudaFuncSetAttribute((const void *)k, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 max_smem - (int)fa.sharedSizeBytes);
                    if (e != cudaSuccess) return e;
                }
    return cudaSuccess;
}

extern "C" cudaError_t cuda_mm_launch(const struct mm_args *a, cudaStream_t s, int pdl)
{
    if (a->v2) {
        mm_fn k = mm2_kernels[a->tma ? 1 : 0][a->kind][nt_index(a->nt)][a->r - 1];
        return cu_launch(k, dim3(a->grid), dim3(32 * a->warps), (size_t)a->smem, s, pdl, *a);
    }
    mm_fn k = mm_kernels[a->kind][nt_index(a->nt)][a->r - 1];
    return cu_launch(k, dim3(a->grid), dim3(32 * a->slices), (size_t)a->smem, s, pdl, *a);
}

/* ---- float32 weights: one warp per output row, lanes over K, rows of x 8 at a time ---- */
__global__ void __launch_bounds__(256) f32mm_kernel(const __grid_constant__ struct f32mm_args a)
{
    pdl_launch();
    pdl_wait();
    const int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= a.rows) return;
    const float *w = a.w + (size_t)row * a.cols;
    for (int i0 = 0; i0 < a.n; i0 += 8) {
        float acc[8];
#pragma unroll
        for (int ii = 0; ii < 8; ii++) acc[ii] = 0.0f;
        for (int k = lane; k < a.cols; k += 32) {
            const float wk = w[k];
#pragma unroll
            for (int ii = 0; ii < 8; ii++)
                if (i0 + ii < a.n) acc[ii] = fmaf(wk, a.x[(size_t)(i0 + ii) * a.cols + k], acc[ii]);
        }
#pragma unroll
        for (int ii = 0; ii < 8; ii++) {
            float v = acc[ii];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && i0 + ii < a.n) {
                if (a.bias) v += a.bias[row];
                a.y[(size_t)(i0 + ii) * a.rows + row] = v;
            }
        }
    }
}

extern "C" cudaError_t cuda_f32mm_launch(const struct f32mm_args *a, cudaStream_t s, int pdl)
{
    const int blocks = (a->rows + 7) / 8;
    return cu_launch(f32mm_kernel, dim3(blocks), dim3(256), 0, s, pdl, *a);
}

/* ---- packing at load ---- */
static __device__ uint32_t src_code(const uint32_t *q, int bits, int64_t cols, int64_t r, int64_t k)
{
    const int per = 32 / bits;
    const uint32_t w = q[r * (cols / per) + k / per];
    return (w >> (bits * (int)(k % per))) & ((1u << bits) - 1u);
}

/* one thread per packed 32-bit word */
__global__ void pack_kernel(uint32_t *dst, const void *src, int kind, int64_t rows, int64_t cols, int chunks,
                            int64_t n_words)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_words) return;
    const int wi = (int)(idx & 3), lane = (int)((idx >> 2) & 31);
    const int64_t rest = idx >> 7;
    const int c = (int)(rest % chunks);
    const int64_t mt = rest / chunks;
    uint32_t word = 0;
    int rr, kk;
    if (kind == CW_Q8) {
        const int ks = wi >> 1;
        for (int b = 0; b < 4; b++) {
            frag_rc(lane, (wi & 1) * 4 + b, &rr, &kk);
            const int64_t r = mt * 16 + rr, k = ((int64_t)c * 2 + ks) * 16 + kk;
            const uint32_t code = (r < rows && k < cols) ? src_code((const uint32_t *)src, 8, cols, r, k) : 0u;
            word |= code << (8 * b);
        }
    } else if (kind == CW_Q4) {
        const int ks = wi;
        for (int i = 0; i < 8; i++) {
            const int e = i < 4 ? 2 * i : 2 * (i - 4) + 1;
            frag_rc(lane, e, &rr, &kk);
            const int64_t r = mt * 16 + rr, k = ((int64_t)c * 4 + ks) * 16 + kk;
            const uint32_t code = (r < rows && k < cols) ? src_code((const uint32_t *)src, 4, cols, r, k) : 0u;
            word |= code << (4 * i);
        }
    } else {
        for (int h = 0; h < 2; h++) {
            frag_rc(lane, wi * 2 + h, &rr, &kk);
            const int64_t r = mt * 16 + rr, k = (int64_t)c * 16 + kk;
            const uint32_t bits = (r < rows && k < cols) ? ((const uint16_t *)src)[r * cols + k] : 0u;
            word |= bits << (16 * h);
        }
    }
    dst[idx] = word;
}

static __device__ float load_scalar_dev(const void *p, int dt, int64_t i)
{
    if (dt == DT_BF16) return bf16_bits_f(((const uint16_t *)p)[i]);
    if (dt == DT_F16) return __half2float(__ushort_as_half(((const uint16_t *)p)[i]));
    return ((const float *)p)[i];
}

__global__ void pack_sb_kernel(void *dst, const void *s, const void *b, int dt, int sb_f32, int64_t rows, int g_src,
                               int groups, int64_t n)
{
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n) return;
    const int rr = (int)(idx & 15);
    const int g = (int)((idx >> 4) % groups);
    const int64_t r = (idx >> 4) / groups * 16 + rr;
    const bool in = r < rows && g < g_src;
    const int64_t si = r * g_src + g;
    if (sb_f32) {
        ((float2 *)dst)[idx] = in ? make_float2(load_scalar_dev(s, dt, si), load_scalar_dev(b, dt, si)) : make_float2(0, 0);
    } else {
        const uint32_t sv = in ? ((const uint16_t *)s)[si] : 0u, bv = in ? ((const uint16_t *)b)[si] : 0u;
        ((uint32_t *)dst)[idx] = sv | (bv << 16);
    }
}

__global__ void to_f32_kernel(float *dst, const uint16_t *src, int is_bf16, int64_t n)
{
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    dst[i] = is_bf16 ? bf16_bits_f(src[i]) : __half2float(__ushort_as_half(src[i]));
}

static int64_t blocks_for(int64_t n, int t) { return (n + t - 1) / t; }

extern "C" int cuda_weight_plan(struct cuda_weight *cw, const struct weight *w, char *err)
{
    memset(cw, 0, sizeof(*cw));
    cw->rows = w->rows;
    cw->cols = w->cols;
    if (w->rows < 1 || w->cols < 1) return err_set(err, ST_EINVAL, "cuda: weight %s has shape %lldx%lld", w->name ? w->name : "?", (long long)w->rows, (long long)w->cols);
    int chunk_k;
    switch (w->type) {
    case WT_Q8:
    case WT_Q4:
        if (w->group_size != 32 && w->group_size != 64 && w->group_size != 128)
            return err_set(err, ST_EUNSUPPORTED, "cuda: %s: group size %d (32, 64 or 128 supported)", w->name ? w->name : "?", w->group_size);
        if (w->cols % w->group_size)
            return err_set(err, ST_EINVAL, "cuda: %s: %lld columns is not a multiple of the group size %d", w->name ? w->name : "?",
                           (long long)w->cols, w->group_size);
        if (w->sdtype != DT_BF16 && w->sdtype != DT_F16 && w->sdtype != DT_F32)
            return err_set(err, ST_EUNSUPPORTED, "cuda: %s: scales of dtype %s", w->name ? w->name : "?", dtype_name(w->sdtype));
        cw->kind = w->type == WT_Q8 ? CW_Q8 : CW_Q4;
        chunk_k = cw->kind == CW_Q8 ? 32 : 64;
        cw->group_size = w->group_size;
        cw->gsteps = w->group_size / 16;
        cw->sb_f32 = w->sdtype != DT_BF16;
        break;
    case WT_BF16:
        cw->kind = w->cols % 16 == 0 ? CW_BF16 : CW_F32;
        chunk_k = 16;
        break;
    case WT_F16:
    case WT_F32:
        cw->kind = CW_F32;
        chunk_k = 16;
        break;
    default: return err_set(err, ST_EUNSUPPORTED, "cuda: weight type %d", (int)w->type);
    }
    if (cw->kind == CW_F32) {
        cw->dev_bytes = sizeof(float) * (size_t)w->rows * (size_t)w->cols;
        return ST_OK;
    }
    const int unit_k = cw->kind == CW_BF16 ? 16 : ST_MAX(chunk_k, cw->group_size);
    cw->kpad = (int)((w->cols + unit_k - 1) / unit_k * unit_k);
    cw->units = cw->kpad / unit_k;
    cw->unit_chunks = unit_k / chunk_k;
    cw->chunks = cw->kpad / chunk_k;
    cw->mtiles = (int)((w->rows + 15) / 16);
    if (cw->group_size) cw->groups = cw->kpad / cw->group_size;
    /* about 8 chunks (128 bytes) per lane and tile; at most 16 warps */
    int s = cw->chunks / 8;
    s = s < 1 ? 1 : s > 16 ? 16 : s;
    cw->slices = s > cw->units ? cw->units : s;
    cw->dev_bytes = (size_t)cw->mtiles * cw->chunks * 512 +
                    (cw->group_size ? (size_t)cw->mtiles * cw->groups * 16 * (cw->sb_f32 ? 8 : 4) : 0);
    return ST_OK;
}

#define CU_TRY(x)                                                                                                    \
    do {                                                                                                             \
        cudaError_t e_ = (x);                                                                                        \
        if (e_ != cudaSuccess) {                                                                                     \
            rc = err_set(err, e_ == cudaErrorMemoryAllocation ? ST_ENOMEM : ST_EIO, "cuda: %s: %s (%s)", name, #x,   \
                         cudaGetErrorString(e_));                                                                    \
            cudaGetLastError();                                                                                      \
            goto fail;                                                                                               \
        }                                                                                                            \
    } while (0)

/* Every copy is ordered on stream s with the packing kernels: a plain cudaMemcpy from pageable memory may return
 * before its DMA has landed, and kernels on another stream would then read a half-filled buffer. */
extern "C" int cuda_weight_upload(struct cuda_weight *cw, const struct weight *w, cudaStream_t s, char *err)
{
    const char *name = w->name ? w->name : "weight";
    int rc = ST_OK;
    void *tmp = NULL, *tmp_s = NULL, *tmp_b = NULL;
    const size_t n_el = (size_t)w->rows * (size_t)w->cols;
    if (cw->kind == CW_F32) {
        CU_TRY(cudaMalloc((void **)&cw->f, sizeof(float) * n_el));
        if (w->type == WT_F32) {
            CU_TRY(cudaMemcpyAsync(cw->f, w->data, sizeof(float) * n_el, cudaMemcpyHostToDevice, s));
        } else {
            CU_TRY(cudaMalloc(&tmp, 2 * n_el));
            CU_TRY(cudaMemcpyAsync(tmp, w->data, 2 * n_el, cudaMemcpyHostToDevice, s));
            to_f32_kernel<<<(unsigned)blocks_for((int64_t)n_el, 256), 256, 0, s>>>(cw->f, (const uint16_t *)tmp,
                                                                                  w->type == WT_BF16, (int64_t)n_el);
            CU_TRY(cudaGetLastError());
        }
    } else {
        const size_t a_bytes = (size_t)cw->mtiles * cw->chunks * 512;
        CU_TRY(cudaMalloc((void **)&cw->a, a_bytes));
        const size_t raw = cw->kind == CW_BF16 ? 2 * n_el : n_el * (cw->kind == CW_Q8 ? 8 : 4) / 8;
        CU_TRY(cudaMalloc(&tmp, raw));
        CU_TRY(cudaMemcpyAsync(tmp, w->data, raw, cudaMemcpyHostToDevice, s));
        const int64_t n_words = (int64_t)(a_bytes / 4);
        pack_kernel<<<(unsigned)blocks_for(n_words, 256), 256, 0, s>>>((uint32_t *)cw->a, tmp, cw->kind, w->rows,
                                                                       w->cols, cw->chunks, n_words);
        CU_TRY(cudaGetLastError());
        if (cw->group_size) {
            const int g_src = (int)(w->cols / w->group_size);
            const size_t sbytes = (size_t)w->rows * g_src * dtype_size(w->sdtype);
            const int64_t n_sb = (int64_t)cw->mtiles * cw->groups * 16;
            CU_TRY(cudaMalloc(&cw->sb, (size_t)n_sb * (cw->sb_f32 ? 8 : 4)));
            CU_TRY(cudaMalloc(&tmp_s, sbytes));
            CU_TRY(cudaMalloc(&tmp_b, sbytes));
            CU_TRY(cudaMemcpyAsync(tmp_s, w->scales, sbytes, cudaMemcpyHostToDevice, s));
            CU_TRY(cudaMemcpyAsync(tmp_b, w->biases, sbytes, cudaMemcpyHostToDevice, s));
            pack_sb_kernel<<<(unsigned)blocks_for(n_sb, 256), 256, 0, s>>>(cw->sb, tmp_s, tmp_b, (int)w->sdtype,
                                                                           cw->sb_f32, w->rows, g_src, cw->groups, n_sb);
            CU_TRY(cudaGetLastError());
        }
    }
    CU_TRY(cudaStreamSynchronize(s));
fail:
    if (tmp) cudaFree(tmp);
    if (tmp_s) cudaFree(tmp_s);
    if (tmp_b) cudaFree(tmp_b);
    if (rc < 0) cuda_weight_free(cw);
    return rc;
}

extern "C" void cuda_weight_free(struct cuda_weight *cw)
{
    if (cw->a) cudaFree(cw->a);
    if (cw->sb) cudaFree(cw->sb);
    if (cw->f) cudaFree(cw->f);
    cw->a = NULL;
    cw->sb = NULL;
    cw->f = NULL;
}
