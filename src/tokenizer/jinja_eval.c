/* jinja evaluator: renders a parsed template.
 *
 * Scoping follows jinja2: the template body writes to the root scope; every for-loop iteration, macro call and
 * with block gets a fresh child scope (so `set` inside them does not leak out; namespace() objects are the way
 * out); if blocks share their enclosing scope. Macros see the scope they were defined in, as it is when called.
 * Undefined values print as "", iterate as empty and test as not defined; attribute and item access on them
 * gives undefined again; any other use (arithmetic, calling) is an error naming the variable.
 *
 * Every render is bounded: nesting depth, evaluation steps, loop iterations, bytes copied and output size.
 */
#include "tokenizer/jinja.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

enum { JR_BREAK = 1, JR_CONTINUE = 2 };

#define SCOPE_INLINE 4

struct jscope {
    int32_t rc;
    bool captured;
    struct jscope *parent;
    size_t n, cap;
    const char **names; /* borrowed: from the template's pool or the vars JSON, both outlive the render */
    struct jv *vals;
    /* most scopes (a loop iteration: loop + target) fit here without another allocation */
    const char *names_inline[SCOPE_INLINE];
    struct jv vals_inline[SCOPE_INLINE];
};

/* ---- errors and budgets ---- */

int jinja_fail(struct jrender *r, const struct jnode *at, int code, const char *fmt, ...)
{
    if (r->failed) return code;
    r->failed = true;
    if (r->err) {
        char msg[ST_ERR_LEN];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        if (at) err_set(r->err, code, "chat template line %d col %d: %s", at->line, at->col, msg);
        else err_set(r->err, code, "chat template: %s", msg);
    }
    return code;
}

/* Turns a bare error code from a helper (ST_ENOMEM, ST_ERANGE from buffers) into a message. */
static int fail_rc(struct jrender *r, const struct jnode *at, int rc)
{
    if (rc == ST_ENOMEM) return jinja_fail(r, at, rc, "out of memory");
    if (rc == ST_ERANGE)
        return jinja_fail(r, at, rc, "output or value exceeds the %zu byte limit", r->lim->max_output_bytes);
    return jinja_fail(r, at, rc, "%s", st_strerror(rc));
}

uint64_t jinja_value_cost(struct jv v)
{
    switch (v.type) {
    case JV_STRING: return v.u.s->len;
    case JV_LIST: return (uint64_t)v.u.l->n * JINJA_ITEM_COST;
    case JV_DICT:
    case JV_NAMESPACE: return (uint64_t)v.u.d->n * JINJA_ITEM_COST;
    default: return 0;
    }
}

int jinja_charge(struct jrender *r, const struct jnode *at, uint64_t bytes)
{
    r->work += bytes;
    if (r->work > (uint64_t)r->lim->max_work_bytes)
        return jinja_fail(r, at, ST_ERANGE, "template does too much work (over %lld bytes copied or scanned)",
                          r->lim->max_work_bytes);
    return 0;
}

/* Fails (ST_ERANGE) when a value of len bytes would exceed the output limit. */
static int check_size(struct jrender *r, const struct jnode *at, uint64_t len)
{
    if (len > r->lim->max_output_bytes) return fail_rc(r, at, ST_ERANGE);
    return 0;
}

static int step(struct jrender *r, const struct jnode *at)
{
    if (++r->steps > (uint64_t)r->lim->max_steps)
        return jinja_fail(r, at, ST_ERANGE, "template runs too long (over %lld evaluation steps)", r->lim->max_steps);
    return 0;
}

static int enter(struct jrender *r, const struct jnode *at)
{
    if (++r->depth > r->lim->max_depth) {
        r->depth--;
        return jinja_fail(r, at, ST_ERANGE, "recursion deeper than %d levels", r->lim->max_depth);
    }
    return 0;
}

int jinja_require_defined(struct jrender *r, const struct jnode *at, struct jv v)
{
    if (v.type != JV_UNDEFINED) return 0;
    if (v.u.undef_name) return jinja_fail(r, at, ST_EINVAL, "'%s' is undefined", v.u.undef_name);
    return jinja_fail(r, at, ST_EINVAL, "undefined value used");
}

int jinja_compare(struct jrender *r, const struct jnode *at, struct jv a, struct jv b, int *cmp)
{
    char msg[ST_ERR_LEN];
    if (jv_compare(a, b, cmp, msg) < 0) return jinja_fail(r, at, ST_EINVAL, "%s", msg);
    return 0;
}

/* ---- scopes ---- */

static struct jscope *scope_new(struct jscope *parent)
{
    struct jscope *s = calloc(1, sizeof(*s));
    if (!s) return NULL;
    s->rc = 1;
    s->parent = parent;
    s->names = s->names_inline;
    s->vals = s->vals_inline;
    s->cap = SCOPE_INLINE;
    if (parent) parent->rc++;
    return s;
}

static void scope_clear(struct jscope *s)
{
    size_t n = s->n;
    struct jv *v = s->vals;
    const char **names = s->names;
    s->n = 0;
    s->cap = SCOPE_INLINE;
    s->vals = s->vals_inline;
    s->names = s->names_inline;
    for (size_t i = 0; i < n; i++) jv_unref(v[i]);
    if (v != s->vals_inline) free(v);
    if (names != s->names_inline) free(names);
}

void jinja_scope_release(struct jscope *s)
{
    while (s && --s->rc == 0) {
        struct jscope *parent = s->parent;
        scope_clear(s);
        free(s);
        s = parent;
    }
}

/* Takes ownership of v. */
static int scope_set(struct jscope *s, const char *name, struct jv v)
{
    for (size_t i = 0; i < s->n; i++) {
        if (strcmp(s->names[i], name) == 0) {
            jv_unref(s->vals[i]);
            s->vals[i] = v;
            return 0;
        }
    }
    if (s->n == s->cap) {
        size_t cap = s->cap * 2;
        const char **nn = malloc(cap * sizeof(*nn));
        struct jv *nv = malloc(cap * sizeof(*nv));
        if (!nn || !nv) {
            free(nn);
            free(nv);
            goto nomem;
        }
        memcpy(nn, s->names, s->n * sizeof(*nn));
        memcpy(nv, s->vals, s->n * sizeof(*nv));
        if (s->names != s->names_inline) free(s->names);
        if (s->vals != s->vals_inline) free(s->vals);
        s->names = nn;
        s->vals = nv;
        s->cap = cap;
    }
    s->names[s->n] = name;
    s->vals[s->n] = v;
    s->n++;
    return 0;
nomem:
    jv_unref(v);
    return ST_ENOMEM;
}

static struct jv *scope_lookup(struct jscope *s, const char *name)
{
    for (; s; s = s->parent)
        for (size_t i = 0; i < s->n; i++)
            if (strcmp(s->names[i], name) == 0) return &s->vals[i];
    return NULL;
}

/* A scope referenced by a macro outlives its block; it is cleared at the end of the render (breaking cycles). */
static int capture_scope(struct jrender *r, struct jscope *s)
{
    if (s->captured) return 0;
    if (r->n_captured == r->cap_captured) {
        size_t cap = r->cap_captured ? r->cap_captured * 2 : 8;
        struct jscope **v = realloc(r->captured, cap * sizeof(*v));
        if (!v) return ST_ENOMEM;
        r->captured = v;
        r->cap_captured = cap;
    }
    s->captured = true;
    s->rc++;
    r->captured[r->n_captured++] = s;
    return 0;
}

int jinja_track_cyclic(struct jrender *r, struct jv v)
{
    if (r->n_cyclic == r->cap_cyclic) {
        size_t cap = r->cap_cyclic ? r->cap_cyclic * 2 : 8;
        struct jv *nv = realloc(r->cyclic, cap * sizeof(*nv));
        if (!nv) return ST_ENOMEM;
        r->cyclic = nv;
        r->cap_cyclic = cap;
    }
    r->cyclic[r->n_cyclic++] = jv_ref(v);
    return 0;
}

/* ---- conversions ---- */

int jinja_new_string(struct jrender *r, const struct jnode *at, const char *s, size_t len, struct jv *out)
{
    int rc;
    if ((rc = check_size(r, at, len)) < 0) return rc;
    rc = jinja_charge(r, at, len);
    if (rc < 0) return rc;
    if ((rc = jv_string(out, s, len)) < 0) return fail_rc(r, at, rc);
    return 0;
}

