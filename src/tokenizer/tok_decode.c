/* tok_decode: the decoder chain, twice.
 *
 * tok_decode_ref is a direct transcription of the reference: tokens -> each decoder's decode_chain over the
 * whole list of strings -> joined. The streaming decoder runs the same chain incrementally: every decoder stage
 * is a small state machine that receives token events (begin, data, end) and passes events on, holding back only
 * what a later token could still change. The two are independent implementations of the same semantics and the
 * tests hold them to each other on random id sequences.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

static const char FFFD[3] = {(char)0xEF, (char)0xBF, (char)0xBD};

/* ---- parsing ---- */

static int dec_push(struct tokenizer *t, struct tok_dec d, char *err)
{
    if (t->n_decs >= DETOK_MAX_STAGES) {
        free(d.content);
        return err_set(err, ST_EUNSUPPORTED, "decoder: more than %d decoders in the chain", DETOK_MAX_STAGES);
    }
    struct tok_dec *a = realloc(t->decs, sizeof(*a) * (size_t)(t->n_decs + 1));
    if (!a) {
        free(d.content);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    t->decs = a;
    t->decs[t->n_decs++] = d;
    return 0;
}

static int one_char(const json_t *j, const char *key, const char *ctx, uint32_t *cp, char *utf8, int *len, char *err)
{
    size_t n;
    const char *s = tok_jstr(j, key, &n);
    int l;
    int32_t c;
    if (!s || n == 0 || (c = tok_utf8_decode((const unsigned char *)s, n, &l)) < 0 || (size_t)l != n)
        return err_set(err, ST_EFORMAT, "decoder %s: \"%s\" must be one character", ctx, key);
    *cp = (uint32_t)c;
    memcpy(utf8, s, n);
    *len = l;
    return 0;
}

static int decs_parse(struct tokenizer *t, const json_t *j, int depth, char *err)
{
    if (depth > 32) return err_set(err, ST_EFORMAT, "decoder: nesting too deep");
    const char *type = tok_jstr(j, "type", NULL);
    if (!type) return err_set(err, ST_EFORMAT, "decoder: missing \"type\"");
    struct tok_dec d = {0};
    int rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *a = json_object_get(j, "decoders");
        if (!json_is_array(a)) return err_set(err, ST_EFORMAT, "decoder Sequence: \"decoders\" must be an array");
        for (size_t i = 0; i < json_array_size(a); i++)
            if ((rc = decs_parse(t, json_array_get(a, i), depth + 1, err)) < 0) return rc;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) {
        if (t->dec_bytelevel || t->n_decs > 0)
            return err_set(err, ST_EUNSUPPORTED, "decoder: ByteLevel is supported only as the first decoder");
        t->dec_bytelevel = true;
        return 0;
    }
    if (strcmp(type, "Replace") == 0) {
        json_t *pat = json_object_get(j, "pattern");
        size_t pn, cn;
        const char *ps = tok_jstr(pat, "String", &pn);
        const char *cs = tok_jstr(j, "content", &cn);
        if (!ps) {
            if (tok_jstr(pat, "Regex", NULL))
                return err_set(err, ST_EUNSUPPORTED, "decoder Replace: Regex patterns are not supported");
            return err_set(err, ST_EFORMAT, "decoder Replace: pattern must be {\"String\": ...}");
        }
        if (!cs) return err_set(err, ST_EFORMAT, "decoder Replace: missing \"content\" string");
        if (pn == 0 || pn > TOK_DEC_PAT_MAX)
            return err_set(err, ST_EUNSUPPORTED, "decoder Replace: pattern must be 1 to %d bytes", TOK_DEC_PAT_MAX);
        d.kind = TOK_DEC_REPLACE;
        memcpy(d.pat, ps, pn);
        d.pat_len = (int)pn;
        /* KMP failure function */
        d.fail[0] = 0;
        for (int i = 1, k = 0; i < d.pat_len; i++) {
            while (k > 0 && d.pat[i] != d.pat[k]) k = d.fail[k - 1];
            if (d.pat[i] == d.pat[k]) k++;
            d.fail[i] = k;
        }
        if (!(d.content = malloc(cn + 1))) return err_set(err, ST_ENOMEM, "out of memory");
        memcpy(d.content, cs, cn);
        d.content[cn] = 0;
        d.content_len = cn;
    } else if (strcmp(type, "ByteFallback") == 0) {
        for (int i = 0; i < t->n_decs; i++)
            if (t->decs[i].kind == TOK_DEC_BYTEFALLBACK)
                return err_set(err, ST_EUNSUPPORTED, "decoder: ByteFallback appears twice");
        d.kind = TOK_DEC_BYTEFALLBACK;
    } else if (strcmp(type, "Fuse") == 0) {
        d.kind = TOK_DEC_FUSE;
    } else if (strcmp(type, "Strip") == 0) {
        json_t *js = json_object_get(j, "start"), *jp = json_object_get(j, "stop");
        if (!json_is_integer(js) || !json_is_integer(jp) || json_integer_value(js) < 0 ||
            json_integer_value(jp) < 0 || json_integer_value(js) > 1024 || json_integer_value(jp) > 1024)
            return err_set(err, ST_EFORMAT, "decoder Strip: start and stop must be integers in [0, 1024]");
        d.kind = TOK_DEC_STRIP;
        d.start = (int)json_integer_value(js);
        d.stop = (int)json_integer_value(jp);
        if ((rc = one_char(j, "content", "Strip", &d.cp, d.cp_utf8, &d.cp_len, err)) < 0) return rc;
    } else if (strcmp(type, "Metaspace") == 0) {
        d.kind = TOK_DEC_METASPACE;
        if ((rc = one_char(j, "replacement", "Metaspace", &d.cp, d.cp_utf8, &d.cp_len, err)) < 0) return rc;
        const char *ps = tok_jstr(j, "prepend_scheme", NULL);
        if (ps) {
            if (strcmp(ps, "never") == 0) d.prepend = false;
            else if (strcmp(ps, "always") == 0 || strcmp(ps, "first") == 0) d.prepend = true;
            else return err_set(err, ST_EFORMAT, "decoder Metaspace: unknown prepend_scheme \"%s\"", ps);
        } else {
            d.prepend = tok_jbool(j, "add_prefix_space", true);
        }
    } else {
        return err_set(err, ST_EUNSUPPORTED, "unsupported decoder type \"%s\"", type);
    }
    return dec_push(t, d, err);
}

