/* Tests for the tokenizer: the reference goldens (Qwen3, Llama 3, stories260K, the kjv prompts), invalid and
 * extreme inputs, corrupt and unsupported tokenizer.json files, added-token flags, pre-tokenizer and decoder
 * variants on small generated tokenizers, the streaming decoder held to tokenizer_decode on random id sequences,
 * threads, and a small benchmark (printed, not asserted). */
#include "check.h"
#include "core/core.h"
#include "tokenizer/tokenizer.h"

#include <jansson.h>
#include <pthread.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Under sanitizers the measurements mean little: run them once. */
#if defined(__SANITIZE_ADDRESS__)
#define BENCH_REPS 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define BENCH_REPS 1
#endif
#endif
#ifndef BENCH_REPS
#define BENCH_REPS 3
#endif

#define QWEN_DIR "models/kjv-qwen3-21m-8bit"
#define LLAMA3_DIR "tokenizers/llama3"
#define STORIES_DIR "models/stories260K"

/* ---- helpers ---- */

static struct tokenizer *load_fixture(const char *rel)
{
    char err[ST_ERR_LEN] = "";
    struct tokenizer *t = NULL;
    int rc = tokenizer_load(&t, fixture_path(rel), err);
    CHECK_MSG(rc == 0, "tokenizer_load(%s): %s", rel, err);
    return rc == 0 ? t : NULL;
}

static json_t *load_golden(const char *rel)
{
    json_error_t je;
    json_t *j = json_load_file(fixture_path(rel), 0, &je);
    CHECK_MSG(j != NULL, "%s: %s", rel, je.text);
    return j;
}

static int32_t *json_ids(const json_t *a, int *n)
{
    *n = (int)json_array_size(a);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(*n + 1));
    for (int i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(a, (size_t)i));
    return ids;
}

static bool ids_match(const int32_t *got, int n, const json_t *want)
{
    if ((size_t)n != json_array_size(want)) return false;
    for (int i = 0; i < n; i++)
        if (got[i] != json_integer_value(json_array_get(want, (size_t)i))) return false;
    return true;
}

static void print_ids(const char *what, const int32_t *ids, int n)
{
    fprintf(stderr, "    %s:", what);
    for (int i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, "%s\n", n > 64 ? " ..." : "");
}

static int encode(const struct tokenizer *t, const char *s, size_t n, bool add_special, int32_t **ids, int *k)
{
    char err[ST_ERR_LEN] = "";
    int rc = tokenizer_encode(t, s, n, add_special, ids, k, err);
    CHECK_MSG(rc == 0, "encode failed: %s", err);
    return rc;
}

static char *decode(const struct tokenizer *t, const int32_t *ids, int n, bool skip_special, size_t *len)
{
    char err[ST_ERR_LEN] = "";
    char *out = NULL;
    int rc = tokenizer_decode(t, ids, n, skip_special, &out, len, err);
    CHECK_MSG(rc == 0, "decode failed: %s", err);
    return out;
}

/* Streams ids through a detok_stream with output buffers of varying size (retrying on ST_ERANGE) and returns
 * the concatenation. */
static char *stream_decode(const struct tokenizer *t, const int32_t *ids, int n, bool skip_special, struct rng *r,
                           size_t *len)
{
    struct detok_stream s;
    detok_stream_init(&s, t, skip_special);
    size_t cap = 1024, total = 0;
    char *acc = malloc(cap);
    size_t max = tokenizer_stream_chunk_max(t);
    char *buf = malloc(max);
    for (int i = 0; i <= n; i++) {
        size_t bcap = r ? 1 + (size_t)(rng_next(r) % 24) : max;
        int w;
        for (;;) {
            w = i < n ? detok_stream_push(&s, ids[i], buf, bcap) : detok_stream_flush(&s, buf, bcap);
            if (w != ST_ERANGE) break;
            CHECK_MSG(bcap < max, "ST_ERANGE with a buffer of tokenizer_stream_chunk_max bytes");
            if (bcap >= max) break;
            bcap = ST_MIN(bcap * 2, max);
        }
        CHECK_MSG(w >= 0, "stream push failed: %d", w);
        if (w < 0) break;
        CHECK(buf[w] == 0); /* NUL-terminated */
        /* never half a character */
        if (w > 0) {
            size_t k = (size_t)w - 1;
            while (k > 0 && ((unsigned char)buf[k] & 0xC0) == 0x80) k--;
            unsigned char c = (unsigned char)buf[k];
            size_t want = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
            CHECK_MSG(k + want == (size_t)w, "a chunk ends inside a UTF-8 character");
            CHECK_MSG(((unsigned char)buf[0] & 0xC0) != 0x80, "a chunk starts inside a UTF-8 character");
        }
        while (total + (size_t)w + 1 > cap) acc = realloc(acc, cap *= 2);
        memcpy(acc + total, buf, (size_t)w);
        total += (size_t)w;
    }
    acc[total] = 0;
    free(buf);
    *len = total;
    return acc;
}

static void check_stream_matches(const struct tokenizer *t, const int32_t *ids, int n, bool skip_special,
                                 struct rng *r, const char *what)
{
    size_t dl = 0, sl = 0;
    char *d = decode(t, ids, n, skip_special, &dl);
    char *s = stream_decode(t, ids, n, skip_special, r, &sl);
    bool ok = d && dl == sl && memcmp(d, s, dl) == 0;
    CHECK_MSG(ok, "%s: streamed text differs from tokenizer_decode\n      decode: \"%s\"\n      stream: \"%s\"", what,
              d ? d : "(null)", s);
    if (!ok) print_ids("ids", ids, n);
    free(d);
    free(s);
}

/* ---- goldens ---- */

static void check_public_set(const char *dir, const char *key, bool with_special)
{
    json_t *g = load_golden("goldens/tokenizers.public.json");
    struct tokenizer *t = load_fixture(dir);
    if (!g || !t) {
        json_decref(g);
        tokenizer_free(t);
        return;
    }
    json_t *cases = json_object_get(g, key), *c;
    REQUIRE(json_array_size(cases) > 100);
    size_t i;
    int bad_enc = 0, bad_dec = 0;
    json_array_foreach(cases, i, c) {
        json_t *jt = json_object_get(c, "text");
        const char *text = json_string_value(jt);
        for (int sp = 0; sp <= (with_special ? 1 : 0); sp++) {
            json_t *want = json_object_get(c, sp ? "ids_with_special" : "ids");
            int32_t *ids = NULL;
            int n = 0;
            if (encode(t, text, json_string_length(jt), sp, &ids, &n) == 0 && !ids_match(ids, n, want)) {
                if (bad_enc++ < 5) {
                    CHECK_MSG(0, "%s case %zu (add_special=%d) \"%s\"", key, i, sp, text);
                    print_ids("got", ids, n);
                }
            }
            free(ids);
        }
        int n;
        int32_t *ids = json_ids(json_object_get(c, "ids"), &n);
        size_t dl;
        char *d = decode(t, ids, n, false, &dl);
        const char *want = json_string_value(json_object_get(c, "decoded"));
        if (d && strcmp(d, want) != 0 && bad_dec++ < 5)
            CHECK_MSG(0, "%s case %zu decodes to \"%s\", want \"%s\"", key, i, d, want);
        free(d);
        check_stream_matches(t, ids, n, false, NULL, key);
        free(ids);
    }
    CHECK_EQ_INT(bad_enc, 0);
    CHECK_EQ_INT(bad_dec, 0);
    tokenizer_free(t);
    json_decref(g);
}

static void test_qwen3_public_goldens(void) { check_public_set(QWEN_DIR, "qwen3", false); }
static void test_llama3_public_goldens(void) { check_public_set(LLAMA3_DIR, "llama3", true); }

static void test_stories_goldens(void)
{
    json_t *g = load_golden("goldens/stories260K.goldens.json");
    struct tokenizer *t = load_fixture(STORIES_DIR);
    if (!g || !t) goto done;
    CHECK_EQ_INT(tokenizer_vocab_size(t), 512);
    CHECK_EQ_INT(tokenizer_bos_id(t), 1);
    CHECK_EQ_INT(tokenizer_eos_id(t), 2);
    CHECK_STR(tokenizer_bos_token(t), "<s>");
    CHECK(tokenizer_is_special(t, 1));
    CHECK(!tokenizer_is_special(t, 300));
    json_t *cases = json_object_get(g, "cases"), *c;
    size_t i;
    REQUIRE(json_array_size(cases) >= 2);
    json_array_foreach(cases, i, c) {
        json_t *jp = json_object_get(c, "prompt");
        int32_t *ids = NULL;
        int n = 0;
        if (encode(t, json_string_value(jp), json_string_length(jp), true, &ids, &n) == 0) {
            CHECK_MSG(ids_match(ids, n, json_object_get(c, "prompt_ids")), "stories prompt %zu \"%s\"", i,
                      json_string_value(jp));
            CHECK(n > 0 && ids[0] == 1); /* BOS */
        }
        free(ids);
        /* without add_special: no BOS, the rest the same */
        if (encode(t, json_string_value(jp), json_string_length(jp), false, &ids, &n) == 0) {
            json_t *want = json_object_get(c, "prompt_ids");
            CHECK_EQ_INT(n + 1, (int)json_array_size(want));
            for (int k = 0; k < n && k + 1 < (int)json_array_size(want); k++)
                CHECK_EQ_INT(ids[k], json_integer_value(json_array_get(want, (size_t)k + 1)));
        }
        free(ids);
        int gn;
        int32_t *gids = json_ids(json_object_get(c, "greedy_ids"), &gn);
        size_t dl;
        char *d = decode(t, gids, gn, false, &dl);
        CHECK_STR(d, json_string_value(json_object_get(c, "greedy_text")));
        free(d);
        check_stream_matches(t, gids, gn, false, NULL, "stories greedy");
        free(gids);
    }
done:
    tokenizer_free(t);
    json_decref(g);
}

