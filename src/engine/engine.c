/* engine: one forward pass over the layers a node holds, read top to bottom:
 *   x = embed(tokens) | hidden_in
 *   for each layer: x += Wo·attn(rope(norm_q(Wq·n(x))), rope(norm_k(Wk·n(x))), Wv·n(x));  x += Wd·(silu(Wg·n(x)) * Wu·n(x))
 *   logits = lm_head · norm(x[rows wanted])  |  hidden_out = x
 */
#include "engine/engine.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

/* Device copies of a layer's vectors (NULL where the model has none). */
struct layer_vecs {
    float *attn_norm, *ffn_norm, *q_norm, *k_norm, *bq, *bk, *bv, *bo, *b_gate, *b_up, *b_down;
};

struct engine {
    struct model *m;
    struct engine_opts o;
    struct backend *b;
    int q_dim, kv_dim;
    /* device buffers */
    float *x;        /* [max_batch][dim] residual stream */
    float *xb;       /* [max_batch][dim] normed */
    float *q;        /* [max_batch][q_dim] */
    float *k, *v;    /* [max_batch][kv_dim] */
    float *att;      /* [max_batch][q_dim] */
    float *proj;     /* [max_batch][dim] */
    float *gate, *up;/* [max_batch][hidden] */
    float *logits;   /* [max_logits][vocab] */
    float *rope_cs;  /* [max_batch][head_dim/2][2] */
    int32_t *d_token, *d_pos, *d_slot;
    float **k_cache, **v_cache; /* per local layer: [n_slots][n_ctx][kv_dim] */
    float *d_vecs;   /* every norm weight and bias, uploaded once */
    struct layer_vecs *lv; /* per local layer: pointers into d_vecs */
    float *final_norm;     /* into d_vecs (last stage) */
    /* host scratch */
    double *inv_freq;/* [head_dim/2] */
    float *h_cs;     /* [max_batch][head_dim/2][2] */
    int32_t *h_rows; /* [max_logits] */
    struct engine_stats stats;
};

void rope_inv_freq(const struct model_config *c, double *inv_freq)
{
    int half = c->head_dim / 2;
    for (int j = 0; j < half; j++) {
        double f = 1.0 / pow(c->rope_theta, (2.0 * j) / c->head_dim);
        if (c->rope_type == ROPE_LINEAR) {
            f /= c->rope_factor;
        } else if (c->rope_type == ROPE_LLAMA3) {
            double old = c->rope_orig_max_pos, lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
            double low_wl = old / lo, high_wl = old / hi, wl = 2.0 * M_PI / f;
            if (wl > low_wl) {
                f = f / c->rope_factor;
            } else if (wl >= high_wl) { /* medium band: interpolate */
                double smooth = (old / wl - lo) / (hi - lo);
                f = (1.0 - smooth) * f / c->rope_factor + smooth * f;
            }
        }
        inv_freq[j] = f;
    }
}

static void *dalloc(struct engine *e, size_t bytes, int *rc)
{
    void *p = e->b->ops->alloc(e->b, bytes);
    if (!p) *rc = ST_ENOMEM;
    return p;
}

static int upload_vec(struct engine *e, float **dst, const float *src, int n, size_t *off)
{
    if (!src) {
        *dst = NULL;
        return ST_OK;
    }
    *dst = e->d_vecs + *off;
    *off += (size_t)n;
    return e->b->ops->upload(e->b, *dst, src, sizeof(float) * (size_t)n);
}

