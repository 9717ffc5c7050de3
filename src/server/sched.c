/* sched: continuous batching over an executor, on one thread.
 *
 * Loop: take new requests -> drop cancelled ones -> admit waiting requests into free slots -> while the executor
 * has room, submit a micro-batch (decode rows first, then prefill chunks, within the batch budget) -> wait for a
 * finished batch and hand out its tokens. A sequence is in at most one in-flight batch. */
#include "server/sched.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static const char *finish_names[FINISH_COUNT] = {"stop", "length", "cancelled", "error"};
const char *finish_reason_name(enum finish_reason r) { return (r >= 0 && r < FINISH_COUNT) ? finish_names[r] : "?"; }

struct seq {
    struct gen_request *req; /* NULL: slot free */
    int n_fed;               /* prompt tokens forwarded (or in flight) */
    int pos;                 /* next position to write */
    int32_t next_token;      /* decode input */
    bool decoding, inflight, need_start, finishing;
    enum finish_reason why;
    uint64_t t_last_ns;
};

struct inflight {
    bool used;
    uint64_t tag;
    int n_slots;
    int32_t *slots;   /* slots with rows in this batch */
    int32_t *n_rows;  /* rows per slot */
};

struct sched {
    struct executor *x;
    struct sched_opts o;
    int32_t eos[MODEL_MAX_EOS];
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t wake;
    bool stop;
    struct gen_request *incoming_head, *incoming_tail; /* under lock */
    int n_incoming;
    /* scheduler thread only */
    struct gen_request *wait_head, *wait_tail;
    int n_waiting;
    struct seq *seqs;          /* [n_slots] */
    int32_t *frees;            /* [n_slots] slots to free in the next batch */
    int n_frees;
    struct inflight *fl;       /* [max_inflight] */
    int n_inflight;
    uint64_t next_tag;
    struct step_row *rows;     /* [max_batch] */
    struct step_seq *starts;   /* [n_slots] */
    int32_t *batch_slots, *batch_rows;
    struct sched_stats st;     /* under lock */
};

static void stats_lock(struct sched *s) { pthread_mutex_lock(&s->lock); }
static void stats_unlock(struct sched *s) { pthread_mutex_unlock(&s->lock); }

static void finish(struct sched *s, int slot, enum finish_reason why, const char *err)
{
    struct seq *q = &s->seqs[slot];
    struct gen_request *r = q->req;
    ST_ASSERT(r && !q->inflight);
    memset(q, 0, sizeof(*q));
    s->frees[s->n_frees++] = slot;
    stats_lock(s);
    s->st.requests_finished[why]++;
    s->st.active--;
    stats_unlock(s);
    r->on_done(r->ctx, why, err);
}

/* Ends a request that never got a slot. */
static void finish_waiting(struct sched *s, struct gen_request *r, enum finish_reason why, const char *err)
{
    stats_lock(s);
    s->st.requests_finished[why]++;
    s->st.queue_depth--;
    stats_unlock(s);
    r->on_done(r->ctx, why, err);
}

static bool is_eos(const struct sched *s, int32_t id)
{
    for (int i = 0; i < s->o.n_eos; i++)
        if (s->eos[i] == id) return true;
    return false;
}

static void take_incoming(struct sched *s)
{
    pthread_mutex_lock(&s->lock);
    struct gen_request *h = s->incoming_head;
    s->incoming_head = s->incoming_tail = NULL;
    s->n_incoming = 0;
    pthread_mutex_unlock(&s->lock);
    while (h) {
        struct gen_request *n = h->next;
        h->next = NULL;
        if (s->wait_tail) s->wait_tail->next = h;
        else s->wait_head = h;
        s->wait_tail = h;
        s->n_waiting++;
        h = n;
    }
}

