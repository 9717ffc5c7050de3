/* sample: logit bias, penalties, temperature, top-k, top-p, min-p, seeded draws, logprobs. */
#include "sample/sample.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

void sample_params_default(struct sample_params *p)
{
    memset(p, 0, sizeof(*p));
    p->temperature = 1.0f;
    p->top_p = 1.0f;
    p->repetition_penalty = 1.0f;
}

int sample_params_check(const struct sample_params *p, int vocab, char *err)
{
    if (!(p->temperature >= 0.0f) || p->temperature > 100.0f)
        return err_set(err, ST_EINVAL, "temperature must be between 0 and 100");
    if (p->top_k < 0) return err_set(err, ST_EINVAL, "top_k must be >= 0");
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) return err_set(err, ST_EINVAL, "top_p must be in (0, 1]");
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f)) return err_set(err, ST_EINVAL, "min_p must be in [0, 1]");
    if (!(p->repetition_penalty > 0.0f) || p->repetition_penalty > 100.0f)
        return err_set(err, ST_EINVAL, "repetition_penalty must be in (0, 100]");
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return err_set(err, ST_EINVAL, "presence_penalty must be in [-2, 2]");
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return err_set(err, ST_EINVAL, "frequency_penalty must be in [-2, 2]");
    if (p->n_bias < 0 || p->n_bias > SAMPLE_MAX_BIAS) return err_set(err, ST_EINVAL, "too many logit_bias entries");
    for (int i = 0; i < p->n_bias; i++) {
        if (p->bias[i].id < 0 || p->bias[i].id >= vocab)
            return err_set(err, ST_EINVAL, "logit_bias: token id %d outside the vocabulary of %d", p->bias[i].id, vocab);
        if (!(p->bias[i].bias >= -100.0f && p->bias[i].bias <= 100.0f))
            return err_set(err, ST_EINVAL, "logit_bias: values must be in [-100, 100]");
    }
    return ST_OK;
}

static uint64_t next_u64(uint64_t *s)
{
    /* splitmix64: full period, any seed (0 included) */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int sampler_init(struct sampler *s, const struct sample_params *p, int vocab, char *err)
{
    memset(s, 0, sizeof(*s));
    int rc = sample_params_check(p, vocab, err);
    if (rc < 0) return rc;
    s->p = *p;
    s->vocab = vocab;
    s->rng = p->seed;
    bool penalties = p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
    s->idx = malloc(sizeof(int32_t) * (size_t)vocab);
    s->val = malloc(sizeof(float) * (size_t)vocab);
    if (penalties) {
        s->counts = calloc((size_t)vocab, sizeof(uint32_t));
        s->in_prompt = calloc((size_t)vocab, 1);
    }
    if (!s->idx || !s->val || (penalties && (!s->counts || !s->in_prompt))) {
        sampler_free(s);
        return err_set(err, ST_ENOMEM, "sampler: out of memory");
    }
    return ST_OK;
}

void sampler_free(struct sampler *s)
{
    free(s->counts);
    free(s->in_prompt);
    free(s->idx);
    free(s->val);
    memset(s, 0, sizeof(*s));
}

void sampler_add_prompt(struct sampler *s, const int32_t *ids, int n)
{
    if (!s->in_prompt) return;
    for (int i = 0; i < n; i++)
        if (ids[i] >= 0 && ids[i] < s->vocab) s->in_prompt[ids[i]] = 1;
}

void sampler_accept(struct sampler *s, int32_t id)
{
    if (s->counts && id >= 0 && id < s->vocab && s->counts[id] < UINT32_MAX) s->counts[id]++;
}

int32_t sample_argmax(const float *logits, int vocab)
{
    int32_t best = 0;
    float bv = logits[0];
    for (int i = 1; i < vocab; i++)
        if (logits[i] > bv) {
            bv = logits[i];
            best = i;
        }
    return best;
}

double sample_logsumexp(const float *logits, int vocab)
{
    float mx = logits[sample_argmax(logits, vocab)];
    double sum = 0.0;
    for (int i = 0; i < vocab; i++) sum += exp((double)logits[i] - mx);
    return mx + log(sum);
}

/* min-heap of (val, idx) ordered so that the root is the "worst" kept candidate */
static bool worse(float va, int32_t ia, float vb, int32_t ib) { return va < vb || (va == vb && ia > ib); }

static void heap_sift_down(float *v, int32_t *id, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < n && worse(v[l], id[l], v[m], id[m])) m = l;
        if (r < n && worse(v[r], id[r], v[m], id[m])) m = r;
        if (m == i) return;
        float tv = v[i];
        v[i] = v[m];
        v[m] = tv;
        int32_t ti = id[i];
        id[i] = id[m];
        id[m] = ti;
        i = m;
    }
}

