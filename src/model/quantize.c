/* quantize: MLX affine quantization (bit-exact with MLX's CPU quantizer) and the safetensors -> MLX converter. */
#include "model/quantize.h"

#include "core/core.h"
#include "model/model.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__FAST_MATH__)
#error "quantize.c reproduces MLX's float32 rounding exactly and must not be built with -ffast-math"
#endif

#define CONVERT_DEFAULT_SHARD_BYTES (5ull << 30) /* mlx_lm's MAX_FILE_SIZE_GB */
#define CONVERT_CHUNK_BYTES (32u << 20)          /* input bytes quantized per pass over the thread pool */
#define CONVERT_COPY_BYTES (64u << 20)           /* bytes per write when copying a tensor */
#define CONVERT_MAX_CONFIG_BYTES (16u << 20)
#define CONVERT_PATH_LEN 4096

/* ---- the quantizer ---- */

int mlx_quantize_check(int bits, int group_size, char *err)
{
    if (bits != 4 && bits != 8) return err_set(err, ST_EINVAL, "quantize: %d bits unsupported (4 or 8)", bits);
    if (group_size != 32 && group_size != 64 && group_size != 128)
        return err_set(err, ST_EINVAL, "quantize: group size %d unsupported (32, 64 or 128)", group_size);
    return ST_OK;
}

/* Scale and bias of a group from its range (MLX's CPU quantizer, float32 throughout). */
static inline void group_params(float w_min, float w_max, int bits, float *scale_out, float *bias_out)
{
    const float n_bins = (float)((1 << bits) - 1), eps = 1e-7f;
    bool mask = fabsf(w_min) > fabsf(w_max);
    float scale = (w_max - w_min) / n_bins;
    scale = scale < eps ? eps : scale; /* std::max(scale, eps) */
    scale = mask ? scale : -scale;
    float edge = mask ? w_min : w_max;
    float q0 = rintf(edge / scale);
    float bias = 0.0f;
    if (q0 != 0.0f) {
        scale = edge / q0;
        bias = edge;
    }
    *scale_out = scale;
    *bias_out = bias;
}

/* The scalar reference: one group of gs values, written as MLX writes it. Writes gs*bits/32 words and the
 * float32 scale and bias. Returns false when a value is not finite or the range overflows float32. */
static bool group_quantize_ref(const float *w, int gs, int bits, uint32_t *q, float *scale_out, float *bias_out)
{
    const float n_bins = (float)((1 << bits) - 1);
    float w_min = INFINITY, w_max = -INFINITY;
    bool bad = false;
    for (int j = 0; j < gs; j++) {
        float x = w[j];
        w_max = w_max < x ? x : w_max; /* std::max(w_max, x) */
        w_min = x < w_min ? x : w_min; /* std::min(w_min, x) */
        bad |= !isfinite(x);
    }
    if (bad || !isfinite(w_max - w_min)) return false;
    float scale, bias;
    group_params(w_min, w_max, bits, &scale, &bias);
    const int per_word = 32 / bits;
    for (int j = 0; j < gs / per_word; j++) {
        uint32_t word = 0;
        for (int k = 0; k < per_word; k++) {
            float v = rintf((w[j * per_word + k] - bias) / scale);
            v = v < 0.0f ? 0.0f : v > n_bins ? n_bins : v;
            word |= (uint32_t)v << (k * bits);
        }
        q[j] = word;
    }
    *scale_out = scale;
    *bias_out = bias;
    return true;
}

#if defined(__SSE2__)
#include <emmintrin.h>
/* The same, four lanes at a time (SSE2 is in every x86-64). min/max give the same values in any order (the sign of
 * a zero extreme never changes the result); sub and div are IEEE float32 like the scalar ones; clamping before
 * rounding is the same as after (rint is monotonic and keeps 0 and 2^bits-1); cvtps2dq rounds like rint (the
 * default MXCSR mode: nearest, ties to even). Codes are packed to bytes (8-bit) or nibbles (4-bit), low first. */
static inline __attribute__((always_inline)) bool group_quantize_sse2(const float *w, int gs, int bits, uint32_t *q,
                                                                      float *scale_out, float *bias_out)
{
    __m128 vmin = _mm_set1_ps(INFINITY), vmax = _mm_set1_ps(-INFINITY), vbad = _mm_setzero_ps();
    const __m128 sign = _mm_set1_ps(-0.0f), big = _mm_set1_ps(FLT_MAX);
    for (int j = 0; j < gs; j += 4) {
        __m128 x = _mm_loadu_ps(w + j);
        vmin = _mm_min_ps(vmin, x);
        vmax = _mm_max_ps(vmax, x);
        vbad = _mm_or_ps(vbad, _mm_cmpnle_ps(_mm_andnot_ps(sign, x), big)); /* |x| > FLT_MAX or NaN */
    }
    if (_mm_movemask_ps(vbad)) return false;
    float mn[4], mx[4];
    _mm_storeu_ps(mn, vmin);
    _mm_storeu_ps(mx, vmax);
    float w_min = ST_MIN(ST_MIN(mn[0], mn[1]), ST_MIN(mn[2], mn[3]));
    float w_max = ST_MAX(ST_MAX(mx[0], mx[1]), ST_MAX(mx[2], mx[3]));
    if (!isfinite(w_max - w_min)) return false;
    float scale, bias;
    group_params(w_min, w_max, bits, &scale, &bias);
    const __m128 vb = _mm_set1_ps(bias), vs = _mm_set1_ps(scale), zero = _mm_setzero_ps();
    const __m128 top = _mm_set1_ps((float)((1 << bits) - 1));
    for (int j = 0; j < gs; j += 32) { /* 32 codes: 8 words (8-bit) or 4 words (4-bit) */
        __m128i bytes[2];
        for (int h = 0; h < 2; h++) {
            __m128i c[4];
            for (int k = 0; k < 4; k++) {
                __m128 v = _mm_div_ps(_mm_sub_ps(_mm_loadu_ps(w + j + 16 * h + 4 * k), vb), vs);
                c[k] = _mm_cvtps_epi32(_mm_min_ps(_mm_max_ps(v, zero), top));
            }
            bytes[h] = _mm_packus_epi16(_mm_packs_epi32(c[0], c[1]), _mm_packs_epi32(c[2], c[3]));
        }
        if (bits == 8) {
            _mm_storeu_si128((__m128i *)(q + j / 4), bytes[0]);
            _mm_storeu_si128((__m128i *)(q + j / 4 + 4), bytes[1]);
        } else { /* each 16-bit lane holds codes (even, odd) in its bytes -> one byte even | odd << 4 */
            const __m128i lo = _mm_set1_epi16(0x000f), hi = _mm_set1_epi16(0x00f0);
            __m128i n0 = _mm_or_si128(_mm_and_si128(bytes[0], lo), _mm_and_si128(_mm_srli_epi16(bytes[0], 4), hi));
            __m128i n1 = _mm_or_si128(_mm_and_si128(bytes[1], lo), _mm_and_si128(_mm_srli_epi16(bytes[1], 4), hi));
            _mm_storeu_si128((__m128i *)(q + j / 8), _mm_packus_epi16(n0, n1));
        }
    }
    *scale_out = scale;
    *bias_out = bias;
    return true;
}

