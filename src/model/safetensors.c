/* safetensors: mmap, header validation, lookup, sharded index, and a writer. */
#include "core/core.h"
#include "model/model.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ST_MAX_HEADER (256u << 20)
#define ST_MAX_TENSORS (1 << 20)

static const struct {
    const char *name;
    size_t size;
} dtypes[DT_COUNT] = {
    [DT_F32] = {"F32", 4}, [DT_F16] = {"F16", 2}, [DT_BF16] = {"BF16", 2}, [DT_F64] = {"F64", 8},
    [DT_I8] = {"I8", 1},   [DT_U8] = {"U8", 1},   [DT_I16] = {"I16", 2},   [DT_U16] = {"U16", 2},
    [DT_I32] = {"I32", 4}, [DT_U32] = {"U32", 4}, [DT_I64] = {"I64", 8},   [DT_U64] = {"U64", 8},
    [DT_BOOL] = {"BOOL", 1},
};

const char *dtype_name(enum dtype t) { return (t >= 0 && t < DT_COUNT) ? dtypes[t].name : "?"; }
size_t dtype_size(enum dtype t) { return (t >= 0 && t < DT_COUNT) ? dtypes[t].size : 0; }

int dtype_parse(const char *s)
{
    for (int i = 0; i < DT_COUNT; i++)
        if (strcmp(s, dtypes[i].name) == 0) return i;
    return -1;
}

float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
    if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalize */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    union { uint32_t u; float f; } v = {.u = u};
    return v.f;
}

uint16_t f32_to_f16(float f)
{
    union { uint32_t u; float f; } v = {.f = f};
    uint32_t x = v.u, sign = (x >> 16) & 0x8000;
    int32_t exp = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffff;
    if (((x >> 23) & 0xff) == 0xff) return (uint16_t)(sign | 0x7c00 | (mant ? 0x200 : 0));
    if (exp >= 31) return (uint16_t)(sign | 0x7c00);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift, rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13), rem = mant & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (uint16_t)h;
}

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
    return h;
}

int safetensors_index(struct safetensors *st, char *err)
{
    free(st->hash);
    int cap = 16;
    while (cap < st->n_tensors * 2) cap <<= 1;
    st->hash = malloc(sizeof(int) * (size_t)cap);
    if (!st->hash) return err_set(err, ST_ENOMEM, "safetensors: out of memory");
    st->hash_cap = cap;
    for (int i = 0; i < cap; i++) st->hash[i] = -1;
    for (int i = 0; i < st->n_tensors; i++) {
        uint64_t h = name_hash(st->tensors[i].name) & (uint64_t)(cap - 1);
        while (st->hash[h] >= 0) {
            if (strcmp(st->tensors[st->hash[h]].name, st->tensors[i].name) == 0) {
                int fa = st->tensors[st->hash[h]].file, fb = st->tensors[i].file;
                return err_set(err, ST_EFORMAT, "%s, %s: tensor \"%s\" appears twice",
                               fa >= 0 && fa < st->n_files ? st->files[fa].path : "(generated)",
                               fb >= 0 && fb < st->n_files ? st->files[fb].path : "(generated)", st->tensors[i].name);
            }
            h = (h + 1) & (uint64_t)(cap - 1);
        }
        st->hash[h] = i;
    }
    return ST_OK;
}

const struct st_tensor *safetensors_find(const struct safetensors *st, const char *name)
{
    if (!st->hash) return NULL;
    uint64_t h = name_hash(name) & (uint64_t)(st->hash_cap - 1);
    while (st->hash[h] >= 0) {
        const struct st_tensor *t = &st->tensors[st->hash[h]];
        if (strcmp(t->name, name) == 0) return t;
        h = (h + 1) & (uint64_t)(st->hash_cap - 1);
    }
    return NULL;
}

struct span {
    uint64_t begin, end;
    int idx;
};

static int span_cmp(const void *a, const void *b)
{
    const struct span *x = a, *y = b;
    return x->begin < y->begin ? -1 : x->begin > y->begin ? 1 : 0;
}

static int grow_tensors(struct safetensors *st, int extra, char *err)
{
    struct st_tensor *t = realloc(st->tensors, sizeof(*t) * (size_t)(st->n_tensors + extra));
    if (!t) return err_set(err, ST_ENOMEM, "safetensors: out of memory");
    st->tensors = t;
    return ST_OK;
}

