/* proto: cluster payload encoding and bounded decoding. */
#include "cluster/proto.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

#define MAX_MANIFEST_ENTRIES (1 << 20)
#define MAX_STR 4096

static void put_params(struct net_buf *o, const struct sample_params *p)
{
    net_buf_put_f32(o, p->temperature);
    net_buf_put_i32(o, p->top_k);
    net_buf_put_f32(o, p->top_p);
    net_buf_put_f32(o, p->min_p);
    net_buf_put_f32(o, p->repetition_penalty);
    net_buf_put_f32(o, p->presence_penalty);
    net_buf_put_f32(o, p->frequency_penalty);
    net_buf_put_u64(o, p->seed);
    net_buf_put_u32(o, (uint32_t)p->n_bias);
    for (int i = 0; i < p->n_bias; i++) {
        net_buf_put_i32(o, p->bias[i].id);
        net_buf_put_f32(o, p->bias[i].bias);
    }
}

static void get_params(struct net_reader *r, struct sample_params *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = net_reader_get_f32(r, "temperature");
    p->top_k = net_reader_get_i32(r, "top_k");
    p->top_p = net_reader_get_f32(r, "top_p");
    p->min_p = net_reader_get_f32(r, "min_p");
    p->repetition_penalty = net_reader_get_f32(r, "repetition_penalty");
    p->presence_penalty = net_reader_get_f32(r, "presence_penalty");
    p->frequency_penalty = net_reader_get_f32(r, "frequency_penalty");
    p->seed = net_reader_get_u64(r, "seed");
    p->n_bias = (int)net_reader_get_count(r, SAMPLE_MAX_BIAS, 8, "n_bias");
    for (int i = 0; i < p->n_bias; i++) {
        p->bias[i].id = net_reader_get_i32(r, "bias.id");
        p->bias[i].bias = net_reader_get_f32(r, "bias.value");
    }
}

static int grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) return ST_OK;
    size_t n = need > 2 * *cap ? need : 2 * *cap;
    void *q = realloc(*p, n * elem);
    if (!q) return ST_ENOMEM;
    *p = q;
    *cap = n;
    return ST_OK;
}

static int grow_int(void **p, int *cap, int need, size_t elem)
{
    size_t c = (size_t)*cap;
    int rc = grow(p, &c, (size_t)need, elem);
    *cap = (int)c;
    return rc;
}

void fwd_msg_free(struct fwd_msg *m)
{
    free(m->rows);
    free(m->starts);
    free(m->frees);
    free(m->prompts);
    st_free(m->hidden);
    memset(m, 0, sizeof(*m));
}

void proto_put_forward(struct net_buf *o, uint64_t epoch, const struct step_batch *b, const double *timings,
                       int n_timings, const float *hidden, int hidden_rows, int dim)
{
    net_buf_put_u64(o, epoch);
    net_buf_put_u64(o, b->tag);
    net_buf_put_u32(o, (uint32_t)b->n_rows);
    for (int i = 0; i < b->n_rows; i++) {
        net_buf_put_i32(o, b->rows[i].token);
        net_buf_put_i32(o, b->rows[i].pos);
        net_buf_put_i32(o, b->rows[i].slot);
        net_buf_put_u8(o, b->rows[i].sample);
    }
    net_buf_put_u32(o, (uint32_t)b->n_start);
    for (int i = 0; i < b->n_start; i++) {
        const struct step_seq *q = &b->starts[i];
        net_buf_put_i32(o, q->slot);
        put_params(o, &q->sp);
        net_buf_put_i32(o, q->n_top);
        net_buf_put_u8(o, q->logprobs);
        net_buf_put_u32(o, (uint32_t)q->n_prompt);
        for (int k = 0; k < q->n_prompt; k++) net_buf_put_i32(o, q->prompt[k]);
    }
    net_buf_put_u32(o, (uint32_t)b->n_free);
    for (int i = 0; i < b->n_free; i++) net_buf_put_i32(o, b->frees[i]);
    net_buf_put_u32(o, (uint32_t)n_timings);
    for (int i = 0; i < n_timings; i++) net_buf_put_f64(o, timings[i]);
    net_buf_put_u32(o, (uint32_t)dim);
    net_buf_put_u32(o, (uint32_t)hidden_rows);
    if (hidden_rows > 0) net_buf_put_bytes(o, hidden, sizeof(float) * (size_t)hidden_rows * (size_t)dim);
}

