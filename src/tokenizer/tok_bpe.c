/* tok_bpe: the vocab and merge hash maps and the BPE merge of one pre-tokenized word.
 *
 * The merge follows the reference (tokenizers' Word::merge_all) exactly: symbols in a doubly linked list over an
 * array, a binary min-heap of candidate merges ordered by (rank, position), stale entries skipped when popped.
 * That is O(n log n) in the word length, so a 1 MB "word" (SentencePiece-style models see the whole text as one
 * word) is fine. All scratch memory belongs to the per-call encoder; nothing here writes to the tokenizer.
 */
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

#include "tokenizer/tok_internal.h"

/* ---- string -> id ---- */

static uint32_t pow2_at_least(uint64_t n)
{
    uint64_t c = 16;
    while (c < n) c <<= 1;
    return c > (1u << 31) ? (1u << 31) : (uint32_t)c;
}

/* A slot holds (hash << 32) | (entry index + 1), 0 when empty: probes compare hashes without touching the
 * entries, so a lookup costs one miss in the slots, one in the entry and one in the arena. */
int tok_strmap_init(struct tok_strmap *m, uint32_t expected)
{
    memset(m, 0, sizeof(*m));
    uint32_t ns = pow2_at_least((uint64_t)expected * 2 + 1);
    m->slots = calloc(ns, sizeof(uint64_t));
    m->cap = expected ? expected : 16;
    m->e = malloc(sizeof(*m->e) * m->cap);
    if (!m->slots || !m->e) {
        tok_strmap_free(m);
        return ST_ENOMEM;
    }
    m->mask = ns - 1;
    return 0;
}

static int strmap_grow(struct tok_strmap *m)
{
    uint64_t ns64 = ((uint64_t)m->mask + 1) * 2;
    if (ns64 > (1u << 31)) return ST_ENOMEM;
    uint32_t ns = (uint32_t)ns64;
    uint64_t *slots = calloc(ns, sizeof(uint64_t));
    if (!slots) return ST_ENOMEM;
    for (uint32_t k = 0; k < m->n; k++) {
        uint32_t i = m->e[k].h & (ns - 1);
        while (slots[i]) i = (i + 1) & (ns - 1);
        slots[i] = ((uint64_t)m->e[k].h << 32) | (k + 1);
    }
    free(m->slots);
    m->slots = slots;
    m->mask = ns - 1;
    return 0;
}

int tok_strmap_put(struct tok_strmap *m, const char *arena, uint32_t off, uint32_t len, int32_t val)
{
    uint32_t h = (uint32_t)XXH3_64bits(arena + off, len);
    uint32_t i = h & m->mask;
    for (;;) {
        uint64_t sl = m->slots[i];
        if (!sl) break;
        if ((uint32_t)(sl >> 32) == h) {
            struct tok_sm_entry *e = &m->e[(uint32_t)sl - 1];
            if (e->len == len && memcmp(arena + e->off, arena + off, len) == 0) {
                e->val = val;
                return 0;
            }
        }
        i = (i + 1) & m->mask;
    }
    if (((uint64_t)m->n + 1) * 2 > (uint64_t)m->mask + 1) {
        if (strmap_grow(m) < 0) return ST_ENOMEM;
        i = h & m->mask;
        while (m->slots[i]) i = (i + 1) & m->mask;
    }
    if (m->n == m->cap) {
        uint32_t cap = m->cap * 2;
        struct tok_sm_entry *e = realloc(m->e, sizeof(*e) * cap);
        if (!e) return ST_ENOMEM;
        m->e = e;
        m->cap = cap;
    }
    m->e[m->n] = (struct tok_sm_entry){off, len, val, h};
    m->slots[i] = ((uint64_t)h << 32) | ++m->n;
    return 0;
}

int32_t tok_strmap_get(const struct tok_strmap *m, const char *arena, const char *s, size_t n)
{
    if (!m->slots || n > UINT32_MAX) return -1;
    uint32_t h = (uint32_t)XXH3_64bits(s, n);
    uint32_t i = h & m->mask;
    for (;;) {
        uint64_t sl = m->slots[i];
        if (!sl) return -1;
        if ((uint32_t)(sl >> 32) == h) {
            const struct tok_sm_entry *e = &m->e[(uint32_t)sl - 1];
            if (e->len == n && memcmp(arena + e->off, s, n) == 0) return e->val;
        }
        i = (i + 1) & m->mask;
    }
}