static bool group_quantize8(const float *w, int gs, uint32_t *q, float *s, float *b)
{
    return group_quantize_sse2(w, gs, 8, q, s, b);
}

static bool group_quantize4(const float *w, int gs, uint32_t *q, float *s, float *b)
{
    return group_quantize_sse2(w, gs, 4, q, s, b);
}
#else
static bool group_quantize8(const float *w, int gs, uint32_t *q, float *s, float *b)
{
    return group_quantize_ref(w, gs, 8, q, s, b);
}

static bool group_quantize4(const float *w, int gs, uint32_t *q, float *s, float *b)
{
    return group_quantize_ref(w, gs, 4, q, s, b);
}
#endif

static inline void store_scalar(void *p, enum dtype t, int64_t i, float v)
{
    switch (t) {
    case DT_BF16: ((uint16_t *)p)[i] = f32_to_bf16(v); break;
    case DT_F16: ((uint16_t *)p)[i] = f32_to_f16(v); break;
    case DT_F32: ((float *)p)[i] = v; break;
    default: ST_ASSERT(0);
    }
}

static bool is_float_dtype(enum dtype t) { return t == DT_F32 || t == DT_F16 || t == DT_BF16; }

/* Quantizes n_groups consecutive groups of src (dtype dt; groups never straddle rows since cols % gs == 0),
 * with the scalar reference when ref is set. Returns -1, or the index of the first group holding a non-finite
 * value. */
static int64_t quantize_groups(const void *src, enum dtype dt, int64_t n_groups, int bits, int gs, enum dtype sdtype,
                               uint32_t *q, void *scales, void *biases, bool ref)
{
    const int64_t words = (int64_t)gs * bits / 32;
    float buf[MLX_MAX_GROUP_SIZE];
    for (int64_t g = 0; g < n_groups; g++) {
        const float *w = buf;
        if (dt == DT_F32) {
            w = (const float *)src + g * gs;
        } else if (dt == DT_BF16) {
            const uint16_t *h = (const uint16_t *)src + g * gs;
#if defined(__SSE2__)
            const __m128i zero = _mm_setzero_si128();
            for (int j = 0; j < gs; j += 8) { /* bf16 -> f32: the 16 bits become the high half */
                __m128i x = _mm_loadu_si128((const __m128i *)(h + j));
                _mm_storeu_ps(buf + j, _mm_castsi128_ps(_mm_unpacklo_epi16(zero, x)));
                _mm_storeu_ps(buf + j + 4, _mm_castsi128_ps(_mm_unpackhi_epi16(zero, x)));
            }
#else
            for (int j = 0; j < gs; j++) buf[j] = bf16_to_f32(h[j]);
#endif
        } else {
            const uint16_t *h = (const uint16_t *)src + g * gs;
            for (int j = 0; j < gs; j++) buf[j] = f16_to_f32(h[j]);
        }
        float s, b;
        bool ok;
        if (ref)
            ok = group_quantize_ref(w, gs, bits, q + g * words, &s, &b);
        else if (bits == 8)
            ok = group_quantize8(w, gs, q + g * words, &s, &b);
        else
            ok = group_quantize4(w, gs, q + g * words, &s, &b);
        if (!ok) return g;
        store_scalar(scales, sdtype, g, s);
        store_scalar(biases, sdtype, g, b);
    }
    return -1;
}

static int quantize_rows(const float *w, int64_t rows, int64_t cols, int bits, int group_size, enum dtype sdtype,
                         uint32_t *q, void *scales, void *biases, bool ref, char *err)
{
    int rc;
    if ((rc = mlx_quantize_check(bits, group_size, err)) < 0) return rc;
    if (!is_float_dtype(sdtype))
        return err_set(err, ST_EINVAL, "quantize: scales dtype %s unsupported (BF16, F16 or F32)", dtype_name(sdtype));
    if (rows < 0 || cols <= 0 || cols % group_size != 0)
        return err_set(err, ST_EINVAL, "quantize: %lld columns are not a positive multiple of the group size %d",
                       (long long)cols, group_size);
    int64_t ng = cols / group_size;
    int64_t bad = quantize_groups(w, DT_F32, rows * ng, bits, group_size, sdtype, q, scales, biases, ref);
    if (bad >= 0)
        return err_set(err, ST_EINVAL, "quantize: row %lld, columns %lld..%lld: non-finite value (or range over FLT_MAX)",
                       (long long)(bad / ng), (long long)(bad % ng * group_size),
                       (long long)((bad % ng + 1) * group_size - 1));
    return ST_OK;
}