int jinja_to_string(struct jrender *r, const struct jnode *at, struct jv v, struct jv *out)
{
    if (v.type == JV_STRING) {
        *out = jv_ref(v);
        return 0;
    }
    struct jbuf b = {0};
    char msg[ST_ERR_LEN];
    int rc = jv_str_append(&b, v, 0, msg);
    if (rc == 0) rc = jinja_new_string(r, at, b.p ? b.p : "", b.n, out);
    else if (rc == ST_EINVAL) rc = jinja_fail(r, at, rc, "%s", msg);
    else rc = fail_rc(r, at, rc);
    jbuf_free(&b);
    return rc;
}

int jinja_iterate(struct jrender *r, const struct jnode *at, struct jv v, struct jv_list **out)
{
    int rc;
    struct jv_list *l;
    switch (v.type) {
    case JV_LIST:
        /* whoever asks for the items walks them */
        if ((rc = jinja_charge(r, at, (uint64_t)v.u.l->n * JINJA_ITEM_COST)) < 0) return rc;
        *out = v.u.l;
        jv_ref(v);
        return 0;
    case JV_UNDEFINED:
        if (!(*out = jv_list_new(0))) return fail_rc(r, at, ST_ENOMEM);
        return 0;
    case JV_DICT:
        if ((rc = jinja_charge(r, at, v.u.d->n * JINJA_ITEM_COST)) < 0) return rc;
        if (!(l = jv_list_new(v.u.d->n))) return fail_rc(r, at, ST_ENOMEM);
        for (size_t i = 0; i < v.u.d->n; i++) l->v[l->n++] = jv_ref(v.u.d->keys[i]);
        *out = l;
        return 0;
    case JV_STRING: {
        const struct jv_str *s = v.u.s;
        if ((rc = jinja_charge(r, at, s->n_cp * (sizeof(struct jv) + sizeof(struct jv_str) + 8))) < 0) return rc;
        if (!(l = jv_list_new(s->n_cp))) return fail_rc(r, at, ST_ENOMEM);
        size_t i = 0;
        while (i < s->len) {
            size_t adv;
            jinja_utf8_decode(s->s + i, s->len - i, &adv);
            struct jv ch;
            if ((rc = jv_string(&ch, s->s + i, adv)) < 0) {
                jv_unref(jv_from_list(l));
                return fail_rc(r, at, rc);
            }
            l->v[l->n++] = ch;
            i += adv;
        }
        *out = l;
        return 0;
    }
    default: return jinja_fail(r, at, ST_EINVAL, "'%s' object is not iterable", jv_type_name(v));
    }
}

/* ---- attribute and item access ---- */

/* name: the static spelling from jinja_method_find. */
static int method_value(struct jrender *r, const struct jnode *at, struct jv self, const char *name, int id,
                        struct jv *out)
{
    struct jv_callable *c = calloc(1, sizeof(*c));
    if (!c) return fail_rc(r, at, ST_ENOMEM);
    c->rc = 1;
    c->kind = JC_METHOD;
    c->id = id;
    c->name = name;
    c->self = jv_ref(self);
    out->type = JV_CALLABLE;
    out->u.c = c;
    return 0;
}

static int loop_attr(struct jrender *r, const struct jnode *at, struct jv lv, const char *name, bool stable,
                     struct jv *out)
{
    const struct jv_loop *l = lv.u.loop;
    int64_t i = l->index0, n = l->length;
    if (!strcmp(name, "index")) *out = jv_int(i + 1);
    else if (!strcmp(name, "index0")) *out = jv_int(i);
    else if (!strcmp(name, "revindex")) *out = jv_int(n - i);
    else if (!strcmp(name, "revindex0")) *out = jv_int(n - i - 1);
    else if (!strcmp(name, "first")) *out = jv_bool(i == 0);
    else if (!strcmp(name, "last")) *out = jv_bool(i == n - 1);
    else if (!strcmp(name, "length")) *out = jv_int(n);
    else if (!strcmp(name, "depth")) *out = jv_int(l->depth0 + 1);
    else if (!strcmp(name, "depth0")) *out = jv_int(l->depth0);
    else if (!strcmp(name, "previtem"))
        *out = i > 0 ? jv_ref(l->items->v[i - 1]) : jv_undefined("previtem");
    else if (!strcmp(name, "nextitem"))
        *out = i + 1 < n ? jv_ref(l->items->v[i + 1]) : jv_undefined("nextitem");
    else if (!strcmp(name, "cycle") || !strcmp(name, "changed")) {
        const char *canon;
        int id = jinja_method_find(lv, name, &canon);
        return method_value(r, at, lv, canon, id, out);
    } else *out = jv_undefined(stable ? name : NULL);
    return 0;
}

static int getattr_impl(struct jrender *r, const struct jnode *at, struct jv obj, const char *name, bool stable,
                        struct jv *out)
{
    const char *canon;
    const char *uname = stable ? name : NULL;
    switch (obj.type) {
    case JV_DICT: {
        int id = jinja_method_find(obj, name, &canon);
        if (id != -2) return method_value(r, at, obj, canon, id, out);
        struct jv *v = jv_dict_get_str(obj.u.d, name, strlen(name));
        *out = v ? jv_ref(*v) : jv_undefined(uname);
        return 0;
    }
    case JV_NAMESPACE: {
        struct jv *v = jv_dict_get_str(obj.u.d, name, strlen(name));
        *out = v ? jv_ref(*v) : jv_undefined(uname);
        return 0;
    }
    case JV_LOOP: return loop_attr(r, at, obj, name, stable, out);
    case JV_STRING:
    case JV_LIST: {
        int id = jinja_method_find(obj, name, &canon);
        if (id != -2) return method_value(r, at, obj, canon, id, out);
        *out = jv_undefined(uname);
        return 0;
    }
    default: *out = jv_undefined(uname); return 0;
    }
}

/* obj.name where name is a template string (undefined results keep it for messages). */
static int getattr_named(struct jrender *r, const struct jnode *at, struct jv obj, const char *name, struct jv *out)
{
    return getattr_impl(r, at, obj, name, true, out);
}

int jinja_getattr_tmp(struct jrender *r, const struct jnode *at, struct jv obj, const char *name, struct jv *out)
{
    return getattr_impl(r, at, obj, name, false, out);
}

static bool as_index(struct jv k, int64_t *i)
{
    if (k.type == JV_INT) *i = k.u.i;
    else if (k.type == JV_BOOL) *i = k.u.b;
    else return false;
    return true;
}

int jinja_getitem(struct jrender *r, const struct jnode *at, struct jv obj, struct jv key, struct jv *out)
{
    int64_t i;
    int rc;
    if ((rc = jinja_charge(r, at, key.type == JV_STRING ? key.u.s->len : 0)) < 0) return rc;
    switch (obj.type) {
    case JV_DICT: {
        struct jv *v = jv_dict_get(obj.u.d, key);
        if (v) {
            *out = jv_ref(*v);
            return 0;
        }
        break;
    }
    case JV_LIST:
        if (obj.u.l->lazy) break; /* 'generator' object is not subscriptable */
        if (as_index(key, &i)) {
            int64_t n = (int64_t)obj.u.l->n;
            if (i < 0) i += n;
            *out = (i >= 0 && i < n) ? jv_ref(obj.u.l->v[i]) : jv_undefined(NULL);
            return 0;
        }
        break;
    case JV_STRING:
        if (as_index(key, &i)) {
            const struct jv_str *s = obj.u.s;
            int64_t n = (int64_t)s->n_cp;
            if (i < 0) i += n;
            if (i < 0 || i >= n) {
                *out = jv_undefined(NULL);
                return 0;
            }
            if (!s->ascii && (rc = jinja_charge(r, at, s->len)) < 0) return rc;
            size_t off = s->ascii ? (size_t)i : jinja_utf8_offset(s->s, s->len, (size_t)i);
            size_t adv = 1;
            if (!s->ascii) jinja_utf8_decode(s->s + off, s->len - off, &adv);
            return jinja_new_string(r, at, s->s + off, adv, out);
        }
        break;
    default: break;
    }
    if (key.type == JV_STRING && obj.type != JV_UNDEFINED) return jinja_getattr_tmp(r, at, obj, key.u.s->s, out);
    *out = jv_undefined(NULL);
    return 0;
}

