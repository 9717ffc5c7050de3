/* tok_json: a fast, strict reader for tokenizer.json.
 *
 * A 150k-entry vocab and 150k-300k merges make up nearly all of a tokenizer.json; building a jansson tree for
 * them costs several hundred milliseconds. This reader walks the document itself, puts model.vocab and
 * model.merges straight into flat arrays (strings into the tokenizer's arena) and hands every other value (small:
 * added_tokens, normalizer, pre_tokenizer, ...) to jansson. Every byte is checked: strings must be valid UTF-8
 * with valid escapes, numbers must be integers in range, nesting is bounded, and errors name the file, the line
 * and column and what was expected.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

#define JS_MAX_DEPTH 256

struct js {
    const char *name;
    const char *base, *p, *end;
    char *err;
};

static int js_fail(struct js *j, const char *at, const char *what)
{
    int line = 1, col = 1;
    if (at > j->end) at = j->end;
    for (const char *q = j->base; q < at; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    if (at >= j->end)
        return err_set(j->err, ST_EFORMAT, "%s: line %d, column %d: %s (the file ends here: truncated?)", j->name,
                       line, col, what);
    return err_set(j->err, ST_EFORMAT, "%s: line %d, column %d: %s", j->name, line, col, what);
}

static void js_ws(struct js *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\n' || *j->p == '\r' || *j->p == '\t')) j->p++;
}

static int js_expect(struct js *j, char c, const char *what)
{
    js_ws(j);
    if (j->p >= j->end || *j->p != c) return js_fail(j, j->p, what);
    j->p++;
    js_ws(j);
    return 0;
}

static int hex4(const char *p, uint32_t *v)
{
    uint32_t x = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        x <<= 4;
        if (c >= '0' && c <= '9') x |= (uint32_t)(c - '0');
        else if (c >= 'a' && c <= 'f') x |= (uint32_t)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') x |= (uint32_t)(c - 'A' + 10);
        else return -1;
    }
    *v = x;
    return 0;
}

/* Decodes the JSON string at j->p into out (appending; not NUL-terminated). */
static int js_string(struct js *j, struct tok_buf *out)
{
    if (j->p >= j->end || *j->p != '"') return js_fail(j, j->p, "expected a string");
    j->p++;
    for (;;) {
        const char *s = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && (unsigned char)*j->p >= 0x20) j->p++;
        if (j->p > s) {
            size_t n = (size_t)(j->p - s);
            size_t ok = tok_utf8_valid_prefix((const unsigned char *)s, n);
            if (ok != n) return js_fail(j, s + ok, "invalid UTF-8 in a string");
            if (tok_buf_put(out, s, n) < 0) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
        }
        if (j->p >= j->end) return js_fail(j, j->p, "unterminated string");
        char c = *j->p;
        if (c == '"') {
            j->p++;
            return 0;
        }
        if ((unsigned char)c < 0x20) return js_fail(j, j->p, "control character inside a string");
        /* escape */
        const char *esc = j->p;
        if (j->end - j->p < 2) return js_fail(j, j->end, "unterminated escape");
        char e = j->p[1];
        char ch[4];
        int nch = 1;
        j->p += 2;
        switch (e) {
        case '"': ch[0] = '"'; break;
        case '\\': ch[0] = '\\'; break;
        case '/': ch[0] = '/'; break;
        case 'b': ch[0] = '\b'; break;
        case 'f': ch[0] = '\f'; break;
        case 'n': ch[0] = '\n'; break;
        case 'r': ch[0] = '\r'; break;
        case 't': ch[0] = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (j->end - j->p < 4 || hex4(j->p, &cp) < 0) return js_fail(j, esc, "bad \\u escape");
            j->p += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return js_fail(j, esc, "lone trailing surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u' || hex4(j->p + 2, &lo) < 0 || lo < 0xDC00 ||
                    lo > 0xDFFF)
                    return js_fail(j, esc, "lone leading surrogate in \\u escape");
                j->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            nch = tok_utf8_encode(cp, ch);
            break;
        }
        default:
            return js_fail(j, esc, "invalid escape in a string");
        }
        if (tok_buf_put(out, ch, (size_t)nch) < 0) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
    }
}

