/* jinja parser: tokens to an AST, following jinja2's parser.py rule by rule (precedence, tuples, filters and
 * tests, call arguments, the statement tags). Everything is allocated from the template's node pool. Unknown
 * filters and tests are compile errors (as in jinja2), and so are tags this interpreter does not run. */
#include "tokenizer/jinja.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"

/* ---- node pool ---- */

struct jpool_chunk {
    struct jpool_chunk *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
};

void *jpool_alloc(struct jpool *p, size_t bytes)
{
    bytes = (bytes + 15) & ~(size_t)15;
    if (bytes == 0) bytes = 16;
    struct jpool_chunk *c = p->head;
    if (!c || c->cap - c->used < bytes) {
        size_t cap = ST_MAX(bytes, (size_t)64 << 10);
        c = malloc(sizeof(*c) + cap);
        if (!c) return NULL;
        c->cap = cap;
        c->used = 0;
        c->next = p->head;
        p->head = c;
    }
    void *r = c->data + c->used;
    c->used += bytes;
    memset(r, 0, bytes);
    return r;
}

void jpool_free(struct jpool *p)
{
    struct jpool_chunk *c = p->head;
    while (c) {
        struct jpool_chunk *n = c->next;
        free(c);
        c = n;
    }
    p->head = NULL;
}

/* ---- parser state ---- */

struct parser {
    struct jpool *pool;
    const struct jtoken *t;
    size_t n, cur;
    char *err;
    int depth;
    int loop_depth;                /* for break/continue */
    int rc;                        /* the error code of the first failure */
    const char *tag_stack[JINJA_MAX_PARSE_DEPTH + 8];
    int n_tags;
};

#define TRY(x)                                                                                                  \
    do {                                                                                                        \
        if (!(x)) return NULL;                                                                                  \
    } while (0)

static const struct jtoken *cur(struct parser *P) { return &P->t[P->cur]; }
static const struct jtoken *peek(struct parser *P, size_t k)
{
    size_t i = P->cur + k;
    return &P->t[i < P->n ? i : P->n - 1];
}
static void next(struct parser *P)
{
    if (P->cur + 1 < P->n) P->cur++;
}

static bool tok_is_name(const struct jtoken *t, const char *name)
{
    size_t l = strlen(name);
    return t->type == JT_NAME && t->len == l && memcmp(t->s, name, l) == 0;
}

