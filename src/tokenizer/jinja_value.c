/* jinja values: refcounted strings, lists, dicts and callables; Python's str(), repr(), json.dumps(), == and <. */
#include "tokenizer/jinja.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <utf8proc.h>

#include "core/core.h"

/* ---- UTF-8 ---- */

uint32_t jinja_utf8_decode(const char *s, size_t len, size_t *adv)
{
    const unsigned char *u = (const unsigned char *)s;
    if (len == 0) {
        *adv = 0;
        return 0;
    }
    if (u[0] < 0x80) {
        *adv = 1;
        return u[0];
    }
    if ((u[0] & 0xE0) == 0xC0 && len >= 2) {
        *adv = 2;
        return ((uint32_t)(u[0] & 0x1F) << 6) | (u[1] & 0x3F);
    }
    if ((u[0] & 0xF0) == 0xE0 && len >= 3) {
        *adv = 3;
        return ((uint32_t)(u[0] & 0x0F) << 12) | ((uint32_t)(u[1] & 0x3F) << 6) | (u[2] & 0x3F);
    }
    if ((u[0] & 0xF8) == 0xF0 && len >= 4) {
        *adv = 4;
        return ((uint32_t)(u[0] & 0x07) << 18) | ((uint32_t)(u[1] & 0x3F) << 12) | ((uint32_t)(u[2] & 0x3F) << 6) |
               (u[3] & 0x3F);
    }
    *adv = 1; /* not reached for valid input */
    return 0xFFFD;
}

size_t jinja_utf8_encode(uint32_t cp, char *out)
{
    unsigned char *o = (unsigned char *)out;
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

size_t jinja_utf8_offset(const char *s, size_t len, size_t i)
{
    size_t off = 0;
    while (i > 0 && off < len) {
        off++;
        while (off < len && ((unsigned char)s[off] & 0xC0) == 0x80) off++;
        i--;
    }
    return off;
}

bool jinja_utf8_valid(const char *s, size_t len)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < len) {
        unsigned char c = u[i];
        size_t n;
        uint32_t cp, min;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xE0) == 0xC0) {
            n = 2, cp = c & 0x1F, min = 0x80;
        } else if ((c & 0xF0) == 0xE0) {
            n = 3, cp = c & 0x0F, min = 0x800;
        } else if ((c & 0xF8) == 0xF0) {
            n = 4, cp = c & 0x07, min = 0x10000;
        } else {
            return false;
        }
        if (len - i < n) return false;
        for (size_t k = 1; k < n; k++) {
            if ((u[i + k] & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (u[i + k] & 0x3F);
        }
        if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += n;
    }
    return true;
}

const char *jv_find(const char *hay, size_t hay_len, const char *needle, size_t needle_len)
{
    if (needle_len == 0) return hay;
    if (needle_len > hay_len) return NULL;
    const char *p = hay, *end = hay + hay_len - needle_len + 1;
    while (p < end) {
        p = memchr(p, needle[0], (size_t)(end - p));
        if (!p) return NULL;
        if (memcmp(p, needle, needle_len) == 0) return p;
        p++;
    }
    return NULL;
}

bool jinja_py_isspace(uint32_t cp)
{
    if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x1F);
    if (cp < 0x85) return false;
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 ||
           cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* ---- reference counting ---- */

static void *hdr_of(struct jv v)
{
    switch (v.type) {
    case JV_STRING: return v.u.s;
    case JV_LIST: return v.u.l;
    case JV_DICT:
    case JV_NAMESPACE: return v.u.d;
    case JV_CALLABLE: return v.u.c;
    case JV_LOOP: return v.u.loop;
    default: return NULL;
    }
}

struct jv jv_ref(struct jv v)
{
    int32_t *rc = hdr_of(v);
    if (rc && *rc >= 0) (*rc)++;
    return v;
}

void jv_dict_clear(struct jv_dict *d)
{
    size_t n = d->n;
    struct jv *k = d->keys, *v = d->vals;
    d->n = d->cap = 0;
    d->keys = d->vals = NULL;
    free(d->index);
    d->index = NULL;
    d->index_cap = 0;
    for (size_t i = 0; i < n; i++) {
        jv_unref(k[i]);
        jv_unref(v[i]);
    }
    free(k);
    free(v);
}

/* Drops one reference; true when it was the last (the caller then frees the object). */
static bool release(struct jv v)
{
    int32_t *rc = hdr_of(v);
    if (!rc || *rc < 0) return false;
    ST_ASSERT(*rc > 0);
    return --(*rc) == 0;
}

/* Freeing walks an explicit stack instead of recursing, so that however deeply a template nests values (a
 * list inside a list, a million times), releasing them cannot overflow the C stack. */
struct free_stack {
    struct jv *v;
    size_t n, cap;
    struct jv inline_buf[32];
};

