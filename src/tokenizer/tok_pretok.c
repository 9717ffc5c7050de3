/* tok_pretok: normalizers, pre-tokenizers and added-token splitting, each as the reference defines it.
 *
 * Text moves through here as pieces (offset, length) over one per-call work buffer; transformations append new
 * strings to it. The ByteLevel pre-tokenizer does not copy: it marks pieces as byte-level and the BPE model maps
 * bytes to vocab symbols through a table. Regexes from tokenizer.json are Oniguruma patterns; they run with
 * PCRE2 (UTF + UCP + JIT) after \s is rewritten to Oniguruma's White_Space set (PCRE2 10.42's \s lacks U+0085).
 */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer/tok_internal.h"

/* ---- JSON helpers ---- */

const char *tok_jstr(const json_t *o, const char *key, size_t *len)
{
    json_t *v = json_object_get(o, key);
    if (!json_is_string(v)) return NULL;
    if (len) *len = json_string_length(v);
    return json_string_value(v);
}

bool tok_jbool(const json_t *o, const char *key, bool dflt)
{
    json_t *v = json_object_get(o, key);
    return json_is_boolean(v) ? json_is_true(v) : dflt;
}

static char *memdup0(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (!d) return NULL;
    if (n) memcpy(d, s, n);
    d[n] = 0;
    return d;
}

/* {"String": s} or {"Regex": r}. */
int tok_jpattern(const json_t *pat, const char *ctx, char **lit, size_t *lit_len, pcre2_code **re, char *err)
{
    *lit = NULL;
    *lit_len = 0;
    *re = NULL;
    size_t n;
    const char *s;
    if ((s = tok_jstr(pat, "String", &n))) {
        if (!(*lit = memdup0(s, n))) return err_set(err, ST_ENOMEM, "out of memory");
        *lit_len = n;
        return 0;
    }
    if ((s = tok_jstr(pat, "Regex", &n))) {
        int rc = tok_regex_compile(s, n, re, err);
        if (rc < 0) return err_prefix(err, rc, "%s", ctx);
        return 0;
    }
    return err_set(err, ST_EFORMAT, "%s: pattern must be {\"String\": ...} or {\"Regex\": ...}", ctx);
}

/* ---- regex ---- */

static const char WS_CLASS[] =
    "\\t\\n\\x{0B}\\f\\r \\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}";

int tok_regex_compile(const char *pat, size_t len, pcre2_code **out, char *err)
{
    struct tok_buf b = {0};
    int rc = 0;
    bool in_class = false;
    *out = NULL;
    for (size_t i = 0; i < len; i++) {
        char c = pat[i];
        bool ok = true;
        if (c == '\\' && i + 1 < len) {
            char d = pat[++i];
            if (d == 's' && in_class) ok = tok_buf_put(&b, WS_CLASS, sizeof(WS_CLASS) - 1) == 0;
            else if (d == 's') ok = !tok_buf_put(&b, "[", 1) && !tok_buf_put(&b, WS_CLASS, sizeof(WS_CLASS) - 1) &&
                                    !tok_buf_put(&b, "]", 1);
            else if (d == 'S' && !in_class)
                ok = !tok_buf_put(&b, "[^", 2) && !tok_buf_put(&b, WS_CLASS, sizeof(WS_CLASS) - 1) &&
                     !tok_buf_put(&b, "]", 1);
            else if (d == 'Q') {
                /* \Q...\E: literal, copied as is */
                size_t j = i + 1;
                while (j + 1 < len && !(pat[j] == '\\' && pat[j + 1] == 'E')) j++;
                size_t stop = j + 1 < len ? j + 2 : len;
                ok = tok_buf_put(&b, pat + i - 1, stop - (i - 1)) == 0;
                i = stop - 1;
            } else {
                char e2[2] = {'\\', d};
                ok = tok_buf_put(&b, e2, 2) == 0;
            }
        } else if (c == '[' && !in_class) {
            in_class = true;
            ok = tok_buf_put(&b, "[", 1) == 0;
            if (ok && i + 1 < len && pat[i + 1] == '^') ok = tok_buf_put(&b, pat + ++i, 1) == 0;
            if (ok && i + 1 < len && pat[i + 1] == ']') ok = tok_buf_put(&b, pat + ++i, 1) == 0;
        } else if (c == '[' && in_class && i + 1 < len && pat[i + 1] == ':') {
            const char *end = NULL;
            for (size_t j = i + 2; j + 1 < len; j++)
                if (pat[j] == ':' && pat[j + 1] == ']') {
                    end = pat + j + 2;
                    break;
                }
            size_t stop = end ? (size_t)(end - pat) : i + 1;
            ok = tok_buf_put(&b, pat + i, stop - i) == 0;
            i = stop - 1;
        } else {
            if (c == ']' && in_class) in_class = false;
            ok = tok_buf_put(&b, &c, 1) == 0;
        }
        if (!ok) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            goto fail;
        }
    }
    if (tok_buf_reserve(&b, 0) < 0) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    int ec;
    PCRE2_SIZE eo;
    *out = pcre2_compile((PCRE2_SPTR)b.p, b.n, PCRE2_UTF | PCRE2_UCP, &ec, &eo, NULL);
    if (!*out) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(ec, msg, sizeof(msg));
        rc = err_set(err, ST_EFORMAT, "regex /%.*s/: %s at offset %zu", (int)ST_MIN(len, 200), pat, (char *)msg,
                     (size_t)eo);
        goto fail;
    }
    (void)pcre2_jit_compile(*out, PCRE2_JIT_COMPLETE); /* no JIT: the interpreter runs it */
    tok_buf_free(&b);
    return 0;