static void handle_cancels(struct sched *s)
{
    struct gen_request **pp = &s->wait_head, *prev = NULL;
    while (*pp) {
        struct gen_request *r = *pp;
        if (atomic_load(&r->cancel)) {
            *pp = r->next;
            if (s->wait_tail == r) s->wait_tail = prev;
            s->n_waiting--;
            finish_waiting(s, r, FINISH_CANCELLED, NULL);
            continue;
        }
        prev = r;
        pp = &r->next;
    }
    for (int i = 0; i < s->x->n_slots; i++) {
        struct seq *q = &s->seqs[i];
        if (!q->req) continue;
        if (atomic_load(&q->req->cancel) && !q->finishing) {
            q->finishing = true;
            q->why = FINISH_CANCELLED;
        }
        if (q->finishing && !q->inflight) finish(s, i, q->why, NULL);
    }
}

static void admit(struct sched *s)
{
    for (int i = 0; i < s->x->n_slots && s->wait_head; i++) {
        if (s->seqs[i].req) continue;
        struct gen_request *r = s->wait_head;
        s->wait_head = r->next;
        if (!s->wait_head) s->wait_tail = NULL;
        r->next = NULL;
        s->n_waiting--;
        struct seq *q = &s->seqs[i];
        memset(q, 0, sizeof(*q));
        q->req = r;
        q->need_start = true;
        r->slot = i;
        stats_lock(s);
        s->st.queue_depth--;
        s->st.active++;
        stats_unlock(s);
    }
}

/* Builds and submits one micro-batch from the sequences not in flight. Returns true when submitted. */
static bool submit_batch(struct sched *s)
{
    struct executor *x = s->x;
    int budget = x->max_batch, n_rows = 0, n_starts = 0, n_bs = 0, n_sample = 0;
    int n_live = 0;
    for (int i = 0; i < x->n_slots; i++)
        if (s->seqs[i].req && !s->seqs[i].finishing) n_live++;
    /* spread decoding sequences over the micro-batches the executor can overlap */
    int decode_cap = x->max_inflight > 1 ? (n_live + x->max_inflight - 1) / x->max_inflight : x->n_slots;
    int chunk = s->o.prefill_chunk > 0 ? s->o.prefill_chunk : budget;
    int n_decode = 0;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < x->n_slots && budget > 0; i++) {
            struct seq *q = &s->seqs[i];
            if (!q->req || q->inflight || q->finishing) continue;
            int added = 0;
            if (pass == 0 && q->decoding) {
                if (n_decode >= decode_cap || n_sample >= x->max_logits) continue;
                s->rows[n_rows++] = (struct step_row){q->next_token, q->pos, i, 1};
                added = 1;
                n_decode++;
                n_sample++;
            } else if (pass == 1 && !q->decoding) {
                struct gen_request *r = q->req;
                int left = r->n_prompt - q->n_fed, take = ST_MIN(ST_MIN(left, chunk), budget);
                if (take <= 0) continue;
                bool last = take == left;
                if (last && n_sample >= x->max_logits) continue;
                for (int k = 0; k < take; k++)
                    s->rows[n_rows++] = (struct step_row){r->prompt[q->n_fed + k], q->pos + k, i, (uint8_t)(last && k == take - 1)};
                added = take;
                n_sample += last;
            }
            if (added) {
                budget -= added;
                s->batch_slots[n_bs] = i;
                s->batch_rows[n_bs++] = added;
            }
        }
    }
    /* starts for sequences admitted since the last batch (sent even if they got no rows yet) */
    for (int i = 0; i < x->n_slots; i++) {
        struct seq *q = &s->seqs[i];
        if (!q->req || !q->need_start) continue;
        s->starts[n_starts++] = (struct step_seq){.slot = i, .sp = q->req->sp, .n_top = q->req->n_top,
                                                  .logprobs = q->req->logprobs, .n_prompt = q->req->n_prompt,
                                                  .prompt = q->req->prompt};
    }
    if (n_rows == 0 && n_starts == 0 && s->n_frees == 0) return false;
    struct inflight *f = NULL;
    for (int k = 0; k < x->max_inflight; k++)
        if (!s->fl[k].used) f = &s->fl[k];
    ST_ASSERT(f != NULL);
    struct step_batch b = {.tag = ++s->next_tag, .n_rows = n_rows, .rows = s->rows, .n_start = n_starts,
                           .starts = s->starts, .n_free = s->n_frees, .frees = s->frees};
    char err[ST_ERR_LEN] = "";
    int rc = x->ops->submit(x, &b, err);
    if (rc < 0) {
        /* the executor refused the batch: fail the sequences it carried */
        LOGE("sched", "submit failed: %s", err);
        for (int k = 0; k < n_bs; k++) {
            struct seq *q = &s->seqs[s->batch_slots[k]];
            q->finishing = true;
            q->why = FINISH_ERROR;
            finish(s, s->batch_slots[k], FINISH_ERROR, err);
        }
        return false;
    }
    for (int i = 0; i < n_starts; i++) s->seqs[s->starts[i].slot].need_start = false;
    s->n_frees = 0;
    f->used = true;
    f->tag = b.tag;
    f->n_slots = n_bs;
    for (int k = 0; k < n_bs; k++) {
        f->slots[k] = s->batch_slots[k];
        f->n_rows[k] = s->batch_rows[k];
        struct seq *q = &s->seqs[s->batch_slots[k]];
        q->inflight = true;
        if (!q->decoding) q->n_fed += s->batch_rows[k];
        q->pos += s->batch_rows[k];
    }
    s->n_inflight++;
    stats_lock(s);
    s->st.steps++;
    s->st.step_rows += (uint64_t)n_rows;
    stats_unlock(s);
    return true;
}

