/* strata serve: the OpenAI-compatible HTTP server on one node.
 *
 * model -> engine -> runner -> executor -> scheduler -> HTTP server. serve_build_executor is the one place that
 * decides where step batches run (here: a local executor over the whole model); a pipeline of workers plugs in
 * there. SIGINT/SIGTERM stop the server cleanly: in-flight requests get an error, slots are freed, exit 0. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <unistd.h>

#include "cli/cli.h"
#include "cluster/cluster.h"
#include "core/core.h"
#include "engine/engine.h"
#include "engine/runner.h"
#include "model/model.h"
#include "server/sched.h"
#include "server/server.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata serve [-m MODEL_DIR] [options]\n"
            "\n"
            "Serves an OpenAI-compatible API: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize;\n"
            "GET /v1/models, /health, /metrics (Prometheus).\n"
            "\n"
            "model:\n"
            "  -m, --model DIR        model directory (default: the bundled %s)\n"
            "  --model-name NAME      the name clients use (default: the model directory's base name)\n"
            "  --random-weights       generated weights instead of a model directory; needs --config\n"
            "  --config FILE          config.json for --random-weights (tokenizer from -m DIR when present)\n"
            "  --bits B               0 (bf16), 4 or 8 for --random-weights (default 8)\n"
            "engine:\n"
            "  --parallel N           KV cache slots: sequences generated at once (default 16)\n"
            "  --ctx N                tokens per slot (default min(2048, the model's maximum))\n"
            "  --batch N              most tokens per step, prefill chunk (default 256)\n"
            "  --queue N              requests waiting beyond the slots before 429 (default 64)\n"
            "  --threads N            CPU threads (default: all cores)\n"
            "  --device D             cpu (default), cuda, cuda:N\n"
            "cluster (pipeline parallel over workers started with `strata worker`):\n"
            "  --worker HOST:PORT     a pipeline stage, in chain order (repeat for each worker)\n"
            "  --layers A-B,C-D,...   layers per stage, inclusive, in chain order (default: proportional to each\n"
            "                         node's free memory)\n"
            "  --coordinator-only     run no layers here (default: this node is the first stage)\n"
            "  --secret-file FILE     shared cluster secret (or env STRATA_CLUSTER_SECRET): authenticated links\n"
            "  --send-weights         send each worker its slice of the weights (kept in its cache) instead of\n"
            "                         relying on -m on the workers or a shared path\n"
            "  --dead-ms N            a stage silent this long is declared lost (default 3000)\n"
            "http:\n"
            "  --host ADDR            bind address (default 127.0.0.1)\n"
            "  --port N               port (default 8100; 0: any free port, logged at start)\n"
            "  --api-key KEY          require \"Authorization: Bearer KEY\" (default: env STRATA_API_KEY);\n"
            "  --api-key-file FILE    the same, read from a file\n"
            "                         /health and /metrics stay open\n"
            "  --max-body BYTES       largest request body (default 4194304)\n"
            "  --max-connections N    open connections at most (default 256)\n"
            "  --timeout S            close connections idle for S seconds (default 60)\n"
            "  --log-level L          debug, info (default), warn, error, off\n",
            cli_default_model());
}

struct serve_opts {
    const char *model_dir, *model_name, *config, *device, *host, *api_key, *api_key_file;
    bool random_weights;
    long bits, parallel, ctx, batch, queue, threads, port, max_body, max_conn, timeout;
    /* cluster */
    const char *workers[CLUSTER_MAX_STAGES];
    int n_workers;
    const char *layers, *secret_file;
    bool coordinator_only, send_weights;
    long dead_ms;
};

/* Where step batches run. Built by serve_build_executor; everything the executor borrows lives here. */
struct serve_backend {
    struct model model;
    bool have_model;
    bool pipeline;           /* x is a pipeline executor over workers */
    struct manifest mf;      /* pipeline: what every stage is checked against */
    char *secret;
    size_t secret_len;
    char *config_text;       /* random weights: config.json sent to workers */
    struct engine *engine;
    struct runner *runner;
    struct executor *x;
    struct model_config cfg; /* of the whole model (vocab, eos ids, max_seq_len) */
};

static void serve_backend_free(struct serve_backend *b)
{
    if (b->x) b->x->ops->free(b->x);
    manifest_free(&b->mf);
    free(b->secret);
    free(b->config_text);
    runner_free(b->runner);
    engine_free(b->engine);
    if (b->have_model) model_free(&b->model);
    memset(b, 0, sizeof(*b));
}

