/* pipeline: the coordinator's executor over a chain of workers.
 *
 * submit (scheduler thread) sends FORWARD to the first stage; a reader thread per stage receives what the stage
 * sends back (the last stage's FORWARD_RESULT, errors, stats) and queues results for wait. A monitor thread pings
 * idle links, declares a stage lost when it stays silent past dead_ms, fails the batches in flight, and re-forms
 * the pipeline (connect, inventory, placement, load, verify) once every stage answers again. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/cluster.h"
#include "cluster/proto.h"
#include "core/core.h"

#define MAX_INFLIGHT CLUSTER_MAX_STAGES
#define MAX_MESSAGE (512u << 20)

struct pstage {
    char addr[160], host[128];
    int port;
    struct net_conn *c;
    pthread_mutex_t send_lock;
    pthread_t reader;
    bool reader_running;
    struct node_info info;
    struct stage_plan plan;
    struct load_spec load; /* what the stage was last asked to load (config_json not kept) */
    bool connected, verified;
    char error[256];
    double compute_s;
    uint64_t batches;
    struct pipeline *p;
    int idx;
};

struct presult {
    struct step_result r;
    struct step_out *outs;
    struct presult *next;
};

struct pipeline {
    struct executor base;
    struct pipeline_opts o;
    char model_dir[1024], device[32], layers[512];
    char *config_json;
    uint8_t *secret;
    struct model_config cfg;
    size_t bytes_per_layer;
    const struct manifest *mf;
    struct net_conn_opts copts;
    struct worker *internal;
    int n;
    struct pstage st[CLUSTER_MAX_STAGES];
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct presult *q_head, *q_tail;
    uint64_t inflight_tag[MAX_INFLIGHT];
    uint64_t inflight_t0[MAX_INFLIGHT];
    int n_inflight;
    uint64_t epoch;
    bool healthy;
    char reason[512];
    int32_t *slot_epoch;
    uint64_t reforms, batches_failed;
    pthread_t monitor;
    _Atomic int stop;
    struct net_buf sendbuf;  /* submit (scheduler thread) */
    struct net_buf formbuf;  /* form (init, then the monitor thread) */
    int batch_timeout_ms;
    struct presult *last_given; /* freed at the next wait */
};

static struct pipeline *pl(struct executor *x) { return (struct pipeline *)x; }

/* ---- result queue (lock held by callers marked _locked) ---- */

static void push_locked(struct pipeline *p, struct presult *r)
{
    if (p->q_tail) p->q_tail->next = r;
    else p->q_head = r;
    p->q_tail = r;
    pthread_cond_broadcast(&p->cond);
}

static bool take_inflight_locked(struct pipeline *p, uint64_t tag)
{
    for (int i = 0; i < p->n_inflight; i++)
        if (p->inflight_tag[i] == tag) {
            p->inflight_tag[i] = p->inflight_tag[p->n_inflight - 1];
            p->inflight_t0[i] = p->inflight_t0[p->n_inflight - 1];
            p->n_inflight--;
            return true;
        }
    return false;
}

static void fail_tag_locked(struct pipeline *p, uint64_t tag, int code, const char *msg)
{
    if (!take_inflight_locked(p, tag)) return;
    struct presult *r = calloc(1, sizeof(*r));
    if (!r) return; /* out of memory: the batch stays failed; the scheduler times it out on shutdown */
    r->r.tag = tag;
    r->r.status = code < 0 ? code : ST_EIO;
    snprintf(r->r.err, sizeof(r->r.err), "%s", msg);
    p->batches_failed++;
    push_locked(p, r);
}

static void fail_all_locked(struct pipeline *p, int code, const char *msg)
{
    while (p->n_inflight > 0) fail_tag_locked(p, p->inflight_tag[0], code, msg);
}

/* Any trouble makes the whole pipeline degraded: every batch in flight fails (their state in the stages is
 * gone or uncertain) and the monitor re-forms the pipeline. */