void tok_strmap_free(struct tok_strmap *m)
{
    free(m->slots);
    free(m->e);
    memset(m, 0, sizeof(*m));
}

/* ---- (id, id) -> (rank, id) ---- */

static inline uint64_t pair_hash(uint64_t key)
{
    key ^= key >> 33; /* murmur3 fmix64 */
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    key *= 0xc4ceb9fe1a85ec53ull;
    return key ^ (key >> 33);
}

int tok_pairmap_init(struct tok_pairmap *m, size_t expected)
{
    memset(m, 0, sizeof(*m));
    uint64_t ns = 16;
    while (ns < (uint64_t)expected + expected / 2 + 1) ns <<= 1; /* load factor <= 2/3 */
    m->slots = malloc(sizeof(*m->slots) * ns);
    if (!m->slots) return ST_ENOMEM;
    for (uint64_t i = 0; i < ns; i++) m->slots[i].key = UINT64_MAX;
    m->mask = ns - 1;
    return 0;
}

void tok_pairmap_put(struct tok_pairmap *m, int32_t a, int32_t b, uint32_t rank, int32_t id)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t i = pair_hash(key) & m->mask;
    while (m->slots[i].key != UINT64_MAX && m->slots[i].key != key) i = (i + 1) & m->mask;
    if (m->slots[i].key == UINT64_MAX) m->n++;
    ST_ASSERT(m->n * 3 <= (m->mask + 1) * 2); /* sized by tok_pairmap_init for all merges */
    m->slots[i] = (struct tok_pair){key, rank, id};
}

const struct tok_pair *tok_pairmap_get(const struct tok_pairmap *m, int32_t a, int32_t b)
{
    if (!m->slots) return NULL;
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    uint64_t i = pair_hash(key) & m->mask;
    for (;;) {
        const struct tok_pair *p = &m->slots[i];
        if (p->key == key) return p;
        if (p->key == UINT64_MAX) return NULL;
        i = (i + 1) & m->mask;
    }
}

void tok_pairmap_free(struct tok_pairmap *m)
{
    free(m->slots);
    memset(m, 0, sizeof(*m));
}

/* ---- the merge ---- */

static inline bool heap_less(const struct tok_heap_item *a, const struct tok_heap_item *b)
{
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

/* A 4-ary min-heap: half the depth of a binary one, the children of a node side by side in memory. On a word of
 * a million symbols (SentencePiece-style models see a whole text as one word) the sift is bound by cache misses,
 * so the depth is what counts. */
static void heap_push(struct tok_heap_item *h, size_t *n, struct tok_heap_item it)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 4;
        if (!heap_less(&it, &h[p])) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = it;
}

static struct tok_heap_item heap_pop(struct tok_heap_item *h, size_t *n)
{
    struct tok_heap_item top = h[0];
    struct tok_heap_item last = h[--(*n)];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 4 * i + 1;
        if (c >= m) break;
        size_t best = c, end = ST_MIN(c + 4, m);
        for (size_t k = c + 1; k < end; k++)
            if (heap_less(&h[k], &h[best])) best = k;
        if (!heap_less(&h[best], &last)) break;
        h[i] = h[best];
        i = best;
    }
    if (m) h[i] = last;
    return top;
}

static int sym_add(struct tok_enc *e, int *ns, int32_t id)
{
    if ((size_t)*ns >= e->cap_syms) {
        size_t cap = e->cap_syms ? e->cap_syms * 2 : 256;
        struct tok_sym *s = realloc(e->syms, sizeof(*s) * cap);
        if (!s) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->syms = s;
        e->cap_syms = cap;
    }
    int i = (*ns)++;
    e->syms[i] = (struct tok_sym){id, i - 1, -1, 1};
    if (i > 0) e->syms[i - 1].next = i;
    return 0;
}

/* Appends the byte-level mapping of s to b. */
static int bytelevel_map(struct tok_buf *b, const char *s, size_t n)
{
    if (tok_buf_reserve(b, n * 2) < 0) return ST_ENOMEM;
    for (size_t i = 0; i < n; i++) b->n += (size_t)tok_utf8_encode(tok_byte_to_cp[(unsigned char)s[i]], b->p + b->n);
    b->p[b->n] = 0;
    return 0;
}

