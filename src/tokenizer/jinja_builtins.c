/* jinja builtins: filters, tests, global functions and the methods of str, dict, list and loop, with jinja2's
 * (and Python's) semantics. Hugging Face's environment adds tojson (json.dumps with ensure_ascii=False),
 * raise_exception and strftime_now. */
#include "tokenizer/jinja.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <utf8proc.h>

#include "core/core.h"

/* ---- argument binding ---- */

static const char k_missing[] = "(missing)";
#define MISSING jv_undefined(k_missing)
static bool has(struct jv v) { return !(v.type == JV_UNDEFINED && v.u.undef_name == k_missing); }

/* Binds positional and keyword arguments to names[] (at most 8). vals are borrowed. */
static int bind(struct jrender *r, const struct jnode *at, const char *what, const struct jargs *a,
                const char *const *names, struct jv *vals)
{
    int n = 0;
    while (names[n]) vals[n] = MISSING, n++;
    if (a->n_pos > n) return jinja_fail(r, at, ST_EINVAL, "%s takes at most %d argument(s), %d given", what, n, a->n_pos);
    for (int i = 0; i < a->n_pos; i++) vals[i] = a->pos[i];
    for (int k = 0; k < a->n_kw; k++) {
        int i;
        for (i = 0; i < n; i++)
            if (strcmp(names[i], a->kw_names[k]) == 0) break;
        if (i == n) return jinja_fail(r, at, ST_EINVAL, "%s got an unexpected keyword argument '%s'", what, a->kw_names[k]);
        if (has(vals[i])) return jinja_fail(r, at, ST_EINVAL, "%s got multiple values for argument '%s'", what, names[i]);
        vals[i] = a->kw[k];
    }
    return 0;
}

static const char *fname(const struct jnode *at)
{
    return at && (at->kind == JN_FILTER || at->kind == JN_TEST) ? at->u.filter.name : "function";
}

static int need_int(struct jrender *r, const struct jnode *at, struct jv v, const char *what, int64_t *out)
{
    if (v.type == JV_INT) *out = v.u.i;
    else if (v.type == JV_BOOL) *out = v.u.b;
    else return jinja_fail(r, at, ST_EINVAL, "%s must be an integer, not '%s'", what, jv_type_name(v));
    return 0;
}

static int need_str(struct jrender *r, const struct jnode *at, struct jv v, const char *what)
{
    if (v.type == JV_STRING) return 0;
    if (v.type == JV_UNDEFINED && v.u.undef_name != k_missing) return jinja_require_defined(r, at, v);
    return jinja_fail(r, at, ST_EINVAL, "%s must be a string, not '%s'", what, jv_type_name(v));
}

static int nomem(struct jrender *r, const struct jnode *at) { return jinja_fail(r, at, ST_ENOMEM, "out of memory"); }

static int buf_rc(struct jrender *r, const struct jnode *at, int rc)
{
    if (rc == ST_ENOMEM) return nomem(r, at);
    return jinja_fail(r, at, rc, "value exceeds the %zu byte limit", r->lim->max_output_bytes);
}

/* Moves a buffer into a new string value. */
static int buf_string(struct jrender *r, const struct jnode *at, struct jbuf *b, struct jv *out)
{
    int rc = jinja_new_string(r, at, b->p ? b->p : "", b->n, out);
    jbuf_free(b);
    return rc;
}

/* ---- Unicode helpers ---- */

static bool is_word(uint32_t cp) { return cp == '_' || jinja_cp_is_alpha(cp) || jinja_cp_is_numeric(cp); }

static int put_cp(struct jbuf *b, uint32_t cp)
{
    char tmp[4];
    return jbuf_put(b, tmp, jinja_utf8_encode(cp, tmp));
}