int safetensors_parse(struct safetensors *st, const uint8_t *buf, size_t file_size, const char *path, char *err)
{
    int rc = ST_OK, file_idx = st->n_files - 1;
    json_t *root = NULL;
    struct span *spans = NULL;
    if (file_size < 8) return err_set(err, ST_EFORMAT, "%s: file is %zu bytes, too short for a safetensors header", path, file_size);
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)buf[i] << (8 * i);
    if (hlen > file_size - 8) return err_set(err, ST_EFORMAT, "%s: header length %llu exceeds the file size %zu (truncated?)", path, (unsigned long long)hlen, file_size);
    if (hlen > ST_MAX_HEADER) return err_set(err, ST_EFORMAT, "%s: header length %llu over the %u byte limit", path, (unsigned long long)hlen, ST_MAX_HEADER);
    if (hlen < 2) return err_set(err, ST_EFORMAT, "%s: empty header", path);
    json_error_t je;
    root = json_loadb((const char *)buf + 8, (size_t)hlen, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &je);
    if (!root) return err_set(err, ST_EFORMAT, "%s: header JSON: %s (col %d)", path, je.text, je.column);
    if (!json_is_object(root)) {
        rc = err_set(err, ST_EFORMAT, "%s: header is not a JSON object", path);
        goto fail;
    }
    const uint8_t *data = buf + 8 + hlen;
    uint64_t data_size = file_size - 8 - hlen;
    size_t n = json_object_size(root);
    if (n > ST_MAX_TENSORS) {
        rc = err_set(err, ST_EFORMAT, "%s: too many tensors (%zu)", path, n);
        goto fail;
    }
    if ((rc = grow_tensors(st, (int)n, err)) < 0) goto fail;
    spans = calloc(n + 1, sizeof(*spans));
    if (!spans) {
        rc = err_set(err, ST_ENOMEM, "%s: out of memory", path);
        goto fail;
    }
    int n_spans = 0, first = st->n_tensors;
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) continue;
        if (!json_is_object(val)) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": entry is not an object", path, key);
            goto fail;
        }
        const char *dts = json_string_value(json_object_get(val, "dtype"));
        const json_t *shape = json_object_get(val, "shape"), *offs = json_object_get(val, "data_offsets");
        int dt = dts ? dtype_parse(dts) : -1;
        if (dt < 0) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": unknown dtype %s", path, key, dts ? dts : "(missing)");
            goto fail;
        }
        if (!json_is_array(shape) || json_array_size(shape) > ST_MAX_DIMS) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": shape must be an array of at most %d dims", path, key, ST_MAX_DIMS);
            goto fail;
        }
        if (!json_is_array(offs) || json_array_size(offs) != 2 || !json_is_integer(json_array_get(offs, 0)) ||
            !json_is_integer(json_array_get(offs, 1))) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": data_offsets must be [begin, end]", path, key);
            goto fail;
        }
        struct st_tensor *t = &st->tensors[st->n_tensors];
        memset(t, 0, sizeof(*t));
        t->dtype = (enum dtype)dt;
        t->n_dims = (int)json_array_size(shape);
        uint64_t count = 1;
        for (int d = 0; d < t->n_dims; d++) {
            const json_t *e = json_array_get(shape, (size_t)d);
            if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) > (1ll << 40)) {
                rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": bad shape entry", path, key);
                goto fail;
            }
            t->shape[d] = json_integer_value(e);
            if (t->shape[d] != 0 && count > UINT64_MAX / (uint64_t)t->shape[d] / 8) {
                rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": shape overflows", path, key);
                goto fail;
            }
            count *= (uint64_t)t->shape[d];
        }
        json_int_t b = json_integer_value(json_array_get(offs, 0)), e = json_integer_value(json_array_get(offs, 1));
        if (b < 0 || e < b || (uint64_t)e > data_size) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": data_offsets [%lld, %lld] outside the %llu data bytes (truncated file?)",
                         path, key, (long long)b, (long long)e, (unsigned long long)data_size);
            goto fail;
        }
        uint64_t nbytes = count * dtype_size(t->dtype);
        if (nbytes != (uint64_t)(e - b)) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": shape and dtype need %llu bytes but data_offsets span %lld",
                         path, key, (unsigned long long)nbytes, (long long)(e - b));
            goto fail;
        }
        t->name = st_strdup(key);
        if (!t->name) {
            rc = err_set(err, ST_ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        t->nbytes = (size_t)nbytes;
        t->data = data + b;
        t->file = file_idx;
        if (e > b) { /* an empty tensor overlaps nothing (it may sit where the next one starts) */
            spans[n_spans].begin = (uint64_t)b;
            spans[n_spans].end = (uint64_t)e;
            spans[n_spans].idx = st->n_tensors;
            n_spans++;
        }
        st->n_tensors++;
    }
    qsort(spans, (size_t)n_spans, sizeof(*spans), span_cmp);
    for (int i = 1; i < n_spans; i++) {
        if (spans[i].begin < spans[i - 1].end) {
            rc = err_set(err, ST_EFORMAT, "%s: tensors \"%s\" and \"%s\" overlap", path, st->tensors[spans[i - 1].idx].name,
                         st->tensors[spans[i].idx].name);
            goto fail;
        }
    }
    /* Misaligned tensors get an aligned copy so that kernels may use typed loads. */
    for (int i = first; i < st->n_tensors; i++) {
        struct st_tensor *t = &st->tensors[i];
        size_t al = dtype_size(t->dtype);
        if (((uintptr_t)t->data % al) == 0) continue;
        void **c = realloc(st->copies, sizeof(void *) * (size_t)(st->n_copies + 1));
        if (!c) {
            rc = err_set(err, ST_ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        st->copies = c;
        void *p = st_alloc(t->nbytes);
        if (!p) {
            rc = err_set(err, ST_ENOMEM, "%s: out of memory", path);
            goto fail;
        }
        memcpy(p, t->data, t->nbytes);
        st->copies[st->n_copies++] = p;
        t->data = p;
    }
fail:
    free(spans);
    json_decref(root);
    return rc;
}

static int add_file(struct safetensors *st, const char *path, char *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, ST_EIO, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(err, ST_EIO, "%s: not a regular file", path);
    }
    size_t size = (size_t)sb.st_size;
    void *map = NULL;
    if (size > 0) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            close(fd);
            return err_set(err, ST_EIO, "%s: mmap: %s", path, strerror(errno));
        }
    }
    close(fd);
    struct st_file *f = realloc(st->files, sizeof(*f) * (size_t)(st->n_files + 1));
    if (!f) {
        if (map) munmap(map, size);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    st->files = f;
    st->files[st->n_files].path = st_strdup(path);
    st->files[st->n_files].map = map;
    st->files[st->n_files].size = size;
    st->n_files++;
    if (size < 8) return err_set(err, ST_EFORMAT, "%s: file is %zu bytes, too short for a safetensors header", path, size);
    return safetensors_parse(st, map, size, path, err);
}

