/* conn: TCP links. Non-blocking sockets, poll() with a deadline on every wait, a receive buffer that frames
 * are decoded from in place (net_frame_decode), one sendmsg per frame (header + payload pieces), the versioned
 * and authenticated handshake, heartbeats, multiplexed receive and the listener.
 *
 * Handshake (all payloads built with the codec, little-endian):
 *   client -> HELLO     u16 version_min, u16 version_max, u64 capabilities, u32 max_payload, u8 has_secret,
 *                       str node_name, 32 bytes client_nonce
 *   server -> HELLO_ACK u16 version, u64 capabilities, u32 max_payload, u8 auth_required, str node_name,
 *                       32 bytes server_nonce                                  (or ERROR: i32 code, str message)
 *   with a secret:
 *   client -> AUTH      32 bytes HMAC(secret, "strata-auth-client" || server_nonce || client_nonce || names || th)
 *   server -> AUTH_OK   32 bytes HMAC(secret, "strata-auth-server" || client_nonce || server_nonce || names || th)
 *   where names = u32 len || client name || u32 len || server name and th = SHA-256(HELLO payload) ||
 *   SHA-256(HELLO_ACK payload), so versions, capabilities and limits are covered as well. Nonces come from
 *   getrandom() per connection, so an AUTH recorded from one connection is worthless on the next.
 */
#include "net/net.h"

#include "core/core.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define RX_INIT_BYTES (64u << 10)                       /* receive buffer to start with and to shrink back to */
#define RX_KEEP_BYTES ((8u << 20) + NET_HEADER_BYTES)    /* larger buffers are shrunk once drained */
#define PING_MAX_BYTES 64
#define REJECT_SEND_MS 100                               /* how long a best-effort ERROR may take */
#define MIN_PEER_PAYLOAD 4096u                           /* smallest max_payload a peer may announce */

static const char auth_label_client[] = "strata-auth-client";
static const char auth_label_server[] = "strata-auth-server";

struct net_conn {
    int fd;
    char peer_desc[128];
    char label[NET_NAME_MAX + 160]; /* "'name' at desc" once the peer's name is known */

    /* options, copied */
    char node_name[NET_NAME_MAX + 1];
    uint8_t *secret;
    size_t secret_bytes;
    uint64_t caps_offered;
    uint32_t max_payload, chunk_bytes;
    uint16_t version_min, version_max;

    /* set by the handshake */
    bool ready, authenticated;
    uint16_t version;
    uint64_t caps, peer_caps;
    uint32_t peer_max_payload;
    char peer_name[NET_NAME_MAX + 1];

    /* receive side: bytes [rx_off, rx_len) of rx are not consumed yet */
    uint8_t *rx;
    size_t rx_cap, rx_len, rx_off;
    bool rx_drained; /* the last recv emptied the socket: poll before the next one instead of failing with EAGAIN */

    /* send side */
    pthread_mutex_t tx_lock;
    pthread_mutex_t pong_lock; /* guards the pong_* fields */
    atomic_bool pong_pending;
    uint64_t pong_request_id;
    uint8_t pong_payload[PING_MAX_BYTES];
    uint32_t pong_bytes;

    /* first failure: the connection is unusable once failed != 0 */
    pthread_mutex_t fail_lock;
    atomic_int failed;
    char fail_msg[ST_ERR_LEN];

    _Atomic uint64_t bytes_sent, bytes_recv, frames_sent, frames_recv, pings_sent, pongs_recv;
    _Atomic uint64_t last_rtt_ns, last_recv_ns, last_send_ns, last_ping_ns;
};

struct net_listener {
    int fd, port;
    struct net_conn_opts opts; /* node_name and secret point at the copies below */
    char node_name[NET_NAME_MAX + 1];
    uint8_t *secret;
    char desc[128];
};

/* ---- small helpers ---- */

static void stat_add(_Atomic uint64_t *v, uint64_t d) { atomic_fetch_add_explicit(v, d, memory_order_relaxed); }
static void stat_set(_Atomic uint64_t *v, uint64_t x) { atomic_store_explicit(v, x, memory_order_relaxed); }
static uint64_t stat_get(const _Atomic uint64_t *v)
{
    return atomic_load_explicit((_Atomic uint64_t *)v, memory_order_relaxed);
}

static uint64_t deadline_after(int timeout_ms) { return time_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000ull; }

