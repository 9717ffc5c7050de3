/* Shape tests: the engine on model shapes the trained fixtures do not cover, against an independent float64 numpy
 * reference (tools/shapes/make_shape_fixtures.py, unpacked from tests/fixtures/shapes.tar.xz):
 *   llama-gqa-untied        Llama, 6 heads / 2 kv heads, untied lm_head, head_dim from hidden/heads, bf16
 *   llama-mqa-rope-llama3   Llama, 1 kv head (MQA), Llama 3.1 rope scaling with every band in use, bf16
 *   qwen3-q8-g32-newcfg     Qwen3, newer config.json form, head_dim != hidden/heads, MLX 8-bit group 32, tied
 *   qwen3-q4-g128-untied    Qwen3, MLX 4-bit group 128, quantized untied lm_head
 *   qwen2-bias-mha          Qwen2, q/k/v biases, 7 heads / 7 kv heads, bf16
 *   qwen2-bias-mha-sharded  the same weights as an index + 2 shards
 *   llama-biases            Llama with attention_bias (q/k/v/o) and mlp_bias (gate/up/down), bf16
 * For every model and for {scalar reference, SIMD} kernels x {prefill chunk 3, 64}: the top-20 logprobs at the last
 * prompt position within 1e-3 of the reference (all logits for case 0), and greedy ids identical (a difference is
 * allowed only at a step whose reference margin is under 0.02, which ends the comparison). The loaded config must
 * be what the generator wrote, and rope_inv_freq must equal the reference's inverse frequencies to 1e-12.
 * Layer splits: every split point (and a three-stage split) gives logits bit-identical to the whole model; the
 * sharded checkpoint gives logits bit-identical to the single file and the same manifest. */
#include <jansson.h>

#include "check.h"
#include "core/core.h"
#include "engine/engine.h"
#include "model/model.h"
#include "sample/sample.h"

#define LOGPROB_TOL 1e-3
#define MARGIN_MIN 0.02
#define N_CTX 128
#define MAX_CHUNK 64

struct golden {
    json_t *root;
    const json_t *meta, *cases;
};

static int load_golden(struct golden *g, const char *name)
{
    char rel[256];
    json_error_t je;
    snprintf(rel, sizeof(rel), "shapes/%s/goldens.json", name);
    g->root = json_load_file(fixture_path(rel), 0, &je);
    if (!g->root) {
        CHECK_FAIL_("cannot read %s: %s (run `make fixtures`)", fixture_path(rel), je.text);
        return -1;
    }
    g->meta = json_object_get(g->root, "meta");
    g->cases = json_object_get(g->root, "cases");
    if (!json_is_object(g->meta) || json_array_size(g->cases) < 2) {
        CHECK_FAIL_("%s: no meta or fewer than 2 cases", rel);
        json_decref(g->root);
        return -1;
    }
    return 0;
}

static const char *model_dir(const char *name)
{
    static char buf[4][1100];
    static int slot;
    char rel[256];
    snprintf(rel, sizeof(rel), "shapes/%s", name);
    char *b = buf[slot++ & 3];
    snprintf(b, sizeof(buf[0]), "%s", fixture_path(rel));
    return b;
}

/* ids of a JSON array (caller frees); NULL when it is not an array of integers */
static int32_t *json_ids(const json_t *a, int *n)
{
    *n = (int)json_array_size(a);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) {
        const json_t *v = json_array_get(a, (size_t)i);
        if (!json_is_integer(v)) {
            free(ids);
            return NULL;
        }
        ids[i] = (int32_t)json_integer_value(v);
    }
    return ids;
}

static int engine_open(struct engine **e, struct model *m, bool reference, int chunk, int n_threads, char *err)
{
    struct engine_opts eo = {.n_slots = 1, .n_ctx = N_CTX, .max_batch = chunk, .max_logits = 1};
    eo.backend.kind = BACKEND_CPU;
    eo.backend.n_threads = n_threads;
    eo.backend.reference = reference;
    return engine_init(e, m, &eo, err);
}