static void free_one(struct jv v);

static void drop_child(struct free_stack *st, struct jv c)
{
    if (!release(c)) return;
    if (c.type == JV_STRING) {
        free(c.u.s);
        return;
    }
    if (st->n == st->cap) {
        size_t cap = st->cap * 2;
        struct jv *nv = st->v == st->inline_buf ? malloc(cap * sizeof(*nv)) : realloc(st->v, cap * sizeof(*nv));
        if (!nv) {
            free_one(c); /* out of memory: recurse for this one */
            return;
        }
        if (st->v == st->inline_buf) memcpy(nv, st->inline_buf, sizeof(st->inline_buf));
        st->v = nv;
        st->cap = cap;
    }
    st->v[st->n++] = c;
}

/* Frees an object whose count reached zero, releasing its children through the stack. */
static void free_one(struct jv v)
{
    struct free_stack st;
    st.v = st.inline_buf;
    st.n = 0;
    st.cap = ST_ARRAY_LEN(st.inline_buf);
    st.v[st.n++] = v;
    while (st.n) {
        struct jv x = st.v[--st.n];
        switch (x.type) {
        case JV_STRING: free(x.u.s); break;
        case JV_LIST:
            for (size_t i = 0; i < x.u.l->n; i++) drop_child(&st, x.u.l->v[i]);
            free(x.u.l->v);
            free(x.u.l);
            break;
        case JV_DICT:
        case JV_NAMESPACE:
            for (size_t i = 0; i < x.u.d->n; i++) {
                drop_child(&st, x.u.d->keys[i]);
                drop_child(&st, x.u.d->vals[i]);
            }
            free(x.u.d->keys);
            free(x.u.d->vals);
            free(x.u.d->index);
            free(x.u.d);
            break;
        case JV_CALLABLE:
            drop_child(&st, x.u.c->self);
            if (x.u.c->closure) jinja_scope_release(x.u.c->closure);
            free(x.u.c);
            break;
        case JV_LOOP:
            if (x.u.loop->items) drop_child(&st, jv_from_list(x.u.loop->items));
            drop_child(&st, x.u.loop->changed_last);
            if (x.u.loop->scope) jinja_scope_release(x.u.loop->scope);
            free(x.u.loop);
            break;
        default: break;
        }
    }
    if (st.v != st.inline_buf) free(st.v);
}

void jv_unref(struct jv v)
{
    if (release(v)) free_one(v);
}

/* ---- strings ---- */

static struct jv_str *jv_str_new(const char *s, size_t len)
{
    struct jv_str *r = malloc(sizeof(*r) + len + 1);
    if (!r) return NULL;
    r->rc = 1;
    jv_str_fill(r, s, len);
    return r;
}

void jv_str_fill(struct jv_str *r, const char *s, size_t len)
{
    r->len = len;
    if (len && s != r->s) memmove(r->s, s, len);
    r->s[len] = 0;
    size_t n_cp = 0;
    bool ascii = true;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)r->s[i];
        if (ch >= 0x80) ascii = false;
        if ((ch & 0xC0) != 0x80) n_cp++;
    }
    r->n_cp = n_cp;
    r->ascii = ascii;
}

struct jv jv_from_str(struct jv_str *s)
{
    struct jv v = {.type = JV_STRING};
    v.u.s = s;
    return v;
}

int jv_string(struct jv *out, const char *s, size_t len)
{
    struct jv_str *r = jv_str_new(s, len);
    if (!r) return ST_ENOMEM;
    *out = jv_from_str(r);
    return 0;
}

/* ---- lists ---- */

struct jv_list *jv_list_new(size_t cap)
{
    struct jv_list *l = calloc(1, sizeof(*l));
    if (!l) return NULL;
    l->rc = 1;
    if (cap) {
        l->v = malloc(cap * sizeof(*l->v));
        if (!l->v) {
            free(l);
            return NULL;
        }
        l->cap = cap;
    }
    return l;
}

int jv_list_push(struct jv_list *l, struct jv v)
{
    if (l->n == l->cap) {
        if (l->n >= JINJA_MAX_LIST_ITEMS) {
            jv_unref(v);
            return ST_ERANGE;
        }
        size_t cap = l->cap ? l->cap * 2 : 4;
        struct jv *nv = realloc(l->v, cap * sizeof(*nv));
        if (!nv) {
            jv_unref(v);
            return ST_ENOMEM;
        }
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = v;
    return 0;
}

struct jv jv_from_list(struct jv_list *l)
{
    struct jv v = {.type = JV_LIST};
    v.u.l = l;
    return v;
}

/* ---- dicts ---- */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return mix64(h);
}