fail:
    tok_buf_free(&b);
    return rc;
}

/* Finds the first match at or after start. 1: found, 0: none, < 0: error. */
static int re_find(struct tok_enc *e, const pcre2_code *re, const char *s, size_t len, size_t start, size_t *ms,
                   size_t *me)
{
    int rc = pcre2_match(re, (PCRE2_SPTR)s, len, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !e->jit) {
        e->mctx = pcre2_match_context_create(NULL);
        e->jit = pcre2_jit_stack_create(32 * 1024, 64 * 1024 * 1024, NULL);
        if (!e->mctx || !e->jit) return err_set(e->err, ST_ENOMEM, "out of memory");
        pcre2_jit_stack_assign(e->mctx, NULL, e->jit);
        rc = pcre2_match(re, (PCRE2_SPTR)s, len, start, PCRE2_NO_UTF_CHECK, e->md, e->mctx);
    }
    if (rc == PCRE2_ERROR_NOMATCH) return 0;
    if (rc < 0) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(rc, msg, sizeof(msg));
        return err_set(e->err, ST_EINVAL, "pre-tokenizer regex failed: %s", (char *)msg);
    }
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md);
    if (ov[0] > ov[1] || ov[1] > len || ov[0] < start) return err_set(e->err, ST_EINVAL, "regex gave a bad match");
    *ms = ov[0];
    *me = ov[1];
    return 1;
}

/* ---- match lists ---- */

static int m_push(struct tok_enc *e, size_t start, size_t stop, bool is_match)
{
    if (e->n_m == e->cap_m) {
        size_t cap = e->cap_m ? e->cap_m * 2 : 256;
        struct tok_span *m = realloc(e->m, sizeof(*m) * cap);
        if (!m) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->m = m;
        e->cap_m = cap;
    }
    e->m[e->n_m++] = (struct tok_span){start, stop, is_match ? 1 : 0};
    return 0;
}

static size_t char_len_at(const char *s, size_t n, size_t i)
{
    int l;
    if (tok_utf8_decode((const unsigned char *)s + i, n - i, &l) < 0) return 1;
    return (size_t)l;
}

static int matches_regex(struct tok_enc *e, const pcre2_code *re, const char *s, size_t len)
{
    int rc;
    e->n_m = 0;
    if (len == 0) return m_push(e, 0, 0, false);
    size_t prev = 0, pos = 0;
    while (pos < len) {
        size_t ms, me;
        if ((rc = re_find(e, re, s, len, pos, &ms, &me)) < 0) return rc;
        if (rc == 0) break;
        if (ms != prev && (rc = m_push(e, prev, ms, false)) < 0) return rc;
        if ((rc = m_push(e, ms, me, true)) < 0) return rc;
        prev = me;
        if (me > ms) pos = me;
        else if (ms < len) pos = ms + char_len_at(s, len, ms);
        else break;
    }
    if (prev != len) return m_push(e, prev, len, false);
    return 0;
}

static int matches_literal(struct tok_enc *e, const char *pat, size_t plen, const char *s, size_t len)
{
    int rc;
    e->n_m = 0;
    if (len == 0 || plen == 0) return m_push(e, 0, len, false);
    size_t prev = 0, pos = 0;
    while (pos + plen <= len) {
        const char *f = memmem(s + pos, len - pos, pat, plen);
        if (!f) break;
        size_t ms = (size_t)(f - s);
        if (ms != prev && (rc = m_push(e, prev, ms, false)) < 0) return rc;
        if ((rc = m_push(e, ms, ms + plen, true)) < 0) return rc;
        prev = pos = ms + plen;
    }
    if (prev != len) return m_push(e, prev, len, false);
    return 0;
}

/* Every character for which pred holds is its own match (the reference's char-predicate pattern). */
static int matches_pred(struct tok_enc *e, bool (*pred)(uint32_t, uint32_t), uint32_t arg, const char *s, size_t len)
{
    int rc;
    e->n_m = 0;
    if (len == 0) return m_push(e, 0, 0, false);
    size_t last = 0, i = 0;
    while (i < len) {
        int l;
        int32_t cp = tok_utf8_decode((const unsigned char *)s + i, len - i, &l);
        if (cp >= 0 && pred((uint32_t)cp, arg)) {
            if (last < i && (rc = m_push(e, last, i, false)) < 0) return rc;
            if ((rc = m_push(e, i, i + (size_t)l, true)) < 0) return rc;
            last = i + (size_t)l;
        }
        i += (size_t)l;
    }
    if (len > last) return m_push(e, last, len, false);
    return 0;
}

