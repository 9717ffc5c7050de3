/* jinja: the private interface shared by the Jinja2-subset interpreter behind chat_template.h.
 *
 * Not a public header: only src/tokenizer/chat_template.c and src/tokenizer/jinja_*.c include it.
 * - jinja_value.c: values (refcounted, immutable except namespaces), strings as UTF-8 with code point counts,
 *   dicts in insertion order, Python-compatible str()/repr()/json.dumps(), equality and ordering.
 * - jinja_lex.c: the lexer (jinja2's rules with trim_blocks and lstrip_blocks on).
 * - jinja_parse.c: the parser: tokens to an AST owned by a node pool.
 * - jinja_eval.c: rendering: scopes, statements, expressions, macros, loops.
 * - jinja_builtins.c: filters, tests, global functions and the methods of str/dict/list.
 * - jinja_unicode.c: Python's case mappings and character classes.
 *
 * Ownership: every function that returns a struct jv through an out parameter gives the caller one reference;
 * functions taking a struct jv argument borrow it unless their comment says otherwise. Objects with a negative
 * reference count are immortal (constants owned by a compiled template) and are never modified, so one template
 * can be rendered from many threads at once. Reference cycles can only go through namespaces (the one mutable
 * value) and through scopes that macros close over; a render tracks both and clears them at its end.
 */
#ifndef STRATA_JINJA_H
#define STRATA_JINJA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "tokenizer/chat_template.h"

/* Limits that keep a hostile template or input bounded (the per-render ones are defaults of
 * struct chat_template_limits). */
#define JINJA_MAX_OUTPUT_BYTES (16u << 20)  /* rendered text, and any one string value */
#define JINJA_MAX_LOOP_ITERS 1000000        /* loop iterations over a whole render */
#define JINJA_MAX_WORK (1ll << 29)          /* bytes copied or scanned over a whole render */
#define JINJA_MAX_STEPS 10000000            /* evaluation steps over a whole render */
#define JINJA_MAX_EVAL_DEPTH 600            /* nested evaluation (expressions, statements, macro calls) */
#define JINJA_HARD_MAX_BYTES (256u << 20)   /* any one buffer, whatever the limits say */
#define JINJA_MAX_LIST_ITEMS (1u << 22)     /* any one list or dict */
#define JINJA_ITEM_COST 64                  /* work charged per list or dict item copied */
#define JINJA_UNICODE_COST 16               /* work per byte of Unicode property lookups (case, categories) */
#define JINJA_MAX_PARSE_DEPTH 200           /* nested expressions or blocks in the source */
#define JINJA_MAX_VALUE_DEPTH 200           /* nesting when printing, serializing or comparing values */
#define JINJA_MAX_RANGE 100000              /* like jinja2.sandbox.MAX_RANGE */

/* ---- values ---- */

enum jv_type {
    JV_UNDEFINED,
    JV_NONE,
    JV_BOOL,
    JV_INT,
    JV_FLOAT,
    JV_STRING,
    JV_LIST,      /* list or tuple (jv_list.tuple) */
    JV_DICT,
    JV_NAMESPACE, /* u.d: a mutable dict of attributes */
    JV_CALLABLE,
    JV_LOOP,
    JV_TYPE_COUNT
};

struct jv_str;
struct jv_list;
struct jv_dict;
struct jv_callable;
struct jv_loop;

struct jv {
    enum jv_type type;
    union {
        bool b;
        int64_t i;
        double f;
        struct jv_str *s;
        struct jv_list *l;
        struct jv_dict *d;
        struct jv_callable *c;
        struct jv_loop *loop;
        const char *undef_name; /* JV_UNDEFINED: the name that was looked up, for messages (may be NULL); always
                                   a string that outlives the render (the template's, or static) */
    } u;
};

struct jv_str {
    int32_t rc;
    bool ascii;
    size_t len;  /* bytes */
    size_t n_cp; /* code points */
    char s[];    /* NUL-terminated */
};

struct jv_list {
    int32_t rc;
    bool tuple;
    bool lazy; /* stands for a Python generator (map, select, ...): always true, no len(), no indexing */
    size_t n, cap;
    struct jv *v;
};

