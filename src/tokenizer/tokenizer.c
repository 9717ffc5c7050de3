/* tokenizer: loading tokenizer.json / tokenizer_config.json, the encode pipeline and the public API.
 *
 * encode = validate UTF-8 -> split on added tokens (raw text) -> per remaining piece: normalize -> split on
 * normalized added tokens -> pre-tokenize -> BPE per word -> post-processor template. This is the order of the
 * reference (tokenizers' TokenizerImpl::encode_single_sequence + AddedVocabulary::extract_and_normalize).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tok_internal.h"

#define TOK_MAX_FILE_BYTES ((size_t)1 << 30)

/* ---- small helpers ---- */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

static char *dup_n(const char *s, size_t n)
{
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = 0;
    return d;
}

static int arena_add(struct tokenizer *t, const char *s, size_t n, uint32_t *off)
{
    if (t->arena.n + n + 1 >= UINT32_MAX) return ST_ERANGE;
    *off = (uint32_t)t->arena.n;
    if (tok_buf_put(&t->arena, s, n) < 0 || tok_buf_put(&t->arena, "", 1) < 0) return ST_ENOMEM;
    return 0;
}

int tok_enc_push_id(struct tok_enc *e, int32_t id)
{
    if (e->n_ids == e->cap_ids) {
        size_t cap = e->cap_ids ? e->cap_ids * 2 : 256;
        if (cap > (size_t)INT32_MAX) return err_set(e->err, ST_ERANGE, "too many tokens");
        int32_t *a = realloc(e->ids, sizeof(int32_t) * cap);
        if (!a) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->ids = a;
        e->cap_ids = cap;
    }
    e->ids[e->n_ids++] = id;
    return 0;
}

static void enc_free(struct tok_enc *e)
{
    tok_buf_free(&e->work);
    tok_buf_free(&e->tmp);
    free(e->pa);
    free(e->pb);
    free(e->spans);
    free(e->m);
    free(e->ids);
    free(e->syms);
    free(e->heap);
    if (e->md) pcre2_match_data_free(e->md);
    if (e->mctx) pcre2_match_context_free(e->mctx);
    if (e->jit) pcre2_jit_stack_free(e->jit);
    memset(e, 0, sizeof(*e));
}

static int enc_init(struct tok_enc *e, const struct tokenizer *t, char *err)
{
    memset(e, 0, sizeof(*e));
    e->t = t;
    e->err = err;
    e->md = pcre2_match_data_create(1, NULL);
    if (!e->md) return err_set(err, ST_ENOMEM, "out of memory");
    return 0;
}

/* ---- post-processor ---- */

static void tmpl_free(struct tok_tmpl *tp)
{
    for (int i = 0; i < tp->n_items; i++) free(tp->items[i].ids);
    free(tp->items);
    memset(tp, 0, sizeof(*tp));
}

static int tmpl_add_item(struct tok_tmpl *tp, bool is_seq, const int32_t *ids, int n)
{
    struct tok_tmpl_item *a = realloc(tp->items, sizeof(*a) * (size_t)(tp->n_items + 1));
    if (!a) return ST_ENOMEM;
    tp->items = a;
    struct tok_tmpl_item *it = &tp->items[tp->n_items++];
    it->is_seq = is_seq;
    it->n_ids = n;
    it->ids = NULL;
    if (n) {
        if (!(it->ids = malloc(sizeof(int32_t) * (size_t)n))) return ST_ENOMEM;
        memcpy(it->ids, ids, sizeof(int32_t) * (size_t)n);
    }
    return 0;
}

static int posts_add(struct tokenizer *t, struct tok_tmpl *tp, char *err)
{
    struct tok_tmpl *a = realloc(t->posts, sizeof(*a) * (size_t)(t->n_posts + 1));
    if (!a) {
        tmpl_free(tp);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    t->posts = a;
    t->posts[t->n_posts++] = *tp;
    return 0;
}

static int json_id(const json_t *v, int32_t *id)
{
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= TOK_MAX_ID) return -1;
    *id = (int32_t)json_integer_value(v);
    return 0;
}