static void *pfail_at(struct parser *P, const struct jtoken *t, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void *pfail_at(struct parser *P, const struct jtoken *t, int code, const char *fmt, ...)
{
    char msg[ST_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (!P->rc) {
        P->rc = code;
        err_set(P->err, code, "chat template line %d col %d: %s", t->line, t->col, msg);
    }
    return NULL;
}
#define pfail(P, ...) pfail_at(P, cur(P), ST_EFORMAT, __VA_ARGS__)

static void *oom(struct parser *P)
{
    if (!P->rc) {
        P->rc = ST_ENOMEM;
        err_set(P->err, ST_ENOMEM, "chat template: out of memory");
    }
    return NULL;
}

static struct jnode *node_new(struct parser *P, enum jn_kind kind, const struct jtoken *at)
{
    struct jnode *n = jpool_alloc(P->pool, sizeof(*n));
    if (!n) return oom(P);
    n->kind = kind;
    n->line = at->line;
    n->col = at->col;
    return n;
}

static char *pool_strndup(struct parser *P, const char *s, size_t len)
{
    char *r = jpool_alloc(P->pool, len + 1);
    if (!r) return oom(P);
    memcpy(r, s, len);
    r[len] = 0;
    return r;
}

static const char *tok_text(struct parser *P, const struct jtoken *t) { return pool_strndup(P, t->s, t->len); }

/* Growable node array in the pool (old arrays stay in the pool until the template is freed). */
static bool list_push(struct parser *P, struct jn_list *l, int *cap, struct jnode *n)
{
    if (l->n == *cap) {
        int nc = *cap ? *cap * 2 : 4;
        struct jnode **v = jpool_alloc(P->pool, (size_t)nc * sizeof(*v));
        if (!v) return oom(P), false;
        if (l->n) memcpy(v, l->v, (size_t)l->n * sizeof(*v));
        l->v = v;
        *cap = nc;
    }
    l->v[l->n++] = n;
    return true;
}

static bool names_push(struct parser *P, const char ***v, int n, int *cap, const char *s)
{
    if (n == *cap) {
        int nc = *cap ? *cap * 2 : 4;
        const char **nv = jpool_alloc(P->pool, (size_t)nc * sizeof(*nv));
        if (!nv) return oom(P), false;
        if (n) memcpy(nv, *v, (size_t)n * sizeof(*nv));
        *v = nv;
        *cap = nc;
    }
    (*v)[n] = s;
    return true;
}

static const struct jtoken *expect(struct parser *P, enum jtok_type type, const char *what)
{
    const struct jtoken *t = cur(P);
    if (t->type != type) {
        char buf[80];
        if (t->type == JT_EOF) return pfail(P, "unexpected end of template, expected '%s'", what);
        return pfail(P, "expected token '%s', got '%s'", what, jinja_token_describe(t, buf, sizeof(buf)));
    }
    next(P);
    return t;
}

static bool expect_name(struct parser *P, const char *name)
{
    if (!tok_is_name(cur(P), name)) {
        char buf[80];
        pfail(P, "expected token '%s', got '%s'", name, jinja_token_describe(cur(P), buf, sizeof(buf)));
        return false;
    }
    next(P);
    return true;
}

static bool enter(struct parser *P)
{
    if (++P->depth > JINJA_MAX_PARSE_DEPTH) {
        pfail_at(P, cur(P), ST_ERANGE, "template nested deeper than %d levels", JINJA_MAX_PARSE_DEPTH);
        return false;
    }
    return true;
}

/* ---- expressions ---- */

static struct jnode *parse_expression(struct parser *P, bool with_condexpr);
static struct jnode *parse_tuple(struct parser *P, bool simplified, bool with_condexpr, const char *extra_end,
                                 bool explicit_parens, bool with_namespace);
static struct jnode *parse_unary(struct parser *P, bool with_filter);
static struct jnode *parse_primary(struct parser *P, bool with_namespace);
static struct jnode *parse_postfix(struct parser *P, struct jnode *node);
static struct jnode *parse_filter(struct parser *P, struct jnode *node, bool start_inline);

static bool parse_call_args(struct parser *P, struct jn_args *a)
{
    const struct jtoken *lp = expect(P, JT_LPAREN, "(");
    if (!lp) return false;
    int cap_pos = 0, cap_kw = 0, cap_names = 0;
    bool require_comma = false;
    while (cur(P)->type != JT_RPAREN) {
        if (require_comma) {
            if (!expect(P, JT_COMMA, ",")) return false;
            if (cur(P)->type == JT_RPAREN) break;
        }
        if (cur(P)->type == JT_MUL) {
            if (a->dyn_args || a->dyn_kwargs) goto bad;
            next(P);
            if (!(a->dyn_args = parse_expression(P, true))) return false;
        } else if (cur(P)->type == JT_POW) {
            if (a->dyn_kwargs) goto bad;
            next(P);
            if (!(a->dyn_kwargs = parse_expression(P, true))) return false;
        } else if (cur(P)->type == JT_NAME && peek(P, 1)->type == JT_ASSIGN) {
            if (a->dyn_kwargs) goto bad;
            const char *key = tok_text(P, cur(P));
            if (!key) return false;
            next(P);
            next(P);
            struct jnode *v = parse_expression(P, true);
            if (!v) return false;
            if (!names_push(P, &a->kw_names, a->kw.n, &cap_names, key)) return false;
            if (!list_push(P, &a->kw, &cap_kw, v)) return false;
        } else {
            if (a->dyn_args || a->dyn_kwargs || a->kw.n) goto bad;
            struct jnode *v = parse_expression(P, true);
            if (!v || !list_push(P, &a->pos, &cap_pos, v)) return false;
        }
        require_comma = true;
    }
    next(P);
    return true;
bad:
    pfail_at(P, lp, ST_EFORMAT, "invalid syntax for function call expression");
    return false;
}

static struct jnode *parse_subscribed(struct parser *P)
{
    const struct jtoken *at = cur(P);
    struct jnode *args[3] = {NULL, NULL, NULL};
    if (cur(P)->type == JT_COLON) {
        next(P);
    } else {
        struct jnode *n = parse_expression(P, true);
        if (!n) return NULL;
        if (cur(P)->type != JT_COLON) return n;
        next(P);
        args[0] = n;
    }
    if (cur(P)->type != JT_COLON && cur(P)->type != JT_RBRACKET && cur(P)->type != JT_COMMA)
        TRY(args[1] = parse_expression(P, true));
    if (cur(P)->type == JT_COLON) {
        next(P);
        if (cur(P)->type != JT_RBRACKET && cur(P)->type != JT_COMMA) TRY(args[2] = parse_expression(P, true));
    }
    struct jnode *s = node_new(P, JN_SLICE, at);
    TRY(s);
    s->u.slice.start = args[0];
    s->u.slice.stop = args[1];
    s->u.slice.step = args[2];
    return s;
}

static struct jnode *parse_subscript(struct parser *P, struct jnode *node)
{
    const struct jtoken *tok = cur(P);
    next(P);
    if (tok->type == JT_DOT) {
        const struct jtoken *a = cur(P);
        next(P);
        if (a->type == JT_NAME) {
            struct jnode *n = node_new(P, JN_GETATTR, tok);
            TRY(n);
            n->u.attr.obj = node;
            TRY(n->u.attr.attr = tok_text(P, a));
            return n;
        }
        if (a->type != JT_INT) return pfail_at(P, a, ST_EFORMAT, "expected name or number");
        struct jnode *k = node_new(P, JN_CONST, a);
        TRY(k);
        k->u.cval = jv_int(a->i);
        struct jnode *n = node_new(P, JN_GETITEM, tok);
        TRY(n);
        n->u.item.obj = node;
        n->u.item.key = k;
        return n;
    }
    /* '[' */
    struct jn_list args = {0};
    int cap = 0;
    while (cur(P)->type != JT_RBRACKET) {
        if (args.n) TRY(expect(P, JT_COMMA, ","));
        struct jnode *a = parse_subscribed(P);
        if (!a || !list_push(P, &args, &cap, a)) return NULL;
    }
    TRY(expect(P, JT_RBRACKET, "]"));
    struct jnode *key;
    if (args.n == 1) {
        key = args.v[0];
    } else {
        TRY(key = node_new(P, JN_TUPLE, tok));
        key->u.items = args;
    }
    struct jnode *n = node_new(P, JN_GETITEM, tok);
    TRY(n);
    n->u.item.obj = node;
    n->u.item.key = key;
    return n;
}

static struct jnode *parse_call(struct parser *P, struct jnode *fn)
{
    struct jnode *n = node_new(P, JN_CALL, cur(P));
    TRY(n);
    n->u.call.fn = fn;
    if (!parse_call_args(P, &n->u.call.args)) return NULL;
    return n;
}

/* Each link of a left-deep chain (a.b.c, a + b + c, x|f|g) nests the tree one level deeper: it counts
 * toward the depth limit until the chain is complete. */
static bool chain_link(struct parser *P, int *links)
{
    (*links)++;
    return enter(P);
}

static struct jnode *chain_done(struct parser *P, int links, struct jnode *n)
{
    P->depth -= links;
    return n;
}

static struct jnode *parse_postfix(struct parser *P, struct jnode *node)
{
    int links = 0;
    for (;;) {
        enum jtok_type t = cur(P)->type;
        if (t != JT_DOT && t != JT_LBRACKET && t != JT_LPAREN) return chain_done(P, links, node);
        if (!chain_link(P, &links)) return NULL;
        if (t == JT_LPAREN) TRY(node = parse_call(P, node));
        else TRY(node = parse_subscript(P, node));
    }
}

/* A dotted name after '|' or 'is'. */
static const char *parse_dotted_name(struct parser *P)
{
    const struct jtoken *t = expect(P, JT_NAME, "name");
    TRY(t);
    const char *start = t->s;
    const char *end = t->s + t->len;
    while (cur(P)->type == JT_DOT) {
        next(P);
        const struct jtoken *n = expect(P, JT_NAME, "name");
        TRY(n);
        end = n->s + n->len;
    }
    /* dotted names keep their source text (whitespace around dots is rare and only affects the message) */
    return pool_strndup(P, start, (size_t)(end - start));
}

static struct jnode *parse_filter(struct parser *P, struct jnode *node, bool start_inline)
{
    int links = 0;
    while (cur(P)->type == JT_PIPE || start_inline) {
        if (!chain_link(P, &links)) return NULL;
        if (!start_inline) next(P);
        const struct jtoken *at = cur(P);
        const char *name = parse_dotted_name(P);
        TRY(name);
        struct jnode *f = node_new(P, JN_FILTER, at);
        TRY(f);
        f->u.filter.expr = node;
        f->u.filter.name = name;
        f->u.filter.filter = jinja_filter_find(name); /* NULL: checked by check_names() */
        if (cur(P)->type == JT_LPAREN && !parse_call_args(P, &f->u.filter.args)) return NULL;
        node = f;
        start_inline = false;
    }
    return chain_done(P, links, node);
}

static struct jnode *parse_test(struct parser *P, struct jnode *node)
{
    const struct jtoken *is = cur(P);
    next(P);
    bool negated = false;
    if (tok_is_name(cur(P), "not")) {
        next(P);
        negated = true;
    }
    const struct jtoken *at = cur(P);
    const char *name = parse_dotted_name(P);
    TRY(name);
    struct jnode *t = node_new(P, JN_TEST, at);
    TRY(t);
    t->u.filter.expr = node;
    t->u.filter.name = name;
    t->u.filter.test = jinja_test_find(name); /* NULL: checked by check_names() */
    enum jtok_type ct = cur(P)->type;
    if (ct == JT_LPAREN) {
        if (!parse_call_args(P, &t->u.filter.args)) return NULL;
    } else if ((ct == JT_NAME || ct == JT_STRING || ct == JT_INT || ct == JT_FLOAT || ct == JT_LBRACKET ||
                ct == JT_LBRACE) &&
               !tok_is_name(cur(P), "else") && !tok_is_name(cur(P), "or") && !tok_is_name(cur(P), "and")) {
        if (tok_is_name(cur(P), "is")) return pfail(P, "You cannot chain multiple tests with is");
        struct jnode *arg = parse_primary(P, false);
        TRY(arg);
        TRY(arg = parse_postfix(P, arg));
        int cap = 0;
        if (!list_push(P, &t->u.filter.args.pos, &cap, arg)) return NULL;
    }
    if (!negated) return t;
    struct jnode *n = node_new(P, JN_NOT, is);
    TRY(n);
    n->u.bin.a = t;
    return n;
}

static struct jnode *parse_filter_expr(struct parser *P, struct jnode *node)
{
    int links = 0;
    for (;;) {
        bool is = tok_is_name(cur(P), "is");
        if (cur(P)->type != JT_PIPE && !is && cur(P)->type != JT_LPAREN) return chain_done(P, links, node);
        if (!chain_link(P, &links)) return NULL;
        if (cur(P)->type == JT_PIPE) TRY(node = parse_filter(P, node, false));
        else if (is) TRY(node = parse_test(P, node));
        else TRY(node = parse_call(P, node));
    }
}

static struct jnode *parse_list(struct parser *P)
{
    const struct jtoken *at = cur(P);
    next(P);
    struct jnode *n = node_new(P, JN_LIST, at);
    TRY(n);
    int cap = 0;
    while (cur(P)->type != JT_RBRACKET) {
        if (n->u.items.n) TRY(expect(P, JT_COMMA, ","));
        if (cur(P)->type == JT_RBRACKET) break;
        struct jnode *e = parse_expression(P, true);
        if (!e || !list_push(P, &n->u.items, &cap, e)) return NULL;
    }
    TRY(expect(P, JT_RBRACKET, "]"));
    return n;
}

static struct jnode *parse_dict(struct parser *P)
{
    const struct jtoken *at = cur(P);
    next(P);
    struct jnode *n = node_new(P, JN_DICT, at);
    TRY(n);
    int cap_k = 0, cap_v = 0;
    while (cur(P)->type != JT_RBRACE) {
        if (n->u.dict.keys.n) TRY(expect(P, JT_COMMA, ","));
        if (cur(P)->type == JT_RBRACE) break;
        struct jnode *k = parse_expression(P, true);
        TRY(k);
        TRY(expect(P, JT_COLON, ":"));
        struct jnode *v = parse_expression(P, true);
        TRY(v);
        if (!list_push(P, &n->u.dict.keys, &cap_k, k) || !list_push(P, &n->u.dict.vals, &cap_v, v)) return NULL;
    }
    TRY(expect(P, JT_RBRACE, "}"));
    return n;
}

static struct jnode *parse_primary(struct parser *P, bool with_namespace)
{
    const struct jtoken *t = cur(P);
    struct jnode *n;
    char buf[80];
    if (!enter(P)) return NULL;
    switch (t->type) {
    case JT_NAME:
        next(P);
        if (tok_is_name(t, "true") || tok_is_name(t, "True") || tok_is_name(t, "false") ||
            tok_is_name(t, "False")) {
            TRY(n = node_new(P, JN_CONST, t));
            n->u.cval = jv_bool(t->s[0] == 't' || t->s[0] == 'T');
        } else if (tok_is_name(t, "none") || tok_is_name(t, "None")) {
            TRY(n = node_new(P, JN_CONST, t));
            n->u.cval = jv_none();
        } else if (with_namespace && cur(P)->type == JT_DOT) {
            next(P);
            const struct jtoken *a = expect(P, JT_NAME, "name");
            TRY(a);
            struct jnode *nm = node_new(P, JN_NAME, t);
            TRY(nm);
            TRY(nm->u.name = tok_text(P, t));
            TRY(n = node_new(P, JN_NSREF, t));
            n->u.attr.obj = nm;
            TRY(n->u.attr.attr = tok_text(P, a));
        } else {
            TRY(n = node_new(P, JN_NAME, t));
            TRY(n->u.name = tok_text(P, t));
        }
        break;
    case JT_STRING: {
        size_t total = 0;
        size_t k = P->cur;
        while (k < P->n && P->t[k].type == JT_STRING) total += P->t[k++].str_len;
        struct jv_str *s = jpool_alloc(P->pool, sizeof(struct jv_str) + total + 1);
        if (!s) return oom(P);
        size_t o = 0;
        while (cur(P)->type == JT_STRING) {
            memcpy(s->s + o, cur(P)->str, cur(P)->str_len);
            o += cur(P)->str_len;
            next(P);
        }
        jv_str_fill(s, s->s, total);
        s->rc = -1; /* immortal: owned by the template */
        TRY(n = node_new(P, JN_CONST, t));
        n->u.cval = jv_from_str(s);
        break;
    }
    case JT_INT:
        next(P);
        TRY(n = node_new(P, JN_CONST, t));
        n->u.cval = jv_int(t->i);
        break;
    case JT_FLOAT:
        next(P);
        TRY(n = node_new(P, JN_CONST, t));
        n->u.cval = jv_float(t->f);
        break;
    case JT_LPAREN:
        next(P);
        TRY(n = parse_tuple(P, false, true, NULL, true, false));
        TRY(expect(P, JT_RPAREN, ")"));
        break;
    case JT_LBRACKET: TRY(n = parse_list(P)); break;
    case JT_LBRACE: TRY(n = parse_dict(P)); break;
    case JT_EOF: return pfail(P, "unexpected end of template");
    default: return pfail(P, "unexpected '%s'", jinja_token_describe(t, buf, sizeof(buf)));
    }
    P->depth--;
    return n;
}

static struct jnode *parse_unary(struct parser *P, bool with_filter)
{
    const struct jtoken *t = cur(P);
    struct jnode *n;
    if (!enter(P)) return NULL;
    if (t->type == JT_SUB || t->type == JT_ADD) {
        next(P);
        struct jnode *a = parse_unary(P, false);
        TRY(a);
        TRY(n = node_new(P, t->type == JT_SUB ? JN_NEG : JN_POS, t));
        n->u.bin.a = a;
    } else {
        TRY(n = parse_primary(P, false));
    }
    TRY(n = parse_postfix(P, n));
    if (with_filter) TRY(n = parse_filter_expr(P, n));
    P->depth--;
    return n;
}

static struct jnode *binop(struct parser *P, const struct jtoken *at, enum jn_kind kind, enum jn_op op,
                           struct jnode *a, struct jnode *b)
{
    struct jnode *n = node_new(P, kind, at);
    TRY(n);
    n->u.bin.a = a;
    n->u.bin.b = b;
    n->u.bin.op = op;
    return n;
}

static struct jnode *parse_pow(struct parser *P)
{
    struct jnode *left = parse_unary(P, true);
    TRY(left);
    int links = 0;
    while (cur(P)->type == JT_POW) {
        if (!chain_link(P, &links)) return NULL;
        const struct jtoken *at = cur(P);
        next(P);
        struct jnode *right = parse_unary(P, true);
        TRY(right);
        TRY(left = binop(P, at, JN_BINOP, JOP_POW, left, right));
    }
    return chain_done(P, links, left);
}

static struct jnode *parse_math2(struct parser *P)
{
    struct jnode *left = parse_pow(P);
    TRY(left);
    int links = 0;
    for (;;) {
        enum jtok_type t = cur(P)->type;
        enum jn_op op;
        if (t == JT_MUL) op = JOP_MUL;
        else if (t == JT_DIV) op = JOP_DIV;
        else if (t == JT_FLOORDIV) op = JOP_FLOORDIV;
        else if (t == JT_MOD) op = JOP_MOD;
        else return chain_done(P, links, left);
        if (!chain_link(P, &links)) return NULL;
        const struct jtoken *at = cur(P);
        next(P);
        struct jnode *right = parse_pow(P);
        TRY(right);
        TRY(left = binop(P, at, JN_BINOP, op, left, right));
    }
}

static struct jnode *parse_concat(struct parser *P)
{
    const struct jtoken *at = cur(P);
    struct jnode *first = parse_math2(P);
    TRY(first);
    if (cur(P)->type != JT_TILDE) return first;
    struct jnode *n = node_new(P, JN_CONCAT, at);
    TRY(n);
    int cap = 0;
    if (!list_push(P, &n->u.items, &cap, first)) return NULL;
    while (cur(P)->type == JT_TILDE) {
        next(P);
        struct jnode *e = parse_math2(P);
        if (!e || !list_push(P, &n->u.items, &cap, e)) return NULL;
    }
    return n;
}

static struct jnode *parse_math1(struct parser *P)
{
    struct jnode *left = parse_concat(P);
    TRY(left);
    int links = 0;
    while (cur(P)->type == JT_ADD || cur(P)->type == JT_SUB) {
        if (!chain_link(P, &links)) return NULL;
        const struct jtoken *at = cur(P);
        enum jn_op op = at->type == JT_ADD ? JOP_ADD : JOP_SUB;
        next(P);
        struct jnode *right = parse_concat(P);
        TRY(right);
        TRY(left = binop(P, at, JN_BINOP, op, left, right));
    }
    return chain_done(P, links, left);
}

static struct jnode *parse_compare(struct parser *P)
{
    const struct jtoken *at = cur(P);
    struct jnode *expr = parse_math1(P);
    TRY(expr);
    struct jnode *n = NULL;
    int cap = 0, cap_ops = 0;
    for (;;) {
        enum jtok_type t = cur(P)->type;
        enum jn_op op;
        if (t == JT_EQ) op = JOP_EQ;
        else if (t == JT_NE) op = JOP_NE;
        else if (t == JT_LT) op = JOP_LT;
        else if (t == JT_LTEQ) op = JOP_LTEQ;
        else if (t == JT_GT) op = JOP_GT;
        else if (t == JT_GTEQ) op = JOP_GTEQ;
        else if (tok_is_name(cur(P), "in")) op = JOP_IN;
        else if (tok_is_name(cur(P), "not") && tok_is_name(peek(P, 1), "in")) op = JOP_NOTIN;
        else break;
        next(P);
        if (op == JOP_NOTIN) next(P);
        struct jnode *operand = parse_math1(P);
        TRY(operand);
        if (!n) {
            TRY(n = node_new(P, JN_COMPARE, at));
            n->u.cmp.expr = expr;
        }
        if (n->u.cmp.operands.n == cap_ops) {
            int nc = cap_ops ? cap_ops * 2 : 4;
            enum jn_op *ops = jpool_alloc(P->pool, (size_t)nc * sizeof(*ops));
            if (!ops) return oom(P);
            if (cap_ops) memcpy(ops, n->u.cmp.ops, (size_t)cap_ops * sizeof(*ops));
            n->u.cmp.ops = ops;
            cap_ops = nc;
        }
        n->u.cmp.ops[n->u.cmp.operands.n] = op;
        if (!list_push(P, &n->u.cmp.operands, &cap, operand)) return NULL;
    }
    return n ? n : expr;
}

static struct jnode *parse_not(struct parser *P)
{
    if (tok_is_name(cur(P), "not")) {
        const struct jtoken *at = cur(P);
        if (!enter(P)) return NULL;
        next(P);
        struct jnode *a = parse_not(P);
        TRY(a);
        P->depth--;
        struct jnode *n = node_new(P, JN_NOT, at);
        TRY(n);
        n->u.bin.a = a;
        return n;
    }
    return parse_compare(P);
}

static struct jnode *parse_and(struct parser *P)
{
    struct jnode *left = parse_not(P);
    TRY(left);
    int links = 0;
    while (tok_is_name(cur(P), "and")) {
        if (!chain_link(P, &links)) return NULL;
        const struct jtoken *at = cur(P);
        next(P);
        struct jnode *right = parse_not(P);
        TRY(right);
        TRY(left = binop(P, at, JN_AND, JOP_COUNT, left, right));
    }
    return chain_done(P, links, left);
}

static struct jnode *parse_or(struct parser *P)
{
    struct jnode *left = parse_and(P);
    TRY(left);
    int links = 0;
    while (tok_is_name(cur(P), "or")) {
        if (!chain_link(P, &links)) return NULL;
        const struct jtoken *at = cur(P);
        next(P);
        struct jnode *right = parse_and(P);
        TRY(right);
        TRY(left = binop(P, at, JN_OR, JOP_COUNT, left, right));
    }
    return chain_done(P, links, left);
}

static struct jnode *parse_condexpr(struct parser *P)
{
    const struct jtoken *at = cur(P);
    if (!enter(P)) return NULL;
    struct jnode *expr1 = parse_or(P);
    TRY(expr1);
    int links = 0;
    while (tok_is_name(cur(P), "if")) {
        if (!chain_link(P, &links)) return NULL;
        next(P);
        struct jnode *expr2 = parse_or(P), *expr3 = NULL;
        TRY(expr2);
        if (tok_is_name(cur(P), "else")) {
            next(P);
            TRY(expr3 = parse_condexpr(P));
        }
        struct jnode *n = node_new(P, JN_COND, at);
        TRY(n);
        n->u.cond.test = expr2;
        n->u.cond.yes = expr1;
        n->u.cond.no = expr3;
        expr1 = n;
        at = cur(P);
    }
    P->depth -= links + 1;
    return expr1;
}

static struct jnode *parse_expression(struct parser *P, bool with_condexpr)
{
    return with_condexpr ? parse_condexpr(P) : parse_or(P);
}

static bool is_tuple_end(struct parser *P, const char *extra_end)
{
    enum jtok_type t = cur(P)->type;
    if (t == JT_VAR_END || t == JT_BLOCK_END || t == JT_RPAREN) return true;
    return extra_end && tok_is_name(cur(P), extra_end);
}

static struct jnode *parse_tuple(struct parser *P, bool simplified, bool with_condexpr, const char *extra_end,
                                 bool explicit_parens, bool with_namespace)
{
    const struct jtoken *at = cur(P);
    struct jn_list args = {0};
    int cap = 0;
    bool is_tuple = false;
    for (;;) {
        if (args.n) TRY(expect(P, JT_COMMA, ","));
        if (is_tuple_end(P, extra_end)) break;
        struct jnode *e = simplified ? parse_primary(P, with_namespace) : parse_expression(P, with_condexpr);
        if (!e || !list_push(P, &args, &cap, e)) return NULL;
        if (cur(P)->type == JT_COMMA) is_tuple = true;
        else break;
    }
    if (!is_tuple) {
        if (args.n) return args.v[0];
        if (!explicit_parens) {
            char buf[80];
            return pfail(P, "expected an expression, got '%s'", jinja_token_describe(cur(P), buf, sizeof(buf)));
        }
    }
    struct jnode *n = node_new(P, JN_TUPLE, at);
    TRY(n);
    n->u.items = args;
    return n;
}

static bool can_assign(const struct jnode *n)
{
    if (n->kind == JN_NAME || n->kind == JN_NSREF) return true;
    if (n->kind != JN_TUPLE) return false;
    for (int i = 0; i < n->u.items.n; i++)
        if (!can_assign(n->u.items.v[i])) return false;
    return true;
}

static struct jnode *parse_assign_target(struct parser *P, const char *extra_end, bool with_namespace)
{
    const struct jtoken *at = cur(P);
    struct jnode *t = parse_tuple(P, true, true, extra_end, false, with_namespace);
    TRY(t);
    if (!can_assign(t)) return pfail_at(P, at, ST_EFORMAT, "can't assign to this expression");
    return t;
}

static const char *parse_name_target(struct parser *P)
{
    const struct jtoken *t = expect(P, JT_NAME, "name");
    TRY(t);
    return tok_text(P, t);
}

/* ---- statements ---- */

static bool subparse(struct parser *P, const char *const *end_tokens, struct jn_list *body);

static bool at_end_token(struct parser *P, const char *const *end_tokens)
{
    for (int i = 0; end_tokens && end_tokens[i]; i++)
        if (tok_is_name(cur(P), end_tokens[i])) return true;
    return false;
}

static bool parse_statements(struct parser *P, const char *const *end_tokens, bool drop_needle,
                             struct jn_list *body)
{
    if (cur(P)->type == JT_COLON) next(P);
    if (!expect(P, JT_BLOCK_END, "end of statement block")) return false;
    if (!subparse(P, end_tokens, body)) return false;
    if (cur(P)->type == JT_EOF) {
        char want[160] = "";
        for (int i = 0; end_tokens[i]; i++) {
            size_t l = strlen(want);
            snprintf(want + l, sizeof(want) - l, "%s'%s'", i ? " or " : "", end_tokens[i]);
        }
        pfail(P, "unexpected end of template, expected %s (to close '%s')", want,
              P->n_tags ? P->tag_stack[P->n_tags - 1] : "?");
        return false;
    }
    if (drop_needle) next(P);
    return true;
}

static bool parse_signature(struct parser *P, struct jnode *m)
{
    if (!expect(P, JT_LPAREN, "(")) return false;
    int cap = 0;
    const char **params = NULL;
    struct jnode *defaults[256];
    bool any_default = false;
    int n = 0;
    while (cur(P)->type != JT_RPAREN) {
        if (n && !expect(P, JT_COMMA, ",")) return false;
        if (n == (int)ST_ARRAY_LEN(defaults)) return pfail(P, "too many macro parameters"), false;
        const char *name = parse_name_target(P);
        if (!name) return false;
        defaults[n] = NULL;
        if (cur(P)->type == JT_ASSIGN) {
            next(P);
            if (!(defaults[n] = parse_expression(P, true))) return false;
            any_default = true;
        } else if (any_default) {
            return pfail(P, "non-default argument follows default argument"), false;
        }
        if (!names_push(P, &params, n, &cap, name)) return false;
        n++;
    }
    next(P);
    m->u.macro.n_params = n;
    m->u.macro.params = params;
    if (n) {
        m->u.macro.defaults = jpool_alloc(P->pool, (size_t)n * sizeof(struct jnode *));
        if (!m->u.macro.defaults) return oom(P), false;
        memcpy(m->u.macro.defaults, defaults, (size_t)n * sizeof(struct jnode *));
    }
    return true;
}

/* Whether name is referenced anywhere below n (for varargs/kwargs in macros). */
static bool references(const struct jnode *n, const char *name);
static bool list_references(const struct jn_list *l, const char *name)
{
    for (int i = 0; i < l->n; i++)
        if (references(l->v[i], name)) return true;
    return false;
}
static bool args_reference(const struct jn_args *a, const char *name)
{
    return list_references(&a->pos, name) || list_references(&a->kw, name) ||
           (a->dyn_args && references(a->dyn_args, name)) || (a->dyn_kwargs && references(a->dyn_kwargs, name));
}
static bool references(const struct jnode *n, const char *name)
{
    if (!n) return false;
    switch (n->kind) {
    case JN_NAME: return strcmp(n->u.name, name) == 0;
    case JN_GETATTR:
    case JN_NSREF: return references(n->u.attr.obj, name);
    case JN_GETITEM: return references(n->u.item.obj, name) || references(n->u.item.key, name);
    case JN_SLICE:
        return references(n->u.slice.start, name) || references(n->u.slice.stop, name) ||
               references(n->u.slice.step, name);
    case JN_LIST:
    case JN_TUPLE:
    case JN_CONCAT:
    case JN_OUTPUT: return list_references(&n->u.items, name);
    case JN_DICT: return list_references(&n->u.dict.keys, name) || list_references(&n->u.dict.vals, name);
    case JN_NEG:
    case JN_POS:
    case JN_NOT:
    case JN_AND:
    case JN_OR:
    case JN_BINOP: return references(n->u.bin.a, name) || references(n->u.bin.b, name);
    case JN_COMPARE: return references(n->u.cmp.expr, name) || list_references(&n->u.cmp.operands, name);
    case JN_COND:
        return references(n->u.cond.test, name) || references(n->u.cond.yes, name) || references(n->u.cond.no, name);
    case JN_FILTER:
    case JN_TEST: return references(n->u.filter.expr, name) || args_reference(&n->u.filter.args, name);
    case JN_CALL: return references(n->u.call.fn, name) || args_reference(&n->u.call.args, name);
    case JN_IF:
        return references(n->u.if_.test, name) || list_references(&n->u.if_.body, name) ||
               list_references(&n->u.if_.else_body, name);
    case JN_FOR:
        return references(n->u.for_.iter, name) || references(n->u.for_.cond, name) ||
               list_references(&n->u.for_.body, name) || list_references(&n->u.for_.else_body, name);
    case JN_SET: return references(n->u.set.expr, name);
    case JN_SET_BLOCK: return references(n->u.set_block.filter, name) || list_references(&n->u.set_block.body, name);
    case JN_CALL_BLOCK: return references(n->u.call_block.call, name) || references(n->u.call_block.caller, name);
    case JN_MACRO: return list_references(&n->u.macro.body, name);
    case JN_FILTER_BLOCK:
        return references(n->u.filter_block.filter, name) || list_references(&n->u.filter_block.body, name);
    case JN_WITH: return list_references(&n->u.with.values, name) || list_references(&n->u.with.body, name);
    default: return false;
    }
}

static struct jnode *parse_for(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_FOR, at);
    TRY(n);
    TRY(n->u.for_.target = parse_assign_target(P, "in", false));
    if (!expect_name(P, "in")) return NULL;
    TRY(n->u.for_.iter = parse_tuple(P, false, false, "recursive", false, false));
    if (tok_is_name(cur(P), "if")) {
        next(P);
        TRY(n->u.for_.cond = parse_expression(P, true));
    }
    if (tok_is_name(cur(P), "recursive")) {
        next(P);
        n->u.for_.recursive = true;
    }
    static const char *const ends1[] = {"endfor", "else", NULL};
    static const char *const ends2[] = {"endfor", NULL};
    P->loop_depth++;
    if (!parse_statements(P, ends1, false, &n->u.for_.body)) return NULL;
    P->loop_depth--;
    bool has_else = tok_is_name(cur(P), "else");
    next(P);
    if (has_else && !parse_statements(P, ends2, true, &n->u.for_.else_body)) return NULL;
    return n;
}

static struct jnode *parse_if(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_IF, at);
    TRY(n);
    struct jnode *result = n;
    static const char *const ends1[] = {"elif", "else", "endif", NULL};
    static const char *const ends2[] = {"endif", NULL};
    int n_elif = 0;
    for (;;) {
        TRY(n->u.if_.test = parse_tuple(P, false, false, NULL, false, false));
        if (!parse_statements(P, ends1, false, &n->u.if_.body)) return NULL;
        const struct jtoken *t = cur(P);
        next(P);
        if (tok_is_name(t, "elif")) {
            struct jnode *e = node_new(P, JN_IF, cur(P));
            TRY(e);
            int cap = 0;
            if (!list_push(P, &n->u.if_.else_body, &cap, e)) return NULL;
            n = e;
            if (!enter(P)) return NULL; /* elif chains nest (and are evaluated recursively) */
            n_elif++;
            continue;
        }
        if (tok_is_name(t, "else") && !parse_statements(P, ends2, true, &n->u.if_.else_body)) return NULL;
        break;
    }
    P->depth -= n_elif;
    return result;
}