static void test_kjv_goldens(void)
{
    json_t *g = load_golden("goldens/kjv-qwen3.goldens.json");
    struct tokenizer *t = load_fixture(QWEN_DIR);
    if (!g || !t) goto done;
    CHECK_EQ_INT(tokenizer_vocab_size(t), 151669);
    CHECK_EQ_INT(tokenizer_eos_id(t), 151645); /* <|im_end|> */
    CHECK_EQ_INT(tokenizer_bos_id(t), -1);
    CHECK(tokenizer_chat_template(t) != NULL && strstr(tokenizer_chat_template(t), "im_start") != NULL);
    CHECK_EQ_INT(tokenizer_find(t, "<|im_start|>"), 151644);
    CHECK_EQ_INT(tokenizer_find(t, "Hello"), 9707);
    CHECK_EQ_INT(tokenizer_find(t, "no such piece at all"), -1);
    CHECK_STR(tokenizer_piece(t, 9707), "Hello");
    CHECK_STR(tokenizer_piece(t, 151645), "<|im_end|>");
    CHECK(tokenizer_piece(t, 151669) == NULL);
    CHECK(tokenizer_piece(t, -1) == NULL);
    CHECK(tokenizer_is_special(t, 151645));
    CHECK(!tokenizer_is_special(t, 151667)); /* <think> is added but not special */
    json_t *sets = json_object_get(g, "cases"), *cases;
    const char *name;
    int n_cases = 0, n_chat = 0;
    json_object_foreach(sets, name, cases) {
        size_t i;
        json_t *c;
        json_array_foreach(cases, i, c) {
            json_t *jp = json_object_get(c, "prompt");
            int32_t *ids = NULL;
            int n = 0;
            if (encode(t, json_string_value(jp), json_string_length(jp), false, &ids, &n) == 0) {
                bool ok = ids_match(ids, n, json_object_get(c, "prompt_ids"));
                CHECK_MSG(ok, "kjv %s case %zu \"%s\"", name, i, json_string_value(jp));
                if (!ok) print_ids("got", ids, n);
            }
            free(ids);
            n_chat += strstr(json_string_value(jp), "<|im_start|>") != NULL;
            n_cases++;
            int gn;
            int32_t *gids = json_ids(json_object_get(c, "greedy_ids"), &gn);
            size_t dl;
            char *d = decode(t, gids, gn, false, &dl);
            CHECK_STR(d, json_string_value(json_object_get(c, "greedy_text")));
            free(d);
            check_stream_matches(t, gids, gn, true, NULL, "kjv greedy, skip_special");
            free(gids);
        }
    }
    CHECK(n_cases >= 21);
    CHECK(n_chat >= 12);
done:
    tokenizer_free(t);
    json_decref(g);
}

/* ---- inputs ---- */

static void test_invalid_utf8(void)
{
    struct tokenizer *t = load_fixture(QWEN_DIR);
    REQUIRE(t);
    static const struct {
        const char *s;
        size_t n;
        size_t at;
    } bad[] = {
        {"abc\xff", 4, 3},          {"\x80", 1, 0},          {"ok \xc3", 4, 3},        {"\xc0\xaf", 2, 0},
        {"\xe0\x80\xaf", 3, 0},     {"\xed\xa0\x80", 3, 0},  {"\xf4\x90\x80\x80", 4, 0}, {"x\xe2\x82", 3, 1},
        {"\xf0\x9f\x98", 3, 0},     {"a\xfe\xfe", 3, 1},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(bad); i++) {
        char err[ST_ERR_LEN] = "";
        int32_t *ids = (int32_t *)&ids;
        int n = -1;
        int rc = tokenizer_encode(t, bad[i].s, bad[i].n, false, &ids, &n, err);
        CHECK_EQ_INT(rc, ST_EINVAL);
        CHECK(ids == NULL && n == 0);
        char want[64];
        snprintf(want, sizeof(want), "offset %zu", bad[i].at);
        CHECK_MSG(strstr(err, "UTF-8") && strstr(err, want), "case %zu: message \"%s\"", i, err);
    }
    /* valid edge cases: NUL, U+FFFF, a 4-byte character, U+0085 */
    static const char ok[] = "a\0b\xef\xbf\xbf\xf0\x9f\x98\x80\xc2\x85z";
    int32_t *ids;
    int n;
    if (encode(t, ok, sizeof(ok) - 1, false, &ids, &n) == 0) {
        size_t dl;
        char *d = decode(t, ids, n, false, &dl);
        CHECK(d && dl == sizeof(ok) - 1 && memcmp(d, ok, dl) == 0);
        free(d);
        free(ids);
    }
    tokenizer_free(t);
}

static void test_empty_and_null(void)
{
    struct tokenizer *q = load_fixture(QWEN_DIR), *s = load_fixture(STORIES_DIR);
    REQUIRE(q && s);
    int32_t *ids;
    int n;
    if (encode(q, "", 0, true, &ids, &n) == 0) {
        CHECK_EQ_INT(n, 0);
        CHECK(ids != NULL);
        free(ids);
    }
    if (encode(q, NULL, 0, false, &ids, &n) == 0) {
        CHECK_EQ_INT(n, 0);
        free(ids);
    }
    if (encode(s, "", 0, true, &ids, &n) == 0) {
        CHECK_EQ_INT(n, 1); /* just BOS */
        CHECK(n == 1 && ids[0] == 1);
        free(ids);
    }
    size_t dl;
    char *d = decode(q, NULL, 0, false, &dl);
    CHECK(d && dl == 0 && d[0] == 0);
    free(d);
    char err[ST_ERR_LEN] = "";
    int32_t bad_ids[] = {9707, 999999};
    d = NULL;
    CHECK_EQ_INT(tokenizer_decode(q, bad_ids, 2, false, &d, &dl, err), ST_EINVAL);
    CHECK(d == NULL && strstr(err, "999999"));
    bad_ids[1] = -5;
    CHECK_EQ_INT(tokenizer_decode(q, bad_ids, 2, false, &d, &dl, err), ST_EINVAL);
    struct detok_stream st;
    char buf[64];
    detok_stream_init(&st, q, false);
    CHECK_EQ_INT(detok_stream_push(&st, 999999, buf, sizeof(buf)), ST_EINVAL);
    CHECK_EQ_INT(tokenizer_encode(NULL, "a", 1, false, &ids, &n, err), ST_EINVAL);
    tokenizer_free(q);
    tokenizer_free(s);
}

/* ASCII English-like text from the kjv goldens, repeated to n bytes. */
static char *english_text(size_t n)
{
    json_t *g = load_golden("goldens/kjv-qwen3.goldens.json");
    struct tok_text {
        char *p;
        size_t n, cap;
    } b = {malloc(4096), 0, 4096};
    json_t *sets = json_object_get(g, "cases"), *cases;
    const char *name;
    json_object_foreach(sets, name, cases) {
        size_t i;
        json_t *c;
        json_array_foreach(cases, i, c) {
            const char *s = json_string_value(json_object_get(c, "greedy_text"));
            size_t k = strlen(s);
            while (b.n + k + 2 > b.cap) b.p = realloc(b.p, b.cap *= 2);
            for (size_t j = 0; j < k; j++)
                if ((unsigned char)s[j] < 0x80 && s[j] != '<' && s[j] != '>') b.p[b.n++] = s[j];
            b.p[b.n++] = '\n';
        }
    }
    json_decref(g);
    char *out = malloc(n + 1);
    for (size_t i = 0; i < n; i++) out[i] = b.p[i % b.n];
    out[n] = 0;
    free(b.p);
    return out;
}

static void roundtrip(const struct tokenizer *t, const char *s, size_t n, const char *what, double *secs, int *n_tok)
{
    int32_t *ids = NULL;
    int k = 0;
    double t0 = time_s();
    if (encode(t, s, n, false, &ids, &k) != 0) return;
    if (secs) *secs = time_s() - t0;
    if (n_tok) *n_tok = k;
    CHECK_MSG(k > 0, "%s: no tokens", what);
    size_t dl = 0;
    char *d = decode(t, ids, k, false, &dl);
    CHECK_MSG(d && dl == n && memcmp(d, s, n) == 0, "%s: decode(encode(x)) != x", what);
    free(d);
    free(ids);
}