#define RANDOM_SEED 1234

/* The coordinator of a pipeline: the manifest every stage must match, then the pipeline executor. The
 * coordinator itself only maps the weights (to hash them); its own stage, if any, loads them in-process. */
static int serve_build_pipeline(const struct serve_opts *o, struct serve_backend *b, char *err)
{
    int rc;
    if (o->random_weights) {
        size_t len;
        if ((rc = file_read_all(o->config, &b->config_text, &len, 1 << 20, err)) < 0) return rc;
        if ((rc = model_config_parse(&b->cfg, b->config_text, len, err)) < 0) return err_prefix(err, rc, "%s", o->config);
        LOGI("serve", "hashing the generated weights (one layer at a time)");
        if ((rc = manifest_build_random(&b->mf, &b->cfg, (int)o->bits, RANDOM_SEED, err)) < 0) return rc;
    } else {
        if ((rc = model_load(&b->model, o->model_dir, 0, -1, true, true, err)) < 0) return rc;
        b->have_model = true;
        b->cfg = b->model.cfg;
        if ((rc = manifest_build(&b->mf, &b->model, err)) < 0) return rc;
    }
    if (cli_read_secret("serve", o->secret_file, &b->secret, &b->secret_len) < 0)
        return err_set(err, ST_EINVAL, "cannot read the cluster secret");
    struct pipeline_opts po = {.model_dir = o->random_weights ? NULL : o->model_dir, .cfg = &b->cfg,
                               .random_config_json = b->config_text, .random_bits = (int)o->bits,
                               .random_seed = RANDOM_SEED, .n_workers = o->n_workers,
                               .coordinator_stage = !o->coordinator_only, .send_weights = o->send_weights,
                               .layers = o->layers, .n_slots = (int)o->parallel, .n_ctx = (int)o->ctx,
                               .max_batch = (int)o->batch, .device = o->device, .n_threads = (int)o->threads,
                               .secret = b->secret, .secret_bytes = b->secret_len, .dead_ms = (int)o->dead_ms};
    if (po.n_ctx == 0) po.n_ctx = ST_MIN(2048, b->cfg.max_seq_len);
    if (po.n_ctx > b->cfg.max_seq_len)
        return err_set(err, ST_EINVAL, "--ctx %d is beyond the model's maximum of %d", po.n_ctx, b->cfg.max_seq_len);
    for (int i = 0; i < o->n_workers; i++) po.worker_addr[i] = o->workers[i];
    if ((rc = pipeline_init(&b->x, &po, &b->mf, err)) < 0) return rc;
    b->pipeline = true;
    return ST_OK;
}

/* Loads the model and builds the executor: a local one over the whole model on this node's device, or a
 * pipeline over workers when --worker is given. */
static int serve_build_executor(const struct serve_opts *o, struct serve_backend *b, char *err)
{
    int rc;
    memset(b, 0, sizeof(*b));
    if (o->n_workers > 0) {
        if ((rc = serve_build_pipeline(o, b, err)) < 0) serve_backend_free(b);
        return rc;
    }
    if (o->random_weights) {
        struct model_config cfg;
        char *text = NULL;
        size_t len;
        if ((rc = file_read_all(o->config, &text, &len, 1 << 20, err)) < 0) return rc;
        rc = model_config_parse(&cfg, text, len, err);
        free(text);
        if (rc < 0) return err_prefix(err, rc, "%s", o->config);
        rc = model_init_random(&b->model, &cfg, (int)o->bits, RANDOM_SEED, 0, -1, true, true, err);
    } else {
        rc = model_load(&b->model, o->model_dir, 0, -1, true, true, err);
    }
    if (rc < 0) return rc;
    b->have_model = true;
    b->cfg = b->model.cfg;
    struct engine_opts eo = {.n_slots = (int)o->parallel, .n_ctx = (int)o->ctx, .max_batch = (int)o->batch,
                             .max_logits = (int)o->parallel};
    if (eo.n_ctx == 0) eo.n_ctx = ST_MIN(2048, b->cfg.max_seq_len);
    if (eo.n_ctx > b->cfg.max_seq_len) {
        rc = err_set(err, ST_EINVAL, "--ctx %d is beyond the model's maximum of %d", eo.n_ctx, b->cfg.max_seq_len);
        goto fail;
    }
    if ((rc = backend_parse_device(o->device, &eo.backend.kind, &eo.backend.device, err)) < 0) goto fail;
    eo.backend.n_threads = (int)o->threads;
    if ((rc = engine_init(&b->engine, &b->model, &eo, err)) < 0) goto fail;
    if ((rc = runner_init(&b->runner, b->engine, err)) < 0) goto fail;
    if ((rc = executor_local_init(&b->x, b->runner, err)) < 0) goto fail;
    return ST_OK;
fail:
    serve_backend_free(b);
    return rc;
}