static void on_result(struct sched *s, const struct step_result *res)
{
    struct inflight *f = NULL;
    for (int k = 0; k < s->x->max_inflight; k++)
        if (s->fl[k].used && s->fl[k].tag == res->tag) f = &s->fl[k];
    if (!f) {
        LOGE("sched", "result for unknown batch %llu ignored", (unsigned long long)res->tag);
        return;
    }
    f->used = false;
    s->n_inflight--;
    for (int k = 0; k < f->n_slots; k++) s->seqs[f->slots[k]].inflight = false;
    if (res->status < 0) {
        LOGE("sched", "batch %llu failed: %s", (unsigned long long)res->tag, res->err);
        for (int k = 0; k < f->n_slots; k++) {
            struct seq *q = &s->seqs[f->slots[k]];
            if (q->req) finish(s, f->slots[k], FINISH_ERROR, res->err[0] ? res->err : "pipeline failure");
        }
        return;
    }
    uint64_t now = time_ns();
    int n_gen = 0;
    for (int i = 0; i < res->n_out; i++) {
        const struct step_out *o = &res->outs[i];
        if (o->slot < 0 || o->slot >= s->x->n_slots || !s->seqs[o->slot].req) continue;
        struct seq *q = &s->seqs[o->slot];
        struct gen_request *r = q->req;
        if (q->finishing) continue;
        r->n_generated++;
        n_gen++;
        stats_lock(s);
        if (r->n_generated == 1) {
            r->t_first_ns = now;
            s->st.ttft_sum_s += (double)(now - r->t_submit_ns) * 1e-9;
            s->st.ttft_count++;
        } else {
            s->st.itl_sum_s += (double)(now - q->t_last_ns) * 1e-9;
            s->st.itl_count++;
        }
        stats_unlock(s);
        q->t_last_ns = now;
        q->decoding = true;
        q->next_token = o->id;
        if (!r->ignore_eos && is_eos(s, o->id)) {
            q->finishing = true;
            q->why = FINISH_STOP;
            continue;
        }
        struct gen_token t = {o->id, o->logprob, o->n_top, o->top_ids, o->top_lp};
        bool stop = r->on_token(r->ctx, &t);
        if (stop) {
            q->finishing = true;
            q->why = FINISH_STOP;
        } else if (r->n_generated >= r->max_tokens || q->pos >= s->x->n_ctx) {
            q->finishing = true;
            q->why = FINISH_LENGTH;
        }
    }
    stats_lock(s);
    s->st.generated_tokens += (uint64_t)n_gen;
    stats_unlock(s);
    for (int k = 0; k < f->n_slots; k++) {
        struct seq *q = &s->seqs[f->slots[k]];
        if (q->req && q->finishing) finish(s, f->slots[k], q->why, NULL);
    }
}

