/* sample: the sampling chain over one row of logits.
 *
 * Order (as vLLM / llama.cpp): logit_bias -> repetition penalty (prompt + output tokens, HF rule: divide positive
 * logits, multiply negative ones) -> presence/frequency penalties (output tokens, OpenAI rule) -> greedy argmax when
 * temperature == 0 (ties: lowest id) -> temperature -> top_k -> top_p -> min_p -> draw with the sampler's own
 * seeded generator (same seed and inputs, same tokens).
 * Logprobs are the model's distribution (log-softmax of the raw logits, before any of the above), like the
 * reference goldens and vLLM's default.
 * A sampler allocates its vocab-sized buffers at init; sampling allocates nothing.
 */
#ifndef STRATA_SAMPLE_H
#define STRATA_SAMPLE_H

#include <stdbool.h>
#include <stdint.h>

struct logit_bias {
    int32_t id;
    float bias;
};

#define SAMPLE_MAX_BIAS 300

struct sample_params {
    float temperature;        /* 0: greedy */
    int top_k;                /* 0: off */
    float top_p;              /* 1: off */
    float min_p;              /* 0: off */
    float repetition_penalty; /* 1: off */
    float presence_penalty;   /* 0: off */
    float frequency_penalty;  /* 0: off */
    uint64_t seed;
    struct logit_bias bias[SAMPLE_MAX_BIAS];
    int n_bias;
};

/* Defaults: temperature 1, everything else off, seed 0. */
void sample_params_default(struct sample_params *p);
/* Checks ranges (temperature >= 0, top_p in (0, 1], min_p in [0, 1], repetition_penalty > 0, penalties in
 * [-2, 2], bias ids inside vocab); err names the parameter. */
int sample_params_check(const struct sample_params *p, int vocab, char *err);

struct sampler {
    struct sample_params p;
    int vocab;
    uint64_t rng;
    uint32_t *counts;   /* [vocab] output-token counts (penalties), NULL when no penalty is used */
    uint8_t *in_prompt; /* [vocab] (repetition penalty) */
    int32_t *idx;       /* [vocab] candidate scratch */
    float *val;         /* [vocab] */
};

int sampler_init(struct sampler *s, const struct sample_params *p, int vocab, char *err);
void sampler_free(struct sampler *s);
/* Records prompt tokens (repetition penalty). */
void sampler_add_prompt(struct sampler *s, const int32_t *ids, int n);
/* Records a generated token (penalties). */
void sampler_accept(struct sampler *s, int32_t id);
/* Picks the next token; logits are modified in place (copy first if you still need them). */
int32_t sampler_sample(struct sampler *s, float *logits);

/* Greedy argmax (lowest id on ties). */
int32_t sample_argmax(const float *logits, int vocab);
/* log(sum(exp(logits))) computed stably in double. */
double sample_logsumexp(const float *logits, int vocab);
/* The k most likely ids with their logprobs, most likely first (ties: lower id first). Returns the number
 * written (min(k, vocab)). */
int sample_top_logprobs(const float *logits, int vocab, int k, int32_t *ids, float *logprobs);
/* The same with the logsumexp already computed. */
int sample_top_logprobs_lse(const float *logits, int vocab, int k, double lse, int32_t *ids, float *logprobs);

#endif