static void degrade_locked(struct pipeline *p, int code, const char *reason)
{
    if (p->healthy) {
        p->healthy = false;
        snprintf(p->reason, sizeof(p->reason), "%s", reason);
        LOGE("cluster", "%s", p->reason);
    }
    char msg[ST_ERR_LEN];
    snprintf(msg, sizeof(msg), "%s", p->reason);
    fail_all_locked(p, code, msg);
}

static void mark_lost_locked(struct pipeline *p, struct pstage *s, const char *why)
{
    if (s->connected) snprintf(s->error, sizeof(s->error), "%s", why);
    s->connected = false;
    char reason[512];
    snprintf(reason, sizeof(reason), "stage %d (%s, layers %d-%d) lost: %s", s->idx, s->addr, s->plan.layer_begin,
             s->plan.layer_end - 1, why);
    degrade_locked(p, ST_ECLOSED, reason);
}

/* ---- per-stage reader ---- */

static void *reader_main(void *arg)
{
    struct pstage *s = arg;
    struct pipeline *p = s->p;
    struct result_msg rm = {0};
    char err[ST_ERR_LEN];
    while (!atomic_load(&p->stop)) {
        struct net_frame f;
        uint8_t *data = NULL;
        size_t len = 0;
        int rc = net_recv_large(s->c, &f, &data, &len, MAX_MESSAGE, 250, err);
        if (rc == ST_ETIMEDOUT) continue;
        if (rc < 0) {
            pthread_mutex_lock(&p->lock);
            mark_lost_locked(p, s, err);
            pthread_mutex_unlock(&p->lock);
            break;
        }
        if (f.type == NET_MSG_FORWARD_RESULT) {
            rc = proto_get_result(data, len, &rm, p->base.max_logits, err);
            pthread_mutex_lock(&p->lock);
            if (rc < 0) {
                mark_lost_locked(p, s, err);
            } else if (rm.epoch == p->epoch) {
                for (int i = 0; i < rm.n_timings && i < p->n; i++) {
                    p->st[i].compute_s += rm.timings[i];
                    p->st[i].batches++;
                }
                if (rm.status < 0) {
                    /* a stage failed inside the chain (a link or a step): the pipeline must be re-formed */
                    fail_tag_locked(p, rm.tag, rm.status, rm.err);
                    char reason[512];
                    snprintf(reason, sizeof(reason), "stage error: %s", rm.err);
                    degrade_locked(p, rm.status, reason);
                } else if (take_inflight_locked(p, rm.tag)) {
                    struct presult *r = calloc(1, sizeof(*r));
                    struct step_out *outs = malloc(sizeof(*outs) * (size_t)(rm.n_out > 0 ? rm.n_out : 1));
                    if (r && outs) {
                        memcpy(outs, rm.outs, sizeof(*outs) * (size_t)rm.n_out);
                        r->r.tag = rm.tag;
                        r->r.n_out = rm.n_out;
                        r->r.outs = outs;
                        r->outs = outs;
                        push_locked(p, r);
                    } else {
                        free(r);
                        free(outs);
                        mark_lost_locked(p, s, "out of memory");
                    }
                }
            }
            pthread_mutex_unlock(&p->lock);
        } else if (f.type == NET_MSG_ERROR) {
            int code;
            char msg[NET_ERROR_MSG_MAX + 1];
            struct net_frame ef = {.type = NET_MSG_ERROR, .payload = data, .payload_bytes = (uint32_t)len};
            if (net_error_decode(&ef, &code, msg, sizeof(msg), NULL) == 0) {
                LOGE("cluster", "stage %d (%s): %s", s->idx, s->addr, msg);
                pthread_mutex_lock(&p->lock);
                char full[512];
                snprintf(full, sizeof(full), "stage %d (%s): %s", s->idx, s->addr, msg);
                degrade_locked(p, code < 0 ? code : ST_EPROTO, full);
                pthread_mutex_unlock(&p->lock);
            }
        } else if (f.type == NET_MSG_STATS) {
            /* per-link figures of the stage's own downstream link; kept for status */
        }
        free(data);
    }
    result_msg_free(&rm);
    return NULL;
}