static void *sched_main(void *arg)
{
    struct sched *s = arg;
    struct executor *x = s->x;
    for (;;) {
        pthread_mutex_lock(&s->lock);
        bool stop = s->stop;
        pthread_mutex_unlock(&s->lock);
        if (stop) break;
        take_incoming(s);
        handle_cancels(s);
        admit(s);
        bool submitted = false;
        double t0 = time_s();
        while (s->n_inflight < x->max_inflight && submit_batch(s)) submitted = true;
        if (s->n_inflight > 0) {
            struct step_result res;
            int rc = x->ops->wait(x, &res, 20);
            if (rc == ST_OK) on_result(s, &res);
            stats_lock(s);
            s->st.busy_s += time_s() - t0;
            stats_unlock(s);
            continue;
        }
        if (submitted) continue;
        /* idle: sleep until a request arrives (or a cancel needs a look) */
        pthread_mutex_lock(&s->lock);
        if (!s->incoming_head && !s->stop) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 50 * 1000000L;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&s->wake, &s->lock, &ts);
        }
        pthread_mutex_unlock(&s->lock);
    }
    /* shutdown: drain in-flight batches, then end everything */
    while (s->n_inflight > 0) {
        struct step_result res;
        if (x->ops->wait(x, &res, 1000) == ST_OK) on_result(s, &res);
        else break;
    }
    take_incoming(s);
    for (int i = 0; i < x->n_slots; i++)
        if (s->seqs[i].req) {
            s->seqs[i].inflight = false;
            finish(s, i, FINISH_CANCELLED, "server shutting down");
        }
    while (s->wait_head) {
        struct gen_request *r = s->wait_head;
        s->wait_head = r->next;
        finish_waiting(s, r, FINISH_CANCELLED, "server shutting down");
    }
    return NULL;
}

int sched_init(struct sched **out, struct executor *x, const struct sched_opts *o, char *err)
{
    *out = NULL;
    struct sched *s = calloc(1, sizeof(*s));
    if (!s) return err_set(err, ST_ENOMEM, "sched: out of memory");
    s->x = x;
    s->o = *o;
    if (s->o.max_queue < 0) s->o.max_queue = 0;
    if (s->o.n_eos > MODEL_MAX_EOS) s->o.n_eos = MODEL_MAX_EOS;
    for (int i = 0; i < s->o.n_eos; i++) s->eos[i] = o->eos_ids[i];
    s->o.eos_ids = s->eos;
    int n = x->n_slots, m = x->max_inflight;
    s->seqs = calloc((size_t)n, sizeof(*s->seqs));
    s->frees = calloc((size_t)n * 2, sizeof(int32_t));
    s->fl = calloc((size_t)m, sizeof(*s->fl));
    s->rows = calloc((size_t)x->max_batch, sizeof(*s->rows));
    s->starts = calloc((size_t)n, sizeof(*s->starts));
    s->batch_slots = calloc((size_t)n, sizeof(int32_t));
    s->batch_rows = calloc((size_t)n, sizeof(int32_t));
    bool ok = s->seqs && s->frees && s->fl && s->rows && s->starts && s->batch_slots && s->batch_rows;
    for (int k = 0; ok && k < m; k++) {
        s->fl[k].slots = calloc((size_t)n, sizeof(int32_t));
        s->fl[k].n_rows = calloc((size_t)n, sizeof(int32_t));
        ok = s->fl[k].slots && s->fl[k].n_rows;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->wake, NULL);
    if (!ok || pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        s->thread = 0;
        sched_free(s);
        return err_set(err, ST_ENOMEM, "sched: cannot start");
    }
    *out = s;
    return ST_OK;
}

