/* Pipeline tests with in-process workers on loopback: 1, 2 and 3 stages give exactly the single-node tokens and
 * logprobs on the golden prompts; a worker holding different weights is refused by name; a lost worker fails its
 * requests with a clear error, the coordinator reports it, and serving resumes when the worker returns; links
 * with a secret refuse peers without it. */
#include <jansson.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "cluster/cluster.h"
#include "core/core.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "model/model.h"
#include "server/sched.h"

#define MAX_TOK 80

struct out {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int n;
    int32_t ids[MAX_TOK];
    float lp[MAX_TOK];
    int32_t top_ids[MAX_TOK][20];
    float top_lp[MAX_TOK][20];
    bool done;
    enum finish_reason why;
    char err[ST_ERR_LEN];
};

static bool on_token(void *ctx, const struct gen_token *t)
{
    struct out *o = ctx;
    if (o->n < MAX_TOK) {
        o->ids[o->n] = t->id;
        o->lp[o->n] = t->logprob;
        for (int k = 0; k < t->n_top && k < 20; k++) {
            o->top_ids[o->n][k] = t->top_ids[k];
            o->top_lp[o->n][k] = t->top_lp[k];
        }
    }
    o->n++;
    return false;
}

static void on_done(void *ctx, enum finish_reason why, const char *err)
{
    struct out *o = ctx;
    pthread_mutex_lock(&o->lock);
    o->done = true;
    o->why = why;
    snprintf(o->err, sizeof(o->err), "%s", err ? err : "");
    pthread_cond_signal(&o->cond);
    pthread_mutex_unlock(&o->lock);
}

static bool wait_out(struct out *o, int timeout_s)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += timeout_s;
    pthread_mutex_lock(&o->lock);
    while (!o->done)
        if (pthread_cond_timedwait(&o->cond, &o->lock, &ts) != 0) break;
    bool d = o->done;
    pthread_mutex_unlock(&o->lock);
    return d;
}

struct prompt_set {
    int n;
    int32_t *ids[16];
    int len[16];
    int gen[16];
};

static void load_prompts(const char *goldens, const char *key, struct prompt_set *ps)
{
    memset(ps, 0, sizeof(*ps));
    json_t *root = json_load_file(fixture_path(goldens), 0, NULL);
    if (!root) return;
    const json_t *cases = key ? json_object_get(json_object_get(root, "cases"), key) : json_object_get(root, "cases");
    for (size_t i = 0; i < json_array_size(cases) && ps->n < 16; i++) {
        const json_t *c = json_array_get(cases, i), *p = json_object_get(c, "prompt_ids");
        int n = (int)json_array_size(p);
        ps->ids[ps->n] = malloc(sizeof(int32_t) * (size_t)n);
        for (int k = 0; k < n; k++) ps->ids[ps->n][k] = (int32_t)json_integer_value(json_array_get(p, (size_t)k));
        ps->len[ps->n] = n;
        int g = (int)json_array_size(json_object_get(c, "greedy_ids"));
        ps->gen[ps->n] = g < MAX_TOK ? g : MAX_TOK;
        ps->n++;
    }
    json_decref(root);
}

static void free_prompts(struct prompt_set *ps)
{
    for (int i = 0; i < ps->n; i++) free(ps->ids[i]);
}

/* Runs every prompt concurrently through a scheduler over x; fills outs[i]. */
static void run_all(struct executor *x, const struct model_config *cfg, const struct prompt_set *ps, struct out *outs)
{
    char err[ST_ERR_LEN];
    struct sched *s = NULL;
    struct sched_opts so = {.max_queue = 64, .prefill_chunk = 16, .eos_ids = cfg->eos_ids, .n_eos = cfg->n_eos};
    REQUIRE_MSG(sched_init(&s, x, &so, err) == 0, "%s", err);
    struct gen_request req[16];
    for (int i = 0; i < ps->n; i++) {
        memset(&outs[i], 0, sizeof(outs[i]));
        pthread_mutex_init(&outs[i].lock, NULL);
        pthread_cond_init(&outs[i].cond, NULL);
        memset(&req[i], 0, sizeof(req[i]));
        req[i].prompt = ps->ids[i];
        req[i].n_prompt = ps->len[i];
        sample_params_default(&req[i].sp);
        req[i].sp.temperature = 0;
        req[i].max_tokens = ps->gen[i];
        req[i].n_top = 20;
        req[i].ignore_eos = true;
        req[i].on_token = on_token;
        req[i].on_done = on_done;
        req[i].ctx = &outs[i];
        CHECK_MSG(sched_submit(s, &req[i], err) == 0, "%s", err);
    }
    for (int i = 0; i < ps->n; i++) CHECK_MSG(wait_out(&outs[i], 120), "prompt %d did not finish", i);
    sched_free(s);
}