int tok_decs_parse(struct tokenizer *t, const json_t *j, char *err)
{
    if (!j || json_is_null(j)) {
        t->dec_join = true;
        return 0;
    }
    if (!json_is_object(j)) return err_set(err, ST_EFORMAT, "\"decoder\" must be an object or null");
    return decs_parse(t, j, 0, err);
}

void tok_decs_free(struct tokenizer *t)
{
    for (int i = 0; i < t->n_decs; i++) free(t->decs[i].content);
    free(t->decs);
    t->decs = NULL;
    t->n_decs = 0;
}

static size_t sat_add(size_t a, size_t b) { return a > SIZE_MAX / 4 - b ? SIZE_MAX / 4 : a + b; }
static size_t sat_mul(size_t a, size_t b) { return b && a > SIZE_MAX / 4 / b ? SIZE_MAX / 4 : a * b; }

size_t tok_stream_bound(const struct tokenizer *t)
{
    size_t n = ST_MAX(t->max_piece_len, (size_t)8);
    if (t->dec_bytelevel) n = sat_add(sat_mul(n, 3), 8);
    for (int k = 0; k < t->n_decs; k++) {
        const struct tok_dec *d = &t->decs[k];
        switch (d->kind) {
        case TOK_DEC_REPLACE: {
            size_t per = ST_MAX(d->content_len, (size_t)d->pat_len);
            n = sat_add(sat_mul(n / (size_t)d->pat_len + 1, per), (size_t)d->pat_len);
            break;
        }
        case TOK_DEC_STRIP: n = sat_add(n, (size_t)d->stop * (size_t)d->cp_len); break;
        case TOK_DEC_BYTEFALLBACK: n = sat_add(n, 3 * (DETOK_RUN_MAX + 8)); break;
        default: break;
        }
    }
    return sat_add(n, 2); /* the ' ' of a decoder-less join, the NUL */
}

/* ---- the reference: decode_chain over a list of strings ---- */

/* A list of strings in one buffer: string i is d.p[off[i] .. off[i+1]). */
struct strv {
    struct tok_buf d;
    size_t *off;
    size_t n, cap;
};