void sched_free(struct sched *s)
{
    if (!s) return;
    if (s->thread) {
        pthread_mutex_lock(&s->lock);
        s->stop = true;
        pthread_cond_signal(&s->wake);
        pthread_mutex_unlock(&s->lock);
        pthread_join(s->thread, NULL);
    }
    for (int k = 0; s->fl && k < s->x->max_inflight; k++) {
        free(s->fl[k].slots);
        free(s->fl[k].n_rows);
    }
    free(s->fl);
    free(s->seqs);
    free(s->frees);
    free(s->rows);
    free(s->starts);
    free(s->batch_slots);
    free(s->batch_rows);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->wake);
    free(s);
}

int sched_submit(struct sched *s, struct gen_request *r, char *err)
{
    char perr[ST_ERR_LEN];
    if (!r->on_token || !r->on_done) return err_set(err, ST_EINVAL, "request without callbacks");
    if (r->n_prompt < 1) return err_set(err, ST_EINVAL, "the prompt is empty");
    if (r->max_tokens < 1) return err_set(err, ST_EINVAL, "max_tokens must be at least 1");
    if (r->n_top < 0 || r->n_top > RUNNER_MAX_TOP)
        return err_set(err, ST_EINVAL, "top logprobs must be between 0 and %d", RUNNER_MAX_TOP);
    for (int i = 0; i < r->n_prompt; i++)
        if (r->prompt[i] < 0 || r->prompt[i] >= s->x->vocab)
            return err_set(err, ST_EINVAL, "token id %d outside the vocabulary of %d", r->prompt[i], s->x->vocab);
    if (sample_params_check(&r->sp, s->x->vocab, perr) < 0) return err_set(err, ST_EINVAL, "%s", perr);
    if ((int64_t)r->n_prompt + r->max_tokens > s->x->n_ctx)
        return err_set(err, ST_ERANGE,
                       "This model's maximum context length is %d tokens. However, you requested %lld tokens (%d in "
                       "the messages, %d in the completion). Please reduce the length of the messages or completion.",
                       s->x->n_ctx, (long long)r->n_prompt + r->max_tokens, r->n_prompt, r->max_tokens);
    atomic_store(&r->cancel, 0);
    r->slot = -1;
    r->n_generated = 0;
    r->t_submit_ns = time_ns();
    r->t_first_ns = 0;
    r->next = NULL;
    pthread_mutex_lock(&s->lock);
    int waiting = s->st.queue_depth;
    int free_slots = s->x->n_slots - s->st.active;
    if (waiting - free_slots >= s->o.max_queue) {
        pthread_mutex_unlock(&s->lock);
        return err_set(err, ST_EBUSY, "too many requests queued (%d waiting); try again later", waiting);
    }
    if (s->incoming_tail) s->incoming_tail->next = r;
    else s->incoming_head = r;
    s->incoming_tail = r;
    s->n_incoming++;
    s->st.queue_depth++;
    s->st.requests_total++;
    s->st.prompt_tokens += (uint64_t)r->n_prompt;
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
    return ST_OK;
}

void sched_cancel(struct sched *s, struct gen_request *r)
{
    atomic_store(&r->cancel, 1);
    pthread_mutex_lock(&s->lock);
    pthread_cond_signal(&s->wake);
    pthread_mutex_unlock(&s->lock);
}

void sched_get_stats(struct sched *s, struct sched_stats *st)
{
    pthread_mutex_lock(&s->lock);
    *st = s->st;
    pthread_mutex_unlock(&s->lock);
}

int sched_health(struct sched *s, char *why, size_t why_len) { return s->x->ops->health(s->x, why, why_len); }
int sched_n_ctx(const struct sched *s) { return s->x->n_ctx; }
int sched_n_slots(const struct sched *s) { return s->x->n_slots; }