static bool pred_ws(uint32_t cp, uint32_t arg) { (void)arg; return tok_is_whitespace(cp); }
static bool pred_num(uint32_t cp, uint32_t arg) { (void)arg; return tok_is_numeric(cp); }
static bool pred_punct(uint32_t cp, uint32_t arg) { (void)arg; return tok_is_punct(cp); }
static bool pred_eq(uint32_t cp, uint32_t arg) { return cp == arg; }

/* Applies a split behavior to e->m (in place); the result is the list of kept ranges. */
static void apply_behavior(struct tok_enc *e, enum tok_split_behavior b)
{
    struct tok_span *m = e->m;
    size_t n = e->n_m, k = 0;
    bool prev_match = false;
    switch (b) {
    case TOK_SPLIT_ISOLATED:
        k = n;
        break;
    case TOK_SPLIT_REMOVED:
        for (size_t i = 0; i < n; i++)
            if (!m[i].id) m[k++] = m[i];
        break;
    case TOK_SPLIT_CONTIGUOUS:
        for (size_t i = 0; i < n; i++) {
            bool is = m[i].id != 0;
            if (is == prev_match && k) m[k - 1].stop = m[i].stop;
            else m[k++] = m[i];
            prev_match = is;
        }
        break;
    case TOK_SPLIT_MERGED_PREV:
        for (size_t i = 0; i < n; i++) {
            bool is = m[i].id != 0;
            if (is && !prev_match && k) m[k - 1].stop = m[i].stop;
            else m[k++] = m[i];
            prev_match = is;
        }
        break;
    case TOK_SPLIT_MERGED_NEXT: {
        /* right to left, writing from the end, then moved to the front */
        size_t w = n;
        for (size_t i = n; i-- > 0;) {
            bool is = m[i].id != 0;
            if (is && !prev_match && w < n) m[w].start = m[i].start;
            else m[--w] = m[i];
            prev_match = is;
        }
        k = n - w;
        memmove(m, m + w, sizeof(*m) * k);
        break;
    }
    default:
        k = n;
        break;
    }
    e->n_m = k;
}

static int pb_push(struct tok_enc *e, size_t off, size_t len, uint32_t flags)
{
    if (len == 0) return 0;
    if (e->n_pb == e->cap_pb) {
        size_t cap = e->cap_pb ? e->cap_pb * 2 : 256;
        struct tok_piece *p = realloc(e->pb, sizeof(*p) * cap);
        if (!p) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->pb = p;
        e->cap_pb = cap;
    }
    e->pb[e->n_pb++] = (struct tok_piece){off, len, flags};
    return 0;
}

/* Emits the ranges of e->m as pieces of parent p (offsets relative to it). */
static int emit_ranges(struct tok_enc *e, const struct tok_piece *p, uint32_t add_flags)
{
    int rc;
    for (size_t i = 0; i < e->n_m; i++) {
        uint32_t fl = add_flags | (p->flags & ~TOK_PIECE_FIRST);
        if ((p->flags & TOK_PIECE_FIRST) && e->m[i].start == 0) fl |= TOK_PIECE_FIRST;
        if ((rc = pb_push(e, p->off + e->m[i].start, e->m[i].stop - e->m[i].start, fl)) < 0) return rc;
    }
    return 0;
}