static void strv_free(struct strv *v)
{
    tok_buf_free(&v->d);
    free(v->off);
    memset(v, 0, sizeof(*v));
}

static int strv_add(struct strv *v, const char *s, size_t n)
{
    if (v->n + 2 > v->cap) {
        size_t cap = v->cap ? v->cap * 2 : 64;
        size_t *a = realloc(v->off, sizeof(*a) * cap);
        if (!a) return ST_ENOMEM;
        v->off = a;
        v->cap = cap;
    }
    if (v->n == 0) v->off[0] = 0;
    if (tok_buf_put(&v->d, s, n) < 0) return ST_ENOMEM;
    v->off[++v->n] = v->d.n;
    return 0;
}

/* Extends the last string (callers build strings piece by piece with strv_open / strv_grow). */
static int strv_open(struct strv *v) { return strv_add(v, "", 0); }

static int strv_grow(struct strv *v, const char *s, size_t n)
{
    if (tok_buf_put(&v->d, s, n) < 0) return ST_ENOMEM;
    v->off[v->n] = v->d.n;
    return 0;
}

#define SV_STR(v, i) ((v)->d.p + (v)->off[i])
#define SV_LEN(v, i) ((v)->off[(i) + 1] - (v)->off[i])

static int ref_replace(const struct tok_dec *d, const struct strv *in, struct strv *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = SV_STR(in, i);
        size_t n = SV_LEN(in, i), pos = 0;
        if (strv_open(out) < 0) return ST_ENOMEM;
        while (pos < n) {
            const char *f = memmem(s + pos, n - pos, d->pat, (size_t)d->pat_len);
            size_t stop = f ? (size_t)(f - s) : n;
            if (strv_grow(out, s + pos, stop - pos) < 0) return ST_ENOMEM;
            if (f && strv_grow(out, d->content, d->content_len) < 0) return ST_ENOMEM;
            pos = f ? stop + (size_t)d->pat_len : n;
        }
    }
    return 0;
}

static int byte_token(const char *s, size_t n)
{
    if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>') return -1;
    int v = 0;
    for (int i = 3; i < 5; i++) {
        char c = s[i];
        int h;
        if (c >= '0' && c <= '9') h = c - '0';
        else if (c >= 'a' && c <= 'f') h = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') h = c - 'A' + 10;
        else if (c == '+' && i == 3) continue; /* u8::from_str_radix accepts a leading '+' */
        else return -1;
        v = v * 16 + h;
    }
    return v;
}

static int ref_flush_bytes(struct strv *out, struct tok_buf *bytes)
{
    int rc = 0;
    if (!bytes->n) return 0;
    if (tok_utf8_valid_prefix((const unsigned char *)bytes->p, bytes->n) == bytes->n) {
        rc = strv_add(out, bytes->p, bytes->n);
    } else {
        for (size_t k = 0; k < bytes->n && rc == 0; k++) rc = strv_add(out, FFFD, 3);
    }
    bytes->n = 0;
    return rc;
}

static int ref_bytefallback(const struct strv *in, struct strv *out)
{
    struct tok_buf bytes = {0};
    int rc = 0;
    for (size_t i = 0; i < in->n && rc == 0; i++) {
        int b = byte_token(SV_STR(in, i), SV_LEN(in, i));
        if (b >= 0) {
            unsigned char c = (unsigned char)b;
            rc = tok_buf_put(&bytes, &c, 1);
        } else {
            rc = ref_flush_bytes(out, &bytes);
            if (rc == 0) rc = strv_add(out, SV_STR(in, i), SV_LEN(in, i));
        }
    }
    if (rc == 0) rc = ref_flush_bytes(out, &bytes);
    tok_buf_free(&bytes);
    return rc;
}

static int ref_fuse(const struct strv *in, struct strv *out)
{
    return strv_add(out, in->n ? in->d.p : "", in->n ? in->d.n : 0);
}

