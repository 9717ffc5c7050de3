/* runner: a pipeline stage's step: an engine plus, on the last stage, one sampler per KV slot.
 *
 * The scheduler describes each step as a step_batch: the rows to forward (token, position, slot, whether to
 * sample), the sequences that start in this batch (their sampling settings and prompt, so the last stage can
 * build the sampler and apply repetition penalties) and the slots freed since the last batch. The same
 * description travels to every stage of a pipeline, so a split run does exactly what a single node does.
 *
 * Contract:
 * - runner_step applies frees, then starts, then forwards the rows; on the last stage it samples every row
 *   with sample=1 (in row order) and reports token id, its logprob and the top-k logprobs.
 * - Samplers are created at start (the only allocation, sized by the vocabulary) and freed at free.
 * - One caller at a time.
 */
#ifndef STRATA_RUNNER_H
#define STRATA_RUNNER_H

#include <stdbool.h>
#include <stdint.h>

#include "core/core.h"
#include "engine/engine.h"
#include "sample/sample.h"

#define RUNNER_MAX_TOP 20

struct step_row {
    int32_t token, pos, slot;
    uint8_t sample;
};

struct step_seq {
    int32_t slot;
    struct sample_params sp;
    int32_t n_top;      /* top logprobs wanted per sampled token (0..RUNNER_MAX_TOP) */
    uint8_t logprobs;   /* report the sampled token's logprob (a pass over the vocabulary; off saves it) */
    int32_t n_prompt;
    const int32_t *prompt;
};

struct step_batch {
    uint64_t tag;
    int n_rows;
    const struct step_row *rows;
    int n_start;
    const struct step_seq *starts;
    int n_free;
    const int32_t *frees;
};

struct step_out {
    int32_t slot;
    int32_t id;
    float logprob;      /* 0 unless the sequence asked for logprobs */
    int32_t n_top;
    int32_t top_ids[RUNNER_MAX_TOP];
    float top_lp[RUNNER_MAX_TOP];
};

struct runner;

int runner_init(struct runner **out, struct engine *e, char *err);
void runner_free(struct runner *r);
struct engine *runner_engine(struct runner *r);

/* Runs one step. hidden_in: [n_rows][dim] for a non-first stage. Non-last stage: hidden_out [n_rows][dim]
 * (host memory, caller-sized). Last stage: outs[] gets one entry per sampled row, *n_out their count. */
int runner_step(struct runner *r, const struct step_batch *b, const float *hidden_in, float *hidden_out,
                struct step_out *outs, int *n_out, char *err);

/* ---- executor: runs step batches somewhere (this process, or a pipeline of workers) ----
 * Asynchronous so that several micro-batches can be in flight (one per pipeline stage). submit copies what it
 * needs from the batch; wait returns one finished batch (outs stay valid until the next wait). A failed batch
 * comes back with status < 0 and a message: its sequences are lost on the executor side (their slots are free). */
struct step_result {
    uint64_t tag;
    int status;
    char err[ST_ERR_LEN];
    int n_out;
    const struct step_out *outs;
};

struct executor;

struct executor_ops {
    int (*submit)(struct executor *x, const struct step_batch *b, char *err);
    /* ST_ETIMEDOUT when nothing finished within timeout_ms */
    int (*wait)(struct executor *x, struct step_result *res, int timeout_ms);
    /* 1 when able to run batches; 0 with a reason when degraded (a worker lost, re-planning) */
    int (*health)(struct executor *x, char *why, size_t why_len);
    void (*free)(struct executor *x);
};

struct executor {
    const struct executor_ops *ops;
    int n_slots, n_ctx, max_batch, max_logits;
    int max_inflight; /* micro-batches the executor can overlap (1 for a single node) */
    int vocab;
};

/* An executor over a runner in this process (runs the batch inside submit). Borrows the runner. */
int executor_local_init(struct executor **out, struct runner *r, char *err);

#endif