/* Milliseconds until the deadline, rounded up, 0 once it passed. */
static int ms_left(uint64_t deadline)
{
    uint64_t now = time_ns();
    if (now >= deadline) return 0;
    uint64_t ms = (deadline - now + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Waits for events on fd until the deadline: 1 ready (or error/hangup), 0 deadline passed, <0 -errno. */
static int wait_fd(int fd, short events, uint64_t deadline)
{
    for (;;) {
        struct pollfd p = {.fd = fd, .events = events};
        int ms = ms_left(deadline);
        int rc = poll(&p, 1, ms);
        if (rc > 0) return 1;
        if (rc < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        if (ms == 0 || time_ns() >= deadline) return 0;
    }
}

static bool name_valid(const char *s, size_t n)
{
    if (n == 0 || n > NET_NAME_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return false;
    return true;
}

/* Copies a peer-supplied string for a log or error message, replacing anything unprintable. */
static void sanitize(char *out, size_t cap, const char *s, size_t n)
{
    size_t k = 0;
    for (size_t i = 0; i < n && k + 1 < cap; i++) {
        unsigned char ch = (unsigned char)s[i];
        out[k++] = (ch >= 0x20 && ch <= 0x7e) ? (char)ch : '?';
    }
    out[k] = 0;
}

static void conn_update_label(struct net_conn *c)
{
    if (c->peer_name[0]) snprintf(c->label, sizeof(c->label), "'%s' at %s", c->peer_name, c->peer_desc);
    else snprintf(c->label, sizeof(c->label), "%s", c->peer_desc);
}

/* Records the first failure (code and message) without touching the socket. */
static void conn_mark_failed(struct net_conn *c, int code, const char *msg)
{
    int expected = 0;
    if (!atomic_compare_exchange_strong(&c->failed, &expected, code)) return;
    pthread_mutex_lock(&c->fail_lock);
    snprintf(c->fail_msg, sizeof(c->fail_msg), "%s", msg);
    pthread_mutex_unlock(&c->fail_lock);
}

/* Fails the connection for good: records the error, shuts the socket down (the fd stays open until
 * net_conn_free so no other thread can see it reused) and writes "net: <peer>: <msg>" into err. */
__attribute__((format(printf, 4, 5))) static int conn_fail(struct net_conn *c, char *err, int code, const char *fmt,
                                                           ...)
{
    char msg[ST_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_mark_failed(c, code, msg);
    shutdown(c->fd, SHUT_RDWR);
    return err_set(err, code, "net: %s: %s", c->label, msg);
}

/* A non-fatal error (the connection stays usable). */
__attribute__((format(printf, 4, 5))) static int conn_err(const struct net_conn *c, char *err, int code,
                                                          const char *fmt, ...)
{
    char msg[ST_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    return err_set(err, code, "net: %s: %s", c->label, msg);
}

static int conn_check_usable(struct net_conn *c, char *err)
{
    if (atomic_load(&c->failed) == 0) return ST_OK;
    pthread_mutex_lock(&c->fail_lock);
    err_set(err, ST_ECLOSED, "net: %s: connection is closed (%s)", c->label, c->fail_msg);
    pthread_mutex_unlock(&c->fail_lock);
    return ST_ECLOSED;
}

/* ---- sending ---- */

/* Writes one whole frame with sendmsg, waiting for POLLOUT until the deadline. Returns ST_OK or an error code
 * with a message in msg; *sent says how many bytes of the frame went out (0 < sent < total: the stream is
 * broken). Touches no connection state except counters; the caller holds tx_lock. */
static int conn_write_frame(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id,
                            const struct iovec *iov, int n_iov, uint64_t deadline, size_t *sent, char *msg)
{
    uint8_t hdr[NET_HEADER_BYTES];
    struct iovec v[NET_MAX_IOV + 1];
    int n_v = 0;
    net_frame_header_encode(hdr, type, flags, request_id, iov, n_iov);
    v[n_v++] = (struct iovec){.iov_base = hdr, .iov_len = sizeof(hdr)};
    size_t total = sizeof(hdr);
    for (int i = 0; i < n_iov; i++) {
        if (!iov[i].iov_len) continue;
        v[n_v++] = iov[i];
        total += iov[i].iov_len;
    }
    *sent = 0;
    int first = 0;
    while (*sent < total) {
        struct msghdr m = {.msg_iov = v + first, .msg_iovlen = (size_t)(n_v - first)};
        ssize_t k = sendmsg(c->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (k < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                int w = wait_fd(c->fd, POLLOUT, deadline);
                if (w > 0) continue;
                if (w == 0) {
                    snprintf(msg, ST_ERR_LEN, "send of %s frame timed out after %zu of %zu bytes (peer not reading)",
                             net_msg_type_name(type), *sent, total);
                    return ST_ETIMEDOUT;
                }
                errno = -w;
            }
            int e = errno;
            snprintf(msg, ST_ERR_LEN, "send failed: %s", strerror(e));
            return (e == EPIPE || e == ECONNRESET || e == ENOTCONN) ? ST_ECLOSED : ST_EIO;
        }
        *sent += (size_t)k;
        stat_add(&c->bytes_sent, (uint64_t)k);
        size_t adv = (size_t)k;
        while (first < n_v && adv >= v[first].iov_len) adv -= v[first++].iov_len;
        if (first < n_v) {
            v[first].iov_base = (uint8_t *)v[first].iov_base + adv;
            v[first].iov_len -= adv;
        }
    }
    stat_add(&c->frames_sent, 1);
    stat_set(&c->last_send_ns, time_ns());
    return ST_OK;
}

/* Sends a PONG queued by the receiving thread; caller holds tx_lock. */
static void conn_pong_flush_locked(struct net_conn *c, uint64_t deadline)
{
    if (!atomic_exchange(&c->pong_pending, false)) return;
    uint8_t payload[PING_MAX_BYTES];
    pthread_mutex_lock(&c->pong_lock);
    uint64_t id = c->pong_request_id;
    uint32_t n = c->pong_bytes;
    memcpy(payload, c->pong_payload, n);
    pthread_mutex_unlock(&c->pong_lock);
    struct iovec iov = {.iov_base = payload, .iov_len = n};
    char msg[ST_ERR_LEN];
    size_t sent;
    int rc = conn_write_frame(c, NET_MSG_PONG, 0, id, &iov, n ? 1 : 0, deadline, &sent, msg);
    if (rc < 0 && (rc != ST_ETIMEDOUT || sent > 0)) conn_fail(c, NULL, rc, "%s", msg);
}

/* Sends a queued PONG unless another thread holds tx_lock (that thread sends it when it unlocks: both sides
 * re-check the flag after the lock changes hands, so a queued PONG is never stranded). */
static void conn_pong_try(struct net_conn *c, uint64_t deadline)
{
    while (atomic_load(&c->pong_pending) && atomic_load(&c->failed) == 0 && pthread_mutex_trylock(&c->tx_lock) == 0) {
        conn_pong_flush_locked(c, deadline);
        pthread_mutex_unlock(&c->tx_lock);
    }
}

/* Sends one frame under tx_lock. A timeout before the first byte leaves the connection usable. */
static int conn_send_frame(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id,
                           const struct iovec *iov, int n_iov, uint64_t deadline, char *err)
{
    char msg[ST_ERR_LEN];
    size_t sent;
    pthread_mutex_lock(&c->tx_lock);
    int rc = conn_check_usable(c, err);
    if (rc == ST_OK) {
        rc = conn_write_frame(c, type, flags, request_id, iov, n_iov, deadline, &sent, msg);
        if (rc == ST_ETIMEDOUT && sent == 0) rc = conn_err(c, err, rc, "%s", msg);
        else if (rc < 0) rc = conn_fail(c, err, rc, "%s", msg);
        else conn_pong_flush_locked(c, deadline);
    }
    pthread_mutex_unlock(&c->tx_lock);
    conn_pong_try(c, deadline);
    return rc;
}

/* Fails the connection after telling the peer why with a best-effort ERROR frame. */
__attribute__((format(printf, 4, 5))) static int conn_reject(struct net_conn *c, char *err, int code, const char *fmt,
                                                             ...)
{
    char msg[ST_ERR_LEN];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_mark_failed(c, code, msg);
    if (pthread_mutex_trylock(&c->tx_lock) == 0) {
        struct net_buf b;
        net_buf_init(&b);
        net_buf_put_i32(&b, code);
        net_buf_put_strn(&b, msg, ST_MIN(strlen(msg), (size_t)NET_ERROR_MSG_MAX));
        if (!b.failed) {
            struct iovec iov = {.iov_base = b.data, .iov_len = b.len};
            char ignored[ST_ERR_LEN];
            size_t sent;
            conn_write_frame(c, NET_MSG_ERROR, 0, 0, &iov, 1, deadline_after(REJECT_SEND_MS), &sent, ignored);
        }
        net_buf_free(&b);
        pthread_mutex_unlock(&c->tx_lock);
    }
    shutdown(c->fd, SHUT_RDWR);
    return err_set(err, code, "net: %s: %s", c->label, msg);
}

/* ---- receiving ---- */

static uint32_t conn_rx_limit(const struct net_conn *c)
{
    return c->ready ? c->max_payload : ST_MIN(c->max_payload, NET_HANDSHAKE_MAX_PAYLOAD);
}

/* Called once everything buffered is consumed: shrinks a buffer that a big frame left large. */
static void conn_rx_reset(struct net_conn *c)
{
    c->rx_off = c->rx_len = 0;
    if (c->rx_cap > RX_KEEP_BYTES) {
        uint8_t *p = realloc(c->rx, RX_INIT_BYTES);
        if (p) {
            c->rx = p;
            c->rx_cap = RX_INIT_BYTES;
        }
    }
}

/* A wait for more bytes that did not end with the socket readable: a timeout (the connection stays usable) or
 * a poll failure. */
static int conn_rx_wait_failed(struct net_conn *c, char *err, int w, size_t need)
{
    if (w == 0) {
        if (c->rx_len)
            return conn_err(c, err, ST_ETIMEDOUT, "timed out with a partial frame (%zu of %zu bytes)", c->rx_len, need);
        return conn_err(c, err, ST_ETIMEDOUT, "timed out waiting for a frame");
    }
    return conn_fail(c, err, ST_EIO, "poll failed: %s", strerror(-w));
}

/* Reads until one whole valid frame is buffered and returns it (payload points into rx, valid until the next
 * call). Frames that arrived together are decoded in place one after another; bytes are only moved when an
 * incomplete frame has to be completed. Decoding errors and EOF fail the connection; a timeout does not (what
 * arrived stays buffered). */
static int conn_read_frame(struct net_conn *c, struct net_frame *f, uint64_t deadline, char *err)
{
    if (c->rx_off == c->rx_len) conn_rx_reset(c);
    for (;;) {
        char msg[ST_ERR_LEN];
        size_t need = 0, avail = c->rx_len - c->rx_off;
        int rc = net_frame_decode(c->rx + c->rx_off, avail, conn_rx_limit(c), f, &need, msg);
        if (rc < 0) return conn_reject(c, err, rc, "%s", msg);
        if (rc == 1) {
            c->rx_off += need;
            stat_add(&c->frames_recv, 1);
            return ST_OK;
        }
        if (c->rx_off) { /* move the partial frame to the front (the previous payload is no longer valid) */
            memmove(c->rx, c->rx + c->rx_off, avail);
            c->rx_off = 0;
            c->rx_len = avail;
        }
        if (need > c->rx_cap) {
            /* need is at most a validated header plus the checked payload limit */
            size_t cap = ST_MAX(need, ST_MIN(c->rx_cap * 2, (size_t)conn_rx_limit(c) + NET_HEADER_BYTES));
            uint8_t *p = realloc(c->rx, cap);
            if (!p) return conn_fail(c, err, ST_ENOMEM, "cannot buffer a %zu byte frame", need);
            c->rx = p;
            c->rx_cap = cap;
        }
        if (c->rx_drained) {
            int w = wait_fd(c->fd, POLLIN, deadline);
            if (w <= 0) return conn_rx_wait_failed(c, err, w, need);
            c->rx_drained = false;
        }
        size_t space = c->rx_cap - c->rx_len;
        ssize_t k = recv(c->fd, c->rx + c->rx_len, space, MSG_DONTWAIT);
        if (k > 0) {
            c->rx_len += (size_t)k;
            c->rx_drained = (size_t)k < space;
            stat_add(&c->bytes_recv, (uint64_t)k);
            stat_set(&c->last_recv_ns, time_ns());
            continue;
        }
        if (k == 0) {
            if (c->rx_len)
                return conn_fail(c, err, ST_ECLOSED, "peer closed the connection mid-frame (%zu of %zu bytes)",
                                 c->rx_len, need);
            return conn_fail(c, err, ST_ECLOSED, "peer closed the connection");
        }
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            c->rx_drained = true;
            continue;
        }
        if (errno == ECONNRESET) return conn_fail(c, err, ST_ECLOSED, "connection reset by peer");
        return conn_fail(c, err, ST_EIO, "recv failed: %s", strerror(errno));
    }
}

static int conn_recv(struct net_conn *c, struct net_frame *f, uint64_t deadline, char *err)
{
    int rc = conn_check_usable(c, err);
    if (rc < 0) return rc;
    if (!c->ready) return conn_err(c, err, ST_EPROTO, "receive before the handshake completed");
    conn_pong_try(c, deadline);
    for (;;) {
        if ((rc = conn_read_frame(c, f, deadline, err)) < 0) return rc;
        switch (f->type) {
        case NET_MSG_HELLO:
        case NET_MSG_HELLO_ACK:
        case NET_MSG_AUTH:
        case NET_MSG_AUTH_OK:
            return conn_reject(c, err, ST_EPROTO, "unexpected %s frame after the handshake",
                               net_msg_type_name(f->type));
        case NET_MSG_PING:
            if (f->payload_bytes > PING_MAX_BYTES || (f->flags & NET_FLAG_MORE))
                return conn_reject(c, err, ST_EPROTO, "malformed PING (%u bytes)", f->payload_bytes);
            pthread_mutex_lock(&c->pong_lock);
            c->pong_request_id = f->request_id;
            c->pong_bytes = f->payload_bytes;
            if (f->payload_bytes) memcpy(c->pong_payload, f->payload, f->payload_bytes);
            pthread_mutex_unlock(&c->pong_lock);
            atomic_store(&c->pong_pending, true);
            /* a PONG is tiny: give it a moment even when the caller only polls */
            conn_pong_try(c, ST_MAX(deadline, time_ns() + (uint64_t)REJECT_SEND_MS * 1000000ull));
            continue;
        case NET_MSG_PONG: {
            if (f->payload_bytes != 8 || (f->flags & NET_FLAG_MORE))
                return conn_reject(c, err, ST_EPROTO, "malformed PONG (%u bytes)", f->payload_bytes);
            struct net_reader r;
            net_reader_init(&r, f->payload, f->payload_bytes);
            uint64_t t = net_reader_get_u64(&r, "timestamp"), now = time_ns();
            if (t && t <= now) stat_set(&c->last_rtt_ns, now - t);
            stat_add(&c->pongs_recv, 1);
            return ST_OK;
        }
        case NET_MSG_BYE:
            return conn_fail(c, err, ST_ECLOSED, "peer closed the connection (BYE)");
        default:
            return ST_OK;
        }
    }
}

/* ---- connection setup ---- */

static void sock_tune(int fd, int sndbuf, int rcvbuf)
{
    int one = 1;
    /* These fail harmlessly on a Unix socketpair. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    int idle = 10, intvl = 5, cnt = 3;
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    if (sndbuf > 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    if (rcvbuf > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
}

static int opts_node_name(const struct net_conn_opts *o, char out[NET_NAME_MAX + 1], char *err)
{
    if (o && o->node_name) {
        if (!name_valid(o->node_name, strlen(o->node_name)))
            return err_set(err, ST_EINVAL, "net: node name must be 1..%d printable ASCII characters without spaces",
                           NET_NAME_MAX);
        memcpy(out, o->node_name, strlen(o->node_name) + 1);
        return ST_OK;
    }
    char host[256];
    if (gethostname(host, sizeof(host)) == 0) {
        host[sizeof(host) - 1] = 0;
        if (name_valid(host, strlen(host))) { /* so at most NET_NAME_MAX bytes */
            memcpy(out, host, strlen(host) + 1);
            return ST_OK;
        }
    }
    snprintf(out, NET_NAME_MAX + 1, "strata");
    return ST_OK;
}

static int opts_check(const struct net_conn_opts *o, char *err)
{
    if (!o) return ST_OK;
    if (o->max_payload && (o->max_payload < MIN_PEER_PAYLOAD || o->max_payload > NET_MAX_PAYLOAD))
        return err_set(err, ST_EINVAL, "net: max_payload %u is outside %u..%u", o->max_payload, MIN_PEER_PAYLOAD,
                       NET_MAX_PAYLOAD);
    if (o->chunk_bytes > NET_MAX_PAYLOAD)
        return err_set(err, ST_EINVAL, "net: chunk_bytes %u is over %u", o->chunk_bytes, NET_MAX_PAYLOAD);
    uint16_t lo = o->version_min ? o->version_min : NET_PROTO_VERSION;
    uint16_t hi = o->version_max ? o->version_max : NET_PROTO_VERSION;
    if (lo > hi) return err_set(err, ST_EINVAL, "net: version_min %u is above version_max %u", lo, hi);
    if (o->secret_bytes && !o->secret) return err_set(err, ST_EINVAL, "net: secret_bytes without a secret");
    return ST_OK;
}

int net_conn_init(struct net_conn **out, int fd, const struct net_conn_opts *opts, const char *peer_desc, char *err)
{
    *out = NULL;
    int rc;
    struct net_conn *c = NULL;
    if (fd < 0) return err_set(err, ST_EINVAL, "net: invalid socket");
    if ((rc = opts_check(opts, err)) < 0) goto fail;
    c = calloc(1, sizeof(*c));
    if (!c) {
        rc = err_set(err, ST_ENOMEM, "net: out of memory");
        goto fail;
    }
    c->fd = fd;
    fd = -1;
    pthread_mutex_init(&c->tx_lock, NULL);
    pthread_mutex_init(&c->pong_lock, NULL);
    pthread_mutex_init(&c->fail_lock, NULL);
    snprintf(c->peer_desc, sizeof(c->peer_desc), "%s", peer_desc ? peer_desc : "peer");
    conn_update_label(c);
    if ((rc = opts_node_name(opts, c->node_name, err)) < 0) goto fail;
    if (opts && opts->secret && opts->secret_bytes) {
        c->secret = malloc(opts->secret_bytes);
        if (!c->secret) {
            rc = err_set(err, ST_ENOMEM, "net: out of memory");
            goto fail;
        }
        memcpy(c->secret, opts->secret, opts->secret_bytes);
        c->secret_bytes = opts->secret_bytes;
    }
    c->caps_offered = opts ? opts->capabilities : 0;
    c->max_payload = opts && opts->max_payload ? opts->max_payload : NET_MAX_PAYLOAD;
    c->chunk_bytes = opts && opts->chunk_bytes ? opts->chunk_bytes : NET_CHUNK_BYTES;
    c->version_min = opts && opts->version_min ? opts->version_min : NET_PROTO_VERSION;
    c->version_max = opts && opts->version_max ? opts->version_max : NET_PROTO_VERSION;
    c->peer_max_payload = NET_HANDSHAKE_MAX_PAYLOAD;
    c->rx = malloc(RX_INIT_BYTES);
    if (!c->rx) {
        rc = err_set(err, ST_ENOMEM, "net: out of memory");
        goto fail;
    }
    c->rx_cap = RX_INIT_BYTES;
    int fl = fcntl(c->fd, F_GETFL);
    if (fl < 0 || fcntl(c->fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        rc = err_set(err, ST_EIO, "net: cannot make the socket non-blocking: %s", strerror(errno));
        goto fail;
    }
    sock_tune(c->fd, opts ? opts->sndbuf_bytes : 0, opts ? opts->rcvbuf_bytes : 0);
    stat_set(&c->last_recv_ns, time_ns());
    *out = c;
    return ST_OK;
fail:
    if (fd >= 0) close(fd);
    net_conn_free(c);
    return rc;
}

void net_conn_free(struct net_conn *c)
{
    if (!c) return;
    if (c->fd >= 0) close(c->fd);
    if (c->secret) {
        memset(c->secret, 0, c->secret_bytes);
        free(c->secret);
    }
    free(c->rx);
    pthread_mutex_destroy(&c->tx_lock);
    pthread_mutex_destroy(&c->pong_lock);
    pthread_mutex_destroy(&c->fail_lock);
    free(c);
}

int net_conn_close(struct net_conn *c, int timeout_ms, char *err)
{
    int rc = conn_check_usable(c, err);
    if (rc == ST_OK && c->ready) rc = conn_send_frame(c, NET_MSG_BYE, 0, 0, NULL, 0, deadline_after(timeout_ms), err);
    conn_mark_failed(c, ST_ECLOSED, "closed locally");
    shutdown(c->fd, SHUT_RDWR);
    return rc;
}

/* Formats a numeric address as "a.b.c.d:port" or "[v6]:port". */
static void addr_desc(const struct sockaddr *sa, socklen_t len, char *out, size_t cap)
{
    char host[80], serv[8]; /* numeric: INET6_ADDRSTRLEN plus a scope id; a port */
    if (getnameinfo(sa, len, host, sizeof(host), serv, sizeof(serv), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
        snprintf(out, cap, "?");
        return;
    }
    if (sa->sa_family == AF_INET6) snprintf(out, cap, "[%s]:%s", host, serv);
    else snprintf(out, cap, "%s:%s", host, serv);
}

int net_conn_connect(struct net_conn **out, const char *host, int port, const struct net_conn_opts *opts,
                     int timeout_ms, char *err)
{
    *out = NULL;
    int rc, fd = -1;
    struct addrinfo *res = NULL;
    struct net_conn *c = NULL;
    char e[ST_ERR_LEN] = "";
    if (!host || !*host) host = "127.0.0.1";
    if (port <= 0 || port > 65535) return err_set(err, ST_EINVAL, "net: port %d is out of range", port);
    if ((rc = opts_check(opts, err)) < 0) return rc;
    uint64_t deadline = deadline_after(timeout_ms);
    char serv[16];
    snprintf(serv, sizeof(serv), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    int g = getaddrinfo(host, serv, &hints, &res);
    if (g != 0) {
        rc = err_set(err, ST_ENOTFOUND, "net: cannot resolve '%s': %s", host, gai_strerror(g));
        goto fail;
    }
    rc = ST_EIO;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            snprintf(e, sizeof(e), "socket: %s", strerror(errno));
            continue;
        }
        sock_tune(fd, opts ? opts->sndbuf_bytes : 0, opts ? opts->rcvbuf_bytes : 0);
        int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (r < 0 && errno == EINPROGRESS) {
            int w = wait_fd(fd, POLLOUT, deadline);
            if (w == 0) {
                rc = ST_ETIMEDOUT;
                snprintf(e, sizeof(e), "connect timed out after %d ms", timeout_ms);
                close(fd);
                fd = -1;
                break;
            }
            int soerr = 0;
            socklen_t sl = sizeof(soerr);
            if (w < 0) soerr = -w;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0) soerr = errno;
            r = soerr ? -1 : 0;
            errno = soerr;
        }
        if (r == 0) break;
        snprintf(e, sizeof(e), "connect: %s", strerror(errno));
        rc = ST_EIO;
        close(fd);
        fd = -1;
    }
    if (fd < 0) {
        rc = err_set(err, rc, "net: cannot connect to %s:%d: %s", host, port, e);
        goto fail;
    }
    char desc[128];
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) addr_desc((struct sockaddr *)&ss, sl, desc, sizeof(desc));
    else snprintf(desc, sizeof(desc), "%s:%d", host, port);
    rc = net_conn_init(&c, fd, opts, desc, err);
    fd = -1;
    if (rc < 0) goto fail;
    if ((rc = net_handshake_client(c, ms_left(deadline), err)) < 0) goto fail;
    freeaddrinfo(res);
    *out = c;
    return ST_OK;
fail:
    if (fd >= 0) close(fd);
    if (res) freeaddrinfo(res);
    net_conn_free(c);
    return rc;
}

/* ---- handshake ---- */

/* MAC over label || nonce_a || nonce_b || names || transcript hash (see the top of this file). */
static void auth_mac(const struct net_conn *c, const char *label, const uint8_t *nonce_a, const uint8_t *nonce_b,
                     const char *client_name, const char *server_name, const uint8_t th[64], uint8_t out[32])
{
    struct net_hmac_sha256 h;
    uint8_t len[4];
    net_hmac_sha256_init(&h, c->secret, c->secret_bytes);
    net_hmac_sha256_update(&h, label, strlen(label));
    net_hmac_sha256_update(&h, nonce_a, NET_NONCE_BYTES);
    net_hmac_sha256_update(&h, nonce_b, NET_NONCE_BYTES);
    const char *names[2] = {client_name, server_name};
    for (int i = 0; i < 2; i++) {
        uint32_t n = (uint32_t)strlen(names[i]);
        for (int b = 0; b < 4; b++) len[b] = (uint8_t)(n >> (8 * b));
        net_hmac_sha256_update(&h, len, 4);
        net_hmac_sha256_update(&h, names[i], n);
    }
    net_hmac_sha256_update(&h, th, 64);
    net_hmac_sha256_final(&h, out);
}

/* Sends a handshake frame built in b; a frame the codec could not build is a local bug. */
static int hs_send(struct net_conn *c, uint16_t type, struct net_buf *b, uint64_t deadline, char *err)
{
    int rc = net_buf_check(b, err);
    if (rc < 0) return rc;
    struct iovec iov = {.iov_base = b->data, .iov_len = b->len};
    char msg[ST_ERR_LEN];
    size_t sent;
    pthread_mutex_lock(&c->tx_lock);
    rc = conn_write_frame(c, type, 0, 0, &iov, b->len ? 1 : 0, deadline, &sent, msg);
    pthread_mutex_unlock(&c->tx_lock);
    if (rc < 0) return conn_fail(c, err, rc, "handshake: %s", msg);
    return ST_OK;
}

/* Reads a handshake frame; an ERROR from the peer becomes its code and message. */
static int hs_recv(struct net_conn *c, struct net_frame *f, uint16_t want, const char *stage, uint64_t deadline,
                   char *err)
{
    char msg[ST_ERR_LEN];
    int rc = conn_read_frame(c, f, deadline, msg);
    if (rc == ST_ETIMEDOUT) return conn_fail(c, err, rc, "handshake timed out waiting for %s", net_msg_type_name(want));
    if (rc < 0) {
        err_set(err, rc, "%s", msg);
        return rc;
    }
    if (f->type == NET_MSG_ERROR) {
        int code;
        char text[NET_ERROR_MSG_MAX + 1];
        if ((rc = net_error_decode(f, &code, text, sizeof(text), msg)) < 0)
            return conn_fail(c, err, ST_EPROTO, "handshake: peer sent a malformed ERROR: %s", msg);
        return conn_fail(c, err, code, "peer refused the handshake %s: %s", stage, text);
    }
    if (f->type != want)
        return conn_reject(c, err, ST_EPROTO, "%s frame %s (expected %s)", net_msg_type_name(f->type), stage,
                           net_msg_type_name(want));
    if (f->flags)
        return conn_reject(c, err, ST_EPROTO, "%s frame with flags 0x%x (handshake frames are never chunked)",
                           net_msg_type_name(f->type), f->flags);
    return ST_OK;
}

static int handshake_start(struct net_conn *c, char *err)
{
    int rc = conn_check_usable(c, err);
    if (rc < 0) return rc;
    if (c->ready) return conn_err(c, err, ST_EINVAL, "handshake already done");
    return ST_OK;
}

int net_handshake_client(struct net_conn *c, int timeout_ms, char *err)
{
    int rc = handshake_start(c, err);
    if (rc < 0) return rc;
    uint64_t deadline = deadline_after(timeout_ms);
    uint8_t cnonce[NET_NONCE_BYTES], snonce[NET_NONCE_BYTES], th[64], mac[NET_MAC_BYTES];
    char server_name[NET_NAME_MAX + 1], msg[ST_ERR_LEN];
    struct net_frame f;
    struct net_buf b;
    net_buf_init(&b);
    if ((rc = net_random(cnonce, sizeof(cnonce), msg)) < 0) {
        rc = conn_fail(c, err, rc, "%s", msg);
        goto fail;
    }
    bool has_secret = c->secret_bytes > 0;
    net_buf_put_u16(&b, c->version_min);
    net_buf_put_u16(&b, c->version_max);
    net_buf_put_u64(&b, c->caps_offered);
    net_buf_put_u32(&b, c->max_payload);
    net_buf_put_u8(&b, has_secret);
    net_buf_put_str(&b, c->node_name);
    net_buf_put_bytes(&b, cnonce, sizeof(cnonce));
    if ((rc = hs_send(c, NET_MSG_HELLO, &b, deadline, err)) < 0) goto fail;
    net_sha256(b.data, b.len, th);

    if ((rc = hs_recv(c, &f, NET_MSG_HELLO_ACK, "after HELLO", deadline, err)) < 0) goto fail;
    net_sha256(f.payload, f.payload_bytes, th + 32);
    struct net_reader r;
    net_reader_init(&r, f.payload, f.payload_bytes);
    uint16_t version = net_reader_get_u16(&r, "version");
    uint64_t caps = net_reader_get_u64(&r, "capabilities");
    uint32_t peer_max = net_reader_get_u32(&r, "max_payload");
    uint8_t auth_required = net_reader_get_u8(&r, "auth_required");
    net_reader_get_str(&r, server_name, sizeof(server_name), "node_name");
    net_reader_get_into(&r, snonce, sizeof(snonce), "nonce");
    if (net_reader_end(&r, msg) < 0) {
        rc = conn_reject(c, err, ST_EFORMAT, "malformed HELLO_ACK: %s", msg);
        goto fail;
    }
    if (!name_valid(server_name, strlen(server_name))) {
        rc = conn_reject(c, err, ST_EPROTO, "HELLO_ACK carries an invalid node name");
        goto fail;
    }
    snprintf(c->peer_name, sizeof(c->peer_name), "%s", server_name);
    conn_update_label(c);
    if (version < c->version_min || version > c->version_max) {
        rc = conn_reject(c, err, ST_EMISMATCH, "protocol version mismatch: server chose %u, this client speaks %u..%u",
                         version, c->version_min, c->version_max);
        goto fail;
    }
    if (peer_max < MIN_PEER_PAYLOAD || peer_max > NET_MAX_PAYLOAD || auth_required > 1) {
        rc = conn_reject(c, err, ST_EPROTO, "HELLO_ACK has max_payload %u / auth_required %u out of range", peer_max,
                         auth_required);
        goto fail;
    }
    if (auth_required && !has_secret) {
        rc = conn_reject(c, err, ST_EAUTH, "server requires authentication but no cluster secret is configured here");
        goto fail;
    }
    if (!auth_required && has_secret) {
        rc = conn_reject(c, err, ST_EAUTH,
                         "server does not authenticate (no cluster secret there) but this node requires it");
        goto fail;
    }
    if (has_secret) {
        auth_mac(c, auth_label_client, snonce, cnonce, c->node_name, server_name, th, mac);
        net_buf_reset(&b);
        net_buf_put_bytes(&b, mac, sizeof(mac));
        if ((rc = hs_send(c, NET_MSG_AUTH, &b, deadline, err)) < 0) goto fail;
        if ((rc = hs_recv(c, &f, NET_MSG_AUTH_OK, "after AUTH", deadline, err)) < 0) goto fail;
        auth_mac(c, auth_label_server, cnonce, snonce, c->node_name, server_name, th, mac);
        if (f.payload_bytes != NET_MAC_BYTES || !net_ct_equal(f.payload, mac, NET_MAC_BYTES)) {
            rc = conn_reject(c, err, ST_EAUTH, "authentication failed: server did not prove the cluster secret");
            goto fail;
        }
    }
    c->version = version;
    c->peer_caps = caps;
    c->caps = caps & c->caps_offered;
    c->peer_max_payload = peer_max;
    c->authenticated = has_secret;
    c->ready = true;
    net_buf_free(&b);
    return ST_OK;
fail:
    net_buf_free(&b);
    return rc;
}

int net_handshake_server(struct net_conn *c, int timeout_ms, char *err)
{
    int rc = handshake_start(c, err);
    if (rc < 0) return rc;
    uint64_t deadline = deadline_after(timeout_ms);
    uint8_t cnonce[NET_NONCE_BYTES], snonce[NET_NONCE_BYTES], th[64], mac[NET_MAC_BYTES];
    char client_name[NET_NAME_MAX + 1], msg[ST_ERR_LEN];
    struct net_frame f;
    struct net_buf b;
    net_buf_init(&b);
    if ((rc = hs_recv(c, &f, NET_MSG_HELLO, "before HELLO", deadline, err)) < 0) goto fail;
    net_sha256(f.payload, f.payload_bytes, th);
    struct net_reader r;
    net_reader_init(&r, f.payload, f.payload_bytes);
    uint16_t vmin = net_reader_get_u16(&r, "version_min");
    uint16_t vmax = net_reader_get_u16(&r, "version_max");
    uint64_t caps = net_reader_get_u64(&r, "capabilities");
    uint32_t peer_max = net_reader_get_u32(&r, "max_payload");
    uint8_t has_secret = net_reader_get_u8(&r, "has_secret");
    net_reader_get_str(&r, client_name, sizeof(client_name), "node_name");
    net_reader_get_into(&r, cnonce, sizeof(cnonce), "nonce");
    if (net_reader_end(&r, msg) < 0) {
        rc = conn_reject(c, err, ST_EFORMAT, "malformed HELLO: %s", msg);
        goto fail;
    }
    if (!name_valid(client_name, strlen(client_name))) {
        rc = conn_reject(c, err, ST_EPROTO, "HELLO carries an invalid node name");
        goto fail;
    }
    snprintf(c->peer_name, sizeof(c->peer_name), "%s", client_name);
    conn_update_label(c);
    if (vmin > vmax || peer_max < MIN_PEER_PAYLOAD || peer_max > NET_MAX_PAYLOAD || has_secret > 1) {
        rc = conn_reject(c, err, ST_EPROTO, "HELLO has versions %u..%u, max_payload %u, has_secret %u out of range",
                         vmin, vmax, peer_max, has_secret);
        goto fail;
    }
    uint16_t lo = ST_MAX(vmin, c->version_min), hi = ST_MIN(vmax, c->version_max);
    if (lo > hi) {
        rc = conn_reject(c, err, ST_EMISMATCH,
                         "protocol version mismatch: client speaks %u..%u, this server speaks %u..%u", vmin, vmax,
                         c->version_min, c->version_max);
        goto fail;
    }
    bool want_auth = c->secret_bytes > 0;
    if (want_auth && !has_secret) {
        rc = conn_reject(c, err, ST_EAUTH, "authentication required: the client has no cluster secret configured");
        goto fail;
    }
    if (!want_auth && has_secret) {
        rc = conn_reject(c, err, ST_EAUTH,
                         "client requires authentication but this server has no cluster secret configured");
        goto fail;
    }
    if ((rc = net_random(snonce, sizeof(snonce), msg)) < 0) {
        rc = conn_fail(c, err, rc, "%s", msg);
        goto fail;
    }
    net_buf_put_u16(&b, hi);
    net_buf_put_u64(&b, c->caps_offered);
    net_buf_put_u32(&b, c->max_payload);
    net_buf_put_u8(&b, want_auth);
    net_buf_put_str(&b, c->node_name);
    net_buf_put_bytes(&b, snonce, sizeof(snonce));
    net_sha256(b.data ? b.data : (const uint8_t *)"", b.len, th + 32);
    if ((rc = hs_send(c, NET_MSG_HELLO_ACK, &b, deadline, err)) < 0) goto fail;
    if (want_auth) {
        if ((rc = hs_recv(c, &f, NET_MSG_AUTH, "before authentication", deadline, err)) < 0) goto fail;
        auth_mac(c, auth_label_client, snonce, cnonce, client_name, c->node_name, th, mac);
        if (f.payload_bytes != NET_MAC_BYTES || !net_ct_equal(f.payload, mac, NET_MAC_BYTES)) {
            rc = conn_reject(c, err, ST_EAUTH, "authentication failed");
            goto fail;
        }
        auth_mac(c, auth_label_server, cnonce, snonce, client_name, c->node_name, th, mac);
        net_buf_reset(&b);
        net_buf_put_bytes(&b, mac, sizeof(mac));
        if ((rc = hs_send(c, NET_MSG_AUTH_OK, &b, deadline, err)) < 0) goto fail;
    }
    c->version = hi;
    c->peer_caps = caps;
    c->caps = caps & c->caps_offered;
    c->peer_max_payload = peer_max;
    c->authenticated = want_auth;
    c->ready = true;
    net_buf_free(&b);
    return ST_OK;
fail:
    net_buf_free(&b);
    return rc;
}

/* ---- public send/receive ---- */

static int conn_sendv(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id, const struct iovec *iov,
                      int n_iov, uint64_t deadline, char *err)
{
    int rc = conn_check_usable(c, err);
    if (rc < 0) return rc;
    if (!c->ready) return conn_err(c, err, ST_EPROTO, "send before the handshake completed");
    if (type <= NET_MSG_AUTH_OK || type >= NET_MSG_COUNT)
        return conn_err(c, err, ST_EINVAL, "cannot send a frame of type %u (%s) here", type, net_msg_type_name(type));
    if (flags & ~(unsigned)NET_FLAG_ALL) return conn_err(c, err, ST_EINVAL, "unknown frame flags 0x%x", flags);
    if (n_iov < 0 || n_iov > NET_MAX_IOV || (n_iov && !iov))
        return conn_err(c, err, ST_EINVAL, "%d payload pieces (at most %d)", n_iov, NET_MAX_IOV);
    size_t total = 0;
    for (int i = 0; i < n_iov; i++) {
        if (iov[i].iov_len && !iov[i].iov_base) return conn_err(c, err, ST_EINVAL, "payload piece %d is NULL", i);
        if (iov[i].iov_len > NET_MAX_PAYLOAD) total = SIZE_MAX;
        else total += iov[i].iov_len;
    }
    if (total > c->peer_max_payload)
        return conn_err(c, err, ST_ERANGE, "%s payload of %zu bytes is over the peer's %u byte limit",
                        net_msg_type_name(type), total, c->peer_max_payload);
    return conn_send_frame(c, type, flags, request_id, iov, n_iov, deadline, err);
}

int net_sendv(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id, const struct iovec *iov,
              int n_iov, int timeout_ms, char *err)
{
    return conn_sendv(c, type, flags, request_id, iov, n_iov, deadline_after(timeout_ms), err);
}

int net_send(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id, const void *payload,
             size_t payload_bytes, int timeout_ms, char *err)
{
    struct iovec iov = {.iov_base = (void *)payload, .iov_len = payload_bytes};
    return conn_sendv(c, type, flags, request_id, &iov, payload_bytes ? 1 : 0, deadline_after(timeout_ms), err);
}

int net_recv(struct net_conn *c, struct net_frame *f, int timeout_ms, char *err)
{
    return conn_recv(c, f, deadline_after(timeout_ms), err);
}

int net_send_large(struct net_conn *c, uint16_t type, uint64_t request_id, const void *data, size_t bytes,
                   int timeout_ms, char *err)
{
    uint64_t deadline = deadline_after(timeout_ms);
    int rc = conn_check_usable(c, err);
    if (rc < 0) return rc;
    if (bytes && !data) return conn_err(c, err, ST_EINVAL, "NULL data");
    size_t chunk = ST_MIN((size_t)c->chunk_bytes, (size_t)c->peer_max_payload);
    const uint8_t *p = data;
    do {
        size_t n = ST_MIN(chunk, bytes);
        struct iovec iov = {.iov_base = (void *)p, .iov_len = n};
        uint16_t flags = bytes > n ? NET_FLAG_MORE : 0;
        if ((rc = conn_sendv(c, type, flags, request_id, &iov, n ? 1 : 0, deadline, err)) < 0) {
            /* a chunk that timed out before its first byte still leaves a message half sent */
            if (p != data) conn_fail(c, NULL, rc, "chunked %s message abandoned mid-way", net_msg_type_name(type));
            return rc;
        }
        p += n;
        bytes -= n;
    } while (bytes);
    return ST_OK;
}

int net_recv_large(struct net_conn *c, struct net_frame *f, uint8_t **out, size_t *out_bytes, size_t max_bytes,
                   int timeout_ms, char *err)
{
    *out = NULL;
    *out_bytes = 0;
    uint64_t deadline = deadline_after(timeout_ms);
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    struct net_frame part;
    int rc;
    bool started = false;
    for (;;) {
        if ((rc = conn_recv(c, &part, deadline, err)) < 0) {
            /* a timeout mid-message would leave the rest of the chunks unread: the stream is out of step */
            if (started && rc == ST_ETIMEDOUT) conn_fail(c, NULL, rc, "timed out inside a chunked message");
            goto fail;
        }
        if (part.type == NET_MSG_PONG) continue;
        if (!started) {
            *f = part;
            started = true;
        } else if (part.type != f->type || part.request_id != f->request_id) {
            rc = conn_reject(c, err, ST_EPROTO, "expected the next chunk of %s #%llu, got %s #%llu",
                             net_msg_type_name(f->type), (unsigned long long)f->request_id,
                             net_msg_type_name(part.type), (unsigned long long)part.request_id);
            goto fail;
        }
        if (part.payload_bytes > max_bytes - len) {
            rc = conn_reject(c, err, ST_ERANGE, "chunked %s message is over the %zu byte limit",
                             net_msg_type_name(f->type), max_bytes);
            goto fail;
        }
        if (len + part.payload_bytes > cap) {
            size_t ncap = ST_MAX(len + part.payload_bytes, cap < max_bytes / 2 ? cap * 2 : max_bytes);
            uint8_t *p = realloc(buf, ncap);
            if (!p) {
                rc = conn_fail(c, err, ST_ENOMEM, "cannot buffer a %zu byte message", ncap);
                goto fail;
            }
            buf = p;
            cap = ncap;
        }
        if (part.payload_bytes) memcpy(buf + len, part.payload, part.payload_bytes);
        len += part.payload_bytes;
        if (!(part.flags & NET_FLAG_MORE)) break;
    }
    f->flags = 0;
    f->payload = NULL;
    f->payload_bytes = 0;
    *out = buf;
    *out_bytes = len;
    return ST_OK;
fail:
    free(buf);
    return rc;
}

int net_send_error(struct net_conn *c, uint64_t request_id, int code, const char *msg, int timeout_ms, char *err)
{
    struct net_buf b;
    net_buf_init(&b);
    net_buf_put_i32(&b, code);
    net_buf_put_strn(&b, msg ? msg : "", msg ? ST_MIN(strlen(msg), (size_t)NET_ERROR_MSG_MAX) : 0);
    int rc = net_buf_check(&b, err);
    if (rc == ST_OK) rc = net_send(c, NET_MSG_ERROR, 0, request_id, b.data, b.len, timeout_ms, err);
    net_buf_free(&b);
    return rc;
}

int net_error_decode(const struct net_frame *f, int *code, char *msg, size_t msg_cap, char *err)
{
    ST_ASSERT(msg_cap > 0);
    *code = ST_EPROTO;
    msg[0] = 0;
    if (f->type != NET_MSG_ERROR) return err_set(err, ST_EINVAL, "net: %s frame is not an ERROR", net_msg_type_name(f->type));
    struct net_reader r;
    net_reader_init(&r, f->payload, f->payload_bytes);
    int32_t c = net_reader_get_i32(&r, "code");
    size_t n;
    const char *s = net_reader_get_strn(&r, NET_ERROR_MSG_MAX, &n, "message");
    char e[ST_ERR_LEN];
    if (net_reader_end(&r, e) < 0) return err_set(err, ST_EFORMAT, "net: malformed ERROR frame: %s", e);
    *code = (c < 0 && c >= ST_ENOTFOUND) ? c : ST_EPROTO;
    sanitize(msg, msg_cap, s, n);
    return ST_OK;
}

/* ---- heartbeats, stats, accessors ---- */

int net_conn_ping(struct net_conn *c, int timeout_ms, char *err)
{
    uint8_t p[8];
    uint64_t now = time_ns();
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(now >> (8 * i));
    int rc = net_send(c, NET_MSG_PING, 0, 0, p, sizeof(p), timeout_ms, err);
    if (rc == ST_OK) {
        stat_add(&c->pings_sent, 1);
        stat_set(&c->last_ping_ns, now);
    }
    return rc;
}

int net_conn_heartbeat(struct net_conn *c, int interval_ms, int dead_ms, char *err)
{
    int rc = conn_check_usable(c, err);
    if (rc < 0) return rc;
    if (interval_ms <= 0 || dead_ms <= 0) return conn_err(c, err, ST_EINVAL, "heartbeat intervals must be positive");
    uint64_t now = time_ns(), idle = net_conn_idle_ns(c);
    if (idle >= (uint64_t)dead_ms * 1000000ull)
        return conn_fail(c, err, ST_ETIMEDOUT, "peer silent for %.2f s (limit %d ms)", (double)idle * 1e-9, dead_ms);
    uint64_t interval = (uint64_t)interval_ms * 1000000ull;
    if (idle >= interval && now - stat_get(&c->last_ping_ns) >= interval) return net_conn_ping(c, interval_ms, err);
    return ST_OK;
}

uint64_t net_conn_idle_ns(const struct net_conn *c)
{
    uint64_t now = time_ns(), last = stat_get(&c->last_recv_ns);
    return now > last ? now - last : 0;
}

void net_conn_get_stats(const struct net_conn *c, struct net_conn_stats *s)
{
    s->bytes_sent = stat_get(&c->bytes_sent);
    s->bytes_recv = stat_get(&c->bytes_recv);
    s->frames_sent = stat_get(&c->frames_sent);
    s->frames_recv = stat_get(&c->frames_recv);
    s->pings_sent = stat_get(&c->pings_sent);
    s->pongs_recv = stat_get(&c->pongs_recv);
    s->last_rtt_ns = stat_get(&c->last_rtt_ns);
    s->last_recv_ns = stat_get(&c->last_recv_ns);
    s->last_send_ns = stat_get(&c->last_send_ns);
}

bool net_conn_has_frame(const struct net_conn *c)
{
    struct net_frame f;
    size_t need;
    return net_frame_decode(c->rx + c->rx_off, c->rx_len - c->rx_off, conn_rx_limit(c), &f, &need, NULL) != 0;
}

int net_conn_fd(const struct net_conn *c) { return c->fd; }
bool net_conn_ready(const struct net_conn *c) { return c->ready && atomic_load(&((struct net_conn *)c)->failed) == 0; }
bool net_conn_authenticated(const struct net_conn *c) { return c->authenticated; }
const char *net_conn_peer_name(const struct net_conn *c) { return c->peer_name; }
const char *net_conn_peer_desc(const struct net_conn *c) { return c->peer_desc; }
uint16_t net_conn_version(const struct net_conn *c) { return c->version; }
uint64_t net_conn_caps(const struct net_conn *c) { return c->caps; }
uint64_t net_conn_peer_caps(const struct net_conn *c) { return c->peer_caps; }
uint32_t net_conn_peer_max_payload(const struct net_conn *c) { return c->peer_max_payload; }

/* ---- multiplexing ---- */

int net_poll(struct net_conn *const *conns, int n, int timeout_ms, bool *ready, char *err)
{
    if (n < 0 || (n > 0 && (!conns || !ready))) return err_set(err, ST_EINVAL, "net: bad net_poll arguments");
    struct pollfd stack_pfd[32], *pfd = stack_pfd;
    if (n > (int)ST_ARRAY_LEN(stack_pfd)) {
        pfd = malloc(sizeof(*pfd) * (size_t)n);
        if (!pfd) return err_set(err, ST_ENOMEM, "net: out of memory");
    }
    uint64_t deadline = deadline_after(timeout_ms);
    int n_ready = 0;
    for (int i = 0; i < n; i++) {
        ready[i] = false;
        pfd[i] = (struct pollfd){.fd = -1, .events = POLLIN};
        const struct net_conn *c = conns[i];
        if (!c) continue;
        if (atomic_load(&((struct net_conn *)c)->failed) != 0 || net_conn_has_frame(c)) {
            ready[i] = true;
            n_ready++;
        } else {
            pfd[i].fd = c->fd;
        }
    }
    int rc;
    for (;;) {
        int ms = n_ready ? 0 : ms_left(deadline);
        rc = poll(pfd, (nfds_t)n, ms);
        if (rc < 0) {
            if (errno == EINTR) continue;
            rc = err_set(err, ST_EIO, "net: poll failed: %s", strerror(errno));
            goto out;
        }
        for (int i = 0; i < n; i++) {
            if (pfd[i].fd >= 0 && (pfd[i].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) {
                ready[i] = true;
                n_ready++;
                conns[i]->rx_drained = false; /* net_recv may read at once */
            }
        }
        if (n_ready || ms == 0 || time_ns() >= deadline) break;
    }
    rc = n_ready;
out:
    if (pfd != stack_pfd) free(pfd);
    return rc;
}

/* ---- listener ---- */

int net_listener_init(struct net_listener **out, const char *host, int port, const struct net_conn_opts *opts,
                      char *err)
{
    *out = NULL;
    int rc;
    struct addrinfo *res = NULL;
    struct net_listener *l = NULL;
    char e[ST_ERR_LEN] = "no address";
    if (!host || !*host) host = "127.0.0.1";
    if (port < 0 || port > 65535) return err_set(err, ST_EINVAL, "net: port %d is out of range", port);
    if ((rc = opts_check(opts, err)) < 0) return rc;
    l = calloc(1, sizeof(*l));
    if (!l) return err_set(err, ST_ENOMEM, "net: out of memory");
    l->fd = -1;
    if (opts) l->opts = *opts;
    if ((rc = opts_node_name(opts, l->node_name, err)) < 0) goto fail;
    l->opts.node_name = l->node_name;
    if (opts && opts->secret && opts->secret_bytes) {
        if (!(l->secret = malloc(opts->secret_bytes))) {
            rc = err_set(err, ST_ENOMEM, "net: out of memory");
            goto fail;
        }
        memcpy(l->secret, opts->secret, opts->secret_bytes);
        l->opts.secret = l->secret;
    } else {
        l->opts.secret = NULL;
        l->opts.secret_bytes = 0;
    }
    char serv[16];
    snprintf(serv, sizeof(serv), "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    int g = getaddrinfo(host, serv, &hints, &res);
    if (g != 0) {
        rc = err_set(err, ST_ENOTFOUND, "net: cannot resolve '%s': %s", host, gai_strerror(g));
        goto fail;
    }
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            snprintf(e, sizeof(e), "socket: %s", strerror(errno));
            continue;
        }
        int one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        /* accepted sockets inherit the buffer sizes (set before listen for TCP window scaling) */
        if (opts && opts->sndbuf_bytes > 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &opts->sndbuf_bytes, sizeof(int));
        if (opts && opts->rcvbuf_bytes > 0) setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &opts->rcvbuf_bytes, sizeof(int));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0) {
            l->fd = fd;
            break;
        }
        snprintf(e, sizeof(e), "%s", strerror(errno));
        close(fd);
    }
    if (l->fd < 0) {
        rc = err_set(err, ST_EIO, "net: cannot listen on %s:%d: %s", host, port, e);
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    if (getsockname(l->fd, (struct sockaddr *)&ss, &sl) < 0) {
        rc = err_set(err, ST_EIO, "net: getsockname: %s", strerror(errno));
        goto fail;
    }
    l->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                             : ((struct sockaddr_in *)&ss)->sin_port);
    addr_desc((struct sockaddr *)&ss, sl, l->desc, sizeof(l->desc));
    freeaddrinfo(res);
    *out = l;
    return ST_OK;
fail:
    if (res) freeaddrinfo(res);
    net_listener_free(l);
    return rc;
}