int tok_piece_materialize(struct tok_enc *e, struct tok_piece *p)
{
    if (!(p->flags & TOK_PIECE_BYTELEVEL)) return 0;
    size_t off = e->work.n;
    if (tok_buf_reserve(&e->work, p->len * 2) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
    const unsigned char *s = (const unsigned char *)e->work.p + p->off;
    for (size_t i = 0; i < p->len; i++) e->work.n += (size_t)tok_utf8_encode(tok_byte_to_cp[s[i]], e->work.p + e->work.n);
    e->work.p[e->work.n] = 0;
    p->off = off;
    p->len = e->work.n - off;
    p->flags &= ~TOK_PIECE_BYTELEVEL;
    return 0;
}

/* Appends prefix + the piece's text to work and points the piece at the copy. */
static int piece_prepend(struct tok_enc *e, struct tok_piece *p, const char *prefix, size_t n)
{
    size_t off = e->work.n;
    if (tok_buf_reserve(&e->work, n + p->len) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
    memcpy(e->work.p + e->work.n, prefix, n);
    memcpy(e->work.p + e->work.n + n, e->work.p + p->off, p->len);
    e->work.n += n + p->len;
    e->work.p[e->work.n] = 0;
    p->off = off;
    p->len += n;
    return 0;
}

static int pre_one(struct tok_enc *e, const struct tok_pre *pr, struct tok_piece p)
{
    int rc;
    if ((rc = tok_piece_materialize(e, &p)) < 0) return rc;
    const char *s;
    switch (pr->kind) {
    case TOK_PRE_SPLIT:
        s = e->work.p + p.off;
        rc = pr->re ? matches_regex(e, pr->re, s, p.len) : matches_literal(e, pr->pat, pr->pat_len, s, p.len);
        if (rc < 0) return rc;
        if (pr->invert)
            for (size_t i = 0; i < e->n_m; i++) e->m[i].id = !e->m[i].id;
        apply_behavior(e, pr->behavior);
        return emit_ranges(e, &p, 0);
    case TOK_PRE_BYTELEVEL:
        if (pr->add_prefix_space && !(p.len && e->work.p[p.off] == ' ') && (rc = piece_prepend(e, &p, " ", 1)) < 0)
            return rc;
        if (pr->use_regex) {
            if ((rc = matches_regex(e, pr->re, e->work.p + p.off, p.len)) < 0) return rc;
        } else {
            e->n_m = 0;
            if ((rc = m_push(e, 0, p.len, false)) < 0) return rc;
        }
        return emit_ranges(e, &p, TOK_PIECE_BYTELEVEL);
    case TOK_PRE_METASPACE: {
        s = e->work.p + p.off;
        if (memchr(s, ' ', p.len)) {
            size_t n_sp = 0;
            for (size_t i = 0; i < p.len; i++) n_sp += s[i] == ' ';
            size_t off = e->work.n;
            if (tok_buf_reserve(&e->work, p.len + n_sp * (size_t)pr->repl_len) < 0)
                return err_set(e->err, ST_ENOMEM, "out of memory");
            s = e->work.p + p.off;
            char *d = e->work.p + off;
            for (size_t i = 0; i < p.len; i++) {
                if (s[i] == ' ') {
                    memcpy(d, pr->repl, (size_t)pr->repl_len);
                    d += pr->repl_len;
                } else {
                    *d++ = s[i];
                }
            }
            e->work.n = (size_t)(d - e->work.p);
            e->work.p[e->work.n] = 0;
            p.off = off;
            p.len = e->work.n - off;
        }
        bool starts = p.len >= (size_t)pr->repl_len && memcmp(e->work.p + p.off, pr->repl, (size_t)pr->repl_len) == 0;
        bool prepend = pr->prepend == TOK_PREPEND_ALWAYS ||
                       (pr->prepend == TOK_PREPEND_FIRST && (p.flags & TOK_PIECE_FIRST));
        if (prepend && !starts && (rc = piece_prepend(e, &p, pr->repl, (size_t)pr->repl_len)) < 0) return rc;
        if (pr->split) {
            if ((rc = matches_pred(e, pred_eq, pr->repl_cp, e->work.p + p.off, p.len)) < 0) return rc;
            apply_behavior(e, TOK_SPLIT_MERGED_NEXT);
        } else {
            e->n_m = 0;
            if ((rc = m_push(e, 0, p.len, false)) < 0) return rc;
        }
        return emit_ranges(e, &p, 0);
    }
    case TOK_PRE_WHITESPACE:
        if ((rc = matches_regex(e, pr->re, e->work.p + p.off, p.len)) < 0) return rc;
        for (size_t i = 0; i < e->n_m; i++) e->m[i].id = !e->m[i].id; /* Invert + Removed keeps the matches */
        apply_behavior(e, TOK_SPLIT_REMOVED);
        return emit_ranges(e, &p, 0);
    case TOK_PRE_WHITESPACE_SPLIT:
        if ((rc = matches_pred(e, pred_ws, 0, e->work.p + p.off, p.len)) < 0) return rc;
        apply_behavior(e, TOK_SPLIT_REMOVED);
        return emit_ranges(e, &p, 0);
    case TOK_PRE_DIGITS:
        if ((rc = matches_pred(e, pred_num, 0, e->work.p + p.off, p.len)) < 0) return rc;
        apply_behavior(e, pr->individual ? TOK_SPLIT_ISOLATED : TOK_SPLIT_CONTIGUOUS);
        return emit_ranges(e, &p, 0);
    case TOK_PRE_PUNCTUATION:
        if ((rc = matches_pred(e, pred_punct, 0, e->work.p + p.off, p.len)) < 0) return rc;
        apply_behavior(e, pr->behavior);
        return emit_ranges(e, &p, 0);
    default:
        return err_set(e->err, ST_EINVAL, "bad pre-tokenizer kind %d", (int)pr->kind);
    }
}

int tok_pretokenize(struct tok_enc *e)
{
    const struct tokenizer *t = e->t;
    int rc;
    for (int k = 0; k < t->n_pres; k++) {
        e->n_pb = 0;
        for (size_t i = 0; i < e->n_pa; i++)
            if ((rc = pre_one(e, &t->pres[k], e->pa[i])) < 0) return rc;
        struct tok_piece *tp = e->pa;
        size_t tc = e->cap_pa;
        e->pa = e->pb;
        e->cap_pa = e->cap_pb;
        e->n_pa = e->n_pb;
        e->pb = tp;
        e->cap_pb = tc;
        e->n_pb = 0;
    }
    return 0;
}

/* ---- normalizers ---- */

static bool all_ascii(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] >= 0x80) return false;
    return true;
}