static int ref_strip(const struct tok_dec *d, const struct strv *in, struct strv *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = SV_STR(in, i);
        size_t n = SV_LEN(in, i);
        const size_t cl = (size_t)d->cp_len;
        /* leading: up to start characters equal to the content character */
        size_t a = 0, lead = 0;
        while (lead < (size_t)d->start && n - a >= cl && memcmp(s + a, d->cp_utf8, cl) == 0) {
            a += cl;
            lead++;
        }
        /* trailing: up to stop of them, counted over the whole token (the cuts may cross) */
        size_t b = n, trail = 0;
        while (trail < (size_t)d->stop && b >= cl && memcmp(s + b - cl, d->cp_utf8, cl) == 0) {
            b -= cl;
            trail++;
        }
        /* the reference panics when the cuts cross; an empty string is the sane reading */
        int rc = b > a ? strv_add(out, s + a, b - a) : strv_add(out, "", 0);
        if (rc < 0) return rc;
    }
    return 0;
}

static int ref_metaspace(const struct tok_dec *d, const struct strv *in, struct strv *out)
{
    for (size_t i = 0; i < in->n; i++) {
        const char *s = SV_STR(in, i);
        size_t n = SV_LEN(in, i), pos = 0;
        if (strv_open(out) < 0) return ST_ENOMEM;
        while (pos < n) {
            const char *f = memmem(s + pos, n - pos, d->cp_utf8, (size_t)d->cp_len);
            size_t stop = f ? (size_t)(f - s) : n;
            if (strv_grow(out, s + pos, stop - pos) < 0) return ST_ENOMEM;
            if (f && !(i == 0 && d->prepend) && strv_grow(out, " ", 1) < 0) return ST_ENOMEM;
            pos = f ? stop + (size_t)d->cp_len : n;
        }
    }
    return 0;
}

/* Bytes of one token for the ByteLevel decoder: mapped back when every character is in the byte table, the
 * token's own bytes otherwise. */
static int bytelevel_bytes(const char *s, size_t n, struct tok_buf *out)
{
    size_t start = out->n;
    for (size_t i = 0; i < n;) {
        int l;
        int32_t cp = tok_utf8_decode((const unsigned char *)s + i, n - i, &l);
        int b = cp >= 0 ? tok_cp_to_byte((uint32_t)cp) : -1;
        if (b < 0) {
            out->n = start;
            return tok_buf_put(out, s, n);
        }
        unsigned char c = (unsigned char)b;
        if (tok_buf_put(out, &c, 1) < 0) return ST_ENOMEM;
        i += (size_t)l;
    }
    return 0;
}

static int token_piece(const struct tokenizer *t, int32_t id, const char **s, size_t *n, char *err)
{
    if (id < 0 || id >= t->n_ids || t->id_off[id] == UINT32_MAX)
        return err_set(err, ST_EINVAL, "token id %d is not in the vocabulary (size %d)", (int)id, t->n_ids);
    *s = t->arena.p + t->id_off[id];
    *n = t->id_len[id];
    return 0;
}

