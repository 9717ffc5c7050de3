/* tok_internal.h: what the tokenizer's source files (tokenizer.c, tok_*.c) share. Not part of the module's
 * contract: other modules include tokenizer/tokenizer.h only.
 *
 * Layout of a loaded tokenizer:
 * - every string (vocab pieces, added-token contents, patterns) lives in one arena, NUL-terminated;
 * - id -> piece is a flat table; piece -> id is an open-addressing hash (xxh3), merges (id_a, id_b) ->
 *   (rank, merged id) another one keyed by the 64-bit pair;
 * - the normalizer, pre-tokenizer and decoder trees of tokenizer.json are flattened into arrays (a Sequence is
 *   just composition), the post-processor into one "single" template;
 * - added tokens are matched with byte tries (leftmost-longest, like the reference's Aho-Corasick).
 * Encoding keeps all of its state in a per-call context, so a loaded tokenizer is never written to.
 */
#ifndef STRATA_TOK_INTERNAL_H
#define STRATA_TOK_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <jansson.h>
#include <pcre2.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"
#include "tokenizer/tokenizer.h"

#define TOK_MAX_ID (1 << 24)            /* ids above this are refused as malformed */
#define TOK_MAX_INPUT ((size_t)1 << 30) /* longest text tokenizer_encode accepts */

/* ---- growable byte buffer ---- */
struct tok_buf {
    char *p;
    size_t n, cap;
};
int tok_buf_reserve(struct tok_buf *b, size_t extra); /* ensures room for n + extra + 1 bytes */
int tok_buf_put(struct tok_buf *b, const void *s, size_t n);
void tok_buf_free(struct tok_buf *b);

/* ---- UTF-8 and Unicode classes (tok_unicode.c) ---- */
/* Strict decode of one character: returns the code point and its length in *len, or -1 (with *len = 1) when s
 * does not start with a valid, shortest-form, non-surrogate sequence. n > 0. */
int32_t tok_utf8_decode(const unsigned char *s, size_t n, int *len);
/* Length of the longest valid UTF-8 prefix of s (n when all of s is valid). */
size_t tok_utf8_valid_prefix(const unsigned char *s, size_t n);
int tok_utf8_encode(uint32_t cp, char out[4]);
bool tok_is_whitespace(uint32_t cp); /* Rust char::is_whitespace (White_Space) */
bool tok_is_word(uint32_t cp);       /* Rust regex \w */
bool tok_is_numeric(uint32_t cp);    /* Rust char::is_numeric (N*) */
bool tok_is_punct(uint32_t cp);      /* ASCII punctuation or Unicode P* */
bool tok_is_mark_nonspacing(uint32_t cp);

/* Rust's String::from_utf8_lossy as a byte-at-a-time machine over struct detok_utf8 (tokenizer.h): each maximal
 * invalid subpart becomes one U+FFFD; an incomplete sequence at the end (finish) becomes one U+FFFD. */
size_t tok_lossy_push(struct detok_utf8 *l, unsigned char c, char *out); /* writes at most 7 bytes */
size_t tok_lossy_finish(struct detok_utf8 *l, char *out);                /* writes at most 3 bytes */
/* Strict UTF-8 validation, one byte at a time: 0 while valid so far, -1 once invalid. Complete when l->n == 0. */
int tok_utf8v_push(struct detok_utf8 *l, unsigned char c);

/* Unicode normalization forms via utf8proc; returns a malloc'd string in *out. */
enum tok_nf { TOK_NF_NFC, TOK_NF_NFD, TOK_NF_NFKC, TOK_NF_NFKD, TOK_NF_COUNT };
int tok_normalize_form(enum tok_nf form, const char *s, size_t n, char **out, size_t *out_len, char *err);

/* GPT-2 byte <-> unicode table. */
extern const uint16_t tok_byte_to_cp[256];
int tok_cp_to_byte(uint32_t cp); /* -1 when cp is not one of the 256 */