static int work_put(struct tok_enc *e, const char *s, size_t n)
{
    if (tok_buf_put(&e->work, s, n) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
    return 0;
}

static int norm_one(struct tok_enc *e, const struct tok_norm *nm, size_t *off, size_t *len)
{
    int rc;
    const char *s = e->work.p + *off;
    size_t n = *len, o = e->work.n;
    switch (nm->kind) {
    case TOK_NORM_NF: {
        if (all_ascii(s, n)) return 0;
        char *out;
        size_t on;
        if ((rc = tok_normalize_form(nm->form, s, n, &out, &on, e->err)) < 0) return rc;
        rc = work_put(e, out, on);
        free(out);
        if (rc < 0) return rc;
        break;
    }
    case TOK_NORM_LOWERCASE:
        if (tok_buf_reserve(&e->work, n * 2) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
        s = e->work.p + *off;
        for (size_t i = 0; i < n;) {
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)s + i, n - i, &l);
            char buf[8];
            int w;
            if (cp == 0x130) { /* the one unconditional multi-character lowercase mapping */
                buf[0] = 'i';
                w = 1 + tok_utf8_encode(0x307, buf + 1);
            } else {
                w = tok_utf8_encode((uint32_t)utf8proc_tolower(cp < 0 ? 0xFFFD : cp), buf);
            }
            if ((rc = work_put(e, buf, (size_t)w)) < 0) return rc;
            s = e->work.p + *off;
            i += (size_t)l;
        }
        break;
    case TOK_NORM_STRIP: {
        size_t a = 0, b = n;
        while (nm->left && a < b) {
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)s + a, b - a, &l);
            if (cp < 0 || !tok_is_whitespace((uint32_t)cp)) break;
            a += (size_t)l;
        }
        while (nm->right && b > a) {
            size_t c = b - 1;
            while (c > a && ((unsigned char)s[c] & 0xC0) == 0x80) c--;
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)s + c, b - c, &l);
            if (cp < 0 || !tok_is_whitespace((uint32_t)cp)) break;
            b = c;
        }
        *off += a;
        *len = b - a;
        return 0;
    }
    case TOK_NORM_REPLACE: {
        if (nm->re) {
            if ((rc = matches_regex(e, nm->re, s, n)) < 0) return rc;
        } else {
            if ((rc = matches_literal(e, nm->pat, nm->pat_len, s, n)) < 0) return rc;
        }
        bool any = false;
        for (size_t i = 0; i < e->n_m && !any; i++) any = e->m[i].id;
        if (!any) return 0;
        for (size_t i = 0; i < e->n_m; i++) {
            const struct tok_span *m = &e->m[i];
            rc = m->id ? work_put(e, nm->content, nm->content_len)
                       : work_put(e, e->work.p + *off + m->start, m->stop - m->start);
            if (rc < 0) return rc;
        }
        break;
    }
    case TOK_NORM_PREPEND:
        if (n == 0) return 0;
        if ((rc = work_put(e, nm->content, nm->content_len)) < 0 || (rc = work_put(e, e->work.p + *off, n)) < 0)
            return rc;
        break;
    case TOK_NORM_STRIP_ACCENTS:
        if (all_ascii(s, n)) return 0;
        for (size_t i = 0; i < n;) {
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)e->work.p + *off + i, n - i, &l);
            if (!(cp >= 0 && tok_is_mark_nonspacing((uint32_t)cp)) &&
                (rc = work_put(e, e->work.p + *off + i, (size_t)l)) < 0)
                return rc;
            i += (size_t)l;
        }
        break;
    case TOK_NORM_BYTELEVEL: {
        struct tok_piece p = {*off, n, TOK_PIECE_BYTELEVEL};
        if ((rc = tok_piece_materialize(e, &p)) < 0) return rc;
        *off = p.off;
        *len = p.len;
        return 0;
    }
    default:
        return err_set(e->err, ST_EINVAL, "bad normalizer kind %d", (int)nm->kind);
    }
    *off = o;
    *len = e->work.n - o;
    return 0;
}

int tok_normalize(struct tok_enc *e, size_t off, size_t len, size_t *out_off, size_t *out_len)
{
    int rc;
    for (int k = 0; k < e->t->n_norms; k++)
        if ((rc = norm_one(e, &e->t->norms[k], &off, &len)) < 0) return rc;
    *out_off = off;
    *out_len = len;
    return 0;
}

/* ---- parsing ---- */