static void test_long_inputs(void)
{
    struct tokenizer *q = load_fixture(QWEN_DIR), *l = load_fixture(LLAMA3_DIR), *s = load_fixture(STORIES_DIR);
    REQUIRE(q && l && s);
    const size_t mb = 1 << 20;
    char *text = english_text(mb);
    roundtrip(q, text, mb, "qwen3 1 MB", NULL, NULL);
    roundtrip(l, text, mb, "llama3 1 MB", NULL, NULL);
    roundtrip(s, text, 256 * 1024, "stories 256 KB (one SentencePiece word)", NULL, NULL);
    /* 100k-character words without spaces: one letter repeated, random letters, random CJK, digits */
    size_t wn = 100000;
    char *w = malloc(wn * 3 + 1);
    struct rng r;
    rng_seed(&r, 42);
    memset(w, 'a', wn);
    roundtrip(q, w, wn, "qwen3 aaaa...", NULL, NULL);
    roundtrip(l, w, wn, "llama3 aaaa...", NULL, NULL);
    roundtrip(s, w, wn, "stories aaaa...", NULL, NULL);
    for (size_t i = 0; i < wn; i++) w[i] = (char)('a' + rng_next(&r) % 26);
    roundtrip(q, w, wn, "qwen3 random letters", NULL, NULL);
    roundtrip(l, w, wn, "llama3 random letters", NULL, NULL);
    roundtrip(s, w, wn, "stories random letters", NULL, NULL);
    for (size_t i = 0; i < wn; i++) w[i] = (char)('0' + rng_next(&r) % 10);
    roundtrip(q, w, wn, "qwen3 digits", NULL, NULL);
    roundtrip(l, w, wn, "llama3 digits", NULL, NULL);
    for (size_t i = 0; i < wn; i++) { /* CJK: already NFC */
        uint32_t cp = 0x4E00 + (uint32_t)(rng_next(&r) % 0x5000);
        w[3 * i] = (char)(0xE0 | (cp >> 12));
        w[3 * i + 1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        w[3 * i + 2] = (char)(0x80 | (cp & 0x3F));
    }
    roundtrip(q, w, wn * 3, "qwen3 CJK run", NULL, NULL);
    roundtrip(l, w, wn * 3, "llama3 CJK run", NULL, NULL);
    roundtrip(s, w, wn * 3, "stories CJK run (byte fallback)", NULL, NULL);
    memset(w, ' ', wn);
    roundtrip(q, w, wn, "qwen3 spaces", NULL, NULL);
    roundtrip(l, w, wn, "llama3 spaces", NULL, NULL);
    memset(w, '\n', wn);
    roundtrip(q, w, wn, "qwen3 newlines", NULL, NULL);
    free(w);
    free(text);
    tokenizer_free(q);
    tokenizer_free(l);
    tokenizer_free(s);
}

static void test_special_token_lookalikes(void)
{
    struct tokenizer *q = load_fixture(QWEN_DIR), *l = load_fixture(LLAMA3_DIR);
    REQUIRE(q && l);
    static const char *texts[] = {"<|foo|>", "<|im_start", "<|im_end|", "im_start|>", "< |im_end|>", "<|IM_END|>",
                                  "<|begin_of_text|", "<<|im_end|>>", "<|<|endoftext|>|>", "<think"};
    for (size_t i = 0; i < ST_ARRAY_LEN(texts); i++) {
        for (int which = 0; which < 2; which++) {
            const struct tokenizer *t = which ? l : q;
            int32_t *ids;
            int n;
            if (encode(t, texts[i], strlen(texts[i]), false, &ids, &n) != 0) continue;
            int n_special = 0;
            for (int k = 0; k < n; k++) n_special += tokenizer_is_special(t, ids[k]);
            /* only the complete strings inside the last three are real tokens */
            int want = which == 0 && (i == 7 || i == 8) ? 1 : 0;
            CHECK_MSG(n_special == want, "\"%s\" gave %d special tokens", texts[i], n_special);
            size_t dl;
            char *d = decode(t, ids, n, false, &dl);
            CHECK_STR(d, texts[i]);
            free(d);
            free(ids);
        }
    }
    /* split_special_tokens (tokenizer_config.json) makes special tokens plain text */
    char *json = NULL;
    size_t jn = 0;
    char err[ST_ERR_LEN] = "";
    char path[1024];
    snprintf(path, sizeof(path), "%s/tokenizer.json", fixture_path(QWEN_DIR));
    REQUIRE(file_read_all(path, &json, &jn, 1 << 30, err) == 0);
    static const char cfg[] = "{\"split_special_tokens\": true, \"eos_token\": {\"content\": \"<|im_end|>\"}}";
    struct tokenizer *qs = NULL;
    int rc = tokenizer_load_json(&qs, "qwen-split", json, jn, cfg, sizeof(cfg) - 1, err);
    CHECK_MSG(rc == 0, "%s", err);
    if (qs) {
        CHECK_EQ_INT(tokenizer_eos_id(qs), 151645);
        const char *text = "<|im_start|>user\n<think>";
        int32_t *a, *b;
        int na, nb;
        if (encode(qs, text, strlen(text), false, &a, &na) == 0 && encode(q, text, strlen(text), false, &b, &nb) == 0) {
            CHECK(nb == 4 && b[0] == 151644 && b[3] == 151667);
            bool has_special = false;
            for (int k = 0; k < na; k++) has_special |= tokenizer_is_special(qs, a[k]);
            CHECK(!has_special);
            CHECK(na > 4 && a[na - 1] == 151667); /* <think> is not special: still matched */
            free(a);
            free(b);
        }
        tokenizer_free(qs);
    }
    free(json);
    tokenizer_free(q);
    tokenizer_free(l);
}

/* ---- generated tokenizers ---- */

/* A tokenizer whose vocab is every printable ASCII character (id = code) plus the given extra pieces from id 200,
 * with the given pipeline parts (JSON text or NULL) and added tokens. */
static char *gen_json(const char *extra_vocab_json, const char *merges_json, const char *normalizer,
                      const char *pre_tokenizer, const char *decoder, const char *post, const char *added,
                      const char *model_extra)
{
    json_t *vocab = json_object();
    for (int c = 32; c < 127; c++) {
        char k[2] = {(char)c, 0};
        json_object_set_new(vocab, k, json_integer(c));
    }
    if (extra_vocab_json) {
        json_t *ev = json_loads(extra_vocab_json, 0, NULL);
        const char *k;
        json_t *v;
        json_object_foreach(ev, k, v) json_object_set(vocab, k, v);
        json_decref(ev);
    }
    char *vs = json_dumps(vocab, JSON_COMPACT);
    json_decref(vocab);
    size_t cap = strlen(vs) + 4096 + (merges_json ? strlen(merges_json) : 0) + (added ? strlen(added) : 0);
    char *out = malloc(cap);
    snprintf(out, cap,
             "{\"version\": \"1.0\", \"truncation\": null, \"padding\": null, \"added_tokens\": %s,\n"
             "\"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": %s, \"decoder\": %s,\n"
             "\"model\": {\"type\": \"BPE\", \"dropout\": null, %s \"vocab\": %s,\n\"merges\": %s}}",
             added ? added : "[]", normalizer ? normalizer : "null", pre_tokenizer ? pre_tokenizer : "null",
             post ? post : "null", decoder ? decoder : "null", model_extra ? model_extra : "", vs,
             merges_json ? merges_json : "[]");
    free(vs);
    return out;
}

static struct tokenizer *gen_load(const char *json, const char *cfg)
{
    char err[ST_ERR_LEN] = "";
    struct tokenizer *t = NULL;
    int rc = tokenizer_load_json(&t, "gen.json", json, strlen(json), cfg, cfg ? strlen(cfg) : 0, err);
    CHECK_MSG(rc == 0, "generated tokenizer: %s", err);
    return t;
}

static void check_encode(const struct tokenizer *t, const char *text, const int32_t *want, int n_want, bool sp)
{
    int32_t *ids;
    int n;
    if (encode(t, text, strlen(text), sp, &ids, &n) != 0) return;
    bool ok = n == n_want && memcmp(ids, want, sizeof(int32_t) * (size_t)n) == 0;
    CHECK_MSG(ok, "encode(\"%s\")", text);
    if (!ok) {
        print_ids("got ", ids, n);
        print_ids("want", want, n_want);
    }
    free(ids);
}
#define CHECK_ENC(t, text, ...)                                                                                        \
    do {                                                                                                               \
        const int32_t w_[] = {__VA_ARGS__};                                                                            \
        check_encode(t, text, w_, (int)ST_ARRAY_LEN(w_), false);                                                       \
    } while (0)

static void check_decode(const struct tokenizer *t, const int32_t *ids, int n, const char *want)
{
    size_t dl;
    char *d = decode(t, ids, n, false, &dl);
    CHECK_STR(d, want);
    free(d);
    check_stream_matches(t, ids, n, false, NULL, want);
}
#define CHECK_DEC(t, want, ...)                                                                                        \
    do {                                                                                                               \
        const int32_t i_[] = {__VA_ARGS__};                                                                            \
        check_decode(t, i_, (int)ST_ARRAY_LEN(i_), want);                                                              \
    } while (0)

static void test_added_token_flags(void)
{
    const char *added =
        "[{\"id\": 200, \"content\": \"[L]\", \"single_word\": false, \"lstrip\": true, \"rstrip\": false, "
        "\"normalized\": false, \"special\": false},"
        " {\"id\": 201, \"content\": \"[R]\", \"single_word\": false, \"lstrip\": false, \"rstrip\": true, "
        "\"normalized\": false, \"special\": false},"
        " {\"id\": 202, \"content\": \"cat\", \"single_word\": true, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": false, \"special\": false},"
        " {\"id\": 203, \"content\": \"<sp>\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": false, \"special\": true},"
        " {\"id\": 204, \"content\": \"Dog\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": true, \"special\": false},"
        " {\"id\": 205, \"content\": \"<sp>x\", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, "
        "\"normalized\": false, \"special\": false}]";
    char *json = gen_json(NULL, NULL, "{\"type\": \"Lowercase\"}", NULL, NULL, NULL, added, NULL);
    struct tokenizer *t = gen_load(json, NULL);
    REQUIRE(t);
    CHECK_EQ_INT(tokenizer_vocab_size(t), 206);
    CHECK_ENC(t, "x [L]y", 'x', 200, 'y');          /* lstrip takes the space */
    CHECK_ENC(t, "x[R]  \ty", 'x', 201, 'y');       /* rstrip takes the spaces */
    CHECK_ENC(t, "[R] [L]", 201, 200);              /* the space goes to [R] first */
    CHECK_ENC(t, "cat", 202);                       /* single_word */
    CHECK_ENC(t, "a cat.", 'a', ' ', 202, '.');     /* punctuation is not a word character */
    CHECK_ENC(t, "cats", 'c', 'a', 't', 's');       /* followed by a word character */
    CHECK_ENC(t, "_cat", '_', 'c', 'a', 't');       /* '_' is a word character */
    CHECK_ENC(t, "<sp>", 203);
    CHECK_ENC(t, "<sp>x", 205);                     /* leftmost-longest */
    CHECK_ENC(t, "<sp>y", 203, 'y');
    CHECK_ENC(t, "A DOG", 'a', ' ', 204);           /* normalized token matched in lowercased text */
    CHECK_ENC(t, "HOTDOGS", 'h', 'o', 't', 204, 's');
    CHECK_ENC(t, "ABC", 'a', 'b', 'c');
    /* no decoder: tokens joined with spaces, like the reference */
    CHECK_DEC(t, "x [L] y", 'x', 200, 'y');
    size_t dl;
    int32_t ids[] = {'a', 203, 'b'};
    char *d = decode(t, ids, 3, true, &dl);
    CHECK_STR(d, "a b");
    free(d);
    tokenizer_free(t);
    /* tokens that only tokenizer_config.json's added_tokens_decoder has are added (transformers does) */
    t = gen_load(json, "{\"added_tokens_decoder\": {\"203\": {\"content\": \"<sp>\", \"lstrip\": false, \"normalized\": "
                       "false, \"rstrip\": false, \"single_word\": false, \"special\": true}, \"210\": {\"content\": "
                       "\"<extra>\", \"lstrip\": false, \"normalized\": false, \"rstrip\": false, \"single_word\": "
                       "false, \"special\": true}}}");
    if (t) {
        CHECK_EQ_INT(tokenizer_vocab_size(t), 211);
        CHECK_ENC(t, "a<extra><sp>", 'a', 210, 203);
        CHECK(tokenizer_is_special(t, 210));
        tokenizer_free(t);
    }
    /* split_special_tokens: <sp> (special) becomes text, <sp>x (not special) still matches */
    t = gen_load(json, "{\"split_special_tokens\": true}");
    if (t) {
        CHECK_ENC(t, "<sp>y", '<', 's', 'p', '>', 'y');
        CHECK_ENC(t, "<sp>x", 205);
        tokenizer_free(t);
    }
    free(json);
}

static void test_bpe_model_options(void)
{
    /* merges in both formats, ranks, unk and byte fallback, ignore_merges, continuing prefix */
    const char *vocab = "{\"ab\": 200, \"abc\": 201, \"bc\": 202, \"<unk>\": 203, \"<0xC3>\": 204, \"<0xA9>\": 205, "
                        "\"abcabc\": 206}";
    char *json = gen_json(vocab, "[\"a b\", [\"b\", \"c\"], \"ab c\", \"abc abc\"]", NULL, NULL, NULL, NULL, NULL,
                          "\"unk_token\": \"<unk>\", \"fuse_unk\": false, \"byte_fallback\": true,");
    struct tokenizer *t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "abc", 201);          /* a b (rank 0) first, then ab c */
        CHECK_ENC(t, "bcab", 202, 200);
        CHECK_ENC(t, "abcabc", 206);
        CHECK_ENC(t, "aé", 'a', 204, 205); /* byte fallback: é = C3 A9 */
        CHECK_ENC(t, "aü", 'a', 203);      /* ü = C3 BC: <0xBC> missing, so no byte fallback: unk */
        tokenizer_free(t);
    }
    free(json);
    json = gen_json(vocab, "[\"a b\", [\"b\", \"c\"], \"ab c\"]", NULL, NULL, NULL, NULL, NULL,
                    "\"unk_token\": \"<unk>\", \"fuse_unk\": true,");
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "a\xc3\xbc\xc3\xbc" "b", 'a', 203, 'b'); /* fused unk */
        tokenizer_free(t);
    }
    free(json);
    json = gen_json(vocab, "[\"a b\", [\"b\", \"c\"], \"ab c\"]", NULL, NULL, NULL, NULL, NULL,
                    "\"unk_token\": \"<unk>\", \"fuse_unk\": false,");
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "a\xc3\xbc\xc3\xbc" "b", 'a', 203, 203, 'b');
        tokenizer_free(t);
    }
    free(json);
    /* the merge order matters: with "b c" ranked first, "abc" is a + bc */
    json = gen_json(vocab, "[[\"b\", \"c\"], \"a b\", \"ab c\"]", NULL, NULL, NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "abc", 'a', 202);
        tokenizer_free(t);
    }
    free(json);
    /* ignore_merges: a whole word in the vocab wins even without a merge path */
    json = gen_json("{\"xyz\": 210}", "[]", NULL, "{\"type\": \"WhitespaceSplit\"}", NULL, NULL, NULL,
                    "\"ignore_merges\": true,");
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "xyz xy", 210, 'x', 'y');
        tokenizer_free(t);
    }
    free(json);
    /* continuing_subword_prefix: merges drop the prefix of the second token */
    json = gen_json("{\"##b\": 211, \"##c\": 212, \"ab\": 213, \"abc\": 214}", "[\"a ##b\", \"ab ##c\"]", NULL,
                    "{\"type\": \"WhitespaceSplit\"}", NULL, NULL, NULL, "\"continuing_subword_prefix\": \"##\",");
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "abc ab b", 214, 213, 'b');
        tokenizer_free(t);
    }
    free(json);
}

