/* cuda_backend: the ops interface on one CUDA device.
 *
 * Ops are not run when called: each is recorded (kernel arguments, uploads copied into pinned staging) and the
 * queue runs at the next download or sync, which is where a caller can observe results. At that point:
 *   1. fusion (CUDA_FLAG_FUSE): rmsnorm + the matmuls that read its output (one launch, norm computed in the
 *      matmul's prologue for small batches), q/k/v as one launch, gate/up + SiLU*mul as one launch, matmul +
 *      residual add, q/k norm + rope + KV store. A fused kernel computes every value with the code the separate
 *      ops use, so results are bit-identical with fusion on or off.
 *   2. graphs (CUDA_FLAG_GRAPHS): the queue's exact contents (kernels, arguments, upload destinations) are
 *      hashed; the second time a sequence is seen it is captured as a CUDA graph, later ones replay it (a decode
 *      step of a given batch size is the same sequence every time: positions and tokens travel as uploaded data).
 *   3. programmatic dependent launch (CUDA_FLAG_PDL) on every kernel: a matmul streams its first weight chunks
 *      while the previous kernel finishes.
 *   4. kernel versions (CUDA_FLAG_MMV2, CUDA_FLAG_ATTNV2): the streaming matmul and the register/cp.async q/k and
 *      attention kernels; they compute the same bits as the first versions, which stay selectable.
 * Downloads of more than DL_PIPE_MIN bytes into pageable memory (the logits) go through two pinned buffers, the
 * copy out of them split over DL_THREADS threads while the next piece is in flight (CUDA_FLAG_DLPIPE).
 * Profiling (cuda_backend_profile): per-kernel event timing, or the device span of each queue.
 * Weights are uploaded once and repacked for the kernels (cuda_matmul.cu); w->data then holds the device pointer
 * of the packed tiles and the backend keeps the rest (and the host pointers, restored when the backend goes).
 * Errors of asynchronous work surface at the next download/sync (ST_EIO, logged with the CUDA message).
 */
#include "backend/cuda/cuda_common.cuh"

#include <cuda_profiler_api.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum xop_kind { X_UPLOAD, X_EMBED, X_RMSNORM, X_MM, X_F32MM, X_ROPE, X_KV, X_QK, X_ATTN, X_SILU, X_ADD, X_GATHER };

struct xop {
    int kind, pad_;
    union {
        struct upload_args up;
        struct embed_args embed;
        struct rms_args rms;
        struct mm_args mm;
        struct f32mm_args f32;
        struct rope_args rope;
        struct kv_args kv;
        struct qk_args qk;
        struct attn_args attn;
        struct ew_args ew;
        struct gather_args gather;
    } u;
};

#define GRAPH_SLOTS 48
#define SEEN_SLOTS 64
#define PROF_ROWS 256
#define DL_PIPE_MIN ((size_t)256 << 10) /* smaller downloads go straight from the device */
#define DL_CHUNK ((size_t)2 << 20)
#define DL_THREADS 4                     /* threads that copy a downloaded piece out of pinned memory (incl. caller) */

/* helper threads for the copy out of the pinned download buffers */
struct dl_pool {
    pthread_t th[DL_THREADS - 1];
    int n; /* helpers started */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    uint64_t gen;
    int pending, parts, quit;
    unsigned char *dst;
    const unsigned char *src;
    size_t len;
};

struct graph_entry {
    uint64_t hash, last_use;
    int n;
    struct xop *ops;
    cudaGraphExec_t exec;
};

struct cuda_backend {
    struct backend base;
    int device, sm_count, max_smem, max_smem_sm;
    cudaStream_t stream;
    unsigned flags;
    struct xop *q, *fq; /* recorded ops; after fusion */
    int n_q, cap_q;
    unsigned char *staging; /* pinned host bytes of this queue's uploads */
    unsigned char *staging_dev; /* the same, as the device addresses it */
    size_t staging_bytes, staging_used;
    struct cuda_weight **wt; /* open addressing on the device pointer */
    int wt_cap, wt_n;
    struct graph_entry graphs[GRAPH_SLOTS];
    uint64_t seen[SEEN_SLOTS];
    int seen_next;
    uint64_t tick;
    float *ws; /* attention partials */
    int *att_cnt; /* attention chunk counters */
    size_t ws_bytes, cnt_bytes;
    int32_t *d_idx; /* gather indices */
    int idx_cap;
    int err_code;
    char err_msg[256];
    struct cuda_stats stats;
    int mm_bps, mm_grid_max, mm_tb; /* streaming matmul schedule (cuda_backend_set_mm_schedule) */
    /* profiling */
    int prof_mode;
    cudaEvent_t *prof_ev;  /* mode 1: boundary events of the pending kernels; mode 2: [0], [1] around a queue */
    int prof_ev_cap, prof_ev_used;
    int *prof_pend;        /* row of each pending kernel */
    int prof_n_pend;
    struct cuda_prof_row *prof_rows;
    int prof_n_rows;
    /* pipelined downloads */
    cudaEvent_t dl_ev[2];
    struct dl_pool *dl;
};

static struct cuda_backend *cub(struct backend *b) { return (struct cuda_backend *)b; }
static void dl_pool_free(struct dl_pool *p);

static void set_error(struct cuda_backend *cb, int code, const char *what, cudaError_t e)
{
    if (cb->err_code == 0) {
        cb->err_code = code;
        snprintf(cb->err_msg, sizeof(cb->err_msg), "%s: %s", what, e == cudaSuccess ? "" : cudaGetErrorString(e));
        LOGE("cuda", "cuda:%d: %s", cb->device, cb->err_msg);
    }
}

static bool check(struct cuda_backend *cb, cudaError_t e, const char *what)
{
    if (e == cudaSuccess) return true;
    cudaGetLastError();
    set_error(cb, e == cudaErrorMemoryAllocation ? ST_ENOMEM : ST_EIO, what, e);
    return false;
}

/* ---- weight table ---- */
static size_t ptr_hash(const void *p) { return (size_t)(((uintptr_t)p >> 8) * 0x9E3779B97F4A7C15ull); }

static struct cuda_weight *wt_find(struct cuda_backend *cb, const void *key)
{
    if (!cb->wt_cap || !key) return NULL;
    for (size_t i = ptr_hash(key) & (size_t)(cb->wt_cap - 1);; i = (i + 1) & (size_t)(cb->wt_cap - 1)) {
        if (!cb->wt[i]) return NULL;
        if (cb->wt[i]->key == key) return cb->wt[i];
    }
}

static int wt_insert(struct cuda_backend *cb, struct cuda_weight *cw)
{
    if ((cb->wt_n + 1) * 2 > cb->wt_cap) {
        int cap = cb->wt_cap ? cb->wt_cap * 2 : 256;
        struct cuda_weight **t = (struct cuda_weight **)calloc((size_t)cap, sizeof(*t));
        if (!t) return ST_ENOMEM;
        for (int i = 0; i < cb->wt_cap; i++) {
            if (!cb->wt[i]) continue;
            size_t k = ptr_hash(cb->wt[i]->key) & (size_t)(cap - 1);
            while (t[k]) k = (k + 1) & (size_t)(cap - 1);
            t[k] = cb->wt[i];
        }
        free(cb->wt);
        cb->wt = t;
        cb->wt_cap = cap;
    }
    size_t k = ptr_hash(cw->key) & (size_t)(cb->wt_cap - 1);
    while (cb->wt[k]) k = (k + 1) & (size_t)(cb->wt_cap - 1);
    cb->wt[k] = cw;
    cb->wt_n++;
    return ST_OK;
}