int safetensors_open_file(struct safetensors *st, const char *path, char *err)
{
    memset(st, 0, sizeof(*st));
    int rc = add_file(st, path, err);
    if (rc == 0) rc = safetensors_index(st, err);
    if (rc < 0) safetensors_free(st);
    return rc;
}

int safetensors_open(struct safetensors *st, const char *dir, char *err)
{
    char path[1200];
    memset(st, 0, sizeof(*st));
    int rc = ST_OK;
    char *text = NULL;
    json_t *root = NULL;
    if (path_join(path, sizeof(path), dir, "model.safetensors.index.json") < 0)
        return err_set(err, ST_ERANGE, "%s: path too long", dir);
    if (!file_exists(path)) {
        if (path_join(path, sizeof(path), dir, "model.safetensors") < 0) return err_set(err, ST_ERANGE, "path too long");
        return safetensors_open_file(st, path, err);
    }
    size_t len;
    if ((rc = file_read_all(path, &text, &len, 64u << 20, err)) < 0) return rc;
    json_error_t je;
    root = json_loadb(text, len, 0, &je);
    const json_t *wm = json_object_get(root, "weight_map");
    if (!root || !json_is_object(wm)) {
        rc = err_set(err, ST_EFORMAT, "%s: no weight_map object%s%s", path, root ? "" : ": ", root ? "" : je.text);
        goto fail;
    }
    /* Open each distinct shard once, in the order first seen. */
    const char *key;
    json_t *val;
    char **seen = NULL;
    int n_seen = 0;
    json_object_foreach((json_t *)wm, key, val) {
        const char *shard = json_string_value(val);
        if (!shard || strchr(shard, '/') || strcmp(shard, "..") == 0 || !*shard) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\": bad shard file name", path, key);
            break;
        }
        int k;
        for (k = 0; k < n_seen; k++)
            if (strcmp(seen[k], shard) == 0) break;
        if (k < n_seen) continue;
        char **s2 = realloc(seen, sizeof(char *) * (size_t)(n_seen + 1));
        if (!s2) {
            rc = err_set(err, ST_ENOMEM, "out of memory");
            break;
        }
        seen = s2;
        seen[n_seen++] = (char *)shard;
        char spath[1200];
        if (path_join(spath, sizeof(spath), dir, shard) < 0) {
            rc = err_set(err, ST_ERANGE, "path too long");
            break;
        }
        if ((rc = add_file(st, spath, err)) < 0) break;
    }
    free(seen);
    if (rc < 0) goto fail;
    if ((rc = safetensors_index(st, err)) < 0) goto fail;
    /* Every tensor named by the index must be in the shard it names. */
    json_object_foreach((json_t *)wm, key, val) {
        const struct st_tensor *t = safetensors_find(st, key);
        if (!t) {
            rc = err_set(err, ST_EFORMAT, "%s: tensor \"%s\" listed in the index is missing from %s", path, key,
                         json_string_value(val));
            goto fail;
        }
    }
