/* runner: engine step + per-slot sampling on the last stage. */
#include "engine/runner.h"

#include <stdlib.h>
#include <string.h>

#include "core/core.h"

struct runner {
    struct engine *e;
    int n_slots, vocab, max_batch, max_logits;
    struct sampler *samplers; /* [n_slots] (last stage) */
    int32_t *n_top;           /* [n_slots] */
    uint8_t *logprobs;        /* [n_slots] */
    bool *active;             /* [n_slots] */
    int32_t *token, *pos, *slot;
    uint8_t *want;
    float *logits;            /* [max_logits][vocab] */
    float *work;              /* [vocab] */
};

int runner_init(struct runner **out, struct engine *e, char *err)
{
    *out = NULL;
    struct runner *r = calloc(1, sizeof(*r));
    if (!r) return err_set(err, ST_ENOMEM, "runner: out of memory");
    const struct engine_opts *o = engine_opts(e);
    r->e = e;
    r->n_slots = o->n_slots;
    r->max_batch = o->max_batch;
    r->max_logits = o->max_logits;
    r->vocab = engine_model(e)->cfg.vocab_size;
    r->active = calloc((size_t)r->n_slots, sizeof(bool));
    r->n_top = calloc((size_t)r->n_slots, sizeof(int32_t));
    r->logprobs = calloc((size_t)r->n_slots, 1);
    r->samplers = calloc((size_t)r->n_slots, sizeof(struct sampler));
    r->token = malloc(sizeof(int32_t) * (size_t)r->max_batch);
    r->pos = malloc(sizeof(int32_t) * (size_t)r->max_batch);
    r->slot = malloc(sizeof(int32_t) * (size_t)r->max_batch);
    r->want = malloc((size_t)r->max_batch);
    if (engine_is_last(e)) {
        r->logits = malloc(sizeof(float) * (size_t)r->max_logits * (size_t)r->vocab);
        r->work = malloc(sizeof(float) * (size_t)r->vocab);
    }
    if (!r->active || !r->n_top || !r->logprobs || !r->samplers || !r->token || !r->pos || !r->slot || !r->want ||
        (engine_is_last(e) && (!r->logits || !r->work))) {
        runner_free(r);
        return err_set(err, ST_ENOMEM, "runner: out of memory");
    }
    *out = r;
    return ST_OK;
}

void runner_free(struct runner *r)
{
    if (!r) return;
    for (int i = 0; i < r->n_slots && r->samplers; i++)
        if (r->active[i]) sampler_free(&r->samplers[i]);
    free(r->samplers);
    free(r->active);
    free(r->n_top);
    free(r->logprobs);
    free(r->token);
    free(r->pos);
    free(r->slot);
    free(r->want);
    free(r->logits);
    free(r->work);
    free(r);
}

struct engine *runner_engine(struct runner *r) { return r->e; }