static int posts_parse(struct tokenizer *t, const json_t *j, int depth, char *err)
{
    if (depth > 32) return err_set(err, ST_EFORMAT, "post_processor: nesting too deep");
    const char *type = tok_jstr(j, "type", NULL);
    if (!type) return err_set(err, ST_EFORMAT, "post_processor: missing \"type\"");
    struct tok_tmpl tp = {0};
    int rc;
    if (strcmp(type, "Sequence") == 0) {
        json_t *a = json_object_get(j, "processors");
        if (!json_is_array(a)) return err_set(err, ST_EFORMAT, "post_processor Sequence: \"processors\" must be an array");
        for (size_t i = 0; i < json_array_size(a); i++)
            if ((rc = posts_parse(t, json_array_get(a, i), depth + 1, err)) < 0) return rc;
        return 0;
    }
    if (strcmp(type, "ByteLevel") == 0) return 0; /* offsets only */
    if (strcmp(type, "TemplateProcessing") == 0) {
        json_t *single = json_object_get(j, "single"), *specials = json_object_get(j, "special_tokens");
        if (!json_is_array(single))
            return err_set(err, ST_EFORMAT, "post_processor TemplateProcessing: \"single\" must be an array");
        for (size_t i = 0; i < json_array_size(single); i++) {
            json_t *it = json_array_get(single, i), *v;
            if ((v = json_object_get(it, "Sequence"))) {
                const char *sid = tok_jstr(v, "id", NULL);
                if (!sid || strcmp(sid, "A") != 0) {
                    tmpl_free(&tp);
                    return err_set(err, ST_EFORMAT,
                                   "post_processor TemplateProcessing: the single template may only use sequence A");
                }
                if (tmpl_add_item(&tp, true, NULL, 0) < 0) goto nomem;
            } else if ((v = json_object_get(it, "SpecialToken"))) {
                const char *name = tok_jstr(v, "id", NULL);
                json_t *sp = name ? json_object_get(specials, name) : NULL;
                json_t *ids = json_object_get(sp, "ids");
                if (!json_is_array(ids)) {
                    tmpl_free(&tp);
                    return err_set(err, ST_EFORMAT,
                                   "post_processor TemplateProcessing: special token \"%s\" is not in special_tokens",
                                   name ? name : "?");
                }
                size_t n = json_array_size(ids);
                int32_t *buf = malloc(sizeof(int32_t) * (n + 1));
                if (!buf) goto nomem;
                for (size_t k = 0; k < n; k++)
                    if (json_id(json_array_get(ids, k), &buf[k]) < 0 || buf[k] >= t->n_ids) {
                        free(buf);
                        tmpl_free(&tp);
                        return err_set(err, ST_EFORMAT, "post_processor TemplateProcessing: \"%s\" has an unknown id",
                                       name);
                    }
                rc = tmpl_add_item(&tp, false, buf, (int)n);
                free(buf);
                if (rc < 0) goto nomem;
            } else {
                tmpl_free(&tp);
                return err_set(err, ST_EFORMAT, "post_processor TemplateProcessing: bad template item");
            }
        }
        return posts_add(t, &tp, err);
    }
    if (strcmp(type, "RobertaProcessing") == 0 || strcmp(type, "BertProcessing") == 0) {
        int32_t cls, sep;
        if (json_id(json_array_get(json_object_get(j, "cls"), 1), &cls) < 0 ||
            json_id(json_array_get(json_object_get(j, "sep"), 1), &sep) < 0 || cls >= t->n_ids || sep >= t->n_ids)
            return err_set(err, ST_EFORMAT, "post_processor %s: cls and sep must be [token, id]", type);
        if (tmpl_add_item(&tp, false, &cls, 1) < 0 || tmpl_add_item(&tp, true, NULL, 0) < 0 ||
            tmpl_add_item(&tp, false, &sep, 1) < 0)
            goto nomem;
        return posts_add(t, &tp, err);
    }
    return err_set(err, ST_EUNSUPPORTED, "unsupported post_processor type \"%s\"", type);
nomem:
    tmpl_free(&tp);
    return err_set(err, ST_ENOMEM, "out of memory");
}

static int apply_posts(const struct tokenizer *t, struct tok_enc *e)
{
    for (int p = 0; p < t->n_posts; p++) {
        const struct tok_tmpl *tp = &t->posts[p];
        size_t n = 0;
        for (int i = 0; i < tp->n_items; i++) n += tp->items[i].is_seq ? e->n_ids : (size_t)tp->items[i].n_ids;
        if (n > (size_t)INT32_MAX) return err_set(e->err, ST_ERANGE, "too many tokens");
        int32_t *out = malloc(sizeof(int32_t) * (n ? n : 1));
        if (!out) return err_set(e->err, ST_ENOMEM, "out of memory");
        size_t k = 0;
        for (int i = 0; i < tp->n_items; i++) {
            const struct tok_tmpl_item *it = &tp->items[i];
            const int32_t *src = it->is_seq ? e->ids : it->ids;
            size_t cnt = it->is_seq ? e->n_ids : (size_t)it->n_ids;
            if (cnt) memcpy(out + k, src, sizeof(int32_t) * cnt);
            k += cnt;
        }
        free(e->ids);
        e->ids = out;
        e->cap_ids = n ? n : 1;
        e->n_ids = n;
    }
    return 0;
}

/* ---- loading ---- */

static int config_token(const json_t *cfg, const char *key, char **out)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v)) v = json_object_get(v, "content");
    if (!json_is_string(v)) return 0;
    if (!(*out = dup_n(json_string_value(v), json_string_length(v)))) return ST_ENOMEM;
    return 0;
}