static int case_convert(struct jrender *r, const struct jnode *at, const char *s, size_t len, enum jinja_case mode,
                        struct jv *out)
{
    struct jbuf b = {0};
    int rc = jinja_charge(r, at, (uint64_t)len * JINJA_UNICODE_COST);
    if (rc < 0) return rc;
    rc = jinja_case_append(&b, s, len, mode);
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

static bool in_charset(struct jv chars, uint32_t cp)
{
    char e[4];
    size_t el = jinja_utf8_encode(cp, e);
    return jv_find(chars.u.s->s, chars.u.s->len, e, el) != NULL;
}

/* Python's str.strip family. which: 1 left, 2 right, 3 both. chars NULL: whitespace. */
static int do_strip(struct jrender *r, const struct jnode *at, struct jv s, struct jv chars, int which, struct jv *out)
{
    const char *p = s.u.s->s;
    size_t len = s.u.s->len, start = 0, end = len;
    bool ws = !has(chars) || chars.type == JV_NONE;
    int rc;
    if (!ws && (rc = need_str(r, at, chars, "strip argument")) < 0) return rc;
#define IN_SET(cp) (ws ? jinja_py_isspace(cp) : in_charset(chars, cp))
    if (which & 1) {
        while (start < end) {
            size_t adv;
            uint32_t cp = jinja_utf8_decode(p + start, end - start, &adv);
            if (!IN_SET(cp)) break;
            start += adv;
        }
    }
    if (which & 2) {
        while (end > start) {
            size_t b = end - 1;
            while (b > start && ((unsigned char)p[b] & 0xC0) == 0x80) b--;
            size_t adv;
            uint32_t cp = jinja_utf8_decode(p + b, end - b, &adv);
            if (!IN_SET(cp)) break;
            end = b;
        }
    }
#undef IN_SET
    if (start == 0 && end == len) {
        *out = jv_ref(s);
        return 0;
    }
    return jinja_new_string(r, at, p + start, end - start, out);
}

/* Code point index -> byte offset with Python slice clamping of [start, end). */
static void cp_range(const struct jv_str *s, struct jv vstart, struct jv vend, size_t *b0, size_t *b1)
{
    int64_t n = (int64_t)s->n_cp, st = 0, en = n;
    if (has(vstart) && (vstart.type == JV_INT || vstart.type == JV_BOOL)) st = vstart.type == JV_INT ? vstart.u.i : vstart.u.b;
    if (has(vend) && (vend.type == JV_INT || vend.type == JV_BOOL)) en = vend.type == JV_INT ? vend.u.i : vend.u.b;
    if (st < 0) st = ST_MAX(st + n, 0);
    if (en < 0) en = ST_MAX(en + n, 0);
    st = ST_MIN(st, n);
    en = ST_MIN(en, n);
    if (en < st) en = st;
    *b0 = s->ascii ? (size_t)st : jinja_utf8_offset(s->s, s->len, (size_t)st);
    *b1 = s->ascii ? (size_t)en : jinja_utf8_offset(s->s, s->len, (size_t)en);
}

static int64_t cp_index(const struct jv_str *s, size_t byte_off)
{
    if (s->ascii) return (int64_t)byte_off;
    int64_t n = 0;
    for (size_t i = 0; i < byte_off; i++)
        if (((unsigned char)s->s[i] & 0xC0) != 0x80) n++;
    return n;
}

static const char *find_bytes(const char *h, size_t hl, const char *n, size_t nl)
{
    if (nl == 0) return h;
    return jv_find(h, hl, n, nl);
}

static const char *rfind_bytes(const char *h, size_t hl, const char *n, size_t nl)
{
    if (nl > hl) return NULL;
    for (size_t i = hl - nl + 1; i > 0; i--)
        if (memcmp(h + i - 1, n, nl) == 0) return h + i - 1;
    return NULL;
}

/* Python's str.replace. */
static int do_replace(struct jrender *r, const struct jnode *at, struct jv s, struct jv old, struct jv new_,
                      int64_t count, struct jv *out)
{
    const char *p = s.u.s->s, *o = old.u.s->s, *nw = new_.u.s->s;
    size_t len = s.u.s->len, ol = old.u.s->len, nl = new_.u.s->len;
    struct jbuf b = {0};
    int rc = 0;
    int64_t done = 0;
    if (ol == 0) {
        /* inserts new before every character and at the end */
        size_t i = 0;
        while (rc == 0 && (count < 0 || done < count)) {
            if ((rc = jbuf_put(&b, nw, nl)) < 0) break;
            done++;
            if (i >= len) break;
            size_t adv;
            jinja_utf8_decode(p + i, len - i, &adv);
            rc = jbuf_put(&b, p + i, adv);
            i += adv;
        }
        if (rc == 0 && i < len) rc = jbuf_put(&b, p + i, len - i);
    } else {
        size_t i = 0;
        while (rc == 0) {
            const char *f = (count < 0 || done < count) ? jv_find(p + i, len - i, o, ol) : NULL;
            if (!f) {
                rc = jbuf_put(&b, p + i, len - i);
                break;
            }
            if ((rc = jbuf_put(&b, p + i, (size_t)(f - (p + i)))) < 0) break;
            rc = jbuf_put(&b, nw, nl);
            i = (size_t)(f - p) + ol;
            done++;
        }
    }
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

/* Python's str.split / rsplit. sep: MISSING/none = whitespace. */
static int do_split(struct jrender *r, const struct jnode *at, struct jv s, struct jv sep, int64_t maxsplit, bool right,
                    struct jv *out)
{
    const char *p = s.u.s->s;
    size_t len = s.u.s->len;
    struct jv_list *l = jv_list_new(0);
    int rc = 0;
    if (!l) return nomem(r, at);
    bool ws = !has(sep) || sep.type == JV_NONE;
    if (!ws && (rc = need_str(r, at, sep, "separator")) < 0) goto fail;
    if (!ws && sep.u.s->len == 0) {
        rc = jinja_fail(r, at, ST_EINVAL, "empty separator");
        goto fail;
    }
    /* collect pieces as (start, end) byte ranges */
    size_t cap = 16, n = 0;
    size_t *rng = malloc(cap * 2 * sizeof(*rng));
    if (!rng) {
        rc = nomem(r, at);
        goto fail;
    }
#define PIECE(a, b)                                                                                             \
    do {                                                                                                        \
        if (n == cap) {                                                                                         \
            size_t *nr_ = realloc(rng, cap * 4 * sizeof(*rng));                                                 \
            if (!nr_) {                                                                                         \
                free(rng);                                                                                      \
                rc = nomem(r, at);                                                                              \
                goto fail;                                                                                      \
            }                                                                                                   \
            rng = nr_;                                                                                          \
            cap *= 2;                                                                                           \
        }                                                                                                       \
        rng[2 * n] = (a);                                                                                       \
        rng[2 * n + 1] = (b);                                                                                   \
        n++;                                                                                                    \
    } while (0)
    if (ws && !right) {
        size_t i = 0;
        int64_t splits = 0;
        for (;;) {
            while (i < len) {
                size_t adv;
                if (!jinja_py_isspace(jinja_utf8_decode(p + i, len - i, &adv))) break;
                i += adv;
            }
            if (i >= len) break;
            if (maxsplit >= 0 && splits >= maxsplit) {
                PIECE(i, len);
                break;
            }
            size_t j = i;
            while (j < len) {
                size_t adv;
                if (jinja_py_isspace(jinja_utf8_decode(p + j, len - j, &adv))) break;
                j += adv;
            }
            PIECE(i, j);
            splits++;
            i = j;
        }
    } else if (ws) {
        size_t e = len;
        int64_t splits = 0;
        for (;;) {
            while (e > 0) {
                size_t b0 = e - 1;
                while (b0 > 0 && ((unsigned char)p[b0] & 0xC0) == 0x80) b0--;
                size_t adv;
                if (!jinja_py_isspace(jinja_utf8_decode(p + b0, e - b0, &adv))) break;
                e = b0;
            }
            if (e == 0) break;
            if (maxsplit >= 0 && splits >= maxsplit) {
                PIECE(0, e);
                break;
            }
            size_t b = e;
            while (b > 0) {
                size_t b0 = b - 1;
                while (b0 > 0 && ((unsigned char)p[b0] & 0xC0) == 0x80) b0--;
                size_t adv;
                if (jinja_py_isspace(jinja_utf8_decode(p + b0, b - b0, &adv))) break;
                b = b0;
            }
            PIECE(b, e);
            splits++;
            e = b;
        }
    } else if (!right) {
        const char *sp = sep.u.s->s;
        size_t sl = sep.u.s->len, i = 0;
        int64_t splits = 0;
        for (;;) {
            const char *f = (maxsplit < 0 || splits < maxsplit) ? jv_find(p + i, len - i, sp, sl) : NULL;
            if (!f) {
                PIECE(i, len);
                break;
            }
            PIECE(i, (size_t)(f - p));
            i = (size_t)(f - p) + sl;
            splits++;
        }
    } else {
        const char *sp = sep.u.s->s;
        size_t sl = sep.u.s->len, e = len;
        int64_t splits = 0;
        for (;;) {
            const char *f = (maxsplit < 0 || splits < maxsplit) ? rfind_bytes(p, e, sp, sl) : NULL;
            if (!f) {
                PIECE(0, e);
                break;
            }
            PIECE((size_t)(f - p) + sl, e);
            e = (size_t)(f - p);
            splits++;
        }
    }
#undef PIECE
    if ((rc = jinja_charge(r, at, len + n * 32)) < 0) {
        free(rng);
        goto fail;
    }
    for (size_t k = 0; k < n; k++) {
        size_t idx = right ? n - 1 - k : k;
        struct jv piece;
        if ((rc = jinja_new_string(r, at, p + rng[2 * idx], rng[2 * idx + 1] - rng[2 * idx], &piece)) < 0) break;
        if ((rc = jv_list_push(l, piece)) < 0) {
            rc = buf_rc(r, at, rc);
            break;
        }
    }
    free(rng);
    if (rc < 0) goto fail;
    *out = jv_from_list(l);
    return 0;
fail:
    jv_unref(jv_from_list(l));
    return rc;
}

static int new_tuple2(struct jrender *r, const struct jnode *at, struct jv a, struct jv b, struct jv *out)
{
    struct jv_list *t = jv_list_new(2);
    if (!t) return nomem(r, at);
    t->tuple = true;
    t->v[0] = jv_ref(a);
    t->v[1] = jv_ref(b);
    t->n = 2;
    *out = jv_from_list(t);
    return 0;
}

/* Lowercases strings (jinja2's ignore_case); other values are returned as they are. */
static int ignore_case(struct jrender *r, const struct jnode *at, struct jv v, struct jv *out)
{
    if (v.type != JV_STRING) {
        *out = jv_ref(v);
        return 0;
    }
    return case_convert(r, at, v.u.s->s, v.u.s->len, JCASE_LOWER, out);
}

/* Stable merge sort of perm[] by keys[]; reverse keeps stability like Python's sorted(reverse=True). */
static int sort_perm(struct jrender *r, const struct jnode *at, const struct jv *keys, size_t *perm, size_t n,
                     bool reverse)
{
    size_t *tmp = malloc((n ? n : 1) * sizeof(*tmp));
    if (!tmp) return nomem(r, at);
    int rc = jinja_charge(r, at, n * 64);
    for (size_t width = 1; width < n && rc == 0; width *= 2) {
        for (size_t lo = 0; lo < n && rc == 0; lo += 2 * width) {
            size_t mid = ST_MIN(lo + width, n), hi = ST_MIN(lo + 2 * width, n), i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                int c;
                if ((rc = jinja_compare(r, at, keys[perm[j]], keys[perm[i]], &c)) < 0) break;
                /* take from the right only when it sorts strictly before the left */
                bool right_first = reverse ? c > 0 : c < 0;
                tmp[k++] = right_first ? perm[j++] : perm[i++];
            }
            if (rc < 0) break;
            while (i < mid) tmp[k++] = perm[i++];
            while (j < hi) tmp[k++] = perm[j++];
            memcpy(perm + lo, tmp + lo, (hi - lo) * sizeof(*perm));
        }
    }
    free(tmp);
    return rc;
}

/* Attribute getter for sort/unique/min/max/map/sum: attribute may be NULL, a path, or (multi) "a,b". */
static int attr_key(struct jrender *r, const struct jnode *at, struct jv item, struct jv attribute, bool multi,
                    bool lower, struct jv *out)
{
    struct jv v;
    int rc;
    if (!has(attribute) || attribute.type == JV_NONE) {
        v = jv_ref(item);
    } else if (attribute.type == JV_INT) {
        if ((rc = jinja_getitem(r, at, item, attribute, &v)) < 0) return rc;
    } else if (attribute.type == JV_STRING) {
        const char *a = attribute.u.s->s;
        if (multi && strchr(a, ',')) {
            struct jv_list *l = jv_list_new(0);
            if (!l) return nomem(r, at);
            const char *p = a;
            for (;;) {
                const char *comma = strchr(p, ',');
                size_t n = comma ? (size_t)(comma - p) : strlen(p);
                char part[256];
                struct jv x, y;
                snprintf(part, sizeof(part), "%.*s", (int)ST_MIN(n, sizeof(part) - 1), p);
                if ((rc = jinja_getattr_path(r, at, item, part, &x)) < 0) {
                    jv_unref(jv_from_list(l));
                    return rc;
                }
                rc = lower ? ignore_case(r, at, x, &y) : (y = jv_ref(x), 0);
                jv_unref(x);
                if (rc < 0 || (rc = jv_list_push(l, y)) < 0) {
                    jv_unref(jv_from_list(l));
                    return rc < 0 && rc != ST_ENOMEM ? rc : nomem(r, at);
                }
                if (!comma) break;
                p = comma + 1;
            }
            *out = jv_from_list(l);
            return 0;
        }
        if ((rc = jinja_getattr_path(r, at, item, a, &v)) < 0) return rc;
    } else {
        return jinja_fail(r, at, ST_EINVAL, "attribute must be a string or an integer");
    }
    if (!lower) {
        *out = v;
        return 0;
    }
    rc = ignore_case(r, at, v, out);
    jv_unref(v);
    return rc;
}

static int sorted_list(struct jrender *r, const struct jnode *at, struct jv_list *items, struct jv attribute,
                       bool case_sensitive, bool reverse, struct jv *out)
{
    size_t n = items->n;
    struct jv *keys = calloc(n ? n : 1, sizeof(*keys));
    size_t *perm = malloc((n ? n : 1) * sizeof(*perm));
    int rc = 0;
    size_t made = 0;
    if (!keys || !perm) {
        rc = nomem(r, at);
        goto done;
    }
    for (; made < n; made++) {
        if ((rc = attr_key(r, at, items->v[made], attribute, true, !case_sensitive, &keys[made])) < 0) goto done;
        perm[made] = made;
    }
    if ((rc = sort_perm(r, at, keys, perm, n, reverse)) < 0) goto done;
    struct jv_list *l = jv_list_new(n);
    if (!l) {
        rc = nomem(r, at);
        goto done;
    }
    for (size_t i = 0; i < n; i++) l->v[l->n++] = jv_ref(items->v[perm[i]]);
    *out = jv_from_list(l);
done:
    for (size_t i = 0; i < made; i++) jv_unref(keys[i]);
    free(keys);
    free(perm);
    return rc;
}

/* ---- tojson ---- */

static int to_json(struct jrender *r, const struct jnode *at, struct jv v, bool ensure_ascii, struct jv indent,
                   struct jv separators, bool sort_keys, struct jv *out)
{
    struct json_opts o = {.ensure_ascii = ensure_ascii, .sort_keys = sort_keys};
    char spaces[64];
    int rc;
    if (has(indent) && indent.type != JV_NONE) {
        if (indent.type == JV_STRING) {
            o.indent = indent.u.s->s;
            o.indent_len = indent.u.s->len;
        } else if (indent.type == JV_INT || indent.type == JV_BOOL) {
            int64_t n = indent.type == JV_INT ? indent.u.i : indent.u.b;
            if (n > (int64_t)sizeof(spaces)) return jinja_fail(r, at, ST_EINVAL, "tojson indent too large");
            if (n < 0) n = 0;
            memset(spaces, ' ', (size_t)n);
            o.indent = spaces;
            o.indent_len = (size_t)n;
        } else {
            return jinja_fail(r, at, ST_EINVAL, "tojson indent must be an integer or a string");
        }
    }
    o.item_sep = o.indent ? "," : ", ";
    o.key_sep = ": ";
    if (has(separators) && separators.type != JV_NONE) {
        if (separators.type != JV_LIST || separators.u.l->n != 2 || separators.u.l->v[0].type != JV_STRING ||
            separators.u.l->v[1].type != JV_STRING)
            return jinja_fail(r, at, ST_EINVAL, "tojson separators must be a pair of strings");
        o.item_sep = separators.u.l->v[0].u.s->s;
        o.key_sep = separators.u.l->v[1].u.s->s;
        o.item_sep_len = separators.u.l->v[0].u.s->len;
        o.key_sep_len = separators.u.l->v[1].u.s->len;
    } else {
        o.item_sep_len = strlen(o.item_sep);
        o.key_sep_len = strlen(o.key_sep);
    }
    struct jbuf b = {0};
    char msg[ST_ERR_LEN];
    rc = jv_json_append(&b, v, &o, 0, msg);
    if (rc < 0) {
        jbuf_free(&b);
        if (rc == ST_EINVAL) return jinja_fail(r, at, rc, "%s", msg);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

/* ---- printf-style formatting (str % args, |format) ---- */

static int fmt_pad(struct jbuf *b, const char *s, size_t len, size_t n_cp, int64_t width, bool left)
{
    int rc = 0;
    int64_t pad = width > (int64_t)n_cp ? width - (int64_t)n_cp : 0;
    if (pad > 4096) pad = 4096;
    if (!left)
        for (int64_t i = 0; i < pad && rc == 0; i++) rc = jbuf_putc(b, ' ');
    if (rc == 0) rc = jbuf_put(b, s, len);
    if (left)
        for (int64_t i = 0; i < pad && rc == 0; i++) rc = jbuf_putc(b, ' ');
    return rc;
}

int jinja_format_percent(struct jrender *r, const struct jnode *at, struct jv fmt, struct jv args, struct jv *out)
{
    const char *f = fmt.u.s->s;
    size_t len = fmt.u.s->len, i = 0;
    bool tuple = args.type == JV_LIST && args.u.l->tuple;
    bool mapping = args.type == JV_DICT;
    /* CPython treats any non-tuple object with __getitem__ (a list too) as a mapping: never "not all converted" */
    bool mapping_like = mapping || (args.type == JV_LIST && !tuple);
    size_t n_args = tuple ? args.u.l->n : 1, next = 0;
    bool used_mapping = false;
    struct jbuf b = {0};
    char msg[ST_ERR_LEN];
    int rc = 0;
    while (i < len && rc == 0) {
        const char *pct = memchr(f + i, '%', len - i);
        if (!pct) {
            rc = jbuf_put(&b, f + i, len - i);
            break;
        }
        if ((rc = jbuf_put(&b, f + i, (size_t)(pct - (f + i)))) < 0) break;
        i = (size_t)(pct - f) + 1;
        struct jv arg = jv_none();
        bool have_key = false;
        if (i < len && f[i] == '(') {
            const char *close = memchr(f + i, ')', len - i);
            if (!close) {
                rc = jinja_fail(r, at, ST_EINVAL, "incomplete format key");
                goto fail;
            }
            if (!mapping) {
                rc = jinja_fail(r, at, ST_EINVAL, "format requires a mapping");
                goto fail;
            }
            struct jv *v = jv_dict_get_str(args.u.d, f + i + 1, (size_t)(close - (f + i + 1)));
            if (!v) {
                rc = jinja_fail(r, at, ST_EINVAL, "format key '%.*s' not found", (int)(close - (f + i + 1)), f + i + 1);
                goto fail;
            }
            arg = *v;
            have_key = true;
            used_mapping = true;
            i = (size_t)(close - f) + 1;
        }
        bool left = false, zero = false, plus = false, space = false, alt = false;
        for (; i < len && strchr("-0+ #", f[i]) && f[i]; i++) {
            if (f[i] == '-') left = true;
            else if (f[i] == '0') zero = true;
            else if (f[i] == '+') plus = true;
            else if (f[i] == ' ') space = true;
            else alt = true;
        }
        int64_t width = 0, prec = -1;
        while (i < len && f[i] >= '0' && f[i] <= '9' && width < 100000) width = width * 10 + (f[i++] - '0');
        if (i < len && f[i] == '.') {
            i++;
            prec = 0;
            while (i < len && f[i] >= '0' && f[i] <= '9' && prec < 1000) prec = prec * 10 + (f[i++] - '0');
        }
        if (i >= len) {
            rc = jinja_fail(r, at, ST_EINVAL, "incomplete format");
            goto fail;
        }
        char conv = f[i++];
        if (conv == '%') {
            rc = jbuf_putc(&b, '%');
            continue;
        }
        if (!have_key) {
            if (mapping && !tuple) {
                arg = args;
                used_mapping = true;
            } else if (next >= n_args) {
                rc = jinja_fail(r, at, ST_EINVAL, "not enough arguments for format string");
                goto fail;
            } else {
                arg = tuple ? args.u.l->v[next] : args;
                next++;
            }
        }
        char spec[32], tmp[512];
        switch (conv) {
        case 's':
        case 'r':
        case 'a': {
            struct jbuf sb = {0};
            rc = conv == 's' ? jv_str_append(&sb, arg, 0, msg) : jv_repr_append(&sb, arg, 0, msg);
            if (rc < 0) {
                jbuf_free(&sb);
                if (rc == ST_EINVAL) rc = jinja_fail(r, at, rc, "%s", msg);
                else rc = buf_rc(r, at, rc);
                goto fail;
            }
            size_t sl = sb.n, ncp = 0;
            for (size_t k = 0; k < sb.n; k++)
                if (((unsigned char)sb.p[k] & 0xC0) != 0x80) ncp++;
            if (prec >= 0 && (size_t)prec < ncp) {
                sl = jinja_utf8_offset(sb.p, sb.n, (size_t)prec);
                ncp = (size_t)prec;
            }
            rc = fmt_pad(&b, sb.p ? sb.p : "", sl, ncp, width, left);
            jbuf_free(&sb);
            break;
        }
        case 'd':
        case 'i':
        case 'u':
        case 'x':
        case 'X':
        case 'o':
        case 'c': {
            int64_t v;
            if (arg.type == JV_INT) v = arg.u.i;
            else if (arg.type == JV_BOOL) v = arg.u.b;
            else if (arg.type == JV_FLOAT && conv != 'x' && conv != 'X' && conv != 'o' && conv != 'c' &&
                     isfinite(arg.u.f) && fabs(arg.u.f) < 9.2e18)
                v = (int64_t)arg.u.f;
            else {
                rc = jinja_fail(r, at, ST_EINVAL, "%%%c format: a real number is required, not %s", conv, jv_type_name(arg));
                goto fail;
            }
            if (conv == 'c') {
                if (v < 0 || v > 0x10FFFF) {
                    rc = jinja_fail(r, at, ST_EINVAL, "%%c arg not in range(0x110000)");
                    goto fail;
                }
                char e[4];
                size_t el = jinja_utf8_encode((uint32_t)v, e);
                rc = fmt_pad(&b, e, el, 1, width, left);
                break;
            }
            snprintf(spec, sizeof(spec), "%%%s%s%s%s%s*%s", left ? "-" : "", zero && !left ? "0" : "", plus ? "+" : "",
                     space ? " " : "", alt ? "#" : "",
                     conv == 'x' ? "llx" : conv == 'X' ? "llX" : conv == 'o' ? "llo" : "lld");
            if (conv == 'x' || conv == 'X' || conv == 'o') {
                /* Python prints negative hex as -ff */
                char body[128];
                snprintf(body, sizeof(body), conv == 'x' ? "%llx" : conv == 'X' ? "%llX" : "%llo",
                         (unsigned long long)(v < 0 ? -(uint64_t)v : (uint64_t)v));
                char full[160];
                snprintf(full, sizeof(full), "%s%s%s", v < 0 ? "-" : plus ? "+" : space ? " " : "",
                         alt ? (conv == 'x' ? "0x" : conv == 'X' ? "0X" : "0o") : "", body);
                rc = fmt_pad(&b, full, strlen(full), strlen(full), width, left);
                break;
            }
            snprintf(tmp, sizeof(tmp), spec, (int)ST_MIN(width, 400), (long long)v);
            rc = jbuf_put(&b, tmp, strlen(tmp));
            break;
        }
        case 'f':
        case 'F':
        case 'e':
        case 'E':
        case 'g':
        case 'G': {
            double v;
            if (arg.type == JV_FLOAT) v = arg.u.f;
            else if (arg.type == JV_INT) v = (double)arg.u.i;
            else if (arg.type == JV_BOOL) v = arg.u.b;
            else {
                rc = jinja_fail(r, at, ST_EINVAL, "must be real number, not %s", jv_type_name(arg));
                goto fail;
            }
            snprintf(spec, sizeof(spec), "%%%s%s%s%s%s*.*%c", left ? "-" : "", zero && !left ? "0" : "",
                     plus ? "+" : "", space ? " " : "", alt ? "#" : "", conv);
            snprintf(tmp, sizeof(tmp), spec, (int)ST_MIN(width, 400), (int)(prec < 0 ? 6 : ST_MIN(prec, 100)), v);
            rc = jbuf_put(&b, tmp, strlen(tmp));
            break;
        }
        default:
            rc = jinja_fail(r, at, ST_EUNSUPPORTED, "unsupported format character '%c'", conv);
            goto fail;
        }
    }
    if (rc < 0) {
        rc = buf_rc(r, at, rc);
        goto fail;
    }
    if (!mapping_like && !used_mapping && next < n_args) {
        rc = jinja_fail(r, at, ST_EINVAL, "not all arguments converted during string formatting");
        goto fail;
    }
    return buf_string(r, at, &b, out);
fail:
    jbuf_free(&b);
    return rc;
}

/* str.format with auto/explicit/named fields, !r/!s and simple specs ([[fill]align][0][width][.prec][type]). */
static int format_method(struct jrender *r, const struct jnode *at, struct jv fmt, const struct jargs *a,
                         struct jv *out)
{
    const char *f = fmt.u.s->s;
    size_t len = fmt.u.s->len, i = 0;
    int auto_idx = 0;
    struct jbuf b = {0};
    char msg[ST_ERR_LEN];
    int rc = 0;
    while (i < len) {
        char c = f[i];
        if (c == '}' ) {
            if (i + 1 < len && f[i + 1] == '}') {
                if ((rc = jbuf_putc(&b, '}')) < 0) goto buf_fail;
                i += 2;
                continue;
            }
            rc = jinja_fail(r, at, ST_EINVAL, "Single '}' encountered in format string");
            goto fail;
        }
        if (c != '{') {
            if ((rc = jbuf_putc(&b, c)) < 0) goto buf_fail;
            i++;
            continue;
        }
        if (i + 1 < len && f[i + 1] == '{') {
            if ((rc = jbuf_putc(&b, '{')) < 0) goto buf_fail;
            i += 2;
            continue;
        }
        const char *close = memchr(f + i, '}', len - i);
        if (!close) {
            rc = jinja_fail(r, at, ST_EINVAL, "Single '{' encountered in format string");
            goto fail;
        }
        char field[256];
        size_t fl = (size_t)(close - (f + i + 1));
        if (fl >= sizeof(field)) {
            rc = jinja_fail(r, at, ST_EINVAL, "format field too long");
            goto fail;
        }
        memcpy(field, f + i + 1, fl);
        field[fl] = 0;
        i = (size_t)(close - f) + 1;
        char *spec = strchr(field, ':');
        if (spec) *spec++ = 0;
        char *conv = strchr(field, '!');
        if (conv) *conv++ = 0;
        struct jv arg;
        if (field[0] == 0) {
            if (auto_idx >= a->n_pos) {
                rc = jinja_fail(r, at, ST_EINVAL, "Replacement index %d out of range for positional args tuple", auto_idx);
                goto fail;
            }
            arg = a->pos[auto_idx++];
        } else if (field[0] >= '0' && field[0] <= '9') {
            long k = strtol(field, NULL, 10);
            if (k >= a->n_pos) {
                rc = jinja_fail(r, at, ST_EINVAL, "Replacement index %ld out of range for positional args tuple", k);
                goto fail;
            }
            arg = a->pos[k];
        } else {
            int k;
            for (k = 0; k < a->n_kw; k++)
                if (strcmp(a->kw_names[k], field) == 0) break;
            if (k == a->n_kw) {
                rc = jinja_fail(r, at, ST_EINVAL, "format field '%s' not given", field);
                goto fail;
            }
            arg = a->kw[k];
        }
        struct jbuf sb = {0};
        bool repr = conv && conv[0] == 'r';
        char type = 0, fill = ' ', align = 0;
        int64_t width = 0, prec = -1;
        bool zero = false;
        if (spec && *spec) {
            const char *p = spec;
            if (p[0] && p[1] && strchr("<>^", p[1])) {
                fill = p[0];
                align = p[1];
                p += 2;
            } else if (p[0] && strchr("<>^", p[0])) {
                align = *p++;
            }
            if (*p == '0') {
                zero = true;
                p++;
            }
            while (*p >= '0' && *p <= '9' && width < 10000) width = width * 10 + (*p++ - '0');
            if (*p == '.') {
                p++;
                prec = 0;
                while (*p >= '0' && *p <= '9' && prec < 1000) prec = prec * 10 + (*p++ - '0');
            }
            if (*p && strchr("sdfeEgG%", *p)) type = *p++;
            if (*p) {
                rc = jinja_fail(r, at, ST_EUNSUPPORTED, "unsupported format spec '%s'", spec);
                goto fail;
            }
        }
        bool numeric = false;
        if (type && type != 's' && (arg.type == JV_INT || arg.type == JV_FLOAT || arg.type == JV_BOOL)) {
            char tmp[512], sp[32];
            double v = arg.type == JV_FLOAT ? arg.u.f : arg.type == JV_INT ? (double)arg.u.i : arg.u.b;
            numeric = true;
            if (type == 'd') {
                if (arg.type == JV_FLOAT) {
                    rc = jinja_fail(r, at, ST_EINVAL, "Unknown format code 'd' for object of type 'float'");
                    goto fail;
                }
                snprintf(tmp, sizeof(tmp), "%lld", (long long)(arg.type == JV_INT ? arg.u.i : arg.u.b));
            } else if (type == '%') {
                snprintf(tmp, sizeof(tmp), "%.*f%%", (int)(prec < 0 ? 6 : ST_MIN(prec, 100)), v * 100);
            } else {
                snprintf(sp, sizeof(sp), "%%.*%c", type);
                snprintf(tmp, sizeof(tmp), sp, (int)(prec < 0 ? 6 : ST_MIN(prec, 100)), v);
            }
            rc = jbuf_put(&sb, tmp, strlen(tmp));
        } else if (!type && !repr && arg.type == JV_FLOAT && prec >= 0) {
            char tmp[512];
            snprintf(tmp, sizeof(tmp), "%.*g", (int)ST_MIN(prec, 100), arg.u.f);
            numeric = true;
            rc = jbuf_put(&sb, tmp, strlen(tmp));
        } else {
            rc = repr ? jv_repr_append(&sb, arg, 0, msg) : jv_str_append(&sb, arg, 0, msg);
            numeric = !repr && (arg.type == JV_INT || arg.type == JV_FLOAT);
            if (rc == 0 && prec >= 0 && !numeric) {
                size_t cut = jinja_utf8_offset(sb.p ? sb.p : "", sb.n, (size_t)prec);
                sb.n = cut;
            }
        }
        if (rc < 0) {
            jbuf_free(&sb);
            if (rc == ST_EINVAL) rc = jinja_fail(r, at, rc, "%s", msg);
            else rc = buf_rc(r, at, rc);
            goto fail;
        }
        size_t ncp = 0;
        for (size_t k = 0; k < sb.n; k++)
            if (((unsigned char)sb.p[k] & 0xC0) != 0x80) ncp++;
        if (!align) align = numeric ? '>' : '<';
        if (zero && numeric && align == '>') fill = '0';
        int64_t pad = width > (int64_t)ncp ? ST_MIN(width - (int64_t)ncp, 4096) : 0;
        int64_t lp = align == '>' ? pad : align == '^' ? pad / 2 : 0, rp = pad - lp;
        for (int64_t k = 0; k < lp && rc == 0; k++) rc = jbuf_putc(&b, fill);
        if (rc == 0) rc = jbuf_put(&b, sb.p ? sb.p : "", sb.n);
        for (int64_t k = 0; k < rp && rc == 0; k++) rc = jbuf_putc(&b, fill);
        jbuf_free(&sb);
        if (rc < 0) goto buf_fail;
    }
    return buf_string(r, at, &b, out);
buf_fail:
    rc = buf_rc(r, at, rc);
fail:
    jbuf_free(&b);
    return rc;
}

/* ---- filters ---- */

#define FILTER(name) static int name(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, struct jv *out)
#define BIND(...)                                                                                               \
    static const char *const names_[] = {__VA_ARGS__, NULL};                                                    \
    struct jv v_[ST_ARRAY_LEN(names_)];                                                                         \
    do {                                                                                                        \
        int brc_ = bind(r, at, fname(at), a, names_, v_);                                                       \
        if (brc_ < 0) return brc_;                                                                              \
    } while (0)
#define NO_ARGS()                                                                                               \
    do {                                                                                                        \
        if (a->n_pos || a->n_kw) return jinja_fail(r, at, ST_EINVAL, "%s takes no arguments", fname(at));       \
    } while (0)

static int str_arg(struct jrender *r, const struct jnode *at, struct jv in, struct jv *s)
{
    return jinja_to_string(r, at, in, s);
}

FILTER(f_abs)
{
    NO_ARGS();
    if (in.type == JV_FLOAT) *out = jv_float(fabs(in.u.f));
    else if (in.type == JV_INT && in.u.i != INT64_MIN) *out = jv_int(in.u.i < 0 ? -in.u.i : in.u.i);
    else if (in.type == JV_BOOL) *out = jv_int(in.u.b);
    else if (in.type == JV_UNDEFINED) return jinja_require_defined(r, at, in);
    else return jinja_fail(r, at, ST_EINVAL, "bad operand type for abs(): '%s'", jv_type_name(in));
    return 0;
}

FILTER(f_attr)
{
    BIND("name");
    int rc;
    if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "attr filter requires a name");
    if ((rc = need_str(r, at, v_[0], "attribute name")) < 0) return rc;
    if (in.type == JV_DICT) {
        /* attributes only: no fallback to items */
        if (jinja_method_find(in, v_[0].u.s->s, NULL) == -2) {
            *out = jv_undefined(NULL);
            return 0;
        }
    }
    return jinja_getattr_tmp(r, at, in, v_[0].u.s->s, out);
}

FILTER(f_batch)
{
    BIND("linecount", "fill_with");
    int64_t n = 0;
    int rc;
    if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "batch requires a line count");
    if ((rc = need_int(r, at, v_[0], "linecount", &n)) < 0) return rc;
    if (n <= 0) return jinja_fail(r, at, ST_EINVAL, "batch line count must be positive");
    struct jv_list *items, *res = NULL, *cur = NULL;
    if ((rc = jinja_iterate(r, at, in, &items)) < 0) return rc;
    if (!(res = jv_list_new(0))) goto oom;
    for (size_t i = 0; i < items->n; i++) {
        if (!cur && !(cur = jv_list_new((size_t)ST_MIN(n, 1024)))) goto oom;
        if (jv_list_push(cur, jv_ref(items->v[i])) < 0) goto oom;
        if ((int64_t)cur->n == n) {
            struct jv_list *c = cur;
            cur = NULL;
            if (jv_list_push(res, jv_from_list(c)) < 0) goto oom;
        }
    }
    if (cur) {
        bool fill = has(v_[1]) && v_[1].type != JV_NONE;
        while (fill && (int64_t)cur->n < n)
            if (jv_list_push(cur, jv_ref(v_[1])) < 0) goto oom;
        struct jv_list *c = cur;
        cur = NULL;
        if (jv_list_push(res, jv_from_list(c)) < 0) goto oom;
    }
    jv_unref(jv_from_list(items));
    res->lazy = true;
    *out = jv_from_list(res);
    return 0;
oom:
    jv_unref(jv_from_list(items));
    if (res) jv_unref(jv_from_list(res));
    if (cur) jv_unref(jv_from_list(cur));
    return nomem(r, at);
}

static int case_filter(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a,
                       enum jinja_case mode, struct jv *out)
{
    NO_ARGS();
    struct jv s;
    int rc = str_arg(r, at, in, &s);
    if (rc < 0) return rc;
    rc = case_convert(r, at, s.u.s->s, s.u.s->len, mode, out);
    jv_unref(s);
    return rc;
}
FILTER(f_lower) { return case_filter(r, at, in, a, JCASE_LOWER, out); }
FILTER(f_upper) { return case_filter(r, at, in, a, JCASE_UPPER, out); }
FILTER(f_capitalize) { return case_filter(r, at, in, a, JCASE_CAPITALIZE, out); }
FILTER(f_title) { return case_filter(r, at, in, a, JCASE_TITLE_FILTER, out); }

static int justify(struct jrender *r, const struct jnode *at, struct jv s, int64_t width, uint32_t fill, char how,
                   struct jv *out)
{
    int64_t n = (int64_t)s.u.s->n_cp;
    if (width <= n) {
        *out = jv_ref(s);
        return 0;
    }
    if ((uint64_t)width > r->lim->max_output_bytes) return buf_rc(r, at, ST_ERANGE);
    int64_t marg = width - n, left;
    if (how == 'c') left = marg / 2 + (marg & width & 1);
    else if (how == 'l') left = 0;
    else left = marg;
    struct jbuf b = {0};
    int rc = 0;
    for (int64_t i = 0; i < left && rc == 0; i++) rc = put_cp(&b, fill);
    if (rc == 0) rc = jbuf_put(&b, s.u.s->s, s.u.s->len);
    for (int64_t i = 0; i < marg - left && rc == 0; i++) rc = put_cp(&b, fill);
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

FILTER(f_center)
{
    BIND("width");
    int64_t w = 80;
    int rc;
    if (has(v_[0]) && (rc = need_int(r, at, v_[0], "width", &w)) < 0) return rc;
    struct jv s;
    if ((rc = str_arg(r, at, in, &s)) < 0) return rc;
    rc = justify(r, at, s, w, ' ', 'c', out);
    jv_unref(s);
    return rc;
}

static int length_of(struct jrender *r, const struct jnode *at, struct jv in, int64_t *n)
{
    switch (in.type) {
    case JV_STRING: *n = (int64_t)in.u.s->n_cp; return 0;
    case JV_LIST:
        if (in.u.l->lazy) return jinja_fail(r, at, ST_EINVAL, "object of type 'generator' has no len()");
        *n = (int64_t)in.u.l->n;
        return 0;
    case JV_DICT: *n = (int64_t)in.u.d->n; return 0;
    case JV_UNDEFINED: *n = 0; return 0;
    default: return jinja_fail(r, at, ST_EINVAL, "object of type '%s' has no len()", jv_type_name(in));
    }
}

FILTER(f_length)
{
    NO_ARGS();
    int64_t n = 0;
    int rc = length_of(r, at, in, &n);
    if (rc == 0) *out = jv_int(n);
    return rc;
}

FILTER(f_default)
{
    BIND("default_value", "boolean");
    bool boolean = has(v_[1]) && jv_truthy(v_[1]);
    if (in.type == JV_UNDEFINED || (boolean && !jv_truthy(in))) {
        if (!has(v_[0])) return jinja_new_string(r, at, "", 0, out);
        *out = jv_ref(v_[0]);
    } else {
        *out = jv_ref(in);
    }
    return 0;
}

FILTER(f_dictsort)
{
    BIND("case_sensitive", "by", "reverse");
    bool cs = has(v_[0]) && jv_truthy(v_[0]), rev = has(v_[2]) && jv_truthy(v_[2]);
    int pos = 0, rc;
    if (has(v_[1])) {
        if (v_[1].type == JV_STRING && !strcmp(v_[1].u.s->s, "key")) pos = 0;
        else if (v_[1].type == JV_STRING && !strcmp(v_[1].u.s->s, "value")) pos = 1;
        else return jinja_fail(r, at, ST_EINVAL, "You can only sort by either \"key\" or \"value\"");
    }
    if (in.type != JV_DICT) return jinja_fail(r, at, ST_EINVAL, "dictsort expects a mapping, not '%s'", jv_type_name(in));
    const struct jv_dict *d = in.u.d;
    struct jv_list *pairs = jv_list_new(d->n);
    if (!pairs) return nomem(r, at);
    for (size_t i = 0; i < d->n; i++) {
        struct jv t;
        if ((rc = new_tuple2(r, at, d->keys[i], d->vals[i], &t)) < 0) {
            jv_unref(jv_from_list(pairs));
            return rc;
        }
        pairs->v[pairs->n++] = t;
    }
    struct jv attr = jv_int(pos);
    rc = sorted_list(r, at, pairs, attr, cs, rev, out);
    jv_unref(jv_from_list(pairs));
    return rc;
}

static int html_escape(struct jrender *r, const struct jnode *at, struct jv in, struct jv *out)
{
    struct jv s;
    int rc = str_arg(r, at, in, &s);
    if (rc < 0) return rc;
    struct jbuf b = {0};
    for (size_t i = 0; i < s.u.s->len && rc == 0; i++) {
        char c = s.u.s->s[i];
        switch (c) {
        case '&': rc = jbuf_put(&b, "&amp;", 5); break;
        case '<': rc = jbuf_put(&b, "&lt;", 4); break;
        case '>': rc = jbuf_put(&b, "&gt;", 4); break;
        case '"': rc = jbuf_put(&b, "&#34;", 5); break;
        case '\'': rc = jbuf_put(&b, "&#39;", 5); break;
        default: rc = jbuf_putc(&b, c);
        }
    }
    jv_unref(s);
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

FILTER(f_escape)
{
    NO_ARGS();
    return html_escape(r, at, in, out);
}

FILTER(f_first)
{
    NO_ARGS();
    struct jv_list *l;
    if (in.type == JV_LIST) {
        *out = in.u.l->n ? jv_ref(in.u.l->v[0]) : jv_undefined(NULL);
        return 0;
    }
    if (in.type == JV_STRING) {
        size_t adv = 0;
        if (in.u.s->len == 0) {
            *out = jv_undefined(NULL);
            return 0;
        }
        jinja_utf8_decode(in.u.s->s, in.u.s->len, &adv);
        return jinja_new_string(r, at, in.u.s->s, adv, out);
    }
    int rc = jinja_iterate(r, at, in, &l);
    if (rc < 0) return rc;
    *out = l->n ? jv_ref(l->v[0]) : jv_undefined(NULL);
    jv_unref(jv_from_list(l));
    return 0;
}

FILTER(f_last)
{
    NO_ARGS();
    struct jv_list *l;
    if (in.type == JV_LIST && in.u.l->lazy) return jinja_fail(r, at, ST_EINVAL, "'generator' object is not reversible");
    if (in.type == JV_LIST) {
        *out = in.u.l->n ? jv_ref(in.u.l->v[in.u.l->n - 1]) : jv_undefined(NULL);
        return 0;
    }
    int rc = jinja_iterate(r, at, in, &l);
    if (rc < 0) return rc;
    *out = l->n ? jv_ref(l->v[l->n - 1]) : jv_undefined(NULL);
    jv_unref(jv_from_list(l));
    return 0;
}

/* Python float(str): surrounding whitespace allowed, underscores between digits, inf/nan. */
static bool parse_py_float(const char *s, size_t len, double *out)
{
    char tmp[128];
    size_t n = 0, i = 0;
    while (i < len && jinja_py_isspace((unsigned char)s[i])) i++;
    while (len > i && jinja_py_isspace((unsigned char)s[len - 1])) len--;
    if (i == len || len - i >= sizeof(tmp)) return false;
    for (; i < len; i++) {
        char c = s[i];
        if (c == '_') {
            if (n == 0 || i + 1 >= len || !(tmp[n - 1] >= '0' && tmp[n - 1] <= '9') || !(s[i + 1] >= '0' && s[i + 1] <= '9'))
                return false;
            continue;
        }
        if (c == 'x' || c == 'X' || c == 'p' || c == 'P') return false;
        tmp[n++] = c;
    }
    tmp[n] = 0;
    char *end;
    *out = strtod(tmp, &end);
    return end == tmp + n;
}

static bool parse_py_int(const char *s, size_t len, int base, int64_t *out)
{
    size_t i = 0;
    while (i < len && jinja_py_isspace((unsigned char)s[i])) i++;
    while (len > i && jinja_py_isspace((unsigned char)s[len - 1])) len--;
    bool neg = false;
    if (i < len && (s[i] == '+' || s[i] == '-')) neg = s[i++] == '-';
    if (i + 1 < len && s[i] == '0') {
        char k = (char)(s[i + 1] | 0x20);
        if ((k == 'x' && base == 16) || (k == 'o' && base == 8) || (k == 'b' && base == 2)) i += 2;
    }
    if (i >= len) return false;
    uint64_t acc = 0;
    bool any = false;
    for (; i < len; i++) {
        char c = s[i];
        if (c == '_' && any && i + 1 < len) continue;
        int d = (c >= '0' && c <= '9') ? c - '0' : ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') ? (c | 0x20) - 'a' + 10 : 99;
        if (d >= base) return false;
        if (acc > (UINT64_MAX - (uint64_t)d) / (uint64_t)base) return false;
        acc = acc * (uint64_t)base + (uint64_t)d;
        any = true;
    }
    if (acc > (uint64_t)INT64_MAX + (neg ? 1 : 0)) return false;
    *out = neg ? (int64_t)(0 - acc) : (int64_t)acc;
    return any;
}

FILTER(f_float)
{
    BIND("default");
    double d;
    if (in.type == JV_FLOAT) *out = in;
    else if (in.type == JV_INT) *out = jv_float((double)in.u.i);
    else if (in.type == JV_BOOL) *out = jv_float(in.u.b);
    else if (in.type == JV_STRING && parse_py_float(in.u.s->s, in.u.s->len, &d)) *out = jv_float(d);
    else *out = has(v_[0]) ? jv_ref(v_[0]) : jv_float(0.0);
    return 0;
}

FILTER(f_int)
{
    BIND("default", "base");
    int64_t base = 10, iv;
    double d;
    int rc;
    if (has(v_[1]) && (rc = need_int(r, at, v_[1], "base", &base)) < 0) return rc;
    if (base < 2 || base > 36) base = 10;
    if (in.type == JV_INT) *out = in;
    else if (in.type == JV_BOOL) *out = jv_int(in.u.b);
    else if (in.type == JV_FLOAT && isfinite(in.u.f) && fabs(in.u.f) < 9.2e18) *out = jv_int((int64_t)in.u.f);
    else if (in.type == JV_STRING && parse_py_int(in.u.s->s, in.u.s->len, (int)base, &iv)) *out = jv_int(iv);
    else if (in.type == JV_STRING && parse_py_float(in.u.s->s, in.u.s->len, &d) && isfinite(d) && fabs(d) < 9.2e18)
        *out = jv_int((int64_t)d);
    else *out = has(v_[0]) ? jv_ref(v_[0]) : jv_int(0);
    return 0;
}

FILTER(f_format)
{
    struct jv s, args;
    int rc;
    if (a->n_pos && a->n_kw) return jinja_fail(r, at, ST_EINVAL, "can't handle positional and keyword arguments at the same time");
    if ((rc = str_arg(r, at, in, &s)) < 0) return rc;
    if (a->n_kw) {
        struct jv_dict *d = jv_dict_new();
        if (!d) {
            jv_unref(s);
            return nomem(r, at);
        }
        for (int k = 0; k < a->n_kw && rc == 0; k++) {
            struct jv key;
            if ((rc = jinja_new_string(r, at, a->kw_names[k], strlen(a->kw_names[k]), &key)) < 0) break;
            if ((rc = jv_dict_set(d, key, jv_ref(a->kw[k]))) < 0) rc = nomem(r, at);
        }
        args = jv_from_dict(d);
    } else {
        struct jv_list *l = jv_list_new((size_t)a->n_pos);
        if (!l) {
            jv_unref(s);
            return nomem(r, at);
        }
        l->tuple = true;
        for (int k = 0; k < a->n_pos; k++) l->v[l->n++] = jv_ref(a->pos[k]);
        args = jv_from_list(l);
    }
    if (rc == 0) rc = jinja_format_percent(r, at, s, args, out);
    jv_unref(args);
    jv_unref(s);
    return rc;
}

FILTER(f_indent)
{
    BIND("width", "first", "blank");
    struct jv s;
    int rc;
    const char *ind = "    ";
    size_t ind_len = 4;
    char spaces[256];
    if (has(v_[0])) {
        if (v_[0].type == JV_STRING) {
            ind = v_[0].u.s->s;
            ind_len = v_[0].u.s->len;
        } else {
            int64_t w = 0;
            if ((rc = need_int(r, at, v_[0], "width", &w)) < 0) return rc;
            if (w < 0) w = 0;
            if (w > (int64_t)sizeof(spaces)) return jinja_fail(r, at, ST_EINVAL, "indent width too large");
            memset(spaces, ' ', (size_t)w);
            ind = spaces;
            ind_len = (size_t)w;
        }
    }
    bool first = has(v_[1]) && jv_truthy(v_[1]), blank = has(v_[2]) && jv_truthy(v_[2]);
    if ((rc = str_arg(r, at, in, &s)) < 0) return rc;
    /* s += "\n"; lines = s.splitlines() (Python line boundaries) */
    const char *p = s.u.s->s;
    size_t len = s.u.s->len, i = 0, line_no = 0;
    struct jbuf b = {0};
    if (first) rc = jbuf_put(&b, ind, ind_len);
    for (;;) {
        /* find the end of the line at i; the appended "\n" ends the last one */
        size_t j = i, next;
        for (;;) {
            if (j >= len) {
                next = len + 1;
                break;
            }
            size_t adv;
            uint32_t cp = jinja_utf8_decode(p + j, len - j, &adv);
            if (cp == '\r' && j + 1 < len && p[j + 1] == '\n') {
                next = j + 2;
                break;
            }
            if (cp == '\n' || cp == '\r' || cp == 0x0b || cp == 0x0c || cp == 0x1c || cp == 0x1d || cp == 0x1e ||
                cp == 0x85 || cp == 0x2028 || cp == 0x2029) {
                next = j + adv;
                break;
            }
            j += adv;
        }
        if (rc < 0) break;
        if (line_no > 0) {
            if ((rc = jbuf_putc(&b, '\n')) < 0) break;
            if ((blank || j > i) && (rc = jbuf_put(&b, ind, ind_len)) < 0) break;
        }
        if ((rc = jbuf_put(&b, p + i, j - i)) < 0) break;
        line_no++;
        if (next > len) break;
        i = next;
        if (i >= len) {
            /* the appended newline ended the text right after a line break: one more empty line */
            if (j + 0 < len) {
                /* s ended with a line break: splitlines of s+"\n" gives a final empty line */
                if ((rc = jbuf_putc(&b, '\n')) < 0) break;
                if (blank && (rc = jbuf_put(&b, ind, ind_len)) < 0) break;
            }
            break;
        }
    }
    jv_unref(s);
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

FILTER(f_items)
{
    NO_ARGS();
    if (in.type == JV_UNDEFINED) {
        struct jv_list *l = jv_list_new(0);
        if (!l) return nomem(r, at);
        l->lazy = true;
        *out = jv_from_list(l);
        return 0;
    }
    if (in.type != JV_DICT) return jinja_fail(r, at, ST_EINVAL, "Can only get item pairs from a mapping.");
    struct jv_list *l = jv_list_new(in.u.d->n);
    if (!l) return nomem(r, at);
    for (size_t i = 0; i < in.u.d->n; i++) {
        int rc = new_tuple2(r, at, in.u.d->keys[i], in.u.d->vals[i], &l->v[l->n]);
        if (rc < 0) {
            jv_unref(jv_from_list(l));
            return rc;
        }
        l->n++;
    }
    l->lazy = true;
    *out = jv_from_list(l);
    return 0;
}

static int join_items(struct jrender *r, const struct jnode *at, struct jv_list *items, const char *sep, size_t sep_len,
                      struct jv attribute, bool strict, struct jv *out)
{
    struct jbuf b = {0};
    char msg[ST_ERR_LEN];
    int rc = 0;
    for (size_t i = 0; i < items->n && rc == 0; i++) {
        struct jv v;
        if ((rc = attr_key(r, at, items->v[i], attribute, false, false, &v)) < 0) break;
        if (strict && v.type != JV_STRING) {
            rc = jinja_fail(r, at, ST_EINVAL, "sequence item %zu: expected str instance, %s found", i, jv_type_name(v));
            jv_unref(v);
            break;
        }
        if (i && (rc = jbuf_put(&b, sep, sep_len)) < 0) {
            jv_unref(v);
            rc = buf_rc(r, at, rc);
            break;
        }
        rc = jv_str_append(&b, v, 0, msg);
        jv_unref(v);
        if (rc == ST_EINVAL) rc = jinja_fail(r, at, rc, "%s", msg);
        else if (rc < 0) rc = buf_rc(r, at, rc);
    }
    if (rc < 0) {
        jbuf_free(&b);
        return rc;
    }
    return buf_string(r, at, &b, out);
}

FILTER(f_join)
{
    BIND("d", "attribute");
    struct jv sep = jv_none();
    struct jv_list *items;
    int rc;
    if (has(v_[0]) && (rc = jinja_to_string(r, at, v_[0], &sep)) < 0) return rc;
    if ((rc = jinja_iterate(r, at, in, &items)) == 0) {
        rc = join_items(r, at, items, sep.type == JV_STRING ? sep.u.s->s : "", sep.type == JV_STRING ? sep.u.s->len : 0,
                        v_[1], false, out);
        jv_unref(jv_from_list(items));
    }
    jv_unref(sep);
    return rc;
}

FILTER(f_list)
{
    NO_ARGS();
    struct jv_list *items;
    int rc = jinja_iterate(r, at, in, &items);
    if (rc < 0) return rc;
    if (!items->tuple && !items->lazy && in.type != JV_LIST) {
        *out = jv_from_list(items);
        return 0;
    }
    struct jv_list *l = jv_list_new(items->n);
    if (!l) {
        jv_unref(jv_from_list(items));
        return nomem(r, at);
    }
    for (size_t i = 0; i < items->n; i++) l->v[l->n++] = jv_ref(items->v[i]);
    jv_unref(jv_from_list(items));
    *out = jv_from_list(l);
    return 0;
}

/* Calls the filter or test named name (map('upper'), select('odd')). */
static int call_named(struct jrender *r, const struct jnode *at, bool test, struct jv name, struct jv item,
                      const struct jargs *rest, struct jv *out)
{
    if (name.type != JV_STRING) return jinja_fail(r, at, ST_EINVAL, "%s name must be a string", test ? "test" : "filter");
    if (test) {
        jinja_test_fn t = jinja_test_find(name.u.s->s);
        if (!t) return jinja_fail(r, at, ST_EUNSUPPORTED, "unsupported test '%s'", name.u.s->s);
        bool b = false;
        int rc = t(r, at, item, rest, &b);
        if (rc == 0) *out = jv_bool(b);
        return rc;
    }
    jinja_filter_fn f = jinja_filter_find(name.u.s->s);
    if (!f) return jinja_fail(r, at, ST_EUNSUPPORTED, "unsupported filter '%s'", name.u.s->s);
    return f(r, at, item, rest, out);
}

FILTER(f_map)
{
    struct jv_list *items, *res;
    int rc;
    if ((rc = jinja_iterate(r, at, in, &items)) < 0) return rc;
    if (!(res = jv_list_new(items->n))) {
        jv_unref(jv_from_list(items));
        return nomem(r, at);
    }
    bool by_attr = a->n_pos == 0;
    struct jv attribute = MISSING, dflt = MISSING;
    if (by_attr) {
        for (int k = 0; k < a->n_kw; k++) {
            if (!strcmp(a->kw_names[k], "attribute")) attribute = a->kw[k];
            else if (!strcmp(a->kw_names[k], "default")) dflt = a->kw[k];
            else {
                rc = jinja_fail(r, at, ST_EINVAL, "Unexpected keyword argument '%s'", a->kw_names[k]);
                goto done;
            }
        }
        if (!has(attribute)) {
            rc = jinja_fail(r, at, ST_EINVAL, "map requires a filter argument");
            goto done;
        }
    }
    struct jargs rest = {.n_pos = a->n_pos ? a->n_pos - 1 : 0, .pos = a->pos + (a->n_pos ? 1 : 0),
                         .n_kw = a->n_kw, .kw_names = a->kw_names, .kw = a->kw};
    for (size_t i = 0; i < items->n; i++) {
        struct jv v;
        if (by_attr) {
            rc = attr_key(r, at, items->v[i], attribute, false, false, &v);
            if (rc == 0 && v.type == JV_UNDEFINED && has(dflt) && dflt.type != JV_NONE) {
                v = jv_ref(dflt);
            }
        } else {
            rc = call_named(r, at, false, a->pos[0], items->v[i], &rest, &v);
        }
        if (rc < 0) goto done;
        res->v[res->n++] = v;
    }
done:
    jv_unref(jv_from_list(items));
    if (rc < 0) {
        jv_unref(jv_from_list(res));
        return rc;
    }
    res->lazy = true;
    *out = jv_from_list(res);
    return 0;
}

static int select_common(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, bool attr,
                         bool keep_if, struct jv *out)
{
    struct jv_list *items, *res;
    int rc;
    if (attr && a->n_pos == 0) return jinja_fail(r, at, ST_EINVAL, "Missing parameter for attribute name");
    if ((rc = jinja_iterate(r, at, in, &items)) < 0) return rc;
    if (!(res = jv_list_new(0))) {
        jv_unref(jv_from_list(items));
        return nomem(r, at);
    }
    int off = attr ? 1 : 0;
    bool have_test = a->n_pos > off;
    struct jargs rest = {.n_pos = have_test ? a->n_pos - off - 1 : 0, .pos = a->pos + off + (have_test ? 1 : 0),
                         .n_kw = a->n_kw, .kw_names = a->kw_names, .kw = a->kw};
    for (size_t i = 0; i < items->n; i++) {
        struct jv v, t;
        if (attr) rc = attr_key(r, at, items->v[i], a->pos[0], false, false, &v);
        else v = jv_ref(items->v[i]), rc = 0;
        if (rc < 0) break;
        if (have_test) {
            rc = call_named(r, at, true, a->pos[off], v, &rest, &t);
        } else {
            t = jv_bool(jv_truthy(v));
        }
        jv_unref(v);
        if (rc < 0) break;
        if (jv_truthy(t) == keep_if && (rc = jv_list_push(res, jv_ref(items->v[i]))) < 0) {
            rc = nomem(r, at);
            break;
        }
    }
    jv_unref(jv_from_list(items));
    if (rc < 0) {
        jv_unref(jv_from_list(res));
        return rc;
    }
    res->lazy = true;
    *out = jv_from_list(res);
    return 0;
}
FILTER(f_select) { return select_common(r, at, in, a, false, true, out); }
FILTER(f_reject) { return select_common(r, at, in, a, false, false, out); }
FILTER(f_selectattr) { return select_common(r, at, in, a, true, true, out); }
FILTER(f_rejectattr) { return select_common(r, at, in, a, true, false, out); }

static int min_max(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, bool want_max,
                   struct jv *out)
{
    BIND("case_sensitive", "attribute");
    struct jv_list *items;
    int rc;
    if ((rc = jinja_iterate(r, at, in, &items)) < 0) return rc;
    if (items->n == 0) {
        jv_unref(jv_from_list(items));
        *out = jv_undefined(NULL);
        return 0;
    }
    bool cs = has(v_[0]) && jv_truthy(v_[0]);
    size_t best = 0;
    struct jv best_key;
    if ((rc = attr_key(r, at, items->v[0], v_[1], false, !cs, &best_key)) < 0) goto done;
    for (size_t i = 1; i < items->n; i++) {
        struct jv k;
        int c;
        if ((rc = attr_key(r, at, items->v[i], v_[1], false, !cs, &k)) < 0) break;
        if ((rc = jinja_compare(r, at, k, best_key, &c)) < 0) {
            jv_unref(k);
            break;
        }
        if (want_max ? c > 0 : c < 0) {
            jv_unref(best_key);
            best_key = k;
            best = i;
        } else {
            jv_unref(k);
        }
    }
    jv_unref(best_key);
    if (rc == 0) *out = jv_ref(items->v[best]);
done:
    jv_unref(jv_from_list(items));
    return rc;
}
FILTER(f_max) { return min_max(r, at, in, a, true, out); }
FILTER(f_min) { return min_max(r, at, in, a, false, out); }

FILTER(f_replace)
{
    BIND("old", "new", "count");
    struct jv s, o, n;
    int64_t count = -1;
    int rc;
    if (!has(v_[0]) || !has(v_[1])) return jinja_fail(r, at, ST_EINVAL, "replace requires old and new");
    if (has(v_[2]) && v_[2].type != JV_NONE && (rc = need_int(r, at, v_[2], "count", &count)) < 0) return rc;
    if ((rc = str_arg(r, at, in, &s)) < 0) return rc;
    if ((rc = jinja_to_string(r, at, v_[0], &o)) < 0) {
        jv_unref(s);
        return rc;
    }
    if ((rc = jinja_to_string(r, at, v_[1], &n)) == 0) {
        rc = do_replace(r, at, s, o, n, count, out);
        jv_unref(n);
    }
    jv_unref(o);
    jv_unref(s);
    return rc;
}

FILTER(f_reverse)
{
    NO_ARGS();
    if (in.type == JV_STRING) {
        struct jv_list *chars;
        int rc = jinja_iterate(r, at, in, &chars);
        if (rc < 0) return rc;
        struct jbuf b = {0};
        for (size_t i = chars->n; i > 0 && rc == 0; i--) rc = jbuf_put(&b, chars->v[i - 1].u.s->s, chars->v[i - 1].u.s->len);
        jv_unref(jv_from_list(chars));
        if (rc < 0) {
            jbuf_free(&b);
            return buf_rc(r, at, rc);
        }
        return buf_string(r, at, &b, out);
    }
    struct jv_list *items;
    int rc = jinja_iterate(r, at, in, &items);
    if (rc < 0) return rc;
    struct jv_list *l = jv_list_new(items->n);
    if (!l) {
        jv_unref(jv_from_list(items));
        return nomem(r, at);
    }
    for (size_t i = items->n; i > 0; i--) l->v[l->n++] = jv_ref(items->v[i - 1]);
    jv_unref(jv_from_list(items));
    l->lazy = true; /* reversed(): an iterator */
    *out = jv_from_list(l);
    return 0;
}

FILTER(f_round)
{
    BIND("precision", "method");
    int64_t prec = 0;
    int rc;
    if (has(v_[0]) && (rc = need_int(r, at, v_[0], "precision", &prec)) < 0) return rc;
    const char *method = "common";
    if (has(v_[1])) {
        if (v_[1].type != JV_STRING ||
            (strcmp(v_[1].u.s->s, "common") && strcmp(v_[1].u.s->s, "ceil") && strcmp(v_[1].u.s->s, "floor")))
            return jinja_fail(r, at, ST_EINVAL, "method must be common, ceil or floor");
        method = v_[1].u.s->s;
    }
    if (in.type == JV_UNDEFINED) return jinja_require_defined(r, at, in);
    if (in.type != JV_INT && in.type != JV_FLOAT && in.type != JV_BOOL)
        return jinja_fail(r, at, ST_EINVAL, "round() needs a number, not '%s'", jv_type_name(in));
    if (prec > 300) prec = 300;
    if (prec < -300) prec = -300;
    if (!strcmp(method, "common")) {
        if (in.type != JV_FLOAT) {
            /* round(int, n) stays an int (n >= 0) */
            int64_t v = in.type == JV_INT ? in.u.i : in.u.b;
            if (prec >= 0) {
                *out = jv_int(v);
                return 0;
            }
            double p = pow(10.0, (double)-prec), q = (double)v / p, fl = floor(q);
            double rq = (q - fl > 0.5 || (q - fl == 0.5 && fmod(fl, 2.0) != 0)) ? fl + 1 : fl;
            *out = jv_int((int64_t)(rq * p));
            return 0;
        }
        double x = in.u.f;
        if (!isfinite(x)) {
            *out = in;
            return 0;
        }
        if (prec == 0) {
            *out = jv_float(nearbyint(x));
            return 0;
        }
        if (prec > 0) {
            /* correctly rounded half-even on the exact binary value, like Python's round() */
            char tmp[400];
            snprintf(tmp, sizeof(tmp), "%.*f", (int)prec, x);
            *out = jv_float(strtod(tmp, NULL));
            return 0;
        }
        double p = pow(10.0, (double)-prec);
        *out = jv_float(nearbyint(x / p) * p);
        return 0;
    }
    double x = in.type == JV_FLOAT ? in.u.f : (double)(in.type == JV_INT ? in.u.i : in.u.b);
    double p = pow(10.0, (double)prec);
    *out = jv_float((!strcmp(method, "ceil") ? ceil(x * p) : floor(x * p)) / p);
    return 0;
}

FILTER(f_safe)
{
    NO_ARGS();
    return jinja_to_string(r, at, in, out);
}

FILTER(f_sort)
{
    BIND("reverse", "case_sensitive", "attribute");
    struct jv_list *items;
    int rc = jinja_iterate(r, at, in, &items);
    if (rc < 0) return rc;
    rc = sorted_list(r, at, items, v_[2], has(v_[1]) && jv_truthy(v_[1]), has(v_[0]) && jv_truthy(v_[0]), out);
    jv_unref(jv_from_list(items));
    return rc;
}

FILTER(f_string)
{
    NO_ARGS();
    return jinja_to_string(r, at, in, out);
}

FILTER(f_sum)
{
    BIND("attribute", "start");
    struct jv_list *items;
    int rc = jinja_iterate(r, at, in, &items);
    if (rc < 0) return rc;
    struct jv acc = has(v_[1]) ? jv_ref(v_[1]) : jv_int(0);
    for (size_t i = 0; i < items->n && rc == 0; i++) {
        struct jv v;
        if ((rc = attr_key(r, at, items->v[i], v_[0], false, false, &v)) < 0) break;
        if (!((acc.type == JV_INT || acc.type == JV_FLOAT || acc.type == JV_BOOL) &&
              (v.type == JV_INT || v.type == JV_FLOAT || v.type == JV_BOOL))) {
            rc = jinja_fail(r, at, ST_EINVAL, "unsupported operand type(s) for +: '%s' and '%s'", jv_type_name(acc),
                            jv_type_name(v));
            jv_unref(v);
            break;
        }
        if (acc.type == JV_FLOAT || v.type == JV_FLOAT) {
            double x = acc.type == JV_FLOAT ? acc.u.f : (double)(acc.type == JV_INT ? acc.u.i : acc.u.b);
            double y = v.type == JV_FLOAT ? v.u.f : (double)(v.type == JV_INT ? v.u.i : v.u.b);
            acc = jv_float(x + y);
        } else {
            int64_t x = acc.type == JV_INT ? acc.u.i : acc.u.b, y = v.type == JV_INT ? v.u.i : v.u.b, z;
            if (__builtin_add_overflow(x, y, &z)) rc = jinja_fail(r, at, ST_ERANGE, "integer overflow");
            acc = jv_int(z);
        }
    }
    jv_unref(jv_from_list(items));
    if (rc < 0) {
        jv_unref(acc);
        return rc;
    }
    *out = acc;
    return 0;
}

FILTER(f_tojson)
{
    BIND("ensure_ascii", "indent", "separators", "sort_keys");
    return to_json(r, at, in, has(v_[0]) && jv_truthy(v_[0]), v_[1], v_[2], has(v_[3]) && jv_truthy(v_[3]), out);
}

FILTER(f_trim)
{
    BIND("chars");
    struct jv s;
    int rc = str_arg(r, at, in, &s);
    if (rc < 0) return rc;
    rc = do_strip(r, at, s, v_[0], 3, out);
    jv_unref(s);
    return rc;
}

FILTER(f_truncate)
{
    BIND("length", "killwords", "end", "leeway");
    int64_t length = 255, leeway = 5;
    int rc;
    if (has(v_[0]) && (rc = need_int(r, at, v_[0], "length", &length)) < 0) return rc;
    if (has(v_[3]) && v_[3].type != JV_NONE && (rc = need_int(r, at, v_[3], "leeway", &leeway)) < 0) return rc;
    struct jv s;
    if (has(v_[2]) && (rc = need_str(r, at, v_[2], "end")) < 0) return rc;
    const char *e = has(v_[2]) ? v_[2].u.s->s : "...";
    size_t el = has(v_[2]) ? v_[2].u.s->len : 3, ecp = has(v_[2]) ? v_[2].u.s->n_cp : 3;
    if (length < (int64_t)ecp || leeway < 0) return jinja_fail(r, at, ST_EINVAL, "invalid truncate arguments");
    if ((rc = str_arg(r, at, in, &s)) < 0) return rc;
    if ((int64_t)s.u.s->n_cp <= length + leeway) {
        *out = s;
        return 0;
    }
    size_t cut = jinja_utf8_offset(s.u.s->s, s.u.s->len, (size_t)(length - (int64_t)ecp));
    if (!(has(v_[1]) && jv_truthy(v_[1]))) {
        const char *sp = rfind_bytes(s.u.s->s, cut, " ", 1);
        if (sp) cut = (size_t)(sp - s.u.s->s);
    }
    struct jbuf b = {0};
    if ((rc = jbuf_put(&b, s.u.s->s, cut)) == 0) rc = jbuf_put(&b, e, el);
    jv_unref(s);
    if (rc < 0) {
        jbuf_free(&b);
        return buf_rc(r, at, rc);
    }
    return buf_string(r, at, &b, out);
}

FILTER(f_unique)
{
    BIND("case_sensitive", "attribute");
    struct jv_list *items, *res = NULL;
    struct jv_dict *seen = NULL;
    int rc = jinja_iterate(r, at, in, &items);
    if (rc < 0) return rc;
    bool cs = has(v_[0]) && jv_truthy(v_[0]);
    if (!(res = jv_list_new(0)) || !(seen = jv_dict_new())) {
        rc = nomem(r, at);
        goto done;
    }
    for (size_t i = 0; i < items->n; i++) {
        struct jv k;
        if ((rc = attr_key(r, at, items->v[i], v_[1], false, !cs, &k)) < 0) break;
        if ((rc = jinja_charge(r, at, JINJA_ITEM_COST)) < 0 || jv_dict_get(seen, k)) {
            jv_unref(k);
            if (rc < 0) break;
            continue;
        }
        if (jv_dict_set(seen, k, jv_none()) < 0 || jv_list_push(res, jv_ref(items->v[i])) < 0) {
            rc = nomem(r, at);
            break;
        }
    }
done:
    jv_unref(jv_from_list(items));
    if (seen) jv_unref(jv_from_dict(seen));
    if (rc < 0) {
        if (res) jv_unref(jv_from_list(res));
        return rc;
    }
    res->lazy = true;
    *out = jv_from_list(res);
    return 0;
}

FILTER(f_wordcount)
{
    NO_ARGS();
    struct jv s = jv_none();
    int rc = str_arg(r, at, in, &s);
    if (rc == 0) rc = jinja_charge(r, at, (uint64_t)s.u.s->len * JINJA_UNICODE_COST);
    if (rc < 0) {
        jv_unref(s);
        return rc;
    }
    int64_t n = 0;
    bool in_word = false;
    for (size_t i = 0; i < s.u.s->len;) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s.u.s->s + i, s.u.s->len - i, &adv);
        bool w = is_word(cp);
        if (w && !in_word) n++;
        in_word = w;
        i += adv;
    }
    jv_unref(s);
    *out = jv_int(n);
    return 0;
}

static const struct {
    const char *name;
    jinja_filter_fn fn;
} filters[] = {
    {"abs", f_abs}, {"attr", f_attr}, {"batch", f_batch}, {"capitalize", f_capitalize}, {"center", f_center},
    {"count", f_length}, {"d", f_default}, {"default", f_default}, {"dictsort", f_dictsort}, {"e", f_escape},
    {"escape", f_escape}, {"first", f_first}, {"float", f_float}, {"forceescape", f_escape}, {"format", f_format},
    {"indent", f_indent}, {"int", f_int}, {"items", f_items}, {"join", f_join}, {"last", f_last},
    {"length", f_length}, {"list", f_list}, {"lower", f_lower}, {"map", f_map}, {"max", f_max}, {"min", f_min},
    {"reject", f_reject}, {"rejectattr", f_rejectattr}, {"replace", f_replace}, {"reverse", f_reverse},
    {"round", f_round}, {"safe", f_safe}, {"select", f_select}, {"selectattr", f_selectattr}, {"sort", f_sort},
    {"string", f_string}, {"sum", f_sum}, {"title", f_title}, {"tojson", f_tojson}, {"trim", f_trim},
    {"truncate", f_truncate}, {"unique", f_unique}, {"upper", f_upper}, {"wordcount", f_wordcount},
};

jinja_filter_fn jinja_filter_find(const char *name)
{
    for (size_t i = 0; i < ST_ARRAY_LEN(filters); i++)
        if (!strcmp(filters[i].name, name)) return filters[i].fn;
    return NULL;
}

/* ---- tests ---- */

#define TEST(name) static int name(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, bool *out)

static int one_arg(struct jrender *r, const struct jnode *at, const struct jargs *a, struct jv *v)
{
    if (a->n_pos + a->n_kw != 1) return jinja_fail(r, at, ST_EINVAL, "test '%s' takes one argument", fname(at));
    *v = a->n_pos ? a->pos[0] : a->kw[0];
    return 0;
}

static bool is_int_like(struct jv v) { return v.type == JV_INT || v.type == JV_BOOL; }

TEST(t_defined) { NO_ARGS(); *out = in.type != JV_UNDEFINED; return 0; }
TEST(t_undefined) { NO_ARGS(); *out = in.type == JV_UNDEFINED; return 0; }
TEST(t_none) { NO_ARGS(); *out = in.type == JV_NONE; return 0; }
TEST(t_boolean) { NO_ARGS(); *out = in.type == JV_BOOL; return 0; }
TEST(t_true) { NO_ARGS(); *out = in.type == JV_BOOL && in.u.b; return 0; }
TEST(t_false) { NO_ARGS(); *out = in.type == JV_BOOL && !in.u.b; return 0; }
TEST(t_integer) { NO_ARGS(); *out = in.type == JV_INT; return 0; }
TEST(t_float) { NO_ARGS(); *out = in.type == JV_FLOAT; return 0; }
TEST(t_number) { NO_ARGS(); *out = in.type == JV_INT || in.type == JV_FLOAT || in.type == JV_BOOL; return 0; }
TEST(t_string) { NO_ARGS(); *out = in.type == JV_STRING; return 0; }
TEST(t_mapping) { NO_ARGS(); *out = in.type == JV_DICT; return 0; }
TEST(t_iterable)
{
    NO_ARGS();
    *out = in.type == JV_STRING || in.type == JV_LIST || in.type == JV_DICT || in.type == JV_UNDEFINED;
    return 0;
}
TEST(t_sequence)
{
    NO_ARGS();
    *out = in.type == JV_STRING || (in.type == JV_LIST && !in.u.l->lazy) || in.type == JV_DICT || in.type == JV_UNDEFINED;
    return 0;
}
TEST(t_callable)
{
    NO_ARGS();
    *out = in.type == JV_CALLABLE || in.type == JV_LOOP || in.type == JV_UNDEFINED; /* Undefined has __call__ */
    return 0;
}
TEST(t_escaped) { NO_ARGS(); *out = false; return 0; }

/* `'s' is even` runs Python's 's' % 2 == 0: string formatting, which is never equal to 0 (or raises). */
static int str_mod_zero(struct jrender *r, const struct jnode *at, struct jv s, struct jv arg, bool *out)
{
    struct jv tmp;
    int rc = jinja_format_percent(r, at, s, arg, &tmp);
    if (rc < 0) return rc;
    jv_unref(tmp);
    *out = false;
    return 0;
}

static int parity(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, int want, bool *out)
{
    NO_ARGS();
    if (in.type == JV_STRING) return str_mod_zero(r, at, in, jv_int(2), out);
    if (is_int_like(in)) *out = ((in.type == JV_INT ? in.u.i : in.u.b) & 1) == want;
    else if (in.type == JV_FLOAT) *out = fmod(fabs(in.u.f), 2.0) == (double)want;
    else if (in.type == JV_UNDEFINED) return jinja_require_defined(r, at, in);
    else return jinja_fail(r, at, ST_EINVAL, "unsupported operand type for %%: '%s'", jv_type_name(in));
    return 0;
}
TEST(t_odd) { return parity(r, at, in, a, 1, out); }
TEST(t_even) { return parity(r, at, in, a, 0, out); }

TEST(t_divisibleby)
{
    struct jv n;
    int rc = one_arg(r, at, a, &n);
    if (rc < 0) return rc;
    if (in.type == JV_STRING) return str_mod_zero(r, at, in, n, out);
    if (is_int_like(in) && is_int_like(n)) {
        int64_t x = in.type == JV_INT ? in.u.i : in.u.b, y = n.type == JV_INT ? n.u.i : n.u.b;
        if (y == 0) return jinja_fail(r, at, ST_EINVAL, "integer division or modulo by zero");
        *out = y == -1 || x % y == 0;
        return 0;
    }
    if ((is_int_like(in) || in.type == JV_FLOAT) && (is_int_like(n) || n.type == JV_FLOAT)) {
        double x = in.type == JV_FLOAT ? in.u.f : (double)(in.type == JV_INT ? in.u.i : in.u.b);
        double y = n.type == JV_FLOAT ? n.u.f : (double)(n.type == JV_INT ? n.u.i : n.u.b);
        if (y == 0) return jinja_fail(r, at, ST_EINVAL, "float modulo");
        *out = fmod(x, y) == 0;
        return 0;
    }
    return jinja_fail(r, at, ST_EINVAL, "divisibleby needs numbers");
}

static int cmp_test(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, int op, bool *out)
{
    struct jv o;
    int rc = one_arg(r, at, a, &o), c;
    if (rc < 0) return rc;
    if (op == 0) {
        *out = jv_equal(in, o, 0);
        return 0;
    }
    if (op == 1) {
        *out = !jv_equal(in, o, 0);
        return 0;
    }
    if (in.type == JV_UNDEFINED) return jinja_require_defined(r, at, in);
    if (o.type == JV_UNDEFINED) return jinja_require_defined(r, at, o);
    if ((rc = jinja_compare(r, at, in, o, &c)) < 0) return rc;
    *out = op == 2 ? c < 0 : op == 3 ? c <= 0 : op == 4 ? c > 0 : c >= 0;
    return 0;
}
TEST(t_eq) { return cmp_test(r, at, in, a, 0, out); }
TEST(t_ne) { return cmp_test(r, at, in, a, 1, out); }
TEST(t_lt) { return cmp_test(r, at, in, a, 2, out); }
TEST(t_le) { return cmp_test(r, at, in, a, 3, out); }
TEST(t_gt) { return cmp_test(r, at, in, a, 4, out); }
TEST(t_ge) { return cmp_test(r, at, in, a, 5, out); }

TEST(t_sameas)
{
    struct jv o = jv_none();
    int rc = one_arg(r, at, a, &o);
    if (rc < 0) return rc;
    if (in.type != o.type) *out = false;
    else if (in.type == JV_NONE || in.type == JV_UNDEFINED) *out = true;
    else if (in.type == JV_BOOL) *out = in.u.b == o.u.b;
    else if (in.type == JV_INT) *out = in.u.i == o.u.i && in.u.i >= -5 && in.u.i <= 256; /* CPython small ints */
    else if (in.type == JV_FLOAT) *out = false;
    else *out = in.u.s == o.u.s;
    return 0;
}

TEST(t_in)
{
    struct jv seq;
    int rc = one_arg(r, at, a, &seq);
    if (rc < 0) return rc;
    if (seq.type == JV_STRING) {
        if (in.type != JV_STRING)
            return jinja_fail(r, at, ST_EINVAL, "'in <string>' requires string as left operand, not %s", jv_type_name(in));
        *out = in.u.s->len == 0 || jv_find(seq.u.s->s, seq.u.s->len, in.u.s->s, in.u.s->len) != NULL;
    } else if (seq.type == JV_LIST) {
        *out = false;
        for (size_t i = 0; i < seq.u.l->n && !*out; i++) *out = jv_equal(in, seq.u.l->v[i], 0);
    } else if (seq.type == JV_DICT) {
        *out = jv_dict_get(seq.u.d, in) != NULL;
    } else if (seq.type == JV_UNDEFINED) {
        *out = false;
    } else {
        return jinja_fail(r, at, ST_EINVAL, "argument of type '%s' is not iterable", jv_type_name(seq));
    }
    return 0;
}

static int case_test(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a, bool upper, bool *out)
{
    NO_ARGS();
    struct jv s = jv_none();
    int rc = jinja_to_string(r, at, in, &s);
    if (rc == 0) rc = jinja_charge(r, at, (uint64_t)s.u.s->len * JINJA_UNICODE_COST);
    if (rc < 0) {
        jv_unref(s);
        return rc;
    }
    bool any_cased = false, ok = true;
    for (size_t i = 0; i < s.u.s->len && ok;) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s.u.s->s + i, s.u.s->len - i, &adv);
        utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
        if (c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LT) {
            if (!upper || c == UTF8PROC_CATEGORY_LT) ok = false;
            any_cased = true;
        } else if (c == UTF8PROC_CATEGORY_LL) {
            if (upper) ok = false;
            any_cased = true;
        }
        i += adv;
    }
    jv_unref(s);
    *out = ok && any_cased;
    return 0;
}
TEST(t_lower) { return case_test(r, at, in, a, false, out); }
TEST(t_upper) { return case_test(r, at, in, a, true, out); }