int tok_decode_ref(const struct tokenizer *t, const int32_t *ids, int n_ids, bool skip_special, char **out,
                   size_t *out_len, char *err)
{
    struct strv a = {0}, b = {0};
    struct tok_buf res = {0};
    int rc = 0;
    *out = NULL;
    if (out_len) *out_len = 0;
    if (n_ids < 0 || (n_ids > 0 && !ids)) return err_set(err, ST_EINVAL, "decode: bad id list");
    for (int i = 0; i < n_ids; i++) {
        const char *s;
        size_t n;
        if ((rc = token_piece(t, ids[i], &s, &n, err)) < 0) goto fail;
    }
    if (t->dec_join || t->dec_bytelevel) {
        /* one string straight away: tokens joined by ' ', or the ByteLevel bytes decoded lossily */
        struct detok_utf8 l = {0};
        struct tok_buf bytes = {0};
        bool first = true;
        for (int i = 0; i < n_ids && rc == 0; i++) {
            if (skip_special && (t->id_flags[ids[i]] & TOK_ID_SPECIAL)) continue;
            const char *s = t->arena.p + t->id_off[ids[i]];
            size_t n = t->id_len[ids[i]];
            if (t->dec_join) {
                if (!first) rc = tok_buf_put(&res, " ", 1);
                if (rc == 0) rc = tok_buf_put(&res, s, n);
            } else {
                bytes.n = 0;
                if ((rc = bytelevel_bytes(s, n, &bytes)) < 0) break;
                if ((rc = tok_buf_reserve(&res, bytes.n * 3 + 8)) < 0) break;
                for (size_t k = 0; k < bytes.n; k++)
                    res.n += tok_lossy_push(&l, (unsigned char)bytes.p[k], res.p + res.n);
            }
            first = false;
        }
        tok_buf_free(&bytes);
        if (rc == 0 && t->dec_bytelevel) {
            char tail[4];
            rc = tok_buf_put(&res, tail, tok_lossy_finish(&l, tail));
        }
        if (rc < 0) goto nomem;
        if (t->dec_join) goto done;
        if (strv_add(&a, res.p ? res.p : "", res.n) < 0) goto nomem;
        res.n = 0;
    } else {
        for (int i = 0; i < n_ids; i++) {
            if (skip_special && (t->id_flags[ids[i]] & TOK_ID_SPECIAL)) continue;
            if (strv_add(&a, t->arena.p + t->id_off[ids[i]], t->id_len[ids[i]]) < 0) goto nomem;
        }
    }
    for (int k = 0; k < t->n_decs; k++) {
        const struct tok_dec *d = &t->decs[k];
        switch (d->kind) {
        case TOK_DEC_REPLACE: rc = ref_replace(d, &a, &b); break;
        case TOK_DEC_BYTEFALLBACK: rc = ref_bytefallback(&a, &b); break;
        case TOK_DEC_FUSE: rc = ref_fuse(&a, &b); break;
        case TOK_DEC_STRIP: rc = ref_strip(d, &a, &b); break;
        case TOK_DEC_METASPACE: rc = ref_metaspace(d, &a, &b); break;
        default: rc = ST_EINVAL; break;
        }
        strv_free(&a);
        a = b;
        memset(&b, 0, sizeof(b));
        if (rc < 0) goto nomem;
    }
    if (a.n && tok_buf_put(&res, a.d.p, a.d.n) < 0) goto nomem;
done:
    if (tok_buf_reserve(&res, 0) < 0) goto nomem;
    res.p[res.n] = 0;
    *out = res.p;
    if (out_len) *out_len = res.n;
    strv_free(&a);
    return 0;
nomem:
    rc = err_set(err, ST_ENOMEM, "out of memory while decoding");
fail:
    strv_free(&a);
    strv_free(&b);
    tok_buf_free(&res);
    return rc;
}

/* ---- streaming ---- */

enum { EV_BEGIN, EV_DATA, EV_END };
#define ST_LEAD_DONE 1u
#define ST_BEGUN 1u
#define ST_NONBYTE 1u
#define ST_RUN_INVALID 2u

struct dsink {
    char *out;
    size_t cap, n;
    bool overflow;
};

static void ev(struct detok_stream *s, int k, int kind, const char *p, size_t n, struct dsink *o);

/* Staging for stages that emit byte by byte: flushed downstream in character-aligned chunks. */
struct stage_out {
    struct detok_stream *s;
    int k;
    struct dsink *o;
    size_t n;
    char b[256];
};

static void so_flush(struct stage_out *so, bool all)
{
    size_t cut = so->n;
    if (!all && cut) {
        size_t lead = cut - 1;
        while (lead > 0 && cut - lead < 4 && ((unsigned char)so->b[lead] & 0xC0) == 0x80) lead--;
        unsigned char c = (unsigned char)so->b[lead];
        size_t want = c < 0x80 ? 1 : c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : 2;
        if (lead + want > cut) cut = lead;
    }
    if (cut) ev(so->s, so->k + 1, EV_DATA, so->b, cut, so->o);
    memmove(so->b, so->b + cut, so->n - cut);
    so->n -= cut;
}

static void so_put(struct stage_out *so, const char *p, size_t n)
{
    while (n) {
        size_t c = ST_MIN(n, sizeof(so->b) - so->n);
        memcpy(so->b + so->n, p, c);
        so->n += c;
        p += c;
        n -= c;
        if (so->n == sizeof(so->b)) so_flush(so, false);
    }
}

static void sink(struct detok_stream *s, int kind, const char *p, size_t n, struct dsink *o)
{
    if (kind == EV_BEGIN) {
        if (s->t->dec_join && s->sink_started) sink(s, EV_DATA, " ", 1, o);
        s->sink_started = true;
        return;
    }
    if (kind != EV_DATA || !n) return;
    if (o->overflow || o->n + n + 1 > o->cap) {
        o->overflow = true;
        return;
    }
    memcpy(o->out + o->n, p, n);
    o->n += n;
}

