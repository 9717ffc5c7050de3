/* engine: the transformer forward pass over a model's layer range, on a backend, with a KV cache of n_slots
 * sequences x n_ctx positions.
 *
 * Contract:
 * - Everything (activations, KV cache, rope tables) is allocated in engine_init; engine_forward allocates nothing.
 * - A batch is a list of tokens, each with its sequence slot and position; tokens of several sequences mix freely
 *   (prefill chunks and decode steps together). Tokens of one slot must appear with increasing positions; a
 *   token at position p attends to positions [0, p] of its slot, so positions < p must have been forwarded
 *   before or earlier in the same batch.
 * - First stage (model has the embedding): input is token ids. Other stages: input is hidden [n][dim] float32.
 *   Last stage (model has the head): output is logits [n_out][vocab] for the rows flagged in want_logits, in
 *   order. Other stages: output is hidden [n][dim] float32. Hidden states are raw float32 rows, so a split run is
 *   bit-identical to a single-node run on the same kernels.
 * - One caller at a time (the scheduler thread owns the engine).
 */
#ifndef STRATA_ENGINE_H
#define STRATA_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "model/model.h"

struct engine_opts {
    int n_slots;      /* concurrent sequences (KV cache slots) */
    int n_ctx;        /* positions per slot */
    int max_batch;    /* most tokens per forward (prefill chunk size) */
    int max_logits;   /* most rows with want_logits per forward (0: n_slots) */
    struct backend_opts backend;
};

struct batch {
    int n;
    const int32_t *token;       /* [n] (first stage) */
    const int32_t *pos;         /* [n] */
    const int32_t *slot;        /* [n] */
    const uint8_t *want_logits; /* [n] (last stage) */
};

struct engine_stats {
    uint64_t n_forward, n_tokens;
    double forward_s; /* total compute time */
};

struct engine;

/* The engine borrows the model (it must outlive the engine). */
int engine_init(struct engine **out, struct model *m, const struct engine_opts *o, char *err);
void engine_free(struct engine *e);

/* in_hidden: [n][dim] for a non-first stage (NULL for the first). out: logits [n_out][vocab] (last stage) or
 * hidden [n][dim]; host memory. Returns the number of output rows or a negative ST_E* code. */
int engine_forward(struct engine *e, const struct batch *b, const float *in_hidden, float *out, char *err);

const struct model *engine_model(const struct engine *e);
const struct engine_opts *engine_opts(const struct engine *e);
struct backend *engine_backend(struct engine *e);
bool engine_is_first(const struct engine *e);
bool engine_is_last(const struct engine *e);
void engine_get_stats(const struct engine *e, struct engine_stats *s);
/* Bytes of KV cache the engine holds. */
size_t engine_kv_bytes(const struct engine *e);

/* Rope inverse frequencies for a config (head_dim/2 values, with llama3 / linear scaling applied), in double. */
void rope_inv_freq(const struct model_config *c, double *inv_freq);

#endif