/* ---- forming the pipeline ---- */

static void teardown(struct pipeline *p)
{
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        pthread_mutex_lock(&s->send_lock); /* submit may be sending on it */
        if (s->c) net_conn_close(s->c, 200, NULL);
        pthread_mutex_unlock(&s->send_lock);
        if (s->reader_running) pthread_join(s->reader, NULL);
        s->reader_running = false;
        pthread_mutex_lock(&s->send_lock);
        net_conn_free(s->c);
        s->c = NULL;
        pthread_mutex_unlock(&s->send_lock);
        pthread_mutex_lock(&p->lock);
        s->connected = false;
        s->verified = false;
        pthread_mutex_unlock(&p->lock);
    }
}

static int recv_reply(struct pstage *s, int type, uint8_t **data, size_t *len, int timeout_ms, char *err)
{
    uint64_t deadline = time_ns() + (uint64_t)timeout_ms * 1000000ull;
    for (;;) {
        uint64_t now = time_ns();
        if (now >= deadline) return err_set(err, ST_ETIMEDOUT, "no %s within %d ms", net_msg_type_name(type), timeout_ms);
        struct net_frame f;
        int rc = net_recv_large(s->c, &f, data, len, MAX_MESSAGE, (int)((deadline - now) / 1000000ull) + 1, err);
        if (rc < 0) return rc;
        if (f.type == type) return ST_OK;
        if (f.type == NET_MSG_ERROR) {
            int code;
            char msg[NET_ERROR_MSG_MAX + 1];
            struct net_frame ef = {.type = NET_MSG_ERROR, .payload = *data, .payload_bytes = (uint32_t)*len};
            net_error_decode(&ef, &code, msg, sizeof(msg), NULL);
            free(*data);
            *data = NULL;
            return err_set(err, code < 0 ? code : ST_EPROTO, "%s", msg);
        }
        free(*data); /* something else (a late result of an old epoch): ignore */
        *data = NULL;
    }
}

