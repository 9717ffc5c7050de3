/* worker: one pipeline stage. A listener thread accepts connections (the coordinator's control connection and
 * the previous stage's data connection look the same: the messages tell them apart); a reader thread per
 * connection receives whole messages (answering pings even while the stage computes) into one inbox; one compute
 * thread handles the inbox in order: INFO_REQ, LOAD (model + engine + link to the next stage), FORWARD (run the
 * layers, pass the batch on, or sample and answer the coordinator), STATS_REQ. */
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/cluster.h"
#include "cluster/proto.h"
#include "core/core.h"
#include "engine/engine.h"
#include "engine/runner.h"

#define MAX_CONNS 32
#define MAX_MESSAGE (512u << 20)
#define SEND_TIMEOUT_MS 10000

enum wconn_state { WC_FREE, WC_ACTIVE, WC_DEAD };

struct wconn {
    enum wconn_state state;
    struct net_conn *c;
    pthread_t reader;
    bool reader_running;
    struct worker *w;
    int idx;
};

struct inbox_msg {
    int conn;          /* index into conns */
    int type;          /* NET_MSG_* or -1: connection lost */
    uint64_t id;
    uint8_t *data;
    size_t len;
    char why[ST_ERR_LEN];
    struct inbox_msg *next;
};

struct worker {
    struct worker_opts o;
    char host[256], name[64], model_dir[1024], cache_dir[1024];
    struct slice_rx rx;
    uint8_t *secret;
    struct net_conn_opts copts;
    struct net_listener *l;
    pthread_t accept_thread, compute_thread;
    _Atomic int stop;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct inbox_msg *head, *tail;
    struct wconn conns[MAX_CONNS];
    /* compute thread only */
    int control;       /* coordinator conn index, -1 none */
    struct net_conn *downstream;
    struct wconn down; /* reader for the downstream conn */
    bool loaded;
    struct load_spec spec;
    struct model model;
    struct engine *engine;
    struct runner *runner;
    struct fwd_msg fwd;
    struct step_out *outs;
    float *hidden_out;
    struct net_buf out;
    double compute_s;
    uint64_t batches;
};