static int norm_push(struct tokenizer *t, struct tok_norm nm, char *err)
{
    struct tok_norm *a = realloc(t->norms, sizeof(*a) * (size_t)(t->n_norms + 1));
    if (!a) {
        free(nm.pat);
        free(nm.content);
        if (nm.re) pcre2_code_free(nm.re);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    t->norms = a;
    t->norms[t->n_norms++] = nm;
    return 0;
}

static int norms_parse(struct tokenizer *t, const json_t *j, int depth, char *err)
{
    if (depth > 32) return err_set(err, ST_EFORMAT, "normalizer: nesting too deep");
    const char *type = tok_jstr(j, "type", NULL);
    if (!type) return err_set(err, ST_EFORMAT, "normalizer: missing \"type\"");
    struct tok_norm nm = {0};
    int rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *a = json_object_get(j, "normalizers");
        if (!json_is_array(a)) return err_set(err, ST_EFORMAT, "normalizer Sequence: \"normalizers\" must be an array");
        for (size_t i = 0; i < json_array_size(a); i++)
            if ((rc = norms_parse(t, json_array_get(a, i), depth + 1, err)) < 0) return rc;
        return 0;
    }
    if (strcmp(type, "NFC") == 0 || strcmp(type, "NFD") == 0 || strcmp(type, "NFKC") == 0 ||
        strcmp(type, "NFKD") == 0) {
        nm.kind = TOK_NORM_NF;
        nm.form = strcmp(type, "NFC") == 0 ? TOK_NF_NFC : strcmp(type, "NFD") == 0 ? TOK_NF_NFD
                  : strcmp(type, "NFKC") == 0 ? TOK_NF_NFKC : TOK_NF_NFKD;
    } else if (strcmp(type, "Lowercase") == 0) {
        nm.kind = TOK_NORM_LOWERCASE;
    } else if (strcmp(type, "Strip") == 0) {
        nm.kind = TOK_NORM_STRIP;
        nm.left = tok_jbool(j, "strip_left", true);
        nm.right = tok_jbool(j, "strip_right", true);
    } else if (strcmp(type, "StripAccents") == 0) {
        nm.kind = TOK_NORM_STRIP_ACCENTS;
    } else if (strcmp(type, "ByteLevel") == 0) {
        nm.kind = TOK_NORM_BYTELEVEL;
    } else if (strcmp(type, "Prepend") == 0) {
        size_t n;
        const char *s = tok_jstr(j, "prepend", &n);
        if (!s) return err_set(err, ST_EFORMAT, "normalizer Prepend: missing \"prepend\" string");
        nm.kind = TOK_NORM_PREPEND;
        if (!(nm.content = memdup0(s, n))) return err_set(err, ST_ENOMEM, "out of memory");
        nm.content_len = n;
    } else if (strcmp(type, "Replace") == 0) {
        size_t n;
        const char *s = tok_jstr(j, "content", &n);
        if (!s) return err_set(err, ST_EFORMAT, "normalizer Replace: missing \"content\" string");
        nm.kind = TOK_NORM_REPLACE;
        if ((rc = tok_jpattern(json_object_get(j, "pattern"), "normalizer Replace", &nm.pat, &nm.pat_len, &nm.re,
                               err)) < 0)
            return rc;
        if (!(nm.content = memdup0(s, n))) {
            free(nm.pat);
            if (nm.re) pcre2_code_free(nm.re);
            return err_set(err, ST_ENOMEM, "out of memory");
        }
        nm.content_len = n;
    } else {
        return err_set(err, ST_EUNSUPPORTED, "unsupported normalizer type \"%s\"", type);
    }
    return norm_push(t, nm, err);
}

int tok_norms_parse(struct tokenizer *t, const json_t *j, char *err)
{
    if (!j || json_is_null(j)) return 0;
    if (!json_is_object(j)) return err_set(err, ST_EFORMAT, "\"normalizer\" must be an object or null");
    return norms_parse(t, j, 0, err);
}

void tok_norms_free(struct tokenizer *t)
{
    for (int i = 0; i < t->n_norms; i++) {
        free(t->norms[i].pat);
        free(t->norms[i].content);
        if (t->norms[i].re) pcre2_code_free(t->norms[i].re);
    }
    free(t->norms);
    t->norms = NULL;
    t->n_norms = 0;
}

static int behavior_parse(const json_t *j, enum tok_split_behavior dflt, enum tok_split_behavior *out, char *err)
{
    static const char *names[] = {"Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"};
    const char *s = tok_jstr(j, "behavior", NULL);
    if (!s) {
        *out = dflt;
        return 0;
    }
    for (int i = 0; i < TOK_SPLIT_BEHAVIOR_COUNT; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (enum tok_split_behavior)i;
            return 0;
        }
    return err_set(err, ST_EFORMAT, "pre-tokenizer: unknown split behavior \"%s\"", s);
}

static const char GPT2_PATTERN[] = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