int jinja_getattr_path(struct jrender *r, const struct jnode *at, struct jv obj, const char *path, struct jv *out)
{
    struct jv cur = jv_ref(obj);
    const char *p = path;
    for (;;) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        char part[256];
        if (n >= sizeof(part)) {
            jv_unref(cur);
            return jinja_fail(r, at, ST_EINVAL, "attribute path too long");
        }
        memcpy(part, p, n);
        part[n] = 0;
        struct jv next;
        int rc;
        bool digits = n > 0;
        for (size_t k = 0; k < n; k++)
            if (part[k] < '0' || part[k] > '9') digits = false;
        if (digits && n < 18) {
            rc = jinja_getitem(r, at, cur, jv_int(strtoll(part, NULL, 10)), &next);
        } else {
            struct jv key;
            if ((rc = jinja_new_string(r, at, part, n, &key)) < 0) {
                jv_unref(cur);
                return rc;
            }
            rc = jinja_getitem(r, at, cur, key, &next);
            jv_unref(key);
        }
        jv_unref(cur);
        if (rc < 0) return rc;
        cur = next;
        if (!dot) break;
        p = dot + 1;
    }
    *out = cur;
    return 0;
}

/* Python slice.indices + gather. */
static int do_slice(struct jrender *r, const struct jnode *at, struct jv obj, struct jv vstart, struct jv vstop,
                    struct jv vstep, struct jv *out)
{
    int64_t start = 0, stop = 0, step = 1, len;
    bool has_start = vstart.type != JV_NONE, has_stop = vstop.type != JV_NONE;
    if ((obj.type != JV_LIST && obj.type != JV_STRING) || (obj.type == JV_LIST && obj.u.l->lazy)) {
        *out = jv_undefined(NULL);
        return 0;
    }
    if ((has_start && !as_index(vstart, &start)) || (has_stop && !as_index(vstop, &stop)) ||
        (vstep.type != JV_NONE && !as_index(vstep, &step))) {
        *out = jv_undefined(NULL);
        return 0;
    }
    if (step == 0) return jinja_fail(r, at, ST_EINVAL, "slice step cannot be zero");
    len = obj.type == JV_LIST ? (int64_t)obj.u.l->n : (int64_t)obj.u.s->n_cp;
    int64_t lower = step < 0 ? -1 : 0, upper = step < 0 ? len - 1 : len;
    if (!has_start) {
        start = step < 0 ? upper : lower;
    } else if (start < 0) {
        start += len;
        if (start < lower) start = lower;
    } else if (start > upper) {
        start = upper;
    }
    if (!has_stop) {
        stop = step < 0 ? lower : upper;
    } else if (stop < 0) {
        stop += len;
        if (stop < lower) stop = lower;
    } else if (stop > upper) {
        stop = upper;
    }
    int rc;
    if (obj.type == JV_LIST) {
        struct jv_list *l = jv_list_new(0);
        if (!l) return fail_rc(r, at, ST_ENOMEM);
        l->tuple = obj.u.l->tuple;
        for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
            if ((rc = jv_list_push(l, jv_ref(obj.u.l->v[i]))) < 0 ||
                (rc = jinja_charge(r, at, JINJA_ITEM_COST)) < 0) {
                jv_unref(jv_from_list(l));
                return rc < 0 && !r->failed ? fail_rc(r, at, rc) : rc;
            }
        }
        *out = jv_from_list(l);
        return 0;
    }
    const struct jv_str *s = obj.u.s;
    if (s->ascii && step == 1) return jinja_new_string(r, at, s->s + (start < stop ? start : 0), start < stop ? (size_t)(stop - start) : 0, out);
    /* offsets of every code point */
    if ((rc = jinja_charge(r, at, s->len)) < 0) return rc;
    size_t *offs = malloc(((size_t)len + 1) * sizeof(*offs));
    if (!offs) return fail_rc(r, at, ST_ENOMEM);
    size_t o = 0;
    for (int64_t i = 0; i < len; i++) {
        offs[i] = o;
        size_t adv = 1;
        if (!s->ascii) jinja_utf8_decode(s->s + o, s->len - o, &adv);
        o += adv;
    }
    offs[len] = o;
    struct jbuf b = {0};
    rc = 0;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step)
        if ((rc = jbuf_put(&b, s->s + offs[i], offs[i + 1] - offs[i])) < 0) break;
    free(offs);
    if (rc == 0) rc = jinja_new_string(r, at, b.p ? b.p : "", b.n, out);
    else rc = fail_rc(r, at, rc);
    jbuf_free(&b);
    return rc;
}

/* ---- arithmetic ---- */

static bool num_like(struct jv v) { return v.type == JV_INT || v.type == JV_BOOL || v.type == JV_FLOAT; }
static int64_t as_i(struct jv v) { return v.type == JV_BOOL ? v.u.b : v.u.i; }
static double as_f(struct jv v) { return v.type == JV_FLOAT ? v.u.f : (double)as_i(v); }

static const char *op_symbol(enum jn_op op)
{
    static const char *const s[] = {"+", "-", "*", "/", "//", "%", "**", "==", "!=", "<", "<=", ">", ">=", "in", "not in"};
    return op < JOP_COUNT ? s[op] : "?";
}

static int type_error(struct jrender *r, const struct jnode *at, enum jn_op op, struct jv a, struct jv b)
{
    if (a.type == JV_UNDEFINED) return jinja_require_defined(r, at, a);
    if (b.type == JV_UNDEFINED) return jinja_require_defined(r, at, b);
    return jinja_fail(r, at, ST_EINVAL, "unsupported operand type(s) for %s: '%s' and '%s'", op_symbol(op),
                      jv_type_name(a), jv_type_name(b));
}

static int overflow(struct jrender *r, const struct jnode *at)
{
    return jinja_fail(r, at, ST_ERANGE, "integer overflow (beyond 64 bits)");
}

/* Python's float divmod. */
static void py_fdivmod(double vx, double wx, double *floordiv, double *modulo)
{
    double mod = fmod(vx, wx), div = (vx - mod) / wx;
    if (mod) {
        if ((wx < 0) != (mod < 0)) {
            mod += wx;
            div -= 1.0;
        }
    } else {
        mod = copysign(0.0, wx);
    }
    double fd;
    if (div) {
        fd = floor(div);
        if (div - fd > 0.5) fd += 1.0;
    } else {
        fd = copysign(0.0, vx / wx);
    }
    *floordiv = fd;
    *modulo = mod;
}

static int repeat_seq(struct jrender *r, const struct jnode *at, struct jv seq, int64_t times, struct jv *out)
{
    if (times < 0) times = 0;
    int rc;
    if (seq.type == JV_STRING) {
        size_t len = seq.u.s->len;
        if (len && (uint64_t)times > r->lim->max_output_bytes / len) return fail_rc(r, at, ST_ERANGE);
        size_t total = len * (size_t)times;
        if ((rc = jinja_charge(r, at, total)) < 0) return rc;
        struct jv_str *s = malloc(sizeof(*s) + total + 1);
        if (!s) return fail_rc(r, at, ST_ENOMEM);
        for (int64_t i = 0; i < times; i++) memcpy(s->s + (size_t)i * len, seq.u.s->s, len);
        jv_str_fill(s, s->s, total);
        s->rc = 1;
        *out = jv_from_str(s);
        return 0;
    }
    size_t n = seq.u.l->n;
    if (n && (uint64_t)times > JINJA_MAX_LIST_ITEMS / n) return fail_rc(r, at, ST_ERANGE);
    if ((rc = jinja_charge(r, at, n * (size_t)times * JINJA_ITEM_COST)) < 0) return rc;
    struct jv_list *l = jv_list_new(n * (size_t)times);
    if (!l) return fail_rc(r, at, ST_ENOMEM);
    l->tuple = seq.u.l->tuple;
    for (int64_t t = 0; t < times; t++)
        for (size_t i = 0; i < n; i++) l->v[l->n++] = jv_ref(seq.u.l->v[i]);
    *out = jv_from_list(l);
    return 0;
}