static struct jnode *parse_set(struct parser *P, const struct jtoken *at)
{
    struct jnode *target = parse_assign_target(P, NULL, true);
    TRY(target);
    if (cur(P)->type == JT_ASSIGN) {
        next(P);
        struct jnode *n = node_new(P, JN_SET, at);
        TRY(n);
        n->u.set.target = target;
        TRY(n->u.set.expr = parse_tuple(P, false, true, NULL, false, false));
        return n;
    }
    if (target->kind == JN_TUPLE) return pfail_at(P, at, ST_EUNSUPPORTED, "a set block needs a single target");
    struct jnode *n = node_new(P, JN_SET_BLOCK, at);
    TRY(n);
    n->u.set_block.target = target;
    if (cur(P)->type == JT_PIPE) TRY(n->u.set_block.filter = parse_filter(P, NULL, false));
    static const char *const ends[] = {"endset", NULL};
    if (!parse_statements(P, ends, true, &n->u.set_block.body)) return NULL;
    return n;
}

static struct jnode *parse_macro(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_MACRO, at);
    TRY(n);
    TRY(n->u.macro.name = parse_name_target(P));
    if (!parse_signature(P, n)) return NULL;
    static const char *const ends[] = {"endmacro", NULL};
    int saved = P->loop_depth;
    P->loop_depth = 0;
    if (!parse_statements(P, ends, true, &n->u.macro.body)) return NULL;
    P->loop_depth = saved;
    n->u.macro.catch_varargs = list_references(&n->u.macro.body, "varargs");
    n->u.macro.catch_kwargs = list_references(&n->u.macro.body, "kwargs");
    return n;
}