static void compare(const struct prompt_set *ps, const struct out *a, const struct out *b, const char *what)
{
    for (int i = 0; i < ps->n; i++) {
        CHECK_MSG(a[i].why == FINISH_LENGTH && b[i].why == FINISH_LENGTH, "%s prompt %d: finish %d/%d (%s)", what, i,
                  a[i].why, b[i].why, b[i].err);
        CHECK_MSG(a[i].n == b[i].n, "%s prompt %d: %d vs %d tokens", what, i, a[i].n, b[i].n);
        int n = ST_MIN(ST_MIN(a[i].n, b[i].n), MAX_TOK);
        bool same = memcmp(a[i].ids, b[i].ids, sizeof(int32_t) * (size_t)n) == 0 &&
                    memcmp(a[i].lp, b[i].lp, sizeof(float) * (size_t)n) == 0 &&
                    memcmp(a[i].top_ids, b[i].top_ids, sizeof(a[i].top_ids[0]) * (size_t)n) == 0 &&
                    memcmp(a[i].top_lp, b[i].top_lp, sizeof(a[i].top_lp[0]) * (size_t)n) == 0;
        CHECK_MSG(same, "%s prompt %d: tokens or logprobs differ from the single-node run", what, i);
    }
}

struct cluster_env {
    struct worker *w[4];
    char addr[4][64];
    int n;
};

static int start_workers(struct cluster_env *ce, int n, const char *model_dir, const char *secret)
{
    char err[ST_ERR_LEN];
    memset(ce, 0, sizeof(*ce));
    for (int i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof(name), "w%d", i);
        struct worker_opts wo = {.host = "127.0.0.1", .port = 0, .name = name, .model_dir = model_dir,
                                 .secret = secret, .secret_bytes = secret ? strlen(secret) : 0, .n_threads = 1};
        if (worker_start(&ce->w[i], &wo, err) < 0) {
            fprintf(stderr, "worker: %s\n", err);
            return -1;
        }
        snprintf(ce->addr[i], sizeof(ce->addr[i]), "127.0.0.1:%d", worker_port(ce->w[i]));
        ce->n++;
    }
    return 0;
}

static void stop_workers(struct cluster_env *ce)
{
    for (int i = 0; i < ce->n; i++) worker_stop(ce->w[i]);
    ce->n = 0;
}

static void split_matches_single(const char *model_dir, const char *goldens, const char *key)
{
    char err[ST_ERR_LEN];
    struct prompt_set ps;
    load_prompts(goldens, key, &ps);
    REQUIRE(ps.n > 0);
    struct model m;
    REQUIRE_MSG(model_load(&m, fixture_path(model_dir), 0, -1, true, true, err) == 0, "%s", err);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    /* single node */
    struct engine *e = NULL;
    struct runner *r = NULL;
    struct executor *x = NULL;
    struct engine_opts eo = {.n_slots = 8, .n_ctx = 256, .max_batch = 64, .max_logits = 8};
    eo.backend.n_threads = 1;
    REQUIRE(engine_init(&e, &m, &eo, err) == 0);
    REQUIRE(runner_init(&r, e, err) == 0);
    REQUIRE(executor_local_init(&x, r, err) == 0);
    static struct out single[16], split[16];
    run_all(x, &m.cfg, &ps, single);
    x->ops->free(x);
    runner_free(r);
    engine_free(e);
    /* 1, 2 and 3 stages; with and without a stage in the coordinator */
    struct {
        int workers;
        bool coord;
        const char *layers;
    } shapes[] = {{1, false, NULL}, {1, true, NULL}, {3, false, NULL}, {2, true, "0-0,1-2,3-LAST"}};
    for (size_t k = 0; k < ST_ARRAY_LEN(shapes); k++) {
        struct cluster_env ce;
        REQUIRE(start_workers(&ce, shapes[k].workers, NULL, NULL) == 0);
        char layers[64] = "";
        if (shapes[k].layers) snprintf(layers, sizeof(layers), "0-0,1-2,3-%d", m.cfg.n_layers - 1);
        struct pipeline_opts po = {.model_dir = fixture_path(model_dir), .cfg = &m.cfg, .n_workers = ce.n,
                                   .coordinator_stage = shapes[k].coord, .layers = shapes[k].layers ? layers : NULL,
                                   .n_slots = 8, .n_ctx = 256, .max_batch = 64, .n_threads = 1};
        for (int i = 0; i < ce.n; i++) po.worker_addr[i] = ce.addr[i];
        int rc = pipeline_init(&x, &po, &mf, err);
        CHECK_MSG(rc == 0, "%s", err);
        if (rc == 0) {
            struct pipeline_status st;
            pipeline_get_status(x, &st);
            CHECK_EQ_INT(st.n_stages, shapes[k].workers + shapes[k].coord);
            CHECK(st.healthy);
            run_all(x, &m.cfg, &ps, split);
            char what[128];
            snprintf(what, sizeof(what), "%s, %d stages%s", model_dir, st.n_stages, shapes[k].coord ? " (one local)" : "");
            compare(&ps, single, split, what);
            pipeline_get_status(x, &st);
            for (int i = 0; i < st.n_stages; i++) CHECK(st.st[i].batches > 0 && st.st[i].verified);
            x->ops->free(x);
        }
        stop_workers(&ce);
    }
    manifest_free(&mf);
    model_free(&m);
    free_prompts(&ps);
}