static int binop(struct jrender *r, const struct jnode *at, enum jn_op op, struct jv a, struct jv b, struct jv *out)
{
    int rc;
    if (num_like(a) && num_like(b)) {
        bool ints = a.type != JV_FLOAT && b.type != JV_FLOAT;
        int64_t x = ints ? as_i(a) : 0, y = ints ? as_i(b) : 0, z;
        double fx = as_f(a), fy = as_f(b);
        switch (op) {
        case JOP_ADD:
            if (!ints) break;
            if (__builtin_add_overflow(x, y, &z)) return overflow(r, at);
            *out = jv_int(z);
            return 0;
        case JOP_SUB:
            if (!ints) break;
            if (__builtin_sub_overflow(x, y, &z)) return overflow(r, at);
            *out = jv_int(z);
            return 0;
        case JOP_MUL:
            if (!ints) break;
            if (__builtin_mul_overflow(x, y, &z)) return overflow(r, at);
            *out = jv_int(z);
            return 0;
        case JOP_DIV:
            if (fy == 0) return jinja_fail(r, at, ST_EINVAL, "division by zero");
            *out = jv_float(fx / fy);
            return 0;
        case JOP_FLOORDIV:
        case JOP_MOD:
            if (ints) {
                if (y == 0) return jinja_fail(r, at, ST_EINVAL, "integer division or modulo by zero");
                if (x == INT64_MIN && y == -1) return overflow(r, at);
                int64_t q = x / y, m = x % y;
                if (m != 0 && ((m < 0) != (y < 0))) {
                    q--;
                    m += y;
                }
                *out = jv_int(op == JOP_FLOORDIV ? q : m);
                return 0;
            }
            if (fy == 0) return jinja_fail(r, at, ST_EINVAL, "float division by zero");
            {
                double fd, fm;
                py_fdivmod(fx, fy, &fd, &fm);
                *out = jv_float(op == JOP_FLOORDIV ? fd : fm);
            }
            return 0;
        case JOP_POW:
            if (ints && y >= 0) {
                int64_t acc = 1, base = x;
                int64_t e = y;
                while (e) {
                    if (e & 1 && __builtin_mul_overflow(acc, base, &acc)) return overflow(r, at);
                    e >>= 1;
                    if (e && __builtin_mul_overflow(base, base, &base)) return overflow(r, at);
                }
                *out = jv_int(acc);
                return 0;
            }
            if (fx == 0 && fy < 0) return jinja_fail(r, at, ST_EINVAL, "0.0 cannot be raised to a negative power");
            *out = jv_float(pow(fx, fy));
            return 0;
        default: break;
        }
        switch (op) {
        case JOP_ADD: *out = jv_float(fx + fy); return 0;
        case JOP_SUB: *out = jv_float(fx - fy); return 0;
        case JOP_MUL: *out = jv_float(fx * fy); return 0;
        default: return type_error(r, at, op, a, b);
        }
    }
    if (op == JOP_ADD && a.type == JV_STRING && b.type == JV_STRING) {
        size_t la = a.u.s->len, lb = b.u.s->len;
        if ((rc = check_size(r, at, (uint64_t)la + lb)) < 0) return rc;
        if ((rc = jinja_charge(r, at, la + lb)) < 0) return rc;
        struct jv_str *s = malloc(sizeof(*s) + la + lb + 1);
        if (!s) return fail_rc(r, at, ST_ENOMEM);
        memcpy(s->s, a.u.s->s, la);
        memcpy(s->s + la, b.u.s->s, lb);
        s->s[la + lb] = 0;
        s->rc = 1;
        s->len = la + lb;
        s->n_cp = a.u.s->n_cp + b.u.s->n_cp;
        s->ascii = a.u.s->ascii && b.u.s->ascii;
        *out = jv_from_str(s);
        return 0;
    }
    if (op == JOP_ADD && a.type == JV_LIST && b.type == JV_LIST && a.u.l->tuple == b.u.l->tuple && !a.u.l->lazy &&
        !b.u.l->lazy) {
        size_t n = a.u.l->n + b.u.l->n;
        if (n > JINJA_MAX_LIST_ITEMS) return fail_rc(r, at, ST_ERANGE);
        if ((rc = jinja_charge(r, at, n * JINJA_ITEM_COST)) < 0) return rc;
        struct jv_list *l = jv_list_new(n);
        if (!l) return fail_rc(r, at, ST_ENOMEM);
        l->tuple = a.u.l->tuple;
        for (size_t i = 0; i < a.u.l->n; i++) l->v[l->n++] = jv_ref(a.u.l->v[i]);
        for (size_t i = 0; i < b.u.l->n; i++) l->v[l->n++] = jv_ref(b.u.l->v[i]);
        *out = jv_from_list(l);
        return 0;
    }
    if (op == JOP_MUL) {
        bool sa = a.type == JV_STRING || (a.type == JV_LIST && !a.u.l->lazy);
        bool sb = b.type == JV_STRING || (b.type == JV_LIST && !b.u.l->lazy);
        if (sa && (b.type == JV_INT || b.type == JV_BOOL)) return repeat_seq(r, at, a, as_i(b), out);
        if (sb && (a.type == JV_INT || a.type == JV_BOOL)) return repeat_seq(r, at, b, as_i(a), out);
    }
    if (op == JOP_MOD && a.type == JV_STRING) return jinja_format_percent(r, at, a, b, out);
    return type_error(r, at, op, a, b);
}

static int contains(struct jrender *r, const struct jnode *at, struct jv needle, struct jv hay, bool *out)
{
    switch (hay.type) {
    case JV_STRING:
        if (needle.type != JV_STRING) {
            if (needle.type == JV_UNDEFINED) return jinja_require_defined(r, at, needle);
            return jinja_fail(r, at, ST_EINVAL, "'in <string>' requires string as left operand, not %s",
                              jv_type_name(needle));
        }
        *out = needle.u.s->len == 0 || jv_find(hay.u.s->s, hay.u.s->len, needle.u.s->s, needle.u.s->len) != NULL;
        return jinja_charge(r, at, hay.u.s->len);
    case JV_LIST:
        *out = false;
        for (size_t i = 0; i < hay.u.l->n && !*out; i++) *out = jv_equal(needle, hay.u.l->v[i], 0);
        return jinja_charge(r, at, hay.u.l->n * JINJA_ITEM_COST);
    case JV_DICT: *out = jv_dict_get(hay.u.d, needle) != NULL; return 0;
    case JV_UNDEFINED: *out = false; return 0;
    default: return jinja_fail(r, at, ST_EINVAL, "argument of type '%s' is not iterable", jv_type_name(hay));
    }
}

static int compare_op(struct jrender *r, const struct jnode *at, enum jn_op op, struct jv a, struct jv b, bool *out)
{
    int c, rc;
    if (op != JOP_IN && op != JOP_NOTIN &&
        (rc = jinja_charge(r, at, ST_MIN(jinja_value_cost(a), jinja_value_cost(b)))) < 0)
        return rc;
    switch (op) {
    case JOP_EQ: *out = jv_equal(a, b, 0); return 0;
    case JOP_NE: *out = !jv_equal(a, b, 0); return 0;
    case JOP_IN: return contains(r, at, a, b, out);
    case JOP_NOTIN:
        if ((rc = contains(r, at, a, b, out)) < 0) return rc;
        *out = !*out;
        return 0;
    default:
        if (a.type == JV_UNDEFINED || b.type == JV_UNDEFINED) return type_error(r, at, op, a, b);
        /* NaN compares false with everything */
        if ((a.type == JV_FLOAT && isnan(a.u.f)) || (b.type == JV_FLOAT && isnan(b.u.f))) {
            if (num_like(a) && num_like(b)) {
                *out = false;
                return 0;
            }
        }
        if ((rc = jinja_compare(r, at, a, b, &c)) < 0) return rc;
        *out = op == JOP_LT ? c < 0 : op == JOP_LTEQ ? c <= 0 : op == JOP_GT ? c > 0 : c >= 0;
        return 0;
    }
}

/* ---- expressions ---- */

static int eval(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv *out);
static int exec_body(struct jrender *r, const struct jn_list *body, struct jscope *s);
static int apply_filter(struct jrender *r, const struct jnode *f, struct jscope *s, struct jv in, struct jv *out);

static void args_free(struct jargs *a, struct jv *hold, int n_hold)
{
    for (int i = 0; i < a->n_pos; i++) jv_unref(a->pos[i]);
    for (int i = 0; i < a->n_kw; i++) jv_unref(a->kw[i]);
    for (int i = 0; i < n_hold; i++) jv_unref(hold[i]);
    free(a->pos);
    free(a->kw);
    free(a->kw_names);
    memset(a, 0, sizeof(*a));
}

/* Evaluates call arguments; `extra` (may be NULL) is one more keyword argument appended (the caller of a call
 * block). hold keeps the *args and **kwargs containers alive while their strings are borrowed as names. */