TEST(t_filter)
{
    NO_ARGS();
    *out = in.type == JV_STRING && jinja_filter_find(in.u.s->s) != NULL;
    return 0;
}
TEST(t_test)
{
    NO_ARGS();
    *out = in.type == JV_STRING && jinja_test_find(in.u.s->s) != NULL;
    return 0;
}

static const struct {
    const char *name;
    jinja_test_fn fn;
} tests[] = {
    {"boolean", t_boolean}, {"callable", t_callable}, {"defined", t_defined}, {"divisibleby", t_divisibleby},
    {"eq", t_eq}, {"equalto", t_eq}, {"escaped", t_escaped}, {"even", t_even}, {"false", t_false},
    {"filter", t_filter}, {"float", t_float}, {"ge", t_ge}, {"greaterthan", t_gt}, {"gt", t_gt}, {"in", t_in},
    {"integer", t_integer}, {"iterable", t_iterable}, {"le", t_le}, {"lessthan", t_lt}, {"lower", t_lower},
    {"lt", t_lt}, {"mapping", t_mapping}, {"ne", t_ne}, {"none", t_none}, {"number", t_number}, {"odd", t_odd},
    {"sameas", t_sameas}, {"sequence", t_sequence}, {"string", t_string}, {"test", t_test}, {"true", t_true},
    {"undefined", t_undefined}, {"upper", t_upper},
};