static void wt_remove(struct cuda_backend *cb, const void *key)
{
    if (!cb->wt_cap) return;
    size_t mask = (size_t)(cb->wt_cap - 1), i = ptr_hash(key) & mask;
    while (cb->wt[i] && cb->wt[i]->key != key) i = (i + 1) & mask;
    if (!cb->wt[i]) return;
    cb->wt[i] = NULL;
    cb->wt_n--;
    /* re-insert the rest of the cluster */
    for (size_t j = (i + 1) & mask; cb->wt[j]; j = (j + 1) & mask) {
        struct cuda_weight *w = cb->wt[j];
        cb->wt[j] = NULL;
        size_t k = ptr_hash(w->key) & mask;
        while (cb->wt[k]) k = (k + 1) & mask;
        cb->wt[k] = w;
    }
}

/* ---- graphs ---- */
static uint64_t ops_hash(const struct xop *o, int n, unsigned flags)
{
    const uint64_t *p = (const uint64_t *)o;
    const size_t words = (size_t)n * sizeof(struct xop) / 8;
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)flags ^ ((uint64_t)n << 32);
    for (size_t i = 0; i < words; i++) {
        h ^= p[i];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 29;
    }
    return h;
}

static void graphs_clear(struct cuda_backend *cb)
{
    for (int i = 0; i < GRAPH_SLOTS; i++) {
        struct graph_entry *g = &cb->graphs[i];
        if (g->exec) cudaGraphExecDestroy(g->exec);
        free(g->ops);
        memset(g, 0, sizeof(*g));
    }
    memset(cb->seen, 0, sizeof(cb->seen));
}

/* ---- running ops ---- */
static cudaError_t xop_issue(struct cuda_backend *cb, const struct xop *o)
{
    const int pdl = (cb->flags & CUDA_FLAG_PDL) != 0 && cb->prof_mode != 1;
    cudaStream_t s = cb->stream;
    cb->stats.kernels++;
    switch (o->kind) {
    case X_UPLOAD: return cuda_upload_launch(&o->u.up, s, pdl);
    case X_EMBED: return cuda_embed_launch(&o->u.embed, s, pdl);
    case X_RMSNORM: return cuda_rmsnorm_launch(&o->u.rms, s, pdl);
    case X_MM: return cuda_mm_launch(&o->u.mm, s, pdl);
    case X_F32MM: return cuda_f32mm_launch(&o->u.f32, s, pdl);
    case X_ROPE: return cuda_rope_launch(&o->u.rope, s, pdl);
    case X_KV: return cuda_kv_launch(&o->u.kv, s, pdl);
    case X_QK: return cuda_qk_launch(&o->u.qk, s, pdl, (cb->flags & CUDA_FLAG_ATTNV2) != 0);
    case X_ATTN: return cuda_attn_launch(&o->u.attn, s, pdl, (cb->flags & CUDA_FLAG_ATTNV2) != 0);
    case X_SILU: return cuda_silu_launch(&o->u.ew, s, pdl);
    case X_ADD: return cuda_add_launch(&o->u.ew, s, pdl);
    case X_GATHER: return cuda_gather_launch(&o->u.gather, s, pdl);
    default: return cudaErrorInvalidValue;
    }
}

/* ---- profiling ---- */
static const char *cw_name(int kind) { return kind == CW_Q8 ? "q8" : kind == CW_Q4 ? "q4" : kind == CW_BF16 ? "bf16" : "f32"; }

/* A row name for the configuration of a kernel: the op, its weight shape or sizes, and the batch. */
static void op_label(const struct xop *o, char *b, size_t n)
{
    switch (o->kind) {
    case X_MM: {
        const struct mm_args *a = &o->u.mm;
        char ms[48] = "";
        size_t l = 0;
        for (int j = 0; j < a->n_parts; j++)
            l += (size_t)snprintf(ms + l, sizeof(ms) - l, "%s%d", j ? "+" : "", a->part[j].m);
        snprintf(b, n, "matmul %s%s%s m=%s%s k=%d n=%d%s", cw_name(a->kind), a->pro == MM_PRO_NORM ? " norm" : "",
                 a->epi == MM_EPI_ADD ? " +add" : a->epi == MM_EPI_GLU ? " glu" : "", ms, a->epi == MM_EPI_GLU ? "x2" : "",
                 a->k, a->n, a->v2 ? " (v2)" : "");
        break;
    }
    case X_F32MM: snprintf(b, n, "matmul f32 m=%d k=%d n=%d", o->u.f32.rows, o->u.f32.cols, o->u.f32.n); break;
    case X_ATTN: snprintf(b, n, "attention n=%d heads %d/%d hd %d", o->u.attn.n, o->u.attn.nh, o->u.attn.nkv, o->u.attn.hd); break;
    case X_QK: snprintf(b, n, "q/k norm+rope+kv store n=%d", o->u.qk.n); break;
    case X_UPLOAD: snprintf(b, n, "upload (%d pieces)", o->u.up.n); break;
    case X_EMBED: snprintf(b, n, "embed n=%d", o->u.embed.n); break;
    case X_RMSNORM: snprintf(b, n, "rmsnorm rows=%d dim=%d", o->u.rms.rows, o->u.rms.dim); break;
    case X_ROPE: snprintf(b, n, "rope n=%d", o->u.rope.n); break;
    case X_KV: snprintf(b, n, "kv store n=%d", o->u.kv.n); break;
    case X_SILU: snprintf(b, n, "silu*mul"); break;
    case X_ADD: snprintf(b, n, "add"); break;
    case X_GATHER: snprintf(b, n, "gather n=%d", o->u.gather.n); break;
    default: snprintf(b, n, "op %d", o->kind); break;
    }
}

static int prof_row(struct cuda_backend *cb, const char *name)
{
    for (int i = 0; i < cb->prof_n_rows; i++)
        if (!strcmp(cb->prof_rows[i].name, name)) return i;
    if (cb->prof_n_rows == PROF_ROWS) return PROF_ROWS - 1; /* the last row collects the rest */
    struct cuda_prof_row *r = &cb->prof_rows[cb->prof_n_rows];
    snprintf(r->name, sizeof(r->name), "%s", name);
    r->ms = 0;
    r->count = 0;
    return cb->prof_n_rows++;
}

/* Room for n more events (mode 1 needs one per kernel plus one). */
static bool prof_reserve(struct cuda_backend *cb, int n)
{
    if (cb->prof_ev_used + n <= cb->prof_ev_cap) return true;
    int cap = cb->prof_ev_cap ? cb->prof_ev_cap : 1024;
    while (cap < cb->prof_ev_used + n) cap *= 2;
    cudaEvent_t *ev = (cudaEvent_t *)realloc(cb->prof_ev, sizeof(cudaEvent_t) * (size_t)cap);
    if (!ev) return false;
    cb->prof_ev = ev;
    int *pend = (int *)realloc(cb->prof_pend, sizeof(int) * (size_t)cap);
    if (!pend) return false;
    cb->prof_pend = pend;
    for (int i = cb->prof_ev_cap; i < cap; i++)
        if (cudaEventCreate(&cb->prof_ev[i]) != cudaSuccess) {
            cudaGetLastError();
            cb->prof_ev_cap = i;
            return false;
        }
    cb->prof_ev_cap = cap;
    return true;
}

/* After the stream is idle: adds the pending event intervals to their rows. */
static void prof_collect(struct cuda_backend *cb)
{
    for (int i = 0; i < cb->prof_n_pend; i++) {
        float ms = 0;
        if (cudaEventElapsedTime(&ms, cb->prof_ev[2 * i], cb->prof_ev[2 * i + 1]) != cudaSuccess) {
            cudaGetLastError();
            continue;
        }
        cb->prof_rows[cb->prof_pend[i]].ms += ms;
        cb->prof_rows[cb->prof_pend[i]].count++;
    }
    cb->prof_n_pend = 0;
    cb->prof_ev_used = 0;
}