static int form(struct pipeline *p, char *err)
{
    int rc = ST_OK;
    uint8_t *data = NULL;
    size_t len = 0;
    struct manifest got = {0};
    /* 1. connect and take inventory */
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        if ((rc = net_conn_connect(&s->c, s->host, s->port, &p->copts, p->o.connect_timeout_ms, err)) < 0) {
            err_prefix(err, rc, "stage %d (%s)", i, s->addr);
            goto fail;
        }
        if ((rc = net_send(s->c, NET_MSG_INFO_REQ, 0, 1, NULL, 0, p->o.connect_timeout_ms, err)) < 0 ||
            (rc = recv_reply(s, NET_MSG_INFO, &data, &len, p->o.connect_timeout_ms, err)) < 0 ||
            (rc = proto_get_info(data, len, &s->info, err)) < 0) {
            err_prefix(err, rc, "stage %d (%s)", i, s->addr);
            goto fail;
        }
        free(data);
        data = NULL;
        snprintf(s->error, sizeof(s->error), "%s", "");
    }
    /* 2. placement */
    struct stage_plan plan[CLUSTER_MAX_STAGES];
    if (p->layers[0]) {
        if ((rc = placement_parse(p->layers, p->cfg.n_layers, p->n, plan, err)) < 0) goto fail;
    } else {
        double wts[CLUSTER_MAX_STAGES];
        for (int i = 0; i < p->n; i++) {
            const struct node_info *ni = &p->st[i].info;
            wts[i] = (double)(ni->dev_free_bytes ? ni->dev_free_bytes : ni->mem_free_bytes);
        }
        if ((rc = placement_auto(p->cfg.n_layers, p->n, wts, plan, err)) < 0) goto fail;
    }
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        s->plan = plan[i];
        uint64_t need = placement_stage_bytes(&p->cfg, p->bytes_per_layer, plan[i].layer_end - plan[i].layer_begin,
                                              i == 0, i == p->n - 1, p->base.n_slots, p->base.n_ctx);
        uint64_t have = s->info.dev_free_bytes ? s->info.dev_free_bytes : s->info.mem_free_bytes;
        if (have && need > have) {
            rc = err_set(err, ST_ENOMEM, "node %s (%s) lacks memory for layers %d-%d: needs %.2f GiB, has %.2f GiB free",
                         s->info.name, s->addr, plan[i].layer_begin, plan[i].layer_end - 1, need / 1073741824.0,
                         have / 1073741824.0);
            goto fail;
        }
    }
    /* 3. load every stage (in parallel: send all, then collect) */
    uint64_t epoch = p->epoch + 1;
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        struct load_spec ls;
        memset(&ls, 0, sizeof(ls));
        ls.source = p->config_json ? LOAD_RANDOM : LOAD_DIR;
        if (!p->o.send_weights) snprintf(ls.model_dir, sizeof(ls.model_dir), "%s", p->model_dir);
        ls.config_json = p->config_json;
        ls.bits = p->o.random_bits;
        ls.seed = p->o.random_seed;
        ls.layer_begin = s->plan.layer_begin;
        ls.layer_end = s->plan.layer_end;
        ls.first = i == 0;
        ls.last = i == p->n - 1;
        ls.n_slots = p->base.n_slots;
        ls.n_ctx = p->base.n_ctx;
        ls.max_batch = p->base.max_batch;
        ls.max_logits = p->base.max_logits;
        snprintf(ls.device, sizeof(ls.device), "%s", p->device);
        ls.n_threads = p->o.n_threads;
        if (i + 1 < p->n) {
            snprintf(ls.next_host, sizeof(ls.next_host), "%s", p->st[i + 1].host);
            ls.next_port = p->st[i + 1].port;
        }
        ls.epoch = epoch;
        if (!p->config_json && (rc = slice_id_compute(p->mf, p->model_dir, ls.layer_begin, ls.layer_end, ls.first,
                                                      ls.last, ls.slice_id, err)) < 0)
            goto fail;
        s->load = ls;
        s->load.config_json = NULL;
        net_buf_reset(&p->formbuf);
        proto_put_load(&p->formbuf, &ls);
        if ((rc = net_buf_check(&p->formbuf, err)) < 0 ||
            (rc = net_send(s->c, NET_MSG_LOAD, 0, epoch, p->formbuf.data, p->formbuf.len, p->o.connect_timeout_ms, err)) < 0) {
            err_prefix(err, rc, "stage %d (%s)", i, s->addr);
            goto fail;
        }
    }
    /* the chain links connect from the first stage on: collect from the last stage backwards is not needed since
     * every worker listens before it is asked to load */
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        int status;
        char text[ST_ERR_LEN];
        if ((rc = recv_reply(s, NET_MSG_LOAD_DONE, &data, &len, p->o.load_timeout_ms, err)) < 0 ||
            (rc = proto_get_load_done(data, len, &status, text, sizeof(text), &got, err)) < 0) {
            err_prefix(err, rc, "stage %d (%s)", i, s->addr);
            goto fail;
        }
        free(data);
        data = NULL;
        if (status == ST_ENOTFOUND && s->load.slice_id[0]) {
            /* the worker has no copy: send it its slice once, then load again */
            manifest_free(&got);
            if ((rc = slice_send(s->c, p->model_dir, s->load.layer_begin, s->load.layer_end, s->load.first,
                                 s->load.last, s->load.slice_id, p->o.load_timeout_ms, err)) < 0) {
                err_prefix(err, rc, "sending weights to stage %d (%s)", i, s->addr);
                goto fail;
            }
            net_buf_reset(&p->formbuf);
            proto_put_load(&p->formbuf, &s->load);
            if ((rc = net_buf_check(&p->formbuf, err)) < 0 ||
                (rc = net_send(s->c, NET_MSG_LOAD, 0, epoch, p->formbuf.data, p->formbuf.len, p->o.connect_timeout_ms, err)) < 0 ||
                (rc = recv_reply(s, NET_MSG_LOAD_DONE, &data, &len, p->o.load_timeout_ms, err)) < 0 ||
                (rc = proto_get_load_done(data, len, &status, text, sizeof(text), &got, err)) < 0) {
                err_prefix(err, rc, "stage %d (%s)", i, s->addr);
                goto fail;
            }
            free(data);
            data = NULL;
        }
        if (status < 0) {
            rc = err_set(err, status, "node %s (%s): load of layers %d-%d failed: %s", s->info.name, s->addr,
                         s->plan.layer_begin, s->plan.layer_end - 1, text);
            goto fail;
        }
        /* 4. verify */
        char why[ST_ERR_LEN];
        if ((rc = manifest_compare(p->mf, &got, why)) < 0) {
            rc = err_set(err, ST_EMISMATCH, "node %s (%s) holds different weights: %s", s->info.name, s->addr, why);
            goto fail;
        }
        manifest_free(&got);
        s->verified = true;
        s->connected = true;
        LOGI("cluster", "stage %d: %s (%s) layers %d-%d verified (%s)", i, s->info.name, s->addr, s->plan.layer_begin,
             s->plan.layer_end - 1, s->info.device);
    }
    /* 5. readers */
    for (int i = 0; i < p->n; i++) {
        struct pstage *s = &p->st[i];
        if (pthread_create(&s->reader, NULL, reader_main, s) != 0) {
            rc = err_set(err, ST_ENOMEM, "cannot start a thread");
            goto fail;
        }
        s->reader_running = true;
    }
    pthread_mutex_lock(&p->lock);
    p->epoch = epoch;
    p->healthy = true;
    p->reason[0] = 0;
    pthread_mutex_unlock(&p->lock);
    return ST_OK;