static int config_load(const char *name, const char *cfg, size_t len, json_t **out, char *err)
{
    json_error_t je;
    json_t *j = json_loadb(cfg, len, JSON_ALLOW_NUL, &je);
    if (!j && strstr(je.text, "too big integer")) /* model_max_length is often 1e30 written as an integer */
        j = json_loadb(cfg, len, JSON_ALLOW_NUL | JSON_DECODE_INT_AS_REAL, &je);
    if (!j) return err_set(err, ST_EFORMAT, "%s: line %d, column %d: %s", name, je.line, je.column, je.text);
    if (!json_is_object(j)) {
        json_decref(j);
        return err_set(err, ST_EFORMAT, "%s: expected a JSON object", name);
    }
    *out = j;
    return 0;
}

static int config_apply(struct tokenizer *t, const json_t *j, bool *add_bos, bool *add_eos, char *err)
{
    json_t *ct = json_object_get(j, "chat_template");
    if (json_is_array(ct)) { /* [{name, template}, ...]: the "default" one, else the first */
        json_t *pick = NULL;
        for (size_t i = 0; i < json_array_size(ct); i++) {
            json_t *it = json_array_get(ct, i);
            const char *nm = tok_jstr(it, "name", NULL);
            if (!pick || (nm && strcmp(nm, "default") == 0)) pick = it;
        }
        ct = json_object_get(pick, "template");
    }
    if ((json_is_string(ct) && !(t->chat_template = dup_n(json_string_value(ct), json_string_length(ct)))) ||
        config_token(j, "bos_token", &t->bos_token) < 0 || config_token(j, "eos_token", &t->eos_token) < 0)
        return err_set(err, ST_ENOMEM, "out of memory");
    *add_bos = tok_jbool(j, "add_bos_token", false);
    *add_eos = tok_jbool(j, "add_eos_token", false);
    t->split_special = tok_jbool(j, "split_special_tokens", false);
    return 0;
}

static int cmp_added_key(const void *a, const void *b)
{
    long x = strtol(*(const char *const *)a, NULL, 10), y = strtol(*(const char *const *)b, NULL, 10);
    return x < y ? -1 : x > y;
}

/* tokenizer.json's added_tokens, then the tokens of tokenizer_config.json's added_tokens_decoder that it lacks
 * (transformers adds those when it loads a fast tokenizer), in id order. Returns a new array. */
static json_t *added_merge(const json_t *file_added, const json_t *cfg)
{
    json_t *all = json_array();
    if (!all) return NULL;
    if (json_is_array(file_added)) json_array_extend(all, (json_t *)file_added);
    json_t *dec = json_object_get(cfg, "added_tokens_decoder");
    size_t n = json_object_size(dec);
    if (!json_is_object(dec) || n == 0) return all;
    const char **keys = malloc(sizeof(char *) * n);
    json_t *have = json_object(); /* contents already in tokenizer.json, as a set */
    if (!keys || !have) {
        free(keys);
        json_decref(have);
        json_decref(all);
        return NULL;
    }
    for (size_t a = 0; a < json_array_size(file_added); a++) {
        const char *c = tok_jstr(json_array_get(file_added, a), "content", NULL);
        if (c) json_object_set_new(have, c, json_true());
    }
    size_t k = 0;
    const char *key;
    json_t *v;
    json_object_foreach(dec, key, v) keys[k++] = key;
    qsort(keys, k, sizeof(char *), cmp_added_key);
    for (size_t i = 0; i < k; i++) {
        json_t *tok = json_object_get(dec, keys[i]);
        const char *content = tok_jstr(tok, "content", NULL);
        char *end;
        long id = strtol(keys[i], &end, 10);
        if (!content || *end || end == keys[i] || id < 0 || id >= TOK_MAX_ID) continue;
        if (json_object_get(have, content)) continue;
        json_t *copy = json_deep_copy(tok);
        if (copy && json_object_set_new(copy, "id", json_integer(id)) < 0) {
            json_decref(copy);
            copy = NULL;
        }
        if (!copy || json_array_append_new(all, copy) < 0) { /* append_new releases copy on failure */
            json_decref(all);
            all = NULL;
            break;
        }
    }
    free(keys);
    json_decref(have);
    return all;
}