static int eval_args(struct jrender *r, const struct jnode *at, const struct jn_args *na, struct jscope *s,
                     const char *extra_name, struct jv extra, struct jargs *a, struct jv *hold, int *n_hold)
{
    int rc = 0;
    struct jv dyn_a = jv_none(), dyn_k = jv_none();
    *n_hold = 0;
    memset(a, 0, sizeof(*a));
    if (na->dyn_args) {
        if ((rc = eval(r, na->dyn_args, s, &dyn_a)) < 0) goto fail;
        hold[(*n_hold)++] = dyn_a;
        if (dyn_a.type != JV_LIST) {
            struct jv_list *l;
            if ((rc = jinja_iterate(r, at, dyn_a, &l)) < 0) goto fail;
            hold[(*n_hold)++] = dyn_a = jv_from_list(l);
        }
    }
    if (na->dyn_kwargs) {
        if ((rc = eval(r, na->dyn_kwargs, s, &dyn_k)) < 0) goto fail;
        hold[(*n_hold)++] = dyn_k;
        if (dyn_k.type != JV_DICT) {
            rc = jinja_fail(r, at, ST_EINVAL, "argument after ** must be a mapping, not %s", jv_type_name(dyn_k));
            goto fail;
        }
    }
    size_t n_pos = (size_t)na->pos.n + (dyn_a.type == JV_LIST ? dyn_a.u.l->n : 0);
    size_t n_kw = (size_t)na->kw.n + (dyn_k.type == JV_DICT ? dyn_k.u.d->n : 0) + (extra_name ? 1 : 0);
    if (n_pos > 100000 || n_kw > 100000) {
        rc = jinja_fail(r, at, ST_ERANGE, "too many arguments");
        goto fail;
    }
    a->pos = calloc(n_pos ? n_pos : 1, sizeof(*a->pos));
    a->kw = calloc(n_kw ? n_kw : 1, sizeof(*a->kw));
    a->kw_names = calloc(n_kw ? n_kw : 1, sizeof(*a->kw_names));
    if (!a->pos || !a->kw || !a->kw_names) {
        rc = fail_rc(r, at, ST_ENOMEM);
        goto fail;
    }
    for (int i = 0; i < na->pos.n; i++) {
        if ((rc = eval(r, na->pos.v[i], s, &a->pos[a->n_pos])) < 0) goto fail;
        a->n_pos++;
    }
    if (dyn_a.type == JV_LIST)
        for (size_t i = 0; i < dyn_a.u.l->n; i++) a->pos[a->n_pos++] = jv_ref(dyn_a.u.l->v[i]);
    for (int i = 0; i < na->kw.n; i++) {
        if ((rc = eval(r, na->kw.v[i], s, &a->kw[a->n_kw])) < 0) goto fail;
        a->kw_names[a->n_kw++] = na->kw_names[i];
    }
    if (dyn_k.type == JV_DICT) {
        for (size_t i = 0; i < dyn_k.u.d->n; i++) {
            if (dyn_k.u.d->keys[i].type != JV_STRING) {
                rc = jinja_fail(r, at, ST_EINVAL, "keywords must be strings");
                goto fail;
            }
            a->kw_names[a->n_kw] = dyn_k.u.d->keys[i].u.s->s;
            a->kw[a->n_kw++] = jv_ref(dyn_k.u.d->vals[i]);
        }
    }
    if (extra_name) {
        a->kw_names[a->n_kw] = extra_name;
        a->kw[a->n_kw++] = jv_ref(extra);
    }
    return 0;
fail:
    args_free(a, hold, *n_hold);
    *n_hold = 0;
    return rc;
}

static int call_macro(struct jrender *r, const struct jnode *at, const struct jv_callable *c, const struct jargs *a,
                      struct jv *out)
{
    const struct jnode *m = c->macro;
    const char *mname = m->u.macro.name ? m->u.macro.name : "caller";
    int n_params = m->u.macro.n_params, rc;
    if (a->n_pos > n_params && !m->u.macro.catch_varargs)
        return jinja_fail(r, at, ST_EINVAL, "macro '%s' takes not more than %d argument(s)", mname, n_params);
    struct jscope *ms = scope_new(c->closure);
    if (!ms) return fail_rc(r, at, ST_ENOMEM);
    struct jbuf buf = {0}, *saved = r->out;
    struct jv_dict *kwargs = NULL;
    struct jv_list *varargs = NULL;
    bool *used = calloc((size_t)a->n_kw + 1, sizeof(*used));
    if (!used) {
        rc = fail_rc(r, at, ST_ENOMEM);
        goto done;
    }
    for (int i = 0; i < n_params; i++) {
        const char *p = m->u.macro.params[i];
        struct jv v = jv_undefined(p);
        bool have = false;
        if (i < a->n_pos) {
            v = jv_ref(a->pos[i]);
            have = true;
        }
        for (int k = 0; k < a->n_kw; k++) {
            if (strcmp(a->kw_names[k], p) != 0) continue;
            if (have) {
                jv_unref(v);
                rc = jinja_fail(r, at, ST_EINVAL, "macro '%s' got multiple values for argument '%s'", mname, p);
                goto done;
            }
            v = jv_ref(a->kw[k]);
            used[k] = true;
            have = true;
        }
        if (!have && m->u.macro.defaults && m->u.macro.defaults[i]) {
            if ((rc = eval(r, m->u.macro.defaults[i], ms, &v)) < 0) goto done;
        }
        if ((rc = scope_set(ms, p, v)) < 0) {
            rc = fail_rc(r, at, rc);
            goto done;
        }
    }
    if (m->u.macro.catch_varargs) {
        if (!(varargs = jv_list_new(0))) {
            rc = fail_rc(r, at, ST_ENOMEM);
            goto done;
        }
        varargs->tuple = true;
        for (int i = n_params; i < a->n_pos; i++)
            if ((rc = jv_list_push(varargs, jv_ref(a->pos[i]))) < 0) {
                rc = fail_rc(r, at, rc);
                goto done;
            }
        rc = scope_set(ms, "varargs", jv_from_list(varargs));
        varargs = NULL;
        if (rc < 0) {
            rc = fail_rc(r, at, rc);
            goto done;
        }
    }
    if (m->u.macro.catch_kwargs && !(kwargs = jv_dict_new())) {
        rc = fail_rc(r, at, ST_ENOMEM);
        goto done;
    }
    bool have_caller = false;
    for (int k = 0; k < a->n_kw; k++) {
        if (used[k]) continue;
        if (strcmp(a->kw_names[k], "caller") == 0) {
            if ((rc = scope_set(ms, "caller", jv_ref(a->kw[k]))) < 0) {
                rc = fail_rc(r, at, rc);
                goto done;
            }
            have_caller = true;
            continue;
        }
        if (!kwargs) {
            rc = jinja_fail(r, at, ST_EINVAL, "macro '%s' takes no keyword argument '%s'", mname, a->kw_names[k]);
            goto done;
        }
        struct jv key;
        if ((rc = jinja_new_string(r, at, a->kw_names[k], strlen(a->kw_names[k]), &key)) < 0) goto done;
        if ((rc = jv_dict_set(kwargs, key, jv_ref(a->kw[k]))) < 0) {
            rc = fail_rc(r, at, rc);
            goto done;
        }
    }
    if (!have_caller && m->u.macro.name && (rc = scope_set(ms, "caller", jv_undefined("caller"))) < 0) {
        rc = fail_rc(r, at, rc);
        goto done;
    }
    if (kwargs) {
        rc = scope_set(ms, "kwargs", jv_from_dict(kwargs));
        kwargs = NULL;
        if (rc < 0) {
            rc = fail_rc(r, at, rc);
            goto done;
        }
    }
    r->out = &buf;
    rc = exec_body(r, &m->u.macro.body, ms);
    r->out = saved;
    if (rc < 0) goto done;
    rc = jinja_new_string(r, at, buf.p ? buf.p : "", buf.n, out);
done:
    free(used);
    if (kwargs) jv_unref(jv_from_dict(kwargs));
    if (varargs) jv_unref(jv_from_list(varargs));
    jbuf_free(&buf);
    jinja_scope_release(ms);
    return rc;
}

static int run_for(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv iter, int depth0);