struct jv_dict {
    int32_t rc;
    size_t n, cap;
    struct jv *keys, *vals;
    uint32_t *index; /* open addressing over entry numbers + 1 (0 = empty); NULL while small */
    size_t index_cap;
};

struct jscope;
struct jnode;
struct jrender;

enum jv_callable_kind {
    JC_GLOBAL,  /* range, namespace, dict, raise_exception, strftime_now, joiner */
    JC_METHOD,  /* a method bound to self */
    JC_MACRO,   /* a macro, or the caller of a call block */
    JC_JOINER,  /* the function that joiner() returns */
    JC_KIND_COUNT
};

struct jv_callable {
    int32_t rc;
    enum jv_callable_kind kind;
    int id;                    /* JC_GLOBAL / JC_METHOD: which one (-1: a Python method not implemented here) */
    const char *name;          /* for messages */
    struct jv self;            /* JC_METHOD: the bound object; JC_JOINER: the separator */
    const struct jnode *macro; /* JC_MACRO */
    struct jscope *closure;    /* JC_MACRO: the scope it was defined in */
    bool used;                 /* JC_JOINER: called before */
};

struct jv_loop {
    int32_t rc;
    int64_t index0, length;
    int depth0;
    struct jv_list *items;     /* the (filtered) sequence, for previtem/nextitem */
    struct jv changed_last;    /* loop.changed() state; JV_UNDEFINED before the first call */
    bool changed_called;
    const struct jnode *node;  /* the for node (recursive loops) */
    struct jscope *scope;      /* the scope the loop runs in (recursive loops) */
};

static inline struct jv jv_undefined(const char *name)
{
    struct jv v = {.type = JV_UNDEFINED};
    v.u.undef_name = name;
    return v;
}
static inline struct jv jv_none(void) { return (struct jv){.type = JV_NONE}; }
static inline struct jv jv_bool(bool b)
{
    struct jv v = {.type = JV_BOOL};
    v.u.b = b;
    return v;
}
static inline struct jv jv_int(int64_t i)
{
    struct jv v = {.type = JV_INT};
    v.u.i = i;
    return v;
}
static inline struct jv jv_float(double f)
{
    struct jv v = {.type = JV_FLOAT};
    v.u.f = f;
    return v;
}

/* Reference counting; both accept any value (scalars are no-ops). */
struct jv jv_ref(struct jv v);
void jv_unref(struct jv v);

/* Strings. jv_str_fill fills an allocated string of at least len + 1 bytes of text (s may be r->s itself); leaves rc alone. */
void jv_str_fill(struct jv_str *r, const char *s, size_t len);
/* Makes a JV_STRING value; returns ST_ENOMEM on failure. */
int jv_string(struct jv *out, const char *s, size_t len);
struct jv jv_from_str(struct jv_str *s); /* wraps, takes the reference */

/* Lists and dicts (new ones have rc 1). *_push/_set take ownership of the values they are given, even on failure. */
struct jv_list *jv_list_new(size_t cap);
int jv_list_push(struct jv_list *l, struct jv v);
struct jv jv_from_list(struct jv_list *l);
struct jv_dict *jv_dict_new(void);
int jv_dict_set(struct jv_dict *d, struct jv key, struct jv val);
/* Borrowed pointer to the value, or NULL. */
struct jv *jv_dict_get(const struct jv_dict *d, struct jv key);
struct jv *jv_dict_get_str(const struct jv_dict *d, const char *key, size_t len);
struct jv jv_from_dict(struct jv_dict *d);
/* Releases all entries (breaks reference cycles through namespaces at the end of a render). */
void jv_dict_clear(struct jv_dict *d);

/* Converts JSON to a value (depth-bounded). */
int jv_from_json(struct jv *out, const json_t *j, int depth);

bool jv_truthy(struct jv v);
const char *jv_type_name(struct jv v); /* Python's type name: 'int', 'str', 'list', ... */

/* Growable byte buffer with a hard size limit. */
struct jbuf {
    char *p;
    size_t n, cap;
};
int jbuf_put(struct jbuf *b, const char *s, size_t n); /* ST_ENOMEM or ST_ERANGE (over JINJA_HARD_MAX_BYTES) */
int jbuf_putc(struct jbuf *b, char ch);
void jbuf_free(struct jbuf *b);