static bool run_eager(struct cuda_backend *cb, const struct xop *ops, int n)
{
    if (cb->prof_mode == 1 && prof_reserve(cb, 2 * n)) {
        char name[112];
        for (int i = 0; i < n; i++) {
            op_label(&ops[i], name, sizeof(name));
            const int k = cb->prof_n_pend++;
            cb->prof_pend[k] = prof_row(cb, name);
            cudaEventRecord(cb->prof_ev[2 * k], cb->stream);
            if (!check(cb, xop_issue(cb, &ops[i]), "kernel launch")) return false;
            cudaEventRecord(cb->prof_ev[2 * k + 1], cb->stream);
            cb->prof_ev_used = 2 * cb->prof_n_pend;
        }
        return true;
    }
    for (int i = 0; i < n; i++)
        if (!check(cb, xop_issue(cb, &ops[i]), "kernel launch")) return false;
    return true;
}

/* Captures ops into a graph and launches it; false (nothing run) when capture fails. */
static bool run_captured(struct cuda_backend *cb, const struct xop *ops, int n, uint64_t hash)
{
    if (cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeThreadLocal) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    bool ok = true;
    for (int i = 0; i < n && ok; i++) ok = xop_issue(cb, &ops[i]) == cudaSuccess;
    cudaGraph_t g = NULL;
    cudaError_t e = cudaStreamEndCapture(cb->stream, &g);
    if (!ok || e != cudaSuccess || !g) {
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return false;
    }
    cudaGraphExec_t exec = NULL;
    e = cudaGraphInstantiate(&exec, g, 0);
    cudaGraphDestroy(g);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    /* evict the least recently used slot */
    int v = 0;
    for (int i = 1; i < GRAPH_SLOTS; i++)
        if (cb->graphs[i].last_use < cb->graphs[v].last_use) v = i;
    struct graph_entry *ge = &cb->graphs[v];
    struct xop *copy = (struct xop *)malloc(sizeof(struct xop) * (size_t)n);
    if (copy) {
        if (ge->exec) cudaGraphExecDestroy(ge->exec);
        free(ge->ops);
        memcpy(copy, ops, sizeof(struct xop) * (size_t)n);
        ge->hash = hash;
        ge->n = n;
        ge->ops = copy;
        ge->exec = exec;
        ge->last_use = ++cb->tick;
        cb->stats.graph_captures++;
    }
    e = cudaGraphLaunch(exec, cb->stream);
    if (!copy) cudaGraphExecDestroy(exec); /* destroying after launch is allowed: the launch completes */
    return check(cb, e, "graph launch");
}

/* ---- fusion ---- */
static bool mm_plain(const struct xop *o) { return o->kind == X_MM && o->u.mm.n_parts == 1 && o->u.mm.pro == MM_PRO_NONE && o->u.mm.epi == MM_EPI_NONE; }

/* Can b run in one launch with a (same input, batch, weight format)? */
static bool mm_compatible(const struct mm_args *a, const struct mm_args *b)
{
    return a->x == b->x && a->n == b->n && a->k == b->k && a->kind == b->kind && a->chunks == b->chunks &&
           a->units == b->units && a->unit_chunks == b->unit_chunks && a->slices == b->slices &&
           a->gsteps == b->gsteps && a->groups == b->groups && a->sb_f32 == b->sb_f32;
}

static bool overlaps(const void *a, size_t an, const void *b, size_t bn)
{
    const char *x = (const char *)a, *y = (const char *)b;
    return x < y + bn && y < x + an;
}

/* Merges in[i..] = MM, MM[, MM] (plain, compatible, writing disjoint outputs that are not the input) and, for two
 * of the same shape followed by silu_mul(gate, gate, up), the GLU. Returns the ops consumed (0: none). */
static int merge_mms(const struct xop *in, int n, int i, const float *avoid, size_t avoid_bytes, struct mm_args *out)
{
    if (i >= n || !mm_plain(&in[i])) return 0;
    const struct mm_args *a = &in[i].u.mm;
    const size_t xb = sizeof(float) * (size_t)a->n * a->k;
    int cnt = 1;
    while (cnt < MM_MAX_PARTS && i + cnt < n && mm_plain(&in[i + cnt]) && mm_compatible(a, &in[i + cnt].u.mm)) {
        const struct mm_args *b = &in[i + cnt].u.mm;
        const size_t yb = sizeof(float) * (size_t)b->n * b->part[0].m;
        bool clash = overlaps(b->part[0].y, yb, a->x, xb) || (avoid && overlaps(b->part[0].y, yb, avoid, avoid_bytes));
        for (int j = 0; j < cnt && !clash; j++) {
            const struct mm_args *c = &in[i + j].u.mm;
            clash = overlaps(b->part[0].y, yb, c->part[0].y, sizeof(float) * (size_t)c->n * c->part[0].m);
        }
        if (clash) break;
        cnt++;
    }
    *out = *a;
    if (cnt == 2 && i + 2 < n && in[i + 2].kind == X_SILU) {
        const struct mm_args *u = &in[i + 1].u.mm;
        const struct ew_args *s = &in[i + 2].u.ew;
        if (u->part[0].m == a->part[0].m && s->out == a->part[0].y && s->a == a->part[0].y && s->b == u->part[0].y &&
            s->cnt == (int64_t)a->n * a->part[0].m) {
            out->part[0].a2 = u->part[0].a;
            out->part[0].sb2 = u->part[0].sb;
            out->part[0].bias2 = u->part[0].bias;
            out->part[0].y2 = u->part[0].y;
            out->epi = MM_EPI_GLU;
            return 3;
        }
    }
    for (int j = 1; j < cnt; j++) out->part[j] = in[i + j].u.mm.part[0];
    out->n_parts = cnt;
    return cnt;
}

/* rmsnorm(q) rmsnorm(k) rope(q) rope(k) kv_store, or rope(q) rope(k) kv_store -> one qk op */
static int merge_qk(const struct xop *in, int n, int i, struct xop *out)
{
    const struct rms_args *nq = NULL, *nk = NULL;
    int j = i;
    if (j + 1 < n && in[j].kind == X_RMSNORM && in[j + 1].kind == X_RMSNORM) {
        nq = &in[j].u.rms;
        nk = &in[j + 1].u.rms;
        j += 2;
    }
    if (j + 2 >= n || in[j].kind != X_ROPE || in[j + 1].kind != X_ROPE || in[j + 2].kind != X_KV) return 0;
    const struct rope_args *rq = &in[j].u.rope, *rk = &in[j + 1].u.rope;
    const struct kv_args *kv = &in[j + 2].u.kv;
    if (rq->n != rk->n || rq->n != kv->n || rq->hd != rk->hd || rq->cs != rk->cs || kv->k != rk->x ||
        kv->kv_dim != rk->heads * rk->hd || rq->x == rk->x || kv->v == rq->x || kv->v == rk->x)
        return 0;
    if (nq && (nq->out != nq->x || nq->x != rq->x || nq->rows != rq->n * rq->heads || nq->dim != rq->hd ||
               nk->out != nk->x || nk->x != rk->x || nk->rows != rk->n * rk->heads || nk->dim != rk->hd ||
               nq->eps != nk->eps))
        return 0;
    memset(out, 0, sizeof(*out));
    out->kind = X_QK;
    struct qk_args *a = &out->u.qk;
    a->q = rq->x;
    a->k = rk->x;
    a->v = kv->v;
    a->qn = nq ? nq->w : NULL;
    a->kn = nq ? nk->w : NULL;
    a->cs = rq->cs;
    a->kc = kv->kc;
    a->vc = kv->vc;
    a->pos = kv->pos;
    a->slot = kv->slot;
    a->n = rq->n;
    a->nh = rq->heads;
    a->nkv = rk->heads;
    a->hd = rq->hd;
    a->n_ctx = kv->n_ctx;
    a->eps = nq ? nq->eps : 0.0f;
    return j + 3 - i;
}