/* Calls any callable value. */
static int call_value(struct jrender *r, const struct jnode *at, struct jv fn, const struct jargs *a, struct jv *out)
{
    int rc;
    if ((rc = enter(r, at)) < 0) return rc;
    if (fn.type == JV_CALLABLE) {
        const struct jv_callable *c = fn.u.c;
        switch (c->kind) {
        case JC_GLOBAL: rc = jinja_global_call(r, at, c->id, a, out); break;
        case JC_METHOD: rc = jinja_method_call(r, at, c, a, out); break;
        case JC_MACRO: rc = call_macro(r, at, c, a, out); break;
        case JC_JOINER: {
            struct jv_callable *mc = fn.u.c;
            if (!mc->used) {
                mc->used = true;
                rc = jinja_new_string(r, at, "", 0, out);
            } else {
                *out = jv_ref(mc->self);
                rc = 0;
            }
            break;
        }
        default: rc = jinja_fail(r, at, ST_EINVAL, "object is not callable"); break;
        }
    } else if (fn.type == JV_LOOP) {
        const struct jv_loop *l = fn.u.loop;
        if (!l->node || !l->node->u.for_.recursive) {
            rc = jinja_fail(r, at, ST_EINVAL, "loop() can only be called in a loop marked 'recursive'");
        } else if (a->n_pos != 1 || a->n_kw) {
            rc = jinja_fail(r, at, ST_EINVAL, "loop() takes exactly one argument");
        } else {
            struct jbuf buf = {0}, *saved = r->out;
            r->out = &buf;
            rc = run_for(r, l->node, l->scope, a->pos[0], l->depth0 + 1);
            r->out = saved;
            if (rc >= 0) rc = jinja_new_string(r, at, buf.p ? buf.p : "", buf.n, out);
            jbuf_free(&buf);
        }
    } else if (fn.type == JV_UNDEFINED) {
        rc = jinja_require_defined(r, at, fn);
    } else {
        rc = jinja_fail(r, at, ST_EINVAL, "'%s' object is not callable", jv_type_name(fn));
    }
    r->depth--;
    return rc;
}

static int eval_call(struct jrender *r, const struct jnode *n, struct jscope *s, const char *extra_name,
                     struct jv extra, struct jv *out)
{
    struct jv fn;
    int rc;
    const struct jnode *f = n->u.call.fn;
    if (f->kind == JN_NAME && !scope_lookup(s, f->u.name) && jinja_global_find(f->u.name) >= 0) {
        fn.type = JV_NONE; /* a global function: call it directly */
    } else if ((rc = eval(r, f, s, &fn)) < 0) {
        return rc;
    }
    struct jargs a;
    struct jv hold[4];
    int n_hold;
    if ((rc = eval_args(r, n, &n->u.call.args, s, extra_name, extra, &a, hold, &n_hold)) < 0) {
        jv_unref(fn);
        return rc;
    }
    if (fn.type == JV_NONE && f->kind == JN_NAME) {
        if ((rc = enter(r, n)) == 0) {
            rc = jinja_global_call(r, n, jinja_global_find(f->u.name), &a, out);
            r->depth--;
        }
    } else {
        rc = call_value(r, n, fn, &a, out);
    }
    args_free(&a, hold, n_hold);
    jv_unref(fn);
    return rc;
}

static int eval_filter(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv in, struct jv *out)
{
    struct jargs a;
    struct jv hold[4];
    int n_hold, rc;
    /* string filters and tests scan their input; list walks are charged by jinja_iterate */
    if (in.type == JV_STRING && (rc = jinja_charge(r, n, in.u.s->len)) < 0) return rc;
    if (n->kind == JN_FILTER ? !n->u.filter.filter : !n->u.filter.test) /* allowed until run: see check_names */
        return jinja_fail(r, n, ST_EUNSUPPORTED, "unsupported %s '%s'", n->kind == JN_FILTER ? "filter" : "test",
                          n->u.filter.name);
    if ((rc = eval_args(r, n, &n->u.filter.args, s, NULL, jv_none(), &a, hold, &n_hold)) < 0) return rc;
    if (n->kind == JN_FILTER) {
        rc = n->u.filter.filter(r, n, in, &a, out);
    } else {
        bool b = false;
        rc = n->u.filter.test(r, n, in, &a, &b);
        if (rc == 0) *out = jv_bool(b);
    }
    args_free(&a, hold, n_hold);
    return rc;
}

/* Applies a filter chain whose innermost expression is NULL to `in`. */
static int apply_filter(struct jrender *r, const struct jnode *f, struct jscope *s, struct jv in, struct jv *out)
{
    struct jv v;
    int rc;
    if (f->u.filter.expr) {
        if ((rc = apply_filter(r, f->u.filter.expr, s, in, &v)) < 0) return rc;
    } else {
        v = jv_ref(in);
    }
    rc = eval_filter(r, f, s, v, out);
    jv_unref(v);
    return rc;
}

static int eval_list(struct jrender *r, const struct jn_list *items, struct jscope *s, bool tuple, struct jv *out)
{
    struct jv_list *l = jv_list_new((size_t)items->n);
    int rc;
    if (!l) return fail_rc(r, NULL, ST_ENOMEM);
    l->tuple = tuple;
    for (int i = 0; i < items->n; i++) {
        if ((rc = eval(r, items->v[i], s, &l->v[l->n])) < 0) {
            jv_unref(jv_from_list(l));
            return rc;
        }
        l->n++;
    }
    *out = jv_from_list(l);
    return 0;
}