/* Forwards ids[from..to) into slot 0 in chunks of `chunk`; the last token's logits land in logits. */
static int feed(struct engine *e, const int32_t *ids, int from, int to, int chunk, float *logits, char *err)
{
    int32_t pos[MAX_CHUNK], slot[MAX_CHUNK] = {0};
    uint8_t want[MAX_CHUNK];
    ST_ASSERT(chunk <= MAX_CHUNK);
    for (int i = from; i < to; i += chunk) {
        int m = ST_MIN(chunk, to - i);
        for (int j = 0; j < m; j++) {
            pos[j] = i + j;
            want[j] = (i + j == to - 1);
        }
        struct batch b = {.n = m, .token = ids + i, .pos = pos, .slot = slot, .want_logits = want};
        int rc = engine_forward(e, &b, NULL, logits, err);
        if (rc < 0) return rc;
        if (rc != (i + m == to ? 1 : 0)) return err_set(err, ST_EINVAL, "engine returned %d logit rows", rc);
    }
    return 0;
}

/* ---- what the loader must find ---- */

static void check_expect(const char *name, const struct model *m, const json_t *ex)
{
    const struct model_config *c = &m->cfg;
#define EXPECT_INT(field, key) \
    CHECK_MSG(c->field == json_integer_value(json_object_get(ex, key)), "%s: %s = %lld, want %lld", name, key, \
              (long long)c->field, (long long)json_integer_value(json_object_get(ex, key)))
    EXPECT_INT(dim, "dim");
    EXPECT_INT(n_layers, "n_layers");
    EXPECT_INT(n_heads, "n_heads");
    EXPECT_INT(n_kv_heads, "n_kv_heads");
    EXPECT_INT(head_dim, "head_dim");
    EXPECT_INT(hidden_dim, "hidden_dim");
    EXPECT_INT(vocab_size, "vocab_size");
    EXPECT_INT(q_bits, "q_bits");
    EXPECT_INT(q_group_size, "q_group_size");
#undef EXPECT_INT
    CHECK_STR(model_arch_name(c->arch), json_string_value(json_object_get(ex, "arch")));
    CHECK_MSG(c->tie_embeddings == json_is_true(json_object_get(ex, "tie_embeddings")), "%s: tie_embeddings", name);
    CHECK_NEAR(c->rope_theta, json_number_value(json_object_get(ex, "rope_theta")), 0.0);
    const char *rt = json_string_value(json_object_get(ex, "rope_type"));
    enum rope_type want_rt = strcmp(rt, "llama3") == 0 ? ROPE_LLAMA3 : strcmp(rt, "linear") == 0 ? ROPE_LINEAR : ROPE_DEFAULT;
    CHECK_MSG(c->rope_type == want_rt, "%s: rope type %d, want %s", name, (int)c->rope_type, rt);
    CHECK_MSG(c->qk_norm == (c->arch == ARCH_QWEN3), "%s: qk_norm", name);
    CHECK_MSG(c->attn_bias == json_is_true(json_object_get(ex, "attn_bias")), "%s: attn_bias", name);
    CHECK_MSG(c->o_bias == json_is_true(json_object_get(ex, "o_bias")), "%s: o_bias", name);
    CHECK_MSG(c->mlp_bias == json_is_true(json_object_get(ex, "mlp_bias")), "%s: mlp_bias", name);
    CHECK_MSG(c->dtype == DT_BF16, "%s: dtype %s", name, dtype_name(c->dtype));
    /* eos ids: config.json plus generation_config.json, as a set */
    const json_t *eos = json_object_get(ex, "eos_ids");
    CHECK_EQ_INT(c->n_eos, json_array_size(eos));
    for (size_t i = 0; i < json_array_size(eos); i++) {
        bool found = false;
        for (int k = 0; k < c->n_eos; k++) found |= c->eos_ids[k] == json_integer_value(json_array_get(eos, i));
        CHECK_MSG(found, "%s: eos id %lld missing", name, (long long)json_integer_value(json_array_get(eos, i)));
    }
    /* the weights bound as the file stores them */
    enum wtype want_wt = c->q_bits == 8 ? WT_Q8 : c->q_bits == 4 ? WT_Q4 : WT_BF16;
    const struct weight *ws[] = {&m->embed, &m->lm_head, &m->layers[0].wq, &m->layers[0].wk, &m->layers[0].wo,
                                 &m->layers[0].w_down};
    for (size_t i = 0; i < ST_ARRAY_LEN(ws); i++) {
        CHECK_MSG(ws[i]->type == want_wt, "%s: %s is %s, want %s", name, ws[i]->name ? ws[i]->name : "?",
                  wtype_name(ws[i]->type), wtype_name(want_wt));
        if (c->q_bits) CHECK_EQ_INT(ws[i]->group_size, c->q_group_size);
    }
    CHECK_EQ_INT(m->layers[0].wo.cols, (int64_t)c->n_heads * c->head_dim);
    CHECK_EQ_INT(m->layers[0].wk.rows, (int64_t)c->n_kv_heads * c->head_dim);
    CHECK_MSG((m->lm_head.data == m->embed.data) == c->tie_embeddings, "%s: lm_head %s the embedding", name,
              c->tie_embeddings ? "is not" : "is");
}