int mlx_quantize_rows(const float *w, int64_t rows, int64_t cols, int bits, int group_size, enum dtype sdtype,
                      uint32_t *q, void *scales, void *biases, char *err)
{
    return quantize_rows(w, rows, cols, bits, group_size, sdtype, q, scales, biases, false, err);
}

int mlx_quantize_rows_ref(const float *w, int64_t rows, int64_t cols, int bits, int group_size, enum dtype sdtype,
                          uint32_t *q, void *scales, void *biases, char *err)
{
    return quantize_rows(w, rows, cols, bits, group_size, sdtype, q, scales, biases, true, err);
}

/* ---- the converter ---- */

enum out_role { ROLE_COPY, ROLE_WEIGHT, ROLE_SCALES, ROLE_BIASES, ROLE_COUNT };

/* One output tensor. */
struct out_tensor {
    char *name;
    enum dtype dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
    uint64_t nbytes;
    int src;           /* input tensor index */
    enum out_role role;
    int shard;
    uint64_t offset;   /* within the shard's data section, then (after the header is known) within the file */
};

struct out_shard {
    char name[64];
    char path[CONVERT_PATH_LEN], tmp[CONVERT_PATH_LEN];
    int fd;
    uint64_t data_bytes;
    int first, n;      /* out_tensor range */
};

struct converter {
    const struct convert_opts *o;
    const char *in_dir, *out_dir;
    struct safetensors st;
    struct out_tensor *out;
    int n_out;
    int (*src_out)[ROLE_COUNT]; /* per input tensor: out index of each role, or -1 */
    bool *src_done;
    struct out_shard *shards;
    int n_shards;
    struct threadpool *tp;
    struct pass_result *res; /* per thread, of the last pass */
    uint64_t done_bytes, total_bytes;
};

static bool is_ws(char ch) { return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n'; }

static bool ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && memcmp(s + n - m, suffix, m) == 0;
}

/* MLX quantizes Linear and Embedding modules whose weight's last dim is a multiple of the group size. */
static bool tensor_quantizable(const struct st_tensor *t, int group_size)
{
    return ends_with(t->name, ".weight") && t->n_dims == 2 && is_float_dtype(t->dtype) && t->shape[1] > 0 &&
           t->shape[1] % group_size == 0;
}

static int pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
            if (w == 0) errno = EIO;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

static int out_cmp(const void *a, const void *b)
{
    return strcmp(((const struct out_tensor *)a)->name, ((const struct out_tensor *)b)->name);
}

static int add_out(struct converter *c, int src, enum out_role role, const char *suffix, enum dtype dt, int64_t d0,
                   int64_t d1, char *err)
{
    const struct st_tensor *t = &c->st.tensors[src];
    struct out_tensor *o = &c->out[c->n_out];
    memset(o, 0, sizeof(*o));
    if (role == ROLE_COPY) {
        o->name = st_strdup(t->name);
        o->dtype = t->dtype;
        o->n_dims = t->n_dims;
        memcpy(o->shape, t->shape, sizeof(o->shape));
        o->nbytes = t->nbytes;
    } else {
        size_t base = strlen(t->name) - strlen(".weight");
        o->name = malloc(base + strlen(suffix) + 1);
        if (o->name) {
            memcpy(o->name, t->name, base);
            strcpy(o->name + base, suffix);
        }
        o->dtype = dt;
        o->n_dims = 2;
        o->shape[0] = d0;
        o->shape[1] = d1;
        o->nbytes = (uint64_t)d0 * (uint64_t)d1 * dtype_size(dt);
    }
    if (!o->name) return err_set(err, ST_ENOMEM, "convert: out of memory");
    o->src = src;
    o->role = role;
    c->n_out++;
    return ST_OK;
}

/* Decides what each input tensor becomes, sorts the outputs by name and splits them into shards. */
static int plan_outputs(struct converter *c, char *err)
{
    const int bits = c->o->bits, gs = c->o->group_size;
    int rc, n = c->st.n_tensors;
    c->out = calloc((size_t)n * 3, sizeof(*c->out));
    c->src_out = malloc(sizeof(*c->src_out) * (size_t)n);
    c->src_done = calloc((size_t)n, sizeof(bool));
    if (!c->out || !c->src_out || !c->src_done) return err_set(err, ST_ENOMEM, "convert: out of memory");
    for (int i = 0; i < n; i++) {
        const struct st_tensor *t = &c->st.tensors[i];
        if (!tensor_quantizable(t, gs)) {
            if ((rc = add_out(c, i, ROLE_COPY, NULL, t->dtype, 0, 0, err)) < 0) return rc;
            continue;
        }
        int64_t rows = t->shape[0], cols = t->shape[1];
        if ((rc = add_out(c, i, ROLE_WEIGHT, ".weight", DT_U32, rows, cols * bits / 32, err)) < 0 ||
            (rc = add_out(c, i, ROLE_SCALES, ".scales", t->dtype, rows, cols / gs, err)) < 0 ||
            (rc = add_out(c, i, ROLE_BIASES, ".biases", t->dtype, rows, cols / gs, err)) < 0)
            return rc;
    }
    qsort(c->out, (size_t)c->n_out, sizeof(*c->out), out_cmp);
    for (int i = 0; i < n; i++)
        for (int r = 0; r < ROLE_COUNT; r++) c->src_out[i][r] = -1;
    for (int i = 0; i < c->n_out; i++) {
        if (i > 0 && strcmp(c->out[i].name, c->out[i - 1].name) == 0)
            return err_set(err, ST_EFORMAT, "convert: %s: output tensor \"%s\" would be written twice (input holds both "
                           "a weight to quantize and a tensor of that name)", c->in_dir, c->out[i].name);
        c->src_out[c->out[i].src][c->out[i].role] = i;
        c->total_bytes += c->out[i].nbytes;
    }
    /* shards: tensors in name order; a new one when the next tensor would pass the limit */
    uint64_t max = c->o->max_shard_bytes ? c->o->max_shard_bytes : CONVERT_DEFAULT_SHARD_BYTES;
    c->shards = calloc((size_t)(c->n_out > 0 ? c->n_out : 1), sizeof(*c->shards));
    if (!c->shards) return err_set(err, ST_ENOMEM, "convert: out of memory");
    for (int i = 0; i < c->n_out; i++) {
        struct out_shard *s = c->n_shards ? &c->shards[c->n_shards - 1] : NULL;
        if (!s || (s->n > 0 && s->data_bytes + c->out[i].nbytes > max)) {
            s = &c->shards[c->n_shards++];
            s->fd = -1;
            s->first = i;
        }
        c->out[i].shard = (int)(s - c->shards);
        c->out[i].offset = s->data_bytes;
        s->data_bytes += c->out[i].nbytes;
        s->n++;
    }
    for (int k = 0; k < c->n_shards; k++) {
        struct out_shard *s = &c->shards[k];
        s->fd = -1;
        if (c->n_shards == 1)
            snprintf(s->name, sizeof(s->name), "model.safetensors");
        else
            snprintf(s->name, sizeof(s->name), "model-%05d-of-%05d.safetensors", k + 1, c->n_shards);
        if (path_join(s->path, sizeof(s->path), c->out_dir, s->name) < 0 ||
            snprintf(s->tmp, sizeof(s->tmp), "%s.tmp", s->path) >= (int)sizeof(s->tmp))
            return err_set(err, ST_ERANGE, "convert: %s: path too long", c->out_dir);
    }
    return ST_OK;
}

