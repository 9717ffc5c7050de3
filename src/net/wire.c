/* wire: CRC32C and the 32-byte frame header, encoded and decoded byte by byte (see net.h for the layout).
 *
 * net_frame_decode is the only frame parser: net_recv runs it over the connection's receive buffer and the fuzz
 * target runs it over arbitrary bytes. */
#include "net/net.h"

#include "core/core.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

static const uint8_t frame_magic[4] = {'S', 'T', 'R', 'T'};

static const char *const msg_names[NET_MSG_COUNT] = {
    [NET_MSG_HELLO] = "HELLO",
    [NET_MSG_HELLO_ACK] = "HELLO_ACK",
    [NET_MSG_AUTH] = "AUTH",
    [NET_MSG_AUTH_OK] = "AUTH_OK",
    [NET_MSG_ERROR] = "ERROR",
    [NET_MSG_PING] = "PING",
    [NET_MSG_PONG] = "PONG",
    [NET_MSG_BYE] = "BYE",
    [NET_MSG_INFO_REQ] = "INFO_REQ",
    [NET_MSG_INFO] = "INFO",
    [NET_MSG_LOAD] = "LOAD",
    [NET_MSG_LOAD_PROGRESS] = "LOAD_PROGRESS",
    [NET_MSG_LOAD_DONE] = "LOAD_DONE",
    [NET_MSG_WEIGHTS_CHUNK] = "WEIGHTS_CHUNK",
    [NET_MSG_FORWARD] = "FORWARD",
    [NET_MSG_FORWARD_RESULT] = "FORWARD_RESULT",
    [NET_MSG_SEQ_FREE] = "SEQ_FREE",
    [NET_MSG_RESET] = "RESET",
    [NET_MSG_STATS_REQ] = "STATS_REQ",
    [NET_MSG_STATS] = "STATS",
};

const char *net_msg_type_name(int type)
{
    if (type <= 0 || type >= NET_MSG_COUNT || !msg_names[type]) return "UNKNOWN";
    return msg_names[type];
}

/* ---- CRC32C ---- */

/* Slicing-by-8 tables for the reflected Castagnoli polynomial 0x82F63B78. */
static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_table_build(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

uint32_t net_crc32c_sw(uint32_t crc, const void *data, size_t n)
{
    pthread_once(&crc_once, crc_table_build);
    const uint8_t *p = data;
    uint32_t c = ~crc;
    while (n >= 8) {
        uint32_t lo = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        c = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
            crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
            crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xff];
    return ~c;
}

#if defined(__x86_64__)
/* The crc32 instruction has a latency of 3 cycles and a throughput of 1, so the hardware path runs three
 * independent streams over adjacent blocks and joins them: the CRC register is linear, so
 *     reg(A || B, r) = zeros_{|B|}(reg(A, r)) ^ reg(B, 0)
 * where zeros_n advances a register over n zero bytes: a 32x32 GF(2) matrix, tabulated per byte of the
 * register for the two block sizes used (built once from the polynomial by repeated squaring). */
#define CRC_LONG 8192
#define CRC_SHORT 256
static uint32_t crc_long[4][256], crc_short[4][256];
static pthread_once_t crc_hw_once = PTHREAD_ONCE_INIT;

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1) sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *sq, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++) sq[n] = gf2_times(mat, mat[n]);
}

/* Operator for n zero bytes, n a power of two. */
static void crc_zeros_op(uint32_t op[32], size_t n)
{
    uint32_t bit[32], tmp[32];
    bit[0] = 0x82F63B78u; /* one zero bit: shift right, fold the polynomial in */
    for (int i = 1; i < 32; i++) bit[i] = 1u << (i - 1);
    gf2_square(tmp, bit);  /* 2 bits */
    gf2_square(bit, tmp);  /* 4 bits */
    gf2_square(op, bit);   /* 8 bits: one byte */
    for (; n > 1; n >>= 1) {
        gf2_square(tmp, op);
        memcpy(op, tmp, sizeof(tmp));
    }
}