/* Equal values hash equally (1 == 1.0 == True). */
static uint64_t jv_hash(struct jv v, int depth)
{
    switch (v.type) {
    case JV_STRING: return hash_bytes(v.u.s->s, v.u.s->len);
    case JV_BOOL: return mix64((uint64_t)v.u.b);
    case JV_INT: return mix64((uint64_t)v.u.i);
    case JV_FLOAT:
        if (v.u.f == floor(v.u.f) && fabs(v.u.f) < 9.2e18) return mix64((uint64_t)(int64_t)v.u.f);
        {
            uint64_t bits;
            memcpy(&bits, &v.u.f, sizeof(bits));
            return mix64(bits);
        }
    case JV_NONE: return 0x9e3779b97f4a7c15ull;
    case JV_UNDEFINED: return 0x51afd7ed558ccd01ull;
    case JV_LIST: {
        uint64_t h = 0x345678;
        if (depth > JINJA_MAX_VALUE_DEPTH) return h;
        for (size_t i = 0; i < v.u.l->n; i++) h = mix64(h ^ jv_hash(v.u.l->v[i], depth + 1));
        return h;
    }
    default: return mix64((uint64_t)(uintptr_t)hdr_of(v));
    }
}

struct jv_dict *jv_dict_new(void)
{
    struct jv_dict *d = calloc(1, sizeof(*d));
    if (d) d->rc = 1;
    return d;
}

struct jv jv_from_dict(struct jv_dict *d)
{
    struct jv v = {.type = JV_DICT};
    v.u.d = d;
    return v;
}

static int dict_reindex(struct jv_dict *d)
{
    size_t cap = 16;
    while (cap < d->n * 2 + 2) cap *= 2;
    uint32_t *idx = calloc(cap, sizeof(*idx));
    if (!idx) return ST_ENOMEM;
    free(d->index);
    d->index = idx;
    d->index_cap = cap;
    for (size_t i = 0; i < d->n; i++) {
        size_t h = (size_t)jv_hash(d->keys[i], 0) & (cap - 1);
        while (idx[h]) h = (h + 1) & (cap - 1);
        idx[h] = (uint32_t)(i + 1);
    }
    return 0;
}

static struct jv *dict_find(const struct jv_dict *d, struct jv key, size_t *pos)
{
    if (d->index) {
        size_t h = (size_t)jv_hash(key, 0) & (d->index_cap - 1);
        while (d->index[h]) {
            size_t i = d->index[h] - 1;
            if (jv_equal(d->keys[i], key, 0)) {
                if (pos) *pos = i;
                return &d->vals[i];
            }
            h = (h + 1) & (d->index_cap - 1);
        }
        return NULL;
    }
    for (size_t i = 0; i < d->n; i++) {
        if (jv_equal(d->keys[i], key, 0)) {
            if (pos) *pos = i;
            return &d->vals[i];
        }
    }
    return NULL;
}

struct jv *jv_dict_get(const struct jv_dict *d, struct jv key) { return dict_find(d, key, NULL); }

struct jv *jv_dict_get_str(const struct jv_dict *d, const char *key, size_t len)
{
    if (!d->index) {
        for (size_t i = 0; i < d->n; i++) {
            struct jv k = d->keys[i];
            if (k.type == JV_STRING && k.u.s->len == len && memcmp(k.u.s->s, key, len) == 0) return &d->vals[i];
        }
        return NULL;
    }
    size_t h = (size_t)hash_bytes(key, len) & (d->index_cap - 1);
    while (d->index[h]) {
        size_t i = d->index[h] - 1;
        struct jv k = d->keys[i];
        if (k.type == JV_STRING && k.u.s->len == len && memcmp(k.u.s->s, key, len) == 0) return &d->vals[i];
        h = (h + 1) & (d->index_cap - 1);
    }
    return NULL;
}

int jv_dict_set(struct jv_dict *d, struct jv key, struct jv val)
{
    struct jv *slot = dict_find(d, key, NULL);
    if (slot) {
        jv_unref(*slot);
        *slot = val;
        jv_unref(key);
        return 0;
    }
    if (d->n == d->cap) {
        if (d->n >= JINJA_MAX_LIST_ITEMS) goto fail_range;
        size_t cap = d->cap ? d->cap * 2 : 4;
        struct jv *nk = realloc(d->keys, cap * sizeof(*nk));
        if (!nk) goto fail_nomem;
        d->keys = nk;
        struct jv *nv = realloc(d->vals, cap * sizeof(*nv));
        if (!nv) goto fail_nomem;
        d->vals = nv;
        d->cap = cap;
    }
    d->keys[d->n] = key;
    d->vals[d->n] = val;
    d->n++;
    if (d->index && d->n * 2 + 2 <= d->index_cap) {
        size_t h = (size_t)jv_hash(key, 0) & (d->index_cap - 1);
        while (d->index[h]) h = (h + 1) & (d->index_cap - 1);
        d->index[h] = (uint32_t)d->n;
    } else if (d->n > 8) {
        if (dict_reindex(d) < 0) {
            /* keep the entry; fall back to linear search */
            free(d->index);
            d->index = NULL;
            d->index_cap = 0;
        }
    }
    return 0;
fail_range:
    jv_unref(key);
    jv_unref(val);
    return ST_ERANGE;
fail_nomem:
    jv_unref(key);
    jv_unref(val);
    return ST_ENOMEM;
}