/* Writes a shard's header (compact JSON, keys in name order, no metadata, space-padded to 8 bytes, like the
 * safetensors library) and turns its tensors' offsets into file offsets. */
static int shard_write_header(struct converter *c, struct out_shard *s, char *err)
{
    int rc = ST_OK;
    char *hdr = NULL;
    json_t *root = json_object();
    if (!root) return err_set(err, ST_ENOMEM, "convert: out of memory");
    for (int i = s->first; i < s->first + s->n; i++) {
        const struct out_tensor *o = &c->out[i];
        json_t *t = json_object(), *shape = json_array(), *offs = json_array();
        if (!t || !shape || !offs) {
            json_decref(t);
            json_decref(shape);
            json_decref(offs);
            rc = err_set(err, ST_ENOMEM, "convert: out of memory");
            goto fail;
        }
        for (int d = 0; d < o->n_dims; d++) json_array_append_new(shape, json_integer((json_int_t)o->shape[d]));
        json_array_append_new(offs, json_integer((json_int_t)o->offset));
        json_array_append_new(offs, json_integer((json_int_t)(o->offset + o->nbytes)));
        json_object_set_new(t, "dtype", json_string(dtype_name(o->dtype)));
        json_object_set_new(t, "shape", shape);
        json_object_set_new(t, "data_offsets", offs);
        if (json_object_set_new(root, o->name, t) < 0) {
            rc = err_set(err, ST_EFORMAT, "convert: tensor name \"%s\" is not valid UTF-8", o->name);
            goto fail;
        }
    }
    hdr = json_dumps(root, JSON_COMPACT); /* jansson keeps insertion (= name) order */
    if (!hdr) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    size_t hl = strlen(hdr), padded = (hl + 7) & ~(size_t)7;
    uint8_t *buf = malloc(8 + padded);
    if (!buf) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, hdr, hl);
    memset(buf + 8 + hl, ' ', padded - hl);
    s->fd = open(s->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (s->fd < 0 || pwrite_all(s->fd, buf, 8 + padded, 0) < 0)
        rc = err_set(err, ST_EIO, "convert: %s: %s", s->tmp, strerror(errno));
    free(buf);
    for (int i = s->first; i < s->first + s->n; i++) c->out[i].offset += 8 + padded;
fail:
    free(hdr);
    json_decref(root);
    return rc;
}

static void report(struct converter *c, const char *name, uint64_t bytes)
{
    c->done_bytes += bytes;
    if (c->o->progress) c->o->progress(c->o->progress_ctx, name, c->done_bytes, c->total_bytes);
}

static int copy_tensor(struct converter *c, const struct out_tensor *o, char *err)
{
    const struct st_tensor *t = &c->st.tensors[o->src];
    const struct out_shard *s = &c->shards[o->shard];
    for (uint64_t off = 0; off < o->nbytes; off += CONVERT_COPY_BYTES) {
        size_t n = (size_t)ST_MIN((uint64_t)CONVERT_COPY_BYTES, o->nbytes - off);
        if (pwrite_all(s->fd, (const uint8_t *)t->data + off, n, o->offset + off) < 0)
            return err_set(err, ST_EIO, "convert: %s: %s", s->tmp, strerror(errno));
        report(c, o->name, n);
    }
    if (o->nbytes == 0) report(c, o->name, 0);
    return ST_OK;
}

/* A pass of the thread pool: each thread quantizes a range of the chunk's rows into its part of the buffers
 * and writes that part in place (pwrite at its own offsets), so the copy into the page cache is parallel too. */
struct quant_pass {
    const void *src;   /* first row of the chunk */
    int64_t r_first;   /* its row in the tensor */
    enum dtype dt, sdtype;
    int64_t rows, cols;
    int bits, gs;
    uint32_t *q;
    void *scales, *biases;
    int fd[3];         /* weight, scales, biases */
    uint64_t off[3];   /* file offsets of the tensors' row 0 */
    struct pass_result *res;
};

struct pass_result {
    int64_t bad;       /* first group (of the chunk) with a non-finite value, or -1 */
    int io_errno;      /* 0, or errno of a failed write */
    int io_fd;
};