jinja_test_fn jinja_test_find(const char *name)
{
    for (size_t i = 0; i < ST_ARRAY_LEN(tests); i++)
        if (!strcmp(tests[i].name, name)) return tests[i].fn;
    return NULL;
}

/* ---- global functions ---- */

enum { G_RANGE, G_NAMESPACE, G_DICT, G_RAISE, G_STRFTIME, G_JOINER, G_COUNT };
static const char *const global_names[G_COUNT] = {"range", "namespace", "dict", "raise_exception", "strftime_now",
                                                  "joiner"};

int jinja_global_find(const char *name)
{
    for (int i = 0; i < G_COUNT; i++)
        if (!strcmp(global_names[i], name)) return i;
    return -1;
}

const char *jinja_global_name(int id) { return id >= 0 && id < G_COUNT ? global_names[id] : "?"; }

/* dict(*mapping, **kwargs) into d. */
static int fill_dict(struct jrender *r, const struct jnode *at, const char *what, const struct jargs *a,
                     struct jv_dict *d)
{
    int rc;
    if (a->n_pos > 1) return jinja_fail(r, at, ST_EINVAL, "%s expected at most 1 positional argument", what);
    if (a->n_pos == 1) {
        struct jv src = a->pos[0];
        if (src.type == JV_DICT || src.type == JV_NAMESPACE) {
            for (size_t i = 0; i < src.u.d->n; i++)
                if ((rc = jv_dict_set(d, jv_ref(src.u.d->keys[i]), jv_ref(src.u.d->vals[i]))) < 0) return nomem(r, at);
        } else {
            struct jv_list *l;
            if ((rc = jinja_iterate(r, at, src, &l)) < 0) return rc;
            for (size_t i = 0; i < l->n && rc == 0; i++) {
                struct jv p = l->v[i];
                if (p.type != JV_LIST || p.u.l->n != 2) {
                    rc = jinja_fail(r, at, ST_EINVAL, "%s update sequence element #%zu has the wrong length", what, i);
                    break;
                }
                if (jv_dict_set(d, jv_ref(p.u.l->v[0]), jv_ref(p.u.l->v[1])) < 0) rc = nomem(r, at);
            }
            jv_unref(jv_from_list(l));
            if (rc < 0) return rc;
        }
    }
    for (int k = 0; k < a->n_kw; k++) {
        struct jv key;
        if ((rc = jinja_new_string(r, at, a->kw_names[k], strlen(a->kw_names[k]), &key)) < 0) return rc;
        if (jv_dict_set(d, key, jv_ref(a->kw[k])) < 0) return nomem(r, at);
    }
    return 0;
}