/* Python str() and repr() appended to b; json.dumps appended to b. depth starts at 0. They return
 * ST_EINVAL with a message in err for values that cannot be converted (too deep, not serializable). */
int jv_str_append(struct jbuf *b, struct jv v, int depth, char *err);
int jv_repr_append(struct jbuf *b, struct jv v, int depth, char *err);
struct json_opts {
    bool ensure_ascii, sort_keys;
    const char *indent; /* NULL: no indentation */
    size_t indent_len;
    const char *item_sep, *key_sep;
    size_t item_sep_len, key_sep_len;
};
int jv_json_append(struct jbuf *b, struct jv v, const struct json_opts *o, int depth, char *err);

/* Python ==; never fails (deep values past the depth limit compare unequal). */
bool jv_equal(struct jv a, struct jv b, int depth);
/* Python <-style ordering: *out < 0, 0, > 0. ST_EINVAL with a message when the types are not ordered. */
int jv_compare(struct jv a, struct jv b, int *out, char *err);

/* memmem (a local one: ASan's interceptor checks the whole haystack on every call). */
const char *jv_find(const char *hay, size_t hay_len, const char *needle, size_t needle_len);

/* UTF-8 helpers (input is valid UTF-8). */
uint32_t jinja_utf8_decode(const char *s, size_t len, size_t *adv);
size_t jinja_utf8_encode(uint32_t cp, char *out);
/* Byte offset of code point index i (clamped to len). */
size_t jinja_utf8_offset(const char *s, size_t len, size_t i);
bool jinja_utf8_valid(const char *s, size_t len);
bool jinja_py_isspace(uint32_t cp);

struct jbuf;
/* Python's case conversions (jinja_unicode.c): full mappings, final sigma. Appends to b. */
enum jinja_case { JCASE_LOWER, JCASE_UPPER, JCASE_TITLE, JCASE_CAPITALIZE, JCASE_SWAPCASE, JCASE_TITLE_FILTER };
int jinja_case_append(struct jbuf *b, const char *s, size_t len, enum jinja_case mode);
bool jinja_cp_is_alpha(uint32_t cp);
bool jinja_cp_is_numeric(uint32_t cp);
bool jinja_cp_is_decimal(uint32_t cp);

/* ---- lexer ---- */

enum jtok_type {
    JT_EOF,
    JT_DATA,
    JT_VAR_BEGIN,
    JT_VAR_END,
    JT_BLOCK_BEGIN,
    JT_BLOCK_END,
    JT_NAME,
    JT_STRING,
    JT_INT,
    JT_FLOAT,
    JT_ADD, JT_SUB, JT_MUL, JT_DIV, JT_FLOORDIV, JT_MOD, JT_POW, JT_TILDE,
    JT_LBRACKET, JT_RBRACKET, JT_LPAREN, JT_RPAREN, JT_LBRACE, JT_RBRACE,
    JT_EQ, JT_NE, JT_GT, JT_GTEQ, JT_LT, JT_LTEQ, JT_ASSIGN, JT_DOT, JT_COLON, JT_PIPE, JT_COMMA, JT_SEMICOLON,
    JT_TYPE_COUNT
};

struct jtoken {
    enum jtok_type type;
    int line, col;
    const char *s; /* into the normalized source: DATA text, NAME, the raw token text */
    size_t len;
    char *str;     /* JT_STRING: decoded value (malloc'd, owned by the token list) */
    size_t str_len;
    int64_t i;
    double f;
};

struct jtoken_list {
    struct jtoken *v;
    size_t n, cap;
};

/* Tokenizes src (already newline-normalized, trailing newline removed). Tokens point into src. */
int jinja_lex(const char *src, size_t len, struct jtoken_list *out, char *err);
void jinja_tokens_free(struct jtoken_list *t);
const char *jinja_token_describe(const struct jtoken *t, char *buf, size_t n);

/* ---- AST ---- */