static int eval_inner(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv *out)
{
    struct jv a = jv_none(), b = jv_none();
    int rc = 0;
    switch (n->kind) {
    case JN_CONST: *out = jv_ref(n->u.cval); return 0;
    case JN_NAME: {
        struct jv *v = scope_lookup(s, n->u.name);
        if (v) {
            *out = jv_ref(*v);
            return 0;
        }
        int g = jinja_global_find(n->u.name);
        if (g < 0) {
            *out = jv_undefined(n->u.name);
            return 0;
        }
        struct jv_callable *cl = calloc(1, sizeof(*cl));
        if (!cl) return fail_rc(r, n, ST_ENOMEM);
        cl->rc = 1;
        cl->kind = JC_GLOBAL;
        cl->id = g;
        cl->name = jinja_global_name(g);
        out->type = JV_CALLABLE;
        out->u.c = cl;
        return 0;
    }
    case JN_GETATTR:
        if ((rc = eval(r, n->u.attr.obj, s, &a)) < 0) return rc;
        rc = getattr_named(r, n, a, n->u.attr.attr, out);
        break;
    case JN_GETITEM: {
        if ((rc = eval(r, n->u.item.obj, s, &a)) < 0) return rc;
        const struct jnode *k = n->u.item.key;
        if (k->kind == JN_SLICE) {
            struct jv st = jv_none(), sp = jv_none(), se = jv_none();
            if ((!k->u.slice.start || (rc = eval(r, k->u.slice.start, s, &st)) == 0) &&
                (!k->u.slice.stop || (rc = eval(r, k->u.slice.stop, s, &sp)) == 0) &&
                (!k->u.slice.step || (rc = eval(r, k->u.slice.step, s, &se)) == 0))
                rc = do_slice(r, n, a, st, sp, se, out);
            jv_unref(st);
            jv_unref(sp);
            jv_unref(se);
            break;
        }
        if ((rc = eval(r, k, s, &b)) < 0) break;
        rc = jinja_getitem(r, n, a, b, out);
        break;
    }
    case JN_LIST:
    case JN_TUPLE: return eval_list(r, &n->u.items, s, n->kind == JN_TUPLE, out);
    case JN_DICT: {
        struct jv_dict *d = jv_dict_new();
        if (!d) return fail_rc(r, n, ST_ENOMEM);
        for (int i = 0; i < n->u.dict.keys.n; i++) {
            struct jv k, v;
            if ((rc = eval(r, n->u.dict.keys.v[i], s, &k)) < 0) break;
            if ((rc = eval(r, n->u.dict.vals.v[i], s, &v)) < 0) {
                jv_unref(k);
                break;
            }
            if ((rc = jv_dict_set(d, k, v)) < 0) {
                rc = fail_rc(r, n, rc);
                break;
            }
        }
        if (rc < 0) {
            jv_unref(jv_from_dict(d));
            return rc;
        }
        *out = jv_from_dict(d);
        return 0;
    }
    case JN_NEG:
    case JN_POS:
        if ((rc = eval(r, n->u.bin.a, s, &a)) < 0) return rc;
        if (a.type == JV_FLOAT) {
            *out = jv_float(n->kind == JN_NEG ? -a.u.f : a.u.f);
        } else if (a.type == JV_INT || a.type == JV_BOOL) {
            int64_t i = as_i(a);
            if (n->kind == JN_NEG && i == INT64_MIN) rc = overflow(r, n);
            else *out = jv_int(n->kind == JN_NEG ? -i : i);
        } else if (a.type == JV_UNDEFINED) {
            rc = jinja_require_defined(r, n, a);
        } else {
            rc = jinja_fail(r, n, ST_EINVAL, "bad operand type for unary %c: '%s'", n->kind == JN_NEG ? '-' : '+',
                            jv_type_name(a));
        }
        break;
    case JN_NOT:
        if ((rc = eval(r, n->u.bin.a, s, &a)) < 0) return rc;
        *out = jv_bool(!jv_truthy(a));
        break;
    case JN_AND:
    case JN_OR:
        if ((rc = eval(r, n->u.bin.a, s, &a)) < 0) return rc;
        if (jv_truthy(a) == (n->kind == JN_OR)) {
            *out = a;
            return 0;
        }
        jv_unref(a);
        return eval(r, n->u.bin.b, s, out);
    case JN_BINOP:
        if ((rc = eval(r, n->u.bin.a, s, &a)) < 0) return rc;
        if ((rc = eval(r, n->u.bin.b, s, &b)) < 0) break;
        rc = binop(r, n, n->u.bin.op, a, b, out);
        break;
    case JN_CONCAT: {
        /* str() of each part, then one copy into the result */
        int n_parts = n->u.items.n;
        struct jv *parts = calloc((size_t)n_parts, sizeof(*parts));
        uint64_t total = 0, n_cp = 0;
        bool ascii = true;
        int done = 0;
        if (!parts) return fail_rc(r, n, ST_ENOMEM);
        for (; done < n_parts; done++) {
            if ((rc = eval(r, n->u.items.v[done], s, &a)) < 0) break;
            rc = jinja_to_string(r, n, a, &parts[done]);
            jv_unref(a);
            a = jv_none();
            if (rc < 0) break;
            total += parts[done].u.s->len;
            n_cp += parts[done].u.s->n_cp;
            ascii = ascii && parts[done].u.s->ascii;
        }
        if (rc == 0 && (rc = check_size(r, n, total)) == 0 && (rc = jinja_charge(r, n, total)) == 0) {
            struct jv_str *str = malloc(sizeof(*str) + total + 1);
            if (!str) {
                rc = fail_rc(r, n, ST_ENOMEM);
            } else {
                size_t o = 0;
                for (int i = 0; i < n_parts; i++) {
                    memcpy(str->s + o, parts[i].u.s->s, parts[i].u.s->len);
                    o += parts[i].u.s->len;
                }
                str->s[o] = 0;
                str->rc = 1;
                str->len = o;
                str->n_cp = (size_t)n_cp;
                str->ascii = ascii;
                *out = jv_from_str(str);
            }
        }
        for (int i = 0; i < done; i++) jv_unref(parts[i]);
        free(parts);
        return rc;
    }
    case JN_COMPARE: {
        if ((rc = eval(r, n->u.cmp.expr, s, &a)) < 0) return rc;
        bool res = true;
        for (int i = 0; i < n->u.cmp.operands.n; i++) {
            if ((rc = eval(r, n->u.cmp.operands.v[i], s, &b)) < 0) break;
            if ((rc = compare_op(r, n, n->u.cmp.ops[i], a, b, &res)) < 0) break;
            jv_unref(a);
            a = b;
            b = jv_none();
            if (!res) break;
        }
        if (rc == 0) *out = jv_bool(res);
        break;
    }
    case JN_COND:
        if ((rc = eval(r, n->u.cond.test, s, &a)) < 0) return rc;
        if (jv_truthy(a)) rc = eval(r, n->u.cond.yes, s, out);
        else if (n->u.cond.no) rc = eval(r, n->u.cond.no, s, out);
        else *out = jv_undefined(NULL);
        break;
    case JN_FILTER:
    case JN_TEST:
        if ((rc = eval(r, n->u.filter.expr, s, &a)) < 0) return rc;
        rc = eval_filter(r, n, s, a, out);
        break;
    case JN_CALL: return eval_call(r, n, s, NULL, jv_none(), out);
    default: return jinja_fail(r, n, ST_EINVAL, "internal error: not an expression");
    }
    jv_unref(a);
    jv_unref(b);
    return rc;
}

static int eval(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv *out)
{
    int rc;
    if ((rc = step(r, n)) < 0 || (rc = enter(r, n)) < 0) return rc;
    rc = eval_inner(r, n, s, out);
    r->depth--;
    return rc;
}

/* ---- statements ---- */

static int assign(struct jrender *r, const struct jnode *target, struct jv v, struct jscope *s)
{
    int rc;
    switch (target->kind) {
    case JN_NAME:
        if ((rc = scope_set(s, target->u.name, jv_ref(v))) < 0) return fail_rc(r, target, rc);
        return 0;
    case JN_NSREF: {
        const char *ns_name = target->u.attr.obj->u.name;
        struct jv *ns = scope_lookup(s, ns_name);
        if (!ns || ns->type != JV_NAMESPACE)
            return jinja_fail(r, target, ST_EINVAL, "cannot assign attribute on non-namespace object '%s'", ns_name);
        struct jv key;
        if ((rc = jinja_new_string(r, target, target->u.attr.attr, strlen(target->u.attr.attr), &key)) < 0) return rc;
        if ((rc = jv_dict_set(ns->u.d, key, jv_ref(v))) < 0) return fail_rc(r, target, rc);
        return 0;
    }
    case JN_TUPLE: {
        struct jv_list *l;
        if ((rc = jinja_iterate(r, target, v, &l)) < 0) return rc;
        int want = target->u.items.n;
        if ((int64_t)l->n != want) {
            rc = (int64_t)l->n > want
                     ? jinja_fail(r, target, ST_EINVAL, "too many values to unpack (expected %d)", want)
                     : jinja_fail(r, target, ST_EINVAL, "not enough values to unpack (expected %d, got %zu)", want, l->n);
        } else {
            for (int i = 0; i < want && rc == 0; i++) rc = assign(r, target->u.items.v[i], l->v[i], s);
        }
        jv_unref(jv_from_list(l));
        return rc;
    }
    default: return jinja_fail(r, target, ST_EINVAL, "cannot assign to this expression");
    }
}

/* Runs body with output captured into a new string. */
static int capture(struct jrender *r, const struct jnode *at, const struct jn_list *body, struct jscope *s,
                   struct jv *out)
{
    struct jbuf buf = {0}, *saved = r->out;
    r->out = &buf;
    int rc = exec_body(r, body, s);
    r->out = saved;
    if (rc > 0) rc = 0; /* break/continue cannot cross a capture (the parser forbids it) */
    if (rc == 0) rc = jinja_new_string(r, at, buf.p ? buf.p : "", buf.n, out);
    jbuf_free(&buf);
    return rc;
}

static int write_value(struct jrender *r, const struct jnode *at, struct jv v)
{
    char msg[ST_ERR_LEN];
    int rc;
    if (v.type == JV_STRING) rc = jbuf_put(r->out, v.u.s->s, v.u.s->len);
    else rc = jv_str_append(r->out, v, 0, msg);
    if (rc == ST_EINVAL) return jinja_fail(r, at, rc, "%s", msg);
    if (rc < 0) return fail_rc(r, at, rc);
    return check_size(r, at, r->out->n);
}

