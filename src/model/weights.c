/* weights: bind the tensors of a layer range (from safetensors or generated) to the model structure. */
#include "core/core.h"
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *wtype_names[WT_COUNT] = {"f32", "f16", "bf16", "q8", "q4"};
const char *wtype_name(enum wtype t) { return (t >= 0 && t < WT_COUNT) ? wtype_names[t] : "?"; }

static int wtype_bits(enum wtype t) { return t == WT_Q8 ? 8 : t == WT_Q4 ? 4 : 0; }

size_t weight_bytes(const struct weight *w)
{
    size_t n = (size_t)(w->rows * w->cols);
    switch (w->type) {
    case WT_F32: return n * 4;
    case WT_F16:
    case WT_BF16: return n * 2;
    case WT_Q8:
    case WT_Q4: {
        size_t groups = (size_t)(w->rows * (w->cols / w->group_size));
        return n * (size_t)wtype_bits(w->type) / 8 + 2 * groups * dtype_size(w->sdtype);
    }
    default: return 0;
    }
}

static inline float load_scalar(const void *p, enum dtype t, size_t i)
{
    switch (t) {
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    case DT_F32: return ((const float *)p)[i];
    default: return 0.0f;
    }
}

void weight_row_f32(const struct weight *w, int64_t r, float *out)
{
    int64_t cols = w->cols;
    switch (w->type) {
    case WT_F32: memcpy(out, (const float *)w->data + r * cols, sizeof(float) * (size_t)cols); break;
    case WT_BF16: {
        const uint16_t *p = (const uint16_t *)w->data + r * cols;
        for (int64_t i = 0; i < cols; i++) out[i] = bf16_to_f32(p[i]);
        break;
    }
    case WT_F16: {
        const uint16_t *p = (const uint16_t *)w->data + r * cols;
        for (int64_t i = 0; i < cols; i++) out[i] = f16_to_f32(p[i]);
        break;
    }
    case WT_Q8:
    case WT_Q4: {
        int bits = wtype_bits(w->type), per_word = 32 / bits;
        uint32_t mask = (1u << bits) - 1;
        const uint32_t *q = (const uint32_t *)w->data + r * (cols / per_word);
        int64_t ng = cols / w->group_size;
        for (int64_t g = 0; g < ng; g++) {
            float s = load_scalar(w->scales, w->sdtype, (size_t)(r * ng + g));
            float b = load_scalar(w->biases, w->sdtype, (size_t)(r * ng + g));
            for (int64_t i = g * w->group_size; i < (g + 1) * w->group_size; i++) {
                uint32_t code = (q[i / per_word] >> (bits * (i % per_word))) & mask;
                out[i] = s * (float)code + b;
            }
        }
        break;
    }
    default: ST_ASSERT(0);
    }
}

static int track_alloc(struct model *m, void *p)
{
    if (m->n_allocs == m->cap_allocs) {
        int cap = m->cap_allocs ? m->cap_allocs * 2 : 64;
        void **a = realloc(m->allocs, sizeof(void *) * (size_t)cap);
        if (!a) return ST_ENOMEM;
        m->allocs = a;
        m->cap_allocs = cap;
    }
    m->allocs[m->n_allocs++] = p;
    return ST_OK;
}

static void *model_alloc(struct model *m, size_t bytes)
{
    void *p = st_alloc(bytes);
    if (p && track_alloc(m, p) < 0) {
        st_free(p);
        return NULL;
    }
    return p;
}

static int hold(struct model *m, const char *name, const void *data, size_t nbytes)
{
    if (m->n_held == m->cap_held) {
        int cap = m->cap_held ? m->cap_held * 2 : 64;
        struct model_tensor *h = realloc(m->held, sizeof(*h) * (size_t)cap);
        if (!h) return ST_ENOMEM;
        m->held = h;
        m->cap_held = cap;
    }
    char *n = st_strdup(name);
    if (!n) return ST_ENOMEM;
    m->held[m->n_held].name = n;
    m->held[m->n_held].data = data;
    m->held[m->n_held].nbytes = nbytes;
    m->n_held++;
    return ST_OK;
}