int proto_get_forward(const uint8_t *data, size_t len, struct fwd_msg *m, int max_rows, int max_slots, int max_ctx,
                      int dim, char *err)
{
    struct net_reader r;
    net_reader_init(&r, data, len);
    m->epoch = net_reader_get_u64(&r, "epoch");
    m->b.tag = net_reader_get_u64(&r, "tag");
    int n_rows = (int)net_reader_get_count(&r, (uint32_t)max_rows, 13, "n_rows");
    if (grow_int((void **)&m->rows, &m->cap_rows, n_rows + 1, sizeof(*m->rows)) < 0)
        return err_set(err, ST_ENOMEM, "out of memory");
    for (int i = 0; i < n_rows; i++) {
        m->rows[i].token = net_reader_get_i32(&r, "row.token");
        m->rows[i].pos = net_reader_get_i32(&r, "row.pos");
        m->rows[i].slot = net_reader_get_i32(&r, "row.slot");
        m->rows[i].sample = net_reader_get_u8(&r, "row.sample");
    }
    int n_start = (int)net_reader_get_count(&r, (uint32_t)max_slots, 4, "n_start");
    if (grow_int((void **)&m->starts, &m->cap_starts, n_start + 1, sizeof(*m->starts)) < 0)
        return err_set(err, ST_ENOMEM, "out of memory");
    /* prompts go into one array; offsets first, pointers fixed after (the array may move while growing) */
    size_t used = 0;
    for (int i = 0; i < n_start; i++) {
        struct step_seq *q = &m->starts[i];
        q->slot = net_reader_get_i32(&r, "start.slot");
        get_params(&r, &q->sp);
        q->n_top = net_reader_get_i32(&r, "start.n_top");
        q->logprobs = net_reader_get_u8(&r, "start.logprobs");
        q->n_prompt = (int32_t)net_reader_get_count(&r, (uint32_t)max_ctx, 4, "start.n_prompt");
        if (grow((void **)&m->prompts, &m->cap_prompts, used + (size_t)q->n_prompt + 1, sizeof(int32_t)) < 0)
            return err_set(err, ST_ENOMEM, "out of memory");
        for (int k = 0; k < q->n_prompt; k++) m->prompts[used + (size_t)k] = net_reader_get_i32(&r, "start.prompt");
        q->prompt = (const int32_t *)(uintptr_t)used; /* offset for now */
        used += (size_t)q->n_prompt;
    }
    for (int i = 0; i < n_start; i++) m->starts[i].prompt = m->prompts + (uintptr_t)m->starts[i].prompt;
    int n_free = (int)net_reader_get_count(&r, (uint32_t)max_slots, 4, "n_free");
    if (grow_int((void **)&m->frees, &m->cap_frees, n_free + 1, sizeof(int32_t)) < 0)
        return err_set(err, ST_ENOMEM, "out of memory");
    for (int i = 0; i < n_free; i++) m->frees[i] = net_reader_get_i32(&r, "free.slot");
    m->n_timings = (int)net_reader_get_count(&r, CLUSTER_MAX_STAGES, 8, "n_timings");
    for (int i = 0; i < m->n_timings; i++) m->timings[i] = net_reader_get_f64(&r, "timing");
    m->dim = (int)net_reader_get_u32(&r, "dim");
    m->hidden_rows = (int)net_reader_get_u32(&r, "hidden_rows");
    int rc = net_reader_check(&r, err);
    if (rc < 0) return rc;
    if (dim > 0 && m->dim != dim) return err_set(err, ST_EFORMAT, "forward: hidden size %d, expected %d", m->dim, dim);
    if (m->hidden_rows != 0 && m->hidden_rows != n_rows)
        return err_set(err, ST_EFORMAT, "forward: %d hidden rows for %d batch rows", m->hidden_rows, n_rows);
    size_t hb = sizeof(float) * (size_t)m->hidden_rows * (size_t)m->dim;
    if (net_reader_remaining(&r) != hb)
        return err_set(err, ST_EFORMAT, "forward: %zu hidden bytes, expected %zu", net_reader_remaining(&r), hb);
    if (hb > 0) {
        if (hb > m->cap_hidden) {
            st_free(m->hidden);
            m->hidden = st_alloc(hb);
            m->cap_hidden = m->hidden ? hb : 0;
            if (!m->hidden) return err_set(err, ST_ENOMEM, "out of memory");
        }
        net_reader_get_into(&r, m->hidden, hb, "hidden");
    }
    if ((rc = net_reader_end(&r, err)) < 0) return rc;
    m->b.n_rows = n_rows;
    m->b.rows = m->rows;
    m->b.n_start = n_start;
    m->b.starts = m->starts;
    m->b.n_free = n_free;
    m->b.frees = m->frees;
    return ST_OK;
}