enum jn_kind {
    /* expressions */
    JN_CONST, JN_NAME, JN_GETATTR, JN_GETITEM, JN_SLICE, JN_LIST, JN_TUPLE, JN_DICT,
    JN_NEG, JN_POS, JN_NOT, JN_AND, JN_OR, JN_BINOP, JN_CONCAT, JN_COMPARE, JN_COND,
    JN_FILTER, JN_TEST, JN_CALL, JN_NSREF,
    /* statements */
    JN_DATA, JN_OUTPUT, JN_IF, JN_FOR, JN_SET, JN_SET_BLOCK, JN_MACRO, JN_CALL_BLOCK, JN_FILTER_BLOCK,
    JN_WITH, JN_BREAK, JN_CONTINUE,
    JN_KIND_COUNT
};

enum jn_op { JOP_ADD, JOP_SUB, JOP_MUL, JOP_DIV, JOP_FLOORDIV, JOP_MOD, JOP_POW,
             JOP_EQ, JOP_NE, JOP_LT, JOP_LTEQ, JOP_GT, JOP_GTEQ, JOP_IN, JOP_NOTIN, JOP_COUNT };

struct jn_list {
    struct jnode **v;
    int n;
};

struct jn_args {
    struct jn_list pos;
    const char **kw_names;
    struct jn_list kw;
    struct jnode *dyn_args, *dyn_kwargs;
};

/* Evaluated call arguments. */
struct jargs {
    int n_pos, n_kw;
    struct jv *pos;
    const char **kw_names;
    struct jv *kw;
};

typedef int (*jinja_filter_fn)(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a,
                               struct jv *out);
typedef int (*jinja_test_fn)(struct jrender *r, const struct jnode *at, struct jv in, const struct jargs *a,
                             bool *out);

struct jnode {
    enum jn_kind kind;
    int line, col;
    union {
        struct jv cval;                                            /* CONST */
        const char *name;                                          /* NAME */
        struct { struct jnode *obj; const char *attr; } attr;      /* GETATTR; NSREF (obj is the NAME) */
        struct { struct jnode *obj, *key; } item;                  /* GETITEM */
        struct { struct jnode *start, *stop, *step; } slice;       /* SLICE (each may be NULL) */
        struct jn_list items;                                      /* LIST, TUPLE, CONCAT, OUTPUT */
        struct { struct jn_list keys, vals; } dict;                /* DICT */
        struct { struct jnode *a, *b; enum jn_op op; } bin;        /* NEG/POS/NOT (a), AND, OR, BINOP */
        struct { struct jnode *expr; enum jn_op *ops; struct jn_list operands; } cmp;
        struct { struct jnode *test, *yes, *no; } cond;            /* COND (no may be NULL) */
        struct {
            struct jnode *expr; /* NULL in a filter block / set block chain: the captured text */
            const char *name;
            jinja_filter_fn filter;
            jinja_test_fn test;
            struct jn_args args;
        } filter;                                                  /* FILTER, TEST */
        struct { struct jnode *fn; struct jn_args args; } call;    /* CALL */
        struct { const char *text; size_t len; } data;             /* DATA */
        struct { struct jnode *test; struct jn_list body, else_body; } if_;
        struct {
            struct jnode *target, *iter, *cond;
            struct jn_list body, else_body;
            bool recursive;
        } for_;
        struct { struct jnode *target, *expr; } set;               /* SET */
        struct { struct jnode *target, *filter; struct jn_list body; } set_block;
        struct {
            const char *name; /* NULL for the caller of a call block */
            int n_params;
            const char **params;
            struct jnode **defaults; /* n_params entries, NULL where there is none */
            struct jn_list body;
            bool catch_varargs, catch_kwargs;
        } macro;
        struct { struct jnode *call, *caller; } call_block;
        struct { struct jnode *filter; struct jn_list body; } filter_block;
        struct { struct jn_list targets, values, body; bool isolated; } with; /* WITH, {% block %} (isolated) */
    } u;
};

/* Node pool: every node, array and name of one template. */
struct jpool_chunk;
struct jpool {
    struct jpool_chunk *head;
};
void *jpool_alloc(struct jpool *p, size_t bytes);
void jpool_free(struct jpool *p);