static struct jnode *parse_call_block(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_CALL_BLOCK, at);
    TRY(n);
    struct jnode *caller = node_new(P, JN_MACRO, at);
    TRY(caller);
    if (cur(P)->type == JT_LPAREN && !parse_signature(P, caller)) return NULL;
    struct jnode *call = parse_expression(P, true);
    TRY(call);
    if (call->kind != JN_CALL) return pfail_at(P, at, ST_EFORMAT, "expected call");
    n->u.call_block.call = call;
    n->u.call_block.caller = caller;
    static const char *const ends[] = {"endcall", NULL};
    int saved = P->loop_depth;
    P->loop_depth = 0;
    if (!parse_statements(P, ends, true, &caller->u.macro.body)) return NULL;
    P->loop_depth = saved;
    caller->u.macro.catch_varargs = list_references(&caller->u.macro.body, "varargs");
    caller->u.macro.catch_kwargs = list_references(&caller->u.macro.body, "kwargs");
    return n;
}

static struct jnode *parse_filter_block(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_FILTER_BLOCK, at);
    TRY(n);
    TRY(n->u.filter_block.filter = parse_filter(P, NULL, true));
    static const char *const ends[] = {"endfilter", NULL};
    if (!parse_statements(P, ends, true, &n->u.filter_block.body)) return NULL;
    return n;
}