/* ---- JSON input ---- */

int jv_from_json(struct jv *out, const json_t *j, int depth)
{
    int rc = 0;
    if (depth > JINJA_MAX_VALUE_DEPTH) return ST_ERANGE;
    switch (json_typeof(j)) {
    case JSON_OBJECT: {
        struct jv_dict *d = jv_dict_new();
        if (!d) return ST_ENOMEM;
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)j, k, v) {
            struct jv key, val;
            if ((rc = jv_string(&key, k, strlen(k))) < 0) goto fail_dict;
            if ((rc = jv_from_json(&val, v, depth + 1)) < 0) {
                jv_unref(key);
                goto fail_dict;
            }
            if ((rc = jv_dict_set(d, key, val)) < 0) goto fail_dict;
        }
        *out = jv_from_dict(d);
        return 0;
    fail_dict:
        jv_unref(jv_from_dict(d));
        return rc;
    }
    case JSON_ARRAY: {
        struct jv_list *l = jv_list_new(json_array_size(j));
        if (!l) return ST_ENOMEM;
        for (size_t i = 0; i < json_array_size(j); i++) {
            struct jv val;
            if ((rc = jv_from_json(&val, json_array_get(j, i), depth + 1)) < 0) goto fail_list;
            if ((rc = jv_list_push(l, val)) < 0) goto fail_list;
        }
        *out = jv_from_list(l);
        return 0;
    fail_list:
        jv_unref(jv_from_list(l));
        return rc;
    }
    case JSON_STRING: return jv_string(out, json_string_value(j), json_string_length(j));
    case JSON_INTEGER: *out = jv_int((int64_t)json_integer_value(j)); return 0;
    case JSON_REAL: *out = jv_float(json_real_value(j)); return 0;
    case JSON_TRUE: *out = jv_bool(true); return 0;
    case JSON_FALSE: *out = jv_bool(false); return 0;
    case JSON_NULL: *out = jv_none(); return 0;
    }
    return ST_EINVAL;
}

/* ---- truthiness, type names ---- */

bool jv_truthy(struct jv v)
{
    switch (v.type) {
    case JV_UNDEFINED:
    case JV_NONE: return false;
    case JV_BOOL: return v.u.b;
    case JV_INT: return v.u.i != 0;
    case JV_FLOAT: return v.u.f != 0.0;
    case JV_STRING: return v.u.s->len != 0;
    case JV_LIST: return v.u.l->lazy || v.u.l->n != 0;
    case JV_DICT: return v.u.d->n != 0;
    default: return true;
    }
}

const char *jv_type_name(struct jv v)
{
    switch (v.type) {
    case JV_UNDEFINED: return "Undefined";
    case JV_NONE: return "NoneType";
    case JV_BOOL: return "bool";
    case JV_INT: return "int";
    case JV_FLOAT: return "float";
    case JV_STRING: return "str";
    case JV_LIST: return v.u.l->lazy ? "generator" : v.u.l->tuple ? "tuple" : "list";
    case JV_DICT: return "dict";
    case JV_NAMESPACE: return "Namespace";
    case JV_CALLABLE: return v.u.c->kind == JC_MACRO ? "Macro" : "function";
    case JV_LOOP: return "LoopContext";
    default: return "object";
    }
}

/* ---- buffers ---- */

int jbuf_put(struct jbuf *b, const char *s, size_t n)
{
    if (n == 0) return 0;
    if (n > JINJA_HARD_MAX_BYTES || b->n + n > JINJA_HARD_MAX_BYTES) return ST_ERANGE;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return ST_ENOMEM;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
    return 0;
}

int jbuf_putc(struct jbuf *b, char ch) { return jbuf_put(b, &ch, 1); }

__attribute__((format(printf, 2, 3))) static int jbuf_printf(struct jbuf *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0) return ST_EINVAL;
    return jbuf_put(b, tmp, (size_t)ST_MIN((size_t)n, sizeof(tmp) - 1));
}