/* ---- hash maps (tok_bpe.c) ---- */
struct tok_strmap {
    uint64_t *slots; /* (hash << 32) | (entry index + 1), 0 = empty */
    uint32_t mask;
    struct tok_sm_entry {
        uint32_t off, len; /* key in the arena */
        int32_t val;
        uint32_t h;
    } *e;
    uint32_t n, cap;
};
int tok_strmap_init(struct tok_strmap *m, uint32_t expected);
/* Inserts or replaces (the last value for a key wins, like a Rust HashMap built from a list). */
int tok_strmap_put(struct tok_strmap *m, const char *arena, uint32_t off, uint32_t len, int32_t val);
int32_t tok_strmap_get(const struct tok_strmap *m, const char *arena, const char *s, size_t n); /* -1 absent */
void tok_strmap_free(struct tok_strmap *m);

struct tok_pairmap {
    struct tok_pair {
        uint64_t key; /* (a << 32) | b; UINT64_MAX = empty */
        uint32_t rank;
        int32_t id;
    } *slots;
    uint64_t mask;
    size_t n;
};
int tok_pairmap_init(struct tok_pairmap *m, size_t expected);
void tok_pairmap_put(struct tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t id);
const struct tok_pair *tok_pairmap_get(const struct tok_pairmap *m, int32_t a, int32_t b);
void tok_pairmap_free(struct tok_pairmap *m);

/* ---- pipeline descriptions ---- */
enum tok_norm_kind {
    TOK_NORM_NF,        /* form */
    TOK_NORM_LOWERCASE,
    TOK_NORM_STRIP,     /* left, right */
    TOK_NORM_REPLACE,   /* pattern (literal or regex) -> content */
    TOK_NORM_PREPEND,   /* content */
    TOK_NORM_STRIP_ACCENTS,
    TOK_NORM_BYTELEVEL,
    TOK_NORM_KIND_COUNT
};
struct tok_norm {
    enum tok_norm_kind kind;
    enum tok_nf form;
    bool left, right;
    pcre2_code *re;   /* TOK_NORM_REPLACE with a Regex pattern */
    char *pat;        /* literal pattern (arena-independent, malloc'd) */
    size_t pat_len;
    char *content;
    size_t content_len;
};

enum tok_split_behavior {
    TOK_SPLIT_REMOVED,
    TOK_SPLIT_ISOLATED,
    TOK_SPLIT_MERGED_PREV,
    TOK_SPLIT_MERGED_NEXT,
    TOK_SPLIT_CONTIGUOUS,
    TOK_SPLIT_BEHAVIOR_COUNT
};
enum tok_pre_kind {
    TOK_PRE_SPLIT,      /* re or literal pat, behavior, invert */
    TOK_PRE_BYTELEVEL,  /* add_prefix_space, use_regex (re = GPT-2 pattern) */
    TOK_PRE_METASPACE,  /* repl, prepend scheme, split */
    TOK_PRE_WHITESPACE, /* re = \w+|[^\w\s]+, keep matches */
    TOK_PRE_WHITESPACE_SPLIT,
    TOK_PRE_DIGITS,      /* individual */
    TOK_PRE_PUNCTUATION, /* behavior */
    TOK_PRE_KIND_COUNT
};
enum tok_prepend { TOK_PREPEND_ALWAYS, TOK_PREPEND_FIRST, TOK_PREPEND_NEVER, TOK_PREPEND_COUNT };
struct tok_pre {
    enum tok_pre_kind kind;
    pcre2_code *re;
    char *pat;
    size_t pat_len;
    enum tok_split_behavior behavior;
    bool invert, add_prefix_space, use_regex, split, individual;
    enum tok_prepend prepend;
    uint32_t repl_cp;
    char repl[4];
    int repl_len;
};

