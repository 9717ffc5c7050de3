/* libFuzzer target for net: arbitrary bytes through
 *   1. net_frame_decode over a memory buffer, frame after frame (the decoder net_recv runs), with each decoded
 *      ERROR payload through net_error_decode;
 *   2. the payload reader, driven by an op list taken from the input, with a round-trip property: whatever was
 *      read without error, written back with the matching net_buf_put_*, must equal the bytes consumed;
 *   3. the real socket path: the bytes are written into one end of a socketpair and a net_conn on the other end
 *      runs the server (or client) handshake, with or without a secret, then net_recv / net_recv_large until
 *      the connection fails. Mode bit 1 rewrites each frame's CRC so the fuzzer gets past it to the payload
 *      parsers (the library itself never skips the CRC check).
 * The first input byte picks the mode. Everything runs with timeout 0: the input is fully written and the
 * write side shut down before the connection reads, so nothing can wait. */
#include "core/core.h"
#include "net/net.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SOCKET_MAX_INPUT 60000

static uint32_t rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void memory_frames(const uint8_t *p, size_t n, uint32_t limit)
{
    char err[ST_ERR_LEN];
    struct net_frame f;
    size_t fb = 0;
    while (n) {
        int rc = net_frame_decode(p, n, limit, &f, &fb, err);
        if (rc < 0) {
            if (!err[0]) abort(); /* every rejection carries a message */
            return;
        }
        if (rc == 0) {
            if (fb <= n || fb > (size_t)NET_HEADER_BYTES + limit) abort(); /* "need more" must be checked */
            return;
        }
        if (fb < NET_HEADER_BYTES || fb > n || f.payload_bytes != fb - NET_HEADER_BYTES) abort();
        if (f.type == 0 || f.type >= NET_MSG_COUNT || (f.flags & ~(unsigned)NET_FLAG_ALL)) abort();
        if (f.type == NET_MSG_ERROR) {
            int code;
            char msg[64];
            if (net_error_decode(&f, &code, msg, sizeof(msg), err) == 0 && (code >= 0 || code < ST_ENOTFOUND)) abort();
        }
        p += fb;
        n -= fb;
    }
}

static void reader_ops(const uint8_t *p, size_t n)
{
    if (n < 2) return;
    size_t n_ops = (size_t)(p[0] % 32) + 1;
    if (n_ops > n - 1) n_ops = n - 1;
    const uint8_t *ops = p + 1;
    const uint8_t *data = ops + n_ops;
    size_t len = n - 1 - n_ops;
    struct net_reader r;
    struct net_buf b;
    net_reader_init(&r, data, len);
    net_buf_init(&b);
    char s[24];
    for (size_t i = 0; i < n_ops; i++) {
        uint8_t op = ops[i];
        size_t before = r.off;
        switch (op % 12) {
        case 0: net_buf_put_u8(&b, net_reader_get_u8(&r, "u8")); break;
        case 1: net_buf_put_u16(&b, net_reader_get_u16(&r, "u16")); break;
        case 2: net_buf_put_u32(&b, net_reader_get_u32(&r, "u32")); break;
        case 3: net_buf_put_u64(&b, net_reader_get_u64(&r, "u64")); break;
        case 4: net_buf_put_i32(&b, net_reader_get_i32(&r, "i32")); break;
        case 5: net_buf_put_i64(&b, net_reader_get_i64(&r, "i64")); break;
        case 6: { /* bit patterns (NaNs included) must survive */
            float v = net_reader_get_f32(&r, "f32");
            net_buf_put_f32(&b, v);
            break;
        }
        case 7: net_buf_put_f64(&b, net_reader_get_f64(&r, "f64")); break;
        case 8: {
            const uint8_t *q = net_reader_get_bytes(&r, op >> 4, "bytes");
            if (q) net_buf_put_bytes(&b, q, op >> 4);
            break;
        }
        case 9: {
            size_t sl;
            const char *q = net_reader_get_strn(&r, op >> 3, &sl, "strn");
            if (q) net_buf_put_strn(&b, q, sl);
            break;
        }
        case 10:
            net_reader_get_str(&r, s, sizeof(s), "str");
            if (!r.failed) {
                if (strlen(s) >= sizeof(s)) abort();
                net_buf_put_str(&b, s);
            }
            break;
        default: {
            uint32_t c = net_reader_get_count(&r, op, 4, "count");
            if (!r.failed) {
                if (c > op || (size_t)c * 4 > r.len - r.off) abort();
                net_buf_put_u32(&b, c);
            }
            break;
        }
        }
        if (r.failed) break;
        if (r.off < before) abort();
    }
    char err[ST_ERR_LEN];
    if (r.failed) {
        if (net_reader_check(&r, err) != ST_EFORMAT || !strstr(err, r.field)) abort();
        if (net_reader_get_u8(&r, "after") != 0 || net_reader_remaining(&r) != 0) abort(); /* sticky */
    } else {
        if (net_buf_check(&b, err) != ST_OK) abort();
        if (b.len != r.off || (b.len && memcmp(b.data, data, b.len) != 0)) abort(); /* round trip */
        if ((net_reader_end(&r, err) == ST_OK) != (r.off == len)) abort();
    }
    net_buf_free(&b);
}