static int added_parse(struct tokenizer *t, const json_t *arr, const char *name, char *err)
{
    size_t n = json_array_size(arr);
    if (n > (size_t)TOK_MAX_ID) return err_set(err, ST_EFORMAT, "%s: too many added tokens", name);
    t->added = calloc(n ? n : 1, sizeof(*t->added));
    if (!t->added || tok_strmap_init(&t->added_map, (uint32_t)n) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *a = json_array_get(arr, i);
        size_t cl;
        const char *content = tok_jstr(a, "content", &cl);
        int32_t id;
        if (!content || json_id(json_object_get(a, "id"), &id) < 0)
            return err_set(err, ST_EFORMAT, "%s: added_tokens[%zu] needs a \"content\" string and an \"id\"", name, i);
        if (cl == 0) continue; /* ignored by the reference */
        if (tok_strmap_get(&t->added_map, t->arena.p, content, cl) >= 0) continue; /* first one wins */
        struct tok_added *ad = &t->added[t->n_added];
        bool special = tok_jbool(a, "special", false);
        *ad = (struct tok_added){.id = id,
                                 .single_word = tok_jbool(a, "single_word", false),
                                 .lstrip = tok_jbool(a, "lstrip", false),
                                 .rstrip = tok_jbool(a, "rstrip", false),
                                 .normalized = tok_jbool(a, "normalized", !special),
                                 .special = special};
        /* a content the model already knows keeps the model's id */
        int32_t vid = tok_strmap_get(&t->vocab, t->arena.p, content, cl);
        if (vid >= 0 && vid != id) {
            LOGW("tokenizer", "%s: added token \"%.40s\" has id %d but the vocab says %d; using %d", name, content,
                 (int)id, (int)vid, (int)vid);
            ad->id = vid;
        }
        if (arena_add(t, content, cl, &ad->off) < 0) return err_set(err, ST_ENOMEM, "out of memory");
        ad->len = (uint32_t)cl;
        if (tok_strmap_put(&t->added_map, t->arena.p, ad->off, ad->len, t->n_added) < 0)
            return err_set(err, ST_ENOMEM, "out of memory");
        t->n_added++;
    }
    return 0;
}

/* Builds the added-token tries: specials first, then the others (the reference's order); normalized tokens are
 * matched in normalized text, so their patterns are normalized too. */
static int tries_build(struct tokenizer *t, char *err)
{
    struct tok_enc e;
    int rc = enc_init(&e, t, err);
    if (rc < 0) return rc;
    memset(t->raw_trie.root, 0xff, sizeof(t->raw_trie.root));
    memset(t->norm_trie.root, 0xff, sizeof(t->norm_trie.root));
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < t->n_added; i++) {
            const struct tok_added *a = &t->added[i];
            if (a->special != (pass == 0)) continue;
            const char *s = t->arena.p + a->off;
            if (!a->normalized) {
                rc = tok_trie_add(&t->raw_trie, s, a->len, i);
            } else {
                size_t off, len;
                e.work.n = 0;
                if ((rc = tok_buf_put(&e.work, s, a->len)) < 0) break;
                if ((rc = tok_normalize(&e, 0, a->len, &off, &len)) < 0) break;
                rc = tok_trie_add(&t->norm_trie, e.work.p + off, len, i);
            }
            if (rc < 0) break;
        }
    }
    enc_free(&e);
    if (rc < 0) return err_set(err, rc, "building the added-token matcher failed (%s)", st_strerror(rc));
    return 0;
}