enum tok_dec_kind {
    TOK_DEC_REPLACE,  /* pat -> content (literal) */
    TOK_DEC_STRIP,    /* content char, start, stop */
    TOK_DEC_METASPACE,/* repl, prepend != never */
    TOK_DEC_BYTEFALLBACK,
    TOK_DEC_FUSE,
    TOK_DEC_KIND_COUNT
};
#define TOK_DEC_PAT_MAX 16
struct tok_dec {
    enum tok_dec_kind kind;
    char pat[TOK_DEC_PAT_MAX];
    int pat_len;
    int fail[TOK_DEC_PAT_MAX]; /* KMP failure function of pat */
    char *content;
    size_t content_len;
    uint32_t cp; /* Strip content / Metaspace replacement */
    char cp_utf8[4];
    int cp_len;
    int start, stop;
    bool prepend;
};

/* Added tokens and the byte trie that finds them. */
struct tok_added {
    int32_t id;
    uint32_t off, len; /* content in the arena */
    bool single_word, lstrip, rstrip, normalized, special;
};
struct tok_trie {
    int32_t root[256]; /* first-level node per byte, -1 none */
    struct tok_trie_node {
        int32_t child, sibling; /* -1 none */
        int32_t added;          /* index into added[] when a pattern ends here, else -1 */
        unsigned char byte;
    } *nodes;
    int32_t n, cap;
};

/* Post-processor "single" template: a list of segments, each either the sequence or fixed ids. */
struct tok_tmpl_item {
    bool is_seq;
    int32_t *ids;
    int n_ids;
};
struct tok_tmpl {
    struct tok_tmpl_item *items;
    int n_items;
};

/* ---- the tokenizer ---- */
#define TOK_ID_SPECIAL 1u
#define TOK_ID_ADDED 2u

struct tokenizer {
    struct tok_buf arena;
    int n_ids;          /* highest id + 1 */
    uint32_t *id_off;   /* [n_ids] piece offset in the arena, UINT32_MAX: no such id */
    uint32_t *id_len;   /* [n_ids] */
    uint8_t *id_flags;  /* [n_ids] TOK_ID_* */
    size_t max_piece_len;

    /* BPE model */
    struct tok_strmap vocab;
    struct tok_pairmap merges;
    int32_t unk_id; /* -1: none, -2: named but not in the vocab (an error when needed, as in the reference) */
    bool fuse_unk, byte_fallback, ignore_merges;
    int32_t byte_fb_id[256]; /* <0xNN> ids, -1 absent */
    bool byte_fb_all;        /* all 256 present */
    char *subword_prefix, *word_suffix;
    size_t subword_prefix_len, word_suffix_len;
    int32_t byte_sym[256];   /* id of the byte-level char of each byte, -1 absent */
    int32_t ascii_sym[128];  /* id of each ASCII char, -1 absent */
    bool right_first_ascii[128]; /* some merge's right-hand side starts with this ASCII char */
    uint32_t *right_first;       /* the same for other code points, sorted */
    size_t n_right_first;

    /* added tokens */
    struct tok_added *added;
    int n_added;
    struct tok_strmap added_map; /* content -> index into added[] */
    struct tok_trie raw_trie, norm_trie;
    bool split_special;

    /* pipeline */
    struct tok_norm *norms;
    int n_norms;
    struct tok_pre *pres;
    int n_pres;
    struct tok_tmpl *posts;
    int n_posts;
    struct tok_dec *decs;
    int n_decs;
    bool dec_bytelevel; /* ByteLevel decoder first */
    bool dec_join;      /* no decoder at all: tokens joined with " " */
    size_t stream_chunk_max;

    /* tokenizer_config.json */
    char *chat_template, *bos_token, *eos_token;
    int32_t bos_id, eos_id;
};

/* ---- JSON helpers (tok_pretok.c) ---- */
const char *tok_jstr(const json_t *o, const char *key, size_t *len); /* NULL unless a string */
bool tok_jbool(const json_t *o, const char *key, bool dflt);
/* {"String": s} (a literal, malloc'd into *lit) or {"Regex": r} (compiled into *re); ctx prefixes errors. */
int tok_jpattern(const json_t *pat, const char *ctx, char **lit, size_t *lit_len, pcre2_code **re, char *err);

/* ---- fast reader for tokenizer.json (tok_json.c) ---- */
/* Parses the document: model.vocab into (key in arena, id) pairs appended to *vocab (arrays of
 * struct tok_sm_entry), model.merges into *merges (pairs of arena strings), every other top-level and model key
 * with jansson into *root / *model. name is used in messages. */