void result_msg_free(struct result_msg *m)
{
    free(m->outs);
    memset(m, 0, sizeof(*m));
}

void proto_put_result(struct net_buf *o, uint64_t epoch, uint64_t tag, int status, const char *err_text,
                      const struct step_out *outs, int n_out, const double *timings, int n_timings)
{
    net_buf_put_u64(o, epoch);
    net_buf_put_u64(o, tag);
    net_buf_put_i32(o, status);
    net_buf_put_str(o, err_text ? err_text : "");
    net_buf_put_u32(o, (uint32_t)n_out);
    for (int i = 0; i < n_out; i++) {
        net_buf_put_i32(o, outs[i].slot);
        net_buf_put_i32(o, outs[i].id);
        net_buf_put_f32(o, outs[i].logprob);
        net_buf_put_i32(o, outs[i].n_top);
        for (int k = 0; k < outs[i].n_top; k++) {
            net_buf_put_i32(o, outs[i].top_ids[k]);
            net_buf_put_f32(o, outs[i].top_lp[k]);
        }
    }
    net_buf_put_u32(o, (uint32_t)n_timings);
    for (int i = 0; i < n_timings; i++) net_buf_put_f64(o, timings[i]);
}

int proto_get_result(const uint8_t *data, size_t len, struct result_msg *m, int max_outs, char *err)
{
    struct net_reader r;
    net_reader_init(&r, data, len);
    m->epoch = net_reader_get_u64(&r, "epoch");
    m->tag = net_reader_get_u64(&r, "tag");
    m->status = net_reader_get_i32(&r, "status");
    net_reader_get_str(&r, m->err, sizeof(m->err), "error");
    m->n_out = (int)net_reader_get_count(&r, (uint32_t)max_outs, 16, "n_out");
    if (grow_int((void **)&m->outs, &m->cap_outs, m->n_out + 1, sizeof(*m->outs)) < 0)
        return err_set(err, ST_ENOMEM, "out of memory");
    for (int i = 0; i < m->n_out; i++) {
        struct step_out *s = &m->outs[i];
        s->slot = net_reader_get_i32(&r, "out.slot");
        s->id = net_reader_get_i32(&r, "out.id");
        s->logprob = net_reader_get_f32(&r, "out.logprob");
        s->n_top = (int32_t)net_reader_get_count(&r, RUNNER_MAX_TOP, 8, "out.n_top");
        for (int k = 0; k < s->n_top; k++) {
            s->top_ids[k] = net_reader_get_i32(&r, "out.top_id");
            s->top_lp[k] = net_reader_get_f32(&r, "out.top_lp");
        }
    }
    m->n_timings = (int)net_reader_get_count(&r, CLUSTER_MAX_STAGES, 8, "n_timings");
    for (int i = 0; i < m->n_timings; i++) m->timings[i] = net_reader_get_f64(&r, "timing");
    if (m->status > 0 || m->status < -100) return err_set(err, ST_EFORMAT, "result: bad status %d", m->status);
    return net_reader_end(&r, err);
}

