/* metrics: the server's counters and latency histograms, and their Prometheus text rendering (format 0.0.4:
 * "# HELP" and "# TYPE" before each family, counters named *_total, histograms as cumulative _bucket{le} plus
 * _sum and _count). The scheduler's own counters and gauges are rendered from a sched_stats snapshot. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

#define MAX_BUCKETS 20
#define MAX_REQ_SERIES 96
#define MAX_ERR_SERIES 24

struct hist {
    const char *name, *help;
    const double *bounds;
    int n_bounds;
    uint64_t counts[MAX_BUCKETS]; /* per bucket, not cumulative */
    uint64_t count;
    double sum;
};

struct req_series {
    enum metrics_route route;
    int status;
    uint64_t n;
};

struct err_series {
    char type[40];
    uint64_t n;
};

struct metrics {
    pthread_mutex_t mu;
    struct req_series reqs[MAX_REQ_SERIES];
    int n_reqs;
    uint64_t reqs_dropped;
    struct err_series errs[MAX_ERR_SERIES];
    int n_errs;
    struct hist h[METRICS_HIST_COUNT];
    int64_t connections;
    double t_start;
};

static const char *route_names[METRICS_ROUTE_COUNT] = {
    "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize", "other",
};

static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0};
static const double itl_bounds[] = {0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5};
static const double e2e_bounds[] = {0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0};

int metrics_init(struct metrics **out, char *err)
{
    *out = NULL;
    struct metrics *m = calloc(1, sizeof(*m));
    if (!m) return err_set(err, ST_ENOMEM, "metrics: out of memory");
    pthread_mutex_init(&m->mu, NULL);
    m->h[METRICS_TTFT] = (struct hist){"strata_time_to_first_token_seconds",
                                       "Time from request arrival to the first generated token.", ttft_bounds,
                                       (int)ST_ARRAY_LEN(ttft_bounds), {0}, 0, 0};
    m->h[METRICS_ITL] = (struct hist){"strata_inter_token_latency_seconds",
                                      "Time between consecutive generated tokens of a request.", itl_bounds,
                                      (int)ST_ARRAY_LEN(itl_bounds), {0}, 0, 0};
    m->h[METRICS_E2E] = (struct hist){"strata_e2e_request_latency_seconds",
                                      "Time from request arrival to the end of generation.", e2e_bounds,
                                      (int)ST_ARRAY_LEN(e2e_bounds), {0}, 0, 0};
    m->t_start = time_s();
    *out = m;
    return ST_OK;
}