static void inbox_push(struct worker *w, struct inbox_msg *m)
{
    pthread_mutex_lock(&w->lock);
    if (w->tail) w->tail->next = m;
    else w->head = m;
    w->tail = m;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static void *reader_main(void *arg)
{
    struct wconn *wc = arg;
    struct worker *w = wc->w;
    char err[ST_ERR_LEN];
    for (;;) {
        if (atomic_load(&w->stop)) break;
        struct net_frame f;
        uint8_t *data = NULL;
        size_t len = 0;
        int rc = net_recv_large(wc->c, &f, &data, &len, MAX_MESSAGE, 500, err);
        if (rc == ST_ETIMEDOUT) continue;
        struct inbox_msg *m = calloc(1, sizeof(*m));
        if (!m) {
            free(data);
            break;
        }
        m->conn = wc->idx;
        if (rc < 0) {
            m->type = -1;
            snprintf(m->why, sizeof(m->why), "%s", err);
            inbox_push(w, m);
            break;
        }
        if (f.type == NET_MSG_PONG) {
            free(data);
            free(m);
            continue;
        }
        m->type = f.type;
        m->id = f.request_id;
        m->data = data;
        m->len = len;
        inbox_push(w, m);
    }
    return NULL;
}

static int start_reader(struct worker *w, struct wconn *wc)
{
    wc->w = w;
    if (pthread_create(&wc->reader, NULL, reader_main, wc) != 0) return ST_ENOMEM;
    wc->reader_running = true;
    return ST_OK;
}

static void *accept_main(void *arg)
{
    struct worker *w = arg;
    char err[ST_ERR_LEN];
    while (!atomic_load(&w->stop)) {
        struct net_conn *c = NULL;
        int rc = net_listener_accept(w->l, &c, 500, err);
        if (rc == ST_ETIMEDOUT) continue;
        if (rc < 0) {
            LOGW("worker", "refused a connection: %s", err);
            continue;
        }
        pthread_mutex_lock(&w->lock);
        int slot = -1;
        for (int i = 0; i < MAX_CONNS; i++)
            if (w->conns[i].state == WC_FREE) {
                slot = i;
                break;
            }
        if (slot >= 0) {
            w->conns[slot].state = WC_ACTIVE;
            w->conns[slot].c = c;
            w->conns[slot].idx = slot;
        }
        pthread_mutex_unlock(&w->lock);
        if (slot < 0) {
            net_send_error(c, 0, ST_EBUSY, "worker: too many connections", 1000, NULL);
            net_conn_free(c);
            continue;
        }
        LOGI("worker", "connection from %s (%s)", net_conn_peer_name(c), net_conn_peer_desc(c));
        if (start_reader(w, &w->conns[slot]) < 0) {
            pthread_mutex_lock(&w->lock);
            net_conn_free(c);
            w->conns[slot].state = WC_FREE;
            pthread_mutex_unlock(&w->lock);
        }
    }
    return NULL;
}

static struct net_conn *conn_of(struct worker *w, int idx)
{
    if (idx == MAX_CONNS) return w->downstream;
    if (idx < 0 || idx >= MAX_CONNS || w->conns[idx].state != WC_ACTIVE) return NULL;
    return w->conns[idx].c;
}

static void reply(struct worker *w, int conn, int type, uint64_t id)
{
    struct net_conn *c = conn_of(w, conn);
    char err[ST_ERR_LEN];
    if (!c) return;
    if (net_buf_check(&w->out, err) < 0 ||
        net_send_large(c, (uint16_t)type, id, w->out.data, w->out.len, SEND_TIMEOUT_MS, err) < 0)
        LOGW("worker", "reply %s failed: %s", net_msg_type_name(type), err);
}

static void reply_error(struct worker *w, int conn, uint64_t id, int code, const char *msg)
{
    struct net_conn *c = conn_of(w, conn);
    if (c) net_send_error(c, id, code, msg, SEND_TIMEOUT_MS, NULL);
}

static void unload(struct worker *w)
{
    runner_free(w->runner);
    engine_free(w->engine);
    if (w->loaded) model_free(&w->model);
    free(w->outs);
    st_free(w->hidden_out);
    free(w->spec.config_json);
    w->runner = NULL;
    w->engine = NULL;
    w->outs = NULL;
    w->hidden_out = NULL;
    w->spec.config_json = NULL;
    w->loaded = false;
}

static void close_downstream(struct worker *w)
{
    if (!w->downstream) return;
    net_conn_close(w->downstream, 200, NULL);
    if (w->down.reader_running) pthread_join(w->down.reader, NULL);
    w->down.reader_running = false;
    net_conn_free(w->downstream);
    w->downstream = NULL;
}

/* Same weights and engine shape: the loaded model can be kept across a re-formed pipeline. */
static bool same_model(const struct load_spec *a, const struct load_spec *b)
{
    return a->source == b->source && !strcmp(a->model_dir, b->model_dir) && a->bits == b->bits && a->seed == b->seed &&
           !strcmp(a->config_json ? a->config_json : "", b->config_json ? b->config_json : "") &&
           a->layer_begin == b->layer_begin && a->layer_end == b->layer_end && a->first == b->first &&
           a->last == b->last && a->n_slots == b->n_slots && a->n_ctx == b->n_ctx && a->max_batch == b->max_batch &&
           a->max_logits == b->max_logits && !strcmp(a->device, b->device) && a->n_threads == b->n_threads;
}

static int do_load(struct worker *w, struct load_spec *s, char *err)
{
    int rc;
    if (w->loaded && same_model(&w->spec, s)) {
        LOGI("worker", "keeping the loaded layers %d-%d (epoch %llu)", s->layer_begin, s->layer_end,
             (unsigned long long)s->epoch);
        /* a fresh runner: every slot free */
        runner_free(w->runner);
        w->runner = NULL;
        if ((rc = runner_init(&w->runner, w->engine, err)) < 0) goto fail;
    } else {
        unload(w);
        if (s->source == LOAD_DIR) {
            /* our own -m, else the coordinator's path if it exists here, else a slice it sent before */
            char probe[1200], cached[1200] = "";
            const char *dir = w->model_dir;
            if (s->slice_id[0]) snprintf(cached, sizeof(cached), "%s/%s", w->cache_dir, s->slice_id);
            if (!dir[0]) {
                snprintf(probe, sizeof(probe), "%s/config.json", s->model_dir);
                if (s->model_dir[0] && file_exists(probe)) dir = s->model_dir;
            }
            if (!dir[0] && cached[0]) {
                snprintf(probe, sizeof(probe), "%s/config.json", cached);
                if (file_exists(probe)) dir = cached;
            }
            if (!dir[0])
                return err_set(err, ST_ENOTFOUND, "no copy of the weights on this node (start it with -m DIR, or let "
                                                  "the coordinator send them)");
            if ((rc = model_load(&w->model, dir, s->layer_begin, s->layer_end, s->first, s->last, err)) < 0) return rc;
        } else {
            struct model_config cfg;
            if ((rc = model_config_parse(&cfg, s->config_json, strlen(s->config_json), err)) < 0) return rc;
            if ((rc = model_init_random(&w->model, &cfg, s->bits, s->seed, s->layer_begin, s->layer_end, s->first,
                                        s->last, err)) < 0)
                return rc;
        }
        w->loaded = true;
        struct engine_opts eo = {.n_slots = s->n_slots, .n_ctx = s->n_ctx, .max_batch = s->max_batch,
                                 .max_logits = s->max_logits};
        if (w->o.kind == BACKEND_CUDA) {
            eo.backend.kind = BACKEND_CUDA;
            eo.backend.device = w->o.device;
        } else if ((rc = backend_parse_device(s->device[0] ? s->device : "cpu", &eo.backend.kind, &eo.backend.device,
                                              err)) < 0) {
            goto fail;
        }
        eo.backend.n_threads = w->o.n_threads > 0 ? w->o.n_threads : s->n_threads;
        if ((rc = engine_init(&w->engine, &w->model, &eo, err)) < 0) goto fail;
        if ((rc = runner_init(&w->runner, w->engine, err)) < 0) goto fail;
        const struct engine_opts *o = engine_opts(w->engine);
        w->outs = calloc((size_t)o->max_logits, sizeof(struct step_out));
        w->hidden_out = st_alloc(sizeof(float) * (size_t)o->max_batch * (size_t)w->model.cfg.dim);
        if (!w->outs || !w->hidden_out) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            goto fail;
        }
        LOGI("worker", "loaded layers %d-%d%s%s (%s)", s->layer_begin, s->layer_end, s->first ? " +embed" : "",
             s->last ? " +head" : "", engine_backend(w->engine)->device_name);
    }
    free(w->spec.config_json);
    w->spec = *s;
    s->config_json = NULL; /* moved */
    close_downstream(w);
    if (s->next_host[0]) {
        if ((rc = net_conn_connect(&w->downstream, s->next_host, s->next_port, &w->copts, 5000, err)) < 0) {
            err_prefix(err, rc, "cannot reach the next stage %s:%d", s->next_host, s->next_port);
            return rc;
        }
        memset(&w->down, 0, sizeof(w->down));
        w->down.c = w->downstream;
        w->down.idx = MAX_CONNS;
        w->down.state = WC_ACTIVE;
        if (start_reader(w, &w->down) < 0) return err_set(err, ST_ENOMEM, "cannot start a thread");
    }
    return ST_OK;
fail:
    unload(w);
    return rc;
}

