/* sched: continuous batching. Requests from any thread join a bounded queue; one scheduler thread admits them
 * into KV slots at step boundaries, builds step batches (every decoding sequence's next token first, then prefill
 * chunks of waiting prompts up to the batch budget), keeps up to max_inflight micro-batches in the executor (one
 * per pipeline stage) and hands each sampled token to its request.
 *
 * Contract:
 * - sched_submit takes the request (caller keeps ownership of the memory) and guarantees exactly one on_done call
 *   for it, unless it returns an error (then none). After on_done the scheduler never touches the request again.
 * - on_token and on_done run on the scheduler thread; they must be quick (copy, signal, return). on_token
 *   returning true stops the sequence (stop string matched) and on_done(FINISH_STOP) follows.
 * - sched_cancel may be called from any thread at any time before on_done; the slot is freed at the next step
 *   boundary and on_done(FINISH_CANCELLED) follows.
 * - A failed batch (worker lost) ends its requests with FINISH_ERROR and the executor's message; the scheduler
 *   stays up.
 */
#ifndef STRATA_SCHED_H
#define STRATA_SCHED_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "core/core.h"
#include "engine/runner.h"
#include "sample/sample.h"

enum finish_reason { FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR, FINISH_COUNT };
const char *finish_reason_name(enum finish_reason r); /* "stop", "length", "cancelled", "error" */

struct gen_token {
    int32_t id;
    float logprob;
    int32_t n_top;
    const int32_t *top_ids;
    const float *top_lp;
};

struct gen_request {
    /* set by the caller */
    const int32_t *prompt;
    int n_prompt;
    struct sample_params sp;
    int max_tokens;   /* > 0 */
    int n_top;        /* top logprobs per token, 0..RUNNER_MAX_TOP */
    bool logprobs;    /* the sampled token's logprob is wanted (implied by n_top > 0) */
    bool ignore_eos;
    /* return true to stop the sequence */
    bool (*on_token)(void *ctx, const struct gen_token *t);
    void (*on_done)(void *ctx, enum finish_reason why, const char *err);
    void *ctx;
    /* scheduler-owned */
    _Atomic int cancel;
    int slot;
    int n_generated;
    uint64_t t_submit_ns, t_first_ns;
    struct gen_request *next;
};

struct sched_opts {
    int max_queue;       /* waiting requests beyond the slots (submit returns ST_EBUSY past it) */
    int prefill_chunk;   /* most prompt tokens of one sequence per step (0: executor max_batch) */
    const int32_t *eos_ids;
    int n_eos;
};

struct sched_stats {
    uint64_t requests_total, requests_finished[FINISH_COUNT];
    uint64_t prompt_tokens, generated_tokens;
    uint64_t steps, step_rows;
    int queue_depth, active;
    double ttft_sum_s;    /* time to first token, summed over requests that got one */
    uint64_t ttft_count;
    double itl_sum_s;     /* inter-token latency, summed */
    uint64_t itl_count;
    double busy_s;        /* time spent with work in the executor */
};

struct sched;

/* Starts the scheduler thread over an executor (borrowed; must outlive the scheduler). */
int sched_init(struct sched **out, struct executor *x, const struct sched_opts *o, char *err);
/* Stops the thread; pending requests end with FINISH_CANCELLED. */
void sched_free(struct sched *s);
/* Validates and enqueues. Errors: ST_EINVAL (bad parameters), ST_ERANGE (prompt + max_tokens over the context),
 * ST_EBUSY (queue full). */
int sched_submit(struct sched *s, struct gen_request *r, char *err);
void sched_cancel(struct sched *s, struct gen_request *r);
void sched_get_stats(struct sched *s, struct sched_stats *st);
/* The executor's health (see executor_ops.health). */
int sched_health(struct sched *s, char *why, size_t why_len);
int sched_n_ctx(const struct sched *s);
int sched_n_slots(const struct sched *s);

#endif
