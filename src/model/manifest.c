/* manifest: XXH3-128 of every tensor a node holds, plus config.json and tokenizer.json. */
#include "core/core.h"
#include "model/model.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <xxhash.h>

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const struct manifest_entry *)a)->name, ((const struct manifest_entry *)b)->name);
}

static void hash_file(const char *dir, const char *name, uint64_t *hi, uint64_t *lo)
{
    char path[1200];
    char *text = NULL;
    size_t len = 0;
    *hi = *lo = 0;
    if (!dir[0] || path_join(path, sizeof(path), dir, name) < 0 || !file_exists(path)) return;
    if (file_read_all(path, &text, &len, (size_t)1 << 31, NULL) < 0) return;
    XXH128_hash_t h = XXH3_128bits(text, len);
    *hi = h.high64;
    *lo = h.low64;
    free(text);
}

int manifest_build(struct manifest *mf, const struct model *m, char *err)
{
    memset(mf, 0, sizeof(*mf));
    mf->entries = calloc((size_t)(m->n_held > 0 ? m->n_held : 1), sizeof(*mf->entries));
    if (!mf->entries) return err_set(err, ST_ENOMEM, "manifest: out of memory");
    for (int i = 0; i < m->n_held; i++) {
        struct manifest_entry *e = &mf->entries[mf->n];
        e->name = st_strdup(m->held[i].name);
        if (!e->name) {
            manifest_free(mf);
            return err_set(err, ST_ENOMEM, "manifest: out of memory");
        }
        XXH128_hash_t h = XXH3_128bits(m->held[i].data, m->held[i].nbytes);
        e->hash_hi = h.high64;
        e->hash_lo = h.low64;
        e->nbytes = m->held[i].nbytes;
        mf->n++;
    }
    qsort(mf->entries, (size_t)mf->n, sizeof(*mf->entries), entry_cmp);
    if (m->dir[0]) {
        hash_file(m->dir, "config.json", &mf->config_hi, &mf->config_lo);
        hash_file(m->dir, "tokenizer.json", &mf->tokenizer_hi, &mf->tokenizer_lo);
    } else {
        /* generated weights: the shape stands for config.json */
        char desc[512];
        const struct model_config *c = &m->cfg;
        int n = snprintf(desc, sizeof(desc), "%s dim=%d hidden=%d layers=%d heads=%d kv=%d hd=%d vocab=%d bits=%d gs=%d tie=%d",
                         c->model_type, c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
                         c->vocab_size, c->q_bits, c->q_group_size, (int)c->tie_embeddings);
        XXH128_hash_t h = XXH3_128bits(desc, (size_t)n);
        mf->config_hi = h.high64;
        mf->config_lo = h.low64;
    }
    return ST_OK;
}

static int manifest_append(struct manifest *mf, const struct manifest *part, char *err)
{
    struct manifest_entry *e = realloc(mf->entries, sizeof(*e) * (size_t)(mf->n + part->n + 1));
    if (!e) return err_set(err, ST_ENOMEM, "manifest: out of memory");
    mf->entries = e;
    for (int i = 0; i < part->n; i++) {
        e[mf->n] = part->entries[i];
        e[mf->n].name = st_strdup(part->entries[i].name);
        if (!e[mf->n].name) return err_set(err, ST_ENOMEM, "manifest: out of memory");
        mf->n++;
    }
    mf->config_hi = part->config_hi;
    mf->config_lo = part->config_lo;
    return ST_OK;
}

int manifest_build_random(struct manifest *mf, const struct model_config *cfg, int bits, uint64_t seed, char *err)
{
    memset(mf, 0, sizeof(*mf));
    int rc = ST_OK;
    /* pieces: the embedding and head alone, then each layer alone */
    for (int l = -1; l < cfg->n_layers && rc == 0; l++) {
        struct model m;
        struct manifest part;
        bool ends = l < 0;
        if ((rc = model_init_random(&m, cfg, bits, seed, ends ? 0 : l, ends ? 0 : l + 1, ends, ends, err)) < 0) break;
        rc = manifest_build(&part, &m, err);
        model_free(&m);
        if (rc < 0) break;
        rc = manifest_append(mf, &part, err);
        manifest_free(&part);
    }
    if (rc < 0) {
        manifest_free(mf);
        return rc;
    }
    qsort(mf->entries, (size_t)mf->n, sizeof(*mf->entries), entry_cmp);
    return ST_OK;
}

char *manifest_to_json(const struct manifest *mf)
{
    json_t *root = json_object(), *tensors = json_object();
    char hex[40];
    snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, mf->config_hi, mf->config_lo);
    json_object_set_new(root, "config", json_string(hex));
    snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, mf->tokenizer_hi, mf->tokenizer_lo);
    json_object_set_new(root, "tokenizer", json_string(hex));
    for (int i = 0; i < mf->n; i++) {
        snprintf(hex, sizeof(hex), "%016" PRIx64 "%016" PRIx64, mf->entries[i].hash_hi, mf->entries[i].hash_lo);
        json_object_set_new(tensors, mf->entries[i].name, json_string(hex));
    }
    json_object_set_new(root, "n_tensors", json_integer(mf->n));
    json_object_set_new(root, "tensors", tensors);
    char *s = json_dumps(root, JSON_INDENT(1) | JSON_SORT_KEYS);
    json_decref(root);
    return s;
}

static const struct manifest_entry *find(const struct manifest *mf, const char *name)
{
    struct manifest_entry key = {.name = (char *)name};
    return bsearch(&key, mf->entries, (size_t)mf->n, sizeof(key), entry_cmp);
}

int manifest_compare(const struct manifest *want, const struct manifest *got, char *err)
{
    if (want->config_hi != got->config_hi || want->config_lo != got->config_lo)
        return err_set(err, ST_EMISMATCH, "config.json: %016" PRIx64 "%016" PRIx64 " (node) != %016" PRIx64 "%016" PRIx64 " (coordinator)",
                       got->config_hi, got->config_lo, want->config_hi, want->config_lo);
    if ((want->tokenizer_hi || want->tokenizer_lo) && (got->tokenizer_hi || got->tokenizer_lo) &&
        (want->tokenizer_hi != got->tokenizer_hi || want->tokenizer_lo != got->tokenizer_lo))
        return err_set(err, ST_EMISMATCH, "tokenizer.json: %016" PRIx64 "%016" PRIx64 " (node) != %016" PRIx64 "%016" PRIx64 " (coordinator)",
                       got->tokenizer_hi, got->tokenizer_lo, want->tokenizer_hi, want->tokenizer_lo);
    for (int i = 0; i < got->n; i++) {
        const struct manifest_entry *g = &got->entries[i], *w = find(want, g->name);
        if (!w) return err_set(err, ST_EMISMATCH, "tensor %s: held by the node but unknown to the coordinator", g->name);
        if (w->hash_hi != g->hash_hi || w->hash_lo != g->hash_lo || w->nbytes != g->nbytes)
            return err_set(err, ST_EMISMATCH, "tensor %s: %016" PRIx64 "%016" PRIx64 " (node) != %016" PRIx64 "%016" PRIx64 " (coordinator)",
                           g->name, g->hash_hi, g->hash_lo, w->hash_hi, w->hash_lo);
    }
    return ST_OK;
}

void manifest_free(struct manifest *mf)
{
    for (int i = 0; i < mf->n; i++) free(mf->entries[i].name);
    free(mf->entries);
    memset(mf, 0, sizeof(*mf));
}