int engine_init(struct engine **out, struct model *m, const struct engine_opts *opts, char *err)
{
    *out = NULL;
    const struct model_config *c = &m->cfg;
    struct engine *e = calloc(1, sizeof(*e));
    if (!e) return err_set(err, ST_ENOMEM, "engine: out of memory");
    int rc = ST_OK;
    e->m = m;
    e->o = *opts;
    if (e->o.n_slots < 1) e->o.n_slots = 1;
    if (e->o.n_ctx < 1) e->o.n_ctx = ST_MIN(c->max_seq_len, 4096);
    if (e->o.max_batch < 1) e->o.max_batch = 256;
    if (e->o.max_batch < e->o.n_slots) e->o.max_batch = e->o.n_slots;
    if (e->o.max_logits < 1) e->o.max_logits = e->o.n_slots;
    if (e->o.max_logits > e->o.max_batch) e->o.max_logits = e->o.max_batch;
    if (e->o.n_ctx > c->max_seq_len) {
        rc = err_set(err, ST_ERANGE, "context %d is longer than the model's max_position_embeddings %d", e->o.n_ctx,
                     c->max_seq_len);
        goto fail;
    }
    if ((rc = backend_init(&e->b, &e->o.backend, err)) < 0) goto fail;
    const struct backend_ops *ops = e->b->ops;
    int B = e->o.max_batch, nl = m->layer_end - m->layer_begin, half = c->head_dim / 2;
    e->q_dim = c->n_heads * c->head_dim;
    e->kv_dim = c->n_kv_heads * c->head_dim;

    /* weights */
    for (int l = 0; l < nl; l++) {
        struct layer_weights *L = &m->layers[l];
        struct weight *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < ST_ARRAY_LEN(ws); i++)
            if ((rc = ops->weight_prepare(e->b, ws[i], err)) < 0) goto fail;
    }
    if (m->has_embed || (m->has_head && c->tie_embeddings))
        if ((rc = ops->weight_prepare(e->b, &m->embed, err)) < 0) goto fail;
    if (m->has_head) {
        if (c->tie_embeddings) m->lm_head = m->embed;
        else if ((rc = ops->weight_prepare(e->b, &m->lm_head, err)) < 0) goto fail;
    }
    if ((rc = ops->reserve(e->b, (size_t)e->o.n_ctx + 64, err)) < 0) goto fail;

    /* activations */
    size_t fs = sizeof(float);
    e->x = dalloc(e, fs * (size_t)B * c->dim, &rc);
    e->xb = dalloc(e, fs * (size_t)B * c->dim, &rc);
    e->proj = dalloc(e, fs * (size_t)B * c->dim, &rc);
    e->q = dalloc(e, fs * (size_t)B * e->q_dim, &rc);
    e->att = dalloc(e, fs * (size_t)B * e->q_dim, &rc);
    e->k = dalloc(e, fs * (size_t)B * e->kv_dim, &rc);
    e->v = dalloc(e, fs * (size_t)B * e->kv_dim, &rc);
    e->gate = dalloc(e, fs * (size_t)B * c->hidden_dim, &rc);
    e->up = dalloc(e, fs * (size_t)B * c->hidden_dim, &rc);
    e->rope_cs = dalloc(e, fs * (size_t)B * half * 2, &rc);
    e->d_token = dalloc(e, sizeof(int32_t) * (size_t)B, &rc);
    e->d_pos = dalloc(e, sizeof(int32_t) * (size_t)B, &rc);
    e->d_slot = dalloc(e, sizeof(int32_t) * (size_t)B, &rc);
    if (m->has_head) e->logits = dalloc(e, fs * (size_t)e->o.max_logits * c->vocab_size, &rc);
    if (rc < 0) {
        err_set(err, rc, "engine: cannot allocate activations for batch %d", B);
        goto fail;
    }
    /* KV cache */
    e->k_cache = calloc((size_t)(nl > 0 ? nl : 1), sizeof(float *));
    e->v_cache = calloc((size_t)(nl > 0 ? nl : 1), sizeof(float *));
    if (!e->k_cache || !e->v_cache) {
        rc = err_set(err, ST_ENOMEM, "engine: out of memory");
        goto fail;
    }
    size_t kv_layer = fs * (size_t)e->o.n_slots * (size_t)e->o.n_ctx * (size_t)e->kv_dim;
    for (int l = 0; l < nl; l++) {
        e->k_cache[l] = dalloc(e, kv_layer, &rc);
        e->v_cache[l] = dalloc(e, kv_layer, &rc);
        if (rc < 0) {
            err_set(err, rc, "engine: cannot allocate the KV cache (%d slots x %d positions: %.1f MiB)", e->o.n_slots,
                    e->o.n_ctx, 2.0 * nl * kv_layer / 1048576.0);
            goto fail;
        }
    }
    /* norm vectors and biases */
    size_t n_vec = (size_t)nl * (4 * c->dim + 2 * c->head_dim + e->q_dim + 2 * e->kv_dim + 2 * c->hidden_dim) + c->dim;
    e->d_vecs = dalloc(e, fs * n_vec, &rc);
    e->lv = calloc((size_t)(nl > 0 ? nl : 1), sizeof(*e->lv));
    if (rc < 0 || !e->lv) {
        rc = err_set(err, ST_ENOMEM, "engine: out of memory");
        goto fail;
    }
    size_t off = 0;
    for (int l = 0; l < nl; l++) {
        const struct layer_weights *L = &m->layers[l];
        struct layer_vecs *v = &e->lv[l];
        if ((rc = upload_vec(e, &v->attn_norm, L->attn_norm, c->dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->ffn_norm, L->ffn_norm, c->dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->q_norm, L->q_norm, c->head_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->k_norm, L->k_norm, c->head_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->bq, L->bq, e->q_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->bk, L->bk, e->kv_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->bv, L->bv, e->kv_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->bo, L->bo, c->dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->b_gate, L->b_gate, c->hidden_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->b_up, L->b_up, c->hidden_dim, &off)) < 0 ||
            (rc = upload_vec(e, &v->b_down, L->b_down, c->dim, &off)) < 0) {
            err_set(err, rc, "engine: cannot upload layer vectors");
            goto fail;
        }
    }
    if (m->has_head && (rc = upload_vec(e, &e->final_norm, m->final_norm, c->dim, &off)) < 0) {
        err_set(err, rc, "engine: cannot upload the final norm");
        goto fail;
    }
    /* host scratch */
    e->inv_freq = malloc(sizeof(double) * (size_t)half);
    e->h_cs = malloc(fs * (size_t)B * half * 2);
    e->h_rows = malloc(sizeof(int32_t) * (size_t)B);
    if (!e->inv_freq || !e->h_cs || !e->h_rows) {
        rc = err_set(err, ST_ENOMEM, "engine: out of memory");
        goto fail;
    }
    rope_inv_freq(c, e->inv_freq);
    *out = e;
    return ST_OK;