fail:
    free(data);
    manifest_free(&got);
    teardown(p);
    return rc;
}

static void *monitor_main(void *arg)
{
    struct pipeline *p = arg;
    char err[ST_ERR_LEN];
    uint64_t last_try = 0;
    while (!atomic_load(&p->stop)) {
        usleep((useconds_t)p->o.heartbeat_ms * 1000u);
        pthread_mutex_lock(&p->lock);
        bool healthy = p->healthy;
        int inflight = p->n_inflight;
        pthread_mutex_unlock(&p->lock);
        if (healthy) {
            pthread_mutex_lock(&p->lock);
            uint64_t now = time_ns();
            for (int i = 0; i < p->n_inflight; i++)
                if (now - p->inflight_t0[i] > (uint64_t)p->batch_timeout_ms * 1000000ull) {
                    char reason[256];
                    snprintf(reason, sizeof(reason), "a batch got no result within %d s", p->batch_timeout_ms / 1000);
                    degrade_locked(p, ST_ETIMEDOUT, reason);
                    break;
                }
            pthread_mutex_unlock(&p->lock);
            for (int i = 0; i < p->n; i++) {
                struct pstage *s = &p->st[i];
                pthread_mutex_lock(&s->send_lock);
                int rc = s->c ? net_conn_heartbeat(s->c, p->o.heartbeat_ms, p->o.dead_ms, err) : ST_ECLOSED;
                pthread_mutex_unlock(&s->send_lock);
                if (rc < 0) {
                    pthread_mutex_lock(&p->lock);
                    char why[ST_ERR_LEN + 32];
                    snprintf(why, sizeof(why), "%s", rc == ST_ETIMEDOUT ? "silent (no answer to heartbeats)" : err);
                    mark_lost_locked(p, s, why);
                    pthread_mutex_unlock(&p->lock);
                }
            }
            continue;
        }
        if (inflight > 0) continue; /* the failed batches are being handed back */
        uint64_t now = time_ns();
        if (now - last_try < 1000000000ull) continue;
        last_try = now;
        teardown(p);
        int rc = form(p, err);
        pthread_mutex_lock(&p->lock);
        if (rc == 0) {
            p->reforms++;
            LOGI("cluster", "pipeline re-formed (epoch %llu)", (unsigned long long)p->epoch);
        } else {
            snprintf(p->reason, sizeof(p->reason), "re-forming the pipeline: %s", err);
        }
        pthread_mutex_unlock(&p->lock);
        if (rc < 0) LOGW("cluster", "re-forming failed: %s", err);
    }
    return NULL;
}