/* Rewrites the CRC of every frame in place so that payload parsing is reached. */
static void fix_crcs(uint8_t *p, size_t n)
{
    size_t off = 0;
    while (n - off >= NET_HEADER_BYTES) {
        uint8_t *h = p + off;
        size_t len = rd32(h + 20);
        size_t avail = n - off - NET_HEADER_BYTES;
        if (len > avail) len = avail;
        uint32_t crc = net_crc32c(0, h, 28);
        crc = net_crc32c(crc, h + NET_HEADER_BYTES, len);
        for (int i = 0; i < 4; i++) h[28 + i] = (uint8_t)(crc >> (8 * i));
        off += NET_HEADER_BYTES + len;
    }
}

static void drain(int fd)
{
    uint8_t junk[4096];
    while (recv(fd, junk, sizeof(junk), MSG_DONTWAIT) > 0) {
    }
}

static void socket_path(uint8_t mode, const uint8_t *data, size_t n)
{
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return;
    int big = 1 << 20;
    setsockopt(fds[1], SOL_SOCKET, SO_SNDBUF, &big, sizeof(big));
    size_t off = 0;
    while (off < n) {
        ssize_t k = send(fds[1], data + off, n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (k <= 0) break;
        off += (size_t)k;
    }
    shutdown(fds[1], SHUT_WR);

    struct net_conn_opts o = {.node_name = "fuzz", .capabilities = 3};
    if (mode & 4) {
        o.secret = "fuzz-secret";
        o.secret_bytes = 11;
    }
    if (mode & 16) o.max_payload = 4096;
    struct net_conn *c = NULL;
    char err[ST_ERR_LEN];
    if (net_conn_init(&c, fds[0], &o, "fuzz", err) < 0) abort();
    int rc = (mode & 8) ? net_handshake_client(c, 0, err) : net_handshake_server(c, 0, err);
    drain(fds[1]);
    if (rc == ST_OK) {
        if (!net_conn_ready(c)) abort();
        for (int i = 0; i < 10000; i++) {
            struct net_frame f;
            if (mode & 32) {
                uint8_t *msg = NULL;
                size_t msg_n = 0;
                rc = net_recv_large(c, &f, &msg, &msg_n, 8192, 0, err);
                if (rc == ST_OK && msg_n > 8192) abort();
                free(msg);
            } else {
                rc = net_recv(c, &f, 0, err);
                if (rc == ST_OK && (f.type == NET_MSG_PING || f.type == NET_MSG_BYE || f.type <= NET_MSG_AUTH_OK))
                    abort(); /* never handed to the caller */
            }
            drain(fds[1]);
            if (rc < 0) break;
        }
    }
    if (rc < 0 && !err[0]) abort();
    /* whatever happened, the input is consumed: the connection must have failed by now */
    if (rc != ST_ETIMEDOUT && net_conn_ready(c)) abort();
    net_conn_free(c);
    close(fds[1]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    uint8_t mode = data[0];
    data++;
    size--;
    memory_frames(data, size, (mode & 16) ? 4096 : NET_MAX_PAYLOAD);
    reader_ops(data, size);
    if (size <= SOCKET_MAX_INPUT && !(mode & 64)) {
        uint8_t *copy = malloc(size ? size : 1);
        if (!copy) return 0;
        memcpy(copy, data, size);
        if (mode & 1) fix_crcs(copy, size);
        socket_path(mode, copy, size);
        free(copy);
    }
    return 0;
}