static int run_for(struct jrender *r, const struct jnode *n, struct jscope *s, struct jv iter, int depth0)
{
    struct jv_list *items = NULL, *filtered = NULL;
    struct jv loopv = jv_none();
    int rc;
    if ((rc = jinja_iterate(r, n, iter, &items)) < 0) return rc;
    if (n->u.for_.cond) {
        if (!(filtered = jv_list_new(0))) {
            rc = fail_rc(r, n, ST_ENOMEM);
            goto done;
        }
        for (size_t i = 0; i < items->n; i++) {
            struct jscope *t = scope_new(s);
            struct jv c = jv_none();
            if (!t) {
                rc = fail_rc(r, n, ST_ENOMEM);
                goto done;
            }
            rc = assign(r, n->u.for_.target, items->v[i], t);
            if (rc == 0) rc = eval(r, n->u.for_.cond, t, &c);
            jinja_scope_release(t);
            if (rc < 0) goto done;
            bool keep = jv_truthy(c);
            jv_unref(c);
            if (keep && (rc = jv_list_push(filtered, jv_ref(items->v[i]))) < 0) {
                rc = fail_rc(r, n, rc);
                goto done;
            }
        }
        jv_unref(jv_from_list(items));
        items = filtered;
        filtered = NULL;
    }
    if (items->n == 0) {
        if (n->u.for_.else_body.n) {
            struct jscope *t = scope_new(s);
            if (!t) {
                rc = fail_rc(r, n, ST_ENOMEM);
                goto done;
            }
            rc = exec_body(r, &n->u.for_.else_body, t);
            jinja_scope_release(t);
        }
        goto done;
    }
    struct jv_loop *lp = calloc(1, sizeof(*lp));
    if (!lp) {
        rc = fail_rc(r, n, ST_ENOMEM);
        goto done;
    }
    lp->rc = 1;
    lp->length = (int64_t)items->n;
    lp->depth0 = depth0;
    lp->items = items;
    jv_ref(jv_from_list(items));
    lp->changed_last = jv_undefined(NULL);
    lp->node = n;
    if (n->u.for_.recursive) {
        lp->scope = s;
        s->rc++;
    }
    loopv.type = JV_LOOP;
    loopv.u.loop = lp;
    for (size_t i = 0; i < items->n; i++) {
        if (++r->loop_iters > r->lim->max_loop_iters) {
            rc = jinja_fail(r, n, ST_ERANGE, "more than %lld loop iterations", r->lim->max_loop_iters);
            goto done;
        }
        lp->index0 = (int64_t)i;
        struct jscope *t = scope_new(s);
        if (!t) {
            rc = fail_rc(r, n, ST_ENOMEM);
            goto done;
        }
        rc = scope_set(t, "loop", jv_ref(loopv));
        if (rc < 0) rc = fail_rc(r, n, rc);
        if (rc == 0) rc = assign(r, n->u.for_.target, items->v[i], t);
        if (rc == 0) rc = exec_body(r, &n->u.for_.body, t);
        jinja_scope_release(t);
        if (rc == JR_BREAK) {
            rc = 0;
            break;
        }
        if (rc == JR_CONTINUE) rc = 0;
        if (rc < 0) goto done;
    }
done:
    if (items) jv_unref(jv_from_list(items));
    if (filtered) jv_unref(jv_from_list(filtered));
    jv_unref(loopv);
    return rc;
}

static int exec_stmt(struct jrender *r, const struct jnode *n, struct jscope *s)
{
    struct jv v = jv_none(), w = jv_none();
    int rc = 0;
    switch (n->kind) {
    case JN_DATA:
        if ((rc = jbuf_put(r->out, n->u.data.text, n->u.data.len)) < 0) return fail_rc(r, n, rc);
        return check_size(r, n, r->out->n);
    case JN_OUTPUT:
        for (int i = 0; i < n->u.items.n; i++) {
            if ((rc = eval(r, n->u.items.v[i], s, &v)) < 0) return rc;
            rc = write_value(r, n->u.items.v[i], v);
            jv_unref(v);
            if (rc < 0) return rc;
        }
        return 0;
    case JN_IF:
        if ((rc = eval(r, n->u.if_.test, s, &v)) < 0) return rc;
        rc = exec_body(r, jv_truthy(v) ? &n->u.if_.body : &n->u.if_.else_body, s);
        break;
    case JN_FOR:
        if ((rc = eval(r, n->u.for_.iter, s, &v)) < 0) return rc;
        rc = run_for(r, n, s, v, 0);
        break;
    case JN_SET:
        if ((rc = eval(r, n->u.set.expr, s, &v)) < 0) return rc;
        rc = assign(r, n->u.set.target, v, s);
        break;
    case JN_SET_BLOCK:
        if ((rc = capture(r, n, &n->u.set_block.body, s, &v)) < 0) return rc;
        if (n->u.set_block.filter) {
            rc = apply_filter(r, n->u.set_block.filter, s, v, &w);
            jv_unref(v);
            v = w;
            w = jv_none();
            if (rc < 0) return rc;
        }
        rc = assign(r, n->u.set_block.target, v, s);
        break;
    case JN_MACRO: {
        struct jv_callable *c = calloc(1, sizeof(*c));
        if (!c) return fail_rc(r, n, ST_ENOMEM);
        c->rc = 1;
        c->kind = JC_MACRO;
        c->name = n->u.macro.name;
        c->macro = n;
        c->closure = s;
        s->rc++;
        v.type = JV_CALLABLE;
        v.u.c = c;
        if ((rc = capture_scope(r, s)) < 0) rc = fail_rc(r, n, rc);
        if (rc == 0 && (rc = scope_set(s, n->u.macro.name, jv_ref(v))) < 0) rc = fail_rc(r, n, rc);
        break;
    }
    case JN_CALL_BLOCK: {
        struct jv_callable *c = calloc(1, sizeof(*c));
        if (!c) return fail_rc(r, n, ST_ENOMEM);
        c->rc = 1;
        c->kind = JC_MACRO;
        c->name = NULL;
        c->macro = n->u.call_block.caller;
        c->closure = s;
        s->rc++;
        w.type = JV_CALLABLE;
        w.u.c = c;
        if ((rc = capture_scope(r, s)) < 0) {
            rc = fail_rc(r, n, rc);
            break;
        }
        if ((rc = eval_call(r, n->u.call_block.call, s, "caller", w, &v)) < 0) break;
        rc = write_value(r, n, v);
        break;
    }
    case JN_FILTER_BLOCK:
        if ((rc = capture(r, n, &n->u.filter_block.body, s, &v)) < 0) return rc;
        if ((rc = apply_filter(r, n->u.filter_block.filter, s, v, &w)) < 0) break;
        rc = write_value(r, n, w);
        break;
    case JN_WITH: {
        struct jscope *t = scope_new(n->u.with.isolated ? r->root : s);
        if (!t) return fail_rc(r, n, ST_ENOMEM);
        for (int i = 0; i < n->u.with.targets.n && rc == 0; i++) {
            if ((rc = eval(r, n->u.with.values.v[i], s, &v)) < 0) break;
            rc = assign(r, n->u.with.targets.v[i], v, t);
            jv_unref(v);
            v = jv_none();
        }
        if (rc == 0) rc = exec_body(r, &n->u.with.body, t);
        jinja_scope_release(t);
        break;
    }
    case JN_BREAK: return JR_BREAK;
    case JN_CONTINUE: return JR_CONTINUE;
    default: return jinja_fail(r, n, ST_EINVAL, "internal error: not a statement");
    }
    jv_unref(v);
    jv_unref(w);
    return rc;
}

static int exec_body(struct jrender *r, const struct jn_list *body, struct jscope *s)
{
    for (int i = 0; i < body->n; i++) {
        const struct jnode *n = body->v[i];
        int rc;
        if ((rc = step(r, n)) < 0 || (rc = enter(r, n)) < 0) return rc;
        rc = exec_stmt(r, n, s);
        r->depth--;
        if (rc != 0) return rc;
    }
    return 0;
}

int jinja_render(const struct jn_list *body, const json_t *vars, const struct chat_template_limits *lim,
                 struct jbuf *out, char *err)
{
    struct jrender r = {.lim = lim, .out = out, .err = err};
    int rc = 0;
    if (!(r.root = scope_new(NULL))) return err_set(err, ST_ENOMEM, "chat template: out of memory");
    if (vars) {
        const char *k;
        json_t *jvv;
        json_object_foreach((json_t *)vars, k, jvv) {
            struct jv v;
            if ((rc = jv_from_json(&v, jvv, 0)) < 0) {
                rc = rc == ST_ERANGE ? jinja_fail(&r, NULL, rc, "variable '%s' is nested too deeply", k)
                                     : fail_rc(&r, NULL, rc);
                goto done;
            }
            if ((rc = scope_set(r.root, k, v)) < 0) {
                rc = fail_rc(&r, NULL, rc);
                goto done;
            }
        }
    }
    rc = exec_body(&r, body, r.root);
    if (rc > 0) rc = 0;
done:
    /* break reference cycles (namespaces holding themselves, macros held by the scope they close over) */
    for (size_t i = 0; i < r.n_cyclic; i++) jv_dict_clear(r.cyclic[i].u.d);
    for (size_t i = 0; i < r.n_captured; i++) scope_clear(r.captured[i]);
    for (size_t i = 0; i < r.n_cyclic; i++) jv_unref(r.cyclic[i]);
    for (size_t i = 0; i < r.n_captured; i++) jinja_scope_release(r.captured[i]);
    free(r.cyclic);
    free(r.captured);
    jinja_scope_release(r.root);
    return rc;
}