static void quant_pass_run(void *arg, int ith, int nth)
{
    const struct quant_pass *p = arg;
    struct pass_result *res = &p->res[ith];
    int64_t r0, r1, ng = p->cols / p->gs, wpr = p->cols * p->bits / 32;
    split_range(p->rows, ith, nth, 1, &r0, &r1);
    res->bad = -1;
    res->io_errno = 0;
    if (r1 <= r0) return;
    size_t ds = dtype_size(p->dt), ss = dtype_size(p->sdtype);
    uint8_t *sc = (uint8_t *)p->scales + (size_t)(r0 * ng) * ss, *bi = (uint8_t *)p->biases + (size_t)(r0 * ng) * ss;
    int64_t bad = quantize_groups((const uint8_t *)p->src + (size_t)(r0 * p->cols) * ds, p->dt, (r1 - r0) * ng,
                                  p->bits, p->gs, p->sdtype, p->q + r0 * wpr, sc, bi, false);
    if (bad >= 0) {
        res->bad = r0 * ng + bad;
        return;
    }
    int64_t r = p->r_first + r0, n = r1 - r0;
    const void *buf[3] = {p->q + r0 * wpr, sc, bi};
    size_t bytes[3] = {(size_t)(n * wpr) * 4, (size_t)(n * ng) * ss, (size_t)(n * ng) * ss};
    uint64_t at[3] = {(uint64_t)(r * wpr) * 4, (uint64_t)(r * ng) * ss, (uint64_t)(r * ng) * ss};
    for (int k = 0; k < 3; k++) {
        if (pwrite_all(p->fd[k], buf[k], bytes[k], p->off[k] + at[k]) < 0) {
            res->io_errno = errno ? errno : EIO;
            res->io_fd = k;
            return;
        }
    }
}

/* Quantizes input tensor src in chunks of rows and writes its weight, scales and biases in place. */
static int quantize_tensor(struct converter *c, int src, char *err)
{
    int rc = ST_OK;
    const struct st_tensor *t = &c->st.tensors[src];
    const struct out_tensor *o[3] = {&c->out[c->src_out[src][ROLE_WEIGHT]], &c->out[c->src_out[src][ROLE_SCALES]],
                                     &c->out[c->src_out[src][ROLE_BIASES]]};
    const int bits = c->o->bits, gs = c->o->group_size;
    int64_t rows = t->shape[0], cols = t->shape[1], ng = cols / gs, wpr = cols * bits / 32;
    size_t ds = dtype_size(t->dtype), ss = dtype_size(t->dtype);
    int64_t chunk = ST_MAX(1, (int64_t)(CONVERT_CHUNK_BYTES / ((size_t)cols * ds)));
    chunk = ST_MIN(chunk, ST_MAX(rows, 1));
    uint32_t *q = st_alloc((size_t)(chunk * wpr) * 4);
    void *sc = st_alloc((size_t)(chunk * ng) * ss), *bi = st_alloc((size_t)(chunk * ng) * ss);
    if (!q || !sc || !bi) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    struct quant_pass p = {
        .dt = t->dtype, .sdtype = t->dtype, .cols = cols, .bits = bits, .gs = gs, .q = q, .scales = sc,
        .biases = bi, .res = c->res,
    };
    for (int k = 0; k < 3; k++) {
        p.fd[k] = c->shards[o[k]->shard].fd;
        p.off[k] = o[k]->offset;
    }
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        p.rows = ST_MIN(chunk, rows - r0);
        p.r_first = r0;
        p.src = (const uint8_t *)t->data + (size_t)(r0 * cols) * ds;
        threadpool_run(c->tp, quant_pass_run, &p);
        for (int i = 0; i < threadpool_size(c->tp); i++) {
            const struct pass_result *res = &c->res[i];
            if (res->bad >= 0) {
                int64_t g = res->bad;
                rc = err_set(err, ST_EINVAL, "convert: %s: tensor %s, row %lld, columns %lld..%lld: non-finite value",
                             c->in_dir, t->name, (long long)(r0 + g / ng), (long long)(g % ng * gs),
                             (long long)((g % ng + 1) * gs - 1));
                goto fail;
            }
            if (res->io_errno) {
                rc = err_set(err, ST_EIO, "convert: %s: write: %s", c->shards[o[res->io_fd]->shard].tmp,
                             strerror(res->io_errno));
                goto fail;
            }
        }
        report(c, o[0]->name, (uint64_t)(p.rows * wpr) * 4 + 2 * (uint64_t)(p.rows * ng) * ss);
    }
    if (rows == 0) report(c, o[0]->name, 0);
fail:
    st_free(q);
    st_free(sc);
    st_free(bi);
    return rc;
}

/* Refuses an input that is already quantized (MLX or any Hugging Face quantization_config). */
static int check_not_quantized(const char *dir, const json_t *cfg, const struct safetensors *st, char *err)
{
    static const char *keys[] = {"quantization", "quantization_config"};
    for (size_t i = 0; i < ST_ARRAY_LEN(keys); i++) {
        const json_t *q = json_object_get(cfg, keys[i]);
        if (!q || json_is_null(q)) continue;
        const char *method = json_string_value(json_object_get(q, "quant_method"));
        const json_t *bits = json_object_get(q, "bits");
        char what[128] = "";
        if (method) snprintf(what, sizeof(what), ": %.100s", method);
        else if (json_is_integer(bits)) snprintf(what, sizeof(what), ": %lld bits", (long long)json_integer_value(bits));
        return err_set(err, ST_EINVAL,
                       "convert: %s is already quantized (config.json has \"%s\"%s); convert needs the unquantized "
                       "(bf16, f16 or f32) model", dir, keys[i], what);
    }
    char name[1024];
    for (int i = 0; i < st->n_tensors; i++) {
        const char *n = st->tensors[i].name;
        if (!ends_with(n, ".scales")) continue;
        size_t base = strlen(n) - strlen(".scales");
        if (base + sizeof(".weight") > sizeof(name)) continue;
        memcpy(name, n, base);
        strcpy(name + base, ".weight");
        const struct st_tensor *w = safetensors_find(st, name);
        if (w && w->dtype == DT_U32)
            return err_set(err, ST_EINVAL,
                           "convert: %s is already quantized (%s is packed U32 with %s); convert needs the "
                           "unquantized (bf16, f16 or f32) model", dir, name, n);
    }
    return ST_OK;
}