static void handle_load(struct worker *w, struct inbox_msg *m)
{
    char err[ST_ERR_LEN] = "";
    struct load_spec s;
    struct manifest mf = {0};
    int rc = proto_get_load(m->data, m->len, &s, err);
    if (rc == 0) {
        w->control = m->conn;
        rc = do_load(w, &s, err);
        free(s.config_json);
    }
    if (rc == 0) rc = manifest_build(&mf, &w->model, err);
    if (rc < 0) LOGE("worker", "load failed: %s", err);
    net_buf_reset(&w->out);
    proto_put_load_done(&w->out, rc < 0 ? rc : 0, err, &mf);
    reply(w, m->conn, NET_MSG_LOAD_DONE, m->id);
    manifest_free(&mf);
}

static void send_result_error(struct worker *w, uint64_t epoch, uint64_t tag, int code, const char *msg)
{
    net_buf_reset(&w->out);
    proto_put_result(&w->out, epoch, tag, code, msg, NULL, 0, NULL, 0);
    reply(w, w->control, NET_MSG_FORWARD_RESULT, tag);
}

static void handle_forward(struct worker *w, struct inbox_msg *m)
{
    char err[ST_ERR_LEN] = "";
    if (!w->loaded || !w->runner) {
        reply_error(w, m->conn, m->id, ST_EPROTO, "forward before load");
        return;
    }
    const struct engine_opts *o = engine_opts(w->engine);
    int rc = proto_get_forward(m->data, m->len, &w->fwd, o->max_batch, o->n_slots, o->n_ctx, w->model.cfg.dim, err);
    if (rc < 0) {
        LOGE("worker", "bad forward message: %s", err);
        send_result_error(w, w->spec.epoch, m->id, rc, err);
        return;
    }
    if (w->fwd.epoch != w->spec.epoch) {
        LOGW("worker", "dropping a batch of epoch %llu (current %llu)", (unsigned long long)w->fwd.epoch,
             (unsigned long long)w->spec.epoch);
        return;
    }
    if (w->fwd.hidden_rows == 0 && !w->spec.first && w->fwd.b.n_rows > 0) {
        send_result_error(w, w->fwd.epoch, w->fwd.b.tag, ST_EPROTO, "batch without hidden states at a middle stage");
        return;
    }
    double t0 = time_s();
    int n_out = 0;
    rc = runner_step(w->runner, &w->fwd.b, w->fwd.hidden_rows ? w->fwd.hidden : NULL, w->hidden_out, w->outs, &n_out,
                     err);
    double dt = time_s() - t0;
    w->compute_s += dt;
    w->batches++;
    if (rc < 0) {
        LOGE("worker", "step failed: %s", err);
        send_result_error(w, w->fwd.epoch, w->fwd.b.tag, rc, err);
        return;
    }
    if (w->fwd.n_timings < CLUSTER_MAX_STAGES) w->fwd.timings[w->fwd.n_timings++] = dt;
    net_buf_reset(&w->out);
    if (w->spec.last) {
        proto_put_result(&w->out, w->fwd.epoch, w->fwd.b.tag, 0, "", w->outs, n_out, w->fwd.timings, w->fwd.n_timings);
        reply(w, w->control, NET_MSG_FORWARD_RESULT, w->fwd.b.tag);
        return;
    }
    if (!w->downstream) {
        send_result_error(w, w->fwd.epoch, w->fwd.b.tag, ST_ECLOSED, "no link to the next stage");
        return;
    }
    proto_put_forward(&w->out, w->fwd.epoch, &w->fwd.b, w->fwd.timings, w->fwd.n_timings, w->hidden_out,
                      w->fwd.b.n_rows, w->model.cfg.dim);
    if (net_buf_check(&w->out, err) < 0 ||
        net_send_large(w->downstream, NET_MSG_FORWARD, w->fwd.b.tag, w->out.data, w->out.len, SEND_TIMEOUT_MS, err) < 0) {
        char msg[ST_ERR_LEN];
        snprintf(msg, sizeof(msg), "stage %d-%d: sending to the next stage %s:%d failed: %s", w->spec.layer_begin,
                 w->spec.layer_end, w->spec.next_host, w->spec.next_port, err);
        LOGE("worker", "%s", msg);
        send_result_error(w, w->fwd.epoch, w->fwd.b.tag, ST_ECLOSED, msg);
    }
}

