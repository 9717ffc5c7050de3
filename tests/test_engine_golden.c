/* Golden tests: the engine against Hugging Face transformers (float64) on the fixture models.
 * For every case: top-20 logprobs at the last prompt position within 1e-3, and greedy ids identical; a
 * difference is allowed only at a step whose reference margin is under 0.02 (a near-tie), and ends the comparison. Prompt 0 also compares all logits. Each model runs with the
 * SIMD kernels and, for bf16 and stories, also with the scalar reference kernels and a different prefill chunking. */
#include <jansson.h>

#include "check.h"
#include "core/core.h"
#include "engine/engine.h"
#include "model/model.h"
#include "sample/sample.h"

#define LOGPROB_TOL 1e-3
#define MARGIN_MIN 0.02

struct golden_run {
    const char *model;   /* fixture dir */
    const char *goldens; /* goldens json */
    const char *key;     /* cases key (NULL: "cases" is the list) */
    const char *logits;  /* full logits of case 0 (or NULL) */
    bool reference;
    int chunk;
};

static int32_t *json_ids(const json_t *a, int *n)
{
    *n = (int)json_array_size(a);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return ids;
}

/* Forwards ids[from..to) into slot 0 in chunks of `chunk`; the last token's logits land in logits. */
static int feed(struct engine *e, const int32_t *ids, int from, int to, int chunk, float *logits, char *err)
{
    int32_t pos[512], slot[512] = {0};
    uint8_t want[512];
    for (int i = from; i < to; i += chunk) {
        int m = ST_MIN(chunk, to - i);
        for (int j = 0; j < m; j++) {
            pos[j] = i + j;
            want[j] = (i + j == to - 1);
        }
        struct batch b = {.n = m, .token = ids + i, .pos = pos, .slot = slot, .want_logits = want};
        int rc = engine_forward(e, &b, NULL, logits, err);
        if (rc < 0) return rc;
    }
    return 0;
}