/* Appends "quantization" and "quantization_config" to the config text, keeping every other byte; the new keys
 * follow the file's indentation (or none for a one-line file). Returns a malloc'd string or NULL. */
static char *config_add_quantization(const char *text, size_t len, int bits, int gs)
{
    size_t end = len;
    while (end > 0 && is_ws(text[end - 1])) end--;
    if (end == 0 || text[end - 1] != '}') return NULL;
    size_t close = end - 1, last = close;
    while (last > 0 && is_ws(text[last - 1])) last--;
    if (last == 0) return NULL;
    bool empty = text[last - 1] == '{';
    /* indentation: the whitespace after the opening brace, from its last newline */
    const char *open = memchr(text, '{', len);
    char indent[64] = "";
    bool multiline = false;
    if (open) {
        const char *p = open + 1, *nl = NULL;
        while (p < text + len && is_ws(*p)) {
            if (*p == '\n') nl = p;
            p++;
        }
        if (nl) {
            multiline = true;
            size_t n = (size_t)(p - nl - 1);
            if (n >= sizeof(indent)) n = sizeof(indent) - 1;
            memcpy(indent, nl + 1, n);
            indent[n] = 0;
        }
    }
    const char *nl = multiline ? "\n" : "", *sep = multiline ? ": " : ":";
    char add[1024];
    int n = snprintf(add, sizeof(add),
                     "%s%s%s\"quantization\"%s{%s%s%s\"group_size\"%s%d,%s%s%s\"bits\"%s%d%s%s},"
                     "%s%s\"quantization_config\"%s{%s%s%s\"group_size\"%s%d,%s%s%s\"bits\"%s%d%s%s}%s",
                     empty ? "" : ",", nl, indent, sep, nl, indent, indent, sep, gs, nl, indent, indent, sep, bits, nl,
                     indent, nl, indent, sep, nl, indent, indent, sep, gs, nl, indent, indent, sep, bits, nl, indent, nl);
    if (n < 0 || (size_t)n >= sizeof(add)) return NULL;
    size_t out_len = last + (size_t)n + (len - close);
    char *out = malloc(out_len + 1);
    if (!out) return NULL;
    memcpy(out, text, last);
    memcpy(out + last, add, (size_t)n);
    memcpy(out + last + n, text + close, len - close);
    out[out_len] = 0;
    return out;
}

/* The output config.json: the input's text with the keys appended when that gives valid JSON without duplicate
 * keys; otherwise (e.g. "quantization_config": null already there) cfg re-serialized with the keys set. */
static char *config_with_quantization(const char *text, size_t len, json_t *cfg, int bits, int gs)
{
    char *out = config_add_quantization(text, len, bits, gs);
    if (out) {
        json_t *chk = json_loads(out, JSON_REJECT_DUPLICATES, NULL);
        bool ok = json_is_object(chk) && json_is_object(json_object_get(chk, "quantization"));
        json_decref(chk);
        if (ok) return out;
        free(out);
    }
    json_t *q = json_pack("{s:i,s:i}", "group_size", gs, "bits", bits);
    if (!q || json_object_set(cfg, "quantization", q) < 0 || json_object_set(cfg, "quantization_config", q) < 0) {
        json_decref(q);
        return NULL;
    }
    json_decref(q);
    return json_dumps(cfg, JSON_INDENT(2));
}

/* Writes buf to dir/name through name.tmp, fsync and rename. */
static int write_file_atomic(const char *dir, const char *name, const void *buf, size_t n, char *err)
{
    char path[CONVERT_PATH_LEN], tmp[CONVERT_PATH_LEN + 8];
    if (path_join(path, sizeof(path), dir, name) < 0) return err_set(err, ST_ERANGE, "convert: %s: path too long", dir);
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return err_set(err, ST_EIO, "convert: %s: %s", tmp, strerror(errno));
    if (pwrite_all(fd, buf, n, 0) < 0 || fsync(fd) != 0) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return err_set(err, ST_EIO, "convert: %s: %s", tmp, strerror(e));
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return err_set(err, ST_EIO, "convert: %s: rename: %s", path, strerror(e));
    }
    return ST_OK;
}

static int copy_file(const char *src, const char *dir, const char *name, char *err)
{
    int rc = ST_OK, in = -1, out = -1;
    char path[CONVERT_PATH_LEN], tmp[CONVERT_PATH_LEN + 8];
    uint8_t *buf = malloc(1u << 20);
    if (!buf) return err_set(err, ST_ENOMEM, "convert: out of memory");
    if (path_join(path, sizeof(path), dir, name) < 0) {
        rc = err_set(err, ST_ERANGE, "convert: %s: path too long", dir);
        goto fail;
    }
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    if ((in = open(src, O_RDONLY | O_CLOEXEC)) < 0) {
        rc = err_set(err, ST_EIO, "convert: %s: %s", src, strerror(errno));
        goto fail;
    }
    if ((out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0) {
        rc = err_set(err, ST_EIO, "convert: %s: %s", tmp, strerror(errno));
        goto fail;
    }
    uint64_t off = 0;
    for (;;) {
        ssize_t r = read(in, buf, 1u << 20);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            rc = err_set(err, ST_EIO, "convert: %s: %s", src, strerror(errno));
            goto fail;
        }
        if (r == 0) break;
        if (pwrite_all(out, buf, (size_t)r, off) < 0) {
            rc = err_set(err, ST_EIO, "convert: %s: %s", tmp, strerror(errno));
            goto fail;
        }
        off += (uint64_t)r;
    }
    if (fsync(out) != 0) {
        rc = err_set(err, ST_EIO, "convert: %s: %s", tmp, strerror(errno));
        goto fail;
    }
    close(out);
    out = -1;
    if (rename(tmp, path) != 0) rc = err_set(err, ST_EIO, "convert: %s: rename: %s", path, strerror(errno));
fail:
    if (in >= 0) close(in);
    if (out >= 0) close(out);
    if (rc < 0) unlink(tmp);
    free(buf);
    return rc;
}