static void check_rope(const char *name, const struct model_config *c, const json_t *ref)
{
    int half = c->head_dim / 2;
    REQUIRE_MSG((int)json_array_size(ref) == half, "%s: %zu reference frequencies for head_dim %d", name,
                json_array_size(ref), c->head_dim);
    double got[512];
    REQUIRE(half <= (int)ST_ARRAY_LEN(got));
    rope_inv_freq(c, got);
    for (int j = 0; j < half; j++) {
        double want = json_number_value(json_array_get(ref, (size_t)j));
        CHECK_MSG(fabs(got[j] - want) <= 1e-12 * fabs(want), "%s: inv_freq[%d] = %.17g, reference %.17g", name, j,
                  got[j], want);
    }
}

/* ---- the golden comparison ---- */

struct run_stats {
    double worst_lp;
    int checked, total;
};

static void run_cases(const char *name, struct model *m, const struct golden *g, bool reference, int chunk,
                      int n_threads)
{
    char err[ST_ERR_LEN];
    struct engine *e = NULL;
    int rc = engine_open(&e, m, reference, chunk, n_threads, err);
    REQUIRE_MSG(rc == 0, "%s: %s", name, err);
    int vocab = m->cfg.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    struct run_stats st = {0};
    for (size_t ci = 0; ci < json_array_size(g->cases); ci++) {
        const json_t *c = json_array_get(g->cases, ci);
        int n_prompt, n_greedy, n_top;
        int32_t *prompt = json_ids(json_object_get(c, "prompt_ids"), &n_prompt);
        int32_t *greedy = json_ids(json_object_get(c, "greedy_ids"), &n_greedy);
        int32_t *ref_top = json_ids(json_object_get(c, "top20_ids"), &n_top);
        const json_t *ref_logits = json_object_get(c, "top20_logits"), *margins = json_object_get(c, "greedy_margins");
        const json_t *all = json_object_get(c, "all_logits");
        double lse = json_number_value(json_object_get(c, "logsumexp"));
        if (!prompt || !greedy || !ref_top || n_top != 20 || n_greedy < 1 || json_array_size(ref_logits) != 20 ||
            (int)json_array_size(margins) != n_greedy || n_prompt + n_greedy > N_CTX) {
            CHECK_FAIL_("%s case %zu: malformed goldens", name, ci);
            goto next;
        }
        if ((rc = feed(e, prompt, 0, n_prompt, chunk, logits, err)) < 0) {
            CHECK_FAIL_("%s case %zu: %s", name, ci, err);
            goto next;
        }
        /* top-20 logprobs by id (their order may swap on near-ties) */
        double our_lse = sample_logsumexp(logits, vocab), case_worst = 0;
        int worst_k = 0;
        for (int k = 0; k < n_top; k++) {
            double ref_lp = json_number_value(json_array_get(ref_logits, (size_t)k)) - lse;
            double d = fabs((logits[ref_top[k]] - our_lse) - ref_lp);
            if (d > case_worst) {
                case_worst = d;
                worst_k = k;
            }
        }
        if (case_worst > st.worst_lp) st.worst_lp = case_worst;
        CHECK_MSG(case_worst <= LOGPROB_TOL, "%s (%s, chunk %d) case %zu: id %d logprob %.6f, reference %.6f", name,
                  reference ? "scalar" : "simd", chunk, ci, ref_top[worst_k], logits[ref_top[worst_k]] - our_lse,
                  json_number_value(json_array_get(ref_logits, (size_t)worst_k)) - lse);
        int32_t our_top[20];
        float our_lp[20];
        sample_top_logprobs(logits, vocab, 1, our_top, our_lp);
        CHECK_MSG(our_top[0] == ref_top[0] || json_number_value(json_array_get(margins, 0)) < MARGIN_MIN,
                  "%s case %zu: top id %d, reference %d", name, ci, our_top[0], ref_top[0]);
        if (all) {
            CHECK_EQ_INT(json_array_size(all), vocab);
            double worst = 0;
            for (int i = 0; i < vocab && (int)json_array_size(all) == vocab; i++) {
                double d = fabs((logits[i] - our_lse) - (json_number_value(json_array_get(all, (size_t)i)) - lse));
                if (d > worst) worst = d;
            }
            CHECK_MSG(worst <= LOGPROB_TOL, "%s case %zu: all-logprobs max error %.2e", name, ci, worst);
        }
        /* greedy decode, compared up to the first low-margin step */
        int32_t seq[N_CTX];
        memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
        int n = n_prompt;
        st.total += n_greedy;
        for (int step = 0; step < n_greedy; step++) {
            int32_t id = sample_argmax(logits, vocab);
            double margin = json_number_value(json_array_get(margins, (size_t)step));
            if (id != greedy[step]) {
                CHECK_MSG(margin < MARGIN_MIN, "%s (%s, chunk %d) case %zu step %d: got %d, want %d (margin %.4f)", name,
                          reference ? "scalar" : "simd", chunk, ci, step, id, greedy[step], margin);
                break;
            }
            st.checked++;
            seq[n++] = id;
            if (step + 1 < n_greedy && (rc = feed(e, seq, n - 1, n, chunk, logits, err)) < 0) {
                CHECK_FAIL_("%s: %s", name, err);
                break;
            }
        }
    next:
        free(prompt);
        free(greedy);
        free(ref_top);
    }
    /* a run that compared almost nothing proves nothing: the fixtures are built with clear margins */
    CHECK_MSG(st.checked * 4 >= st.total * 3, "%s: only %d of %d greedy steps compared", name, st.checked, st.total);
    if (getenv("CHECK_VERBOSE"))
        fprintf(stderr, "  %-24s %s, chunk %2d: top-20 logprob err %.2e, %d/%d greedy ids\n", name,
                engine_backend(e)->device_name, chunk, st.worst_lp, st.checked, st.total);
    free(logits);
    engine_free(e);
}