/* Parses the token list into the statements of the template (in *body). Errors name line and column. */
int jinja_parse(struct jpool *pool, const struct jtoken_list *toks, struct jn_list *body, char *err);

/* ---- builtins (jinja_builtins.c) ---- */

jinja_filter_fn jinja_filter_find(const char *name);
jinja_test_fn jinja_test_find(const char *name);
/* Global functions: -1 when name is not one. */
int jinja_global_find(const char *name);
const char *jinja_global_name(int id);
int jinja_global_call(struct jrender *r, const struct jnode *at, int id, const struct jargs *a, struct jv *out);
/* Methods: the method id of name on a value of self's type, or -1 for a method that exists in Python but is
 * not implemented here (calling it fails with a clear message); -2 when self has no such attribute. *canonical
 * (may be NULL) receives the static spelling of the name. */
int jinja_method_find(struct jv self, const char *name, const char **canonical);
int jinja_method_call(struct jrender *r, const struct jnode *at, const struct jv_callable *m, const struct jargs *a,
                      struct jv *out);

/* ---- evaluation (jinja_eval.c) ---- */

struct jrender {
    const struct chat_template_limits *lim;
    struct jbuf *out;            /* where output goes now (captures swap it) */
    struct jscope *root;
    int depth;
    int64_t loop_iters;
    uint64_t work;               /* bytes copied */
    uint64_t steps;              /* expressions evaluated and statements run */
    char *err;                   /* caller's buffer (may be NULL) */
    bool failed;
    /* objects that may sit on reference cycles, released together at the end */
    struct jv *cyclic;
    size_t n_cyclic, cap_cyclic;
    struct jscope **captured;
    size_t n_captured, cap_captured;
};

/* Renders body with vars (a JSON object) into out. */
int jinja_render(const struct jn_list *body, const json_t *vars, const struct chat_template_limits *lim,
                 struct jbuf *out, char *err);

/* Records an error at node `at` ("chat template line L col C: ...") unless one is already recorded. */
int jinja_fail(struct jrender *r, const struct jnode *at, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* A new string value (charged as work; fails past the size limit). */
int jinja_new_string(struct jrender *r, const struct jnode *at, const char *s, size_t len, struct jv *out);
/* Python's str % args. */
int jinja_format_percent(struct jrender *r, const struct jnode *at, struct jv fmt, struct jv args, struct jv *out);
/* Releases a scope reference (scopes are held by macros that close over them). */
void jinja_scope_release(struct jscope *s);
/* Charges work (bytes copied or scanned); fails with ST_ERANGE past the work limit. */
int jinja_charge(struct jrender *r, const struct jnode *at, uint64_t bytes);
/* The work of scanning v once: a string's bytes, JINJA_ITEM_COST per list or dict item (shallow). */
uint64_t jinja_value_cost(struct jv v);
/* The items of an iterable (list/tuple: itself; dict: keys; string: characters; undefined: empty). */
int jinja_iterate(struct jrender *r, const struct jnode *at, struct jv v, struct jv_list **out);
/* str(v) as a string value. */
int jinja_to_string(struct jrender *r, const struct jnode *at, struct jv v, struct jv *out);
/* obj.name / obj[key] with jinja2's fallbacks; missing gives undefined (anonymous: name may be any string). */
int jinja_getattr_tmp(struct jrender *r, const struct jnode *at, struct jv obj, const char *name, struct jv *out);
int jinja_getitem(struct jrender *r, const struct jnode *at, struct jv obj, struct jv key, struct jv *out);
/* Follows a dotted attribute path ("a.b", "0") like jinja2's make_attrgetter. */
int jinja_getattr_path(struct jrender *r, const struct jnode *at, struct jv obj, const char *path, struct jv *out);
/* Registers an object that may be part of a reference cycle (namespaces). Takes a reference. */
int jinja_track_cyclic(struct jrender *r, struct jv v);
/* Fails unless v is defined (jinja2 raises UndefinedError when an undefined value is used). */
int jinja_require_defined(struct jrender *r, const struct jnode *at, struct jv v);
/* Compares with the error message attached to at. */
int jinja_compare(struct jrender *r, const struct jnode *at, struct jv a, struct jv b, int *cmp);

#endif