static int fuse(const struct xop *in, int n, struct xop *out)
{
    int m = 0;
    for (int i = 0; i < n;) {
        int used;
        /* rmsnorm -> matmuls reading its output */
        if (in[i].kind == X_RMSNORM && in[i].u.rms.out != in[i].u.rms.x && i + 1 < n && mm_plain(&in[i + 1]) &&
            in[i + 1].u.mm.x == in[i].u.rms.out && in[i + 1].u.mm.n == in[i].u.rms.rows &&
            in[i + 1].u.mm.k == in[i].u.rms.dim) {
            const struct rms_args *r = &in[i].u.rms;
            struct mm_args mm;
            used = merge_mms(in, n, i + 1, r->x, sizeof(float) * (size_t)r->rows * r->dim, &mm);
            if (used > 0) {
                if (r->rows <= MM_NORM_FUSE_MAX_N) {
                    mm.pro = MM_PRO_NORM;
                    mm.x = r->x;
                    mm.nw = r->w;
                    mm.xb = r->out;
                    mm.eps = r->eps;
                } else {
                    out[m++] = in[i];
                }
                memset(&out[m], 0, sizeof(out[m]));
                out[m].kind = X_MM;
                out[m++].u.mm = mm;
                i += 1 + used;
                continue;
            }
        }
        if (mm_plain(&in[i])) {
            struct mm_args mm;
            used = merge_mms(in, n, i, NULL, 0, &mm);
            /* a lone matmul followed by x2 += y */
            if (used == 1 && i + 1 < n && in[i + 1].kind == X_ADD) {
                const struct ew_args *ad = &in[i + 1].u.ew;
                const size_t yb = sizeof(float) * (size_t)mm.n * mm.part[0].m;
                if (ad->b == mm.part[0].y && ad->out == ad->a && ad->cnt == (int64_t)mm.n * mm.part[0].m &&
                    !overlaps(ad->out, yb, mm.part[0].y, yb) && !overlaps(ad->out, yb, mm.x, sizeof(float) * (size_t)mm.n * mm.k)) {
                    mm.epi = MM_EPI_ADD;
                    mm.x2 = ad->out;
                    used = 2;
                }
            }
            memset(&out[m], 0, sizeof(out[m]));
            out[m].kind = X_MM;
            out[m++].u.mm = mm;
            i += used;
            continue;
        }
        if (in[i].kind == X_UPLOAD) { /* consecutive uploads: one launch */
            out[m] = in[i++];
            struct upload_args *u = &out[m++].u.up;
            while (i < n && in[i].kind == X_UPLOAD && u->n + in[i].u.up.n <= UP_MAX) {
                bool clash = false; /* pieces of one launch run in any order: destinations must not overlap */
                for (int k = 0; k < in[i].u.up.n && !clash; k++)
                    for (int q = 0; q < u->n && !clash; q++)
                        clash = overlaps(u->dst[q], (size_t)u->bytes[q], in[i].u.up.dst[k], (size_t)in[i].u.up.bytes[k]);
                if (clash) break;
                for (int k = 0; k < in[i].u.up.n; k++) {
                    u->dst[u->n] = in[i].u.up.dst[k];
                    u->src[u->n] = in[i].u.up.src[k];
                    u->bytes[u->n++] = in[i].u.up.bytes[k];
                }
                i++;
            }
            continue;
        }
        if ((used = merge_qk(in, n, i, &out[m])) > 0) {
            m++;
            i += used;
            continue;
        }
        out[m++] = in[i++];
    }
    return m;
}

/* grid, kernel shape and shared memory of a (possibly merged) matmul */
static void mm_finalize(const struct cuda_backend *cb, struct mm_args *a)
{
    a->r = a->epi == MM_EPI_GLU ? 2 : 1;
    a->nt = a->n <= 8 ? 1 : (a->n <= 16 || a->r == 2) ? 2 : 4; /* batch columns per pass: 8 * nt */
    int blocks = 0;
    for (int j = 0; j < a->n_parts; j++) {
        a->part[j].block0 = blocks;
        blocks += a->part[j].mtiles;
    }
    a->grid = blocks;
    a->v2 = a->tb = a->warps = a->tiles = a->ngroups = a->gmax = 0;
    a->tma = a->nb = a->nchmax = a->bufb = 0;
    if (cb->flags & CUDA_FLAG_MMV2) {
        const int S = a->slices;
        a->v2 = 1;
        a->tiles = blocks;
        /* one tile per group (every slice of a tile on its own warp, as many blocks as tiles allow); or groups of
         * up to 4 tiles that share x through the L1, at most 32 items: by default for batches of more than 8 rows
         * and matrices of at least 8 tiles per SM (the head: x is re-read per tile group) */
        const int tb_auto = a->nt > 1 && blocks >= 8 * cb->sm_count ? 4 : 1;
        a->tb = ST_MAX(1, ST_MIN(cb->mm_tb > 0 ? cb->mm_tb : tb_auto, 32 / S));
        a->warps = ST_MIN(8, a->tb * S);
        a->ngroups = (blocks + a->tb - 1) / a->tb;
        const int bps = cb->mm_bps >= 0 ? cb->mm_bps : a->ngroups >= 8 * cb->sm_count ? 2 : 1;
        int cap = bps > 0 ? bps * cb->sm_count : a->ngroups;
        if (cb->mm_grid_max > 0) cap = ST_MIN(cap, cb->mm_grid_max);
        a->grid = ST_MAX(1, ST_MIN(a->ngroups, cap));
        if (a->kind != CW_BF16) {
            const int kc = a->kind == CW_Q8 ? 2 : 4;
            a->gmax = (a->units + S - 1) / S * a->unit_chunks * kc / a->gsteps;
        }
        if (cb->flags & CUDA_FLAG_MMTMA) {
            /* nb buffers per warp: 3 when two blocks still fit an SM, else 2 (one block per SM when needed) */
            a->tma = 1;
            a->nchmax = (a->units + S - 1) / S * a->unit_chunks;
            const int sbb = a->kind == CW_BF16 ? 0 : a->r * a->gmax * 16 * (a->sb_f32 ? 8 : 4);
            a->bufb = (a->r * a->nchmax * 512 + sbb + 127) & ~127;
            const size_t two = (size_t)cb->max_smem_sm / 2 - 2048;
            a->nb = 3;
            if (cuda_mm_smem_bytes(a) > two) a->nb = 2;
            if (cuda_mm_smem_bytes(a) > two && cuda_mm_smem_bytes(a) > (size_t)cb->max_smem) a->tma = a->nb = a->nchmax = a->bufb = 0;
        }
    }
    a->smem = (int)cuda_mm_smem_bytes(a);
}

static void flush_ops(struct cuda_backend *cb, const struct xop *ops, int n);

/* Runs the recorded queue (asynchronously). */
static void flush(struct cuda_backend *cb)
{
    if (cb->n_q == 0) return;
    cudaSetDevice(cb->device);
    cb->stats.flushes++;
    struct xop *ops = cb->q;
    int n = cb->n_q;
    if (cb->flags & CUDA_FLAG_FUSE) {
        n = fuse(cb->q, cb->n_q, cb->fq);
        ops = cb->fq;
    }
    for (int i = 0; i < n; i++)
        if (ops[i].kind == X_MM) mm_finalize(cb, &ops[i].u.mm);
    cb->n_q = 0;
    if (cb->err_code) return;
    if (cb->prof_mode == 1) { /* every kernel between two events, eagerly */
        run_eager(cb, ops, n);
        return;
    }
    const bool span = cb->prof_mode == 2 && prof_reserve(cb, 2);
    if (span) {
        const int k = cb->prof_n_pend++;
        cb->prof_pend[k] = prof_row(cb, "queue (device span)");
        cudaEventRecord(cb->prof_ev[2 * k], cb->stream);
        cb->prof_ev_used = 2 * cb->prof_n_pend;
        flush_ops(cb, ops, n);
        cudaEventRecord(cb->prof_ev[2 * k + 1], cb->stream);
        return;
    }
    flush_ops(cb, ops, n);
}