void metrics_free(struct metrics *m)
{
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void metrics_request(struct metrics *m, enum metrics_route route, int status)
{
    if (route < 0 || route >= METRICS_ROUTE_COUNT) route = METRICS_ROUTE_OTHER;
    pthread_mutex_lock(&m->mu);
    int i;
    for (i = 0; i < m->n_reqs; i++)
        if (m->reqs[i].route == route && m->reqs[i].status == status) break;
    if (i == m->n_reqs) {
        if (m->n_reqs == MAX_REQ_SERIES) {
            m->reqs_dropped++; /* bounded label cardinality */
            pthread_mutex_unlock(&m->mu);
            return;
        }
        m->reqs[m->n_reqs++] = (struct req_series){route, status, 0};
    }
    m->reqs[i].n++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_error(struct metrics *m, const char *type)
{
    if (!type) type = "unknown";
    pthread_mutex_lock(&m->mu);
    int i;
    for (i = 0; i < m->n_errs; i++)
        if (!strcmp(m->errs[i].type, type)) break;
    if (i == m->n_errs) {
        if (m->n_errs == MAX_ERR_SERIES) i = m->n_errs - 1; /* folded into the last series */
        else {
            snprintf(m->errs[i].type, sizeof(m->errs[i].type), "%s", type);
            m->errs[i].n = 0;
            m->n_errs++;
        }
    }
    m->errs[i].n++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_observe(struct metrics *m, enum metrics_hist h, double seconds)
{
    if (h < 0 || h >= METRICS_HIST_COUNT || !(seconds >= 0)) return;
    pthread_mutex_lock(&m->mu);
    struct hist *x = &m->h[h];
    int b = 0;
    while (b < x->n_bounds && seconds > x->bounds[b]) b++;
    if (b < x->n_bounds) x->counts[b]++;
    x->count++;
    x->sum += seconds;
    pthread_mutex_unlock(&m->mu);
}

void metrics_connections(struct metrics *m, int delta)
{
    pthread_mutex_lock(&m->mu);
    m->connections += delta;
    pthread_mutex_unlock(&m->mu);
}

/* Label values: backslash, double quote and newline escaped. */
static int label_value(struct text_buf *o, const char *s)
{
    int rc = ST_OK;
    for (; *s && rc == ST_OK; s++) {
        if (*s == '\\') rc = text_buf_append(o, "\\\\", 2);
        else if (*s == '"') rc = text_buf_append(o, "\\\"", 2);
        else if (*s == '\n') rc = text_buf_append(o, "\\n", 2);
        else rc = text_buf_append(o, s, 1);
    }
    return rc;
}

static int family(struct text_buf *o, const char *name, const char *type, const char *help)
{
    return text_buf_printf(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static int scalar(struct text_buf *o, const char *name, const char *type, const char *help, double v)
{
    int rc = family(o, name, type, help);
    return rc < 0 ? rc : text_buf_printf(o, "%s %.17g\n", name, v);
}

/* The server's own series; called with the lock held. */
static int render_own(struct metrics *m, struct text_buf *o)
{
    int rc;
#define TRY(x) do { if ((rc = (x)) < 0) return rc; } while (0)
    TRY(family(o, "strata_http_requests_total", "counter", "HTTP requests answered, by route and status code."));
    for (int i = 0; i < m->n_reqs; i++) {
        TRY(text_buf_printf(o, "strata_http_requests_total{route=\""));
        TRY(label_value(o, route_names[m->reqs[i].route]));
        TRY(text_buf_printf(o, "\",status=\"%d\"} %llu\n", m->reqs[i].status, (unsigned long long)m->reqs[i].n));
    }
    TRY(family(o, "strata_errors_total", "counter", "Errors returned to clients or met during generation, by type."));
    for (int i = 0; i < m->n_errs; i++) {
        TRY(text_buf_printf(o, "strata_errors_total{type=\""));
        TRY(label_value(o, m->errs[i].type));
        TRY(text_buf_printf(o, "\"} %llu\n", (unsigned long long)m->errs[i].n));
    }
    for (int h = 0; h < METRICS_HIST_COUNT; h++) {
        const struct hist *x = &m->h[h];
        TRY(family(o, x->name, "histogram", x->help));
        uint64_t cum = 0;
        for (int b = 0; b < x->n_bounds; b++) {
            cum += x->counts[b];
            TRY(text_buf_printf(o, "%s_bucket{le=\"%g\"} %llu\n", x->name, x->bounds[b], (unsigned long long)cum));
        }
        TRY(text_buf_printf(o, "%s_bucket{le=\"+Inf\"} %llu\n", x->name, (unsigned long long)x->count));
        TRY(text_buf_printf(o, "%s_sum %.17g\n%s_count %llu\n", x->name, x->sum, x->name, (unsigned long long)x->count));
    }
    TRY(scalar(o, "strata_http_connections", "gauge", "Open HTTP connections.", (double)m->connections));
    TRY(scalar(o, "strata_uptime_seconds", "gauge", "Seconds since the server started.", time_s() - m->t_start));
    return ST_OK;
}

static int render_sched(const struct sched_stats *st, int n_slots, struct text_buf *o)
{
    int rc;
    TRY(scalar(o, "strata_requests_submitted_total", "counter", "Generation requests accepted by the scheduler.",
               (double)st->requests_total));
    TRY(family(o, "strata_request_finished_total", "counter", "Generation requests finished, by finish reason."));
    for (int r = 0; r < FINISH_COUNT; r++)
        TRY(text_buf_printf(o, "strata_request_finished_total{finish_reason=\"%s\"} %llu\n",
                            finish_reason_name((enum finish_reason)r), (unsigned long long)st->requests_finished[r]));
    TRY(scalar(o, "strata_prompt_tokens_total", "counter", "Prompt tokens accepted (tokens in).", (double)st->prompt_tokens));
    TRY(scalar(o, "strata_generation_tokens_total", "counter", "Tokens generated (tokens out).",
               (double)st->generated_tokens));
    TRY(scalar(o, "strata_queue_depth", "gauge", "Requests waiting for a KV slot.", (double)st->queue_depth));
    TRY(scalar(o, "strata_active_sequences", "gauge", "Sequences holding a KV slot (prefilling or decoding).",
               (double)st->active));
    TRY(scalar(o, "strata_kv_slots", "gauge", "KV cache slots (most concurrent sequences).", (double)n_slots));
    TRY(scalar(o, "strata_engine_steps_total", "counter", "Step batches run by the engine.", (double)st->steps));
    TRY(scalar(o, "strata_engine_step_rows_total", "counter", "Token rows forwarded in step batches.",
               (double)st->step_rows));
    TRY(scalar(o, "strata_engine_busy_seconds_total", "counter", "Seconds the engine spent with work in flight.",
               st->busy_s));
#undef TRY
    return ST_OK;
}

int metrics_render(struct metrics *m, const struct sched_stats *st, int n_slots, struct text_buf *o)
{
    pthread_mutex_lock(&m->mu);
    int rc = render_own(m, o);
    pthread_mutex_unlock(&m->mu);
    if (rc < 0) return rc;
    return st ? render_sched(st, n_slots, o) : ST_OK;
}