static int model_parse(struct tokenizer *t, struct tok_json_out *jo, const char *name, char *err)
{
    const json_t *m = jo->model;
    if (!jo->has_merges && json_object_get(m, "merges"))
        return err_set(err, ST_EFORMAT, "%s: model.merges must be an array", name);
    size_t pl = 0, sl = 0;
    const char *pre = tok_jstr(m, "continuing_subword_prefix", &pl), *suf = tok_jstr(m, "end_of_word_suffix", &sl);
    if ((pre && pl && !(t->subword_prefix = dup_n(pre, pl))) || (suf && sl && !(t->word_suffix = dup_n(suf, sl))))
        return err_set(err, ST_ENOMEM, "out of memory");
    t->subword_prefix_len = t->subword_prefix ? pl : 0;
    t->word_suffix_len = t->word_suffix ? sl : 0;
    t->fuse_unk = tok_jbool(m, "fuse_unk", false);
    t->byte_fallback = tok_jbool(m, "byte_fallback", false);
    t->ignore_merges = tok_jbool(m, "ignore_merges", false);
    json_t *dropout = json_object_get(m, "dropout");
    if (json_is_number(dropout) && json_number_value(dropout) > 0)
        LOGW("tokenizer", "%s: BPE dropout %g ignored (encoding is deterministic)", name, json_number_value(dropout));
    size_t ul;
    const char *unk = tok_jstr(m, "unk_token", &ul);
    t->unk_id = -1;
    if (unk) {
        t->unk_id = tok_strmap_get(&t->vocab, t->arena.p, unk, ul);
        if (t->unk_id < 0) t->unk_id = -2;
    }

    /* merges: (a, b) -> (rank, id of a + b without b's continuing prefix) */
    if (tok_pairmap_init(&t->merges, jo->n_merges) < 0) return err_set(err, ST_ENOMEM, "out of memory");
    struct tok_buf cat = {0};
    size_t rf_cap = 0;
    const char *ma = jo->marena.p;
    for (uint32_t i = 0; i < jo->n_merges; i++) {
        const struct tok_merge_raw *r = &jo->merges[i];
        int rc;
        int32_t a = tok_strmap_get(&t->vocab, t->arena.p, ma + r->a_off, r->a_len);
        int32_t b = tok_strmap_get(&t->vocab, t->arena.p, ma + r->b_off, r->b_len);
        const struct tok_merge_raw *bad = NULL;
        uint32_t bad_off = 0, bad_len = 0;
        if (a < 0) bad = r, bad_off = r->a_off, bad_len = r->a_len;
        else if (b < 0) bad = r, bad_off = r->b_off, bad_len = r->b_len;
        if (bad) {
            tok_buf_free(&cat);
            return err_set(err, ST_EFORMAT, "%s: merge %u: token \"%.*s\" is not in the vocab", name, i + 1,
                           (int)ST_MIN(bad_len, 80u), ma + bad_off);
        }
        if (r->b_len < t->subword_prefix_len) {
            tok_buf_free(&cat);
            return err_set(err, ST_EFORMAT, "%s: merge %u: second token shorter than continuing_subword_prefix", name,
                           i + 1);
        }
        cat.n = 0;
        if (tok_buf_put(&cat, ma + r->a_off, r->a_len) < 0 ||
            tok_buf_put(&cat, ma + r->b_off + t->subword_prefix_len, r->b_len - t->subword_prefix_len) < 0) {
            tok_buf_free(&cat);
            return err_set(err, ST_ENOMEM, "out of memory");
        }
        int32_t id = tok_strmap_get(&t->vocab, t->arena.p, cat.p, cat.n);
        if (id < 0) {
            rc = err_set(err, ST_EFORMAT, "%s: merge %u: merged token \"%.*s\" is not in the vocab", name, i + 1,
                         (int)ST_MIN(cat.n, (size_t)80), cat.p);
            tok_buf_free(&cat);
            return rc;
        }
        tok_pairmap_put(&t->merges, a, b, i, id);
        /* first character of the right-hand side (see tok_bpe_word) */
        if (r->b_len) {
            int l;
            int32_t cp = tok_utf8_decode((const unsigned char *)ma + r->b_off, r->b_len, &l);
            if (cp >= 0 && cp < 128) {
                t->right_first_ascii[cp] = true;
            } else if (cp >= 128) {
                if (t->n_right_first == rf_cap) {
                    rf_cap = rf_cap ? rf_cap * 2 : 64;
                    uint32_t *nr = realloc(t->right_first, sizeof(uint32_t) * rf_cap);
                    if (!nr) {
                        tok_buf_free(&cat);
                        return err_set(err, ST_ENOMEM, "out of memory");
                    }
                    t->right_first = nr;
                }
                t->right_first[t->n_right_first++] = (uint32_t)cp;
            }
        }
    }
    tok_buf_free(&cat);
    if (t->n_right_first) { /* sort, dedupe */
        qsort(t->right_first, t->n_right_first, sizeof(uint32_t), cmp_u32);
        size_t k = 1;
        for (size_t i = 1; i < t->n_right_first; i++)
            if (t->right_first[i] != t->right_first[k - 1]) t->right_first[k++] = t->right_first[i];
        t->n_right_first = k;
    }

    char buf[16];
    for (int b = 0; b < 256; b++) {
        snprintf(buf, sizeof(buf), "<0x%02X>", b);
        t->byte_fb_id[b] = tok_strmap_get(&t->vocab, t->arena.p, buf, 6);
        int n = tok_utf8_encode(tok_byte_to_cp[b], buf);
        t->byte_sym[b] = tok_strmap_get(&t->vocab, t->arena.p, buf, (size_t)n);
    }
    for (int c = 0; c < 128; c++) {
        buf[0] = (char)c;
        t->ascii_sym[c] = tok_strmap_get(&t->vocab, t->arena.p, buf, 1);
    }
    return 0;
}