int jinja_global_call(struct jrender *r, const struct jnode *at, int id, const struct jargs *a, struct jv *out)
{
    int rc;
    switch (id) {
    case G_RANGE: {
        int64_t v[3] = {0, 0, 1};
        if (a->n_kw) return jinja_fail(r, at, ST_EINVAL, "range() takes no keyword arguments");
        if (a->n_pos < 1 || a->n_pos > 3) return jinja_fail(r, at, ST_EINVAL, "range expected 1 to 3 arguments, got %d", a->n_pos);
        for (int i = 0; i < a->n_pos; i++)
            if ((rc = need_int(r, at, a->pos[i], "range() argument", &v[i])) < 0) return rc;
        int64_t start = 0, stop, stp = 1;
        if (a->n_pos == 1) stop = v[0];
        else start = v[0], stop = v[1], stp = a->n_pos == 3 ? v[2] : 1;
        if (stp == 0) return jinja_fail(r, at, ST_EINVAL, "range() arg 3 must not be zero");
        double count = stp > 0 ? ceil(((double)stop - (double)start) / (double)stp) : ceil(((double)start - (double)stop) / (double)-stp);
        if (count < 0) count = 0;
        if (count > JINJA_MAX_RANGE)
            return jinja_fail(r, at, ST_ERANGE, "Range too big. The sandbox blocks ranges larger than MAX_RANGE (%d).",
                              JINJA_MAX_RANGE);
        if ((rc = jinja_charge(r, at, (uint64_t)count * JINJA_ITEM_COST)) < 0) return rc;
        struct jv_list *l = jv_list_new((size_t)count);
        if (!l) return nomem(r, at);
        for (int64_t i = 0; i < (int64_t)count; i++) l->v[l->n++] = jv_int(start + i * stp);
        *out = jv_from_list(l);
        return 0;
    }
    case G_NAMESPACE:
    case G_DICT: {
        struct jv_dict *d = jv_dict_new();
        if (!d) return nomem(r, at);
        if ((rc = fill_dict(r, at, global_names[id], a, d)) < 0) {
            jv_unref(jv_from_dict(d));
            return rc;
        }
        struct jv v = jv_from_dict(d);
        if (id == G_NAMESPACE) {
            v.type = JV_NAMESPACE;
            if ((rc = jinja_track_cyclic(r, v)) < 0) {
                jv_unref(v);
                return nomem(r, at);
            }
        }
        *out = v;
        return 0;
    }
    case G_RAISE: {
        struct jv msg;
        if (a->n_pos != 1 || a->n_kw) return jinja_fail(r, at, ST_EINVAL, "raise_exception() takes one argument");
        if ((rc = jinja_to_string(r, at, a->pos[0], &msg)) < 0) return rc;
        if (!r->failed) {
            r->failed = true;
            err_set(r->err, ST_EINVAL, "%s", msg.u.s->s);
        }
        jv_unref(msg);
        return ST_EINVAL;
    }
    case G_STRFTIME: {
        if (a->n_pos != 1 || a->n_kw || a->pos[0].type != JV_STRING)
            return jinja_fail(r, at, ST_EINVAL, "strftime_now() takes one string argument");
        const char *fmt = a->pos[0].u.s->s;
        if (strlen(fmt) > 256) return jinja_fail(r, at, ST_EINVAL, "strftime_now() format too long");
        time_t now = time(NULL);
        struct tm tm;
        localtime_r(&now, &tm);
        char buf[2048];
        size_t n = fmt[0] ? strftime(buf, sizeof(buf), fmt, &tm) : 0;
        return jinja_new_string(r, at, buf, n, out);
    }
    case G_JOINER: {
        struct jv sep;
        if (a->n_kw > 1 || a->n_pos > 1 || (a->n_kw == 1 && strcmp(a->kw_names[0], "sep")))
            return jinja_fail(r, at, ST_EINVAL, "joiner() takes one argument (sep)");
        if (a->n_pos || a->n_kw) {
            if ((rc = jinja_to_string(r, at, a->n_pos ? a->pos[0] : a->kw[0], &sep)) < 0) return rc;
        } else if ((rc = jinja_new_string(r, at, ", ", 2, &sep)) < 0) {
            return rc;
        }
        struct jv_callable *c = calloc(1, sizeof(*c));
        if (!c) {
            jv_unref(sep);
            return nomem(r, at);
        }
        c->rc = 1;
        c->kind = JC_JOINER;
        c->name = "joiner";
        c->self = sep;
        out->type = JV_CALLABLE;
        out->u.c = c;
        return 0;
    }
    default: return jinja_fail(r, at, ST_EINVAL, "unknown function");
    }
}