void jbuf_free(struct jbuf *b)
{
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* ---- str() / repr() ---- */

/* Python's float repr: the shortest digits that round-trip, in Python's layout. buf: at least 32 bytes. */
static void jv_float_repr(double f, char *buf, size_t n)
{
    if (isnan(f)) {
        snprintf(buf, n, "nan");
        return;
    }
    if (isinf(f)) {
        snprintf(buf, n, f < 0 ? "-inf" : "inf");
        return;
    }
    if (f == 0) {
        snprintf(buf, n, signbit(f) ? "-0.0" : "0.0");
        return;
    }
    char tmp[48];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*e", prec - 1, f);
        if (strtod(tmp, NULL) == f) break;
    }
    /* tmp: [-]d[.ddd]e[+-]XX */
    char digits[32];
    int nd = 0, neg = 0;
    const char *p = tmp;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    for (; *p && *p != 'e'; p++)
        if (*p >= '0' && *p <= '9' && nd < 30) digits[nd++] = *p;
    int exp10 = atoi(p + 1);
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    digits[nd] = 0;
    int decpt = exp10 + 1;
    char *o = buf;
    size_t left = n;
#define PUT(...)                                                                                                \
    do {                                                                                                        \
        int w_ = snprintf(o, left, __VA_ARGS__);                                                                \
        if (w_ < 0 || (size_t)w_ >= left) return;                                                               \
        o += w_;                                                                                                \
        left -= (size_t)w_;                                                                                     \
    } while (0)
    if (neg) PUT("-");
    if (decpt <= -4 || decpt > 16) {
        PUT("%c", digits[0]);
        if (nd > 1) PUT(".%s", digits + 1);
        PUT("e%c%02d", exp10 < 0 ? '-' : '+', exp10 < 0 ? -exp10 : exp10);
    } else if (decpt <= 0) {
        PUT("0.");
        for (int i = 0; i < -decpt; i++) PUT("0");
        PUT("%s", digits);
    } else if (decpt >= nd) {
        PUT("%s", digits);
        for (int i = nd; i < decpt; i++) PUT("0");
        PUT(".0");
    } else {
        PUT("%.*s.%s", decpt, digits, digits + decpt);
    }
#undef PUT
}

static bool py_isprintable(uint32_t cp)
{
    if (cp < 0x20 || cp == 0x7f) return false;
    if (cp < 0x7f) return true;
    switch (utf8proc_category((utf8proc_int32_t)cp)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
    case UTF8PROC_CATEGORY_CN:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP:
    case UTF8PROC_CATEGORY_ZS: return false;
    default: return true;
    }
}

static int repr_string(struct jbuf *b, const char *s, size_t len)
{
    char quote = '\'';
    if (memchr(s, '\'', len) && !memchr(s, '"', len)) quote = '"';
    int rc;
    if ((rc = jbuf_putc(b, quote)) < 0) return rc;
    size_t i = 0;
    while (i < len) {
        size_t adv;
        uint32_t cp = jinja_utf8_decode(s + i, len - i, &adv);
        char esc[16];
        if (cp == (uint32_t)quote || cp == '\\') {
            esc[0] = '\\';
            esc[1] = (char)cp;
            rc = jbuf_put(b, esc, 2);
        } else if (cp == '\t') {
            rc = jbuf_put(b, "\\t", 2);
        } else if (cp == '\n') {
            rc = jbuf_put(b, "\\n", 2);
        } else if (cp == '\r') {
            rc = jbuf_put(b, "\\r", 2);
        } else if (py_isprintable(cp)) {
            rc = jbuf_put(b, s + i, adv);
        } else if (cp <= 0xff) {
            rc = jbuf_printf(b, "\\x%02x", cp);
        } else if (cp <= 0xffff) {
            rc = jbuf_printf(b, "\\u%04x", cp);
        } else {
            rc = jbuf_printf(b, "\\U%08x", cp);
        }
        if (rc < 0) return rc;
        i += adv;
    }
    return jbuf_putc(b, quote);
}

static int too_deep(char *err)
{
    return err_set(err, ST_EINVAL, "value nested deeper than %d levels (or circular)", JINJA_MAX_VALUE_DEPTH);
}