/* Runs ops as configured: a cached graph, a new capture, or eagerly. */
static void flush_ops(struct cuda_backend *cb, const struct xop *ops, int n)
{
    if (cb->flags & CUDA_FLAG_GRAPHS) {
        const uint64_t h = ops_hash(ops, n, cb->flags);
        for (int i = 0; i < GRAPH_SLOTS; i++) {
            struct graph_entry *g = &cb->graphs[i];
            if (g->exec && g->hash == h && g->n == n && memcmp(g->ops, ops, sizeof(struct xop) * (size_t)n) == 0) {
                g->last_use = ++cb->tick;
                cb->stats.graph_launches++;
                check(cb, cudaGraphLaunch(g->exec, cb->stream), "graph launch");
                return;
            }
        }
        bool seen = false;
        for (int i = 0; i < SEEN_SLOTS; i++) seen |= cb->seen[i] == h;
        if (seen) {
            if (run_captured(cb, ops, n, h)) return;
        } else {
            cb->seen[cb->seen_next] = h;
            cb->seen_next = (cb->seen_next + 1) % SEEN_SLOTS;
        }
    }
    run_eager(cb, ops, n);
}

/* Runs the queue and waits for the device; the staging buffer is free again. */
static int sync_all(struct cuda_backend *cb)
{
    flush(cb);
    cudaSetDevice(cb->device);
    check(cb, cudaStreamSynchronize(cb->stream), "stream synchronize");
    cb->staging_used = 0;
    if (cb->prof_n_pend) prof_collect(cb);
    return cb->err_code;
}

static struct xop *push(struct cuda_backend *cb, int kind)
{
    if (cb->n_q == cb->cap_q) {
        /* rare: a longer forward than any before (the queue is sized at init for a large model) */
        int cap = cb->cap_q * 2;
        struct xop *q = (struct xop *)realloc(cb->q, sizeof(struct xop) * (size_t)cap);
        struct xop *fq = q ? (struct xop *)realloc(cb->fq, sizeof(struct xop) * (size_t)cap) : NULL;
        if (q) cb->q = q;
        if (fq) cb->fq = fq;
        if (!q || !fq) {
            set_error(cb, ST_ENOMEM, "op queue", cudaSuccess);
            return NULL;
        }
        cb->cap_q = cap;
    }
    struct xop *o = &cb->q[cb->n_q++];
    memset(o, 0, sizeof(*o));
    o->kind = kind;
    return o;
}

/* ---- the ops interface ---- */
static void cu_free(struct backend *b)
{
    struct cuda_backend *cb = cub(b);
    cudaSetDevice(cb->device);
    if (cb->stream) cudaStreamSynchronize(cb->stream);
    graphs_clear(cb);
    for (int i = 0; i < cb->wt_cap; i++) {
        struct cuda_weight *cw = cb->wt[i];
        if (!cw) continue;
        if (cw->owner && cw->owner->data == cw->key) {
            cw->owner->data = cw->h_data;
            cw->owner->scales = cw->h_scales;
            cw->owner->biases = cw->h_biases;
        }
        cuda_weight_free(cw);
        free(cw);
    }
    free(cb->wt);
    dl_pool_free(cb->dl);
    for (int i = 0; i < 2; i++)
        if (cb->dl_ev[i]) cudaEventDestroy(cb->dl_ev[i]);
    for (int i = 0; i < cb->prof_ev_cap; i++) cudaEventDestroy(cb->prof_ev[i]);
    free(cb->prof_ev);
    free(cb->prof_pend);
    free(cb->prof_rows);
    if (cb->ws) cudaFree(cb->ws);
    if (cb->att_cnt) cudaFree(cb->att_cnt);
    if (cb->d_idx) cudaFree(cb->d_idx);
    if (cb->staging) cudaFreeHost(cb->staging);
    if (cb->stream) cudaStreamDestroy(cb->stream);
    free(cb->q);
    free(cb->fq);
    free(cb);
}

static void *cu_alloc(struct backend *b, size_t bytes)
{
    struct cuda_backend *cb = cub(b);
    cudaSetDevice(cb->device);
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    return p;
}

/* Graphs must never outlive memory they reference (replaying one that names a freed allocation crashes the driver,
 * even if the address was handed out again): every free of a buffer a graph may use drops the graphs. */
static void cu_dealloc(struct backend *b, void *p)
{
    struct cuda_backend *cb = cub(b);
    sync_all(cb);
    graphs_clear(cb);
    cudaFree(p);
}

static int cu_upload(struct backend *b, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb = cub(b);
    if (bytes == 0) return ST_OK;
    if (bytes > cb->staging_bytes / 2) {
        if (sync_all(cb) < 0) return cb->err_code;
        /* ordered on our stream (a plain cudaMemcpy from pageable memory may return before its DMA lands), and
         * complete before returning, as the caller may reuse src */
        check(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cb->stream), "upload");
        check(cb, cudaStreamSynchronize(cb->stream), "upload");
        return cb->err_code;
    }
    const size_t need = (bytes + 255) & ~(size_t)255;
    if (cb->staging_used + need > cb->staging_bytes && sync_all(cb) < 0) return cb->err_code;
    memcpy(cb->staging + cb->staging_used, src, bytes);
    struct xop *o = push(cb, X_UPLOAD);
    if (!o) return cb->err_code;
    o->u.up.n = 1;
    o->u.up.dst[0] = dst;
    o->u.up.src[0] = cb->staging_dev + cb->staging_used;
    o->u.up.bytes[0] = bytes;
    cb->staging_used += need;
    return ST_OK;
}

/* ---- pipelined downloads ---- */
struct dl_arg {
    struct dl_pool *p;
    int part;
};

static void dl_copy_part(struct dl_pool *p, int part)
{
    const size_t per = (p->len / (size_t)p->parts + 63) & ~(size_t)63;
    const size_t off = per * (size_t)part;
    if (off < p->len) memcpy(p->dst + off, p->src + off, ST_MIN(per, p->len - off));
}

static void *dl_worker(void *arg)
{
    struct dl_pool *p = ((struct dl_arg *)arg)->p;
    const int part = ((struct dl_arg *)arg)->part;
    free(arg);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->gen == seen && !p->quit) pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) break;
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);
        dl_copy_part(p, part);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