static struct jnode *parse_with(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_WITH, at);
    TRY(n);
    int cap_t = 0, cap_v = 0;
    while (cur(P)->type != JT_BLOCK_END) {
        if (n->u.with.targets.n) TRY(expect(P, JT_COMMA, ","));
        struct jnode *t = parse_assign_target(P, NULL, false);
        TRY(t);
        TRY(expect(P, JT_ASSIGN, "="));
        struct jnode *v = parse_expression(P, true);
        TRY(v);
        if (!list_push(P, &n->u.with.targets, &cap_t, t) || !list_push(P, &n->u.with.values, &cap_v, v)) return NULL;
    }
    static const char *const ends[] = {"endwith", NULL};
    if (!parse_statements(P, ends, true, &n->u.with.body)) return NULL;
    return n;
}

/* {% block name [scoped] %}: a standalone template renders its blocks in place; unless scoped, a block sees
 * the template's top-level variables but not the loop or macro around it. */
static struct jnode *parse_block(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_WITH, at);
    TRY(n);
    const struct jtoken *name = expect(P, JT_NAME, "block name");
    TRY(name);
    n->u.with.isolated = true;
    if (tok_is_name(cur(P), "scoped")) {
        next(P);
        n->u.with.isolated = false;
    }
    if (tok_is_name(cur(P), "required")) return pfail(P, "unsupported: required blocks");
    static const char *const ends[] = {"endblock", NULL};
    int saved = P->loop_depth;
    P->loop_depth = 0;
    if (!parse_statements(P, ends, true, &n->u.with.body)) return NULL;
    P->loop_depth = saved;
    if (cur(P)->type == JT_NAME) {
        if (cur(P)->len != name->len || memcmp(cur(P)->s, name->s, name->len) != 0)
            return pfail(P, "mismatched block name");
        next(P);
    }
    return n;
}