static void test_pre_tokenizers(void)
{
    /* Metaspace with prepend_scheme first: only the piece at the start of the text gets the prefix */
    const char *mvocab = "{\"\xe2\x96\x81\": 300, \"\xe2\x96\x81" "a\": 301, \"\xe2\x96\x81" "b\": 302}";
    const char *mmerges = "[\"\xe2\x96\x81 a\", \"\xe2\x96\x81 b\"]";
    const char *added = "[{\"id\": 250, \"content\": \"<s>\", \"single_word\": false, \"lstrip\": false, "
                        "\"rstrip\": false, \"normalized\": false, \"special\": true}]";
    const char *meta_dec = "{\"type\": \"Metaspace\", \"replacement\": \"\xe2\x96\x81\", \"prepend_scheme\": \"first\", "
                           "\"split\": true}";
    char pre[256];
    snprintf(pre, sizeof(pre),
             "{\"type\": \"Metaspace\", \"replacement\": \"\xe2\x96\x81\", \"prepend_scheme\": \"%s\", "
             "\"split\": true}",
             "first");
    char *json = gen_json(mvocab, mmerges, NULL, pre, meta_dec, NULL, added, NULL);
    struct tokenizer *t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "a b", 301, 302);
        CHECK_ENC(t, "a  b", 301, 300, 302);
        CHECK_ENC(t, "<s>a b", 250, 'a', 302);
        CHECK_DEC(t, "a b", 301, 302);
        CHECK_DEC(t, "b a", 302, 301);
        CHECK_DEC(t, "a  b", 301, 300, 302);
        CHECK_DEC(t, "a", 300, 'a'); /* every replacement char of the first token is dropped */
        tokenizer_free(t);
    }
    free(json);
    snprintf(pre, sizeof(pre),
             "{\"type\": \"Metaspace\", \"replacement\": \"\xe2\x96\x81\", \"add_prefix_space\": true}");
    json = gen_json(mvocab, mmerges, NULL, pre, NULL, NULL, added, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "<s>a b", 250, 301, 302); /* legacy add_prefix_space = always */
        tokenizer_free(t);
    }
    free(json);
    /* Split behaviors, literal and regex patterns, Digits, Punctuation, WhitespaceSplit, Sequence */
    json = gen_json("{\"ab\": 220, \"a-\": 222, \"-c\": 223}", "[\"a b\", \"a -\", \"- c\"]", NULL,
                    "{\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, \"behavior\": \"MergedWithNext\", "
                    "\"invert\": false}",
                    NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "ab-c", 220, 223); /* pieces "ab", "-c" */
        CHECK_ENC(t, "a--c", 'a', '-', 223);
        tokenizer_free(t);
    }
    free(json);
    json = gen_json("{\"ab\": 220, \"a-\": 222, \"-c\": 223}", "[\"a b\", \"a -\", \"- c\"]", NULL,
                    "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"-+\"}, \"behavior\": \"Isolated\", "
                    "\"invert\": false}",
                    NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "ab-c", 220, '-', 'c');
        CHECK_ENC(t, "a--c", 'a', '-', '-', 'c');
        tokenizer_free(t);
    }
    free(json);
    json = gen_json("{\"ab\": 220, \"a-\": 222, \"-c\": 223}", "[\"a b\", \"a -\", \"- c\"]", NULL,
                    "{\"type\": \"Split\", \"pattern\": {\"Regex\": \"-\"}, \"behavior\": \"Contiguous\", "
                    "\"invert\": false}",
                    NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "ab--c", 220, '-', '-', 'c'); /* "ab", "--", "c" */
        tokenizer_free(t);
    }
    free(json);
    json = gen_json("{\"12\": 221, \"ab\": 220}", "[\"1 2\", \"a b\"]", NULL,
                    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"WhitespaceSplit\"}, "
                    "{\"type\": \"Digits\", \"individual_digits\": true}]}",
                    NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "ab12 12", 220, '1', '2', '1', '2');
        tokenizer_free(t);
    }
    free(json);
    /* Whitespace: Rust's \w takes combining marks, so "e\u0301x" stays one piece and e + U+0301 merge */
    json = gen_json("{\"\\u0301\": 260, \"e\\u0301\": 261, \"x!\": 262}", "[\"e \\u0301\", \"x !\"]", NULL,
                    "{\"type\": \"Whitespace\"}", NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "e\xcc\x81x!? \t_y", 261, 'x', '!', '?', '_', 'y');
        tokenizer_free(t);
    }
    free(json);
    json = gen_json("{\"ab\": 220, \"b!\": 227}", "[\"a b\", \"b !\"]", NULL,
                    "{\"type\": \"Punctuation\", \"behavior\": \"Isolated\"}", NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "ab!", 220, '!');
        tokenizer_free(t);
    }
    free(json);
    /* ByteLevel with add_prefix_space and the GPT-2 regex, no normalizer */
    json = gen_json("{\"\xc4\xa0\": 230, \"\xc4\xa0" "a\": 231}", "[\"\xc4\xa0 a\"]", NULL,
                    "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"use_regex\": true}",
                    "{\"type\": \"ByteLevel\"}", NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "a a", 231, 231);
        CHECK_DEC(t, " a a", 231, 231);
        tokenizer_free(t);
    }
    free(json);
    /* normalizers: Replace (literal and regex), Prepend, Strip, NFKC */
    json = gen_json(NULL, NULL,
                    "{\"type\": \"Sequence\", \"normalizers\": [{\"type\": \"Strip\", \"strip_left\": true, "
                    "\"strip_right\": true}, {\"type\": \"Replace\", \"pattern\": {\"Regex\": \"[0-9]+\"}, "
                    "\"content\": \"#\"}, {\"type\": \"NFKC\"}, {\"type\": \"Prepend\", \"prepend\": \">\"}]}",
                    NULL, NULL, NULL, NULL, NULL);
    t = gen_load(json, NULL);
    if (t) {
        CHECK_ENC(t, "  a12b3 \t", '>', 'a', '#', 'b', '#');
        CHECK_ENC(t, "\xef\xbc\xa1", '>', 'A'); /* fullwidth A -> A */
        tokenizer_free(t);
    }
    free(json);
}