/* ---- the node / cluster view (GET /v1/cluster, stage metrics) ---- */

struct status_ctx {
    struct serve_backend *b;
    struct sched *s;
    const char *model_name, *host;
    int port;
    pthread_mutex_t lock;
    double last_t;
    uint64_t last_tokens;
    double rate; /* generated tokens/s over the last interval of at least one second */
};

static double status_rate(struct status_ctx *c)
{
    struct sched_stats st;
    sched_get_stats(c->s, &st);
    pthread_mutex_lock(&c->lock);
    double now = time_s();
    if (c->last_t == 0) {
        c->last_t = now;
        c->last_tokens = st.generated_tokens;
    } else if (now - c->last_t >= 1.0) {
        c->rate = (double)(st.generated_tokens - c->last_tokens) / (now - c->last_t);
        c->last_t = now;
        c->last_tokens = st.generated_tokens;
    }
    double r = c->rate;
    pthread_mutex_unlock(&c->lock);
    return r;
}

static json_t *node_json(const struct node_info *ni, const char *addr, const char *role, int first, int last)
{
    json_t *n = json_object();
    json_object_set_new(n, "name", json_string(ni->name));
    json_object_set_new(n, "address", json_string(addr));
    json_object_set_new(n, "role", json_string(role));
    json_t *l = json_array();
    json_array_append_new(l, json_integer(first));
    json_array_append_new(l, json_integer(last));
    json_object_set_new(n, "layers", l);
    json_object_set_new(n, "device", json_string(ni->device));
    json_object_set_new(n, "cpu", json_string(ni->cpu));
    json_object_set_new(n, "cores", json_integer(ni->cores));
    json_object_set_new(n, "mem_total_bytes", json_integer((json_int_t)ni->mem_total_bytes));
    json_object_set_new(n, "mem_free_bytes", json_integer((json_int_t)ni->mem_free_bytes));
    json_object_set_new(n, "dev_total_bytes", json_integer((json_int_t)ni->dev_total_bytes));
    json_object_set_new(n, "dev_free_bytes", json_integer((json_int_t)ni->dev_free_bytes));
    return n;
}