/* Skips one value (syntax only; the bytes are handed to jansson afterwards, which checks the rest). */
static int js_skip(struct js *j, int depth)
{
    if (depth > JS_MAX_DEPTH) return js_fail(j, j->p, "nesting too deep");
    js_ws(j);
    if (j->p >= j->end) return js_fail(j, j->p, "expected a value");
    char c = *j->p;
    if (c == '{' || c == '[') {
        char close = c == '{' ? '}' : ']';
        j->p++;
        js_ws(j);
        if (j->p < j->end && *j->p == close) {
            j->p++;
            return 0;
        }
        for (;;) {
            int rc;
            if (c == '{') {
                js_ws(j);
                if (j->p >= j->end || *j->p != '"') return js_fail(j, j->p, "expected an object key");
                if ((rc = js_skip(j, depth + 1)) < 0) return rc;
                if ((rc = js_expect(j, ':', "expected ':' after an object key")) < 0) return rc;
            }
            if ((rc = js_skip(j, depth + 1)) < 0) return rc;
            js_ws(j);
            if (j->p < j->end && *j->p == ',') {
                j->p++;
                continue;
            }
            if (j->p < j->end && *j->p == close) {
                j->p++;
                return 0;
            }
            return js_fail(j, j->p, c == '{' ? "expected ',' or '}' in an object" : "expected ',' or ']' in an array");
        }
    }
    if (c == '"') {
        j->p++;
        while (j->p < j->end) {
            if (*j->p == '\\') {
                j->p += 2;
                continue;
            }
            if (*j->p == '"') {
                j->p++;
                return 0;
            }
            j->p++;
        }
        return js_fail(j, j->end, "unterminated string");
    }
    const char *s = j->p;
    while (j->p < j->end && ((*j->p >= '0' && *j->p <= '9') || (*j->p >= 'a' && *j->p <= 'z') || *j->p == '-' ||
                             *j->p == '+' || *j->p == '.' || *j->p == 'E'))
        j->p++;
    if (j->p == s) return js_fail(j, s, "expected a value");
    return 0;
}

static int js_uint(struct js *j, int32_t *v)
{
    const char *s = j->p;
    int64_t x = 0;
    if (j->p < j->end && *j->p == '-') return js_fail(j, s, "token id must not be negative");
    while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
        x = x * 10 + (*j->p - '0');
        if (x > TOK_MAX_ID) return js_fail(j, s, "token id too large");
        j->p++;
    }
    if (j->p == s) return js_fail(j, s, "expected a token id (an integer)");
    if (j->p - s > 1 && *s == '0') return js_fail(j, s, "leading zero in a number");
    if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
        return js_fail(j, s, "token id must be an integer");
    *v = (int32_t)x;
    return 0;
}

/* Parses [start, j->p) with jansson. */
static int js_load(struct js *j, const char *start, const char *key, json_t **out)
{
    json_error_t je;
    *out = json_loadb(start, (size_t)(j->p - start), JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (!*out && strstr(je.text, "too big integer")) /* e.g. a max_length of 1e30: read numbers as reals */
        *out = json_loadb(start, (size_t)(j->p - start), JSON_DECODE_ANY | JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL,
                          &je);
    if (!*out) return js_fail(j, start + (je.position > 0 ? je.position : 0), je.text[0] ? je.text : key);
    return 0;
}

static int arena_check(struct js *j, struct tok_buf *arena)
{
    if (arena->n >= UINT32_MAX - 1024) return err_set(j->err, ST_ERANGE, "%s: too many strings", j->name);
    return 0;
}

static int parse_vocab(struct js *j, struct tok_buf *arena, struct tok_json_out *o)
{
    int rc;
    j->p++; /* '{' */
    js_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return 0;
    }
    for (;;) {
        js_ws(j);
        if ((rc = arena_check(j, arena)) < 0) return rc;
        uint32_t off = (uint32_t)arena->n;
        if ((rc = js_string(j, arena)) < 0) return rc;
        uint32_t len = (uint32_t)(arena->n - off);
        if (tok_buf_put(arena, "", 1) < 0) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
        if ((rc = js_expect(j, ':', "expected ':' after a vocab entry")) < 0) return rc;
        int32_t id = 0;
        if ((rc = js_uint(j, &id)) < 0) return rc;
        if (o->n_vocab == o->cap_vocab) {
            uint32_t cap = o->cap_vocab ? o->cap_vocab * 2 : 4096;
            struct tok_sm_entry *e = realloc(o->vocab, sizeof(*e) * cap);
            if (!e) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
            o->vocab = e;
            o->cap_vocab = cap;
        }
        o->vocab[o->n_vocab++] = (struct tok_sm_entry){off, len, id, 0};
        js_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == '}') {
            j->p++;
            return 0;
        }
        return js_fail(j, j->p, "expected ',' or '}' in model.vocab");
    }
}