fail:
    engine_free(e);
    return rc;
}

void engine_free(struct engine *e)
{
    if (!e) return;
    if (e->b) {
        const struct backend_ops *ops = e->b->ops;
        float *bufs[] = {e->x, e->xb, e->proj, e->q, e->att, e->k, e->v, e->gate, e->up, e->rope_cs, e->logits, e->d_vecs};
        for (size_t i = 0; i < ST_ARRAY_LEN(bufs); i++)
            if (bufs[i]) ops->dealloc(e->b, bufs[i]);
        int32_t *ibufs[] = {e->d_token, e->d_pos, e->d_slot};
        for (size_t i = 0; i < ST_ARRAY_LEN(ibufs); i++)
            if (ibufs[i]) ops->dealloc(e->b, ibufs[i]);
        int nl = e->m->layer_end - e->m->layer_begin;
        for (int l = 0; l < nl; l++) {
            if (e->k_cache && e->k_cache[l]) ops->dealloc(e->b, e->k_cache[l]);
            if (e->v_cache && e->v_cache[l]) ops->dealloc(e->b, e->v_cache[l]);
        }
        backend_free(e->b);
    }
    free(e->k_cache);
    free(e->v_cache);
    free(e->lv);
    free(e->inv_freq);
    free(e->h_cs);
    free(e->h_rows);
    free(e);
}