/* Selects the top k of vals[0..n) into (ov, oi) sorted best first. Returns k' = min(k, n). */
static int top_k_select(const float *vals, int n, int k, float *ov, int32_t *oi)
{
    if (k > n) k = n;
    if (k <= 0) return 0;
    for (int i = 0; i < k; i++) {
        ov[i] = vals[i];
        oi[i] = i;
    }
    for (int i = k / 2 - 1; i >= 0; i--) heap_sift_down(ov, oi, k, i);
    for (int i = k; i < n; i++) {
        if (worse(ov[0], oi[0], vals[i], i)) {
            ov[0] = vals[i];
            oi[0] = i;
            heap_sift_down(ov, oi, k, 0);
        }
    }
    /* heap sort: repeatedly move the worst to the end */
    for (int end = k - 1; end > 0; end--) {
        float tv = ov[0];
        ov[0] = ov[end];
        ov[end] = tv;
        int32_t ti = oi[0];
        oi[0] = oi[end];
        oi[end] = ti;
        heap_sift_down(ov, oi, end, 0);
    }
    return k;
}

int sample_top_logprobs_lse(const float *logits, int vocab, int k, double lse, int32_t *ids, float *logprobs)
{
    int n = top_k_select(logits, vocab, k, logprobs, ids);
    for (int i = 0; i < n; i++) logprobs[i] = (float)((double)logprobs[i] - lse);
    return n;
}

int sample_top_logprobs(const float *logits, int vocab, int k, int32_t *ids, float *logprobs)
{
    return sample_top_logprobs_lse(logits, vocab, k, sample_logsumexp(logits, vocab), ids, logprobs);
}

static int cmp_desc(const void *a, const void *b, void *ctx)
{
    const float *v = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    if (v[x] != v[y]) return v[x] > v[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

int32_t sampler_sample(struct sampler *s, float *logits)
{
    const struct sample_params *p = &s->p;
    int vocab = s->vocab;
    for (int i = 0; i < p->n_bias; i++) logits[p->bias[i].id] += p->bias[i].bias;
    if (s->counts) {
        for (int i = 0; i < vocab; i++) {
            if (p->repetition_penalty != 1.0f && (s->in_prompt[i] || s->counts[i]))
                logits[i] = logits[i] > 0 ? logits[i] / p->repetition_penalty : logits[i] * p->repetition_penalty;
            if (s->counts[i])
                logits[i] -= p->presence_penalty + p->frequency_penalty * (float)s->counts[i];
        }
    }
    if (p->temperature == 0.0f) return sample_argmax(logits, vocab);

    /* candidates: sorted best first when top_k or top_p needs an order, else the whole vocabulary by id */
    int n;
    if (p->top_k > 0 && p->top_k < vocab) {
        n = top_k_select(logits, vocab, p->top_k, s->val, s->idx);
    } else if (p->top_p < 1.0f) {
        /* the best 256 usually hold top_p of the mass: then no full sort is needed */
        n = top_k_select(logits, vocab, ST_MIN(256, vocab), s->val, s->idx);
        double mx = s->val[0], sum = 0.0, head = 0.0;
        for (int i = 0; i < vocab; i++) sum += exp(((double)logits[i] - mx) / p->temperature);
        for (int i = 0; i < n; i++) head += exp(((double)s->val[i] - mx) / p->temperature);
        if (head / sum < p->top_p && n < vocab) {
            for (int i = 0; i < vocab; i++) s->idx[i] = i;
            qsort_r(s->idx, (size_t)vocab, sizeof(int32_t), cmp_desc, logits);
            for (int i = 0; i < vocab; i++) s->val[i] = logits[s->idx[i]];
            n = vocab;
        }
    } else {
        int32_t best = sample_argmax(logits, vocab);
        s->idx[0] = best;
        s->val[0] = logits[best];
        n = 1;
        for (int i = 0; i < vocab; i++)
            if (i != best) {
                s->idx[n] = i;
                s->val[n++] = logits[i];
            }
    }
    /* softmax with temperature over the candidates */
    double mx = s->val[0], sum = 0.0;
    for (int i = 0; i < n; i++) {
        double e = exp(((double)s->val[i] - mx) / p->temperature);
        s->val[i] = (float)e;
        sum += e;
    }
    /* top_p: keep the smallest prefix whose mass reaches top_p */
    if (p->top_p < 1.0f) {
        double cum = 0.0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            cum += s->val[i] / sum;
            if (cum >= p->top_p) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
    }
    /* min_p: drop candidates below min_p * p(best) (candidate 0 is the best) */
    if (p->min_p > 0.0f) {
        double thr = p->min_p * s->val[0];
        int keep = 1;
        for (int i = 1; i < n; i++)
            if (s->val[i] >= thr) {
                s->val[keep] = s->val[i];
                s->idx[keep++] = s->idx[i];
            }
        n = keep;
    }
    double total = 0.0;
    for (int i = 0; i < n; i++) total += s->val[i];
    double u = (double)(next_u64(&s->rng) >> 11) * (1.0 / 9007199254740992.0) * total;
    double cum = 0.0;
    for (int i = 0; i < n; i++) {
        cum += s->val[i];
        if (u < cum) return s->idx[i];
    }
    return s->idx[n - 1];
}