int jv_repr_append(struct jbuf *b, struct jv v, int depth, char *err)
{
    int rc = 0;
    if (depth > JINJA_MAX_VALUE_DEPTH) return too_deep(err);
    switch (v.type) {
    case JV_UNDEFINED: return jbuf_put(b, "Undefined", 9);
    case JV_STRING: return repr_string(b, v.u.s->s, v.u.s->len);
    case JV_LIST: {
        const struct jv_list *l = v.u.l;
        if (l->lazy) return jbuf_put(b, "<generator object>", 18);
        if ((rc = jbuf_putc(b, l->tuple ? '(' : '[')) < 0) return rc;
        for (size_t i = 0; i < l->n; i++) {
            if (i && (rc = jbuf_put(b, ", ", 2)) < 0) return rc;
            if ((rc = jv_repr_append(b, l->v[i], depth + 1, err)) < 0) return rc;
        }
        if (l->tuple && l->n == 1 && (rc = jbuf_putc(b, ',')) < 0) return rc;
        return jbuf_putc(b, l->tuple ? ')' : ']');
    }
    case JV_NAMESPACE:
        if ((rc = jbuf_put(b, "<Namespace ", 11)) < 0) return rc;
        /* fall through */
    case JV_DICT: {
        const struct jv_dict *d = v.u.d;
        if ((rc = jbuf_putc(b, '{')) < 0) return rc;
        for (size_t i = 0; i < d->n; i++) {
            if (i && (rc = jbuf_put(b, ", ", 2)) < 0) return rc;
            if ((rc = jv_repr_append(b, d->keys[i], depth + 1, err)) < 0) return rc;
            if ((rc = jbuf_put(b, ": ", 2)) < 0) return rc;
            if ((rc = jv_repr_append(b, d->vals[i], depth + 1, err)) < 0) return rc;
        }
        if ((rc = jbuf_putc(b, '}')) < 0) return rc;
        return v.type == JV_NAMESPACE ? jbuf_putc(b, '>') : 0;
    }
    default: return jv_str_append(b, v, depth, err);
    }
}

int jv_str_append(struct jbuf *b, struct jv v, int depth, char *err)
{
    char tmp[64];
    switch (v.type) {
    case JV_UNDEFINED: return 0;
    case JV_NONE: return jbuf_put(b, "None", 4);
    case JV_BOOL: return v.u.b ? jbuf_put(b, "True", 4) : jbuf_put(b, "False", 5);
    case JV_INT: return jbuf_printf(b, "%lld", (long long)v.u.i);
    case JV_FLOAT:
        jv_float_repr(v.u.f, tmp, sizeof(tmp));
        return jbuf_put(b, tmp, strlen(tmp));
    case JV_STRING: return jbuf_put(b, v.u.s->s, v.u.s->len);
    case JV_CALLABLE:
        if (v.u.c->kind == JC_MACRO) return jbuf_printf(b, "<Macro '%s'>", v.u.c->name ? v.u.c->name : "caller");
        return jbuf_printf(b, "<built-in function %s>", v.u.c->name ? v.u.c->name : "?");
    case JV_LOOP:
        return jbuf_printf(b, "<LoopContext %lld/%lld>", (long long)(v.u.loop->index0 + 1),
                           (long long)v.u.loop->length);
    default: return jv_repr_append(b, v, depth, err);
    }
}

/* ---- json.dumps ---- */

static int dump_string(struct jbuf *b, const char *s, size_t len, bool ensure_ascii)
{
    int rc;
    if ((rc = jbuf_putc(b, '"')) < 0) return rc;
    size_t i = 0, run = 0;
    while (i < len) {
        unsigned char ch = (unsigned char)s[i];
        const char *esc = NULL;
        char tmp[16];
        size_t adv = 1;
        switch (ch) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\n': esc = "\\n"; break;
        case '\r': esc = "\\r"; break;
        case '\t': esc = "\\t"; break;
        case '\b': esc = "\\b"; break;
        case '\f': esc = "\\f"; break;
        default:
            if (ch < 0x20 || (ensure_ascii && ch == 0x7f)) {
                snprintf(tmp, sizeof(tmp), "\\u%04x", ch);
                esc = tmp;
            } else if (ensure_ascii && ch >= 0x80) {
                uint32_t cp = jinja_utf8_decode(s + i, len - i, &adv);
                if (cp >= 0x10000) {
                    uint32_t v = cp - 0x10000;
                    snprintf(tmp, sizeof(tmp), "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
                } else {
                    snprintf(tmp, sizeof(tmp), "\\u%04x", cp);
                }
                esc = tmp;
            }
        }
        if (esc) {
            if ((rc = jbuf_put(b, s + i - run, run)) < 0) return rc;
            run = 0;
            if ((rc = jbuf_put(b, esc, strlen(esc))) < 0) return rc;
            i += adv;
        } else {
            run++;
            i++;
        }
    }
    if ((rc = jbuf_put(b, s + len - run, run)) < 0) return rc;
    return jbuf_putc(b, '"');
}

static int json_float(struct jbuf *b, double f)
{
    if (isnan(f)) return jbuf_put(b, "NaN", 3);
    if (isinf(f)) return f < 0 ? jbuf_put(b, "-Infinity", 9) : jbuf_put(b, "Infinity", 8);
    char tmp[64];
    jv_float_repr(f, tmp, sizeof(tmp));
    return jbuf_put(b, tmp, strlen(tmp));
}

static int json_newline(struct jbuf *b, const struct json_opts *o, int level)
{
    int rc;
    if ((rc = jbuf_putc(b, '\n')) < 0) return rc;
    for (int i = 0; i < level; i++)
        if ((rc = jbuf_put(b, o->indent, o->indent_len)) < 0) return rc;
    return 0;
}