static void crc_zeros_table(uint32_t t[4][256], size_t n)
{
    uint32_t op[32];
    crc_zeros_op(op, n);
    for (uint32_t i = 0; i < 256; i++)
        for (int b = 0; b < 4; b++) t[b][i] = gf2_times(op, i << (8 * b));
}

static void crc_hw_tables_build(void)
{
    crc_zeros_table(crc_long, CRC_LONG);
    crc_zeros_table(crc_short, CRC_SHORT);
}

static uint32_t crc_shift(uint32_t t[4][256], uint32_t c)
{
    return t[0][c & 0xff] ^ t[1][(c >> 8) & 0xff] ^ t[2][(c >> 16) & 0xff] ^ t[3][c >> 24];
}

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* the instruction consumes the little-endian 8 bytes */
    return v;
}

__attribute__((target("sse4.2"))) uint32_t net_crc32c_hw(uint32_t crc, const void *data, size_t n)
{
    pthread_once(&crc_hw_once, crc_hw_tables_build);
    const uint8_t *p = data;
    uint64_t c0 = ~crc;
    while (n > 0 && ((uintptr_t)p & 7)) {
        c0 = _mm_crc32_u8((uint32_t)c0, *p++);
        n--;
    }
    static const size_t blocks[2] = {CRC_LONG, CRC_SHORT};
    for (int k = 0; k < 2; k++) {
        size_t blk = blocks[k];
        while (n >= 3 * blk) {
            uint64_t c1 = 0, c2 = 0;
            for (const uint8_t *end = p + blk; p < end; p += 8) {
                c0 = _mm_crc32_u64(c0, load64(p));
                c1 = _mm_crc32_u64(c1, load64(p + blk));
                c2 = _mm_crc32_u64(c2, load64(p + 2 * blk));
            }
            uint32_t (*t)[256] = k == 0 ? crc_long : crc_short;
            c0 = crc_shift(t, (uint32_t)c0) ^ (uint32_t)c1;
            c0 = crc_shift(t, (uint32_t)c0) ^ (uint32_t)c2;
            p += 2 * blk;
            n -= 3 * blk;
        }
    }
    for (; n >= 8; p += 8, n -= 8) c0 = _mm_crc32_u64(c0, load64(p));
    while (n--) c0 = _mm_crc32_u8((uint32_t)c0, *p++);
    return ~(uint32_t)c0;
}

bool net_crc32c_hw_available(void)
{
    static _Atomic int have = -1;
    int h = atomic_load_explicit(&have, memory_order_relaxed);
    if (h < 0) {
        __builtin_cpu_init();
        h = __builtin_cpu_supports("sse4.2") ? 1 : 0;
        atomic_store_explicit(&have, h, memory_order_relaxed);
    }
    return h == 1;
}
#else
uint32_t net_crc32c_hw(uint32_t crc, const void *data, size_t n) { return net_crc32c_sw(crc, data, n); }
bool net_crc32c_hw_available(void) { return false; }
#endif

uint32_t net_crc32c(uint32_t crc, const void *data, size_t n)
{
    if (net_crc32c_hw_available()) return net_crc32c_hw(crc, data, n);
    return net_crc32c_sw(crc, data, n);
}

/* ---- header ---- */

static void put16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32; }

void net_frame_header_encode(uint8_t hdr[NET_HEADER_BYTES], uint16_t type, uint16_t flags, uint64_t request_id,
                             const struct iovec *iov, int n_iov)
{
    size_t total = 0;
    for (int i = 0; i < n_iov; i++) total += iov[i].iov_len;
    ST_ASSERT(total <= UINT32_MAX);
    memcpy(hdr, frame_magic, 4);
    put16(hdr + 4, NET_PROTO_VERSION);
    put16(hdr + 6, type);
    put16(hdr + 8, flags);
    put16(hdr + 10, 0);
    put64(hdr + 12, request_id);
    put32(hdr + 20, (uint32_t)total);
    put32(hdr + 24, 0);
    uint32_t crc = net_crc32c(0, hdr, 28);
    for (int i = 0; i < n_iov; i++)
        if (iov[i].iov_len) crc = net_crc32c(crc, iov[i].iov_base, iov[i].iov_len);
    put32(hdr + 28, crc);
}