static void run_shape(const char *name)
{
    char err[ST_ERR_LEN];
    struct golden g;
    if (load_golden(&g, name) < 0) return;
    struct model m;
    int rc = model_load(&m, model_dir(name), 0, -1, true, true, err);
    if (rc < 0) {
        CHECK_FAIL_("%s: model_load: %s", name, err);
        json_decref(g.root);
        return;
    }
    check_expect(name, &m, json_object_get(g.meta, "expect"));
    check_rope(name, &m.cfg, json_object_get(g.meta, "rope_inv_freq"));
    /* one thread, except the last run, which splits rows over two threads (spinning workers make two threads slow
     * on a loaded machine; one threaded run covers the split) */
    run_cases(name, &m, &g, true, 3, 1);
    run_cases(name, &m, &g, true, 64, 1);
    run_cases(name, &m, &g, false, 3, 1);
    run_cases(name, &m, &g, false, 64, 2);
    model_free(&m);
    json_decref(g.root);
}

static void test_llama_gqa_untied(void) { run_shape("llama-gqa-untied"); }
static void test_llama_mqa_rope_llama3(void) { run_shape("llama-mqa-rope-llama3"); }
static void test_qwen3_q8_g32_newcfg(void) { run_shape("qwen3-q8-g32-newcfg"); }
static void test_qwen3_q4_g128_untied(void) { run_shape("qwen3-q4-g128-untied"); }
static void test_qwen2_bias_mha(void) { run_shape("qwen2-bias-mha"); }
static void test_llama_biases(void) { run_shape("llama-biases"); }
static void test_qwen2_bias_mha_sharded(void) { run_shape("qwen2-bias-mha-sharded"); }