static void handle_stats(struct worker *w, struct inbox_msg *m)
{
    net_buf_reset(&w->out);
    net_buf_put_f64(&w->out, w->compute_s);
    net_buf_put_u64(&w->out, w->batches);
    struct net_conn_stats ds = {0};
    if (w->downstream) net_conn_get_stats(w->downstream, &ds);
    net_buf_put_u64(&w->out, ds.bytes_sent);
    net_buf_put_u64(&w->out, ds.last_rtt_ns);
    reply(w, m->conn, NET_MSG_STATS, m->id);
}

static void reap(struct worker *w, int idx)
{
    pthread_mutex_lock(&w->lock);
    struct wconn *wc = &w->conns[idx];
    pthread_mutex_unlock(&w->lock);
    if (wc->reader_running) pthread_join(wc->reader, NULL);
    pthread_mutex_lock(&w->lock);
    net_conn_free(wc->c);
    memset(wc, 0, sizeof(*wc));
    wc->state = WC_FREE;
    pthread_mutex_unlock(&w->lock);
}

static void *compute_main(void *arg)
{
    struct worker *w = arg;
    while (!atomic_load(&w->stop)) {
        pthread_mutex_lock(&w->lock);
        while (!w->head && !atomic_load(&w->stop)) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&w->cond, &w->lock, &ts);
        }
        struct inbox_msg *m = w->head;
        if (m) {
            w->head = m->next;
            if (!w->head) w->tail = NULL;
        }
        pthread_mutex_unlock(&w->lock);
        if (!m) continue;
        switch (m->type) {
        case -1:
            if (m->conn == MAX_CONNS) {
                LOGW("worker", "link to the next stage lost: %s", m->why);
                /* the coordinator sees the failure of the next stage itself; batches fail until a new LOAD */
            } else {
                LOGI("worker", "connection %s closed: %s", conn_of(w, m->conn) ? net_conn_peer_desc(conn_of(w, m->conn)) : "?", m->why);
                if (m->conn == w->control) w->control = -1;
                reap(w, m->conn);
            }
            break;
        case NET_MSG_INFO_REQ: {
            struct node_info ni;
            node_info_local(&ni, w->name, w->o.kind, w->o.device);
            if (w->o.max_memory_bytes) {
                if (ni.mem_free_bytes > w->o.max_memory_bytes) ni.mem_free_bytes = w->o.max_memory_bytes;
                if (ni.dev_free_bytes > w->o.max_memory_bytes) ni.dev_free_bytes = w->o.max_memory_bytes;
            }
            ni.has_model = w->model_dir[0] != 0;
            snprintf(ni.model_dir, sizeof(ni.model_dir), "%s", w->model_dir);
            net_buf_reset(&w->out);
            proto_put_info(&w->out, &ni);
            reply(w, m->conn, NET_MSG_INFO, m->id);
            break;
        }
        case NET_MSG_LOAD: handle_load(w, m); break;
        case NET_MSG_FORWARD: handle_forward(w, m); break;
        case NET_MSG_STATS_REQ: handle_stats(w, m); break;
        case NET_MSG_WEIGHTS_CHUNK: {
            char err[ST_ERR_LEN];
            if (slice_rx_handle(&w->rx, w->cache_dir, m->data, m->len, err) < 0) {
                LOGE("worker", "receiving weights: %s", err);
                reply_error(w, m->conn, 0, ST_EIO, err);
            }
            break;
        }
        case NET_MSG_ERROR: {
            int code;
            char msg[NET_ERROR_MSG_MAX + 1];
            struct net_frame f = {.type = NET_MSG_ERROR, .payload = m->data, .payload_bytes = (uint32_t)m->len};
            if (net_error_decode(&f, &code, msg, sizeof(msg), NULL) == 0) LOGW("worker", "peer error: %s", msg);
            break;
        }
        default: reply_error(w, m->conn, m->id, ST_EPROTO, "unexpected message"); break;
        }
        free(m->data);
        free(m);
    }
    return NULL;
}