int net_frame_encode(struct net_buf *out, uint16_t type, uint16_t flags, uint64_t request_id, const void *payload,
                     size_t payload_bytes, char *err)
{
    if (type == 0 || type >= NET_MSG_COUNT) return err_set(err, ST_EINVAL, "net: cannot encode unknown message type %u", type);
    if (flags & ~(unsigned)NET_FLAG_ALL) return err_set(err, ST_EINVAL, "net: cannot encode unknown flags 0x%x", flags);
    if (payload_bytes > NET_MAX_PAYLOAD)
        return err_set(err, ST_EINVAL, "net: payload of %zu bytes is over the %u byte frame limit", payload_bytes,
                       NET_MAX_PAYLOAD);
    struct iovec iov = {.iov_base = (void *)payload, .iov_len = payload_bytes};
    uint8_t *dst = net_buf_reserve(out, NET_HEADER_BYTES + payload_bytes);
    if (!dst) return net_buf_check(out, err);
    net_frame_header_encode(dst, type, flags, request_id, &iov, payload_bytes ? 1 : 0);
    if (payload_bytes) memcpy(dst + NET_HEADER_BYTES, payload, payload_bytes);
    return ST_OK;
}

/* Validates the 32 header bytes; fills f (payload not yet). */
static int header_decode(const uint8_t *h, uint32_t max_payload, struct net_frame *f, char *err)
{
    if (memcmp(h, frame_magic, 4) != 0)
        return err_set(err, ST_EFORMAT, "bad frame magic %02x %02x %02x %02x (expected \"STRT\")", h[0], h[1], h[2],
                       h[3]);
    uint16_t version = get16(h + 4);
    if (version != NET_PROTO_VERSION)
        return err_set(err, ST_EUNSUPPORTED, "unsupported frame version %u (this build speaks %u)", version,
                       NET_PROTO_VERSION);
    uint16_t type = get16(h + 6), flags = get16(h + 8);
    if (get16(h + 10) != 0 || get32(h + 24) != 0)
        return err_set(err, ST_EFORMAT, "reserved header fields are not zero");
    if (type == 0 || type >= NET_MSG_COUNT) return err_set(err, ST_EPROTO, "unknown message type %u", type);
    if (flags & ~(unsigned)NET_FLAG_ALL) return err_set(err, ST_EPROTO, "unknown frame flags 0x%x", flags);
    uint32_t n = get32(h + 20);
    if (n > max_payload)
        return err_set(err, ST_ERANGE, "%s frame announces a %u byte payload, over the %u byte limit",
                       net_msg_type_name(type), n, max_payload);
    f->type = type;
    f->flags = flags;
    f->request_id = get64(h + 12);
    f->payload_bytes = n;
    f->payload = NULL;
    return ST_OK;
}

int net_frame_decode(const void *buf, size_t len, uint32_t max_payload, struct net_frame *f, size_t *frame_bytes,
                     char *err)
{
    const uint8_t *p = buf;
    if (max_payload > NET_MAX_PAYLOAD) max_payload = NET_MAX_PAYLOAD;
    if (len < NET_HEADER_BYTES) {
        *frame_bytes = NET_HEADER_BYTES;
        return 0;
    }
    int rc = header_decode(p, max_payload, f, err);
    if (rc < 0) return rc;
    size_t total = NET_HEADER_BYTES + (size_t)f->payload_bytes;
    *frame_bytes = total;
    if (len < total) return 0;
    uint32_t want = get32(p + 28);
    uint32_t crc = net_crc32c(0, p, 28);
    if (f->payload_bytes) crc = net_crc32c(crc, p + NET_HEADER_BYTES, f->payload_bytes);
    if (crc != want)
        return err_set(err, ST_EFORMAT, "CRC32C mismatch on %s frame of %u bytes (header 0x%08x, computed 0x%08x)",
                       net_msg_type_name(f->type), f->payload_bytes, want, crc);
    f->payload = f->payload_bytes ? p + NET_HEADER_BYTES : NULL;
    return 1;
}