static int json_key(struct jbuf *b, struct jv k, const struct json_opts *o, char *err)
{
    char tmp[64];
    switch (k.type) {
    case JV_STRING: return dump_string(b, k.u.s->s, k.u.s->len, o->ensure_ascii);
    case JV_INT: snprintf(tmp, sizeof(tmp), "\"%lld\"", (long long)k.u.i); break;
    case JV_BOOL: snprintf(tmp, sizeof(tmp), "\"%s\"", k.u.b ? "true" : "false"); break;
    case JV_NONE: snprintf(tmp, sizeof(tmp), "\"null\""); break;
    case JV_FLOAT: {
        struct jbuf kb = {0};
        int rc = json_float(&kb, k.u.f);
        if (rc == 0) rc = dump_string(b, kb.p, kb.n, o->ensure_ascii);
        jbuf_free(&kb);
        return rc;
    }
    default:
        return err_set(err, ST_EINVAL, "keys must be str, int, float, bool or None, not %s", jv_type_name(k));
    }
    return jbuf_put(b, tmp, strlen(tmp));
}

/* Entry order for a dict (sorted when sort_keys). */
static int dict_order(const struct jv_dict *d, bool sort, size_t **out, char *err)
{
    size_t *ord = malloc((d->n ? d->n : 1) * sizeof(*ord));
    if (!ord) return ST_ENOMEM;
    for (size_t i = 0; i < d->n; i++) ord[i] = i;
    if (sort) {
        /* insertion sort: stable, and keys of dicts in templates are few */
        for (size_t i = 1; i < d->n; i++) {
            size_t x = ord[i], j = i;
            while (j > 0) {
                int c;
                if (jv_compare(d->keys[ord[j - 1]], d->keys[x], &c, err) < 0) {
                    free(ord);
                    return ST_EINVAL;
                }
                if (c <= 0) break;
                ord[j] = ord[j - 1];
                j--;
            }
            ord[j] = x;
        }
    }
    *out = ord;
    return 0;
}

int jv_json_append(struct jbuf *b, struct jv v, const struct json_opts *o, int depth, char *err)
{
    int rc;
    if (depth > JINJA_MAX_VALUE_DEPTH) return err_set(err, ST_EINVAL, "Circular reference detected");
    switch (v.type) {
    case JV_NONE: return jbuf_put(b, "null", 4);
    case JV_BOOL: return v.u.b ? jbuf_put(b, "true", 4) : jbuf_put(b, "false", 5);
    case JV_INT: return jbuf_printf(b, "%lld", (long long)v.u.i);
    case JV_FLOAT: return json_float(b, v.u.f);
    case JV_STRING: return dump_string(b, v.u.s->s, v.u.s->len, o->ensure_ascii);
    case JV_LIST: {
        const struct jv_list *l = v.u.l;
        if (l->lazy) return err_set(err, ST_EINVAL, "Object of type generator is not JSON serializable");
        if (l->n == 0) return jbuf_put(b, "[]", 2);
        if ((rc = jbuf_putc(b, '[')) < 0) return rc;
        for (size_t i = 0; i < l->n; i++) {
            if (i && (rc = jbuf_put(b, o->item_sep, o->item_sep_len)) < 0) return rc;
            if (o->indent && (rc = json_newline(b, o, depth + 1)) < 0) return rc;
            if ((rc = jv_json_append(b, l->v[i], o, depth + 1, err)) < 0) return rc;
        }
        if (o->indent && (rc = json_newline(b, o, depth)) < 0) return rc;
        return jbuf_putc(b, ']');
    }
    case JV_DICT: {
        const struct jv_dict *d = v.u.d;
        if (d->n == 0) return jbuf_put(b, "{}", 2);
        size_t *ord;
        if ((rc = dict_order(d, o->sort_keys, &ord, err)) < 0) return rc;
        if ((rc = jbuf_putc(b, '{')) < 0) goto done;
        for (size_t k = 0; k < d->n; k++) {
            size_t i = ord[k];
            if (k && (rc = jbuf_put(b, o->item_sep, o->item_sep_len)) < 0) goto done;
            if (o->indent && (rc = json_newline(b, o, depth + 1)) < 0) goto done;
            if ((rc = json_key(b, d->keys[i], o, err)) < 0) goto done;
            if ((rc = jbuf_put(b, o->key_sep, o->key_sep_len)) < 0) goto done;
            if ((rc = jv_json_append(b, d->vals[i], o, depth + 1, err)) < 0) goto done;
        }
        if (o->indent && (rc = json_newline(b, o, depth)) < 0) goto done;
        rc = jbuf_putc(b, '}');
    done:
        free(ord);
        return rc;
    }
    default:
        return err_set(err, ST_EINVAL, "Object of type %s is not JSON serializable", jv_type_name(v));
    }
}