struct unk_state {
    int32_t id; /* -1: none pending */
};

/* One character (as the model sees it: prefix/suffix included) that is not in the vocab. */
static int unknown_char(struct tok_enc *e, int *ns, struct unk_state *u, const char *s, size_t n)
{
    const struct tokenizer *t = e->t;
    int rc;
    if (t->byte_fallback) {
        bool all = true;
        for (size_t i = 0; i < n && all; i++) all = t->byte_fb_id[(unsigned char)s[i]] >= 0;
        if (all) {
            for (size_t i = 0; i < n; i++)
                if ((rc = sym_add(e, ns, t->byte_fb_id[(unsigned char)s[i]])) < 0) return rc;
            return 0;
        }
    }
    if (t->unk_id == -2) return err_set(e->err, ST_EINVAL, "the model's unk_token is not in its vocab");
    if (t->unk_id < 0) return 0; /* no unk token: the character is dropped, as in the reference */
    if (u->id >= 0 && !t->fuse_unk) {
        if ((rc = sym_add(e, ns, u->id)) < 0) return rc;
    }
    u->id = t->unk_id;
    return 0;
}

static int known_char(struct tok_enc *e, int *ns, struct unk_state *u, int32_t id)
{
    int rc;
    if (u->id >= 0) {
        if ((rc = sym_add(e, ns, u->id)) < 0) return rc;
        u->id = -1;
    }
    return sym_add(e, ns, id);
}

static int merge_all(struct tok_enc *e, int ns)
{
    const struct tokenizer *t = e->t;
    struct tok_sym *sy = e->syms;
    if ((size_t)ns * 2 > e->cap_heap) {
        size_t cap = (size_t)ns * 2 + 16;
        struct tok_heap_item *h = realloc(e->heap, sizeof(*h) * cap);
        if (!h) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->heap = h;
        e->cap_heap = cap;
    }
    struct tok_heap_item *heap = e->heap;
    size_t nh = 0;
    for (int i = 0; i + 1 < ns; i++) {
        const struct tok_pair *p = tok_pairmap_get(&t->merges, sy[i].id, sy[i + 1].id);
        if (p) heap_push(heap, &nh, (struct tok_heap_item){p->rank, (uint32_t)i, p->id});
    }
    while (nh) {
        struct tok_heap_item top = heap_pop(heap, &nh);
        struct tok_sym *cur = &sy[top.pos];
        if (!cur->alive || cur->next < 0) continue;
        int next = cur->next;
        const struct tok_pair *p = tok_pairmap_get(&t->merges, cur->id, sy[next].id);
        if (!p || p->id != top.id) continue; /* stale */
        cur->id = top.id;
        cur->next = sy[next].next;
        sy[next].alive = 0;
        if (cur->next >= 0) sy[cur->next].prev = (int32_t)top.pos;
        /* each merge removes a symbol and adds at most two candidates: the heap never exceeds 2 * ns */
        if (cur->prev >= 0) {
            p = tok_pairmap_get(&t->merges, sy[cur->prev].id, cur->id);
            if (p) heap_push(heap, &nh, (struct tok_heap_item){p->rank, (uint32_t)cur->prev, p->id});
        }
        if (cur->next >= 0) {
            p = tok_pairmap_get(&t->merges, cur->id, sy[cur->next].id);
            if (p) heap_push(heap, &nh, (struct tok_heap_item){p->rank, top.pos, p->id});
        }
    }
    return 0;
}