static json_t *status_json(void *arg)
{
    struct status_ctx *c = arg;
    struct serve_backend *b = c->b;
    char why[512] = "";
    double rate = status_rate(c);
    struct sched_stats st;
    sched_get_stats(c->s, &st);
    json_t *o = json_object(), *nodes = json_array(), *co = json_object(), *tp = json_object();
    int healthy = sched_health(c->s, why, sizeof(why));
    json_object_set_new(o, "model", json_string(c->model_name));
    json_object_set_new(o, "healthy", json_boolean(healthy == 1));
    json_object_set_new(o, "reason", json_string(why));
    json_object_set_new(o, "n_layers", json_integer(b->cfg.n_layers));
    json_object_set_new(co, "host", json_string(c->host));
    json_object_set_new(co, "port", json_integer(c->port));
    json_object_set_new(co, "pid", json_integer((json_int_t)getpid()));
    json_object_set_new(o, "coordinator", co);
    if (b->pipeline) {
        struct pipeline_status *ps = malloc(sizeof(*ps));
        if (!ps) {
            json_decref(o);
            json_decref(nodes);
            json_decref(tp);
            return NULL;
        }
        pipeline_get_status(b->x, ps);
        json_object_set_new(o, "epoch", json_integer((json_int_t)ps->epoch));
        json_object_set_new(o, "reforms", json_integer((json_int_t)ps->reforms));
        for (int i = 0; i < ps->n_stages; i++) {
            const struct stage_status *ss = &ps->st[i];
            bool local = strstr(ss->addr, "(this process)") != NULL;
            json_t *n = node_json(&ss->info, ss->addr, local ? "coordinator-stage" : "worker", ss->layer_begin,
                                  ss->layer_end - 1);
            json_object_set_new(n, "verified", json_boolean(ss->verified));
            json_object_set_new(n, "connected", json_boolean(ss->connected));
            json_object_set_new(n, "last_heartbeat_s", json_real(ss->last_heard_s));
            json_object_set_new(n, "rtt_ms", json_real(ss->rtt_ms));
            json_object_set_new(n, "bytes_sent", json_integer((json_int_t)ss->bytes_sent));
            json_object_set_new(n, "bytes_recv", json_integer((json_int_t)ss->bytes_recv));
            json_object_set_new(n, "compute_s", json_real(ss->compute_s));
            json_object_set_new(n, "batches", json_integer((json_int_t)ss->batches));
            json_object_set_new(n, "tokens_per_s", json_real(ss->connected ? rate : 0.0));
            json_object_set_new(n, "error", json_string(ss->error));
            json_array_append_new(nodes, n);
        }
        free(ps);
    } else {
        struct node_info ni;
        struct engine_stats es;
        enum backend_kind kind = engine_backend(b->engine)->kind;
        node_info_local(&ni, NULL, BACKEND_CPU, 0);
        snprintf(ni.name, sizeof(ni.name), "%s", ni.host);
        if (kind != BACKEND_CPU) snprintf(ni.device, sizeof(ni.device), "%s", engine_backend(b->engine)->device_name);
        engine_get_stats(b->engine, &es);
        char addr[300];
        snprintf(addr, sizeof(addr), "%s:%d", c->host, c->port);
        json_t *n = node_json(&ni, addr, "coordinator", 0, b->cfg.n_layers - 1);
        json_object_set_new(n, "verified", json_true());
        json_object_set_new(n, "connected", json_true());
        json_object_set_new(n, "last_heartbeat_s", json_real(0));
        json_object_set_new(n, "rtt_ms", json_real(0));
        json_object_set_new(n, "compute_s", json_real(es.forward_s));
        json_object_set_new(n, "batches", json_integer((json_int_t)es.n_forward));
        json_object_set_new(n, "tokens_per_s", json_real(rate));
        json_object_set_new(n, "error", json_string(""));
        json_array_append_new(nodes, n);
        json_object_set_new(o, "epoch", json_integer(1));
        json_object_set_new(o, "reforms", json_integer(0));
    }
    json_object_set_new(o, "nodes", nodes);
    json_object_set_new(tp, "generated_tokens", json_integer((json_int_t)st.generated_tokens));
    json_object_set_new(tp, "tokens_per_s", json_real(rate));
    json_object_set_new(o, "throughput", tp);
    return o;
}

static void status_metrics(void *arg, struct text_buf *out)
{
    struct status_ctx *c = arg;
    if (!c->b->pipeline) return;
    struct pipeline_status *ps = malloc(sizeof(*ps));
    if (!ps) return;
    pipeline_get_status(c->b->x, ps);
    static const struct {
        const char *name, *type, *help;
    } m[] = {
        {"strata_stage_up", "gauge", "1 when the pipeline stage is connected and verified"},
        {"strata_stage_compute_seconds_total", "counter", "compute time reported by the stage"},
        {"strata_stage_batches_total", "counter", "batches the stage ran"},
        {"strata_link_rtt_seconds", "gauge", "round-trip time of the coordinator's link to the stage (last ping)"},
        {"strata_link_sent_bytes_total", "counter", "bytes the coordinator sent to the stage"},
        {"strata_link_received_bytes_total", "counter", "bytes the coordinator received from the stage"},
    };
    for (size_t k = 0; k < ST_ARRAY_LEN(m); k++) {
        text_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", m[k].name, m[k].help, m[k].name, m[k].type);
        for (int i = 0; i < ps->n_stages; i++) {
            const struct stage_status *ss = &ps->st[i];
            double v = k == 0 ? (ss->connected && ss->verified) : k == 1 ? ss->compute_s : k == 2 ? (double)ss->batches
                     : k == 3 ? ss->rtt_ms * 1e-3 : k == 4 ? (double)ss->bytes_sent : (double)ss->bytes_recv;
            char node[80];
            size_t j = 0;
            for (const char *p = ss->name; *p && j + 1 < sizeof(node); p++)
                if (*p != '"' && *p != '\\' && *p != '\n') node[j++] = *p;
            node[j] = 0;
            text_buf_printf(out, "%s{stage=\"%d\",node=\"%s\"} %.9g\n", m[k].name, i, node, v);
        }
    }
    text_buf_printf(out, "# HELP strata_cluster_healthy 1 when every stage is serving\n# TYPE strata_cluster_healthy gauge\n"
                         "strata_cluster_healthy %d\n", ps->healthy ? 1 : 0);
    text_buf_printf(out, "# HELP strata_cluster_reforms_total times the pipeline was re-formed after a failure\n"
                         "# TYPE strata_cluster_reforms_total counter\nstrata_cluster_reforms_total %llu\n",
                    (unsigned long long)ps->reforms);
    text_buf_printf(out, "# HELP strata_cluster_failed_batches_total batches lost to a stage failure\n"
                         "# TYPE strata_cluster_failed_batches_total counter\nstrata_cluster_failed_batches_total %llu\n",
                    (unsigned long long)ps->batches_failed);
    free(ps);
}