static void test_split_stories(void) { split_matches_single("models/stories260K", "goldens/stories260K.goldens.json", NULL); }
static void test_split_bf16(void) { split_matches_single("models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16"); }
static void test_split_q8(void) { split_matches_single("models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8"); }
static void test_split_q4(void) { split_matches_single("models/kjv-qwen3-21m-4bit", "goldens/kjv-qwen3.goldens.json", "q4"); }

/* Workers without a copy of the model get their slice from the coordinator once and keep it in their cache. */
static void test_weights_sent(void)
{
    char err[ST_ERR_LEN];
    char cache[] = "/tmp/strata-cache-XXXXXX";
    REQUIRE(mkdtemp(cache) != NULL);
    struct prompt_set ps;
    load_prompts("goldens/kjv-qwen3.goldens.json", "q8", &ps);
    REQUIRE(ps.n > 3);
    int n_all = ps.n;
    ps.n = 3;
    struct model m;
    REQUIRE(model_load(&m, fixture_path("models/kjv-qwen3-21m-8bit"), 0, -1, true, true, err) == 0);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    struct engine *e = NULL;
    struct runner *r = NULL;
    struct executor *x = NULL;
    struct engine_opts eo = {.n_slots = 4, .n_ctx = 256, .max_batch = 64, .max_logits = 4};
    eo.backend.n_threads = 1;
    REQUIRE(engine_init(&e, &m, &eo, err) == 0);
    REQUIRE(runner_init(&r, e, err) == 0);
    REQUIRE(executor_local_init(&x, r, err) == 0);
    static struct out single[16], split[16];
    run_all(x, &m.cfg, &ps, single);
    x->ops->free(x);
    runner_free(r);
    engine_free(e);
    for (int round = 0; round < 2; round++) {
        struct worker *w[2];
        char addr[2][64];
        for (int i = 0; i < 2; i++) {
            struct worker_opts wo = {.host = "127.0.0.1", .name = i ? "far-b" : "far-a", .cache_dir = cache, .n_threads = 1};
            REQUIRE_MSG(worker_start(&w[i], &wo, err) == 0, "%s", err);
            snprintf(addr[i], sizeof(addr[i]), "127.0.0.1:%d", worker_port(w[i]));
        }
        struct pipeline_opts po = {.model_dir = fixture_path("models/kjv-qwen3-21m-8bit"), .cfg = &m.cfg, .n_workers = 2,
                                   .send_weights = true, .n_slots = 4, .n_ctx = 256, .max_batch = 64, .n_threads = 1};
        po.worker_addr[0] = addr[0];
        po.worker_addr[1] = addr[1];
        int rc = pipeline_init(&x, &po, &mf, err);
        CHECK_MSG(rc == 0, "round %d: %s", round, err);
        if (rc == 0) {
            run_all(x, &m.cfg, &ps, split);
            compare(&ps, single, split, "weights sent by the coordinator");
            x->ops->free(x);
        }
        for (int i = 0; i < 2; i++) worker_stop(w[i]);
    }
    /* two slices in the cache, each a model directory */
    char cmd[1200];
    snprintf(cmd, sizeof(cmd), "test $(ls -d %s/*/ | wc -l) -eq 2 && ls %s/*/model.safetensors >/dev/null && rm -rf %s", cache, cache, cache);
    CHECK(system(cmd) == 0);
    manifest_free(&mf);
    model_free(&m);
    ps.n = n_all;
    free_prompts(&ps);
}