/* Merges one word (or an independent part of one, see tok_bpe_word). */
static int bpe_part(struct tok_enc *e, const char *s, size_t n, bool bytelevel)
{
    const struct tokenizer *t = e->t;
    int rc;
    int ns = 0;
    struct unk_state u = {-1};
    bool affix = t->subword_prefix_len || t->word_suffix_len;
    size_t i = 0;
    while (i < n) {
        const char *c = s + i;
        size_t clen;
        char mapped[4];
        if (bytelevel) {
            clen = 1;
        } else {
            int l;
            if (tok_utf8_decode((const unsigned char *)c, n - i, &l) < 0)
                return err_set(e->err, ST_EINVAL, "invalid UTF-8 reached the BPE model");
            clen = (size_t)l;
        }
        bool last = i + clen == n;
        /* the character as the vocab spells it */
        const char *ch = c;
        size_t chn = clen;
        if (bytelevel) {
            chn = (size_t)tok_utf8_encode(tok_byte_to_cp[(unsigned char)*c], mapped);
            ch = mapped;
        }
        int32_t id;
        if (!affix) {
            if (bytelevel) id = t->byte_sym[(unsigned char)*c];
            else if (clen == 1 && (unsigned char)*c < 128) id = t->ascii_sym[(unsigned char)*c];
            else id = tok_strmap_get(&t->vocab, t->arena.p, ch, chn);
        } else {
            e->tmp.n = 0;
            if ((i > 0 && tok_buf_put(&e->tmp, t->subword_prefix, t->subword_prefix_len) < 0) ||
                tok_buf_put(&e->tmp, ch, chn) < 0 ||
                (last && tok_buf_put(&e->tmp, t->word_suffix, t->word_suffix_len) < 0))
                return err_set(e->err, ST_ENOMEM, "out of memory");
            ch = e->tmp.p;
            chn = e->tmp.n;
            id = tok_strmap_get(&t->vocab, t->arena.p, ch, chn);
        }
        if (id >= 0) rc = known_char(e, &ns, &u, id);
        else rc = unknown_char(e, &ns, &u, ch, chn);
        if (rc < 0) return rc;
        i += clen;
    }
    if (u.id >= 0 && (rc = sym_add(e, &ns, u.id)) < 0) return rc;
    if (ns > 1 && (rc = merge_all(e, ns)) < 0) return rc;
    for (int k = 0; k < ns; k++)
        if (e->syms[k].alive && (rc = tok_enc_push_id(e, e->syms[k].id)) < 0) return rc;
    return 0;
}

/* A character that starts no right-hand side of any merge can never be merged with what precedes it, so a word
 * splits before it into parts that merge independently, with the same result (merges in different parts
 * commute). SentencePiece-style models see a whole text as one word; split before each U+2581 it is many small
 * ones. Only characters that are one vocab symbol qualify (an unknown one may turn into byte-fallback or unk
 * symbols). */
static bool is_barrier(const struct tokenizer *t, const char *s, size_t n, size_t *clen)
{
    int l;
    int32_t cp = tok_utf8_decode((const unsigned char *)s, n, &l);
    *clen = (size_t)l;
    if (cp < 0) return false;
    if (cp < 128) return t->ascii_sym[cp] >= 0 && !t->right_first_ascii[cp];
    if (tok_strmap_get(&t->vocab, t->arena.p, s, (size_t)l) < 0) return false;
    size_t lo = 0, hi = t->n_right_first;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (t->right_first[mid] < (uint32_t)cp) lo = mid + 1;
        else hi = mid;
    }
    return !(lo < t->n_right_first && t->right_first[lo] == (uint32_t)cp);
}

int tok_bpe_word(struct tok_enc *e, const char *s, size_t n, bool bytelevel)
{
    const struct tokenizer *t = e->t;
    int rc;
    if (n == 0) return 0;
    if (t->ignore_merges) {
        const char *w = s;
        size_t wn = n;
        if (bytelevel) {
            e->tmp.n = 0;
            if (bytelevel_map(&e->tmp, s, n) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
            w = e->tmp.p;
            wn = e->tmp.n;
        }
        int32_t id = tok_strmap_get(&t->vocab, t->arena.p, w, wn);
        if (id >= 0) return tok_enc_push_id(e, id);
    }
    bool affix = t->subword_prefix_len || t->word_suffix_len;
    if (n < 256 || bytelevel || affix) return bpe_part(e, s, n, bytelevel);
    size_t start = 0;
    for (size_t i = 0; i < n;) {
        size_t clen;
        if (is_barrier(t, s + i, n - i, &clen) && i > start) {
            if ((rc = bpe_part(e, s + start, i - start, false)) < 0) return rc;
            start = i;
        }
        i += clen;
    }
    return bpe_part(e, s + start, n - start, false);
}