int runner_step(struct runner *r, const struct step_batch *b, const float *hidden_in, float *hidden_out,
                struct step_out *outs, int *n_out, char *err)
{
    bool last = engine_is_last(r->e);
    int rc;
    *n_out = 0;
    for (int i = 0; i < b->n_free; i++) {
        int s = b->frees[i];
        if (s < 0 || s >= r->n_slots) return err_set(err, ST_EINVAL, "free: slot %d outside [0, %d)", s, r->n_slots);
        if (r->active[s] && last) sampler_free(&r->samplers[s]);
        r->active[s] = false;
    }
    for (int i = 0; i < b->n_start; i++) {
        const struct step_seq *q = &b->starts[i];
        if (q->slot < 0 || q->slot >= r->n_slots)
            return err_set(err, ST_EINVAL, "start: slot %d outside [0, %d)", q->slot, r->n_slots);
        if (q->n_top < 0 || q->n_top > RUNNER_MAX_TOP)
            return err_set(err, ST_EINVAL, "start: %d top logprobs (at most %d)", q->n_top, RUNNER_MAX_TOP);
        if (r->active[q->slot] && last) sampler_free(&r->samplers[q->slot]);
        r->active[q->slot] = false;
        if (last) {
            if ((rc = sampler_init(&r->samplers[q->slot], &q->sp, r->vocab, err)) < 0) return rc;
            sampler_add_prompt(&r->samplers[q->slot], q->prompt, q->n_prompt);
        }
        r->n_top[q->slot] = q->n_top;
        r->logprobs[q->slot] = q->logprobs || q->n_top > 0;
        r->active[q->slot] = true;
    }
    if (b->n_rows == 0) return ST_OK;
    if (b->n_rows > r->max_batch) return err_set(err, ST_EINVAL, "step of %d rows (at most %d)", b->n_rows, r->max_batch);
    int n_sample = 0;
    for (int i = 0; i < b->n_rows; i++) {
        const struct step_row *row = &b->rows[i];
        if (row->slot < 0 || row->slot >= r->n_slots || !r->active[row->slot])
            return err_set(err, ST_EINVAL, "row %d: slot %d is not an active sequence", i, row->slot);
        r->token[i] = row->token;
        r->pos[i] = row->pos;
        r->slot[i] = row->slot;
        r->want[i] = last && row->sample;
        n_sample += r->want[i];
    }
    if (n_sample > r->max_logits) return err_set(err, ST_EINVAL, "%d rows to sample (at most %d)", n_sample, r->max_logits);
    struct batch eb = {.n = b->n_rows, .token = r->token, .pos = r->pos, .slot = r->slot, .want_logits = r->want};
    if ((rc = engine_forward(r->e, &eb, hidden_in, last ? r->logits : hidden_out, err)) < 0) return rc;
    if (!last) return ST_OK;
    int k = 0;
    for (int i = 0; i < b->n_rows; i++) {
        if (!r->want[i]) continue;
        int s = r->slot[i];
        const float *lg = r->logits + (size_t)k * (size_t)r->vocab;
        struct step_out *o = &outs[k];
        o->slot = s;
        o->n_top = r->n_top[s];
        /* the full-vocabulary logsumexp only when logprobs were asked for */
        double lse = r->logprobs[s] ? sample_logsumexp(lg, r->vocab) : 0.0;
        if (o->n_top > 0) sample_top_logprobs_lse(lg, r->vocab, o->n_top, lse, o->top_ids, o->top_lp);
        memcpy(r->work, lg, sizeof(float) * (size_t)r->vocab);
        o->id = sampler_sample(&r->samplers[s], r->work);
        sampler_accept(&r->samplers[s], o->id);
        o->logprob = r->logprobs[s] ? (float)((double)lg[o->id] - lse) : 0.0f;
        k++;
    }
    *n_out = k;
    return ST_OK;
}

/* ---- local executor ---- */

struct local_exec {
    struct executor base;
    struct runner *r;
    bool pending;
    struct step_result res;
    struct step_out *outs; /* [max_logits] */
};

static int local_submit(struct executor *x, const struct step_batch *b, char *err)
{
    struct local_exec *l = (struct local_exec *)x;
    if (l->pending) return err_set(err, ST_EBUSY, "local executor: one batch at a time");
    int n_out = 0;
    l->res.tag = b->tag;
    l->res.status = runner_step(l->r, b, NULL, NULL, l->outs, &n_out, l->res.err);
    l->res.n_out = l->res.status < 0 ? 0 : n_out;
    l->res.outs = l->outs;
    l->pending = true;
    return ST_OK;
}

static int local_wait(struct executor *x, struct step_result *res, int timeout_ms)
{
    struct local_exec *l = (struct local_exec *)x;
    if (!l->pending) return ST_ETIMEDOUT;
    *res = l->res;
    l->pending = false;
    return ST_OK;
}

static int local_health(struct executor *x, char *why, size_t why_len)
{
    if (why_len) why[0] = 0;
    return 1;
}

static void local_free(struct executor *x)
{
    struct local_exec *l = (struct local_exec *)x;
    free(l->outs);
    free(l);
}

static const struct executor_ops local_ops = {local_submit, local_wait, local_health, local_free};

int executor_local_init(struct executor **out, struct runner *r, char *err)
{
    *out = NULL;
    struct engine *e = r->e;
    if (!engine_is_first(e) || !engine_is_last(e))
        return err_set(err, ST_EINVAL, "local executor needs an engine holding the whole model");
    struct local_exec *l = calloc(1, sizeof(*l));
    if (!l) return err_set(err, ST_ENOMEM, "out of memory");
    const struct engine_opts *o = engine_opts(e);
    l->outs = calloc((size_t)o->max_logits, sizeof(struct step_out));
    if (!l->outs) {
        free(l);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    l->r = r;
    l->base.ops = &local_ops;
    l->base.n_slots = o->n_slots;
    l->base.n_ctx = o->n_ctx;
    l->base.max_batch = o->max_batch;
    l->base.max_logits = o->max_logits;
    l->base.max_inflight = 1;
    l->base.vocab = engine_model(e)->cfg.vocab_size;
    *out = &l->base;
    return ST_OK;
}
