/* libFuzzer target for the tokenizer. The first byte picks what the rest is:
 *   0: a tokenizer.json (the seeds are small generated tokenizers); when it loads, some texts are encoded and
 *      decoded with it;
 *   1: text for the stories260K tokenizer ($STRATA_FIXTURES/models/stories260K, default build/fixtures);
 *   2: token ids (16-bit little-endian) for the stories260K tokenizer.
 * Beyond "no crash, no leak, no hang", it checks: ids are in the vocabulary, streamed decoding equals
 * tokenizer_decode, and decode(encode(text)) == text for stories260K when no special token (and no literal U+2581)
 * is involved. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "tokenizer/tokenizer.h"

#define FUZZ_CHECK(c)                                                                                                  \
    do {                                                                                                               \
        if (!(c)) {                                                                                                    \
            fprintf(stderr, "fuzz_tokenizer: check failed: %s (%s:%d)\n", #c, __FILE__, __LINE__);                     \
            abort();                                                                                                   \
        }                                                                                                              \
    } while (0)

static struct tokenizer *stories;
static bool stories_tried;

static const struct tokenizer *get_stories(void)
{
    if (!stories_tried) {
        stories_tried = true;
        const char *root = getenv("STRATA_FIXTURES");
        char dir[1024], err[ST_ERR_LEN];
        snprintf(dir, sizeof(dir), "%s/models/stories260K", root && *root ? root : "build/fixtures");
        if (tokenizer_load(&stories, dir, err) < 0) {
            fprintf(stderr, "fuzz_tokenizer: %s (text and id inputs are skipped)\n", err);
            stories = NULL;
        }
    }
    return stories;
}

/* tokenizer_decode and the streaming decoder must agree; returns the decoded text (caller frees) or NULL. */
static char *decode_both(const struct tokenizer *t, const int32_t *ids, int n, bool skip, size_t *len)
{
    char err[ST_ERR_LEN], *d = NULL;
    if (tokenizer_decode(t, ids, n, skip, &d, len, err) < 0) return NULL;
    size_t max = tokenizer_stream_chunk_max(t), total = 0;
    char *buf = malloc(max), *acc = malloc(*len + 1);
    FUZZ_CHECK(buf && acc);
    struct detok_stream s;
    detok_stream_init(&s, t, skip);
    for (int i = 0; i <= n; i++) {
        int w = i < n ? detok_stream_push(&s, ids[i], buf, max) : detok_stream_flush(&s, buf, max);
        FUZZ_CHECK(w >= 0);
        FUZZ_CHECK(total + (size_t)w <= *len);
        memcpy(acc + total, buf, (size_t)w);
        total += (size_t)w;
    }
    FUZZ_CHECK(total == *len && memcmp(acc, d, total) == 0);
    free(buf);
    free(acc);
    return d;
}

static void exercise(const struct tokenizer *t, const char *text, size_t n)
{
    char err[ST_ERR_LEN];
    int32_t *ids = NULL;
    int k = 0;
    for (int sp = 0; sp < 2; sp++) {
        if (tokenizer_encode(t, text, n, sp, &ids, &k, err) < 0) continue;
        for (int i = 0; i < k; i++) FUZZ_CHECK(ids[i] >= 0 && ids[i] < tokenizer_vocab_size(t));
        size_t dl;
        free(decode_both(t, ids, k, false, &dl));
        free(decode_both(t, ids, k, true, &dl));
        free(ids);
    }
}

static void fuzz_json(const uint8_t *data, size_t size)
{
    char err[ST_ERR_LEN];
    struct tokenizer *t = NULL;
    if (tokenizer_load_json(&t, "fuzz.json", (const char *)data, size, NULL, 0, err) < 0) {
        FUZZ_CHECK(t == NULL && err[0]);
        return;
    }
    static const char *texts[] = {"", "hello world", "  a\tb\n\nc  ", "<s>x</s>", "caf\xc3\xa9 \xf0\x9f\x98\x80 42",
                                  "\xe2\x96\x81\xe2\x96\x81z"};
    for (size_t i = 0; i < ST_ARRAY_LEN(texts); i++) exercise(t, texts[i], strlen(texts[i]));
    int32_t ids[64];
    int v = tokenizer_vocab_size(t), n = 0;
    for (int i = 0; i < v && n < 64; i += 1 + v / 64)
        if (tokenizer_piece(t, i)) ids[n++] = i;
    size_t dl;
    free(decode_both(t, ids, n, false, &dl));
    tokenizer_free(t);
}

static void fuzz_text(const uint8_t *data, size_t size)
{
    const struct tokenizer *t = get_stories();
    if (!t) return;
    char err[ST_ERR_LEN];
    int32_t *ids = NULL;
    int k = 0;
    if (tokenizer_encode(t, (const char *)data, size, false, &ids, &k, err) < 0) return; /* invalid UTF-8 */
    bool special = false;
    for (int i = 0; i < k; i++) {
        FUZZ_CHECK(ids[i] >= 0 && ids[i] < tokenizer_vocab_size(t));
        special |= tokenizer_is_special(t, ids[i]);
    }
    size_t dl;
    char *d = decode_both(t, ids, k, false, &dl);
    FUZZ_CHECK(d != NULL);
    /* a literal U+2581 in the text decodes to a space, like the reference */
    bool meta = memmem(data, size, "\xe2\x96\x81", 3) != NULL;
    if (!special && !meta) FUZZ_CHECK(dl == size && memcmp(d, data, size) == 0);
    free(d);
    free(ids);
}

static void fuzz_ids(const uint8_t *data, size_t size)
{
    const struct tokenizer *t = get_stories();
    if (!t) return;
    int n = (int)(size / 2);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n + 1));
    FUZZ_CHECK(ids);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)((data[2 * i] | (data[2 * i + 1] << 8)) % tokenizer_vocab_size(t));
    size_t dl;
    free(decode_both(t, ids, n, false, &dl));
    free(decode_both(t, ids, n, true, &dl));
    free(ids);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1 || size > (1 << 20)) return 0;
    switch (data[0] % 3) {
    case 0: fuzz_json(data + 1, size - 1); break;
    case 1: fuzz_text(data + 1, size - 1); break;
    default: fuzz_ids(data + 1, size - 1); break;
    }
    return 0;
}