static int load_impl(struct tokenizer **out, const char *name, const char *json, size_t json_len,
                     const char *cfg_name, const char *cfg, size_t cfg_len, char *err)
{
    struct tok_json_out jo = {0};
    json_t *cfgj = NULL, *added = NULL;
    struct tokenizer *t = calloc(1, sizeof(*t));
    int rc;
    *out = NULL;
    if (!t) return err_set(err, ST_ENOMEM, "out of memory");
    t->bos_id = t->eos_id = -1;
    if (cfg && (rc = config_load(cfg_name, cfg, cfg_len, &cfgj, err)) < 0) goto fail;
    if ((rc = tok_json_parse(name, json, json_len, &t->arena, &jo, err)) < 0) goto fail;
    if (!jo.model) {
        rc = err_set(err, ST_EFORMAT, "%s: no \"model\" object", name);
        goto fail;
    }
    const char *mtype = tok_jstr(jo.model, "type", NULL);
    if (mtype && strcmp(mtype, "BPE") != 0) {
        rc = err_set(err, ST_EUNSUPPORTED, "%s: model type \"%s\" is not supported (only BPE)", name, mtype);
        goto fail;
    }
    if (!jo.has_vocab) {
        rc = err_set(err, ST_EFORMAT, "%s: model.vocab is missing or not an object", name);
        goto fail;
    }

    /* model vocab */
    int64_t max_id = -1;
    for (uint32_t i = 0; i < jo.n_vocab; i++) max_id = ST_MAX(max_id, (int64_t)jo.vocab[i].val);
    json_t *file_added = json_object_get(jo.root, "added_tokens");
    if (file_added && !json_is_null(file_added) && !json_is_array(file_added)) {
        rc = err_set(err, ST_EFORMAT, "%s: \"added_tokens\" must be an array", name);
        goto fail;
    }
    if (!(added = added_merge(file_added, cfgj))) goto nomem;
    for (size_t i = 0; i < json_array_size(added); i++) {
        int32_t id;
        if (json_id(json_object_get(json_array_get(added, i), "id"), &id) == 0) max_id = ST_MAX(max_id, (int64_t)id);
    }
    if (max_id < 0) {
        rc = err_set(err, ST_EFORMAT, "%s: the vocabulary is empty", name);
        goto fail;
    }
    t->n_ids = (int)max_id + 1;
    if (tok_strmap_init(&t->vocab, jo.n_vocab) < 0) goto nomem;
    for (uint32_t i = 0; i < jo.n_vocab; i++)
        if (tok_strmap_put(&t->vocab, t->arena.p, jo.vocab[i].off, jo.vocab[i].len, jo.vocab[i].val) < 0) goto nomem;
    t->id_off = malloc(sizeof(uint32_t) * (size_t)t->n_ids);
    t->id_len = malloc(sizeof(uint32_t) * (size_t)t->n_ids);
    t->id_flags = calloc((size_t)t->n_ids, 1);
    if (!t->id_off || !t->id_len || !t->id_flags) goto nomem;
    memset(t->id_off, 0xff, sizeof(uint32_t) * (size_t)t->n_ids);
    for (uint32_t i = 0; i < jo.n_vocab; i++) {
        const struct tok_sm_entry *v = &jo.vocab[i];
        if (t->id_off[v->val] == UINT32_MAX) {
            t->id_off[v->val] = v->off;
            t->id_len[v->val] = v->len;
        }
    }
    if ((rc = model_parse(t, &jo, name, err)) < 0) goto fail;

    /* added tokens override the id -> piece table (decode looks at them first) */
    if ((rc = added_parse(t, added, name, err)) < 0) goto fail;
    for (int i = 0; i < t->n_added; i++) {
        const struct tok_added *a = &t->added[i];
        t->id_off[a->id] = a->off;
        t->id_len[a->id] = a->len;
        t->id_flags[a->id] |= TOK_ID_ADDED | (a->special ? TOK_ID_SPECIAL : 0);
    }
    for (int i = 0; i < t->n_ids; i++)
        if (t->id_off[i] != UINT32_MAX) t->max_piece_len = ST_MAX(t->max_piece_len, (size_t)t->id_len[i]);

    if ((rc = tok_norms_parse(t, json_object_get(jo.root, "normalizer"), err)) < 0 ||
        (rc = tok_pres_parse(t, json_object_get(jo.root, "pre_tokenizer"), err)) < 0 ||
        (rc = tok_decs_parse(t, json_object_get(jo.root, "decoder"), err)) < 0) {
        err_prefix(err, rc, "%s", name);
        goto fail;
    }
    json_t *post = json_object_get(jo.root, "post_processor");
    if (post && !json_is_null(post)) {
        if (!json_is_object(post)) {
            rc = err_set(err, ST_EFORMAT, "%s: \"post_processor\" must be an object or null", name);
            goto fail;
        }
        if ((rc = posts_parse(t, post, 0, err)) < 0) {
            err_prefix(err, rc, "%s", name);
            goto fail;
        }
    }

    bool add_bos = false, add_eos = false;
    if (cfgj && (rc = config_apply(t, cfgj, &add_bos, &add_eos, err)) < 0) goto fail;
    if (t->bos_token) t->bos_id = tokenizer_find(t, t->bos_token);
    if (t->eos_token) t->eos_id = tokenizer_find(t, t->eos_token);
    bool post_adds = false;
    for (int p = 0; p < t->n_posts; p++)
        for (int i = 0; i < t->posts[p].n_items; i++) post_adds |= !t->posts[p].items[i].is_seq;
    if (!post_adds && ((add_bos && t->bos_id >= 0) || (add_eos && t->eos_id >= 0))) {
        struct tok_tmpl tp = {0};
        if ((add_bos && t->bos_id >= 0 && tmpl_add_item(&tp, false, &t->bos_id, 1) < 0) ||
            tmpl_add_item(&tp, true, NULL, 0) < 0 ||
            (add_eos && t->eos_id >= 0 && tmpl_add_item(&tp, false, &t->eos_id, 1) < 0)) {
            tmpl_free(&tp);
            goto nomem;
        }
        if ((rc = posts_add(t, &tp, err)) < 0) goto fail;
    }

    if ((rc = tries_build(t, err)) < 0) goto fail;
    t->stream_chunk_max = tok_stream_bound(t);
    char *shrunk = realloc(t->arena.p, t->arena.n + 1); /* the parser reserved the file's size */
    if (shrunk) {
        t->arena.p = shrunk;
        t->arena.cap = t->arena.n + 1;
    }
    tok_json_out_free(&jo);
    json_decref(added);
    json_decref(cfgj);
    *out = t;
    return 0;
nomem:
    rc = err_set(err, ST_ENOMEM, "%s: out of memory", name);
fail:
    tok_json_out_free(&jo);
    json_decref(added);
    json_decref(cfgj);
    tokenizer_free(t);
    return rc;
}