void proto_put_load(struct net_buf *o, const struct load_spec *s)
{
    net_buf_put_u32(o, (uint32_t)s->source);
    net_buf_put_str(o, s->model_dir);
    net_buf_put_str(o, s->config_json ? s->config_json : "");
    net_buf_put_i32(o, s->bits);
    net_buf_put_u64(o, s->seed);
    net_buf_put_i32(o, s->layer_begin);
    net_buf_put_i32(o, s->layer_end);
    net_buf_put_u8(o, s->first);
    net_buf_put_u8(o, s->last);
    net_buf_put_i32(o, s->n_slots);
    net_buf_put_i32(o, s->n_ctx);
    net_buf_put_i32(o, s->max_batch);
    net_buf_put_i32(o, s->max_logits);
    net_buf_put_str(o, s->device);
    net_buf_put_i32(o, s->n_threads);
    net_buf_put_str(o, s->next_host);
    net_buf_put_i32(o, s->next_port);
    net_buf_put_u64(o, s->epoch);
    net_buf_put_str(o, s->slice_id);
}

int proto_get_load(const uint8_t *data, size_t len, struct load_spec *s, char *err)
{
    struct net_reader r;
    memset(s, 0, sizeof(*s));
    net_reader_init(&r, data, len);
    uint32_t src = net_reader_get_u32(&r, "source");
    net_reader_get_str(&r, s->model_dir, sizeof(s->model_dir), "model_dir");
    size_t cl = 0;
    const char *cj = net_reader_get_strn(&r, 1 << 20, &cl, "config_json");
    s->bits = net_reader_get_i32(&r, "bits");
    s->seed = net_reader_get_u64(&r, "seed");
    s->layer_begin = net_reader_get_i32(&r, "layer_begin");
    s->layer_end = net_reader_get_i32(&r, "layer_end");
    s->first = net_reader_get_u8(&r, "first") != 0;
    s->last = net_reader_get_u8(&r, "last") != 0;
    s->n_slots = net_reader_get_i32(&r, "n_slots");
    s->n_ctx = net_reader_get_i32(&r, "n_ctx");
    s->max_batch = net_reader_get_i32(&r, "max_batch");
    s->max_logits = net_reader_get_i32(&r, "max_logits");
    net_reader_get_str(&r, s->device, sizeof(s->device), "device");
    s->n_threads = net_reader_get_i32(&r, "n_threads");
    net_reader_get_str(&r, s->next_host, sizeof(s->next_host), "next_host");
    s->next_port = net_reader_get_i32(&r, "next_port");
    s->epoch = net_reader_get_u64(&r, "epoch");
    net_reader_get_str(&r, s->slice_id, sizeof(s->slice_id), "slice_id");
    int rc = net_reader_end(&r, err);
    if (rc < 0) return rc;
    if (src >= LOAD_SOURCE_COUNT) return err_set(err, ST_EFORMAT, "load: unknown source %u", src);
    for (const char *c = s->slice_id; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) return err_set(err, ST_EFORMAT, "load: bad slice id");
    s->source = (enum load_source)src;
    if (s->n_slots < 1 || s->n_slots > 4096 || s->n_ctx < 1 || s->n_ctx > (1 << 22) || s->max_batch < 1 ||
        s->max_batch > 65536 || s->max_logits < 1 || s->max_logits > s->max_batch || s->layer_begin < 0 ||
        s->layer_end < s->layer_begin || s->next_port < 0 || s->next_port > 65535 || s->n_threads < 0 ||
        s->n_threads > 4096)
        return err_set(err, ST_EFORMAT, "load: a size or range is out of bounds");
    if (s->source == LOAD_RANDOM) {
        s->config_json = malloc(cl + 1);
        if (!s->config_json) return err_set(err, ST_ENOMEM, "out of memory");
        memcpy(s->config_json, cj, cl);
        s->config_json[cl] = 0;
    }
    return ST_OK;
}

void proto_put_info(struct net_buf *o, const struct node_info *ni)
{
    net_buf_put_str(o, ni->name);
    net_buf_put_str(o, ni->host);
    net_buf_put_str(o, ni->cpu);
    net_buf_put_i32(o, ni->cores);
    net_buf_put_u64(o, ni->mem_total_bytes);
    net_buf_put_u64(o, ni->mem_free_bytes);
    net_buf_put_str(o, ni->device);
    net_buf_put_u64(o, ni->dev_total_bytes);
    net_buf_put_u64(o, ni->dev_free_bytes);
    net_buf_put_str(o, ni->version);
    net_buf_put_u8(o, ni->has_model);
    net_buf_put_str(o, ni->model_dir);
}