/* ---- methods ---- */

enum {
    /* str */
    M_STARTSWITH, M_ENDSWITH, M_SPLIT, M_RSPLIT, M_STRIP, M_LSTRIP, M_RSTRIP, M_UPPER, M_LOWER, M_TITLE,
    M_CAPITALIZE, M_SWAPCASE, M_CASEFOLD, M_REPLACE, M_FIND, M_RFIND, M_INDEX, M_RINDEX, M_COUNT, M_JOIN, M_FORMAT,
    M_SPLITLINES, M_ISDIGIT, M_ISALPHA, M_ISALNUM, M_ISSPACE, M_ISUPPER, M_ISLOWER, M_ISNUMERIC, M_ISDECIMAL,
    M_CENTER, M_LJUST, M_RJUST, M_ZFILL, M_REMOVEPREFIX, M_REMOVESUFFIX, M_PARTITION, M_RPARTITION,
    /* dict */
    M_ITEMS, M_KEYS, M_VALUES, M_GET,
    /* list */
    M_LCOUNT, M_LINDEX,
    /* loop */
    M_CYCLE, M_CHANGED,
    M_COUNT_ALL
};

static const char *const str_methods[] = {
    "startswith", "endswith", "split", "rsplit", "strip", "lstrip", "rstrip", "upper", "lower", "title",
    "capitalize", "swapcase", "casefold", "replace", "find", "rfind", "index", "rindex", "count", "join", "format",
    "splitlines", "isdigit", "isalpha", "isalnum", "isspace", "isupper", "islower", "isnumeric", "isdecimal",
    "center", "ljust", "rjust", "zfill", "removeprefix", "removesuffix", "partition", "rpartition"};