static void st_replace(struct detok_stream *s, int k, const struct tok_dec *d, int kind, const char *p, size_t n,
                       struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (kind == EV_BEGIN) {
        st->a = 0;
        ev(s, k + 1, EV_BEGIN, NULL, 0, o);
        return;
    }
    struct stage_out so = {s, k, o, 0, {0}};
    uint32_t m = st->a;
    if (kind == EV_END) {
        so_put(&so, d->pat, m);
        so_flush(&so, true);
        st->a = 0;
        ev(s, k + 1, EV_END, NULL, 0, o);
        return;
    }
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        while (m > 0 && c != d->pat[m]) {
            uint32_t nm = (uint32_t)d->fail[m - 1];
            so_put(&so, d->pat, m - nm);
            m = nm;
        }
        if (c == d->pat[m]) {
            if (++m == (uint32_t)d->pat_len) {
                so_put(&so, d->content, d->content_len);
                m = 0;
            }
        } else {
            so_put(&so, &c, 1);
        }
    }
    st->a = m;
    so_flush(&so, true);
}

static void st_strip(struct detok_stream *s, int k, const struct tok_dec *d, int kind, const char *p, size_t n,
                     struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (kind == EV_BEGIN) {
        st->a = st->b = 0;
        st->flags = 0;
        ev(s, k + 1, EV_BEGIN, NULL, 0, o);
        return;
    }
    if (kind == EV_END) { /* held characters are the ones stripped at the end */
        st->b = 0;
        ev(s, k + 1, EV_END, NULL, 0, o);
        return;
    }
    struct stage_out so = {s, k, o, 0, {0}};
    for (size_t i = 0; i < n;) {
        int l;
        tok_utf8_decode((const unsigned char *)p + i, n - i, &l);
        bool is_c = (size_t)l == (size_t)d->cp_len && memcmp(p + i, d->cp_utf8, (size_t)l) == 0;
        if (!(st->flags & ST_LEAD_DONE) && st->a < (uint32_t)d->start && is_c) {
            st->a++;
        } else {
            st->flags |= ST_LEAD_DONE;
            if (is_c) {
                if (++st->b > (uint32_t)d->stop) {
                    so_put(&so, d->cp_utf8, (size_t)d->cp_len);
                    st->b--;
                }
            } else {
                for (; st->b; st->b--) so_put(&so, d->cp_utf8, (size_t)d->cp_len);
                so_put(&so, p + i, (size_t)l);
            }
        }
        i += (size_t)l;
    }
    so_flush(&so, true);
}

static void st_metaspace(struct detok_stream *s, int k, const struct tok_dec *d, int kind, const char *p, size_t n,
                         struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (kind == EV_BEGIN) {
        if (st->a < 2) st->a++; /* 1: inside the first token */
        ev(s, k + 1, EV_BEGIN, NULL, 0, o);
        return;
    }
    if (kind == EV_END) {
        ev(s, k + 1, EV_END, NULL, 0, o);
        return;
    }
    bool drop = st->a == 1 && d->prepend;
    size_t pos = 0;
    while (pos < n) {
        const char *f = memmem(p + pos, n - pos, d->cp_utf8, (size_t)d->cp_len);
        size_t stop = f ? (size_t)(f - p) : n;
        if (stop > pos) ev(s, k + 1, EV_DATA, p + pos, stop - pos, o);
        if (f && !drop) ev(s, k + 1, EV_DATA, " ", 1, o);
        pos = f ? stop + (size_t)d->cp_len : n;
    }
}

static void emit_token(struct detok_stream *s, int k, const char *p, size_t n, struct dsink *o)
{
    ev(s, k, EV_BEGIN, NULL, 0, o);
    if (n) ev(s, k, EV_DATA, p, n, o);
    ev(s, k, EV_END, NULL, 0, o);
}

/* Ends the byte run: one string when it is valid UTF-8, else one U+FFFD token per byte. */
static void bf_flush_run(struct detok_stream *s, int k, struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (!(st->flags & ST_RUN_INVALID) && s->n_pending) {
        if (s->run.n == 0) {
            emit_token(s, k + 1, (const char *)s->pending, (size_t)s->n_pending, o);
        } else {
            for (int i = 0; i < s->n_pending; i++) emit_token(s, k + 1, FFFD, 3, o);
        }
    }
    s->n_pending = 0;
    memset(&s->run, 0, sizeof(s->run));
    st->flags &= (uint8_t)~ST_RUN_INVALID;
}

