/* Scheduler tests on the stories260K model with the local executor: concurrent requests give exactly what each
 * gives alone (greedy and seeded sampling), cancel, stop, length, queue limit, context overflow. */
#include <pthread.h>

#include "check.h"
#include "core/core.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "model/model.h"
#include "server/sched.h"

struct collector {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int32_t ids[512];
    float lps[512];
    int n;
    int stop_after; /* on_token returns true after this many tokens (0: never) */
    int cancel_after;
    struct sched *s;
    struct gen_request *self;
    bool done;
    enum finish_reason why;
};

static bool on_token(void *ctx, const struct gen_token *t)
{
    struct collector *c = ctx;
    if (c->n < 512) {
        c->ids[c->n] = t->id;
        c->lps[c->n] = t->logprob;
    }
    c->n++;
    if (c->cancel_after && c->n == c->cancel_after) sched_cancel(c->s, c->self);
    return c->stop_after && c->n >= c->stop_after;
}

static void on_done(void *ctx, enum finish_reason why, const char *err)
{
    struct collector *c = ctx;
    pthread_mutex_lock(&c->lock);
    c->done = true;
    c->why = why;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
}

static void wait_done(struct collector *c)
{
    pthread_mutex_lock(&c->lock);
    while (!c->done) pthread_cond_wait(&c->cond, &c->lock);
    pthread_mutex_unlock(&c->lock);
}

struct env {
    struct model m;
    struct engine *e;
    struct runner *r;
    struct executor *x;
    struct sched *s;
};

static int env_init(struct env *v, int n_slots, int max_queue, int max_batch)
{
    char err[ST_ERR_LEN];
    memset(v, 0, sizeof(*v));
    if (model_load(&v->m, fixture_path("models/stories260K"), 0, -1, true, true, err) < 0) goto fail;
    struct engine_opts eo = {.n_slots = n_slots, .n_ctx = 256, .max_batch = max_batch, .max_logits = n_slots};
    if (engine_init(&v->e, &v->m, &eo, err) < 0) goto fail;
    if (runner_init(&v->r, v->e, err) < 0) goto fail;
    if (executor_local_init(&v->x, v->r, err) < 0) goto fail;
    struct sched_opts so = {.max_queue = max_queue, .prefill_chunk = 7, .eos_ids = v->m.cfg.eos_ids, .n_eos = v->m.cfg.n_eos};
    if (sched_init(&v->s, v->x, &so, err) < 0) goto fail;
    return 0;
fail:
    fprintf(stderr, "env: %s\n", err);
    return -1;
}

static void env_free(struct env *v)
{
    sched_free(v->s);
    if (v->x) v->x->ops->free(v->x);
    runner_free(v->r);
    engine_free(v->e);
    model_free(&v->m);
}

static const int32_t prompts[6][8] = {
    {1, 403, 407, 261, 378}, {1, 32, 45, 99, 300, 12}, {1, 7}, {1, 403, 407}, {1, 500, 2, 3, 4, 5, 6, 7}, {1, 250}};
static const int prompt_len[6] = {5, 6, 2, 3, 8, 2};

static void init_req(struct gen_request *r, struct collector *c, int p, float temp, uint64_t seed, int max_tokens)
{
    memset(r, 0, sizeof(*r));
    memset(c, 0, sizeof(*c));
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->cond, NULL);
    r->prompt = prompts[p];
    r->n_prompt = prompt_len[p];
    sample_params_default(&r->sp);
    r->sp.temperature = temp;
    r->sp.seed = seed;
    r->max_tokens = max_tokens;
    r->logprobs = true;
    r->ignore_eos = true;
    r->on_token = on_token;
    r->on_done = on_done;
    r->ctx = c;
    c->self = r;
}

static void concurrent_equals_alone(float temp)
{
    struct env v;
    REQUIRE(env_init(&v, 4, 64, 16) == 0);
    enum { N = 18 };
    struct gen_request solo_r[N], conc_r[N];
    struct collector solo[N], conc[N];
    char err[ST_ERR_LEN];
    for (int i = 0; i < N; i++) {
        init_req(&solo_r[i], &solo[i], i % 6, temp, 1000 + (uint64_t)i, 30 + i);
        REQUIRE_MSG(sched_submit(v.s, &solo_r[i], err) == 0, "%s", err);
        wait_done(&solo[i]);
        CHECK_EQ_INT(solo[i].why, FINISH_LENGTH);
        CHECK_EQ_INT(solo[i].n, 30 + i);
    }
    for (int i = 0; i < N; i++) {
        init_req(&conc_r[i], &conc[i], i % 6, temp, 1000 + (uint64_t)i, 30 + i);
        REQUIRE_MSG(sched_submit(v.s, &conc_r[i], err) == 0, "%s", err);
    }
    for (int i = 0; i < N; i++) {
        wait_done(&conc[i]);
        CHECK_EQ_INT(conc[i].why, FINISH_LENGTH);
        CHECK_EQ_INT(conc[i].n, solo[i].n);
        for (int k = 0; k < solo[i].n && k < conc[i].n; k++) {
            if (conc[i].ids[k] != solo[i].ids[k]) {
                CHECK_MSG(0, "request %d token %d: %d concurrent vs %d alone", i, k, conc[i].ids[k], solo[i].ids[k]);
                break;
            }
            CHECK_NEAR(conc[i].lps[k], solo[i].lps[k], 1e-5);
        }
    }
    struct sched_stats st;
    sched_get_stats(v.s, &st);
    CHECK_EQ_INT(st.requests_total, 2 * N);
    CHECK_EQ_INT(st.requests_finished[FINISH_LENGTH], 2 * N);
    CHECK_EQ_INT(st.active, 0);
    CHECK_EQ_INT(st.queue_depth, 0);
    CHECK(st.steps > 0);
    env_free(&v);
}