static int merges_push(struct js *j, struct tok_json_out *o, struct tok_merge_raw m)
{
    if (o->n_merges == o->cap_merges) {
        uint32_t cap = o->cap_merges ? o->cap_merges * 2 : 4096;
        struct tok_merge_raw *e = realloc(o->merges, sizeof(*e) * cap);
        if (!e) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
        o->merges = e;
        o->cap_merges = cap;
    }
    o->merges[o->n_merges++] = m;
    return 0;
}

static int parse_merges(struct js *j, struct tok_buf *ma, struct tok_json_out *o)
{
    int rc;
    j->p++; /* '[' */
    js_ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
        return 0;
    }
    for (uint32_t index = 1;; index++) {
        js_ws(j);
        if ((rc = arena_check(j, ma)) < 0) return rc;
        const char *at = j->p;
        struct tok_merge_raw m;
        if (j->p < j->end && *j->p == '"') {
            /* legacy "a b": exactly two parts split on ' '; "#version" lines are comments */
            uint32_t off = (uint32_t)ma->n;
            if ((rc = js_string(j, ma)) < 0) return rc;
            uint32_t len = (uint32_t)(ma->n - off);
            const char *s = ma->p + off;
            if (len >= 8 && memcmp(s, "#version", 8) == 0) {
                ma->n = off;
                index--;
            } else {
                const char *sp = memchr(s, ' ', len);
                if (!sp || memchr(sp + 1, ' ', len - (uint32_t)(sp - s) - 1)) {
                    char what[96];
                    snprintf(what, sizeof(what), "merge %u is not two tokens separated by one space", index);
                    return js_fail(j, at, what);
                }
                uint32_t a_len = (uint32_t)(sp - s);
                m = (struct tok_merge_raw){off, a_len, off + a_len + 1, len - a_len - 1};
                if ((rc = merges_push(j, o, m)) < 0) return rc;
            }
        } else if (j->p < j->end && *j->p == '[') {
            j->p++;
            js_ws(j);
            uint32_t a_off = (uint32_t)ma->n;
            if ((rc = js_string(j, ma)) < 0) return rc;
            uint32_t b_off = (uint32_t)ma->n;
            if ((rc = js_expect(j, ',', "expected ',' between the two tokens of a merge")) < 0) return rc;
            if ((rc = js_string(j, ma)) < 0) return rc;
            uint32_t end = (uint32_t)ma->n;
            if ((rc = js_expect(j, ']', "expected ']' after the two tokens of a merge")) < 0) return rc;
            m = (struct tok_merge_raw){a_off, b_off - a_off, b_off, end - b_off};
            if ((rc = merges_push(j, o, m)) < 0) return rc;
        } else {
            return js_fail(j, j->p, "expected a merge (\"a b\" or [\"a\", \"b\"])");
        }
        js_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == ']') {
            j->p++;
            return 0;
        }
        return js_fail(j, j->p, "expected ',' or ']' in model.merges");
    }
}

static int key_is(const struct tok_buf *k, const char *s)
{
    size_t n = strlen(s);
    return k->n == n && memcmp(k->p, s, n) == 0;
}