/* The Llama 3.1 fixture must exercise all three bands of the scaling: kept, divided by factor, smoothed. */
static void test_rope_llama3_bands(void)
{
    char err[ST_ERR_LEN];
    struct model_config c;
    int rc = model_config_load(&c, model_dir("llama-mqa-rope-llama3"), err);
    REQUIRE_MSG(rc == 0, "%s", err);
    REQUIRE(c.rope_type == ROPE_LLAMA3);
    CHECK_NEAR(c.rope_factor, 8.0, 0);
    CHECK_NEAR(c.rope_low_freq_factor, 1.0, 0);
    CHECK_NEAR(c.rope_high_freq_factor, 4.0, 0);
    CHECK_EQ_INT(c.rope_orig_max_pos, 64);
    double f[64];
    REQUIRE(c.head_dim / 2 <= 64);
    rope_inv_freq(&c, f);
    int kept = 0, scaled = 0, smoothed = 0;
    for (int j = 0; j < c.head_dim / 2; j++) {
        double base = 1.0 / pow(c.rope_theta, 2.0 * j / c.head_dim), r = f[j] / base;
        if (fabs(r - 1.0) < 1e-12) kept++;
        else if (fabs(r - 1.0 / c.rope_factor) < 1e-12) scaled++;
        else if (r > 1.0 / c.rope_factor && r < 1.0) smoothed++;
        else CHECK_FAIL_("inv_freq[%d] ratio %.6f outside [1/factor, 1]", j, r);
    }
    CHECK_MSG(kept > 0 && scaled > 0 && smoothed > 0, "bands: %d kept, %d scaled, %d smoothed", kept, scaled, smoothed);
}

/* ---- layer splits ---- */

/* A pipeline of stages [bounds[i], bounds[i+1]); n_stages == 1 is the whole model. */
struct pipeline {
    int n_stages;
    struct model m[3];
    struct engine *e[3];
    float *hidden[2];
};

static void pipeline_free(struct pipeline *p)
{
    for (int i = 0; i < 3; i++) {
        engine_free(p->e[i]);
        model_free(&p->m[i]);
    }
    free(p->hidden[0]);
    free(p->hidden[1]);
    memset(p, 0, sizeof(*p));
}

static int pipeline_init(struct pipeline *p, const char *dir, const int *bounds, int n_stages, int chunk, char *err)
{
    memset(p, 0, sizeof(*p));
    p->n_stages = n_stages;
    int rc = 0;
    for (int s = 0; s < n_stages; s++) {
        if ((rc = model_load(&p->m[s], dir, bounds[s], bounds[s + 1], s == 0, s == n_stages - 1, err)) < 0 ||
            (rc = engine_open(&p->e[s], &p->m[s], false, chunk, 1, err)) < 0)
            goto fail;
    }
    for (int i = 0; i < 2; i++) {
        p->hidden[i] = malloc(sizeof(float) * (size_t)chunk * (size_t)p->m[0].cfg.dim);
        if (!p->hidden[i]) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            goto fail;
        }
    }
    return 0;
fail:
    pipeline_free(p);
    return rc;
}