void net_listener_free(struct net_listener *l)
{
    if (!l) return;
    if (l->fd >= 0) close(l->fd);
    if (l->secret) {
        memset(l->secret, 0, l->opts.secret_bytes);
        free(l->secret);
    }
    free(l);
}

int net_listener_port(const struct net_listener *l) { return l->port; }
int net_listener_fd(const struct net_listener *l) { return l->fd; }

int net_listener_accept(struct net_listener *l, struct net_conn **out, int timeout_ms, char *err)
{
    *out = NULL;
    uint64_t deadline = deadline_after(timeout_ms);
    int fd;
    struct sockaddr_storage ss;
    socklen_t sl;
    for (;;) {
        sl = sizeof(ss);
        fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd >= 0) break;
        if (errno == EINTR || errno == ECONNABORTED) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(l->fd, POLLIN, deadline);
            if (w > 0) continue;
            if (w == 0) return err_set(err, ST_ETIMEDOUT, "net: no connection on %s within %d ms", l->desc, timeout_ms);
            errno = -w;
        }
        return err_set(err, ST_EIO, "net: accept on %s failed: %s", l->desc, strerror(errno));
    }
    char desc[128];
    addr_desc((struct sockaddr *)&ss, sl, desc, sizeof(desc));
    struct net_conn *c;
    int rc = net_conn_init(&c, fd, &l->opts, desc, err);
    if (rc < 0) return rc;
    if ((rc = net_handshake_server(c, ms_left(deadline), err)) < 0) {
        net_conn_free(c);
        return rc;
    }
    *out = c;
    return ST_OK;
}