int worker_start(struct worker **out, const struct worker_opts *o, char *err)
{
    *out = NULL;
    struct worker *w = calloc(1, sizeof(*w));
    if (!w) return err_set(err, ST_ENOMEM, "worker: out of memory");
    int rc;
    w->o = *o;
    w->control = -1;
    snprintf(w->host, sizeof(w->host), "%s", o->host ? o->host : "127.0.0.1");
    snprintf(w->model_dir, sizeof(w->model_dir), "%s", o->model_dir ? o->model_dir : "");
    slice_rx_init(&w->rx);
    if (o->cache_dir) {
        snprintf(w->cache_dir, sizeof(w->cache_dir), "%s", o->cache_dir);
    } else {
        const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
        if (xdg && *xdg) snprintf(w->cache_dir, sizeof(w->cache_dir), "%s/strata", xdg);
        else if (home && *home) snprintf(w->cache_dir, sizeof(w->cache_dir), "%s/.cache/strata", home);
        else snprintf(w->cache_dir, sizeof(w->cache_dir), "/tmp/strata-cache");
    }
    if (o->name) snprintf(w->name, sizeof(w->name), "%s", o->name);
    else if (gethostname(w->name, sizeof(w->name) - 1) != 0) snprintf(w->name, sizeof(w->name), "worker");
    for (char *p = w->name; *p; p++)
        if (*p < 33 || *p > 126) *p = '_';
    if (o->secret_bytes) {
        w->secret = malloc(o->secret_bytes);
        if (!w->secret) {
            free(w);
            return err_set(err, ST_ENOMEM, "worker: out of memory");
        }
        memcpy(w->secret, o->secret, o->secret_bytes);
    }
    w->copts.node_name = w->name;
    w->copts.secret = w->secret;
    w->copts.secret_bytes = o->secret_bytes;
    w->copts.capabilities = NET_CAP_CHUNKED;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    net_buf_init(&w->out);
    if ((rc = net_listener_init(&w->l, w->host, o->port, &w->copts, err)) < 0) goto fail;
    if (pthread_create(&w->compute_thread, NULL, compute_main, w) != 0) {
        rc = err_set(err, ST_ENOMEM, "worker: cannot start a thread");
        goto fail;
    }
    if (pthread_create(&w->accept_thread, NULL, accept_main, w) != 0) {
        atomic_store(&w->stop, 1);
        pthread_join(w->compute_thread, NULL);
        rc = err_set(err, ST_ENOMEM, "worker: cannot start a thread");
        goto fail;
    }
    LOGI("worker", "%s listening on %s:%d%s", w->name, w->host, net_listener_port(w->l),
         o->secret_bytes ? " (authenticated links)" : "");
    *out = w;
    return ST_OK;
fail:
    net_listener_free(w->l);
    free(w->secret);
    net_buf_free(&w->out);
    free(w);
    return rc;
}

int worker_port(const struct worker *w) { return net_listener_port(w->l); }

void worker_stop(struct worker *w)
{
    if (!w) return;
    atomic_store(&w->stop, 1);
    pthread_mutex_lock(&w->lock);
    pthread_cond_broadcast(&w->cond);
    pthread_mutex_unlock(&w->lock);
    pthread_join(w->accept_thread, NULL);
    pthread_join(w->compute_thread, NULL);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (w->conns[i].state == WC_FREE) continue;
        if (w->conns[i].reader_running) pthread_join(w->conns[i].reader, NULL);
        net_conn_free(w->conns[i].c);
    }
    close_downstream(w);
    while (w->head) {
        struct inbox_msg *m = w->head;
        w->head = m->next;
        free(m->data);
        free(m);
    }
    unload(w);
    slice_rx_reset(&w->rx);
    fwd_msg_free(&w->fwd);
    net_buf_free(&w->out);
    net_listener_free(w->l);
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
    free(w->secret);
    free(w);
}