int tokenizer_load_json(struct tokenizer **out, const char *name, const char *json, size_t json_len,
                        const char *config_json, size_t config_len, char *err)
{
    if (!out || !json) return err_set(err, ST_EINVAL, "tokenizer_load_json: no JSON given");
    return load_impl(out, name ? name : "tokenizer.json", json, json_len, "tokenizer_config.json", config_json,
                     config_len, err);
}

int tokenizer_load(struct tokenizer **out, const char *dir, char *err)
{
    char path[4096], cpath[4096];
    char *json = NULL, *cfg = NULL;
    size_t jn = 0, cn = 0;
    int rc;
    if (!out || !dir) return err_set(err, ST_EINVAL, "tokenizer_load: no directory given");
    *out = NULL;
    if (path_join(path, sizeof(path), dir, "tokenizer.json") < 0 ||
        path_join(cpath, sizeof(cpath), dir, "tokenizer_config.json") < 0)
        return err_set(err, ST_ERANGE, "tokenizer_load: path too long");
    if ((rc = file_read_all(path, &json, &jn, TOK_MAX_FILE_BYTES, err)) < 0) return rc;
    if (file_exists(cpath) && (rc = file_read_all(cpath, &cfg, &cn, TOK_MAX_FILE_BYTES, err)) < 0) {
        free(json);
        return rc;
    }
    rc = load_impl(out, path, json, jn, cpath, cfg, cn, err);
    free(json);
    free(cfg);
    return rc;
}

void tokenizer_free(struct tokenizer *t)
{
    if (!t) return;
    tok_buf_free(&t->arena);
    free(t->id_off);
    free(t->id_len);
    free(t->id_flags);
    tok_strmap_free(&t->vocab);
    tok_pairmap_free(&t->merges);
    free(t->subword_prefix);
    free(t->word_suffix);
    free(t->right_first);
    free(t->added);
    tok_strmap_free(&t->added_map);
    tok_trie_free(&t->raw_trie);
    tok_trie_free(&t->norm_trie);
    tok_norms_free(t);
    tok_pres_free(t);
    for (int i = 0; i < t->n_posts; i++) tmpl_free(&t->posts[i]);
    free(t->posts);
    tok_decs_free(t);
    free(t->chat_template);
    free(t->bos_token);
    free(t->eos_token);
    free(t);
}

/* ---- encoding ---- */

static int pa_set_one(struct tok_enc *e, size_t off, size_t len, uint32_t flags)
{
    if (e->cap_pa == 0) {
        e->pa = malloc(sizeof(*e->pa) * 256);
        if (!e->pa) return err_set(e->err, ST_ENOMEM, "out of memory");
        e->cap_pa = 256;
    }
    e->pa[0] = (struct tok_piece){off, len, flags};
    e->n_pa = len ? 1 : 0;
    return 0;
}

static int encode_words(struct tok_enc *e, size_t off, size_t len, bool first)
{
    int rc;
    if ((rc = pa_set_one(e, off, len, first ? TOK_PIECE_FIRST : 0)) < 0) return rc;
    if ((rc = tok_pretokenize(e)) < 0) return rc;
    for (size_t i = 0; i < e->n_pa; i++) {
        const struct tok_piece *p = &e->pa[i];
        if ((rc = tok_bpe_word(e, e->work.p + p->off, p->len, (p->flags & TOK_PIECE_BYTELEVEL) != 0)) < 0) return rc;
    }
    return 0;
}