static int pre_push(struct tokenizer *t, struct tok_pre pr, char *err)
{
    struct tok_pre *a = realloc(t->pres, sizeof(*a) * (size_t)(t->n_pres + 1));
    if (!a) {
        free(pr.pat);
        if (pr.re) pcre2_code_free(pr.re);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    t->pres = a;
    t->pres[t->n_pres++] = pr;
    return 0;
}

static int pres_parse(struct tokenizer *t, const json_t *j, int depth, char *err)
{
    if (depth > 32) return err_set(err, ST_EFORMAT, "pre_tokenizer: nesting too deep");
    const char *type = tok_jstr(j, "type", NULL);
    if (!type) return err_set(err, ST_EFORMAT, "pre_tokenizer: missing \"type\"");
    struct tok_pre pr = {0};
    int rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *a = json_object_get(j, "pretokenizers");
        if (!json_is_array(a))
            return err_set(err, ST_EFORMAT, "pre_tokenizer Sequence: \"pretokenizers\" must be an array");
        for (size_t i = 0; i < json_array_size(a); i++)
            if ((rc = pres_parse(t, json_array_get(a, i), depth + 1, err)) < 0) return rc;
        return 0;
    }
    if (strcmp(type, "Split") == 0) {
        pr.kind = TOK_PRE_SPLIT;
        pr.invert = tok_jbool(j, "invert", false);
        if ((rc = behavior_parse(j, TOK_SPLIT_ISOLATED, &pr.behavior, err)) < 0) return rc;
        if (!json_object_get(j, "behavior"))
            return err_set(err, ST_EFORMAT, "pre_tokenizer Split: missing \"behavior\"");
        if ((rc = tok_jpattern(json_object_get(j, "pattern"), "pre_tokenizer Split", &pr.pat, &pr.pat_len, &pr.re,
                               err)) < 0)
            return rc;
    } else if (strcmp(type, "ByteLevel") == 0) {
        pr.kind = TOK_PRE_BYTELEVEL;
        pr.add_prefix_space = tok_jbool(j, "add_prefix_space", true);
        pr.use_regex = tok_jbool(j, "use_regex", true);
        if (pr.use_regex && (rc = tok_regex_compile(GPT2_PATTERN, sizeof(GPT2_PATTERN) - 1, &pr.re, err)) < 0)
            return rc;
    } else if (strcmp(type, "Metaspace") == 0) {
        size_t n;
        const char *s = tok_jstr(j, "replacement", &n);
        int l;
        if (!s || n == 0 || tok_utf8_decode((const unsigned char *)s, n, &l) < 0 || (size_t)l != n)
            return err_set(err, ST_EFORMAT, "pre_tokenizer Metaspace: \"replacement\" must be one character");
        pr.kind = TOK_PRE_METASPACE;
        pr.repl_cp = (uint32_t)tok_utf8_decode((const unsigned char *)s, n, &l);
        memcpy(pr.repl, s, n);
        pr.repl_len = (int)n;
        pr.split = tok_jbool(j, "split", true);
        const char *ps = tok_jstr(j, "prepend_scheme", NULL);
        if (ps) {
            if (strcmp(ps, "always") == 0) pr.prepend = TOK_PREPEND_ALWAYS;
            else if (strcmp(ps, "first") == 0) pr.prepend = TOK_PREPEND_FIRST;
            else if (strcmp(ps, "never") == 0) pr.prepend = TOK_PREPEND_NEVER;
            else return err_set(err, ST_EFORMAT, "pre_tokenizer Metaspace: unknown prepend_scheme \"%s\"", ps);
        } else {
            pr.prepend = tok_jbool(j, "add_prefix_space", true) ? TOK_PREPEND_ALWAYS : TOK_PREPEND_NEVER;
        }
    } else if (strcmp(type, "Whitespace") == 0) {
        /* the reference's \w+|[^\w\s]+ is a Rust regex: \w is Alphabetic, marks, Nd, Pc and the joiners */
#define RUST_W "\\p{Alphabetic}\\p{M}\\p{Nd}\\p{Pc}\\x{200C}\\x{200D}"
        static const char pat[] = "[" RUST_W "]+|[^" RUST_W "\\s]+";
#undef RUST_W
        pr.kind = TOK_PRE_WHITESPACE;
        if ((rc = tok_regex_compile(pat, sizeof(pat) - 1, &pr.re, err)) < 0) return rc;
    } else if (strcmp(type, "WhitespaceSplit") == 0) {
        pr.kind = TOK_PRE_WHITESPACE_SPLIT;
    } else if (strcmp(type, "Digits") == 0) {
        pr.kind = TOK_PRE_DIGITS;
        pr.individual = tok_jbool(j, "individual_digits", false);
    } else if (strcmp(type, "Punctuation") == 0) {
        pr.kind = TOK_PRE_PUNCTUATION;
        if ((rc = behavior_parse(j, TOK_SPLIT_ISOLATED, &pr.behavior, err)) < 0) return rc;
    } else {
        return err_set(err, ST_EUNSUPPORTED, "unsupported pre_tokenizer type \"%s\"", type);
    }
    return pre_push(t, pr, err);
}

int tok_pres_parse(struct tokenizer *t, const json_t *j, char *err)
{
    if (!j || json_is_null(j)) return 0;
    if (!json_is_object(j)) return err_set(err, ST_EFORMAT, "\"pre_tokenizer\" must be an object or null");
    return pres_parse(t, j, 0, err);
}

void tok_pres_free(struct tokenizer *t)
{
    for (int i = 0; i < t->n_pres; i++) {
        free(t->pres[i].pat);
        if (t->pres[i].re) pcre2_code_free(t->pres[i].re);
    }
    free(t->pres);
    t->pres = NULL;
    t->n_pres = 0;
}

/* ---- added tokens ---- */