static const char *const str_unimpl[] = {"encode", "expandtabs", "format_map", "isascii", "isidentifier",
                                         "isprintable", "istitle", "maketrans", "translate", NULL};
static const char *const dict_unimpl[] = {"clear", "copy", "fromkeys", "pop", "popitem", "setdefault", "update", NULL};
static const char *const list_unimpl[] = {"append", "clear", "copy", "extend", "insert", "pop", "remove", "reverse",
                                          "sort", NULL};

static int in_names(const char *const *names, const char *name, const char **canonical)
{
    for (int i = 0; names[i]; i++) {
        if (!strcmp(names[i], name)) {
            if (canonical) *canonical = names[i];
            return -1;
        }
    }
    return -2;
}

static int named(int id, const char *name, const char **canonical)
{
    if (canonical) *canonical = name;
    return id;
}

int jinja_method_find(struct jv self, const char *name, const char **canonical)
{
    switch (self.type) {
    case JV_STRING:
        for (int i = 0; i < (int)ST_ARRAY_LEN(str_methods); i++)
            if (!strcmp(str_methods[i], name)) return named(i, str_methods[i], canonical);
        return in_names(str_unimpl, name, canonical);
    case JV_DICT:
        if (!strcmp(name, "items")) return named(M_ITEMS, "items", canonical);
        if (!strcmp(name, "keys")) return named(M_KEYS, "keys", canonical);
        if (!strcmp(name, "values")) return named(M_VALUES, "values", canonical);
        if (!strcmp(name, "get")) return named(M_GET, "get", canonical);
        return in_names(dict_unimpl, name, canonical);
    case JV_LIST:
        if (!strcmp(name, "count")) return named(M_LCOUNT, "count", canonical);
        if (!strcmp(name, "index")) return named(M_LINDEX, "index", canonical);
        return in_names(list_unimpl, name, canonical);
    case JV_LOOP:
        if (!strcmp(name, "cycle")) return named(M_CYCLE, "cycle", canonical);
        if (!strcmp(name, "changed")) return named(M_CHANGED, "changed", canonical);
        return -2;
    default: return -2;
    }
}

static int str_predicate(struct jv s, int id)
{
    if (s.u.s->len == 0) return 0;
    bool cased = false;
    for (size_t i = 0; i < s.u.s->len;) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s.u.s->s + i, s.u.s->len - i, &adv);
        utf8proc_category_t c = utf8proc_category((utf8proc_int32_t)cp);
        i += adv;
        switch (id) {
        case M_ISDIGIT:
        case M_ISDECIMAL:
            if (!jinja_cp_is_decimal(cp)) return 0;
            break;
        case M_ISNUMERIC:
            if (!jinja_cp_is_numeric(cp)) return 0;
            break;
        case M_ISALPHA:
            if (!jinja_cp_is_alpha(cp)) return 0;
            break;
        case M_ISALNUM:
            if (!jinja_cp_is_alpha(cp) && !jinja_cp_is_numeric(cp)) return 0;
            break;
        case M_ISSPACE:
            if (!jinja_py_isspace(cp)) return 0;
            break;
        case M_ISUPPER:
            if (c == UTF8PROC_CATEGORY_LL || c == UTF8PROC_CATEGORY_LT) return 0;
            if (c == UTF8PROC_CATEGORY_LU) cased = true;
            break;
        case M_ISLOWER:
            if (c == UTF8PROC_CATEGORY_LU || c == UTF8PROC_CATEGORY_LT) return 0;
            if (c == UTF8PROC_CATEGORY_LL) cased = true;
            break;
        }
    }
    return (id == M_ISUPPER || id == M_ISLOWER) ? cased : 1;
}

static int prefix_test(struct jrender *r, const struct jnode *at, struct jv self, const struct jargs *a, bool suffix,
                       struct jv *out)
{
    BIND("prefix", "start", "end");
    if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "%s() takes at least 1 argument", suffix ? "endswith" : "startswith");
    size_t b0, b1;
    cp_range(self.u.s, v_[1], v_[2], &b0, &b1);
    const char *s = self.u.s->s + b0;
    size_t len = b1 - b0;
    struct jv p = v_[0];
    size_t n = p.type == JV_LIST && p.u.l->tuple ? p.u.l->n : 1;
    *out = jv_bool(false);
    for (size_t i = 0; i < n; i++) {
        struct jv x = p.type == JV_LIST && p.u.l->tuple ? p.u.l->v[i] : p;
        if (x.type != JV_STRING)
            return jinja_fail(r, at, ST_EINVAL, "%s first arg must be str or a tuple of str, not %s",
                              suffix ? "endswith" : "startswith", jv_type_name(x));
        size_t xl = x.u.s->len;
        if (xl <= len && memcmp(suffix ? s + len - xl : s, x.u.s->s, xl) == 0) {
            *out = jv_bool(true);
            break;
        }
    }
    return 0;
}