fail:
    json_decref(root);
    free(text);
    if (rc < 0) safetensors_free(st);
    return rc;
}

void safetensors_free(struct safetensors *st)
{
    for (int i = 0; i < st->n_tensors; i++) free(st->tensors[i].name);
    free(st->tensors);
    for (int i = 0; i < st->n_files; i++) {
        if (st->files[i].map) munmap(st->files[i].map, st->files[i].size);
        free(st->files[i].path);
    }
    free(st->files);
    for (int i = 0; i < st->n_copies; i++) st_free(st->copies[i]);
    free(st->copies);
    free(st->hash);
    memset(st, 0, sizeof(*st));
}

static int entry_cmp(const void *a, const void *b)
{
    const struct st_writer_entry *const *x = a, *const *y = b;
    return strcmp((*x)->name, (*y)->name);
}

static int write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int safetensors_header_encode(const struct st_writer_entry *entries, int n, const char *metadata_json,
                              const struct st_writer_entry ***order_out, uint8_t **out, size_t *out_len, char *err)
{
    int rc = ST_OK;
    char *hdr = NULL;
    *out = NULL;
    *out_len = 0;
    const struct st_writer_entry **order = malloc(sizeof(*order) * (size_t)(n > 0 ? n : 1));
    json_t *root = json_object();
    if (!order || !root) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < n; i++) order[i] = &entries[i];
    qsort(order, (size_t)n, sizeof(*order), entry_cmp);
    if (metadata_json) {
        json_t *md = json_loads(metadata_json, 0, NULL);
        if (!json_is_object(md)) {
            json_decref(md);
            rc = err_set(err, ST_EINVAL, "safetensors: metadata must be a JSON object");
            goto fail;
        }
        json_object_set_new(root, "__metadata__", md);
    }
    uint64_t off = 0;
    for (int i = 0; i < n; i++) {
        const struct st_writer_entry *e = order[i];
        json_t *t = json_object(), *shape = json_array(), *offs = json_array();
        for (int d = 0; d < e->n_dims; d++) json_array_append_new(shape, json_integer(e->shape[d]));
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)(off + e->nbytes)));
        json_object_set_new(t, "dtype", json_string(dtype_name(e->dtype)));
        json_object_set_new(t, "shape", shape);
        json_object_set_new(t, "data_offsets", offs);
        json_object_set_new(root, e->name, t);
        off += e->nbytes;
    }
    hdr = json_dumps(root, JSON_COMPACT | JSON_SORT_KEYS);
    if (!hdr) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    uint8_t *buf = malloc(8 + padded);
    if (!buf) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto fail;
    }
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    memset(buf + 8 + hl, ' ', padded - hl);
    *out = buf;
    *out_len = 8 + padded;
    if (order_out) {
        *order_out = order;
        order = NULL;
    }
fail:
    free(hdr);
    free(order);
    json_decref(root);
    return rc;
}

int safetensors_write(const char *path, const struct st_writer_entry *entries, int n, const char *metadata_json,
                      char *err)
{
    int rc = ST_OK, fd = -1;
    uint8_t *hdr = NULL;
    size_t hl = 0;
    const struct st_writer_entry **order = NULL;
    char tmp[1300];
    if ((rc = safetensors_header_encode(entries, n, metadata_json, &order, &hdr, &hl, err)) < 0) goto fail;
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = err_set(err, ST_EIO, "%s: %s", tmp, strerror(errno));
        goto fail;
    }
    if (write_all(fd, hdr, hl)) goto io_fail;
    for (int i = 0; i < n; i++)
        if (order[i]->nbytes && write_all(fd, order[i]->data, order[i]->nbytes)) goto io_fail;
    if (fsync(fd) != 0) goto io_fail;
    close(fd);
    fd = -1;
    if (rename(tmp, path) != 0) {
        rc = err_set(err, ST_EIO, "%s: rename: %s", path, strerror(errno));
        goto fail;
    }
    goto fail;
io_fail:
    rc = err_set(err, ST_EIO, "%s: write: %s", tmp, strerror(errno));
    unlink(tmp);
fail:
    if (fd >= 0) close(fd);
    free(hdr);
    free(order);
    return rc;
}