/* ---- executor ops ---- */

static int pl_submit(struct executor *x, const struct step_batch *b, char *err)
{
    struct pipeline *p = pl(x);
    pthread_mutex_lock(&p->lock);
    if (!p->healthy) {
        int rc = err_set(err, ST_ECLOSED, "cluster degraded: %s", p->reason);
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    for (int i = 0; i < b->n_start; i++) p->slot_epoch[b->starts[i].slot] = (int32_t)p->epoch;
    for (int i = 0; i < b->n_rows; i++)
        if (p->slot_epoch[b->rows[i].slot] != (int32_t)p->epoch) {
            pthread_mutex_unlock(&p->lock);
            return err_set(err, ST_ECLOSED, "the pipeline was re-formed; this sequence's state was lost");
        }
    if (p->n_inflight >= MAX_INFLIGHT) {
        pthread_mutex_unlock(&p->lock);
        return err_set(err, ST_EBUSY, "too many batches in flight");
    }
    uint64_t epoch = p->epoch;
    p->inflight_tag[p->n_inflight] = b->tag;
    p->inflight_t0[p->n_inflight] = time_ns();
    p->n_inflight++;
    struct pstage *s = &p->st[0];
    pthread_mutex_unlock(&p->lock);
    net_buf_reset(&p->sendbuf);
    proto_put_forward(&p->sendbuf, epoch, b, NULL, 0, NULL, 0, p->cfg.dim);
    pthread_mutex_lock(&s->send_lock);
    int rc = net_buf_check(&p->sendbuf, err);
    if (rc == 0) rc = s->c ? net_send_large(s->c, NET_MSG_FORWARD, b->tag, p->sendbuf.data, p->sendbuf.len, p->o.dead_ms, err)
                           : err_set(err, ST_ECLOSED, "not connected");
    pthread_mutex_unlock(&s->send_lock);
    if (rc < 0) {
        pthread_mutex_lock(&p->lock);
        take_inflight_locked(p, b->tag);
        char why[ST_ERR_LEN];
        snprintf(why, sizeof(why), "%s", err);
        mark_lost_locked(p, s, why);
        err_set(err, rc, "cluster degraded: %s", p->reason);
        pthread_mutex_unlock(&p->lock);
        return rc;
    }
    return ST_OK;
}

static int pl_wait(struct executor *x, struct step_result *res, int timeout_ms)
{
    struct pipeline *p = pl(x);
    pthread_mutex_lock(&p->lock);
    if (p->last_given) {
        free(p->last_given->outs);
        free(p->last_given);
        p->last_given = NULL;
    }
    if (!p->q_head) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += (long)timeout_ms * 1000000L;
        ts.tv_sec += ts.tv_nsec / 1000000000L;
        ts.tv_nsec %= 1000000000L;
        while (!p->q_head) {
            if (pthread_cond_timedwait(&p->cond, &p->lock, &ts) != 0) break;
        }
    }
    struct presult *r = p->q_head;
    if (!r) {
        pthread_mutex_unlock(&p->lock);
        return ST_ETIMEDOUT;
    }
    p->q_head = r->next;
    if (!p->q_head) p->q_tail = NULL;
    p->last_given = r;
    *res = r->r;
    pthread_mutex_unlock(&p->lock);
    return ST_OK;
}

static int pl_health(struct executor *x, char *why, size_t why_len)
{
    struct pipeline *p = pl(x);
    pthread_mutex_lock(&p->lock);
    int h = p->healthy ? 1 : 0;
    if (why_len) snprintf(why, why_len, "%s", p->healthy ? "" : p->reason);
    pthread_mutex_unlock(&p->lock);
    return h;
}

