/* codec: payload fields as explicit little-endian bytes. A growable writer and a bounded reader whose first
 * failure sticks (every later get returns 0) so a message parser reads all fields and checks once. */
#include "net/net.h"

#include "core/core.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- writer ---- */

void net_buf_init(struct net_buf *b) { memset(b, 0, sizeof(*b)); }

void net_buf_free(struct net_buf *b)
{
    free(b->data);
    memset(b, 0, sizeof(*b));
}

void net_buf_reset(struct net_buf *b)
{
    b->len = 0;
    b->failed = false;
}

uint8_t *net_buf_reserve(struct net_buf *b, size_t n)
{
    if (b->failed) return NULL;
    /* A buffer never holds more than one frame (header + largest payload). */
    const size_t limit = (size_t)NET_MAX_PAYLOAD + NET_HEADER_BYTES;
    if (n > limit - b->len) {
        b->failed = true;
        return NULL;
    }
    size_t need = b->len + n;
    if (need > b->cap || !b->data) { /* even 0 bytes get real memory to point at */
        size_t cap = b->cap ? b->cap : 256;
        while (cap < need) cap = cap > limit / 2 ? limit : cap * 2;
        uint8_t *d = realloc(b->data, cap);
        if (!d) {
            b->failed = true;
            return NULL;
        }
        b->data = d;
        b->cap = cap;
    }
    uint8_t *p = b->data + b->len;
    b->len = need;
    return p;
}

static void put_le(struct net_buf *b, uint64_t v, int n)
{
    uint8_t *p = net_buf_reserve(b, (size_t)n);
    if (!p) return;
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

void net_buf_put_u8(struct net_buf *b, uint8_t v) { put_le(b, v, 1); }
void net_buf_put_u16(struct net_buf *b, uint16_t v) { put_le(b, v, 2); }
void net_buf_put_u32(struct net_buf *b, uint32_t v) { put_le(b, v, 4); }
void net_buf_put_u64(struct net_buf *b, uint64_t v) { put_le(b, v, 8); }
void net_buf_put_i32(struct net_buf *b, int32_t v) { put_le(b, (uint32_t)v, 4); }
void net_buf_put_i64(struct net_buf *b, int64_t v) { put_le(b, (uint64_t)v, 8); }

void net_buf_put_f32(struct net_buf *b, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, 4);
    put_le(b, bits, 4);
}

void net_buf_put_f64(struct net_buf *b, double v)
{
    uint64_t bits;
    memcpy(&bits, &v, 8);
    put_le(b, bits, 8);
}

void net_buf_put_bytes(struct net_buf *b, const void *p, size_t n)
{
    uint8_t *d = net_buf_reserve(b, n);
    if (d && n) memcpy(d, p, n);
}

void net_buf_put_strn(struct net_buf *b, const char *s, size_t n)
{
    if (n > UINT32_MAX) {
        b->failed = true;
        return;
    }
    net_buf_put_u32(b, (uint32_t)n);
    net_buf_put_bytes(b, s, n);
}

void net_buf_put_str(struct net_buf *b, const char *s) { net_buf_put_strn(b, s, strlen(s)); }

int net_buf_check(const struct net_buf *b, char *err)
{
    if (!b->failed) return ST_OK;
    return err_set(err, ST_ENOMEM, "net: message buffer could not grow past %zu bytes (out of memory or over the "
                   "%u byte frame limit)", b->len, NET_MAX_PAYLOAD);
}

/* ---- reader ---- */

void net_reader_init(struct net_reader *r, const void *data, size_t len)
{
    static const uint8_t empty[1];
    memset(r, 0, sizeof(*r));
    r->data = data ? data : empty; /* never NULL, so zero-length gets return a valid pointer */
    r->len = data ? len : 0;
}

__attribute__((format(printf, 3, 4))) static void reader_fail(struct net_reader *r, const char *field,
                                                               const char *fmt, ...)
{
    if (r->failed) return;
    r->failed = true;
    r->field = field ? field : "?";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->why, sizeof(r->why), fmt, ap);
    va_end(ap);
}