/* A stretch of text between raw added tokens. */
static int encode_text(struct tok_enc *e, const char *s, size_t n, bool first)
{
    const struct tokenizer *t = e->t;
    int rc;
    size_t off, len;
    e->work.n = 0;
    if (tok_buf_put(&e->work, s, n) < 0) return err_set(e->err, ST_ENOMEM, "out of memory");
    if ((rc = tok_normalize(e, 0, n, &off, &len)) < 0) return rc;
    if (!t->norm_trie.n) return encode_words(e, off, len, first);
    if ((rc = tok_added_split(e, &t->norm_trie, e->work.p + off, len)) < 0) return rc;
    /* the spans are consumed in order and nothing below splits on added tokens again */
    size_t n_spans = e->n_spans;
    for (size_t i = 0; i < n_spans; i++) {
        struct tok_span sp = e->spans[i];
        if (sp.id >= 0) rc = tok_enc_push_id(e, sp.id);
        else rc = encode_words(e, off + sp.start, sp.stop - sp.start, first && sp.start == 0);
        if (rc < 0) return rc;
    }
    return 0;
}

int tokenizer_encode(const struct tokenizer *t, const char *text, size_t len, bool add_special, int32_t **ids,
                     int *n_ids, char *err)
{
    struct tok_enc e;
    struct tok_span *raw = NULL;
    int rc;
    if (ids) *ids = NULL;
    if (n_ids) *n_ids = 0;
    if (!t || !ids || !n_ids || (!text && len)) return err_set(err, ST_EINVAL, "tokenizer_encode: bad arguments");
    if (len > TOK_MAX_INPUT)
        return err_set(err, ST_ERANGE, "text of %zu bytes is over the %zu byte limit", len, TOK_MAX_INPUT);
    size_t valid = tok_utf8_valid_prefix((const unsigned char *)text, len);
    if (valid != len)
        return err_set(err, ST_EINVAL, "text is not valid UTF-8 (bad byte 0x%02x at offset %zu)",
                       (unsigned char)text[valid], valid);
    if ((rc = enc_init(&e, t, err)) < 0) return rc;
    if ((rc = tok_added_split(&e, &t->raw_trie, text, len)) < 0) goto fail;
    size_t n_raw = e.n_spans;
    if (n_raw) {
        if (!(raw = malloc(sizeof(*raw) * n_raw))) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            goto fail;
        }
        memcpy(raw, e.spans, sizeof(*raw) * n_raw);
    }
    for (size_t i = 0; i < n_raw; i++) {
        if (raw[i].id >= 0) rc = tok_enc_push_id(&e, raw[i].id);
        else rc = encode_text(&e, text + raw[i].start, raw[i].stop - raw[i].start, raw[i].start == 0);
        if (rc < 0) goto fail;
    }
    if (add_special && (rc = apply_posts(t, &e)) < 0) goto fail;
    if (e.n_ids > (size_t)INT32_MAX) {
        rc = err_set(err, ST_ERANGE, "too many tokens");
        goto fail;
    }
    if (!e.ids && !(e.ids = malloc(sizeof(int32_t)))) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    *ids = e.ids;
    *n_ids = (int)e.n_ids;
    e.ids = NULL;
    free(raw);
    enc_free(&e);
    return 0;
fail:
    free(raw);
    enc_free(&e);
    return rc;
}

int tokenizer_decode(const struct tokenizer *t, const int32_t *ids, int n_ids, bool skip_special, char **out,
                     size_t *out_len, char *err)
{
    if (out) *out = NULL;
    if (out_len) *out_len = 0;
    if (!t || !out) return err_set(err, ST_EINVAL, "tokenizer_decode: bad arguments");
    return tok_decode_ref(t, ids, n_ids, skip_special, out, out_len, err);
}

/* ---- queries ---- */

int tokenizer_vocab_size(const struct tokenizer *t) { return t ? t->n_ids : 0; }

const char *tokenizer_piece(const struct tokenizer *t, int32_t id)
{
    if (!t || id < 0 || id >= t->n_ids || t->id_off[id] == UINT32_MAX) return NULL;
    return t->arena.p + t->id_off[id];
}

int32_t tokenizer_find(const struct tokenizer *t, const char *piece)
{
    if (!t || !piece) return -1;
    size_t n = strlen(piece);
    int32_t a = tok_strmap_get(&t->added_map, t->arena.p, piece, n);
    if (a >= 0) return t->added[a].id;
    return tok_strmap_get(&t->vocab, t->arena.p, piece, n);
}

bool tokenizer_is_special(const struct tokenizer *t, int32_t id)
{
    return t && id >= 0 && id < t->n_ids && (t->id_flags[id] & TOK_ID_SPECIAL);
}

const char *tokenizer_chat_template(const struct tokenizer *t) { return t ? t->chat_template : NULL; }
const char *tokenizer_bos_token(const struct tokenizer *t) { return t ? t->bos_token : NULL; }
const char *tokenizer_eos_token(const struct tokenizer *t) { return t ? t->eos_token : NULL; }
int32_t tokenizer_bos_id(const struct tokenizer *t) { return t ? t->bos_id : -1; }
int32_t tokenizer_eos_id(const struct tokenizer *t) { return t ? t->eos_id : -1; }
size_t tokenizer_stream_chunk_max(const struct tokenizer *t) { return t ? t->stream_chunk_max : 0; }