static void test_post_processors(void)
{
    const char *added = "[{\"id\": 240, \"content\": \"[CLS]\", \"single_word\": false, \"lstrip\": false, "
                        "\"rstrip\": false, \"normalized\": false, \"special\": true},"
                        " {\"id\": 241, \"content\": \"[SEP]\", \"single_word\": false, \"lstrip\": false, "
                        "\"rstrip\": false, \"normalized\": false, \"special\": true}]";
    char *json = gen_json(NULL, NULL, NULL, NULL, NULL,
                          "{\"type\": \"TemplateProcessing\", \"single\": [{\"SpecialToken\": {\"id\": \"[CLS]\", "
                          "\"type_id\": 0}}, {\"Sequence\": {\"id\": \"A\", \"type_id\": 0}}, {\"SpecialToken\": "
                          "{\"id\": \"[SEP]\", \"type_id\": 0}}], \"pair\": [], \"special_tokens\": {\"[CLS]\": "
                          "{\"id\": \"[CLS]\", \"ids\": [240], \"tokens\": [\"[CLS]\"]}, \"[SEP]\": {\"id\": \"[SEP]\", "
                          "\"ids\": [241], \"tokens\": [\"[SEP]\"]}}}",
                          added, NULL);
    struct tokenizer *t = gen_load(json, NULL);
    if (t) {
        const int32_t w1[] = {240, 'h', 'i', 241}, w2[] = {'h', 'i'};
        check_encode(t, "hi", w1, 4, true);
        check_encode(t, "hi", w2, 2, false);
        tokenizer_free(t);
    }
    free(json);
    json = gen_json(NULL, NULL, NULL, NULL, NULL,
                    "{\"type\": \"Sequence\", \"processors\": [{\"type\": \"ByteLevel\", \"trim_offsets\": false}, "
                    "{\"type\": \"RobertaProcessing\", \"sep\": [\"[SEP]\", 241], \"cls\": [\"[CLS]\", 240], "
                    "\"trim_offsets\": true, \"add_prefix_space\": false}]}",
                    added, NULL);
    t = gen_load(json, NULL);
    if (t) {
        const int32_t w1[] = {240, 'h', 'i', 241};
        check_encode(t, "hi", w1, 4, true);
        tokenizer_free(t);
    }
    free(json);
    /* add_bos_token / add_eos_token in tokenizer_config.json when the post-processor adds nothing */
    json = gen_json(NULL, NULL, NULL, NULL, NULL, NULL, added, NULL);
    t = gen_load(json, "{\"add_bos_token\": true, \"add_eos_token\": true, \"bos_token\": \"[CLS]\", "
                       "\"eos_token\": {\"content\": \"[SEP]\", \"special\": true}, \"model_max_length\": "
                       "1000000000000000019884624838656, \"chat_template\": [{\"name\": \"tool_use\", \"template\": "
                       "\"T\"}, {\"name\": \"default\", \"template\": \"D\"}]}");
    if (t) {
        const int32_t w1[] = {240, 'h', 'i', 241};
        check_encode(t, "hi", w1, 4, true);
        CHECK_STR(tokenizer_chat_template(t), "D");
        tokenizer_free(t);
    }
    free(json);
}