static const char *held_name(const struct model *m) { return m->held[m->n_held - 1].name; }

static bool is_float_dtype(enum dtype t) { return t == DT_F32 || t == DT_F16 || t == DT_BF16; }

/* Binds base.weight (dense) or base.weight + base.scales + base.biases (MLX affine) as a [rows][cols] matrix. */
static int bind_matrix(struct model *m, const char *base, int64_t rows, int64_t cols, struct weight *w, char *err)
{
    char name[256];
    const char *dir = m->dir;
    snprintf(name, sizeof(name), "%s.weight", base);
    const struct st_tensor *t = safetensors_find(&m->st, name);
    if (!t) return err_set(err, ST_EFORMAT, "%s: missing tensor %s", dir, name);
    memset(w, 0, sizeof(*w));
    w->rows = rows;
    w->cols = cols;
    snprintf(name, sizeof(name), "%s.scales", base);
    const struct st_tensor *ts = safetensors_find(&m->st, name);
    if (!ts) {
        if (!is_float_dtype(t->dtype))
            return err_set(err, ST_EFORMAT, "%s: %s.weight has dtype %s (expected F32, F16 or BF16, or MLX scales)",
                           dir, base, dtype_name(t->dtype));
        if (t->n_dims != 2 || t->shape[0] != rows || t->shape[1] != cols)
            return err_set(err, ST_EFORMAT, "%s: %s.weight has shape [%lld, %lld], expected [%lld, %lld]", dir, base,
                           (long long)t->shape[0], (long long)(t->n_dims > 1 ? t->shape[1] : 0), (long long)rows,
                           (long long)cols);
        w->type = t->dtype == DT_F32 ? WT_F32 : t->dtype == DT_F16 ? WT_F16 : WT_BF16;
        w->data = t->data;
        snprintf(name, sizeof(name), "%s.weight", base);
        if (hold(m, name, t->data, t->nbytes) < 0) return err_set(err, ST_ENOMEM, "out of memory");
        w->name = held_name(m);
        return ST_OK;
    }
    snprintf(name, sizeof(name), "%s.biases", base);
    const struct st_tensor *tb = safetensors_find(&m->st, name);
    if (!tb) return err_set(err, ST_EFORMAT, "%s: %s.scales present but %s missing", dir, base, name);
    if (t->dtype != DT_U32 || t->n_dims != 2 || t->shape[0] != rows || t->shape[1] <= 0)
        return err_set(err, ST_EFORMAT, "%s: quantized %s.weight must be U32 [%lld, packed]", dir, base, (long long)rows);
    int64_t packed = t->shape[1];
    if ((packed * 32) % cols != 0)
        return err_set(err, ST_EFORMAT, "%s: %s.weight: %lld packed words do not fit %lld columns", dir, base,
                       (long long)packed, (long long)cols);
    int bits = (int)(packed * 32 / cols);
    if (bits != 4 && bits != 8)
        return err_set(err, ST_EUNSUPPORTED, "%s: %s is quantized to %d bits (4 and 8 are supported)", dir, base, bits);
    if (ts->n_dims != 2 || ts->shape[0] != rows || ts->shape[1] <= 0 || cols % ts->shape[1] != 0)
        return err_set(err, ST_EFORMAT, "%s: %s.scales has a bad shape", dir, base);
    int64_t gs = cols / ts->shape[1];
    if (gs != 32 && gs != 64 && gs != 128)
        return err_set(err, ST_EUNSUPPORTED, "%s: %s: group size %lld unsupported (32, 64, 128)", dir, base, (long long)gs);
    if (tb->n_dims != 2 || tb->shape[0] != rows || tb->shape[1] != ts->shape[1] || tb->dtype != ts->dtype)
        return err_set(err, ST_EFORMAT, "%s: %s.biases does not match %s.scales", dir, base, base);
    if (!is_float_dtype(ts->dtype))
        return err_set(err, ST_EFORMAT, "%s: %s.scales has dtype %s", dir, base, dtype_name(ts->dtype));
    w->type = bits == 8 ? WT_Q8 : WT_Q4;
    w->data = t->data;
    w->scales = ts->data;
    w->biases = tb->data;
    w->sdtype = ts->dtype;
    w->group_size = (int)gs;
    snprintf(name, sizeof(name), "%s.weight", base);
    if (hold(m, name, t->data, t->nbytes) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    w->name = held_name(m);
    snprintf(name, sizeof(name), "%s.scales", base);
    if (hold(m, name, ts->data, ts->nbytes) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    snprintf(name, sizeof(name), "%s.biases", base);
    if (hold(m, name, tb->data, tb->nbytes) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    return ST_OK;
}

/* Binds a float vector of length n (converted to f32). required=false: absent gives NULL. */
static int bind_vector(struct model *m, const char *name, int64_t n, bool required, float **out, char *err)
{
    *out = NULL;
    const struct st_tensor *t = safetensors_find(&m->st, name);
    if (!t) return required ? err_set(err, ST_EFORMAT, "%s: missing tensor %s", m->dir, name) : ST_OK;
    if (!is_float_dtype(t->dtype) || t->n_dims != 1 || t->shape[0] != n)
        return err_set(err, ST_EFORMAT, "%s: %s must be a float vector of %lld (got %s, %d dims)", m->dir, name,
                       (long long)n, dtype_name(t->dtype), t->n_dims);
    float *v = model_alloc(m, sizeof(float) * (size_t)n);
    if (!v || hold(m, name, t->data, t->nbytes) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    for (int64_t i = 0; i < n; i++) v[i] = load_scalar(t->data, t->dtype, (size_t)i);
    *out = v;
    return ST_OK;
}

static int check_range(const struct model_config *c, int *begin, int *end, char *err)
{
    if (*end < 0) *end = c->n_layers;
    if (*begin < 0 || *begin > *end || *end > c->n_layers)
        return err_set(err, ST_EINVAL, "layer range [%d, %d) is outside the model's %d layers", *begin, *end,
                       c->n_layers);
    return ST_OK;
}

static int bind_all(struct model *m, char *err)
{
    const struct model_config *c = &m->cfg;
    int rc, nl = m->layer_end - m->layer_begin;
    int64_t q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    m->layers = calloc((size_t)(nl > 0 ? nl : 1), sizeof(*m->layers));
    if (!m->layers) return err_set(err, ST_ENOMEM, "out of memory");
    bool need_embed = m->has_embed || (m->has_head && c->tie_embeddings);
    if (need_embed && (rc = bind_matrix(m, "model.embed_tokens", c->vocab_size, c->dim, &m->embed, err)) < 0) return rc;
    for (int l = 0; l < nl; l++) {
        struct layer_weights *L = &m->layers[l];
        char p[128], n[192];
        snprintf(p, sizeof(p), "model.layers.%d", m->layer_begin + l);
#define NAME(suffix) (snprintf(n, sizeof(n), "%s.%s", p, suffix), n)
        if ((rc = bind_vector(m, NAME("input_layernorm.weight"), c->dim, true, &L->attn_norm, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("post_attention_layernorm.weight"), c->dim, true, &L->ffn_norm, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.q_proj"), q_dim, c->dim, &L->wq, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.k_proj"), kv_dim, c->dim, &L->wk, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.v_proj"), kv_dim, c->dim, &L->wv, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("self_attn.o_proj"), c->dim, q_dim, &L->wo, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.gate_proj"), c->hidden_dim, c->dim, &L->w_gate, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.up_proj"), c->hidden_dim, c->dim, &L->w_up, err)) < 0) return rc;
        if ((rc = bind_matrix(m, NAME("mlp.down_proj"), c->dim, c->hidden_dim, &L->w_down, err)) < 0) return rc;
        if (c->qk_norm) {
            if ((rc = bind_vector(m, NAME("self_attn.q_norm.weight"), c->head_dim, true, &L->q_norm, err)) < 0) return rc;
            if ((rc = bind_vector(m, NAME("self_attn.k_norm.weight"), c->head_dim, true, &L->k_norm, err)) < 0) return rc;
        }
        if ((rc = bind_vector(m, NAME("self_attn.q_proj.bias"), q_dim, c->attn_bias, &L->bq, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.k_proj.bias"), kv_dim, c->attn_bias, &L->bk, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.v_proj.bias"), kv_dim, c->attn_bias, &L->bv, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("self_attn.o_proj.bias"), c->dim, c->o_bias, &L->bo, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("mlp.gate_proj.bias"), c->hidden_dim, c->mlp_bias, &L->b_gate, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("mlp.up_proj.bias"), c->hidden_dim, c->mlp_bias, &L->b_up, err)) < 0) return rc;
        if ((rc = bind_vector(m, NAME("mlp.down_proj.bias"), c->dim, c->mlp_bias, &L->b_down, err)) < 0) return rc;
#undef NAME
    }
    if (m->has_head) {
        if ((rc = bind_vector(m, "model.norm.weight", c->dim, true, &m->final_norm, err)) < 0) return rc;
        if (c->tie_embeddings) {
            m->lm_head = m->embed;
        } else if ((rc = bind_matrix(m, "lm_head", c->vocab_size, c->dim, &m->lm_head, err)) < 0) {
            return rc;
        }
    }
    return ST_OK;
}

int model_load(struct model *m, const char *dir, int layer_begin, int layer_end, bool with_embed, bool with_head,
               char *err)
{
    memset(m, 0, sizeof(*m));
    int rc;
    if (snprintf(m->dir, sizeof(m->dir), "%s", dir) >= (int)sizeof(m->dir))
        return err_set(err, ST_ERANGE, "model path too long");
    if ((rc = model_config_load(&m->cfg, dir, err)) < 0) return rc;
    if ((rc = check_range(&m->cfg, &layer_begin, &layer_end, err)) < 0) return rc;
    m->layer_begin = layer_begin;
    m->layer_end = layer_end;
    m->has_embed = with_embed;
    m->has_head = with_head;
    if ((rc = safetensors_open(&m->st, dir, err)) < 0) goto fail;
    if ((rc = bind_all(m, err)) < 0) goto fail;
    return ST_OK;
fail:
    model_free(m);
    return rc;
}

/* ---- generated weights ---- */

static uint64_t seed_for(uint64_t seed, const char *name)
{
    uint64_t h = seed ^ 0x51ed270b27d3c1a5ull;
    for (const char *s = name; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

/* Adds a generated tensor to the in-memory safetensors table so that binding works the same as for files. */
static int gen_tensor(struct model *m, struct safetensors *st, const char *name, enum dtype dt, int64_t d0, int64_t d1,
                      uint64_t seed, int kind, float amp)
{
    int64_t n = d0 * (d1 > 0 ? d1 : 1);
    size_t nbytes = (size_t)n * dtype_size(dt);
    void *p = model_alloc(m, nbytes);
    if (!p) return ST_ENOMEM;
    struct rng r;
    rng_seed(&r, seed_for(seed, name));
    if (dt == DT_U32) {
        uint64_t *q = p;
        for (size_t i = 0; i < nbytes / 8; i++) q[i] = rng_next(&r);
        if (nbytes % 8) ((uint32_t *)p)[n - 1] = (uint32_t)rng_next(&r);
    } else {
        uint16_t *h = p;
        for (int64_t i = 0; i < n; i++) {
            float v = kind == 1 ? 1.0f + rng_range(&r, -0.1f, 0.1f) : rng_range(&r, -amp, amp);
            h[i] = f32_to_bf16(v);
        }
    }
    struct st_tensor *t = realloc(st->tensors, sizeof(*t) * (size_t)(st->n_tensors + 1));
    if (!t) return ST_ENOMEM;
    st->tensors = t;
    t = &st->tensors[st->n_tensors];
    memset(t, 0, sizeof(*t));
    t->name = st_strdup(name);
    if (!t->name) return ST_ENOMEM;
    t->dtype = dt;
    t->n_dims = d1 > 0 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->data = p;
    t->nbytes = nbytes;
    st->n_tensors++;
    return ST_OK;
}

static int gen_matrix(struct model *m, const char *base, int64_t rows, int64_t cols, int bits, uint64_t seed)
{
    char n[256];
    float amp = 1.0f / sqrtf((float)cols);
    int rc;
    if (bits == 0) {
        snprintf(n, sizeof(n), "%s.weight", base);
        return gen_tensor(m, &m->st, n, DT_BF16, rows, cols, seed, 0, amp);
    }
    snprintf(n, sizeof(n), "%s.weight", base);
    if ((rc = gen_tensor(m, &m->st, n, DT_U32, rows, cols * bits / 32, seed, 0, 0)) < 0) return rc;
    /* scale and bias chosen so that codes span [-amp, amp] with a little per-group variation */
    int64_t ng = cols / 64;
    snprintf(n, sizeof(n), "%s.scales", base);
    if ((rc = gen_tensor(m, &m->st, n, DT_BF16, rows, ng, seed, 0, 1)) < 0) return rc;
    uint16_t *s = (uint16_t *)m->st.tensors[m->st.n_tensors - 1].data;
    for (int64_t i = 0; i < rows * ng; i++)
        s[i] = f32_to_bf16(2.0f * amp / (float)((1 << bits) - 1) * (1.0f + 0.25f * bf16_to_f32(s[i])));
    snprintf(n, sizeof(n), "%s.biases", base);
    if ((rc = gen_tensor(m, &m->st, n, DT_BF16, rows, ng, seed, 0, 1)) < 0) return rc;
    uint16_t *b = (uint16_t *)m->st.tensors[m->st.n_tensors - 1].data;
    for (int64_t i = 0; i < rows * ng; i++) b[i] = f32_to_bf16(-amp * (1.0f + 0.1f * bf16_to_f32(b[i])));
    return ST_OK;
}

int model_init_random(struct model *m, const struct model_config *cfg, int bits, uint64_t seed, int layer_begin,
                      int layer_end, bool with_embed, bool with_head, char *err)
{
    memset(m, 0, sizeof(*m));
    int rc = ST_OK;
    if (bits != 0 && bits != 4 && bits != 8) return err_set(err, ST_EINVAL, "generated weights: bits must be 0, 4 or 8");
    m->cfg = *cfg;
    if (bits && (cfg->dim % 64 || cfg->hidden_dim % 64 || (cfg->n_heads * cfg->head_dim) % 64))
        return err_set(err, ST_EINVAL, "generated quantized weights need dimensions that are multiples of 64");
    m->cfg.q_bits = bits;
    m->cfg.q_group_size = bits ? 64 : 0;
    m->cfg.dtype = DT_BF16;
    if ((rc = check_range(&m->cfg, &layer_begin, &layer_end, err)) < 0) return rc;
    m->layer_begin = layer_begin;
    m->layer_end = layer_end;
    m->has_embed = with_embed;
    m->has_head = with_head;
    const struct model_config *c = &m->cfg;
    int64_t q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    char p[128], n[192];
    if ((with_embed || (with_head && c->tie_embeddings)) &&
        (rc = gen_matrix(m, "model.embed_tokens", c->vocab_size, c->dim, bits, seed)) < 0)
        goto oom;
    for (int l = layer_begin; l < layer_end; l++) {
        snprintf(p, sizeof(p), "model.layers.%d", l);
#define NAME(suffix) (snprintf(n, sizeof(n), "%s.%s", p, suffix), n)
        if ((rc = gen_tensor(m, &m->st, NAME("input_layernorm.weight"), DT_BF16, c->dim, 0, seed, 1, 0)) < 0) goto oom;
        if ((rc = gen_tensor(m, &m->st, NAME("post_attention_layernorm.weight"), DT_BF16, c->dim, 0, seed, 1, 0)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("self_attn.q_proj"), q_dim, c->dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("self_attn.k_proj"), kv_dim, c->dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("self_attn.v_proj"), kv_dim, c->dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("self_attn.o_proj"), c->dim, q_dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("mlp.gate_proj"), c->hidden_dim, c->dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("mlp.up_proj"), c->hidden_dim, c->dim, bits, seed)) < 0) goto oom;
        if ((rc = gen_matrix(m, NAME("mlp.down_proj"), c->dim, c->hidden_dim, bits, seed)) < 0) goto oom;
        if (c->qk_norm) {
            if ((rc = gen_tensor(m, &m->st, NAME("self_attn.q_norm.weight"), DT_BF16, c->head_dim, 0, seed, 1, 0)) < 0) goto oom;
            if ((rc = gen_tensor(m, &m->st, NAME("self_attn.k_norm.weight"), DT_BF16, c->head_dim, 0, seed, 1, 0)) < 0) goto oom;
        }
        if (c->attn_bias) {
            if ((rc = gen_tensor(m, &m->st, NAME("self_attn.q_proj.bias"), DT_BF16, q_dim, 0, seed, 0, 0.02f)) < 0) goto oom;
            if ((rc = gen_tensor(m, &m->st, NAME("self_attn.k_proj.bias"), DT_BF16, kv_dim, 0, seed, 0, 0.02f)) < 0) goto oom;
            if ((rc = gen_tensor(m, &m->st, NAME("self_attn.v_proj.bias"), DT_BF16, kv_dim, 0, seed, 0, 0.02f)) < 0) goto oom;
        }
        if (c->o_bias && (rc = gen_tensor(m, &m->st, NAME("self_attn.o_proj.bias"), DT_BF16, c->dim, 0, seed, 0, 0.02f)) < 0)
            goto oom;
        if (c->mlp_bias) {
            if ((rc = gen_tensor(m, &m->st, NAME("mlp.gate_proj.bias"), DT_BF16, c->hidden_dim, 0, seed, 0, 0.02f)) < 0) goto oom;
            if ((rc = gen_tensor(m, &m->st, NAME("mlp.up_proj.bias"), DT_BF16, c->hidden_dim, 0, seed, 0, 0.02f)) < 0) goto oom;
            if ((rc = gen_tensor(m, &m->st, NAME("mlp.down_proj.bias"), DT_BF16, c->dim, 0, seed, 0, 0.02f)) < 0) goto oom;
        }
#undef NAME
    }
    if (with_head) {
        if ((rc = gen_tensor(m, &m->st, "model.norm.weight", DT_BF16, c->dim, 0, seed, 1, 0)) < 0) goto oom;
        if (!c->tie_embeddings && (rc = gen_matrix(m, "lm_head", c->vocab_size, c->dim, bits, seed)) < 0) goto oom;
    }
    if ((rc = safetensors_index(&m->st, err)) < 0) goto fail;
    if ((rc = bind_all(m, err)) < 0) goto fail;
    return ST_OK;
oom:
    rc = err_set(err, ST_ENOMEM, "generated weights: out of memory");
fail:
    model_free(m);
    return rc;
}

void model_free(struct model *m)
{
    /* generated tensors point into allocs: the table must not unmap or free them */
    safetensors_free(&m->st);
    for (int i = 0; i < m->n_held; i++) free(m->held[i].name);
    free(m->held);
    for (int i = 0; i < m->n_allocs; i++) st_free(m->allocs[i]);
    free(m->allocs);
    free(m->layers);
    memset(m, 0, sizeof(*m));
}

size_t model_bytes_per_token(const struct model *m)
{
    size_t b = 0;
    for (int l = 0; l < m->layer_end - m->layer_begin; l++) {
        const struct layer_weights *L = &m->layers[l];
        b += weight_bytes(&L->wq) + weight_bytes(&L->wk) + weight_bytes(&L->wv) + weight_bytes(&L->wo) +
             weight_bytes(&L->w_gate) + weight_bytes(&L->w_up) + weight_bytes(&L->w_down);
    }
    if (m->has_head) b += weight_bytes(&m->lm_head);
    if (m->has_embed && m->embed.rows > 0) b += weight_bytes(&m->embed) / (size_t)m->embed.rows;
    return b;
}