int tok_trie_add(struct tok_trie *tr, const char *s, size_t n, int32_t added_index)
{
    if (n == 0) return 0;
    if (tr->cap == 0) memset(tr->root, 0xff, sizeof(tr->root));
    int32_t node = -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int32_t cur = i == 0 ? tr->root[c] : tr->nodes[node].child, prev = -1;
        while (cur >= 0 && tr->nodes[cur].byte != c) {
            prev = cur;
            cur = tr->nodes[cur].sibling;
        }
        if (cur < 0) {
            if (tr->n == tr->cap) {
                int32_t cap = tr->cap ? tr->cap * 2 : 64;
                if (cap > (1 << 28)) return ST_ENOMEM;
                struct tok_trie_node *nn = realloc(tr->nodes, sizeof(*nn) * (size_t)cap);
                if (!nn) return ST_ENOMEM;
                tr->nodes = nn;
                tr->cap = cap;
            }
            cur = tr->n++;
            tr->nodes[cur] = (struct tok_trie_node){-1, -1, -1, c};
            if (i == 0) tr->root[c] = cur;
            else if (prev >= 0) tr->nodes[prev].sibling = cur;
            else tr->nodes[node].child = cur;
        }
        node = cur;
    }
    /* the first pattern with this content keeps the match (the reference's ids agree anyway) */
    if (tr->nodes[node].added < 0) tr->nodes[node].added = added_index;
    return 0;
}

void tok_trie_free(struct tok_trie *tr)
{
    free(tr->nodes);
    memset(tr, 0, sizeof(*tr));
}

/* Longest pattern starting at s[i]; returns its added index and length, or -1. */
static int32_t trie_longest(const struct tok_trie *tr, const char *s, size_t len, size_t i, size_t *mlen)
{
    int32_t node = tr->root[(unsigned char)s[i]], best = -1;
    size_t k = i;
    while (node >= 0) {
        k++;
        if (tr->nodes[node].added >= 0) {
            best = tr->nodes[node].added;
            *mlen = k - i;
        }
        if (k >= len) break;
        unsigned char c = (unsigned char)s[k];
        node = tr->nodes[node].child;
        while (node >= 0 && tr->nodes[node].byte != c) node = tr->nodes[node].sibling;
    }
    return best;
}

static bool last_char_is_word(const char *s, size_t n)
{
    if (n == 0) return false;
    size_t c = n - 1;
    while (c > 0 && ((unsigned char)s[c] & 0xC0) == 0x80) c--;
    int l;
    int32_t cp = tok_utf8_decode((const unsigned char *)s + c, n - c, &l);
    return cp >= 0 && tok_is_word((uint32_t)cp);
}

static bool first_char_is_word(const char *s, size_t n)
{
    if (n == 0) return false;
    int l;
    int32_t cp = tok_utf8_decode((const unsigned char *)s, n, &l);
    return cp >= 0 && tok_is_word((uint32_t)cp);
}

static int span_push(struct tok_enc *e, size_t start, size_t stop, int32_t id)
{
    if (e->n_spans == e->cap_spans) {
        size_t cap = e->cap_spans ? e->cap_spans * 2 : 64;
        struct tok_span *s = realloc(e->spans, sizeof(*s) * cap);
        if (!s) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->spans = s;
        e->cap_spans = cap;
    }
    e->spans[e->n_spans++] = (struct tok_span){start, stop, id};
    return 0;
}

int tok_added_split(struct tok_enc *e, const struct tok_trie *tr, const char *s, size_t len)
{
    const struct tokenizer *t = e->t;
    int rc;
    e->n_spans = 0;
    if (len == 0) return 0;
    size_t start_offset = 0, i = 0;
    while (tr->n && i < len) {
        size_t mlen = 0;
        int32_t ai = tr->root[(unsigned char)s[i]] >= 0 ? trie_longest(tr, s, len, i, &mlen) : -1;
        if (ai < 0) {
            i++;
            continue;
        }
        const struct tok_added *a = &t->added[ai];
        size_t start = i, stop = i + mlen;
        i = stop; /* matches never overlap, skipped ones included */
        if (t->split_special && a->special) continue;
        if (a->single_word) {
            bool start_space = start == 0 || !last_char_is_word(s, start);
            bool stop_space = stop == len || !first_char_is_word(s + stop, len - stop);
            if (!start_space || !stop_space) continue;
        }
        if (a->lstrip) {
            size_t ns = start;
            while (ns > 0) {
                size_t c = ns - 1;
                while (c > 0 && ((unsigned char)s[c] & 0xC0) == 0x80) c--;
                int l;
                int32_t cp = tok_utf8_decode((const unsigned char *)s + c, ns - c, &l);
                if (cp < 0 || !tok_is_whitespace((uint32_t)cp)) break;
                ns = c;
            }
            start = ST_MAX(ns, start_offset);
        }
        if (a->rstrip) {
            while (stop < len) {
                int l;
                int32_t cp = tok_utf8_decode((const unsigned char *)s + stop, len - stop, &l);
                if (cp < 0 || !tok_is_whitespace((uint32_t)cp)) break;
                stop += (size_t)l;
            }
        }
        if (start_offset < start && (rc = span_push(e, start_offset, start, -1)) < 0) return rc;
        if ((rc = span_push(e, start, stop, a->id)) < 0) return rc;
        start_offset = stop; /* the search goes on from the match's end, as the reference's does */
    }
    if (start_offset < len && (rc = span_push(e, start_offset, len, -1)) < 0) return rc;
    return 0;
}