static void test_decoders(void)
{
    /* a Replace pattern that spans tokens after Fuse, Strip at both ends, and the SentencePiece chain */
    const char *vocab = "{\"\xe2\x96\x81\": 300, \"<0xE2>\": 301, \"<0x82>\": 302, \"<0xAC>\": 303, \"<0xFF>\": 304, "
                        "\"<0x41>\": 305, \"<0x+F>\": 306}";
    struct {
        const char *dec;
        int n;
        int32_t ids[8];
        const char *want;
    } cases[] = {
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Fuse\"}, {\"type\": \"Replace\", \"pattern\": "
         "{\"String\": \"ab\"}, \"content\": \"X\"}]}",
         4, {'a', 'a', 'b', 'b'}, "aXb"},
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", \"pattern\": {\"String\": \"ab\"}, \"content\": "
         "\"X\"}]}",
         4, {'a', 'a', 'b', 'b'}, "aabb"},
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Fuse\"}, {\"type\": \"Strip\", \"content\": \" \", "
         "\"start\": 2, \"stop\": 1}]}",
         6, {' ', ' ', ' ', 'a', ' ', ' '}, " a "},
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Fuse\"}, {\"type\": \"Strip\", \"content\": \"a\", "
         "\"start\": 1, \"stop\": 1}]}",
         4, {'a', 'b', 'a', 'a'}, "ba"},
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"Replace\", \"pattern\": {\"String\": \"\xe2\x96\x81\"}, "
         "\"content\": \" \"}, {\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}, {\"type\": \"Strip\", \"content\": \" \", "
         "\"start\": 1, \"stop\": 0}]}",
         6, {300, 'h', 301, 302, 303, 'i'}, "h\xe2\x82\xaci"},
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}]}", 5,
         {'x', 301, 302, 304, 'y'}, "x\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbdy"}, /* an invalid run: one U+FFFD per byte */
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}]}", 3,
         {301, 302, 305}, "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"}, /* E2 82 41: invalid, so every byte is U+FFFD */
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}, {\"type\": \"Fuse\"}]}", 2, {306, 'z'},
         "\x0fz"}, /* <0x+F>: u8::from_str_radix accepts the sign */
        {"{\"type\": \"Sequence\", \"decoders\": [{\"type\": \"ByteFallback\"}, {\"type\": \"Metaspace\", "
         "\"replacement\": \"\xe2\x96\x81\", \"prepend_scheme\": \"always\", \"split\": true}]}",
         4, {301, 302, 303, 300}, "\xe2\x82\xac "}, /* the run is token 0, so the replacement in token 1 is a space */
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(cases); i++) {
        char *json = gen_json(vocab, NULL, NULL, NULL, cases[i].dec, NULL, NULL, NULL);
        struct tokenizer *t = gen_load(json, NULL);
        if (t) {
            check_decode(t, cases[i].ids, cases[i].n, cases[i].want);
            /* random sequences over the whole vocab, streamed with tiny buffers */
            struct rng r;
            rng_seed(&r, 1000 + i);
            int32_t ids[40];
            int32_t pool[] = {' ', 'a', 'b', 'h', 'i', 300, 301, 302, 303, 304, 305, 306};
            for (int it = 0; it < 300; it++) {
                int n = (int)(rng_next(&r) % 40);
                for (int k = 0; k < n; k++) ids[k] = pool[rng_next(&r) % ST_ARRAY_LEN(pool)];
                check_stream_matches(t, ids, n, false, &r, cases[i].dec);
            }
            tokenizer_free(t);
        }
        free(json);
    }
    /* ByteLevel: pieces that are not all byte-level characters are taken as raw UTF-8 */
    char *json = gen_json("{\"\xc3\xa9\": 310, \"\xe2\x82\xac\": 311, \"\xc3\xa2\": 312, \"\xc4\xa4\": 313, "
                          "\"\xc2\xac\": 314, \"x\xe2\x82\xac\": 315}",
                          NULL, NULL, NULL, "{\"type\": \"ByteLevel\"}", NULL, NULL, NULL);
    struct tokenizer *t = gen_load(json, NULL);
    if (t) {
        CHECK_DEC(t, "\xef\xbf\xbd", 310);                  /* é is the byte E9: a lone lead byte */
        CHECK_DEC(t, "\xe2\x82\xac", 311);                  /* € is not a byte-level character: its own bytes */
        CHECK_DEC(t, "x\xe2\x82\xac", 315);                 /* one such character makes the whole piece raw */
        CHECK_DEC(t, "\xef\xbf\xbd", 312, 313);              /* â Ĥ = E2 82: one U+FFFD for the incomplete tail */
        CHECK_DEC(t, "\xe2\x82\xac", 312, 313, 314);         /* â Ĥ ¬ = E2 82 AC */
        CHECK_DEC(t, "\xef\xbf\xbd" "A", 312, 313, 'A');        /* E2 82 41 */
        CHECK_DEC(t, "\xef\xbf\xbd\xef\xbf\xbd", 314, 314);  /* lone continuation bytes: one U+FFFD each */
        tokenizer_free(t);
    }
    free(json);
}

/* ---- an independent BPE oracle ----
 * stories260K has no pre-tokenizer: a whole text is one word. The encoder splits long words at characters that
 * can never be merged with their left neighbour; this holds it to a naive O(n^2) BPE (merge the lowest-ranked
 * pair, leftmost first, until none is left) written from the file alone. */

static int oracle_encode(const struct tokenizer *t, const json_t *merge_rank, const char *text, int32_t *out,
                         int cap)
{
    /* normalizer: Prepend U+2581, Replace ' ' -> U+2581 */
    size_t n = strlen(text);
    char *norm = malloc(3 * n + 4);
    size_t k = 0;
    memcpy(norm, "\xe2\x96\x81", 3);
    k = 3;
    for (size_t i = 0; i < n; i++) {
        if (text[i] == ' ') {
            memcpy(norm + k, "\xe2\x96\x81", 3);
            k += 3;
        } else {
            norm[k++] = text[i];
        }
    }
    /* initial symbols: characters, else byte fallback */
    int ns = 0;
    for (size_t i = 0; i < k;) {
        unsigned char c = (unsigned char)norm[i];
        size_t l = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        char ch[8];
        memcpy(ch, norm + i, l);
        ch[l] = 0;
        int32_t id = tokenizer_find(t, ch);
        if (id >= 0 && !tokenizer_is_special(t, id)) {
            out[ns++] = id;
        } else {
            for (size_t b = 0; b < l; b++) {
                char bt[8];
                snprintf(bt, sizeof(bt), "<0x%02X>", (unsigned char)norm[i + b]);
                out[ns++] = tokenizer_find(t, bt);
            }
        }
        i += l;
        if (ns + 8 > cap) break;
    }
    free(norm);
    for (;;) {
        long best = -1, best_rank = 0;
        for (int i = 0; i + 1 < ns; i++) {
            char key[256];
            snprintf(key, sizeof(key), "%s %s", tokenizer_piece(t, out[i]), tokenizer_piece(t, out[i + 1]));
            json_t *r = json_object_get(merge_rank, key);
            if (r && (best < 0 || json_integer_value(r) < best_rank)) {
                best = i;
                best_rank = (long)json_integer_value(r);
            }
        }
        if (best < 0) break;
        char merged[256];
        snprintf(merged, sizeof(merged), "%s%s", tokenizer_piece(t, out[best]), tokenizer_piece(t, out[best + 1]));
        out[best] = tokenizer_find(t, merged);
        memmove(out + best + 1, out + best + 2, sizeof(int32_t) * (size_t)(ns - best - 2));
        ns--;
    }
    return ns;
}

static void test_bpe_oracle(void)
{
    struct tokenizer *t = load_fixture(STORIES_DIR);
    char path[1024];
    snprintf(path, sizeof(path), "%s/tokenizer.json", fixture_path(STORIES_DIR));
    json_error_t je;
    json_t *tj = json_load_file(path, 0, &je);
    REQUIRE(t && tj);
    json_t *merges = json_object_get(json_object_get(tj, "model"), "merges"), *ranks = json_object();
    for (size_t i = 0; i < json_array_size(merges); i++) {
        json_t *m = json_array_get(merges, i);
        char key[256];
        if (json_is_string(m)) snprintf(key, sizeof(key), "%s", json_string_value(m));
        else snprintf(key, sizeof(key), "%s %s", json_string_value(json_array_get(m, 0)), json_string_value(json_array_get(m, 1)));
        json_object_set_new(ranks, key, json_integer((json_int_t)i));
    }
    REQUIRE(json_object_size(ranks) > 100);
    static const char *words[] = {"the", "a", "little", "girl", "named", "Lily", "she", "was", "happy", "and", "they",
                                  "played", "in", "park", "Once", "upon", "time", "there", "tree", "big", "dog",
                                  "caf\xc3\xa9", "\xe4\xbd\xa0\xe5\xa5\xbd", "\xf0\x9f\x99\x82", "x", "", "zzz",
                                  "\xce\xa9mega", "1234", "it's", "!", ",", "."};
    struct rng r;
    rng_seed(&r, 99);
    int32_t *want = malloc(sizeof(int32_t) * 40000);
    for (int it = 0; it < 40; it++) {
        char text[6000];
        size_t k = 0;
        size_t target = it % 2 ? 4000 : 40; /* the long ones take the split path, the short ones do not */
        while (k < target) {
            const char *w = words[rng_next(&r) % ST_ARRAY_LEN(words)];
            size_t wl = strlen(w);
            int spaces = (int)(rng_next(&r) % 4 == 0 ? rng_next(&r) % 3 : 1);
            for (int s = 0; s < spaces; s++) text[k++] = ' ';
            memcpy(text + k, w, wl);
            k += wl;
        }
        text[k] = 0;
        int nw = oracle_encode(t, ranks, text, want, 40000);
        int32_t *got;
        int ng;
        if (encode(t, text, k, false, &got, &ng) != 0) break;
        bool ok = ng == nw && memcmp(got, want, sizeof(int32_t) * (size_t)nw) == 0;
        CHECK_MSG(ok, "stories text %d (%zu bytes) differs from the naive BPE", it, k);
        if (!ok) {
            print_ids("got ", got, ng);
            print_ids("want", want, nw);
        }
        free(got);
    }
    free(want);
    json_decref(ranks);
    json_decref(tj);
    tokenizer_free(t);
}