/* Returns a pointer to the next n bytes and advances, or NULL (and fails) when they are not there. */
static const uint8_t *take(struct net_reader *r, size_t n, const char *field)
{
    if (r->failed) return NULL;
    if (n > r->len - r->off) {
        reader_fail(r, field, "truncated: needs %zu bytes, %zu left", n, r->len - r->off);
        return NULL;
    }
    const uint8_t *p = r->data + r->off;
    r->off += n;
    return p;
}

static uint64_t get_le(struct net_reader *r, int n, const char *field)
{
    const uint8_t *p = take(r, (size_t)n, field);
    if (!p) return 0;
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

uint8_t net_reader_get_u8(struct net_reader *r, const char *field) { return (uint8_t)get_le(r, 1, field); }
uint16_t net_reader_get_u16(struct net_reader *r, const char *field) { return (uint16_t)get_le(r, 2, field); }
uint32_t net_reader_get_u32(struct net_reader *r, const char *field) { return (uint32_t)get_le(r, 4, field); }
uint64_t net_reader_get_u64(struct net_reader *r, const char *field) { return get_le(r, 8, field); }
int32_t net_reader_get_i32(struct net_reader *r, const char *field) { return (int32_t)(uint32_t)get_le(r, 4, field); }
int64_t net_reader_get_i64(struct net_reader *r, const char *field) { return (int64_t)get_le(r, 8, field); }

float net_reader_get_f32(struct net_reader *r, const char *field)
{
    uint32_t bits = (uint32_t)get_le(r, 4, field);
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

double net_reader_get_f64(struct net_reader *r, const char *field)
{
    uint64_t bits = get_le(r, 8, field);
    double v;
    memcpy(&v, &bits, 8);
    return v;
}

const uint8_t *net_reader_get_bytes(struct net_reader *r, size_t n, const char *field) { return take(r, n, field); }

void net_reader_get_into(struct net_reader *r, void *out, size_t n, const char *field)
{
    const uint8_t *p = take(r, n, field);
    if (p) memcpy(out, p, n);
    else if (n) memset(out, 0, n);
}

uint32_t net_reader_get_count(struct net_reader *r, uint32_t max, size_t elem_bytes, const char *field)
{
    uint32_t n = (uint32_t)get_le(r, 4, field);
    if (r->failed) return 0;
    if (n > max) {
        reader_fail(r, field, "count %u is over the limit of %u", n, max);
        return 0;
    }
    size_t left = r->len - r->off;
    if (elem_bytes && (size_t)n > left / elem_bytes) {
        reader_fail(r, field, "count %u does not fit in the %zu bytes left", n, left);
        return 0;
    }
    return n;
}

const char *net_reader_get_strn(struct net_reader *r, size_t max_len, size_t *len, const char *field)
{
    *len = 0;
    uint32_t n = (uint32_t)get_le(r, 4, field);
    if (r->failed) return NULL;
    if (n > max_len) {
        reader_fail(r, field, "string of %u bytes is over the limit of %zu", n, max_len);
        return NULL;
    }
    const uint8_t *p = take(r, n, field);
    if (!p) return NULL;
    *len = n;
    return (const char *)p;
}

void net_reader_get_str(struct net_reader *r, char *out, size_t cap, const char *field)
{
    ST_ASSERT(cap > 0);
    out[0] = 0;
    size_t n;
    const char *s = net_reader_get_strn(r, cap - 1, &n, field);
    if (!s) return;
    if (memchr(s, 0, n)) {
        reader_fail(r, field, "string of %zu bytes holds a NUL byte", n);
        return;
    }
    memcpy(out, s, n);
    out[n] = 0;
}

size_t net_reader_remaining(const struct net_reader *r) { return r->failed ? 0 : r->len - r->off; }

int net_reader_check(const struct net_reader *r, char *err)
{
    if (!r->failed) return ST_OK;
    return err_set(err, ST_EFORMAT, "field '%s': %s", r->field, r->why);
}

int net_reader_end(const struct net_reader *r, char *err)
{
    int rc = net_reader_check(r, err);
    if (rc < 0) return rc;
    if (r->off != r->len)
        return err_set(err, ST_EFORMAT, "%zu unexpected trailing bytes after the last field", r->len - r->off);
    return ST_OK;
}