/* One batch through every stage; hidden states cross stages as float32 rows. Returns the logit rows. */
static int pipeline_forward(struct pipeline *p, const struct batch *b, float *logits, char *err)
{
    const float *in = NULL;
    int rc = 0;
    for (int s = 0; s < p->n_stages; s++) {
        bool last = s == p->n_stages - 1;
        float *out = last ? logits : p->hidden[s & 1];
        if ((rc = engine_forward(p->e[s], b, in, out, err)) < 0) return rc;
        if (!last && rc != b->n) return err_set(err, ST_EINVAL, "stage %d returned %d rows for %d tokens", s, rc, b->n);
        in = out;
    }
    return rc;
}

/* Runs the prompt in chunks and then greedy steps through each pipeline; every logits row must be bit-identical. */
static void compare_pipelines(const char *name, struct pipeline *ref, struct pipeline *split, const int32_t *prompt,
                              int n_prompt, int chunk, const char *what)
{
    char err[ST_ERR_LEN];
    int vocab = ref->m[0].cfg.vocab_size;
    float *a = malloc(sizeof(float) * (size_t)vocab), *b = malloc(sizeof(float) * (size_t)vocab);
    int32_t seq[N_CTX], pos[MAX_CHUNK], slot[MAX_CHUNK] = {0};
    uint8_t want[MAX_CHUNK];
    memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
    int n = n_prompt, from = 0, n_rows = 0;
    for (int step = 0; step < 6; step++) {
        while (from < n) {
            int m = ST_MIN(chunk, n - from);
            for (int j = 0; j < m; j++) {
                pos[j] = from + j;
                want[j] = (j == m - 1); /* the last row of every chunk */
            }
            struct batch bt = {.n = m, .token = seq + from, .pos = pos, .slot = slot, .want_logits = want};
            int ra = pipeline_forward(ref, &bt, a, err);
            if (ra < 0) {
                CHECK_FAIL_("%s %s: whole model: %s", name, what, err);
                goto out;
            }
            int rb = pipeline_forward(split, &bt, b, err);
            if (rb < 0) {
                CHECK_FAIL_("%s %s: split: %s", name, what, err);
                goto out;
            }
            CHECK_EQ_INT(ra, 1);
            CHECK_EQ_INT(rb, 1);
            n_rows++;
            if (memcmp(a, b, sizeof(float) * (size_t)vocab) != 0) {
                int i = 0;
                while (i < vocab && a[i] == b[i]) i++;
                CHECK_FAIL_("%s %s: logits differ at position %d (first at id %d: %.9g vs %.9g)", name, what,
                            from + m - 1, i, a[i], b[i]);
                goto out;
            }
            from += m;
        }
        seq[n++] = sample_argmax(a, vocab);
    }
    CHECK(n_rows >= 6);
out:
    free(a);
    free(b);
}