static int copy_file(const char *from, const char *to)
{
    char *data;
    size_t n;
    if (file_read_all(from, &data, &n, 1u << 30, NULL) < 0) return -1;
    FILE *f = fopen(to, "wb");
    int rc = (f && fwrite(data, 1, n, f) == n) ? 0 : -1;
    if (f) fclose(f);
    free(data);
    return rc;
}

static void test_mismatch_refused(void)
{
    char err[ST_ERR_LEN];
    char dir[] = "/tmp/strata-mismatch-XXXXXX";
    REQUIRE(mkdtemp(dir) != NULL);
    const char *files[] = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"};
    for (size_t i = 0; i < ST_ARRAY_LEN(files); i++) {
        char from[1024], to[1024];
        snprintf(from, sizeof(from), "%s/%s", fixture_path("models/stories260K"), files[i]);
        snprintf(to, sizeof(to), "%s/%s", dir, files[i]);
        REQUIRE(copy_file(from, to) == 0);
    }
    /* change one byte of one tensor in the copy */
    struct safetensors st;
    char path[1024];
    snprintf(path, sizeof(path), "%s/model.safetensors", dir);
    REQUIRE(safetensors_open_file(&st, path, err) == 0);
    const struct st_tensor *t = safetensors_find(&st, "model.layers.3.mlp.up_proj.weight");
    REQUIRE(t != NULL);
    size_t off = (size_t)((const uint8_t *)t->data - (const uint8_t *)st.files[0].map) + 17;
    safetensors_free(&st);
    FILE *f = fopen(path, "r+b");
    REQUIRE(f != NULL);
    fseek(f, (long)off, SEEK_SET);
    int c = fgetc(f);
    fseek(f, (long)off, SEEK_SET);
    fputc(c ^ 0x40, f);
    fclose(f);

    struct model m;
    REQUIRE(model_load(&m, fixture_path("models/stories260K"), 0, -1, true, true, err) == 0);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    struct cluster_env ce;
    REQUIRE(start_workers(&ce, 2, NULL, NULL) == 0);
    worker_stop(ce.w[1]);
    struct worker_opts wo = {.host = "127.0.0.1", .port = 0, .name = "tampered", .model_dir = dir, .n_threads = 1};
    REQUIRE(worker_start(&ce.w[1], &wo, err) == 0);
    snprintf(ce.addr[1], sizeof(ce.addr[1]), "127.0.0.1:%d", worker_port(ce.w[1]));
    struct pipeline_opts po = {.model_dir = fixture_path("models/stories260K"), .cfg = &m.cfg, .n_workers = 2,
                               .n_slots = 2, .n_ctx = 64, .max_batch = 16, .n_threads = 1};
    po.worker_addr[0] = ce.addr[0];
    po.worker_addr[1] = ce.addr[1];
    struct executor *x = NULL;
    int rc = pipeline_init(&x, &po, &mf, err);
    CHECK_EQ_INT(rc, ST_EMISMATCH);
    CHECK_MSG(strstr(err, "tampered") && strstr(err, "model.layers.3.mlp.up_proj.weight") && strstr(err, "(node)") &&
                  strstr(err, "(coordinator)"),
              "message: %s", err);
    if (rc == 0) x->ops->free(x);
    stop_workers(&ce);
    manifest_free(&mf);
    model_free(&m);
    for (size_t i = 0; i < ST_ARRAY_LEN(files); i++) {
        snprintf(path, sizeof(path), "%s/%s", dir, files[i]);
        unlink(path);
    }
    rmdir(dir);
}