static const char *base_name(const char *dir, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s", dir);
    size_t n = strlen(buf);
    while (n > 1 && buf[n - 1] == '/') buf[--n] = 0;
    const char *slash = strrchr(buf, '/');
    return slash && slash[1] ? slash + 1 : buf;
}

int cmd_serve(int argc, char **argv)
{
    struct serve_opts o = {.bits = 8, .parallel = 16, .ctx = 0, .batch = 256, .queue = 64, .threads = 0,
                           .port = 8100, .max_body = 4 << 20, .max_conn = 256, .timeout = 60, .device = "cpu",
                           .host = "127.0.0.1"};
    const char *cmd = "serve";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
#define VAL() do { if (!(v = cli_value(cmd, argc, argv, &i))) return 2; } while (0)
#define INT(field, lo, hi) do { VAL(); if (cli_int(cmd, a, v, lo, hi, &o.field)) return 2; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { VAL(); o.model_dir = v; }
        else if (!strcmp(a, "--model-name")) { VAL(); o.model_name = v; }
        else if (!strcmp(a, "--random-weights")) o.random_weights = true;
        else if (!strcmp(a, "--config")) { VAL(); o.config = v; }
        else if (!strcmp(a, "--bits")) INT(bits, 0, 8);
        else if (!strcmp(a, "--parallel")) INT(parallel, 1, 4096);
        else if (!strcmp(a, "--ctx")) INT(ctx, 1, 1 << 22);
        else if (!strcmp(a, "--batch")) INT(batch, 1, 65536);
        else if (!strcmp(a, "--queue")) INT(queue, 0, 1 << 20);
        else if (!strcmp(a, "--threads")) INT(threads, 0, 1024);
        else if (!strcmp(a, "--device")) { VAL(); o.device = v; }
        else if (!strcmp(a, "--host")) { VAL(); o.host = v; }
        else if (!strcmp(a, "--port")) INT(port, 0, 65535);
        else if (!strcmp(a, "--api-key")) { VAL(); o.api_key = v; }
        else if (!strcmp(a, "--api-key-file")) { VAL(); o.api_key_file = v; }
        else if (!strcmp(a, "--worker")) {
            VAL();
            if (o.n_workers == CLUSTER_MAX_STAGES) {
                fprintf(stderr, "strata serve: at most %d workers\n", CLUSTER_MAX_STAGES);
                return 2;
            }
            o.workers[o.n_workers++] = v;
        }
        else if (!strcmp(a, "--layers")) { VAL(); o.layers = v; }
        else if (!strcmp(a, "--coordinator-only")) o.coordinator_only = true;
        else if (!strcmp(a, "--secret-file")) { VAL(); o.secret_file = v; }
        else if (!strcmp(a, "--send-weights")) o.send_weights = true;
        else if (!strcmp(a, "--dead-ms")) INT(dead_ms, 100, 600000);
        else if (!strcmp(a, "--max-body")) INT(max_body, 1, 1L << 30);
        else if (!strcmp(a, "--max-connections")) INT(max_conn, 1, 1 << 16);
        else if (!strcmp(a, "--timeout")) INT(timeout, 1, 86400);
        else if (!strcmp(a, "--log-level")) {
            VAL();
            int l = log_level_parse(v);
            if (l < 0) {
                fprintf(stderr, "strata serve: --log-level: expected debug, info, warn, error or off, got \"%s\"\n", v);
                return 2;
            }
            log_set_level((enum log_level)l);
        } else {
            fprintf(stderr, "strata serve: unknown option \"%s\" (see --help)\n", a);
            return 2;
        }
#undef INT
#undef VAL
    }
    if (o.random_weights && !o.config) {
        fprintf(stderr, "strata serve: --random-weights needs --config FILE\n");
        return 2;
    }
    if ((o.layers || o.coordinator_only || o.secret_file || o.send_weights) && o.n_workers == 0) {
        fprintf(stderr, "strata serve: --layers, --coordinator-only, --secret-file and --send-weights need --worker\n");
        return 2;
    }
    char *key_from_file = NULL;
    if (o.api_key_file) {
        size_t kl;
        char kerr[ST_ERR_LEN];
        if (file_read_all(o.api_key_file, &key_from_file, &kl, 4096, kerr) < 0) {
            fprintf(stderr, "strata serve: --api-key-file: %s\n", kerr);
            return 2;
        }
        while (kl && (key_from_file[kl - 1] == '\n' || key_from_file[kl - 1] == '\r')) key_from_file[--kl] = 0;
        o.api_key = key_from_file;
    }
    if (!o.api_key) o.api_key = getenv("STRATA_API_KEY");
    bool tokenizer_dir = o.model_dir != NULL || !o.random_weights;
    if (!o.model_dir) o.model_dir = cli_default_model();

    /* SIGINT/SIGTERM are taken by sigwait below: block them before any thread starts, so every thread inherits
     * the mask and none is interrupted */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);

    char err[ST_ERR_LEN] = "", namebuf[1024];
    int status = 1;
    struct serve_backend b;
    memset(&b, 0, sizeof(b));
    struct tokenizer *tok = NULL;
    struct chat_template *tmpl = NULL;
    struct sched *s = NULL;
    struct server *srv = NULL;
    double t0 = time_s();
    if (serve_build_executor(&o, &b, err) < 0) goto fail;
    char tpath[1200];
    snprintf(tpath, sizeof(tpath), "%s/tokenizer.json", o.model_dir);
    if (tokenizer_dir && file_exists(tpath)) {
        if (tokenizer_load(&tok, o.model_dir, err) < 0) goto fail;
        const char *src = tokenizer_chat_template(tok);
        if (src && chat_template_compile(&tmpl, src, err) < 0) {
            LOGW("serve", "chat template of %s does not compile (%s): /v1/chat/completions is disabled", o.model_dir, err);
            tmpl = NULL;
            err[0] = 0;
        }
    } else {
        LOGW("serve", "no tokenizer: only token-id prompts on /v1/completions");
    }
    struct sched_opts so = {.max_queue = (int)o.queue, .prefill_chunk = (int)o.batch, .eos_ids = b.cfg.eos_ids,
                            .n_eos = b.cfg.n_eos};
    if (sched_init(&s, b.x, &so, err) < 0) goto fail;
    static struct status_ctx sctx;
    memset(&sctx, 0, sizeof(sctx));
    pthread_mutex_init(&sctx.lock, NULL);
    sctx.b = &b;
    sctx.s = s;
    sctx.host = o.host;
    struct server_opts sv = {.host = o.host, .port = (int)o.port, .api_key = o.api_key,
                             .status_json = status_json, .status_metrics = status_metrics, .status_ctx = &sctx,
                             .model_name = o.model_name ? o.model_name
                                           : o.random_weights ? "strata-random"
                                                              : base_name(o.model_dir, namebuf, sizeof(namebuf)),
                             .vocab = b.cfg.vocab_size, .max_body_bytes = (size_t)o.max_body,
                             .max_connections = (int)o.max_conn, .timeout_s = (int)o.timeout};
    sctx.model_name = sv.model_name;
    if (server_init(&srv, s, tok, tmpl, b.cfg.eos_ids, b.cfg.n_eos, &sv, err) < 0) goto fail;
    sctx.port = server_port(srv);
    LOGI("serve", "model %s (%s): %d slots x %d tokens, batch %d, loaded in %.1fs", sv.model_name,
         b.have_model && b.model.dir[0] ? b.model.dir : "generated weights", b.x->n_slots, b.x->n_ctx, b.x->max_batch,
         time_s() - t0);
    bool v6 = strchr(o.host, ':') != NULL;
    LOGI("serve", "listening on http://%s%s%s:%d%s", v6 ? "[" : "", o.host, v6 ? "]" : "", server_port(srv),
         o.api_key && o.api_key[0] ? " (API key required)" : "");
    int sig = 0;
    sigwait(&sigs, &sig);
    LOGI("serve", "%s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    status = 0;
fail:
    if (status != 0) fprintf(stderr, "strata serve: %s\n", err[0] ? err : "failed");
    server_free(srv); /* before the scheduler: it waits until every request has ended */
    sched_free(s);
    chat_template_free(tmpl);
    tokenizer_free(tok);
    serve_backend_free(&b);
    free(key_from_file);
    return status;
}