static void split_model(const char *name)
{
    char err[ST_ERR_LEN];
    struct golden g;
    if (load_golden(&g, name) < 0) return;
    const char *dir = model_dir(name);
    int n_prompt;
    int32_t *prompt = json_ids(json_object_get(json_array_get(g.cases, json_array_size(g.cases) - 1), "prompt_ids"), &n_prompt);
    REQUIRE(prompt && n_prompt + 8 <= N_CTX);
    struct pipeline whole;
    int chunk = 16;
    struct model_config c;
    int rc = model_config_load(&c, dir, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    int full[2] = {0, c.n_layers};
    rc = pipeline_init(&whole, dir, full, 1, chunk, err);
    REQUIRE_MSG(rc == 0, "%s: %s", name, err);
    /* every two-stage split, including stages that hold no layer at all */
    for (int k = 0; k <= c.n_layers; k++) {
        struct pipeline split;
        int bounds[3] = {0, k, c.n_layers};
        char what[64];
        snprintf(what, sizeof(what), "split at layer %d", k);
        if ((rc = pipeline_init(&split, dir, bounds, 2, chunk, err)) < 0) {
            CHECK_FAIL_("%s %s: %s", name, what, err);
            continue;
        }
        CHECK_MSG(!split.m[0].has_head && split.m[0].has_embed && split.m[1].has_head && !split.m[1].has_embed,
                  "%s: stage roles", name);
        compare_pipelines(name, &whole, &split, prompt, n_prompt, chunk, what);
        pipeline_free(&split);
    }
    /* three stages: one layer in the middle stage */
    if (c.n_layers >= 3) {
        struct pipeline split;
        int bounds[4] = {0, 1, 2, c.n_layers};
        if ((rc = pipeline_init(&split, dir, bounds, 3, chunk, err)) < 0) {
            CHECK_FAIL_("%s three stages: %s", name, err);
        } else {
            compare_pipelines(name, &whole, &split, prompt, n_prompt, chunk, "three stages");
            pipeline_free(&split);
        }
    }
    pipeline_free(&whole);
    free(prompt);
    json_decref(g.root);
}

static void test_split_llama_gqa_untied(void) { split_model("llama-gqa-untied"); }
static void test_split_llama_mqa_rope_llama3(void) { split_model("llama-mqa-rope-llama3"); }
static void test_split_qwen3_q8_g32_newcfg(void) { split_model("qwen3-q8-g32-newcfg"); }
static void test_split_qwen3_q4_g128_untied(void) { split_model("qwen3-q4-g128-untied"); }
static void test_split_qwen2_bias_mha(void) { split_model("qwen2-bias-mha"); }
static void test_split_llama_biases(void) { split_model("llama-biases"); }

/* The sharded checkpoint holds the same bytes as the single file: same manifest, bit-identical logits. */
static void test_sharded_equals_single(void)
{
    char err[ST_ERR_LEN];
    const char *one = model_dir("qwen2-bias-mha"), *sharded = model_dir("qwen2-bias-mha-sharded");
    struct pipeline a, b;
    int full[2] = {0, -1};
    int rc = pipeline_init(&a, one, full, 1, 16, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    if ((rc = pipeline_init(&b, sharded, full, 1, 16, err)) < 0) {
        CHECK_FAIL_("%s", err);
        pipeline_free(&a);
        return;
    }
    CHECK_EQ_INT(a.m[0].st.n_files, 1);
    CHECK_EQ_INT(b.m[0].st.n_files, 2);
    struct manifest ma, mb;
    if (manifest_build(&ma, &a.m[0], err) == 0) {
        if (manifest_build(&mb, &b.m[0], err) == 0) {
            CHECK_EQ_INT(ma.n, mb.n);
            rc = manifest_compare(&ma, &mb, err);
            CHECK_MSG(rc == 0, "%s", err);
            rc = manifest_compare(&mb, &ma, err);
            CHECK_MSG(rc == 0, "%s", err);
            manifest_free(&mb);
        }
        manifest_free(&ma);
    }
    int32_t prompt[40];
    struct rng r;
    rng_seed(&r, 42);
    for (int i = 0; i < 40; i++) prompt[i] = (int32_t)(rng_next(&r) % (uint64_t)a.m[0].cfg.vocab_size);
    compare_pipelines("qwen2-bias-mha", &a, &b, prompt, 40, 16, "sharded vs single file");
    pipeline_free(&a);
    pipeline_free(&b);
}

int main(void)
{
    RUN(test_llama_gqa_untied);
    RUN(test_llama_mqa_rope_llama3);
    RUN(test_qwen3_q8_g32_newcfg);
    RUN(test_qwen3_q4_g128_untied);
    RUN(test_qwen2_bias_mha);
    RUN(test_llama_biases);
    RUN(test_qwen2_bias_mha_sharded);
    RUN(test_rope_llama3_bands);
    RUN(test_split_llama_gqa_untied);
    RUN(test_split_llama_mqa_rope_llama3);
    RUN(test_split_qwen3_q8_g32_newcfg);
    RUN(test_split_qwen3_q4_g128_untied);
    RUN(test_split_qwen2_bias_mha);
    RUN(test_split_llama_biases);
    RUN(test_sharded_equals_single);
    return check_done();
}