/* ---- bad files ---- */

static void expect_load_error(const char *json, size_t n, int want_rc, const char *want_in_msg, const char *what)
{
    char err[ST_ERR_LEN] = "";
    struct tokenizer *t = (struct tokenizer *)&t;
    int rc = tokenizer_load_json(&t, "gen.json", json, n, NULL, 0, err);
    CHECK_MSG(rc < 0, "%s: loaded", what);
    if (want_rc) CHECK_MSG(rc == want_rc, "%s: rc %d (%s), want %d", what, rc, err, want_rc);
    CHECK_MSG(t == NULL, "%s: *out not NULL on error", what);
    CHECK_MSG(err[0] != 0, "%s: no message", what);
    if (want_in_msg) CHECK_MSG(strstr(err, want_in_msg) != NULL, "%s: message \"%s\" lacks \"%s\"", what, err, want_in_msg);
    if (rc == 0) tokenizer_free(t);
}

static void test_corrupt_files(void)
{
    const char *added = "[{\"id\": 200, \"content\": \"<s>\", \"single_word\": false, \"lstrip\": false, "
                        "\"rstrip\": false, \"normalized\": false, \"special\": true}]";
    char *json = gen_json("{\"ab\": 201, \"bc\": 203, \"\\u00e9\\ud83d\\ude00\": 202}", "[\"a b\", [\"b\", \"c\"]]",
                          "{\"type\": \"NFC\"}", "{\"type\": \"ByteLevel\", \"add_prefix_space\": false}",
                          "{\"type\": \"ByteLevel\"}", NULL, added, NULL);
    size_t n = strlen(json);
    struct tokenizer *t = gen_load(json, NULL);
    CHECK(t != NULL);
    tokenizer_free(t);
    /* every truncation is an error naming the file, never a crash */
    for (size_t k = 0; k < n; k++) {
        char *cut = malloc(k + 1);
        memcpy(cut, json, k);
        cut[k] = 0;
        expect_load_error(cut, k, 0, "gen.json", "truncated");
        free(cut);
    }
    /* random byte corruption: an error or a working tokenizer, never a crash */
    struct rng r;
    rng_seed(&r, 7);
    char *m = malloc(n + 1);
    int loaded = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(m, json, n + 1);
        int flips = 1 + (int)(rng_next(&r) % 3);
        for (int f = 0; f < flips; f++) m[rng_next(&r) % n] = (char)(rng_next(&r) & 0xff);
        char err[ST_ERR_LEN] = "";
        struct tokenizer *tt = NULL;
        if (tokenizer_load_json(&tt, "gen.json", m, n, NULL, 0, err) == 0) {
            loaded++;
            int32_t *ids;
            int k;
            if (tokenizer_encode(tt, "hello <s> abc \xc3\xa9", 14, true, &ids, &k, err) == 0) {
                char *d;
                size_t dl;
                if (tokenizer_decode(tt, ids, k, false, &d, &dl, err) == 0) free(d);
                free(ids);
            }
            tokenizer_free(tt);
        } else {
            CHECK_MSG(err[0], "corruption %d: error without a message", it);
        }
    }
    CHECK(loaded > 0);
    free(m);
    free(json);

    static const struct {
        const char *json;
        int rc;
        const char *msg;
    } bad[] = {
        {"", ST_EFORMAT, "line 1"},
        {"[]", ST_EFORMAT, "expected '{'"},
        {"{}", ST_EFORMAT, "no \"model\""},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}", ST_EFORMAT, "empty"},
        {"{\"model\": {\"type\": \"Unigram\", \"vocab\": [[\"a\", 0.0]]}}", ST_EUNSUPPORTED, "Unigram"},
        {"{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"a\": 0}}}", ST_EUNSUPPORTED, "WordPiece"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}", ST_EFORMAT,
         "merge 1: token \"b\" is not in the vocab"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b\"]}}", ST_EFORMAT,
         "merged token \"ab\""},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0, \"b\": 1}, \"merges\": [\"a b c\"]}}", ST_EFORMAT,
         "one space"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -1}, \"merges\": []}}", ST_EFORMAT, "negative"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 1.5}, \"merges\": []}}", ST_EFORMAT, "integer"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 99999999999}, \"merges\": []}}", ST_EFORMAT, "too large"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\\ud800\": 0}, \"merges\": []}}", ST_EFORMAT, "surrogate"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\xff\": 0}, \"merges\": []}}", ST_EFORMAT, "UTF-8"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}} x", ST_EFORMAT, "after the end"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"normalizer\": {\"type\": "
         "\"Precompiled\", \"precompiled_charsmap\": \"\"}}",
         ST_EUNSUPPORTED, "Precompiled"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"pre_tokenizer\": {\"type\": "
         "\"BertPreTokenizer\"}}",
         ST_EUNSUPPORTED, "BertPreTokenizer"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"decoder\": {\"type\": "
         "\"WordPiece\", \"prefix\": \"##\"}}",
         ST_EUNSUPPORTED, "WordPiece"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"post_processor\": {\"type\": "
         "\"Mystery\"}}",
         ST_EUNSUPPORTED, "Mystery"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"pre_tokenizer\": {\"type\": "
         "\"Split\", \"pattern\": {\"Regex\": \"(unclosed\"}, \"behavior\": \"Isolated\", \"invert\": false}}",
         ST_EFORMAT, "regex"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"decoder\": {\"type\": "
         "\"Sequence\", \"decoders\": [{\"type\": \"Fuse\"}, {\"type\": \"ByteLevel\"}]}}",
         ST_EUNSUPPORTED, "ByteLevel"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"added_tokens\": [{\"content\": "
         "\"x\"}]}",
         ST_EFORMAT, "added_tokens[0]"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}, \"added_tokens\": [1, 2}",
         ST_EFORMAT, "line 1"},
        {"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0} \"merges\": []}}", ST_EFORMAT, "expected ','"},
    };
    for (size_t i = 0; i < ST_ARRAY_LEN(bad); i++) expect_load_error(bad[i].json, strlen(bad[i].json), bad[i].rc, bad[i].msg, bad[i].json);

    /* deep nesting in a value jansson parses */
    size_t depth = 100000;
    char *deep = malloc(depth * 2 + 128);
    size_t k = (size_t)sprintf(deep, "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}}, \"x\": ");
    for (size_t i = 0; i < depth; i++) deep[k++] = '[';
    for (size_t i = 0; i < depth; i++) deep[k++] = ']';
    deep[k++] = '}';
    expect_load_error(deep, k, ST_EFORMAT, "nesting", "deep nesting");
    free(deep);

    /* a truncated real tokenizer.json in a directory: the message names the file and the place */
    char path[1024], dir[] = "/tmp/strata-tok-XXXXXX", err[ST_ERR_LEN] = "";
    char *real = NULL;
    size_t rn = 0;
    snprintf(path, sizeof(path), "%s/tokenizer.json", fixture_path(QWEN_DIR));
    REQUIRE(file_read_all(path, &real, &rn, 1 << 30, err) == 0);
    REQUIRE(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/tokenizer.json", dir);
    size_t cuts[] = {rn / 3, rn / 2, rn - 10};
    for (size_t i = 0; i < ST_ARRAY_LEN(cuts); i++) {
        FILE *f = fopen(path, "wb");
        REQUIRE(f);
        fwrite(real, 1, cuts[i], f);
        fclose(f);
        struct tokenizer *tt = NULL;
        int rc = tokenizer_load(&tt, dir, err);
        CHECK_EQ_INT(rc, ST_EFORMAT);
        CHECK_MSG(strstr(err, path) && strstr(err, "truncated"), "message: %s", err);
        tokenizer_free(tt);
    }
    unlink(path);
    struct tokenizer *tt = NULL;
    CHECK_EQ_INT(tokenizer_load(&tt, dir, err), ST_EIO); /* no tokenizer.json at all */
    CHECK(strstr(err, "tokenizer.json") != NULL);
    rmdir(dir);
    free(real);
}

/* ---- streaming ---- */