static void test_worker_lost_and_back(void)
{
    char err[ST_ERR_LEN];
    struct model m;
    REQUIRE(model_load(&m, fixture_path("models/stories260K"), 0, -1, true, true, err) == 0);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    struct cluster_env ce;
    REQUIRE(start_workers(&ce, 2, NULL, NULL) == 0);
    int port1 = worker_port(ce.w[1]);
    struct pipeline_opts po = {.model_dir = fixture_path("models/stories260K"), .cfg = &m.cfg, .n_workers = 2,
                               .n_slots = 2, .n_ctx = 512, .max_batch = 16, .n_threads = 1, .dead_ms = 1500,
                               .heartbeat_ms = 200};
    po.worker_addr[0] = ce.addr[0];
    po.worker_addr[1] = ce.addr[1];
    struct executor *x = NULL;
    REQUIRE_MSG(pipeline_init(&x, &po, &mf, err) == 0, "%s", err);
    struct sched *s = NULL;
    struct sched_opts so = {.max_queue = 8, .eos_ids = m.cfg.eos_ids, .n_eos = m.cfg.n_eos};
    REQUIRE(sched_init(&s, x, &so, err) == 0);
    static struct out o1, o2;
    memset(&o1, 0, sizeof(o1));
    pthread_mutex_init(&o1.lock, NULL);
    pthread_cond_init(&o1.cond, NULL);
    int32_t prompt[3] = {1, 403, 407};
    struct gen_request r1 = {.prompt = prompt, .n_prompt = 3, .max_tokens = 500, .ignore_eos = true,
                             .on_token = on_token, .on_done = on_done, .ctx = &o1};
    sample_params_default(&r1.sp);
    REQUIRE(sched_submit(s, &r1, err) == 0);
    while (o1.n < 5 && !o1.done) usleep(1000);
    double t0 = time_s();
    worker_stop(ce.w[1]); /* the last stage goes away mid-generation */
    CHECK(wait_out(&o1, 10));
    double detect = time_s() - t0;
    CHECK_EQ_INT(o1.why, FINISH_ERROR);
    CHECK_MSG(strstr(o1.err, "lost") != NULL, "error: %s", o1.err);
    CHECK_MSG(detect < 5.0, "detected after %.1f s", detect);
    char why[512];
    CHECK(sched_health(s, why, sizeof(why)) == 0);
    CHECK(strstr(why, "stage 1") != NULL);
    /* the worker comes back on the same port: the pipeline re-forms without restarting the coordinator */
    struct worker_opts wo = {.host = "127.0.0.1", .port = port1, .name = "w1-again", .n_threads = 1};
    REQUIRE_MSG(worker_start(&ce.w[1], &wo, err) == 0, "%s", err);
    double t1 = time_s();
    while (sched_health(s, why, sizeof(why)) == 0 && time_s() - t1 < 15) usleep(20000);
    CHECK_MSG(sched_health(s, why, sizeof(why)) == 1, "still degraded: %s", why);
    memset(&o2, 0, sizeof(o2));
    pthread_mutex_init(&o2.lock, NULL);
    pthread_cond_init(&o2.cond, NULL);
    struct gen_request r2 = r1;
    r2.max_tokens = 20;
    r2.ctx = &o2;
    REQUIRE(sched_submit(s, &r2, err) == 0);
    CHECK(wait_out(&o2, 20));
    CHECK_EQ_INT(o2.why, FINISH_LENGTH);
    CHECK_EQ_INT(o2.n, 20);
    fprintf(stderr, "  lost worker detected in %.2f s; pipeline re-formed in %.2f s\n", detect, time_s() - t1);
    sched_free(s);
    x->ops->free(x);
    stop_workers(&ce);
    manifest_free(&mf);
    model_free(&m);
}

static void test_secret_required(void)
{
    char err[ST_ERR_LEN];
    struct model m;
    REQUIRE(model_load(&m, fixture_path("models/stories260K"), 0, -1, true, true, err) == 0);
    struct manifest mf;
    REQUIRE(manifest_build(&mf, &m, err) == 0);
    struct cluster_env ce;
    REQUIRE(start_workers(&ce, 1, NULL, "s3cret-cluster") == 0);
    struct pipeline_opts po = {.model_dir = fixture_path("models/stories260K"), .cfg = &m.cfg, .n_workers = 1,
                               .n_slots = 2, .n_ctx = 64, .max_batch = 16, .n_threads = 1, .connect_timeout_ms = 2000};
    po.worker_addr[0] = ce.addr[0];
    struct executor *x = NULL;
    int rc = pipeline_init(&x, &po, &mf, err);
    CHECK(rc < 0);
    CHECK_MSG(strstr(err, "secret") || strstr(err, "auth"), "message: %s", err);
    po.secret = "wrong";
    po.secret_bytes = 5;
    rc = pipeline_init(&x, &po, &mf, err);
    CHECK(rc < 0);
    po.secret = "s3cret-cluster";
    po.secret_bytes = strlen(po.secret);
    rc = pipeline_init(&x, &po, &mf, err);
    CHECK_MSG(rc == 0, "%s", err);
    if (rc == 0) x->ops->free(x);
    stop_workers(&ce);
    manifest_free(&mf);
    model_free(&m);
}

int main(void)
{
    RUN(test_split_stories);
    RUN(test_split_bf16);
    RUN(test_split_q8);
    RUN(test_split_q4);
    RUN(test_weights_sent);
    RUN(test_mismatch_refused);
    RUN(test_worker_lost_and_back);
    RUN(test_secret_required);
    return check_done();
}