static void pl_free(struct executor *x)
{
    struct pipeline *p = pl(x);
    atomic_store(&p->stop, 1);
    if (p->monitor) pthread_join(p->monitor, NULL);
    teardown(p);
    worker_stop(p->internal);
    while (p->q_head) {
        struct presult *r = p->q_head;
        p->q_head = r->next;
        free(r->outs);
        free(r);
    }
    if (p->last_given) {
        free(p->last_given->outs);
        free(p->last_given);
    }
    for (int i = 0; i < CLUSTER_MAX_STAGES; i++) pthread_mutex_destroy(&p->st[i].send_lock);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    net_buf_free(&p->sendbuf);
    net_buf_free(&p->formbuf);
    free(p->slot_epoch);
    free(p->config_json);
    free(p->secret);
    free(p);
}

static const struct executor_ops pipeline_ops = {pl_submit, pl_wait, pl_health, pl_free};

void pipeline_get_status(struct executor *x, struct pipeline_status *out)
{
    struct pipeline *p = pl(x);
    memset(out, 0, sizeof(*out));
    pthread_mutex_lock(&p->lock);
    out->n_stages = p->n;
    out->healthy = p->healthy;
    snprintf(out->reason, sizeof(out->reason), "%s", p->reason);
    out->epoch = p->epoch;
    out->reforms = p->reforms;
    out->batches_failed = p->batches_failed;
    for (int i = 0; i < p->n; i++) {
        const struct pstage *s = &p->st[i];
        struct stage_status *o = &out->st[i];
        snprintf(o->addr, sizeof(o->addr), "%s", s->addr);
        snprintf(o->name, sizeof(o->name), "%s", s->info.name);
        o->info = s->info;
        o->layer_begin = s->plan.layer_begin;
        o->layer_end = s->plan.layer_end;
        o->connected = s->connected;
        o->verified = s->verified;
        o->compute_s = s->compute_s;
        o->batches = s->batches;
        snprintf(o->error, sizeof(o->error), "%s", s->error);
        if (s->c && s->connected) {
            struct net_conn_stats cs;
            net_conn_get_stats(s->c, &cs);
            o->rtt_ms = (double)cs.last_rtt_ns * 1e-6;
            o->bytes_sent = cs.bytes_sent;
            o->bytes_recv = cs.bytes_recv;
            o->last_heard_s = (double)net_conn_idle_ns(s->c) * 1e-9;
        }
    }
    pthread_mutex_unlock(&p->lock);
}

static int split_addr(const char *addr, char *host, size_t host_cap, int *port, char *err)
{
    const char *colon = strrchr(addr, ':');
    if (!colon || colon == addr || !colon[1]) return err_set(err, ST_EINVAL, "worker address \"%s\" is not HOST:PORT", addr);
    char *end;
    long v = strtol(colon + 1, &end, 10);
    if (*end || v < 1 || v > 65535) return err_set(err, ST_EINVAL, "worker address \"%s\": bad port", addr);
    size_t hl = (size_t)(colon - addr);
    if (addr[0] == '[' && hl >= 2 && addr[hl - 1] == ']') { /* [v6]:port */
        addr++;
        hl -= 2;
    }
    if (hl >= host_cap) return err_set(err, ST_EINVAL, "worker address \"%s\": host too long", addr);
    memcpy(host, addr, hl);
    host[hl] = 0;
    *port = (int)v;
    return ST_OK;
}

