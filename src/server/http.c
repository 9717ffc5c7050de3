/* http: the libmicrohttpd daemon, routing, authentication, limits, and the life of a generation job.
 *
 * Threads: libmicrohttpd runs one thread per connection; the access handler and the streaming reader run on it
 * and may block (waiting on their job's condition variable, 50 ms at a time, checking whether the client is
 * still there). The scheduler thread calls job_on_token / job_on_done, which only decode, match stop strings,
 * append and signal under the job's lock.
 *
 * Job lifetime: reference counted. One reference for the HTTP request (dropped when libmicrohttpd reports the
 * request completed), one for the scheduler (dropped in on_done, which the scheduler guarantees exactly once),
 * one for a streaming reader (dropped when libmicrohttpd frees the response). Lock order: server.mu -> job.mu
 * -> metrics; the scheduler calls back without holding its own lock, so sched_cancel under job.mu is safe. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "server/server.h"

#define WAIT_SLICE_MS 50
#define KEEPALIVE_S 10.0 /* at most; and under half the idle timeout, or libmicrohttpd drops a quiet stream */
#define STOP_GRACE_S 3.0

enum route_id {
    R_CHAT, R_COMPLETIONS, R_MODELS, R_MODEL, R_HEALTH, R_METRICS, R_TOKENIZE, R_DETOKENIZE, R_CLUSTER, R_PAGE, R_PAGE_INDEX,
    R_COUNT
};

struct route_def {
    const char *path;   /* exact path, or a prefix when prefix is set */
    bool prefix;
    bool post;          /* POST (else GET/HEAD) */
    bool open;          /* no API key needed */
    enum metrics_route mroute;
};

static const struct route_def routes[R_COUNT] = {
    [R_CHAT] = {"/v1/chat/completions", false, true, false, METRICS_ROUTE_CHAT},
    [R_COMPLETIONS] = {"/v1/completions", false, true, false, METRICS_ROUTE_COMPLETIONS},
    [R_MODELS] = {"/v1/models", false, false, false, METRICS_ROUTE_MODELS},
    [R_MODEL] = {"/v1/models/", true, false, false, METRICS_ROUTE_MODELS},
    [R_HEALTH] = {"/health", false, false, true, METRICS_ROUTE_HEALTH},
    [R_METRICS] = {"/metrics", false, false, true, METRICS_ROUTE_METRICS},
    [R_TOKENIZE] = {"/tokenize", false, true, false, METRICS_ROUTE_TOKENIZE},
    [R_DETOKENIZE] = {"/detokenize", false, true, false, METRICS_ROUTE_DETOKENIZE},
    [R_CLUSTER] = {"/v1/cluster", false, false, false, METRICS_ROUTE_OTHER},
    /* the web page (webui.c): open, its script asks for the key and sends it to the API */
    [R_PAGE] = {"/", false, false, true, METRICS_ROUTE_OTHER},
    [R_PAGE_INDEX] = {"/index.html", false, false, true, METRICS_ROUTE_OTHER},
};

struct server;

struct job {
    struct server *srv;
    /* set before submit, then read-only */
    struct api_request req;
    struct api_prompt prompt;
    struct gen_request g;
    char id[64];
    int64_t created;
    int fd;                  /* the client's socket, to notice a disconnect */
    double t_arrival;
    bool has_tok;
    char *piece;             /* detok output buffer (scheduler thread) */
    size_t piece_cap;
    /* under mu */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    bool submitted, done, oom;
    enum finish_reason why;
    char err[ST_ERR_LEN];
    struct detok_stream ds;
    struct textproc tp;
    struct api_token *toks;
    int n_toks, cap_toks;
    int32_t stop_id;
    double t_last;
    /* streaming state (the connection thread only) */
    struct text_buf out;
    size_t out_off, sent_content, sent_reasoning, text_offset;
    int sent_toks;
    bool sent_first, eof;
    double t_keepalive;
    /* server list, under srv->mu */
    struct job *prev, *next;
};

struct http_req {
    enum route_id route;     /* R_COUNT: unknown */
    char method[16], path[160];
    double t0;
    struct text_buf body;
    bool too_large;
    int status;
    struct job *job;
};

struct server {
    struct MHD_Daemon *d;
    struct sched *sched;
    const struct tokenizer *tok;
    const struct chat_template *tmpl;
    struct server_opts o;
    char *host, *api_key, *model_name;
    struct api_limits lim;
    int32_t eos[MODEL_MAX_EOS];
    int n_eos;
    struct metrics *metrics;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    struct job *jobs;
    int n_jobs;
    atomic_bool stopping;
    double t_stop;
    double keepalive_s; /* a quiet stream gets an SSE comment this often */
    int port;
    int64_t created;
};

/* ---- helpers ---- */