/* Files that the output carries over: everything at the top of in_dir except the weights (which are rewritten),
 * config.json (rewritten), other weight formats, hidden files and folders. */
static bool file_carried(const char *name)
{
    static const char *skip_ext[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf",
                                     ".onnx", ".npz", ".tmp"};
    if (name[0] == '.' || strcmp(name, "config.json") == 0 || strcmp(name, "model.safetensors.index.json") == 0)
        return false;
    if (ends_with(name, ".index.json")) return false; /* pytorch_model.bin.index.json and the like */
    for (size_t i = 0; i < ST_ARRAY_LEN(skip_ext); i++)
        if (ends_with(name, skip_ext[i])) return false;
    return true;
}

static int copy_other_files(const char *in_dir, const char *out_dir, int *n_copied, char *err)
{
    int rc = ST_OK;
    DIR *d = opendir(in_dir);
    if (!d) return err_set(err, ST_EIO, "convert: %s: %s", in_dir, strerror(errno));
    struct dirent *e;
    char path[CONVERT_PATH_LEN];
    while ((e = readdir(d)) != NULL) {
        if (!file_carried(e->d_name)) continue;
        struct stat sb;
        if (path_join(path, sizeof(path), in_dir, e->d_name) < 0 || stat(path, &sb) != 0 || !S_ISREG(sb.st_mode))
            continue;
        if ((rc = copy_file(path, out_dir, e->d_name, err)) < 0) break;
        (*n_copied)++;
    }
    closedir(d);
    return rc;
}

/* Creates out_dir when missing; refuses in_dir itself and (unless overwrite) a directory holding a model. */
static int prepare_out_dir(const char *in_dir, const char *out_dir, bool overwrite, char *err)
{
    struct stat si, so;
    if (stat(in_dir, &si) != 0 || !S_ISDIR(si.st_mode))
        return err_set(err, ST_ENOTFOUND, "convert: %s: not a directory", in_dir);
    if (stat(out_dir, &so) != 0) {
        if (errno != ENOENT || mkdir(out_dir, 0755) != 0)
            return err_set(err, ST_EIO, "convert: cannot create %s: %s", out_dir, strerror(errno));
        return ST_OK;
    }
    if (!S_ISDIR(so.st_mode)) return err_set(err, ST_EIO, "convert: %s: not a directory", out_dir);
    if (si.st_dev == so.st_dev && si.st_ino == so.st_ino)
        return err_set(err, ST_EINVAL, "convert: the output directory is the input directory (%s)", in_dir);
    if (overwrite) return ST_OK;
    static const char *model_files[] = {"config.json", "model.safetensors", "model.safetensors.index.json"};
    char path[CONVERT_PATH_LEN];
    for (size_t i = 0; i < ST_ARRAY_LEN(model_files); i++) {
        if (path_join(path, sizeof(path), out_dir, model_files[i]) < 0)
            return err_set(err, ST_ERANGE, "convert: %s: path too long", out_dir);
        if (file_exists(path))
            return err_set(err, ST_EINVAL, "convert: %s already holds a model (%s); pass overwrite (--force) to "
                           "replace it", out_dir, model_files[i]);
    }
    return ST_OK;
}

/* With overwrite: removes weights of a previous model in out_dir that the new one does not replace (a stale
 * index would otherwise win over a new single file). */
static void remove_stale_weights(const struct converter *c)
{
    DIR *d = opendir(c->out_dir);
    if (!d) return;
    struct dirent *e;
    char path[CONVERT_PATH_LEN];
    while ((e = readdir(d)) != NULL) {
        const char *n = e->d_name;
        bool ours = strcmp(n, "model.safetensors.index.json") == 0 ||
                    (strncmp(n, "model", 5) == 0 && ends_with(n, ".safetensors"));
        if (!ours) continue;
        bool keep = c->n_shards > 1 && strcmp(n, "model.safetensors.index.json") == 0;
        for (int k = 0; k < c->n_shards; k++)
            if (strcmp(n, c->shards[k].name) == 0) keep = true;
        if (keep || path_join(path, sizeof(path), c->out_dir, n) < 0) continue;
        if (unlink(path) == 0) LOGI("convert", "removed stale %s", path);
    }
    closedir(d);
}