static void stream_random(const char *dir, const char *golden_key, uint64_t seed, int iters)
{
    struct tokenizer *t = load_fixture(dir);
    json_t *g = load_golden("goldens/tokenizers.public.json");
    if (!t || !g) goto done;
    /* the pool: every golden id sequence */
    json_t *cases = json_object_get(g, golden_key);
    int n_seq = (int)json_array_size(cases);
    struct rng r;
    rng_seed(&r, seed);
    int vocab = tokenizer_vocab_size(t);
    int32_t *ids = malloc(sizeof(int32_t) * 512);
    for (int it = 0; it < iters; it++) {
        int n = 0;
        int parts = 1 + (int)(rng_next(&r) % 4);
        for (int p = 0; p < parts && n < 400; p++) {
            uint64_t kind = rng_next(&r) % 4;
            if (kind < 2 && n_seq) { /* a random slice of a golden sequence */
                json_t *a = json_object_get(json_array_get(cases, rng_next(&r) % (uint64_t)n_seq), "ids");
                int an = (int)json_array_size(a);
                if (!an) continue;
                int s = (int)(rng_next(&r) % (uint64_t)an), e = s + 1 + (int)(rng_next(&r) % (uint64_t)(an - s));
                for (int k = s; k < e && n < 500; k++) ids[n++] = (int32_t)json_integer_value(json_array_get(a, (size_t)k));
            } else if (kind == 2) { /* random ids anywhere in the vocab: broken UTF-8 included */
                int m = 1 + (int)(rng_next(&r) % 8);
                for (int k = 0; k < m; k++) {
                    int32_t id = (int32_t)(rng_next(&r) % (uint64_t)vocab);
                    if (tokenizer_piece(t, id)) ids[n++] = id;
                }
            } else { /* small ids: single bytes / byte-fallback tokens, specials */
                int m = 1 + (int)(rng_next(&r) % 8);
                for (int k = 0; k < m; k++) ids[n++] = (int32_t)(rng_next(&r) % (uint64_t)ST_MIN(vocab, 300));
            }
        }
        bool skip = rng_next(&r) & 1;
        check_stream_matches(t, ids, n, skip, &r, dir);
    }
    free(ids);
done:
    json_decref(g);
    tokenizer_free(t);
}

static void test_stream_property_qwen3(void) { stream_random(QWEN_DIR, "qwen3", 11, 400); }
static void test_stream_property_llama3(void) { stream_random(LLAMA3_DIR, "llama3", 12, 400); }
static void test_stream_property_stories(void) { stream_random(STORIES_DIR, "none", 13, 1500); }

static void test_stream_buffers(void)
{
    struct tokenizer *t = load_fixture(QWEN_DIR);
    REQUIRE(t);
    CHECK(tokenizer_stream_chunk_max(t) >= 64);
    /* "é" split over two byte-level tokens: nothing, then the character */
    int32_t e1 = tokenizer_find(t, "\xc3\x83"); /* byte C3 */
    int32_t e2 = tokenizer_find(t, "\xc2\xa9"); /* byte A9 */
    REQUIRE(e1 >= 0 && e2 >= 0);
    struct detok_stream s;
    detok_stream_init(&s, t, false);
    char buf[8];
    CHECK_EQ_INT(detok_stream_push(&s, e1, buf, sizeof(buf)), 0);
    CHECK_EQ_INT(buf[0], 0);
    CHECK_EQ_INT(detok_stream_push(&s, e2, buf, 2), ST_ERANGE); /* needs 3 with the NUL */
    struct detok_stream copy = s;
    CHECK_EQ_INT(detok_stream_push(&s, e2, buf, 3), 2);
    CHECK_STR(buf, "\xc3\xa9");
    CHECK_EQ_INT(detok_stream_push(&copy, e2, buf, 3), 2); /* the failed push left the state alone */
    CHECK_EQ_INT(detok_stream_flush(&s, buf, sizeof(buf)), 0);
    /* an incomplete character at the end becomes U+FFFD on flush */
    CHECK_EQ_INT(detok_stream_push(&s, e1, buf, sizeof(buf)), 0);
    CHECK_EQ_INT(detok_stream_flush(&s, buf, sizeof(buf)), 3);
    CHECK_STR(buf, "\xef\xbf\xbd");
    /* special tokens are skipped when asked */
    detok_stream_init(&s, t, true);
    CHECK_EQ_INT(detok_stream_push(&s, 151645, buf, sizeof(buf)), 0);
    detok_stream_init(&s, t, false);
    char big[64];
    CHECK_EQ_INT(detok_stream_push(&s, 151645, big, sizeof(big)), 10);
    CHECK_STR(big, "<|im_end|>");
    CHECK_EQ_INT(detok_stream_push(&s, 9707, big, 0), ST_EINVAL);
    tokenizer_free(t);
}

/* ---- threads ---- */

struct thread_arg {
    const struct tokenizer *t;
    const char *text;
    size_t len;
    const int32_t *want;
    int n_want;
    int mismatches;
};

static void *thread_main(void *p)
{
    struct thread_arg *a = p;
    for (int it = 0; it < 20; it++) {
        int32_t *ids;
        int n;
        char err[ST_ERR_LEN];
        if (tokenizer_encode(a->t, a->text, a->len, false, &ids, &n, err) != 0) {
            a->mismatches++;
            continue;
        }
        if (n != a->n_want || memcmp(ids, a->want, sizeof(int32_t) * (size_t)n) != 0) a->mismatches++;
        free(ids);
    }
    return NULL;
}

static void test_threads(void)
{
    struct tokenizer *t = load_fixture(QWEN_DIR);
    REQUIRE(t);
    size_t len = 64 * 1024;
    char *text = english_text(len);
    int32_t *want;
    int n_want;
    if (encode(t, text, len, false, &want, &n_want) == 0) {
        struct thread_arg args[4];
        pthread_t th[4];
        for (int i = 0; i < 4; i++) {
            args[i] = (struct thread_arg){t, text, len, want, n_want, 0};
            CHECK(pthread_create(&th[i], NULL, thread_main, &args[i]) == 0);
        }
        for (int i = 0; i < 4; i++) {
            pthread_join(th[i], NULL);
            CHECK_EQ_INT(args[i].mismatches, 0);
        }
        free(want);
    }
    free(text);
    tokenizer_free(t);
}

/* ---- measurements (printed; time is not asserted) ---- */

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void bench_load(const char *rel)
{
    double best = 1e9, best_cpu = 1e9;
    for (int r = 0; r < BENCH_REPS; r++) {
        double t0 = time_s(), c0 = cpu_s();
        struct tokenizer *t = load_fixture(rel);
        double dt = time_s() - t0, dc = cpu_s() - c0;
        if (!t) return;
        best = ST_MIN(best, dt);
        best_cpu = ST_MIN(best_cpu, dc);
        tokenizer_free(t);
    }
    fprintf(stderr, "  bench: load %-28s %7.1f ms (cpu %.1f ms, best of %d)\n", rel, best * 1e3, best_cpu * 1e3,
            BENCH_REPS);
}

static void bench_encode(const char *rel, const char *text, size_t n, const char *what)
{
    struct tokenizer *t = load_fixture(rel);
    if (!t) return;
    double best = 1e9, best_cpu = 1e9;
    int n_tok = 0;
    for (int r = 0; r < BENCH_REPS; r++) {
        int32_t *ids;
        int k;
        double t0 = time_s(), c0 = cpu_s();
        if (encode(t, text, n, false, &ids, &k) != 0) break;
        best = ST_MIN(best, time_s() - t0);
        best_cpu = ST_MIN(best_cpu, cpu_s() - c0);
        n_tok = k;
        free(ids);
    }
    fprintf(stderr, "  bench: encode %-9s %-22s %8zu bytes -> %7d tokens %7.1f ms (cpu %.1f ms, %.1f MB/s)\n", what,
            rel, n, n_tok, best * 1e3, best_cpu * 1e3, (double)n / best / 1e6);
    tokenizer_free(t);
}

static void test_bench(void)
{
    bench_load(QWEN_DIR);
    bench_load(LLAMA3_DIR);
    size_t mb = 1 << 20;
    char *text = english_text(mb);
    bench_encode(QWEN_DIR, text, mb, "1MB");
    bench_encode(LLAMA3_DIR, text, mb, "1MB");
    bench_encode(STORIES_DIR, text, mb, "1MB");
    char *w = malloc(100000);
    memset(w, 'a', 100000);
    bench_encode(QWEN_DIR, w, 100000, "100k-word");
    bench_encode(STORIES_DIR, w, 100000, "100k-word");
    free(w);
    free(text);
}

int main(void)
{
    RUN(test_qwen3_public_goldens);
    RUN(test_llama3_public_goldens);
    RUN(test_stories_goldens);
    RUN(test_kjv_goldens);
    RUN(test_invalid_utf8);
    RUN(test_empty_and_null);
    RUN(test_long_inputs);
    RUN(test_special_token_lookalikes);
    RUN(test_added_token_flags);
    RUN(test_bpe_model_options);
    RUN(test_bpe_oracle);
    RUN(test_pre_tokenizers);
    RUN(test_post_processors);
    RUN(test_decoders);
    RUN(test_corrupt_files);
    RUN(test_stream_property_qwen3);
    RUN(test_stream_property_llama3);
    RUN(test_stream_property_stories);
    RUN(test_stream_buffers);
    RUN(test_threads);
    RUN(test_bench);
    return check_done();
}