static int find_method(struct jrender *r, const struct jnode *at, struct jv self, const struct jargs *a, int id,
                       struct jv *out)
{
    BIND("sub", "start", "end");
    int rc;
    if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "missing substring argument");
    if ((rc = need_str(r, at, v_[0], "substring")) < 0) return rc;
    size_t b0, b1;
    cp_range(self.u.s, v_[1], v_[2], &b0, &b1);
    const char *s = self.u.s->s, *sub = v_[0].u.s->s;
    size_t sl = v_[0].u.s->len;
    if (id == M_COUNT) {
        int64_t n = 0;
        if (sl == 0) {
            n = cp_index(self.u.s, b1) - cp_index(self.u.s, b0) + 1;
        } else {
            size_t i = b0;
            const char *f;
            while (i <= b1 && (f = jv_find(s + i, b1 - i, sub, sl)) != NULL) {
                n++;
                i = (size_t)(f - s) + sl;
            }
        }
        *out = jv_int(n);
        return 0;
    }
    const char *f = (id == M_FIND || id == M_INDEX) ? find_bytes(s + b0, b1 - b0, sub, sl)
                                                    : rfind_bytes(s + b0, b1 - b0, sub, sl);
    if (sl == 0 && (id == M_RFIND || id == M_RINDEX)) f = s + b1;
    if (!f) {
        if (id == M_INDEX || id == M_RINDEX) return jinja_fail(r, at, ST_EINVAL, "substring not found");
        *out = jv_int(-1);
        return 0;
    }
    *out = jv_int(cp_index(self.u.s, (size_t)(f - s)));
    return 0;
}

static int splitlines(struct jrender *r, const struct jnode *at, struct jv self, bool keepends, struct jv *out)
{
    const char *p = self.u.s->s;
    size_t len = self.u.s->len, i = 0;
    struct jv_list *l = jv_list_new(0);
    int rc = 0;
    if (!l) return nomem(r, at);
    while (i < len && rc == 0) {
        size_t j = i, eol = 0;
        while (j < len) {
            size_t adv;
            uint32_t cp = jinja_utf8_decode(p + j, len - j, &adv);
            if (cp == '\r' && j + 1 < len && p[j + 1] == '\n') {
                eol = 2;
                break;
            }
            if (cp == '\n' || cp == '\r' || cp == 0x0b || cp == 0x0c || cp == 0x1c || cp == 0x1d || cp == 0x1e ||
                cp == 0x85 || cp == 0x2028 || cp == 0x2029) {
                eol = adv;
                break;
            }
            j += adv;
        }
        struct jv piece;
        if ((rc = jinja_new_string(r, at, p + i, j - i + (keepends ? eol : 0), &piece)) < 0) break;
        if (jv_list_push(l, piece) < 0) rc = nomem(r, at);
        i = j + eol;
    }
    if (rc < 0) {
        jv_unref(jv_from_list(l));
        return rc;
    }
    *out = jv_from_list(l);
    return 0;
}

static int partition(struct jrender *r, const struct jnode *at, struct jv self, const struct jargs *a, bool right,
                     struct jv *out)
{
    BIND("sep");
    int rc;
    if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "partition() takes exactly one argument");
    if ((rc = need_str(r, at, v_[0], "separator")) < 0) return rc;
    if (v_[0].u.s->len == 0) return jinja_fail(r, at, ST_EINVAL, "empty separator");
    const char *s = self.u.s->s;
    size_t len = self.u.s->len, sl = v_[0].u.s->len;
    const char *f = right ? rfind_bytes(s, len, v_[0].u.s->s, sl) : jv_find(s, len, v_[0].u.s->s, sl);
    struct jv_list *t = jv_list_new(3);
    if (!t) return nomem(r, at);
    t->tuple = true;
    size_t cuts[4];
    if (!f) {
        if (right) cuts[0] = cuts[1] = cuts[2] = 0, cuts[3] = len;
        else cuts[0] = len, cuts[1] = cuts[2] = cuts[3] = len;
    } else {
        cuts[0] = (size_t)(f - s);
        cuts[1] = cuts[0];
        cuts[2] = cuts[0] + sl;
        cuts[3] = len;
    }
    struct jv parts[3];
    rc = jinja_new_string(r, at, s, cuts[0], &parts[0]);
    if (rc == 0 && (rc = jinja_new_string(r, at, f ? v_[0].u.s->s : "", f ? sl : 0, &parts[1])) < 0) jv_unref(parts[0]);
    if (rc == 0 && (rc = jinja_new_string(r, at, s + cuts[2], cuts[3] - cuts[2], &parts[2])) < 0) {
        jv_unref(parts[0]);
        jv_unref(parts[1]);
    }
    if (rc < 0) {
        jv_unref(jv_from_list(t));
        return rc;
    }
    for (int i = 0; i < 3; i++) t->v[t->n++] = parts[i];
    *out = jv_from_list(t);
    return 0;
}

static int str_method(struct jrender *r, const struct jnode *at, struct jv self, int id, const struct jargs *a,
                      struct jv *out)
{
    int rc;
    switch (id) {
    case M_STARTSWITH: return prefix_test(r, at, self, a, false, out);
    case M_ENDSWITH: return prefix_test(r, at, self, a, true, out);
    case M_SPLIT:
    case M_RSPLIT: {
        BIND("sep", "maxsplit");
        int64_t maxsplit = -1;
        if (has(v_[1]) && (rc = need_int(r, at, v_[1], "maxsplit", &maxsplit)) < 0) return rc;
        return do_split(r, at, self, v_[0], maxsplit, id == M_RSPLIT, out);
    }
    case M_STRIP:
    case M_LSTRIP:
    case M_RSTRIP: {
        BIND("chars");
        return do_strip(r, at, self, v_[0], id == M_STRIP ? 3 : id == M_LSTRIP ? 1 : 2, out);
    }
    case M_UPPER:
    case M_LOWER:
    case M_TITLE:
    case M_CAPITALIZE:
    case M_SWAPCASE:
    case M_CASEFOLD:
        NO_ARGS();
        return case_convert(r, at, self.u.s->s, self.u.s->len,
                            id == M_UPPER        ? JCASE_UPPER
                            : id == M_TITLE      ? JCASE_TITLE
                            : id == M_CAPITALIZE ? JCASE_CAPITALIZE
                            : id == M_SWAPCASE   ? JCASE_SWAPCASE
                                                 : JCASE_LOWER,
                            out);
    case M_REPLACE: {
        BIND("old", "new", "count");
        int64_t count = -1;
        if (!has(v_[0]) || !has(v_[1])) return jinja_fail(r, at, ST_EINVAL, "replace() takes at least 2 arguments");
        if ((rc = need_str(r, at, v_[0], "old")) < 0 || (rc = need_str(r, at, v_[1], "new")) < 0) return rc;
        if (has(v_[2]) && (rc = need_int(r, at, v_[2], "count", &count)) < 0) return rc;
        return do_replace(r, at, self, v_[0], v_[1], count, out);
    }
    case M_FIND:
    case M_RFIND:
    case M_INDEX:
    case M_RINDEX:
    case M_COUNT: return find_method(r, at, self, a, id, out);
    case M_JOIN: {
        BIND("iterable");
        struct jv_list *items;
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "join() takes exactly one argument");
        if ((rc = jinja_iterate(r, at, v_[0], &items)) < 0) return rc;
        rc = join_items(r, at, items, self.u.s->s, self.u.s->len, MISSING, true, out);
        jv_unref(jv_from_list(items));
        return rc;
    }
    case M_FORMAT: return format_method(r, at, self, a, out);
    case M_SPLITLINES: {
        BIND("keepends");
        return splitlines(r, at, self, has(v_[0]) && jv_truthy(v_[0]), out);
    }
    case M_ISDIGIT:
    case M_ISALPHA:
    case M_ISALNUM:
    case M_ISSPACE:
    case M_ISUPPER:
    case M_ISLOWER:
    case M_ISNUMERIC:
    case M_ISDECIMAL:
        NO_ARGS();
        if ((rc = jinja_charge(r, at, (uint64_t)self.u.s->len * JINJA_UNICODE_COST)) < 0) return rc;
        *out = jv_bool(str_predicate(self, id));
        return 0;
    case M_CENTER:
    case M_LJUST:
    case M_RJUST: {
        BIND("width", "fillchar");
        int64_t w = 0;
        uint32_t fill = ' ';
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "missing width");
        if ((rc = need_int(r, at, v_[0], "width", &w)) < 0) return rc;
        if (has(v_[1])) {
            if (v_[1].type != JV_STRING || v_[1].u.s->n_cp != 1)
                return jinja_fail(r, at, ST_EINVAL, "The fill character must be exactly one character long");
            size_t adv;
            fill = jinja_utf8_decode(v_[1].u.s->s, v_[1].u.s->len, &adv);
        }
        return justify(r, at, self, w, fill, id == M_CENTER ? 'c' : id == M_LJUST ? 'l' : 'r', out);
    }
    case M_ZFILL: {
        BIND("width");
        int64_t w = 0;
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "missing width");
        if ((rc = need_int(r, at, v_[0], "width", &w)) < 0) return rc;
        int64_t n = (int64_t)self.u.s->n_cp;
        if (w <= n) {
            *out = jv_ref(self);
            return 0;
        }
        if ((uint64_t)w > r->lim->max_output_bytes) return buf_rc(r, at, ST_ERANGE);
        struct jbuf b = {0};
        size_t skip = (self.u.s->len && (self.u.s->s[0] == '+' || self.u.s->s[0] == '-')) ? 1 : 0;
        rc = jbuf_put(&b, self.u.s->s, skip);
        for (int64_t i = 0; i < w - n && rc == 0; i++) rc = jbuf_putc(&b, '0');
        if (rc == 0) rc = jbuf_put(&b, self.u.s->s + skip, self.u.s->len - skip);
        if (rc < 0) {
            jbuf_free(&b);
            return buf_rc(r, at, rc);
        }
        return buf_string(r, at, &b, out);
    }
    case M_REMOVEPREFIX:
    case M_REMOVESUFFIX: {
        BIND("affix");
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "missing argument");
        if ((rc = need_str(r, at, v_[0], "argument")) < 0) return rc;
        size_t l = self.u.s->len, xl = v_[0].u.s->len;
        if (xl <= l && memcmp(id == M_REMOVEPREFIX ? self.u.s->s : self.u.s->s + l - xl, v_[0].u.s->s, xl) == 0)
            return jinja_new_string(r, at, id == M_REMOVEPREFIX ? self.u.s->s + xl : self.u.s->s, l - xl, out);
        *out = jv_ref(self);
        return 0;
    }
    case M_PARTITION:
    case M_RPARTITION: return partition(r, at, self, a, id == M_RPARTITION, out);
    default: return jinja_fail(r, at, ST_EINVAL, "internal error: bad string method");
    }
}

int jinja_method_call(struct jrender *r, const struct jnode *at, const struct jv_callable *m, const struct jargs *a,
                      struct jv *out)
{
    struct jv self = m->self;
    int rc;
    /* string methods scan the string; items()/keys()/values()/count()/index() walk the container */
    if ((rc = jinja_charge(r, at, m->id == M_GET ? 0 : jinja_value_cost(self))) < 0) return rc;
    if (m->id < 0)
        return jinja_fail(r, at, ST_EUNSUPPORTED, "unsupported method '%s' of '%s' object", m->name, jv_type_name(self));
    if (self.type == JV_STRING) return str_method(r, at, self, m->id, a, out);
    switch (m->id) {
    case M_ITEMS:
    case M_KEYS:
    case M_VALUES: {
        NO_ARGS();
        const struct jv_dict *d = self.u.d;
        struct jv_list *l = jv_list_new(d->n);
        if (!l) return nomem(r, at);
        for (size_t i = 0; i < d->n; i++) {
            if (m->id == M_ITEMS) {
                if ((rc = new_tuple2(r, at, d->keys[i], d->vals[i], &l->v[l->n])) < 0) {
                    jv_unref(jv_from_list(l));
                    return rc;
                }
                l->n++;
            } else {
                l->v[l->n++] = jv_ref(m->id == M_KEYS ? d->keys[i] : d->vals[i]);
            }
        }
        *out = jv_from_list(l);
        return 0;
    }
    case M_GET: {
        BIND("key", "default");
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "get expected at least 1 argument");
        struct jv *v = jv_dict_get(self.u.d, v_[0]);
        *out = v ? jv_ref(*v) : has(v_[1]) ? jv_ref(v_[1]) : jv_none();
        return 0;
    }
    case M_LCOUNT:
    case M_LINDEX: {
        BIND("value");
        if (!has(v_[0])) return jinja_fail(r, at, ST_EINVAL, "missing argument");
        int64_t n = 0, first = -1;
        for (size_t i = 0; i < self.u.l->n; i++) {
            if (jv_equal(self.u.l->v[i], v_[0], 0)) {
                if (first < 0) first = (int64_t)i;
                n++;
            }
        }
        if (m->id == M_LCOUNT) {
            *out = jv_int(n);
            return 0;
        }
        if (first < 0) return jinja_fail(r, at, ST_EINVAL, "value is not in list");
        *out = jv_int(first);
        return 0;
    }
    case M_CYCLE: {
        if (a->n_kw || a->n_pos == 0) return jinja_fail(r, at, ST_EINVAL, "no items for cycling given");
        *out = jv_ref(a->pos[self.u.loop->index0 % a->n_pos]);
        return 0;
    }
    case M_CHANGED: {
        struct jv_loop *l = self.u.loop;
        struct jv_list *t = jv_list_new((size_t)a->n_pos);
        if (!t) return nomem(r, at);
        t->tuple = true;
        for (int i = 0; i < a->n_pos; i++) t->v[t->n++] = jv_ref(a->pos[i]);
        struct jv nv = jv_from_list(t);
        bool changed = !l->changed_called || !jv_equal(nv, l->changed_last, 0);
        jv_unref(l->changed_last);
        l->changed_last = nv;
        l->changed_called = true;
        *out = jv_bool(changed);
        return 0;
    }
    default: return jinja_fail(r, at, ST_EINVAL, "internal error: bad method");
    }
}