/* {% generation %} (Hugging Face's AssistantTracker): renders its body unchanged. */
static struct jnode *parse_generation(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_WITH, at);
    TRY(n);
    static const char *const ends[] = {"endgeneration", NULL};
    if (!parse_statements(P, ends, true, &n->u.with.body)) return NULL;
    return n;
}

static struct jnode *parse_print(struct parser *P, const struct jtoken *at)
{
    struct jnode *n = node_new(P, JN_OUTPUT, at);
    TRY(n);
    int cap = 0;
    while (cur(P)->type != JT_BLOCK_END) {
        if (n->u.items.n) TRY(expect(P, JT_COMMA, ","));
        struct jnode *e = parse_expression(P, true);
        if (!e || !list_push(P, &n->u.items, &cap, e)) return NULL;
    }
    return n;
}

static const char *const block_tags[] = {"for", "if", "set", "macro", "call", "filter", "with", "generation", "block", NULL};

static struct jnode *parse_statement(struct parser *P)
{
    const struct jtoken *t = cur(P);
    if (t->type != JT_NAME) return pfail(P, "tag name expected");
    if (!enter(P)) return NULL;
    static const char *const unsupported[] = {"extends", "include", "import", "from", "autoescape", "do",
                                              "trans", "pluralize", NULL};
    char name[32];
    snprintf(name, sizeof(name), "%.*s", (int)ST_MIN(t->len, sizeof(name) - 1), t->s);
    const char *tag = NULL;
    for (int i = 0; block_tags[i]; i++)
        if (tok_is_name(t, block_tags[i])) tag = block_tags[i];
    if (tag) P->tag_stack[P->n_tags++] = tag;
    next(P);
    struct jnode *n = NULL;
    if (tok_is_name(t, "for")) n = parse_for(P, t);
    else if (tok_is_name(t, "if")) n = parse_if(P, t);
    else if (tok_is_name(t, "set")) n = parse_set(P, t);
    else if (tok_is_name(t, "macro")) n = parse_macro(P, t);
    else if (tok_is_name(t, "call")) n = parse_call_block(P, t);
    else if (tok_is_name(t, "filter")) n = parse_filter_block(P, t);
    else if (tok_is_name(t, "with")) n = parse_with(P, t);
    else if (tok_is_name(t, "generation")) n = parse_generation(P, t);
    else if (tok_is_name(t, "block")) n = parse_block(P, t);
    else if (tok_is_name(t, "print")) n = parse_print(P, t);
    else if (tok_is_name(t, "break") || tok_is_name(t, "continue")) {
        if (P->loop_depth == 0) return pfail_at(P, t, ST_EFORMAT, "'%s' outside of a loop", name);
        n = node_new(P, tok_is_name(t, "break") ? JN_BREAK : JN_CONTINUE, t);
    } else {
        for (int i = 0; unsupported[i]; i++)
            if (tok_is_name(t, unsupported[i]))
                return pfail_at(P, t, ST_EUNSUPPORTED, "unsupported tag '%s'", name);
        if (P->n_tags > 0)
            return pfail_at(P, t, ST_EFORMAT,
                            "unexpected tag '%s' (the innermost block that needs to be closed is '%s')", name,
                            P->tag_stack[P->n_tags - 1]);
        return pfail_at(P, t, ST_EFORMAT, "unknown tag '%s'", name);
    }
    if (tag) P->n_tags--;
    P->depth--;
    return n;
}