static void bf_push_byte(struct detok_stream *s, int k, unsigned char c, struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (st->flags & ST_RUN_INVALID) { /* the whole run is U+FFFDs now, whatever follows */
        emit_token(s, k + 1, FFFD, 3, o);
        return;
    }
    if (tok_utf8v_push(&s->run, c) < 0) {
        for (int i = 0; i <= s->n_pending; i++) emit_token(s, k + 1, FFFD, 3, o);
        s->n_pending = 0;
        st->flags |= ST_RUN_INVALID;
        return;
    }
    if (s->n_pending == DETOK_RUN_MAX) {
        /* over-long run: emit its complete characters as one string, keep the incomplete tail */
        int keep = 0; /* bytes of c's character already in the run */
        if ((c & 0xC0) == 0x80) {
            int i = s->n_pending - 1;
            while (i > 0 && (s->pending[i] & 0xC0) == 0x80) i--;
            keep = s->n_pending - i;
        }
        int cut = s->n_pending - keep;
        if (cut > 0) emit_token(s, k + 1, (const char *)s->pending, (size_t)cut, o);
        memmove(s->pending, s->pending + cut, (size_t)keep);
        s->n_pending = keep;
    }
    s->pending[s->n_pending++] = c;
}

static bool bf_prefix_ok(int pos, unsigned char c)
{
    bool hex = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
    switch (pos) {
    case 0: return c == '<';
    case 1: return c == '0';
    case 2: return c == 'x';
    case 3: return hex || c == '+';
    case 4: return hex;
    case 5: return c == '>';
    default: return false;
    }
}

static void st_bytefallback(struct detok_stream *s, int k, int kind, const char *p, size_t n, struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (kind == EV_BEGIN) {
        st->n_buf = 0;
        st->flags &= (uint8_t)~ST_NONBYTE;
        return;
    }
    if (kind == EV_DATA) {
        if (st->flags & ST_NONBYTE) {
            ev(s, k + 1, EV_DATA, p, n, o);
            return;
        }
        for (size_t i = 0; i < n; i++) {
            if (bf_prefix_ok(st->n_buf, (unsigned char)p[i])) {
                st->buf[st->n_buf++] = (unsigned char)p[i];
                continue;
            }
            /* not a byte token: the run ends before it */
            st->flags |= ST_NONBYTE;
            bf_flush_run(s, k, o);
            ev(s, k + 1, EV_BEGIN, NULL, 0, o);
            if (st->n_buf) ev(s, k + 1, EV_DATA, (const char *)st->buf, st->n_buf, o);
            ev(s, k + 1, EV_DATA, p + i, n - i, o);
            return;
        }
        return;
    }
    /* EV_END */
    if (st->flags & ST_NONBYTE) {
        ev(s, k + 1, EV_END, NULL, 0, o);
        return;
    }
    int b = byte_token((const char *)st->buf, st->n_buf);
    if (b >= 0) {
        bf_push_byte(s, k, (unsigned char)b, o);
        return;
    }
    bf_flush_run(s, k, o);
    emit_token(s, k + 1, (const char *)st->buf, st->n_buf, o);
}

static void st_fuse(struct detok_stream *s, int k, int kind, const char *p, size_t n, struct dsink *o)
{
    struct detok_stage *st = &s->st[k];
    if (kind == EV_BEGIN) {
        if (!(st->flags & ST_BEGUN)) {
            st->flags |= ST_BEGUN;
            ev(s, k + 1, EV_BEGIN, NULL, 0, o);
        }
    } else if (kind == EV_DATA) {
        ev(s, k + 1, EV_DATA, p, n, o);
    }
}

static void ev(struct detok_stream *s, int k, int kind, const char *p, size_t n, struct dsink *o)
{
    const struct tokenizer *t = s->t;
    if (k >= t->n_decs) {
        sink(s, kind, p, n, o);
        return;
    }
    const struct tok_dec *d = &t->decs[k];
    switch (d->kind) {
    case TOK_DEC_REPLACE: st_replace(s, k, d, kind, p, n, o); break;
    case TOK_DEC_STRIP: st_strip(s, k, d, kind, p, n, o); break;
    case TOK_DEC_METASPACE: st_metaspace(s, k, d, kind, p, n, o); break;
    case TOK_DEC_BYTEFALLBACK: st_bytefallback(s, k, kind, p, n, o); break;
    case TOK_DEC_FUSE: st_fuse(s, k, kind, p, n, o); break;
    default: break;
    }
}