int engine_forward(struct engine *e, const struct batch *b, const float *in_hidden, float *out, char *err)
{
    const struct model_config *c = &e->m->cfg;
    const struct backend_ops *ops = e->b->ops;
    struct backend *be = e->b;
    int n = b->n, half = c->head_dim / 2, nl = e->m->layer_end - e->m->layer_begin;
    bool first = e->m->has_embed, last = e->m->has_head;
    if (n < 1 || n > e->o.max_batch) return err_set(err, ST_EINVAL, "batch of %d tokens (1..%d allowed)", n, e->o.max_batch);
    int n_out = 0;
    for (int i = 0; i < n; i++) {
        if (b->slot[i] < 0 || b->slot[i] >= e->o.n_slots)
            return err_set(err, ST_EINVAL, "token %d: slot %d outside [0, %d)", i, b->slot[i], e->o.n_slots);
        if (b->pos[i] < 0 || b->pos[i] >= e->o.n_ctx)
            return err_set(err, ST_ERANGE, "token %d: position %d outside the context of %d", i, b->pos[i], e->o.n_ctx);
        if (first && (b->token[i] < 0 || b->token[i] >= c->vocab_size))
            return err_set(err, ST_EINVAL, "token %d: id %d outside the vocabulary of %d", i, b->token[i], c->vocab_size);
        if (last && b->want_logits && b->want_logits[i]) {
            if (n_out == e->o.max_logits)
                return err_set(err, ST_EINVAL, "more than %d logit rows requested", e->o.max_logits);
            e->h_rows[n_out++] = i;
        }
    }
    if (!first && !in_hidden) return err_set(err, ST_EINVAL, "stage without the embedding needs hidden states");
    double t0 = time_s();

    /* batch metadata and rope angles (double precision, once for all layers) */
    for (int i = 0; i < n; i++)
        for (int j = 0; j < half; j++) {
            double a = (double)b->pos[i] * e->inv_freq[j];
            e->h_cs[((size_t)i * half + j) * 2] = (float)cos(a);
            e->h_cs[((size_t)i * half + j) * 2 + 1] = (float)sin(a);
        }
    int rc;
    if ((rc = ops->upload(be, e->rope_cs, e->h_cs, sizeof(float) * (size_t)n * half * 2)) < 0 ||
        (rc = ops->upload(be, e->d_pos, b->pos, sizeof(int32_t) * (size_t)n)) < 0 ||
        (rc = ops->upload(be, e->d_slot, b->slot, sizeof(int32_t) * (size_t)n)) < 0)
        return err_set(err, rc, "engine: upload failed");
    struct backend_batch bb = {n, e->d_token, e->d_pos, e->d_slot};

    if (first) {
        if ((rc = ops->upload(be, e->d_token, b->token, sizeof(int32_t) * (size_t)n)) < 0)
            return err_set(err, rc, "engine: upload failed");
        ops->embed(be, e->x, &e->m->embed, e->d_token, n);
    } else if ((rc = ops->upload(be, e->x, in_hidden, sizeof(float) * (size_t)n * c->dim)) < 0) {
        return err_set(err, rc, "engine: upload failed");
    }

    float scale = 1.0f / sqrtf((float)c->head_dim);
    for (int l = 0; l < nl; l++) {
        const struct layer_weights *L = &e->m->layers[l];
        const struct layer_vecs *v = &e->lv[l];
        /* attention */
        ops->rmsnorm(be, e->xb, e->x, v->attn_norm, n, c->dim, c->norm_eps);
        if (ops->matmul_multi) {
            float *ys[3] = {e->q, e->k, e->v};
            const struct weight *ws[3] = {&L->wq, &L->wk, &L->wv};
            const float *bs[3] = {v->bq, v->bk, v->bv};
            ops->matmul_multi(be, 3, ys, ws, e->xb, n, bs);
        } else {
            ops->matmul(be, e->q, &L->wq, e->xb, n, v->bq);
            ops->matmul(be, e->k, &L->wk, e->xb, n, v->bk);
            ops->matmul(be, e->v, &L->wv, e->xb, n, v->bv);
        }
        if (v->q_norm) ops->rmsnorm(be, e->q, e->q, v->q_norm, n * c->n_heads, c->head_dim, c->norm_eps);
        if (v->k_norm) ops->rmsnorm(be, e->k, e->k, v->k_norm, n * c->n_kv_heads, c->head_dim, c->norm_eps);
        ops->rope(be, e->q, n, c->n_heads, c->head_dim, e->rope_cs);
        ops->rope(be, e->k, n, c->n_kv_heads, c->head_dim, e->rope_cs);
        ops->kv_store(be, e->k_cache[l], e->v_cache[l], e->k, e->v, &bb, e->kv_dim, e->o.n_ctx);
        ops->attention(be, e->att, e->q, e->k_cache[l], e->v_cache[l], &bb, c->n_heads, c->n_kv_heads, c->head_dim,
                       e->o.n_ctx, scale);
        ops->matmul(be, e->proj, &L->wo, e->att, n, v->bo);
        ops->add(be, e->x, e->proj, (int64_t)n * c->dim);
        /* feed-forward */
        ops->rmsnorm(be, e->xb, e->x, v->ffn_norm, n, c->dim, c->norm_eps);
        if (ops->matmul_multi) {
            float *ys[2] = {e->gate, e->up};
            const struct weight *ws[2] = {&L->w_gate, &L->w_up};
            const float *bs[2] = {v->b_gate, v->b_up};
            ops->matmul_multi(be, 2, ys, ws, e->xb, n, bs);
        } else {
            ops->matmul(be, e->gate, &L->w_gate, e->xb, n, v->b_gate);
            ops->matmul(be, e->up, &L->w_up, e->xb, n, v->b_up);
        }
        ops->silu_mul(be, e->gate, e->gate, e->up, (int64_t)n * c->hidden_dim);
        ops->matmul(be, e->proj, &L->w_down, e->gate, n, v->b_down);
        ops->add(be, e->x, e->proj, (int64_t)n * c->dim);
    }

    int n_rows;
    if (last) {
        if (n_out > 0) {
            ops->gather_rows(be, e->xb, e->x, e->h_rows, n_out, c->dim);
            ops->rmsnorm(be, e->xb, e->xb, e->final_norm, n_out, c->dim, c->norm_eps);
            ops->matmul(be, e->logits, &e->m->lm_head, e->xb, n_out, NULL);
            rc = ops->download(be, out, e->logits, sizeof(float) * (size_t)n_out * c->vocab_size);
        } else {
            rc = ops->sync(be);
        }
        n_rows = n_out;
    } else {
        rc = ops->download(be, out, e->x, sizeof(float) * (size_t)n * c->dim);
        n_rows = n;
    }
    if (rc < 0) return err_set(err, rc, "engine: backend failed (%s)", be->device_name);
    e->stats.n_forward++;
    e->stats.n_tokens += (uint64_t)n;
    e->stats.forward_s += time_s() - t0;
    return n_rows;
}

const struct model *engine_model(const struct engine *e) { return e->m; }
const struct engine_opts *engine_opts(const struct engine *e) { return &e->o; }
struct backend *engine_backend(struct engine *e) { return e->b; }
bool engine_is_first(const struct engine *e) { return e->m->has_embed; }
bool engine_is_last(const struct engine *e) { return e->m->has_head; }
void engine_get_stats(const struct engine *e, struct engine_stats *s) { *s = e->stats; }

size_t engine_kv_bytes(const struct engine *e)
{
    return 2 * sizeof(float) * (size_t)(e->m->layer_end - e->m->layer_begin) * (size_t)e->o.n_slots *
           (size_t)e->o.n_ctx * (size_t)e->kv_dim;
}