static bool subparse(struct parser *P, const char *const *end_tokens, struct jn_list *body)
{
    int cap = 0;
    for (;;) {
        const struct jtoken *t = cur(P);
        struct jnode *n = NULL;
        switch (t->type) {
        case JT_EOF: return true;
        case JT_DATA:
            n = node_new(P, JN_DATA, t);
            if (!n) return false;
            n->u.data.text = t->s;
            n->u.data.len = t->len;
            next(P);
            break;
        case JT_VAR_BEGIN: {
            next(P);
            struct jnode *e = parse_tuple(P, false, true, NULL, false, false);
            if (!e) return false;
            if (!expect(P, JT_VAR_END, "end of print statement")) return false;
            n = node_new(P, JN_OUTPUT, t);
            if (!n) return false;
            int c1 = 0;
            if (!list_push(P, &n->u.items, &c1, e)) return false;
            break;
        }
        case JT_BLOCK_BEGIN:
            next(P);
            if (end_tokens && at_end_token(P, end_tokens)) return true;
            if (!(n = parse_statement(P))) return false;
            if (!expect(P, JT_BLOCK_END, "end of statement block")) return false;
            break;
        default: {
            char buf[80];
            pfail(P, "unexpected '%s'", jinja_token_describe(t, buf, sizeof(buf)));
            return false;
        }
        }
        if (!list_push(P, body, &cap, n)) return false;
    }
}