struct tok_merge_raw {
    uint32_t a_off, a_len, b_off, b_len;
};
struct tok_json_out {
    json_t *root, *model;
    struct tok_sm_entry *vocab;
    uint32_t n_vocab, cap_vocab;
    struct tok_merge_raw *merges; /* strings in marena */
    uint32_t n_merges, cap_merges;
    struct tok_buf marena;
    bool has_vocab, has_merges;
};
int tok_json_parse(const char *name, const char *text, size_t len, struct tok_buf *arena, struct tok_json_out *o,
                   char *err);
void tok_json_out_free(struct tok_json_out *o);

/* ---- normalizers, pre-tokenizers, added tokens (tok_pretok.c) ---- */
/* Compiles an Oniguruma-style pattern (as written in tokenizer.json) with PCRE2 (UTF, UCP, JIT). */
int tok_regex_compile(const char *pat, size_t len, pcre2_code **out, char *err);
int tok_norms_parse(struct tokenizer *t, const json_t *j, char *err);
int tok_pres_parse(struct tokenizer *t, const json_t *j, char *err);
void tok_norms_free(struct tokenizer *t);
void tok_pres_free(struct tokenizer *t);
int tok_trie_add(struct tok_trie *tr, const char *s, size_t n, int32_t added_index);
void tok_trie_free(struct tok_trie *tr);

/* Per-call encoding state. */
struct tok_piece {
    size_t off, len; /* in enc->work */
    uint32_t flags;
};
#define TOK_PIECE_BYTELEVEL 1u /* logical content is the byte-level mapping of the bytes */
#define TOK_PIECE_FIRST 2u     /* starts at offset 0 of the original text */
struct tok_sym {
    int32_t id, prev, next;
    int32_t alive;
};
struct tok_heap_item {
    uint32_t rank, pos;
    int32_t id;
};
struct tok_span {
    size_t start, stop;
    int32_t id; /* -1: text */
};
struct tok_enc {
    const struct tokenizer *t;
    struct tok_buf work, tmp;
    struct tok_piece *pa, *pb;
    size_t n_pa, cap_pa, n_pb, cap_pb;
    struct tok_span *spans;
    size_t n_spans, cap_spans;
    struct tok_span *m; /* match list scratch (id 1 = match, 0 = gap) */
    size_t n_m, cap_m;
    int32_t *ids;
    size_t n_ids, cap_ids;
    struct tok_sym *syms;
    size_t cap_syms;
    struct tok_heap_item *heap;
    size_t cap_heap;
    pcre2_match_data *md;
    pcre2_match_context *mctx;
    pcre2_jit_stack *jit;
    char *err;
};
int tok_enc_push_id(struct tok_enc *e, int32_t id);
int tok_normalize(struct tok_enc *e, size_t off, size_t len, size_t *out_off, size_t *out_len);
/* Runs the pre-tokenizers over e->pa[0..n_pa) (result in e->pa). */
int tok_pretokenize(struct tok_enc *e);
/* Splits text [0, len) of s on the trie's tokens (the reference's find_matches) into e->spans. */
int tok_added_split(struct tok_enc *e, const struct tok_trie *tr, const char *s, size_t len);
/* Materializes a byte-level piece into plain text in e->work. */
int tok_piece_materialize(struct tok_enc *e, struct tok_piece *p);

/* ---- BPE (tok_bpe.c) ---- */
int tok_bpe_word(struct tok_enc *e, const char *s, size_t n, bool bytelevel);

/* ---- decoders (tok_decode.c) ---- */
int tok_decs_parse(struct tokenizer *t, const json_t *j, char *err);
void tok_decs_free(struct tokenizer *t);
int tok_decode_ref(const struct tokenizer *t, const int32_t *ids, int n_ids, bool skip_special, char **out,
                   size_t *out_len, char *err);
size_t tok_stream_bound(const struct tokenizer *t);

#endif