static int write_index(const struct converter *c, char *err)
{
    int rc = ST_OK;
    json_t *root = json_object(), *md = json_object(), *wm = json_object();
    char *text = NULL;
    if (!root || !md || !wm) {
        json_decref(md);
        json_decref(wm);
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    json_object_set_new(md, "total_size", json_integer((json_int_t)c->total_bytes));
    json_object_set_new(root, "metadata", md);
    for (int i = 0; i < c->n_out; i++)
        json_object_set_new(wm, c->out[i].name, json_string(c->shards[c->out[i].shard].name));
    json_object_set_new(root, "weight_map", wm);
    text = json_dumps(root, JSON_INDENT(4));
    if (!text) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    size_t n = strlen(text);
    char *t2 = realloc(text, n + 2);
    if (!t2) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    text = t2;
    text[n++] = '\n';
    text[n] = 0;
    rc = write_file_atomic(c->out_dir, "model.safetensors.index.json", text, n, err);
fail:
    free(text);
    json_decref(root);
    return rc;
}

static void converter_free(struct converter *c)
{
    for (int i = 0; i < c->n_out; i++) free(c->out[i].name);
    free(c->out);
    free(c->src_out);
    free(c->src_done);
    for (int k = 0; k < c->n_shards; k++) {
        if (c->shards[k].fd >= 0) {
            close(c->shards[k].fd);
            unlink(c->shards[k].tmp); /* still open: not renamed, the conversion failed */
        }
    }
    free(c->shards);
    free(c->res);
    threadpool_free(c->tp);
    safetensors_free(&c->st);
}

int model_convert(const char *in_dir, const char *out_dir, const struct convert_opts *opts,
                  struct convert_stats *stats, char *err)
{
    int rc;
    double t0 = time_s();
    struct converter c = {.o = opts, .in_dir = in_dir, .out_dir = out_dir};
    char path[CONVERT_PATH_LEN];
    char *cfg_text = NULL, *new_cfg = NULL;
    size_t cfg_len = 0;
    json_t *cfg = NULL;
    if (stats) memset(stats, 0, sizeof(*stats));
    if ((rc = mlx_quantize_check(opts->bits, opts->group_size, err)) < 0) return rc;
    struct stat sb;
    if (stat(in_dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        return err_set(err, ST_ENOTFOUND, "convert: %s: not a directory", in_dir);
    if (path_join(path, sizeof(path), in_dir, "config.json") < 0)
        return err_set(err, ST_ERANGE, "convert: %s: path too long", in_dir);
    if ((rc = file_read_all(path, &cfg_text, &cfg_len, CONVERT_MAX_CONFIG_BYTES, err)) < 0)
        return err_prefix(err, rc, "convert: config.json");
    json_error_t je;
    cfg = json_loadb(cfg_text, cfg_len, JSON_REJECT_DUPLICATES, &je);
    if (!cfg) {
        rc = err_set(err, ST_EFORMAT, "convert: %s: %s (line %d)", path, je.text, je.line);
        goto fail;
    }
    if (!json_is_object(cfg)) {
        rc = err_set(err, ST_EFORMAT, "convert: %s: not a JSON object", path);
        goto fail;
    }
    if ((rc = safetensors_open(&c.st, in_dir, err)) < 0) goto fail;
    for (int i = 0; i < c.st.n_files; i++) /* one pass over the input: read ahead, drop behind */
        if (c.st.files[i].map) posix_madvise(c.st.files[i].map, c.st.files[i].size, POSIX_MADV_SEQUENTIAL);
    if ((rc = check_not_quantized(in_dir, cfg, &c.st, err)) < 0) goto fail;
    if (c.st.n_tensors == 0) {
        rc = err_set(err, ST_EFORMAT, "convert: %s holds no tensors", in_dir);
        goto fail;
    }
    new_cfg = config_with_quantization(cfg_text, cfg_len, cfg, opts->bits, opts->group_size);
    if (!new_cfg) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    if ((rc = plan_outputs(&c, err)) < 0) goto fail;
    if ((rc = prepare_out_dir(in_dir, out_dir, opts->overwrite, err)) < 0) goto fail;

    int n_threads = opts->n_threads > 0 ? opts->n_threads : cpu_count();
    if ((rc = threadpool_init(&c.tp, n_threads, err)) < 0) goto fail;
    c.res = calloc((size_t)n_threads, sizeof(*c.res));
    if (!c.res) {
        rc = err_set(err, ST_ENOMEM, "convert: out of memory");
        goto fail;
    }
    for (int k = 0; k < c.n_shards; k++)
        if ((rc = shard_write_header(&c, &c.shards[k], err)) < 0) goto fail;
    int n_quantized = 0;
    for (int i = 0; i < c.n_out; i++) {
        const struct out_tensor *o = &c.out[i];
        if (o->role == ROLE_COPY) {
            rc = copy_tensor(&c, o, err);
        } else if (!c.src_done[o->src]) {
            rc = quantize_tensor(&c, o->src, err);
            c.src_done[o->src] = true;
            n_quantized++;
        }
        if (rc < 0) goto fail;
    }
    for (int k = 0; k < c.n_shards; k++) {
        struct out_shard *s = &c.shards[k];
        if (fsync(s->fd) != 0) {
            rc = err_set(err, ST_EIO, "convert: %s: %s", s->tmp, strerror(errno));
            goto fail;
        }
    }
    if (opts->overwrite) remove_stale_weights(&c);
    for (int k = 0; k < c.n_shards; k++) {
        struct out_shard *s = &c.shards[k];
        if (rename(s->tmp, s->path) != 0) {
            rc = err_set(err, ST_EIO, "convert: %s: rename: %s", s->path, strerror(errno));
            goto fail;
        }
        close(s->fd);
        s->fd = -1;
    }
    if (c.n_shards > 1 && (rc = write_index(&c, err)) < 0) goto fail;
    int n_files = 0;
    if ((rc = copy_other_files(in_dir, out_dir, &n_files, err)) < 0) goto fail;
    if ((rc = write_file_atomic(out_dir, "config.json", new_cfg, strlen(new_cfg), err)) < 0) goto fail;
    if (n_quantized == 0)
        LOGW("convert", "%s: no tensor was quantized (no 2-D .weight has a last dim divisible by %d)", in_dir,
             opts->group_size);
    if (stats) {
        stats->n_tensors_in = c.st.n_tensors;
        stats->n_quantized = n_quantized;
        stats->n_copied = c.st.n_tensors - n_quantized;
        stats->n_shards = c.n_shards;
        stats->n_files_copied = n_files;
        for (int i = 0; i < c.st.n_tensors; i++) stats->in_bytes += c.st.tensors[i].nbytes;
        stats->out_bytes = c.total_bytes;
        stats->seconds = time_s() - t0;
    }
fail:
    converter_free(&c);
    json_decref(cfg);
    free(cfg_text);
    free(new_cfg);
    return rc;
}