/* Unknown filters and tests: jinja2 fails at compile time, except inside an if statement or a conditional
 * expression (a "soft frame"), where the error waits until the filter actually runs. Loop bodies, macros, call,
 * filter, set and with blocks start over as not soft. */
static bool check_names(struct parser *P, const struct jnode *n, bool soft);

static bool check_list(struct parser *P, const struct jn_list *l, bool soft)
{
    for (int i = 0; i < l->n; i++)
        if (!check_names(P, l->v[i], soft)) return false;
    return true;
}

static bool check_args(struct parser *P, const struct jn_args *a, bool soft)
{
    return check_list(P, &a->pos, soft) && check_list(P, &a->kw, soft) && check_names(P, a->dyn_args, soft) &&
           check_names(P, a->dyn_kwargs, soft);
}

static bool check_macro(struct parser *P, const struct jnode *m)
{
    for (int i = 0; i < m->u.macro.n_params; i++)
        if (m->u.macro.defaults && !check_names(P, m->u.macro.defaults[i], false)) return false;
    return check_list(P, &m->u.macro.body, false);
}

static bool check_names(struct parser *P, const struct jnode *n, bool soft)
{
    if (!n) return true;
    switch (n->kind) {
    case JN_FILTER:
    case JN_TEST:
        if (!soft && !(n->kind == JN_FILTER ? (void *)n->u.filter.filter : (void *)n->u.filter.test)) {
            struct jtoken at = {.line = n->line, .col = n->col};
            pfail_at(P, &at, ST_EUNSUPPORTED, "unsupported %s '%s'", n->kind == JN_FILTER ? "filter" : "test",
                     n->u.filter.name);
            return false;
        }
        return check_names(P, n->u.filter.expr, soft) && check_args(P, &n->u.filter.args, soft);
    case JN_GETATTR:
    case JN_NSREF: return check_names(P, n->u.attr.obj, soft);
    case JN_GETITEM: return check_names(P, n->u.item.obj, soft) && check_names(P, n->u.item.key, soft);
    case JN_SLICE:
        return check_names(P, n->u.slice.start, soft) && check_names(P, n->u.slice.stop, soft) &&
               check_names(P, n->u.slice.step, soft);
    case JN_LIST:
    case JN_TUPLE:
    case JN_CONCAT:
    case JN_OUTPUT: return check_list(P, &n->u.items, soft);
    case JN_DICT: return check_list(P, &n->u.dict.keys, soft) && check_list(P, &n->u.dict.vals, soft);
    case JN_NEG:
    case JN_POS:
    case JN_NOT:
    case JN_AND:
    case JN_OR:
    case JN_BINOP: return check_names(P, n->u.bin.a, soft) && check_names(P, n->u.bin.b, soft);
    case JN_COMPARE: return check_names(P, n->u.cmp.expr, soft) && check_list(P, &n->u.cmp.operands, soft);
    case JN_COND:
        return check_names(P, n->u.cond.test, true) && check_names(P, n->u.cond.yes, true) &&
               check_names(P, n->u.cond.no, true);
    case JN_CALL: return check_names(P, n->u.call.fn, soft) && check_args(P, &n->u.call.args, soft);
    case JN_IF:
        return check_names(P, n->u.if_.test, true) && check_list(P, &n->u.if_.body, true) &&
               check_list(P, &n->u.if_.else_body, true);
    case JN_FOR:
        return check_names(P, n->u.for_.iter, soft) && check_names(P, n->u.for_.cond, false) &&
               check_list(P, &n->u.for_.body, false) && check_list(P, &n->u.for_.else_body, false);
    case JN_SET: return check_names(P, n->u.set.expr, soft);
    case JN_SET_BLOCK:
        return check_names(P, n->u.set_block.filter, false) && check_list(P, &n->u.set_block.body, false);
    case JN_MACRO: return check_macro(P, n);
    case JN_CALL_BLOCK:
        return check_names(P, n->u.call_block.call, soft) && check_macro(P, n->u.call_block.caller);
    case JN_FILTER_BLOCK:
        return check_names(P, n->u.filter_block.filter, false) && check_list(P, &n->u.filter_block.body, false);
    case JN_WITH: return check_list(P, &n->u.with.values, soft) && check_list(P, &n->u.with.body, false);
    default: return true;
    }
}

int jinja_parse(struct jpool *pool, const struct jtoken_list *toks, struct jn_list *body, char *err)
{
    struct parser P = {.pool = pool, .t = toks->v, .n = toks->n, .err = err};
    memset(body, 0, sizeof(*body));
    if (err) err[0] = 0;
    ST_ASSERT(toks->n > 0 && toks->v[toks->n - 1].type == JT_EOF);
    if (!subparse(&P, NULL, body) || !check_list(&P, body, false)) return P.rc ? P.rc : ST_EFORMAT;
    return 0;
}