int pipeline_init(struct executor **out, const struct pipeline_opts *o, const struct manifest *mf, char *err)
{
    *out = NULL;
    int rc = ST_OK;
    struct pipeline *p = calloc(1, sizeof(*p));
    if (!p) return err_set(err, ST_ENOMEM, "out of memory");
    p->o = *o;
    if (p->o.connect_timeout_ms <= 0) p->o.connect_timeout_ms = 5000;
    if (p->o.load_timeout_ms <= 0) p->o.load_timeout_ms = 600000;
    if (p->o.dead_ms <= 0) p->o.dead_ms = 3000;
    if (p->o.heartbeat_ms <= 0) p->o.heartbeat_ms = 500;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    for (int i = 0; i < CLUSTER_MAX_STAGES; i++) {
        pthread_mutex_init(&p->st[i].send_lock, NULL);
        p->st[i].p = p;
        p->st[i].idx = i;
    }
    net_buf_init(&p->sendbuf);
    net_buf_init(&p->formbuf);
    p->batch_timeout_ms = 120000;
    p->cfg = *o->cfg;
    p->mf = mf;
    snprintf(p->model_dir, sizeof(p->model_dir), "%s", o->model_dir ? o->model_dir : "");
    snprintf(p->device, sizeof(p->device), "%s", o->device ? o->device : "cpu");
    snprintf(p->layers, sizeof(p->layers), "%s", o->layers ? o->layers : "");
    if (o->random_config_json && !(p->config_json = st_strdup(o->random_config_json))) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    if (o->secret_bytes) {
        if (!(p->secret = malloc(o->secret_bytes))) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            goto fail;
        }
        memcpy(p->secret, o->secret, o->secret_bytes);
    }
    p->copts.node_name = "coordinator";
    p->copts.secret = p->secret;
    p->copts.secret_bytes = o->secret_bytes;
    p->copts.capabilities = NET_CAP_CHUNKED;
    /* bytes per layer from the manifest: every tensor of model.layers.0 */
    for (int i = 0; i < mf->n; i++)
        if (!strncmp(mf->entries[i].name, "model.layers.0.", 15)) p->bytes_per_layer += mf->entries[i].nbytes;
    p->base.ops = &pipeline_ops;
    p->base.n_slots = o->n_slots > 0 ? o->n_slots : 16;
    p->base.n_ctx = o->n_ctx > 0 ? o->n_ctx : ST_MIN(p->cfg.max_seq_len, 2048);
    p->base.max_batch = o->max_batch > 0 ? o->max_batch : 256;
    if (p->base.max_batch < p->base.n_slots) p->base.max_batch = p->base.n_slots;
    p->base.max_logits = p->base.n_slots;
    p->base.vocab = p->cfg.vocab_size;
    p->slot_epoch = calloc((size_t)p->base.n_slots, sizeof(int32_t));
    if (!p->slot_epoch) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    /* stages: optionally this process first, then the workers in the order given */
    int n = 0;
    if (o->coordinator_stage) {
        struct worker_opts wo = {.host = "127.0.0.1", .port = 0, .name = "coordinator-stage", .model_dir = o->model_dir,
                                 .secret = p->secret, .secret_bytes = o->secret_bytes, .n_threads = o->n_threads};
        if ((rc = backend_parse_device(p->device, &wo.kind, &wo.device, err)) < 0) goto fail;
        if ((rc = worker_start(&p->internal, &wo, err)) < 0) goto fail;
        snprintf(p->st[0].host, sizeof(p->st[0].host), "127.0.0.1");
        p->st[0].port = worker_port(p->internal);
        snprintf(p->st[0].addr, sizeof(p->st[0].addr), "127.0.0.1:%d (this process)", p->st[0].port);
        n = 1;
    }
    if (o->n_workers + n > CLUSTER_MAX_STAGES) {
        rc = err_set(err, ST_EINVAL, "at most %d stages", CLUSTER_MAX_STAGES);
        goto fail;
    }
    for (int i = 0; i < o->n_workers; i++, n++) {
        struct pstage *s = &p->st[n];
        if ((rc = split_addr(o->worker_addr[i], s->host, sizeof(s->host), &s->port, err)) < 0) goto fail;
        snprintf(s->addr, sizeof(s->addr), "%s", o->worker_addr[i]);
    }
    p->n = n;
    p->base.max_inflight = n;
    if (n < 1) {
        rc = err_set(err, ST_EINVAL, "no stages: give --worker HOST:PORT (and/or let the coordinator run a stage)");
        goto fail;
    }
    if ((rc = form(p, err)) < 0) goto fail;
    if (pthread_create(&p->monitor, NULL, monitor_main, p) != 0) {
        rc = err_set(err, ST_ENOMEM, "cannot start a thread");
        goto fail;
    }
    *out = &p->base;
    return ST_OK;
fail:
    pl_free(&p->base);
    return rc;
}