static void run_golden(const struct golden_run *g)
{
    char err[ST_ERR_LEN];
    json_error_t je;
    json_t *root = json_load_file(fixture_path(g->goldens), 0, &je);
    REQUIRE_MSG(root, "cannot read %s: %s", g->goldens, je.text);
    const json_t *cases = g->key ? json_object_get(json_object_get(root, "cases"), g->key) : json_object_get(root, "cases");
    REQUIRE(json_array_size(cases) > 0);
    struct model m;
    int rc = model_load(&m, fixture_path(g->model), 0, -1, true, true, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    struct engine *e = NULL;
    struct engine_opts eo = {.n_slots = 1, .n_ctx = 256, .max_batch = g->chunk, .max_logits = 1};
    eo.backend.kind = BACKEND_CPU;
    eo.backend.reference = g->reference;
    rc = engine_init(&e, &m, &eo, err);
    REQUIRE_MSG(rc == 0, "%s", err);
    int vocab = m.cfg.vocab_size;
    float *logits = malloc(sizeof(float) * (size_t)vocab);
    int32_t top_ids[20];
    float top_lp[20];
    for (size_t ci = 0; ci < json_array_size(cases); ci++) {
        const json_t *c = json_array_get(cases, ci);
        int n_prompt, n_greedy, n_top;
        int32_t *prompt = json_ids(json_object_get(c, "prompt_ids"), &n_prompt);
        int32_t *greedy = json_ids(json_object_get(c, "greedy_ids"), &n_greedy);
        int32_t *ref_top = json_ids(json_object_get(c, "top20_ids"), &n_top);
        const json_t *ref_logits = json_object_get(c, "top20_logits"), *margins = json_object_get(c, "greedy_margins");
        double lse = json_number_value(json_object_get(c, "logsumexp"));
        rc = feed(e, prompt, 0, n_prompt, g->chunk, logits, err);
        CHECK_MSG(rc == 0, "case %zu: %s", ci, err);
        /* top-20 logprobs at the last prompt position: compare by id (order may swap on near-ties) */
        double our_lse = sample_logsumexp(logits, vocab), worst = 0;
        for (int k = 0; k < n_top; k++) {
            double ref_lp = json_number_value(json_array_get(ref_logits, (size_t)k)) - lse;
            double lp = (double)logits[ref_top[k]] - our_lse;
            if (fabs(lp - ref_lp) > worst) worst = fabs(lp - ref_lp);
        }
        CHECK_MSG(worst <= LOGPROB_TOL, "%s case %zu: top-20 logprob error %.2e > %.0e", g->model, ci, worst, LOGPROB_TOL);
        int k = sample_top_logprobs(logits, vocab, 20, top_ids, top_lp);
        CHECK(k == 20);
        CHECK_MSG(top_ids[0] == ref_top[0] || json_number_value(json_array_get(margins, 0)) < MARGIN_MIN,
                  "case %zu: top-1 %d vs %d", ci, top_ids[0], ref_top[0]);
        if (ci == 0 && g->logits) {
            FILE *f = fopen(fixture_path(g->logits), "rb");
            CHECK_MSG(f != NULL, "cannot open %s", g->logits);
            if (f) {
                float *ref = malloc(sizeof(float) * (size_t)vocab);
                size_t got = fread(ref, sizeof(float), (size_t)vocab, f);
                fclose(f);
                CHECK_EQ_INT(got, vocab);
                double maxd = 0;
                for (int i = 0; i < vocab && got == (size_t)vocab; i++)
                    if (fabs((double)ref[i] - logits[i]) > maxd) maxd = fabs((double)ref[i] - logits[i]);
                CHECK_MSG(maxd <= LOGPROB_TOL, "%s: all-logits max error %.2e", g->model, maxd);
                free(ref);
            }
        }
        /* greedy decode, compared up to the first low-margin step */
        int32_t *seq = malloc(sizeof(int32_t) * (size_t)(n_prompt + n_greedy + 1));
        memcpy(seq, prompt, sizeof(int32_t) * (size_t)n_prompt);
        int n = n_prompt, checked = 0;
        for (int step = 0; step < n_greedy; step++) {
            int32_t id = sample_argmax(logits, vocab);
            double margin = json_number_value(json_array_get(margins, (size_t)step));
            if (id != greedy[step]) {
                CHECK_MSG(margin < MARGIN_MIN, "%s case %zu step %d: got %d, want %d (margin %.4f)", g->model, ci, step,
                          id, greedy[step], margin);
                break;
            }
            checked++; /* equal ids keep both runs on the same sequence, near-tie or not */
            seq[n++] = id;
            if (step + 1 < n_greedy && (rc = feed(e, seq, n - 1, n, g->chunk, logits, err)) < 0) {
                CHECK_MSG(0, "%s", err);
                break;
            }
        }
        if (getenv("CHECK_VERBOSE"))
            fprintf(stderr, "  %s case %zu: logprob err %.2e, %d/%d greedy ids checked\n", g->model, ci, worst, checked, n_greedy);
        free(seq);
        free(prompt);
        free(greedy);
        free(ref_top);
    }
    free(logits);
    engine_free(e);
    model_free(&m);
    json_decref(root);
}

static void test_qwen3_bf16(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16",
                           "goldens/kjv-qwen3.bf16.logits-prompt0.f32", false, 64};
    run_golden(&g);
}

static void test_qwen3_bf16_reference_chunk3(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m", "goldens/kjv-qwen3.goldens.json", "bf16", NULL, true, 3};
    run_golden(&g);
}

static void test_qwen3_q8(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8",
                           "goldens/kjv-qwen3.q8.logits-prompt0.f32", false, 64};
    run_golden(&g);
}

static void test_qwen3_q8_reference(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m-8bit", "goldens/kjv-qwen3.goldens.json", "q8", NULL, true, 7};
    run_golden(&g);
}

static void test_qwen3_q4(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m-4bit", "goldens/kjv-qwen3.goldens.json", "q4",
                           "goldens/kjv-qwen3.q4.logits-prompt0.f32", false, 64};
    run_golden(&g);
}

static void test_qwen3_q4_reference(void)
{
    struct golden_run g = {"models/kjv-qwen3-21m-4bit", "goldens/kjv-qwen3.goldens.json", "q4", NULL, true, 5};
    run_golden(&g);
}

static void test_stories(void)
{
    struct golden_run g = {"models/stories260K", "goldens/stories260K.goldens.json", NULL, NULL, false, 64};
    run_golden(&g);
}

static void test_stories_reference_chunk1(void)
{
    struct golden_run g = {"models/stories260K", "goldens/stories260K.goldens.json", NULL, NULL, true, 1};
    run_golden(&g);
}

int main(void)
{
    RUN(test_stories);
    RUN(test_stories_reference_chunk1);
    RUN(test_qwen3_bf16);
    RUN(test_qwen3_bf16_reference_chunk3);
    RUN(test_qwen3_q8);
    RUN(test_qwen3_q8_reference);
    RUN(test_qwen3_q4);
    RUN(test_qwen3_q4_reference);
    return check_done();
}