/* The input to stage k is complete: flush what it holds and go on downstream. */
static void finish(struct detok_stream *s, int k, struct dsink *o)
{
    const struct tokenizer *t = s->t;
    for (; k < t->n_decs; k++) {
        const struct tok_dec *d = &t->decs[k];
        if (d->kind == TOK_DEC_BYTEFALLBACK) bf_flush_run(s, k, o);
        if (d->kind == TOK_DEC_FUSE && (s->st[k].flags & ST_BEGUN)) {
            s->st[k].flags &= (uint8_t)~ST_BEGUN;
            ev(s, k + 1, EV_END, NULL, 0, o);
        }
    }
}

void detok_stream_init(struct detok_stream *s, const struct tokenizer *t, bool skip_special)
{
    memset(s, 0, sizeof(*s));
    s->t = t;
    s->skip_special = skip_special;
    s->at_start = true;
}

static int stream_done(struct detok_stream *s, const struct detok_stream *saved, struct dsink *o, char *out,
                       size_t cap)
{
    if (o->overflow) {
        *s = *saved;
        if (cap) out[0] = 0;
        return ST_ERANGE;
    }
    out[o->n] = 0;
    return (int)o->n;
}

int detok_stream_push(struct detok_stream *s, int32_t id, char *out, size_t cap)
{
    const struct tokenizer *t = s->t;
    if (!t || !out || cap == 0) return ST_EINVAL;
    if (cap > INT32_MAX) cap = INT32_MAX;
    const char *p;
    size_t n;
    if (token_piece(t, id, &p, &n, NULL) < 0) return ST_EINVAL;
    out[0] = 0;
    if (s->skip_special && (t->id_flags[id] & TOK_ID_SPECIAL)) return 0;
    struct detok_stream saved = *s;
    struct dsink o = {out, cap, 0, false};
    if (t->dec_bytelevel) {
        if (s->at_start) ev(s, 0, EV_BEGIN, NULL, 0, &o);
        s->at_start = false;
        /* the token's bytes: mapped back if every character is in the byte table, its own bytes otherwise */
        bool mapped = true;
        for (size_t i = 0; i < n && mapped;) {
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)p + i, n - i, &l);
            mapped = cp >= 0 && tok_cp_to_byte((uint32_t)cp) >= 0;
            i += (size_t)l;
        }
        char chunk[256 + 8];
        size_t cn = 0;
        for (size_t i = 0; i < n;) {
            int l = 1;
            unsigned char c = (unsigned char)p[i];
            if (mapped) c = (unsigned char)tok_cp_to_byte((uint32_t)tok_utf8_decode((const unsigned char *)p + i, n - i, &l));
            cn += tok_lossy_push(&s->bl, c, chunk + cn);
            if (cn >= 256) {
                ev(s, 0, EV_DATA, chunk, cn, &o);
                cn = 0;
            }
            i += (size_t)l;
        }
        if (cn) ev(s, 0, EV_DATA, chunk, cn, &o);
    } else {
        s->at_start = false;
        emit_token(s, 0, p, n, &o);
    }
    return stream_done(s, &saved, &o, out, cap);
}

int detok_stream_flush(struct detok_stream *s, char *out, size_t cap)
{
    const struct tokenizer *t = s->t;
    if (!t || !out || cap == 0) return ST_EINVAL;
    if (cap > INT32_MAX) cap = INT32_MAX;
    struct detok_stream saved = *s;
    struct dsink o = {out, cap, 0, false};
    if (t->dec_bytelevel && !s->at_start) {
        char tail[4];
        size_t tn = tok_lossy_finish(&s->bl, tail);
        if (tn) ev(s, 0, EV_DATA, tail, tn, &o);
        ev(s, 0, EV_END, NULL, 0, &o);
    }
    finish(s, 0, &o);
    int rc = stream_done(s, &saved, &o, out, cap);
    if (rc >= 0) detok_stream_init(s, t, s->skip_special);
    return rc;
}