/* Parses an object, calling special handlers for some keys and jansson for the rest. */
static int parse_object(struct js *j, struct tok_buf *arena, struct tok_buf *ma, struct tok_json_out *o, bool is_model)
{
    int rc;
    json_t *obj = json_object();
    struct tok_buf key = {0};
    if (!obj) return err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
    if (is_model) o->model = obj;
    else o->root = obj;
    js_ws(j);
    if (j->p >= j->end || *j->p != '{') {
        rc = js_fail(j, j->p, is_model ? "\"model\" must be an object" : "expected '{' at the start of the document");
        goto fail;
    }
    j->p++;
    js_ws(j);
    if (j->p < j->end && *j->p == '}') {
        j->p++;
        return 0;
    }
    bool seen_model = false;
    for (;;) {
        js_ws(j);
        key.n = 0;
        if ((rc = js_string(j, &key)) < 0) goto fail;
        if ((rc = js_expect(j, ':', "expected ':' after an object key")) < 0) goto fail;
        if (!is_model && key_is(&key, "model")) {
            if (seen_model) {
                rc = js_fail(j, j->p, "duplicate key \"model\"");
                goto fail;
            }
            seen_model = true;
            if ((rc = parse_object(j, arena, ma, o, true)) < 0) goto fail;
        } else if (is_model && key_is(&key, "vocab") && j->p < j->end && *j->p == '{') {
            if (o->has_vocab) {
                rc = js_fail(j, j->p, "duplicate key \"vocab\"");
                goto fail;
            }
            o->has_vocab = true;
            if ((rc = parse_vocab(j, arena, o)) < 0) goto fail;
        } else if (is_model && key_is(&key, "merges") && j->p < j->end && *j->p == '[') {
            if (o->has_merges) {
                rc = js_fail(j, j->p, "duplicate key \"merges\"");
                goto fail;
            }
            o->has_merges = true;
            if ((rc = parse_merges(j, ma, o)) < 0) goto fail;
        } else {
            const char *start = j->p;
            json_t *v;
            if ((rc = js_skip(j, 1)) < 0) goto fail;
            if (tok_buf_reserve(&key, 0) < 0) {
                rc = err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
                goto fail;
            }
            key.p[key.n] = 0;
            if ((rc = js_load(j, start, key.p, &v)) < 0) goto fail;
            if (json_object_setn_new(obj, key.p, key.n, v) < 0) {
                rc = err_set(j->err, ST_ENOMEM, "%s: out of memory", j->name);
                goto fail;
            }
        }
        js_ws(j);
        if (j->p < j->end && *j->p == ',') {
            j->p++;
            continue;
        }
        if (j->p < j->end && *j->p == '}') {
            j->p++;
            break;
        }
        rc = js_fail(j, j->p, "expected ',' or '}' in an object");
        goto fail;
    }
    tok_buf_free(&key);
    return 0;
fail:
    tok_buf_free(&key);
    return rc;
}

int tok_json_parse(const char *name, const char *text, size_t len, struct tok_buf *arena, struct tok_json_out *o,
                   char *err)
{
    struct js j = {name, text, text, text + len, err};
    memset(o, 0, sizeof(*o));
    /* Strings can not outgrow the text: reserving that much up front (address space; only what is written gets
     * paged in) spares the copies of growing 10 MB buffers by doubling. Same for the entry arrays: an entry
     * takes at least 5 bytes of text. */
    if (tok_buf_reserve(arena, len) < 0 || tok_buf_reserve(&o->marena, len) < 0)
        return err_set(err, ST_ENOMEM, "%s: out of memory", name);
    o->cap_vocab = o->cap_merges = (uint32_t)ST_MIN(len / 5 + 16, (size_t)UINT32_MAX / 2);
    o->vocab = malloc(sizeof(*o->vocab) * o->cap_vocab);
    o->merges = malloc(sizeof(*o->merges) * o->cap_merges);
    if (!o->vocab || !o->merges) return err_set(err, ST_ENOMEM, "%s: out of memory", name);
    int rc = parse_object(&j, arena, &o->marena, o, false);
    if (rc < 0) return rc;
    js_ws(&j);
    if (j.p != j.end) return js_fail(&j, j.p, "unexpected characters after the end of the document");
    return 0;
}

void tok_json_out_free(struct tok_json_out *o)
{
    json_decref(o->root);
    json_decref(o->model);
    free(o->vocab);
    free(o->merges);
    tok_buf_free(&o->marena);
    memset(o, 0, sizeof(*o));
}