int proto_get_info(const uint8_t *data, size_t len, struct node_info *ni, char *err)
{
    struct net_reader r;
    memset(ni, 0, sizeof(*ni));
    net_reader_init(&r, data, len);
    net_reader_get_str(&r, ni->name, sizeof(ni->name), "name");
    net_reader_get_str(&r, ni->host, sizeof(ni->host), "host");
    net_reader_get_str(&r, ni->cpu, sizeof(ni->cpu), "cpu");
    ni->cores = net_reader_get_i32(&r, "cores");
    ni->mem_total_bytes = net_reader_get_u64(&r, "mem_total");
    ni->mem_free_bytes = net_reader_get_u64(&r, "mem_free");
    net_reader_get_str(&r, ni->device, sizeof(ni->device), "device");
    ni->dev_total_bytes = net_reader_get_u64(&r, "dev_total");
    ni->dev_free_bytes = net_reader_get_u64(&r, "dev_free");
    net_reader_get_str(&r, ni->version, sizeof(ni->version), "version");
    ni->has_model = net_reader_get_u8(&r, "has_model") != 0;
    net_reader_get_str(&r, ni->model_dir, sizeof(ni->model_dir), "model_dir");
    return net_reader_end(&r, err);
}

void proto_put_load_done(struct net_buf *o, int status, const char *err_text, const struct manifest *mf)
{
    net_buf_put_i32(o, status);
    net_buf_put_str(o, err_text ? err_text : "");
    int n = (status == 0 && mf) ? mf->n : 0;
    net_buf_put_u64(o, mf ? mf->config_hi : 0);
    net_buf_put_u64(o, mf ? mf->config_lo : 0);
    net_buf_put_u64(o, mf ? mf->tokenizer_hi : 0);
    net_buf_put_u64(o, mf ? mf->tokenizer_lo : 0);
    net_buf_put_u32(o, (uint32_t)n);
    for (int i = 0; i < n; i++) {
        net_buf_put_str(o, mf->entries[i].name);
        net_buf_put_u64(o, mf->entries[i].hash_hi);
        net_buf_put_u64(o, mf->entries[i].hash_lo);
        net_buf_put_u64(o, (uint64_t)mf->entries[i].nbytes);
    }
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const struct manifest_entry *)a)->name, ((const struct manifest_entry *)b)->name);
}

int proto_get_load_done(const uint8_t *data, size_t len, int *status, char *err_text, size_t err_cap,
                        struct manifest *mf, char *err)
{
    struct net_reader r;
    memset(mf, 0, sizeof(*mf));
    net_reader_init(&r, data, len);
    *status = net_reader_get_i32(&r, "status");
    net_reader_get_str(&r, err_text, err_cap, "error");
    mf->config_hi = net_reader_get_u64(&r, "config_hi");
    mf->config_lo = net_reader_get_u64(&r, "config_lo");
    mf->tokenizer_hi = net_reader_get_u64(&r, "tokenizer_hi");
    mf->tokenizer_lo = net_reader_get_u64(&r, "tokenizer_lo");
    uint32_t n = net_reader_get_count(&r, MAX_MANIFEST_ENTRIES, 28, "n_entries");
    int rc = net_reader_check(&r, err);
    if (rc < 0) return rc;
    mf->entries = calloc(n ? n : 1, sizeof(*mf->entries));
    if (!mf->entries) return err_set(err, ST_ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++) {
        size_t nl = 0;
        const char *name = net_reader_get_strn(&r, MAX_STR, &nl, "entry.name");
        struct manifest_entry *e = &mf->entries[i];
        e->hash_hi = net_reader_get_u64(&r, "entry.hash_hi");
        e->hash_lo = net_reader_get_u64(&r, "entry.hash_lo");
        e->nbytes = (size_t)net_reader_get_u64(&r, "entry.nbytes");
        if (!name) break;
        e->name = malloc(nl + 1);
        if (!e->name) {
            manifest_free(mf);
            return err_set(err, ST_ENOMEM, "out of memory");
        }
        memcpy(e->name, name, nl);
        e->name[nl] = 0;
        mf->n++;
    }
    if ((rc = net_reader_end(&r, err)) < 0) {
        manifest_free(mf);
        return rc;
    }
    qsort(mf->entries, (size_t)mf->n, sizeof(*mf->entries), entry_cmp);
    return ST_OK;
}