static void deadline_in(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_nsec += (long)ms * 1000000L;
    while (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

/* True when the client closed its end (or the socket failed). Pipelined bytes do not count. */
static bool peer_gone(int fd)
{
    if (fd < 0) return false;
    char c;
    ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n == 0) return true;
    return n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

static bool stop_overdue(struct server *srv)
{
    return atomic_load(&srv->stopping) && time_s() - srv->t_stop > STOP_GRACE_S;
}

static enum MHD_Result send_body(struct MHD_Connection *c, struct http_req *q, int status, char *body, size_t len,
                                 const char *ctype)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (status == 405) MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, routes[q->route].post ? "POST" : "GET, HEAD");
    if (status == 401) MHD_add_response_header(r, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer");
    q->status = status;
    enum MHD_Result ret = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, struct http_req *q, int status, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(j);
    if (!s) return MHD_NO;
    size_t n = strlen(s);
    return send_body(c, q, status, s, n, "application/json");
}

static enum MHD_Result send_error(struct server *srv, struct MHD_Connection *c, struct http_req *q,
                                  const struct api_error *e)
{
    metrics_error(srv->metrics, e->type);
    return send_json(c, q, e->status, api_error_json(e));
}

static enum MHD_Result fail(struct server *srv, struct MHD_Connection *c, struct http_req *q, int status,
                            const char *param, const char *msg)
{
    struct api_error e;
    api_error_set(&e, status, param, "%s", msg);
    return send_error(srv, c, q, &e);
}

/* ---- jobs ---- */

static struct job *job_new(struct server *srv, double t_arrival)
{
    struct job *j = calloc(1, sizeof(*j));
    if (!j) return NULL;
    j->srv = srv;
    j->refs = 1;
    j->fd = -1;
    j->stop_id = -1;
    j->t_arrival = t_arrival;
    pthread_mutex_init(&j->mu, NULL);
    pthread_cond_init(&j->cv, NULL);
    pthread_mutex_lock(&srv->mu);
    j->next = srv->jobs;
    if (srv->jobs) srv->jobs->prev = j;
    srv->jobs = j;
    srv->n_jobs++;
    pthread_mutex_unlock(&srv->mu);
    return j;
}

static void job_release(struct job *j)
{
    pthread_mutex_lock(&j->mu);
    int left = --j->refs;
    pthread_mutex_unlock(&j->mu);
    if (left > 0) return;
    struct server *srv = j->srv;
    pthread_mutex_lock(&srv->mu);
    if (j->prev) j->prev->next = j->next;
    else srv->jobs = j->next;
    if (j->next) j->next->prev = j->prev;
    srv->n_jobs--;
    pthread_cond_broadcast(&srv->cv);
    pthread_mutex_unlock(&srv->mu);
    api_request_free(&j->req);
    api_prompt_free(&j->prompt);
    textproc_free(&j->tp);
    text_buf_free(&j->out);
    free(j->toks);
    free(j->piece);
    pthread_mutex_destroy(&j->mu);
    pthread_cond_destroy(&j->cv);
    free(j);
}

/* Asks the scheduler to drop the job (a no-op once it is done). */
static void job_cancel(struct job *j)
{
    pthread_mutex_lock(&j->mu);
    if (j->submitted && !j->done) sched_cancel(j->srv->sched, &j->g);
    pthread_mutex_unlock(&j->mu);
}

static bool is_stop_token(const struct job *j, int32_t id)
{
    for (int i = 0; i < j->req.n_stop_ids; i++)
        if (j->req.stop_ids[i] == id) return true;
    if (!j->req.ignore_eos)
        for (int i = 0; i < j->srv->n_eos; i++)
            if (j->srv->eos[i] == id) return true;
    return false;
}

/* Scheduler thread: record the token, decode it, match stop strings, wake the connection thread. */
static bool job_on_token(void *ctx, const struct gen_token *t)
{
    struct job *j = ctx;
    double now = time_s();
    bool stop = false;
    pthread_mutex_lock(&j->mu);
    metrics_observe(j->srv->metrics, j->n_toks == 0 ? METRICS_TTFT : METRICS_ITL,
                    now - (j->n_toks == 0 ? j->t_arrival : j->t_last));
    j->t_last = now;
    if (j->n_toks == j->cap_toks) {
        int cap = j->cap_toks ? j->cap_toks * 2 : 64;
        struct api_token *p = realloc(j->toks, sizeof(*p) * (size_t)cap);
        if (!p) {
            j->oom = true;
            stop = true;
            goto out;
        }
        j->toks = p;
        j->cap_toks = cap;
    }
    struct api_token *a = &j->toks[j->n_toks++];
    a->id = t->id;
    a->logprob = t->logprob;
    a->n_top = ST_MIN(ST_MIN(t->n_top, j->req.top_logprobs), RUNNER_MAX_TOP);
    if (a->n_top < 0) a->n_top = 0;
    for (int k = 0; k < a->n_top; k++) {
        a->top_ids[k] = t->top_ids[k];
        a->top_lp[k] = t->top_lp[k];
    }
    if (is_stop_token(j, t->id)) {
        j->stop_id = t->id;
        stop = true;
    } else if (j->has_tok) {
        int n = detok_stream_push(&j->ds, t->id, j->piece, j->piece_cap);
        if (n > 0) {
            int rc = textproc_push(&j->tp, j->piece, (size_t)n);
            if (rc != 0) stop = true;
            if (rc < 0) j->oom = true;
        }
    }
out:
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    return stop;
}

static void job_on_done(void *ctx, enum finish_reason why, const char *err)
{
    struct job *j = ctx;
    struct server *srv = j->srv;
    pthread_mutex_lock(&j->mu);
    if (j->has_tok && !j->tp.stopped && (why == FINISH_STOP || why == FINISH_LENGTH)) {
        int n = detok_stream_flush(&j->ds, j->piece, j->piece_cap);
        if (n > 0 && textproc_push(&j->tp, j->piece, (size_t)n) < 0) j->oom = true;
    }
    if (textproc_finish(&j->tp) < 0) j->oom = true;
    j->done = true;
    j->why = why;
    snprintf(j->err, sizeof(j->err), "%s", err ? err : "");
    if ((why == FINISH_STOP || why == FINISH_LENGTH) && j->n_toks > 0)
        metrics_observe(srv->metrics, METRICS_E2E, time_s() - j->t_arrival);
    if (why == FINISH_ERROR) metrics_error(srv->metrics, "generation_error");
    pthread_cond_broadcast(&j->cv);
    pthread_mutex_unlock(&j->mu);
    job_release(j);
}

static const char *job_finish_reason(const struct job *j)
{
    if (j->tp.stopped || j->stop_id >= 0) return "stop";
    return j->why == FINISH_LENGTH ? "length" : "stop";
}

/* The error a job that did not finish normally reports (false when it finished normally). */
static bool job_error(struct job *j, struct api_error *e)
{
    if (j->oom) {
        api_error_set(e, 500, NULL, "out of memory while generating");
        return true;
    }
    if (j->why == FINISH_ERROR) {
        api_error_set(e, 500, NULL, "generation failed: %s", j->err[0] ? j->err : "unknown error");
        return true;
    }
    if (j->why == FINISH_CANCELLED) {
        api_error_set(e, 503, NULL, "the request was cancelled: %s",
                      atomic_load(&j->srv->stopping) ? "the server is shutting down" : (j->err[0] ? j->err : "cancelled"));
        return true;
    }
    return false;
}

static void job_result(struct job *j, struct api_result *res)
{
    memset(res, 0, sizeof(*res));
    res->id = j->id;
    res->created = j->created;
    res->model = j->srv->model_name;
    res->n_prompt = j->prompt.n_ids;
    res->n_completion = j->n_toks;
    res->stop_id = j->stop_id;
    res->stop_str = j->tp.stopped && j->tp.stop_index >= 0 ? j->tp.stops[j->tp.stop_index] : NULL;
}

/* ---- streaming ---- */

static int sse_event(struct job *j, json_t *chunk)
{
    char *s = chunk ? json_dumps(chunk, JSON_COMPACT | JSON_REAL_PRECISION(9)) : NULL;
    json_decref(chunk);
    if (!s) return ST_ENOMEM;
    int rc = text_buf_printf(&j->out, "data: %s\n\n", s);
    free(s);
    return rc;
}

/* Waits for news from the scheduler and renders it as SSE events into j->out. ST_ECLOSED: the client left. */
static int stream_next(struct job *j)
{
    struct server *srv = j->srv;
    struct api_result res;
    bool chat = j->req.kind == API_CHAT;
    if (!j->sent_first) {
        j->sent_first = true;
        j->t_keepalive = time_s();
        if (chat) {
            pthread_mutex_lock(&j->mu);
            job_result(j, &res);
            pthread_mutex_unlock(&j->mu);
            res.first = true;
            res.n_completion = 0;
            return sse_event(j, api_chunk_json(&j->req, &res, srv->tok));
        }
    }
    pthread_mutex_lock(&j->mu);
    for (;;) {
        bool news = j->tp.content.len > j->sent_content || j->tp.reasoning.len > j->sent_reasoning ||
                    (j->req.logprobs && j->n_toks > j->sent_toks);
        if (news || j->done) break;
        struct timespec ts;
        deadline_in(&ts, WAIT_SLICE_MS);
        pthread_cond_timedwait(&j->cv, &j->mu, &ts);
        if (j->done) continue;
        if (peer_gone(j->fd) || stop_overdue(srv)) {
            if (j->submitted && !j->done) sched_cancel(srv->sched, &j->g);
            pthread_mutex_unlock(&j->mu);
            return ST_ECLOSED;
        }
        if (time_s() - j->t_keepalive > srv->keepalive_s) {
            pthread_mutex_unlock(&j->mu);
            j->t_keepalive = time_s();
            return text_buf_append(&j->out, ": keep-alive\n\n", 14);
        }
    }
    /* copy the deltas out, render without the lock */
    struct text_buf content = {0}, reasoning = {0};
    int rc = ST_OK, n_new = j->n_toks - j->sent_toks;
    struct api_token *toks = NULL;
    if (n_new > 0 && j->req.logprobs) {
        toks = malloc(sizeof(*toks) * (size_t)n_new);
        if (toks) memcpy(toks, j->toks + j->sent_toks, sizeof(*toks) * (size_t)n_new);
        else rc = ST_ENOMEM;
    }
    if (rc == ST_OK) rc = text_buf_append(&content, j->tp.content.s + j->sent_content, j->tp.content.len - j->sent_content);
    if (rc == ST_OK)
        rc = text_buf_append(&reasoning, j->tp.reasoning.s + j->sent_reasoning, j->tp.reasoning.len - j->sent_reasoning);
    j->sent_content = j->tp.content.len;
    j->sent_reasoning = j->tp.reasoning.len;
    j->sent_toks = j->n_toks;
    bool done = j->done;
    job_result(j, &res);
    struct api_error e;
    bool failed = done && job_error(j, &e);
    pthread_mutex_unlock(&j->mu);
    if (rc < 0) goto out;
    j->t_keepalive = time_s();
    if (content.len || reasoning.len || (toks && n_new > 0)) {
        struct api_result d = res;
        d.content = content.s;
        d.content_len = content.len;
        d.reasoning = reasoning.len ? reasoning.s : NULL;
        d.reasoning_len = reasoning.len;
        d.tokens = toks;
        d.n_tokens = toks ? n_new : 0;
        d.text_offset = j->text_offset;
        d.stop_id = -1;
        d.stop_str = NULL;
        if ((rc = sse_event(j, api_chunk_json(&j->req, &d, srv->tok))) < 0) goto out;
        for (int i = 0; i < d.n_tokens; i++) {
            char s[512];
            api_token_str(srv->tok, toks[i].id, j->req.tokens_as_ids, s, sizeof(s));
            for (const unsigned char *p = (const unsigned char *)s; *p; p++) j->text_offset += (*p & 0xC0) != 0x80;
        }
    }
    if (done) {
        if (failed) {
            metrics_error(srv->metrics, e.type);
            if ((rc = sse_event(j, api_error_json(&e))) < 0) goto out;
        } else {
            struct api_result f = res;
            f.finish_reason = job_finish_reason(j);
            if ((rc = sse_event(j, api_chunk_json(&j->req, &f, srv->tok))) < 0) goto out;
            if (j->req.include_usage && (rc = sse_event(j, api_usage_chunk_json(&j->req, &res))) < 0) goto out;
        }
        if ((rc = text_buf_append(&j->out, "data: [DONE]\n\n", 14)) < 0) goto out;
        j->eof = true;
    }
out:
    free(toks);
    text_buf_free(&content);
    text_buf_free(&reasoning);
    return rc;
}

static ssize_t stream_read(void *cls, uint64_t pos, char *buf, size_t max)
{
    struct job *j = cls;
    for (;;) {
        if (j->out_off < j->out.len) {
            size_t n = ST_MIN(max, j->out.len - j->out_off);
            memcpy(buf, j->out.s + j->out_off, n);
            j->out_off += n;
            return (ssize_t)n;
        }
        j->out.len = 0;
        j->out_off = 0;
        if (j->eof) return MHD_CONTENT_READER_END_OF_STREAM;
        if (stream_next(j) < 0) {
            job_cancel(j);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

static void stream_free(void *cls)
{
    struct job *j = cls;
    job_cancel(j);
    job_release(j);
}

/* ---- routes ---- */

static enum MHD_Result do_generate(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    struct api_error e;
    enum api_kind kind = q->route == R_CHAT ? API_CHAT : API_COMPLETION;
    struct job *j = job_new(srv, q->t0);
    if (!j) return fail(srv, c, q, 500, NULL, "out of memory");
    q->job = j;
    if (api_request_parse(&j->req, kind, q->body.s, q->body.len, &srv->lim, &e) < 0) return send_error(srv, c, q, &e);
    if (api_prompt_build(&j->req, srv->tok, srv->tmpl, &j->prompt, &e) < 0) return send_error(srv, c, q, &e);
    int max_tokens;
    if (api_request_budget(&j->req, j->prompt.n_ids, &srv->lim, &max_tokens, &e) < 0) return send_error(srv, c, q, &e);
    bool think = kind == API_CHAT && j->prompt.think;
    if (textproc_init(&j->tp, j->req.stop, j->req.n_stop, think, j->prompt.in_reasoning) < 0)
        return fail(srv, c, q, 500, NULL, "out of memory");
    if (srv->tok) {
        j->has_tok = true;
        detok_stream_init(&j->ds, srv->tok, j->req.skip_special);
        j->piece_cap = tokenizer_stream_chunk_max(srv->tok) + 1;
        j->piece = malloc(j->piece_cap);
        if (!j->piece) return fail(srv, c, q, 500, NULL, "out of memory");
    }
    api_make_id(j->id, sizeof(j->id), kind == API_CHAT ? "chatcmpl-" : "cmpl-");
    j->created = (int64_t)time(NULL);
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    j->fd = ci ? ci->connect_fd : -1;
    struct gen_request *g = &j->g;
    g->prompt = j->prompt.ids;
    g->n_prompt = j->prompt.n_ids;
    g->sp = j->req.sp;
    g->max_tokens = max_tokens;
    g->n_top = j->req.logprobs ? j->req.top_logprobs : 0;
    g->logprobs = j->req.logprobs;
    g->ignore_eos = j->req.ignore_eos;
    g->on_token = job_on_token;
    g->on_done = job_on_done;
    g->ctx = j;
    char err[ST_ERR_LEN];
    pthread_mutex_lock(&j->mu);
    j->refs++; /* the scheduler's */
    int rc = sched_submit(srv->sched, g, err);
    if (rc < 0) j->refs--;
    else j->submitted = true;
    pthread_mutex_unlock(&j->mu);
    if (rc == ST_EBUSY) return fail(srv, c, q, 429, NULL, err);
    if (rc == ST_ERANGE) {
        api_error_set(&e, 400, "max_tokens", "%s", err);
        e.code = "context_length_exceeded";
        return send_error(srv, c, q, &e);
    }
    if (rc < 0) return fail(srv, c, q, rc == ST_EINVAL ? 400 : 500, NULL, err);

    if (j->req.stream) {
        struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384, stream_read, j, stream_free);
        if (!r) {
            job_cancel(j);
            return MHD_NO;
        }
        pthread_mutex_lock(&j->mu);
        j->refs++; /* the reader's, dropped in stream_free */
        pthread_mutex_unlock(&j->mu);
        MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
        MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
        MHD_add_response_header(r, "X-Accel-Buffering", "no");
        q->status = 200;
        enum MHD_Result ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    pthread_mutex_lock(&j->mu);
    while (!j->done) {
        struct timespec ts;
        deadline_in(&ts, WAIT_SLICE_MS);
        pthread_cond_timedwait(&j->cv, &j->mu, &ts);
        if (!j->done && (peer_gone(j->fd) || stop_overdue(srv))) {
            sched_cancel(srv->sched, &j->g);
            pthread_mutex_unlock(&j->mu);
            q->status = 499; /* client closed the request (nginx's code), for the log */
            return MHD_NO;
        }
    }
    pthread_mutex_unlock(&j->mu);
    /* done: the scheduler no longer writes the job */
    if (job_error(j, &e)) return send_error(srv, c, q, &e);
    struct api_result res;
    job_result(j, &res);
    res.content = j->tp.content.s;
    res.content_len = j->tp.content.len;
    if (j->tp.reasoned) { /* a think block was opened, by the prompt or the model: reported even when empty */
        res.reasoning = j->tp.reasoning.s;
        res.reasoning_len = j->tp.reasoning.len;
    }
    res.tokens = j->toks;
    res.n_tokens = j->n_toks;
    res.finish_reason = job_finish_reason(j);
    return send_json(c, q, 200, api_response_json(&j->req, &res, srv->tok));
}

static enum MHD_Result do_tokenize(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    struct api_error e;
    struct api_request r;
    struct api_prompt p;
    if (api_request_parse(&r, API_TOKENIZE, q->body.s, q->body.len, &srv->lim, &e) < 0) return send_error(srv, c, q, &e);
    if (api_prompt_build(&r, srv->tok, srv->tmpl, &p, &e) < 0) {
        api_request_free(&r);
        return send_error(srv, c, q, &e);
    }
    json_t *out = api_tokenize_json(p.ids, p.n_ids, srv->lim.n_ctx);
    api_prompt_free(&p);
    api_request_free(&r);
    return send_json(c, q, 200, out);
}

static enum MHD_Result do_detokenize(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    struct api_error e;
    struct api_request r;
    char err[ST_ERR_LEN];
    if (api_request_parse(&r, API_DETOKENIZE, q->body.s, q->body.len, &srv->lim, &e) < 0) return send_error(srv, c, q, &e);
    if (!srv->tok) {
        api_request_free(&r);
        return fail(srv, c, q, 400, NULL, "this server has no tokenizer");
    }
    char *text = NULL;
    size_t len = 0;
    int rc = tokenizer_decode(srv->tok, r.prompt_ids, r.n_prompt_ids, false, &text, &len, err);
    api_request_free(&r);
    if (rc < 0) return fail(srv, c, q, 400, "tokens", err);
    json_t *o = json_object();
    json_object_set_new(o, "prompt", json_stringn(text, len));
    free(text);
    return send_json(c, q, 200, o);
}

static enum MHD_Result do_health(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    char why[256] = "";
    json_t *o = json_object();
    if (atomic_load(&srv->stopping)) {
        json_object_set_new(o, "status", json_string("degraded"));
        json_object_set_new(o, "reason", json_string("the server is shutting down"));
        return send_json(c, q, 503, o);
    }
    int h = sched_health(srv->sched, why, sizeof(why));
    if (h == 1) {
        json_object_set_new(o, "status", json_string("ok"));
        return send_json(c, q, 200, o);
    }
    /* an executor still forming its pipeline reports a reason starting with "loading" */
    json_object_set_new(o, "status", json_string(strncmp(why, "loading", 7) == 0 ? "loading" : "degraded"));
    json_object_set_new(o, "reason", json_string(why[0] ? why : "the executor is not able to run batches"));
    return send_json(c, q, 503, o);
}

static enum MHD_Result do_metrics(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    struct sched_stats st;
    struct text_buf b = {0};
    sched_get_stats(srv->sched, &st);
    if (metrics_render(srv->metrics, &st, sched_n_slots(srv->sched), &b) < 0) {
        text_buf_free(&b);
        return fail(srv, c, q, 500, NULL, "out of memory");
    }
    if (srv->o.status_metrics) srv->o.status_metrics(srv->o.status_ctx, &b);
    return send_body(c, q, 200, b.s, b.len, "text/plain; version=0.0.4; charset=utf-8");
}

static enum MHD_Result do_cluster(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    json_t *o = srv->o.status_json ? srv->o.status_json(srv->o.status_ctx) : NULL;
    if (!o) return fail(srv, c, q, 404, NULL, "no cluster status on this server");
    return send_json(c, q, 200, o);
}

/* The web page (static, open: the script sends the API key to the API), with a CSP that admits only its own
 * inline script and style. */
static enum MHD_Result do_page(struct server *srv, struct MHD_Connection *c, struct http_req *q)
{
    struct webui_page p;
    webui_page(srv->api_key != NULL, &p);
    struct MHD_Response *r = MHD_create_response_from_buffer(p.len, (void *)p.body, MHD_RESPMEM_PERSISTENT);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/html; charset=utf-8");
    MHD_add_response_header(r, "Content-Security-Policy", p.csp);
    MHD_add_response_header(r, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(r, "X-Frame-Options", "DENY");
    MHD_add_response_header(r, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    q->status = 200;
    enum MHD_Result ret = MHD_queue_response(c, 200, r);
    MHD_destroy_response(r);
    return ret;
}

/* ---- libmicrohttpd callbacks ---- */

static bool auth_ok(struct server *srv, struct MHD_Connection *c)
{
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return false;
    h += 7;
    while (*h == ' ') h++;
    size_t n = strlen(h), m = strlen(srv->api_key);
    unsigned char diff = (unsigned char)(n != m);
    for (size_t i = 0; i < m; i++) diff |= (unsigned char)(srv->api_key[i] ^ (i < n ? h[i] : 0));
    return diff == 0;
}

static bool json_content_type(const char *ct)
{
    if (!ct) return true; /* absent: taken as JSON */
    while (*ct == ' ') ct++;
    if (strncasecmp(ct, "application/json", 16) != 0) return false;
    return ct[16] == 0 || ct[16] == ';' || ct[16] == ' ';
}

static enum route_id route_find(const char *url)
{
    for (int i = 0; i < R_COUNT; i++) {
        const struct route_def *d = &routes[i];
        if (d->prefix ? (strncmp(url, d->path, strlen(d->path)) == 0 && url[strlen(d->path)] != 0)
                      : strcmp(url, d->path) == 0)
            return (enum route_id)i;
    }
    return R_COUNT;
}

/* Checks made as soon as the headers are in. Returns true when an error response was queued (in *ret). */
static bool early_checks(struct server *srv, struct MHD_Connection *c, struct http_req *q, const char *url,
                         const char *method, enum MHD_Result *ret)
{
    char msg[320];
    if (atomic_load(&srv->stopping)) {
        *ret = fail(srv, c, q, 503, NULL, "the server is shutting down");
        return true;
    }
    if (q->route == R_COUNT) {
        struct api_error e;
        api_error_set(&e, 404, NULL, "Not found: %.200s", url);
        *ret = send_error(srv, c, q, &e);
        return true;
    }
    const struct route_def *d = &routes[q->route];
    bool is_post = !strcmp(method, "POST"), is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    if (d->post ? !is_post : !is_get) {
        snprintf(msg, sizeof(msg), "method %.20s is not allowed on %.200s (use %s)", method, url, d->post ? "POST" : "GET");
        *ret = fail(srv, c, q, 405, NULL, msg);
        return true;
    }
    if (!d->open && srv->api_key && !auth_ok(srv, c)) {
        struct api_error e;
        api_error_set(&e, 401, NULL, "Incorrect or missing API key: send it as \"Authorization: Bearer KEY\".");
        e.code = "invalid_api_key";
        *ret = send_error(srv, c, q, &e);
        return true;
    }
    if (is_post) {
        const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
        if (!json_content_type(ct)) {
            snprintf(msg, sizeof(msg), "unsupported Content-Type \"%.100s\" (expected application/json)", ct);
            *ret = fail(srv, c, q, 415, NULL, msg);
            return true;
        }
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl) {
            char *end;
            errno = 0;
            unsigned long long n = strtoull(cl, &end, 10);
            if (errno || end == cl || n > srv->o.max_body_bytes) {
                snprintf(msg, sizeof(msg), "the request body is larger than the limit of %zu bytes", srv->o.max_body_bytes);
                *ret = fail(srv, c, q, 413, NULL, msg);
                return true;
            }
        }
    }
    return false;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload_data, size_t *upload_size, void **con_cls)
{
    struct server *srv = cls;
    struct http_req *q = *con_cls;
    enum MHD_Result ret;
    if (!q) {
        q = calloc(1, sizeof(*q));
        if (!q) return MHD_NO;
        *con_cls = q;
        q->t0 = time_s();
        snprintf(q->method, sizeof(q->method), "%s", method);
        snprintf(q->path, sizeof(q->path), "%s", url);
        q->route = route_find(url);
        if (early_checks(srv, c, q, url, method, &ret)) return ret;
        return MHD_YES;
    }
    if (*upload_size) {
        if (!q->too_large) {
            if (q->body.len + *upload_size > srv->o.max_body_bytes ||
                text_buf_append(&q->body, upload_data, *upload_size) < 0) {
                q->too_large = true; /* the rest is read and dropped, then 413 */
                text_buf_free(&q->body);
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (q->too_large) {
        char msg[128];
        snprintf(msg, sizeof(msg), "the request body is larger than the limit of %zu bytes", srv->o.max_body_bytes);
        return fail(srv, c, q, 413, NULL, msg);
    }
    switch (q->route) {
    case R_CHAT:
    case R_COMPLETIONS: return do_generate(srv, c, q);
    case R_TOKENIZE: return do_tokenize(srv, c, q);
    case R_DETOKENIZE: return do_detokenize(srv, c, q);
    case R_HEALTH: return do_health(srv, c, q);
    case R_METRICS: return do_metrics(srv, c, q);
    case R_CLUSTER: return do_cluster(srv, c, q);
    case R_PAGE:
    case R_PAGE_INDEX: return do_page(srv, c, q);
    case R_MODELS: return send_json(c, q, 200, api_models_json(srv->model_name, srv->lim.n_ctx, srv->created));
    case R_MODEL: {
        const char *id = url + strlen(routes[R_MODEL].path);
        if (strcmp(id, srv->model_name) != 0) {
            struct api_error e;
            api_error_set(&e, 404, "model", "The model `%.200s` does not exist.", id);
            e.code = "model_not_found";
            return send_error(srv, c, q, &e);
        }
        return send_json(c, q, 200, api_model_json(srv->model_name, srv->lim.n_ctx, srv->created));
    }
    default: return fail(srv, c, q, 404, NULL, "not found");
    }
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
    struct server *srv = cls;
    struct http_req *q = *con_cls;
    if (!q) return;
    *con_cls = NULL;
    double ms = (time_s() - q->t0) * 1e3;
    int status = q->status ? q->status : 500;
    if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && status == 200) status = 499;
    metrics_request(srv->metrics, q->route < R_COUNT ? routes[q->route].mroute : METRICS_ROUTE_OTHER, status);
    if (q->job) {
        struct job *j = q->job;
        pthread_mutex_lock(&j->mu);
        bool done = j->done;
        int n_prompt = j->prompt.n_ids, n_gen = j->n_toks;
        const char *fin = !done ? "-" : (j->why == FINISH_STOP || j->why == FINISH_LENGTH) ? job_finish_reason(j)
                                                                                         : finish_reason_name(j->why);
        pthread_mutex_unlock(&j->mu);
        LOGI("http", "%s %s %d %.1fms prompt=%d completion=%d finish=%s%s", q->method, q->path, status, ms, n_prompt,
             n_gen, fin, j->req.stream ? " stream" : "");
        job_cancel(j);
        job_release(j);
    } else {
        LOGI("http", "%s %s %d %.1fms", q->method, q->path, status, ms);
    }
    text_buf_free(&q->body);
    free(q);
}

static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context, enum MHD_ConnectionNotificationCode toe)
{
    struct server *srv = cls;
    metrics_connections(srv->metrics, toe == MHD_CONNECTION_NOTIFY_STARTED ? 1 : -1);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    vsnprintf(line, sizeof(line), fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
    LOGW("http", "libmicrohttpd: %s", line);
}

/* ---- server ---- */

static int resolve(const char *host, int port, struct sockaddr_storage *ss, bool *v6, char *err)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    char ports[16];
    snprintf(ports, sizeof(ports), "%d", port);
    int rc = getaddrinfo(host, ports, &hints, &res);
    if (rc != 0 || !res) return err_set(err, ST_EINVAL, "cannot resolve host \"%s\": %s", host, gai_strerror(rc));
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, res->ai_addr, ST_MIN((size_t)res->ai_addrlen, sizeof(*ss)));
    *v6 = res->ai_family == AF_INET6;
    freeaddrinfo(res);
    return ST_OK;
}

int server_init(struct server **out, struct sched *s, const struct tokenizer *tok, const struct chat_template *tmpl,
                const int32_t *eos_ids, int n_eos, const struct server_opts *o, char *err)
{
    int rc;
    *out = NULL;
    if (!s || !o) return err_set(err, ST_EINVAL, "server: no scheduler or options");
    if (o->port < 0 || o->port > 65535) return err_set(err, ST_EINVAL, "server: port %d outside [0, 65535]", o->port);
    if (o->vocab < 1) return err_set(err, ST_EINVAL, "server: the vocabulary size is not set");
    struct server *srv = calloc(1, sizeof(*srv));
    if (!srv) return err_set(err, ST_ENOMEM, "server: out of memory");
    pthread_mutex_init(&srv->mu, NULL);
    pthread_cond_init(&srv->cv, NULL);
    atomic_init(&srv->stopping, false);
    srv->sched = s;
    srv->tok = tok;
    srv->tmpl = tmpl;
    srv->o = *o;
    if (!srv->o.max_body_bytes) srv->o.max_body_bytes = 4u << 20;
    if (srv->o.max_connections <= 0) srv->o.max_connections = 256;
    if (srv->o.timeout_s <= 0) srv->o.timeout_s = 60;
    if (!srv->o.max_header_bytes) srv->o.max_header_bytes = 64u << 10;
    srv->keepalive_s = ST_MIN(KEEPALIVE_S, srv->o.timeout_s / 2.0);
    srv->host = st_strdup(o->host && o->host[0] ? o->host : "127.0.0.1");
    srv->model_name = st_strdup(o->model_name && o->model_name[0] ? o->model_name : "strata");
    srv->api_key = o->api_key && o->api_key[0] ? st_strdup(o->api_key) : NULL;
    if (!srv->host || !srv->model_name || (o->api_key && o->api_key[0] && !srv->api_key)) {
        rc = err_set(err, ST_ENOMEM, "server: out of memory");
        goto fail;
    }
    srv->o.host = srv->host;
    srv->o.model_name = srv->model_name;
    srv->o.api_key = srv->api_key;
    srv->n_eos = ST_MIN(n_eos, MODEL_MAX_EOS);
    for (int i = 0; i < srv->n_eos; i++) srv->eos[i] = eos_ids[i];
    srv->lim = (struct api_limits){srv->model_name, o->vocab, sched_n_ctx(s), RUNNER_MAX_TOP};
    srv->created = (int64_t)time(NULL);
    if ((rc = metrics_init(&srv->metrics, err)) < 0) goto fail;
    struct sockaddr_storage ss;
    bool v6 = false;
    if ((rc = resolve(srv->host, o->port, &ss, &v6, err)) < 0) goto fail;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG;
    if (v6) flags |= MHD_USE_IPv6;
    srv->d = MHD_start_daemon(flags, (uint16_t)o->port, NULL, NULL, on_request, srv,
                              MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv, /* first, so that it sees everything */
                              MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
                              MHD_OPTION_CONNECTION_LIMIT, (unsigned)srv->o.max_connections,
                              MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)srv->o.timeout_s,
                              MHD_OPTION_CONNECTION_MEMORY_LIMIT, srv->o.max_header_bytes,
                              MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
                              MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv,
                              MHD_OPTION_END);
    if (!srv->d) {
        rc = err_set(err, ST_EIO, "server: cannot listen on %s:%d (address in use or not available)", srv->host, o->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(srv->d, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = di ? di->port : o->port;
    *out = srv;
    return ST_OK;
fail:
    server_free(srv);
    return rc;
}

int server_port(const struct server *srv) { return srv->port; }

void server_free(struct server *srv)
{
    if (!srv) return;
    if (srv->d) {
        srv->t_stop = time_s();
        atomic_store(&srv->stopping, true);
        /* end in-flight generations: their clients get an error event or a 503 */
        pthread_mutex_lock(&srv->mu);
        for (struct job *j = srv->jobs; j; j = j->next) job_cancel(j);
        /* give connections a moment to deliver those answers */
        while (srv->n_jobs > 0 && time_s() - srv->t_stop < STOP_GRACE_S) {
            struct timespec ts;
            deadline_in(&ts, WAIT_SLICE_MS);
            pthread_cond_timedwait(&srv->cv, &srv->mu, &ts);
        }
        pthread_mutex_unlock(&srv->mu);
        MHD_stop_daemon(srv->d);
        srv->d = NULL;
    }
    /* the scheduler still holds references to cancelled jobs until their on_done */
    pthread_mutex_lock(&srv->mu);
    double t_warn = time_s() + 5.0;
    while (srv->n_jobs > 0) {
        struct timespec ts;
        deadline_in(&ts, 200);
        pthread_cond_timedwait(&srv->cv, &srv->mu, &ts);
        if (srv->n_jobs > 0 && time_s() > t_warn) {
            LOGW("http", "waiting for the scheduler to end %d request(s)", srv->n_jobs);
            t_warn = time_s() + 5.0;
        }
    }
    pthread_mutex_unlock(&srv->mu);
    metrics_free(srv->metrics);
    pthread_mutex_destroy(&srv->mu);
    pthread_cond_destroy(&srv->cv);
    free(srv->host);
    free(srv->model_name);
    free(srv->api_key);
    free(srv);
}