/* ---- == and < ---- */

static bool is_num(struct jv v) { return v.type == JV_INT || v.type == JV_FLOAT || v.type == JV_BOOL; }

/* Compares an int with a double exactly: -1, 0, 1 (2 when f is NaN). */
static int cmp_int_float(int64_t i, double f)
{
    if (isnan(f)) return 2;
    if (f >= 9223372036854775808.0) return -1;
    if (f < -9223372036854775808.0) return 1;
    double fl = floor(f);
    int64_t fi = (int64_t)fl;
    if (i < fi) return -1;
    if (i > fi) return 1;
    return fl == f ? 0 : -1;
}

/* -1/0/1, or 2 when unordered (NaN). */
static int num_cmp(struct jv a, struct jv b)
{
    if (a.type != JV_FLOAT && b.type != JV_FLOAT) {
        int64_t x = a.type == JV_BOOL ? a.u.b : a.u.i, y = b.type == JV_BOOL ? b.u.b : b.u.i;
        return x < y ? -1 : x > y;
    }
    if (a.type == JV_FLOAT && b.type == JV_FLOAT) {
        if (isnan(a.u.f) || isnan(b.u.f)) return 2;
        return a.u.f < b.u.f ? -1 : a.u.f > b.u.f;
    }
    if (a.type == JV_FLOAT) {
        int c = cmp_int_float(b.type == JV_BOOL ? b.u.b : b.u.i, a.u.f);
        return c == 2 ? 2 : -c;
    }
    return cmp_int_float(a.type == JV_BOOL ? a.u.b : a.u.i, b.u.f);
}

bool jv_equal(struct jv a, struct jv b, int depth)
{
    if (depth > JINJA_MAX_VALUE_DEPTH) return false;
    if (is_num(a) && is_num(b)) return num_cmp(a, b) == 0;
    if (a.type != b.type) return false;
    switch (a.type) {
    case JV_UNDEFINED:
    case JV_NONE: return true;
    case JV_STRING:
        return a.u.s == b.u.s || (a.u.s->len == b.u.s->len && memcmp(a.u.s->s, b.u.s->s, a.u.s->len) == 0);
    case JV_LIST:
        if (a.u.l == b.u.l) return true;
        if (a.u.l->lazy || b.u.l->lazy) return false;
        if (a.u.l->tuple != b.u.l->tuple || a.u.l->n != b.u.l->n) return false;
        for (size_t i = 0; i < a.u.l->n; i++)
            if (!jv_equal(a.u.l->v[i], b.u.l->v[i], depth + 1)) return false;
        return true;
    case JV_DICT:
        if (a.u.d == b.u.d) return true;
        if (a.u.d->n != b.u.d->n) return false;
        for (size_t i = 0; i < a.u.d->n; i++) {
            struct jv *o = jv_dict_get(b.u.d, a.u.d->keys[i]);
            if (!o || !jv_equal(a.u.d->vals[i], *o, depth + 1)) return false;
        }
        return true;
    default: return hdr_of(a) == hdr_of(b);
    }
}

static int compare_depth(struct jv a, struct jv b, int *out, char *err, int depth)
{
    if (depth > JINJA_MAX_VALUE_DEPTH) return too_deep(err);
    if (is_num(a) && is_num(b)) {
        int c = num_cmp(a, b);
        *out = c == 2 ? 0 : c; /* NaN: neither < nor > */
        return 0;
    }
    if (a.type == JV_STRING && b.type == JV_STRING) {
        if (a.u.s == b.u.s) {
            *out = 0;
            return 0;
        }
        size_t n = ST_MIN(a.u.s->len, b.u.s->len);
        int c = memcmp(a.u.s->s, b.u.s->s, n);
        *out = c < 0 ? -1 : c > 0 ? 1 : a.u.s->len < b.u.s->len ? -1 : a.u.s->len > b.u.s->len;
        return 0;
    }
    if (a.type == JV_LIST && b.type == JV_LIST && a.u.l->tuple == b.u.l->tuple && !a.u.l->lazy && !b.u.l->lazy) {
        size_t n = ST_MIN(a.u.l->n, b.u.l->n);
        for (size_t i = 0; i < n; i++) {
            if (jv_equal(a.u.l->v[i], b.u.l->v[i], depth + 1)) continue;
            return compare_depth(a.u.l->v[i], b.u.l->v[i], out, err, depth + 1);
        }
        *out = a.u.l->n < b.u.l->n ? -1 : a.u.l->n > b.u.l->n;
        return 0;
    }
    return err_set(err, ST_EINVAL, "'<' not supported between instances of '%s' and '%s'", jv_type_name(a),
                   jv_type_name(b));
}

int jv_compare(struct jv a, struct jv b, int *out, char *err) { return compare_depth(a, b, out, err, 0); }