static void test_concurrent_greedy(void) { concurrent_equals_alone(0.0f); }
static void test_concurrent_seeded(void) { concurrent_equals_alone(0.9f); }

static void test_stop_cancel_length(void)
{
    struct env v;
    REQUIRE(env_init(&v, 2, 8, 32) == 0);
    char err[ST_ERR_LEN];
    struct gen_request r1, r2, r3;
    struct collector c1, c2, c3;
    init_req(&r1, &c1, 0, 0.0f, 1, 100);
    c1.stop_after = 5;
    init_req(&r2, &c2, 1, 0.0f, 1, 200);
    c2.cancel_after = 3;
    c2.s = v.s;
    init_req(&r3, &c3, 2, 0.0f, 1, 9);
    REQUIRE(sched_submit(v.s, &r1, err) == 0);
    REQUIRE(sched_submit(v.s, &r2, err) == 0);
    REQUIRE(sched_submit(v.s, &r3, err) == 0);
    wait_done(&c1);
    wait_done(&c2);
    wait_done(&c3);
    CHECK_EQ_INT(c1.why, FINISH_STOP);
    CHECK_EQ_INT(c1.n, 5);
    CHECK_EQ_INT(c2.why, FINISH_CANCELLED);
    CHECK(c2.n >= 3 && c2.n <= 4);
    CHECK_EQ_INT(c3.why, FINISH_LENGTH);
    CHECK_EQ_INT(c3.n, 9);
    env_free(&v);
}

static void test_rejects(void)
{
    struct env v;
    REQUIRE(env_init(&v, 1, 1, 32) == 0);
    char err[ST_ERR_LEN];
    struct gen_request r;
    struct collector c;
    init_req(&r, &c, 0, 0.0f, 1, 300);
    CHECK_EQ_INT(sched_submit(v.s, &r, err), ST_ERANGE); /* 5 + 300 > 256 */
    CHECK(strstr(err, "maximum context length is 256") != NULL);
    int32_t bad[2] = {1, 9999};
    r.prompt = bad;
    r.n_prompt = 2;
    r.max_tokens = 4;
    CHECK_EQ_INT(sched_submit(v.s, &r, err), ST_EINVAL);
    r.prompt = prompts[0];
    r.n_prompt = 0;
    CHECK_EQ_INT(sched_submit(v.s, &r, err), ST_EINVAL);
    r.n_prompt = 5;
    r.sp.top_p = 0.0f;
    CHECK_EQ_INT(sched_submit(v.s, &r, err), ST_EINVAL);
    /* queue: 1 slot + 1 waiting; the third must be refused while the first two are pending */
    struct gen_request q[3];
    struct collector qc[3];
    int accepted = 0, busy = 0;
    for (int i = 0; i < 3; i++) {
        init_req(&q[i], &qc[i], 0, 0.0f, 1, 200);
        int rc = sched_submit(v.s, &q[i], err);
        if (rc == 0) accepted++;
        else if (rc == ST_EBUSY) busy++;
        qc[i].done = rc != 0;
    }
    CHECK_EQ_INT(accepted, 2);
    CHECK_EQ_INT(busy, 1);
    for (int i = 0; i < 3; i++)
        if (!qc[i].done) {
            sched_cancel(v.s, &q[i]);
            wait_done(&qc[i]);
            CHECK_EQ_INT(qc[i].why, FINISH_CANCELLED);
        }
    env_free(&v);
}

static void test_shutdown_ends_pending(void)
{
    struct env v;
    REQUIRE(env_init(&v, 1, 4, 32) == 0);
    char err[ST_ERR_LEN];
    struct gen_request r[3];
    struct collector c[3];
    for (int i = 0; i < 3; i++) {
        init_req(&r[i], &c[i], 0, 0.0f, 1, 240);
        REQUIRE(sched_submit(v.s, &r[i], err) == 0);
    }
    env_free(&v); /* every accepted request gets exactly one on_done */
    for (int i = 0; i < 3; i++) CHECK(c[i].done);
}

int main(void)
{
    RUN(test_concurrent_greedy);
    RUN(test_concurrent_seeded);
    RUN(test_stop_cancel_length);
    RUN(test_rejects);
    RUN(test_shutdown_ends_pending);
    return check_done();
}