static void dl_pool_free(struct dl_pool *p)
{
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n; i++) pthread_join(p->th[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
    free(p);
}

/* Started at the first large download; NULL (copies on the caller's thread alone) when threads cannot start. */
static struct dl_pool *dl_pool_get(struct cuda_backend *cb)
{
    if (cb->dl) return cb->dl;
    struct dl_pool *p = (struct dl_pool *)calloc(1, sizeof(*p));
    if (!p) return NULL;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
    for (int i = 0; i < DL_THREADS - 1; i++) {
        struct dl_arg *a = (struct dl_arg *)malloc(sizeof(*a));
        if (!a) break;
        a->p = p;
        a->part = i + 1;
        if (pthread_create(&p->th[i], NULL, dl_worker, a) != 0) {
            free(a);
            break;
        }
        p->n++;
    }
    cb->dl = p;
    return p;
}

/* dst[0, len) = src[0, len) by the caller and the pool's threads */
static void dl_copy(struct dl_pool *p, unsigned char *dst, const unsigned char *src, size_t len)
{
    if (!p || p->n == 0 || len < ((size_t)128 << 10)) {
        memcpy(dst, src, len);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->dst = dst;
    p->src = src;
    p->len = len;
    p->parts = p->n + 1;
    p->pending = p->n;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    dl_copy_part(p, 0);
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}

/* Device -> pageable host through two pinned buffers (the staging buffer: free once the queue has run, which the
 * copies, ordered after it on the stream, guarantee): piece k+1 is in flight while piece k is copied out. */
static void download_pipelined(struct cuda_backend *cb, unsigned char *dst, const unsigned char *src, size_t bytes)
{
    struct dl_pool *pool = dl_pool_get(cb);
    size_t prev_off = 0, prev_len = 0;
    int k = 0;
    for (size_t off = 0; off < bytes; off += DL_CHUNK, k++) {
        const size_t len = ST_MIN(DL_CHUNK, bytes - off);
        unsigned char *b = cb->staging + (size_t)(k & 1) * DL_CHUNK;
        if (!check(cb, cudaMemcpyAsync(b, src + off, len, cudaMemcpyDeviceToHost, cb->stream), "download") ||
            !check(cb, cudaEventRecord(cb->dl_ev[k & 1], cb->stream), "download"))
            return;
        if (k > 0) {
            if (!check(cb, cudaEventSynchronize(cb->dl_ev[(k - 1) & 1]), "download")) return;
            dl_copy(pool, dst + prev_off, cb->staging + (size_t)((k - 1) & 1) * DL_CHUNK, prev_len);
        }
        prev_off = off;
        prev_len = len;
    }
    if (k > 0 && check(cb, cudaEventSynchronize(cb->dl_ev[(k - 1) & 1]), "download"))
        dl_copy(pool, dst + prev_off, cb->staging + (size_t)((k - 1) & 1) * DL_CHUNK, prev_len);
}

static bool host_pinned(const void *p)
{
    cudaPointerAttributes at;
    if (cudaPointerGetAttributes(&at, p) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return at.type == cudaMemoryTypeHost;
}

static int cu_download(struct backend *b, void *dst, const void *src, size_t bytes)
{
    struct cuda_backend *cb = cub(b);
    flush(cb);
    cudaSetDevice(cb->device);
    if (!cb->err_code && bytes) {
        if ((cb->flags & CUDA_FLAG_DLPIPE) && bytes >= DL_PIPE_MIN && cb->staging_bytes >= 2 * DL_CHUNK && !host_pinned(dst))
            download_pipelined(cb, (unsigned char *)dst, (const unsigned char *)src, bytes);
        else
            check(cb, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cb->stream), "download");
    }
    check(cb, cudaStreamSynchronize(cb->stream), "stream synchronize");
    cb->staging_used = 0;
    if (cb->prof_n_pend) prof_collect(cb);
    return cb->err_code;
}

static int cu_sync(struct backend *b) { return sync_all(cub(b)); }

static int cu_weight_prepare(struct backend *b, struct weight *w, char *err)
{
    struct cuda_backend *cb = cub(b);
    if (wt_find(cb, w->data)) return ST_OK; /* already on this device (a tied head, a second call) */
    int rc;
    if ((rc = sync_all(cb)) < 0) return err_set(err, rc, "cuda: %s", cb->err_msg);
    struct cuda_weight *cw = (struct cuda_weight *)calloc(1, sizeof(*cw));
    if (!cw) return err_set(err, ST_ENOMEM, "cuda: out of memory");
    if ((rc = cuda_weight_plan(cw, w, err)) < 0 || (rc = cuda_weight_upload(cw, w, cb->stream, err)) < 0) {
        free(cw);
        return rc;
    }
    cw->owner = w;
    cw->h_data = w->data;
    cw->h_scales = w->scales;
    cw->h_biases = w->biases;
    cw->key = cw->kind == CW_F32 ? (const void *)cw->f : (const void *)cw->a;
    if ((rc = wt_insert(cb, cw)) < 0) {
        cuda_weight_free(cw);
        free(cw);
        return err_set(err, rc, "cuda: out of memory");
    }
    w->data = cw->key;
    w->scales = cw->sb;
    w->biases = NULL;
    return ST_OK;
}

static void cu_weight_release(struct backend *b, struct weight *w)
{
    struct cuda_backend *cb = cub(b);
    struct cuda_weight *cw = wt_find(cb, w->data);
    if (!cw) return;
    sync_all(cb);
    graphs_clear(cb);
    wt_remove(cb, cw->key);
    w->data = cw->h_data;
    w->scales = cw->h_scales;
    w->biases = cw->h_biases;
    if (cw->owner && cw->owner != w && cw->owner->data == cw->key) {
        cw->owner->data = cw->h_data;
        cw->owner->scales = cw->h_scales;
        cw->owner->biases = cw->h_biases;
    }
    cuda_weight_free(cw);
    free(cw);
}

static int cu_reserve(struct backend *b, size_t floats_per_thread, char *err) { return ST_OK; }

static const struct cuda_weight *need_weight(struct cuda_backend *cb, const struct weight *w, const char *op)
{
    const struct cuda_weight *cw = wt_find(cb, w->data);
    if (!cw && !cb->err_code) {
        cb->err_code = ST_EINVAL;
        snprintf(cb->err_msg, sizeof(cb->err_msg), "%s: weight %s was not prepared on this device", op, w->name ? w->name : "?");
        LOGE("cuda", "%s", cb->err_msg);
    }
    return cw;
}

static void cu_embed(struct backend *b, float *out, const struct weight *emb, const int32_t *tokens, int n)
{
    struct cuda_backend *cb = cub(b);
    const struct cuda_weight *cw = need_weight(cb, emb, "embed");
    struct xop *o;
    if (!cw || n <= 0 || !(o = push(cb, X_EMBED))) return;
    struct embed_args *a = &o->u.embed;
    a->out = out;
    a->tok = tokens;
    a->n = n;
    a->w.kind = cw->kind;
    a->w.chunks = cw->chunks;
    a->w.groups = cw->groups;
    a->w.group_size = cw->group_size;
    a->w.sb_f32 = cw->sb_f32;
    a->w.rows = cw->rows;
    a->w.cols = cw->cols;
    a->w.a = cw->a;
    a->w.sb = cw->sb;
    a->w.f = cw->f;
}

static void cu_rmsnorm(struct backend *b, float *out, const float *x, const float *w, int n_rows, int dim, float eps)
{
    struct xop *o;
    if (n_rows <= 0 || !(o = push(cub(b), X_RMSNORM))) return;
    o->u.rms = (struct rms_args){out, x, w, n_rows, dim, eps, 0};
}

static void cu_matmul(struct backend *b, float *y, const struct weight *w, const float *x, int n, const float *bias)
{
    struct cuda_backend *cb = cub(b);
    const struct cuda_weight *cw = need_weight(cb, w, "matmul");
    struct xop *o;
    if (!cw || n <= 0) return;
    if (cw->kind == CW_F32) {
        if (!(o = push(cb, X_F32MM))) return;
        o->u.f32 = (struct f32mm_args){y, cw->f, x, bias, n, (int)cw->rows, (int)cw->cols, 0};
        return;
    }
    if (!(o = push(cb, X_MM))) return;
    struct mm_args *a = &o->u.mm;
    a->part[0].a = cw->a;
    a->part[0].sb = cw->sb;
    a->part[0].bias = bias;
    a->part[0].y = y;
    a->part[0].m = (int)cw->rows;
    a->part[0].mtiles = cw->mtiles;
    a->n_parts = 1;
    a->x = x;
    a->n = n;
    a->k = (int)cw->cols;
    a->chunks = cw->chunks;
    a->units = cw->units;
    a->unit_chunks = cw->unit_chunks;
    a->slices = cw->slices;
    a->gsteps = cw->gsteps;
    a->groups = cw->groups;
    a->sb_f32 = cw->sb_f32;
    a->kind = cw->kind;
}

static void cu_rope(struct backend *b, float *x, int n, int n_heads, int head_dim, const float *cs)
{
    struct xop *o;
    if (n <= 0 || !(o = push(cub(b), X_ROPE))) return;
    o->u.rope = (struct rope_args){x, cs, n, n_heads, head_dim, 0};
}

static void cu_kv_store(struct backend *b, float *k_cache, float *v_cache, const float *k, const float *v,
                        const struct backend_batch *bb, int kv_dim, int n_ctx)
{
    struct xop *o;
    if (bb->n <= 0 || !(o = push(cub(b), X_KV))) return;
    o->u.kv = (struct kv_args){k_cache, v_cache, k, v, bb->pos, bb->slot, bb->n, kv_dim, n_ctx, 0};
}

static void cu_attention(struct backend *b, float *out, const float *q, const float *k_cache, const float *v_cache,
                         const struct backend_batch *bb, int n_heads, int n_kv_heads, int head_dim, int n_ctx,
                         float scale)
{
    struct cuda_backend *cb = cub(b);
    const int n = bb->n, G = n_heads / n_kv_heads, gb = G < ATT_GB ? G : ATT_GB, qgroups = (G + gb - 1) / gb;
    if (n <= 0) return;
    /* partials and counters of rows of several chunks, sized for the largest batch seen (at least 64 rows): grows
     * a few times at most, never in steady state. Counters are zero between launches (the last block resets). */
    const size_t ws_bytes = sizeof(float) * (size_t)n * n_heads * ATT_MAXC * (head_dim + 2);
    const size_t cnt_bytes = sizeof(int) * (size_t)n * n_kv_heads * qgroups;
    if (n_ctx > ATT_MINP && (ws_bytes > cb->ws_bytes || cnt_bytes > cb->cnt_bytes)) {
        const size_t scale_up = n < 64 ? (size_t)(64 / n + 1) : 1;
        if (sync_all(cb) < 0) return;
        graphs_clear(cb);
        cudaSetDevice(cb->device);
        if (ws_bytes > cb->ws_bytes) {
            if (cb->ws) cudaFree(cb->ws);
            cb->ws = NULL;
            cb->ws_bytes = 0;
            if (!check(cb, cudaMalloc((void **)&cb->ws, ws_bytes * scale_up), "attention workspace")) return;
            cb->ws_bytes = ws_bytes * scale_up;
        }
        if (cnt_bytes > cb->cnt_bytes) {
            if (cb->att_cnt) cudaFree(cb->att_cnt);
            cb->att_cnt = NULL;
            cb->cnt_bytes = 0;
            if (!check(cb, cudaMalloc((void **)&cb->att_cnt, cnt_bytes * scale_up), "attention counters") ||
                !check(cb, cudaMemset(cb->att_cnt, 0, cnt_bytes * scale_up), "attention counters"))
                return;
            cb->cnt_bytes = cnt_bytes * scale_up;
        }
    }
    struct xop *o = push(cb, X_ATTN);
    if (!o) return;
    struct attn_args *a = &o->u.attn;
    a->out = out;
    a->q = q;
    a->kc = k_cache;
    a->vc = v_cache;
    a->pos = bb->pos;
    a->slot = bb->slot;
    a->ws = cb->ws;
    a->cnt = cb->att_cnt;
    a->n = n;
    a->nh = n_heads;
    a->nkv = n_kv_heads;
    a->hd = head_dim;
    a->n_ctx = n_ctx;
    a->gb = gb;
    a->qgroups = qgroups;
    a->scale = scale;
}

static void cu_silu_mul(struct backend *b, float *out, const float *gate, const float *up, int64_t n)
{
    struct xop *o;
    if (n <= 0 || !(o = push(cub(b), X_SILU))) return;
    o->u.ew = (struct ew_args){out, gate, up, n};
}

static void cu_add(struct backend *b, float *x, const float *y, int64_t n)
{
    struct xop *o;
    if (n <= 0 || !(o = push(cub(b), X_ADD))) return;
    o->u.ew = (struct ew_args){x, x, y, n};
}

static void cu_gather_rows(struct backend *b, float *dst, const float *src, const int32_t *idx, int n, int dim)
{
    struct cuda_backend *cb = cub(b);
    if (n <= 0) return;
    if (n > cb->idx_cap) {
        const int cap = n < 1024 ? 1024 : n;
        if (sync_all(cb) < 0) return;
        graphs_clear(cb);
        cudaSetDevice(cb->device);
        if (cb->d_idx) cudaFree(cb->d_idx);
        cb->d_idx = NULL;
        cb->idx_cap = 0;
        if (!check(cb, cudaMalloc((void **)&cb->d_idx, sizeof(int32_t) * (size_t)cap), "gather indices")) return;
        cb->idx_cap = cap;
    }
    if (cu_upload(b, cb->d_idx, idx, sizeof(int32_t) * (size_t)n) < 0) return;
    struct xop *o = push(cb, X_GATHER);
    if (!o) return;
    int32_t max_idx = 0;
    for (int i = 0; i < n; i++) max_idx = idx[i] > max_idx ? idx[i] : max_idx;
    const size_t db = sizeof(float) * (size_t)n * dim, sb = sizeof(float) * ((size_t)max_idx + 1) * dim;
    o->u.gather = (struct gather_args){dst, src, cb->d_idx, n, dim, overlaps(dst, db, src, sb) ? 1 : 0, 0};
}

/* recorded as separate matmuls: the fusion pass runs them as one launch */
static void cu_matmul_multi(struct backend *b, int n_w, float *const *y, const struct weight *const *w, const float *x,
                            int n, const float *const *bias)
{
    for (int j = 0; j < n_w; j++) cu_matmul(b, y[j], w[j], x, n, bias ? bias[j] : NULL);
}

/* filled by name, so that an optional op added to the interface stays NULL here until implemented */
static const struct backend_ops *cuda_ops(void)
{
    static const struct backend_ops ops = [] {
        struct backend_ops o;
        memset(&o, 0, sizeof(o));
        o.name = "cuda";
        o.free = cu_free;
        o.alloc = cu_alloc;
        o.dealloc = cu_dealloc;
        o.upload = cu_upload;
        o.download = cu_download;
        o.sync = cu_sync;
        o.weight_prepare = cu_weight_prepare;
        o.weight_release = cu_weight_release;
        o.reserve = cu_reserve;
        o.embed = cu_embed;
        o.rmsnorm = cu_rmsnorm;
        o.matmul = cu_matmul;
        o.matmul_multi = cu_matmul_multi;
        o.rope = cu_rope;
        o.kv_store = cu_kv_store;
        o.attention = cu_attention;
        o.silu_mul = cu_silu_mul;
        o.add = cu_add;
        o.gather_rows = cu_gather_rows;
        return o;
    }();
    return &ops;
}

static unsigned flags_from_env(void)
{
    static const struct {
        const char *name;
        unsigned flag;
    } env[] = {{"STRATA_CUDA_GRAPHS", CUDA_FLAG_GRAPHS}, {"STRATA_CUDA_FUSE", CUDA_FLAG_FUSE},
               {"STRATA_CUDA_PDL", CUDA_FLAG_PDL},       {"STRATA_CUDA_MMV2", CUDA_FLAG_MMV2},
               {"STRATA_CUDA_ATTNV2", CUDA_FLAG_ATTNV2}, {"STRATA_CUDA_DLPIPE", CUDA_FLAG_DLPIPE},
               {"STRATA_CUDA_MMTMA", CUDA_FLAG_MMTMA}};
    unsigned f = CUDA_FLAG_DEFAULT;
    for (size_t i = 0; i < ST_ARRAY_LEN(env); i++) {
        const char *v = getenv(env[i].name);
        if (v && !strcmp(v, "0")) f &= ~env[i].flag;
        if (v && !strcmp(v, "1")) f |= env[i].flag;
    }
    return f;
}

extern "C" int cuda_backend_init(struct backend **out, const struct backend_opts *o, char *err)
{
    *out = NULL;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
        cudaGetLastError();
        return err_set(err, ST_EUNSUPPORTED, "no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "none found");
    }
    if (o->device < 0 || o->device >= count)
        return err_set(err, ST_EINVAL, "cuda:%d: this machine has %d CUDA device(s)", o->device, count);
    cudaDeviceProp prop;
    if ((e = cudaSetDevice(o->device)) != cudaSuccess || (e = cudaGetDeviceProperties(&prop, o->device)) != cudaSuccess) {
        cudaGetLastError();
        return err_set(err, ST_EIO, "cuda:%d: %s", o->device, cudaGetErrorString(e));
    }
    if (prop.major < 9)
        return err_set(err, ST_EUNSUPPORTED, "cuda:%d (%s) has compute capability %d.%d; strata's kernels need 9.0 (Hopper)",
                       o->device, prop.name, prop.major, prop.minor);
    struct cuda_backend *cb = (struct cuda_backend *)calloc(1, sizeof(*cb));
    if (!cb) return err_set(err, ST_ENOMEM, "cuda: out of memory");
    int rc = ST_OK;
    cb->base.ops = cuda_ops();
    cb->base.kind = BACKEND_CUDA;
    cb->base.n_threads = 1;
    cb->device = o->device;
    cb->sm_count = prop.multiProcessorCount;
    cb->max_smem = (int)prop.sharedMemPerBlockOptin;
    cb->max_smem_sm = (int)prop.sharedMemPerMultiprocessor;
    cb->flags = flags_from_env();
    {
        const char *v = getenv("STRATA_CUDA_MM_BPS");
        cb->mm_bps = v && *v ? atoi(v) : -1;
        if (cb->mm_bps < -1) cb->mm_bps = -1;
        v = getenv("STRATA_CUDA_MM_TB");
        cb->mm_tb = v && *v ? atoi(v) : 0;
        if (cb->mm_tb < 0) cb->mm_tb = 0;
    }
    snprintf(cb->base.device_name, sizeof(cb->base.device_name), "cuda:%d %.80s (%d SMs, %.0f GiB)", o->device, prop.name,
             prop.multiProcessorCount, prop.totalGlobalMem / 1073741824.0);
    size_t fr = 0, tot = 0;
    if (cudaMemGetInfo(&fr, &tot) == cudaSuccess) {
        cb->base.free_mem_bytes = fr;
        cb->base.total_mem_bytes = tot;
    }
    cb->cap_q = 4096;
    cb->q = (struct xop *)malloc(sizeof(struct xop) * (size_t)cb->cap_q);
    cb->fq = (struct xop *)malloc(sizeof(struct xop) * (size_t)cb->cap_q);
    if (!cb->q || !cb->fq) {
        rc = err_set(err, ST_ENOMEM, "cuda: out of memory");
        goto fail;
    }
    if ((e = cudaStreamCreateWithFlags(&cb->stream, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaHostAlloc((void **)&cb->staging, (size_t)32 << 20, cudaHostAllocPortable | cudaHostAllocMapped)) != cudaSuccess ||
        (e = cudaHostGetDevicePointer((void **)&cb->staging_dev, cb->staging, 0)) != cudaSuccess ||
        (e = cuda_matmul_setup(cb->max_smem)) != cudaSuccess || (e = cuda_attn_setup(cb->max_smem)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&cb->dl_ev[0], cudaEventDisableTiming)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&cb->dl_ev[1], cudaEventDisableTiming)) != cudaSuccess) {
        cudaGetLastError();
        rc = err_set(err, ST_EIO, "cuda:%d: %s", o->device, cudaGetErrorString(e));
        goto fail;
    }
    cb->staging_bytes = (size_t)32 << 20;
    *out = &cb->base;
    return ST_OK;
fail:
    cu_free(&cb->base);
    return rc;
}

/* ---- extras (cuda_backend.h) ---- */
extern "C" int cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" void cuda_backend_set_flags(struct backend *b, unsigned flags)
{
    struct cuda_backend *cb = cub(b);
    sync_all(cb);
    cb->flags = flags & CUDA_FLAG_ALL;
}

extern "C" void cuda_backend_set_mm_schedule(struct backend *b, int blocks_per_sm, int grid_max, int tiles_per_group)
{
    struct cuda_backend *cb = cub(b);
    sync_all(cb);
    cb->mm_bps = blocks_per_sm < -1 ? -1 : blocks_per_sm;
    cb->mm_grid_max = grid_max < 0 ? 0 : grid_max;
    cb->mm_tb = tiles_per_group < 0 ? 0 : tiles_per_group;
}

extern "C" int cuda_backend_profile(struct backend *b, int mode)
{
    struct cuda_backend *cb = cub(b);
    sync_all(cb);
    if (mode && !cb->prof_rows) {
        cb->prof_rows = (struct cuda_prof_row *)calloc(PROF_ROWS, sizeof(struct cuda_prof_row));
        if (!cb->prof_rows) return ST_ENOMEM;
    }
    if (mode) cb->prof_n_rows = 0;
    cb->prof_mode = mode == 1 || mode == 2 ? mode : 0;
    return ST_OK;
}

static int cmp_row(const void *a, const void *b)
{
    const double x = ((const struct cuda_prof_row *)a)->ms, y = ((const struct cuda_prof_row *)b)->ms;
    return x > y ? -1 : x < y;
}

extern "C" int cuda_backend_profile_rows(const struct backend *b, struct cuda_prof_row *rows, int max)
{
    const struct cuda_backend *cb = (const struct cuda_backend *)b;
    const int n = ST_MIN(max, cb->prof_n_rows);
    if (n <= 0) return 0;
    struct cuda_prof_row *all = (struct cuda_prof_row *)malloc(sizeof(*all) * (size_t)cb->prof_n_rows);
    if (!all) return 0;
    memcpy(all, cb->prof_rows, sizeof(*all) * (size_t)cb->prof_n_rows);
    qsort(all, (size_t)cb->prof_n_rows, sizeof(*all), cmp_row);
    memcpy(rows, all, sizeof(*all) * (size_t)n);
    free(all);
    return n;
}

extern "C" void cuda_profiler_range(int start)
{
    if (start) cudaProfilerStart();
    else cudaProfilerStop();
    cudaGetLastError();
}

extern "C" unsigned cuda_backend_get_flags(const struct backend *b) { return ((const struct cuda_backend *)b)->flags; }

extern "C" void cuda_backend_get_stats(const struct backend *b, struct cuda_stats *s)
{
    *s = ((const struct cuda_backend *)b)->stats;
}

extern "C" int cuda_device_mem(int device, size_t *free_bytes, size_t *total_bytes)
{
    *free_bytes = *total_bytes = 0;
    if (cudaSetDevice(device) != cudaSuccess || cudaMemGetInfo(free_bytes, total_bytes) != cudaSuccess) {
        cudaGetLastError();
        return ST_EIO;
    }
    return ST_OK;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

extern "C" int cuda_copy_bandwidth(int device, size_t bytes, int reps, double *bytes_per_s, char *err)
{
    *bytes_per_s = 0;
    void *a = NULL, *c = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    double *t = (double *)calloc((size_t)(reps > 0 ? reps : 1), sizeof(double));
    int rc = ST_OK;
    cudaError_t e;
    if (!t) return err_set(err, ST_ENOMEM, "out of memory");
    if ((e = cudaSetDevice(device)) != cudaSuccess || (e = cudaMalloc(&a, bytes)) != cudaSuccess ||
        (e = cudaMalloc(&c, bytes)) != cudaSuccess || (e = cudaMemset(a, 1, bytes)) != cudaSuccess ||
        (e = cudaEventCreate(&e0)) != cudaSuccess || (e = cudaEventCreate(&e1)) != cudaSuccess)
        goto cuda_fail;
    for (int i = 0; i < 3; i++)
        if ((e = cudaMemcpy(c, a, bytes, cudaMemcpyDeviceToDevice)) != cudaSuccess) goto cuda_fail;
    for (int i = 0; i < reps; i++) {
        float ms = 0;
        if ((e = cudaEventRecord(e0)) != cudaSuccess ||
            (e = cudaMemcpyAsync(i & 1 ? a : c, i & 1 ? c : a, bytes, cudaMemcpyDeviceToDevice)) != cudaSuccess ||
            (e = cudaEventRecord(e1)) != cudaSuccess || (e = cudaEventSynchronize(e1)) != cudaSuccess ||
            (e = cudaEventElapsedTime(&ms, e0, e1)) != cudaSuccess)
            goto cuda_fail;
        t[i] = ms * 1e-3;
    }
    qsort(t, (size_t)reps, sizeof(double), cmp_double);
    *bytes_per_s = 2.0 * (double)bytes / t[reps / 2];
    goto done;
cuda_fail:
    cudaGetLastError();
    rc = err_set(err, ST_EIO, "cuda:%d: copy bandwidth: %s", device, cudaGetErrorString(e));
done:
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (a) cudaFree(a);
    if (c) cudaFree(c);
    free(t);
    return rc;
}
