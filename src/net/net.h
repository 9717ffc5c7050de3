/* net: the wire protocol and the TCP links between the coordinator and pipeline workers.
 *
 * Contract:
 * - Frames. Every frame is a 32-byte little-endian header, encoded byte by byte, then the payload:
 *       [0..4)   magic "STRT"
 *       [4..6)   frame format version (u16, NET_PROTO_VERSION)
 *       [6..8)   message type (u16, enum net_msg_type)
 *       [8..10)  flags (u16, NET_FLAG_*; unknown bits rejected)
 *       [10..12) reserved (u16, must be 0)
 *       [12..20) request id (u64, chosen by the sender, echoed in replies)
 *       [20..24) payload length (u32)
 *       [24..28) reserved (u32, must be 0)
 *       [28..32) CRC32C over header bytes [0..28) followed by the payload
 *   A decoder checks magic, version, reserved fields, type, flags and the length bound (the per-connection
 *   limit, never above NET_MAX_PAYLOAD) as soon as the 32 header bytes are there, before anything is allocated
 *   for the payload; the CRC once the payload is complete. Any violation fails the connection for good: it is
 *   shut down and never resynchronized; later calls on it return ST_ECLOSED naming the first error.
 * - Connections. Non-blocking sockets (TCP_NODELAY, SO_KEEPALIVE, MSG_NOSIGNAL: SIGPIPE never fires), and every
 *   blocking operation takes a timeout in milliseconds (>= 0; 0 means "only what can be done now") and returns
 *   ST_ETIMEDOUT when it passes. A peer that closed gives ST_ECLOSED. A receive timeout keeps the connection
 *   usable (partial bytes stay buffered); a send timeout in the middle of a frame fails the connection.
 * - Handshake. net_conn_connect / net_listener_accept run it (or net_handshake_client / _server over any
 *   connected stream socket): HELLO (version range, capabilities, node name, 32-byte nonce, max payload) ->
 *   HELLO_ACK (chosen version, capabilities, node name, 32-byte nonce, auth_required) or ERROR. With a shared
 *   cluster secret both sides prove it (AUTH / AUTH_OK):
 *       AUTH    = HMAC-SHA256(secret, "strata-auth-client" || server_nonce || client_nonce || names || th)
 *       AUTH_OK = HMAC-SHA256(secret, "strata-auth-server" || client_nonce || server_nonce || names || th)
 *   names = u32 length || client name || u32 length || server name; th = SHA-256(HELLO payload) ||
 *   SHA-256(HELLO_ACK payload), binding versions, capabilities and limits too. MACs are compared in constant
 *   time; nonces come from getrandom() per connection, so a recorded AUTH fails on any other connection. A side
 *   with a secret refuses a side without one (and vice versa) with an ERROR naming the reason. Before the
 *   handshake has completed only handshake frames are accepted (at most NET_HANDSHAKE_MAX_PAYLOAD bytes each)
 *   and net_send/net_recv refuse to run.
 * - Heartbeats. net_recv answers PING by itself (PONG echoing the payload) and never returns PING; it returns
 *   PONG to the caller after recording the round-trip time. When another thread is in the middle of sending a
 *   frame, the PONG is queued and goes out right after that frame; PINGs arriving while one is queued are
 *   answered once, for the latest (liveness and RTT need no more). BYE is not returned either: it makes
 *   net_recv return ST_ECLOSED. All other types (ERROR included) are returned as frames.
 * - Threads. A connection may be used by one sending thread and one receiving thread at the same time (the
 *   receiver's automatic PONG never blocks behind a sender); two threads must not both send or both receive.
 *   net_poll and net_conn_has_frame look at the receive buffer: call them from the receiving thread.
 *   Statistics, net_conn_idle_ns and net_conn_heartbeat may be called from any thread.
 * - Ownership. A frame's payload returned by net_recv is borrowed from the connection and stays valid until the
 *   next net_recv / net_recv_large / net_handshake_* / net_conn_free on it. net_recv_large returns a malloc'd
 *   buffer the caller frees with free().
 * - Payload codec. struct net_buf appends explicit little-endian fields and grows as needed (a failed growth
 *   is remembered; net_buf_check reports it). struct net_reader never reads past the end: after the first
 *   failure every get returns 0/NULL, and net_reader_check / net_reader_end return ST_EFORMAT naming the field.
 */
#ifndef STRATA_NET_H
#define STRATA_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#define NET_PROTO_VERSION 1
#define NET_HEADER_BYTES 32
#define NET_MAX_PAYLOAD (64u << 20)            /* hard ceiling for one frame's payload */
#define NET_HANDSHAKE_MAX_PAYLOAD 4096u        /* per-frame limit before authentication completes */
#define NET_CHUNK_BYTES (4u << 20)             /* default chunk size of net_send_large */
#define NET_NONCE_BYTES 32
#define NET_MAC_BYTES 32
#define NET_NAME_MAX 63                        /* node names: 1..63 printable ASCII bytes */
#define NET_ERROR_MSG_MAX 1024                 /* longest message carried by an ERROR frame */
#define NET_MAX_IOV 16                         /* payload pieces per net_sendv */

enum net_msg_type {
    /* 0 is never a valid type */
    NET_MSG_HELLO = 1,
    NET_MSG_HELLO_ACK,
    NET_MSG_AUTH,
    NET_MSG_AUTH_OK,
    NET_MSG_ERROR,          /* i32 ST_E* code, string message */
    NET_MSG_PING,           /* u64 sender timestamp (ns, sender's monotonic clock) */
    NET_MSG_PONG,           /* echo of the PING payload */
    NET_MSG_BYE,            /* empty: orderly close */
    /* cluster messages: payloads are opaque to net */
    NET_MSG_INFO_REQ,
    NET_MSG_INFO,
    NET_MSG_LOAD,
    NET_MSG_LOAD_PROGRESS,
    NET_MSG_LOAD_DONE,
    NET_MSG_WEIGHTS_CHUNK,
    NET_MSG_FORWARD,
    NET_MSG_FORWARD_RESULT,
    NET_MSG_SEQ_FREE,
    NET_MSG_RESET,
    NET_MSG_STATS_REQ,
    NET_MSG_STATS,
    NET_MSG_COUNT
};

enum net_frame_flag {
    NET_FLAG_MORE = 1u << 0, /* a chunk of a larger message: the next frame continues it (same type and id) */
    NET_FLAG_ALL = NET_FLAG_MORE,
};

/* Capability bits exchanged in the handshake; the agreed set is the intersection (net_conn_caps). net itself
 * acts on none of them; the cluster defines and checks its own. */
#define NET_CAP_CHUNKED (1ull << 0) /* this node reassembles NET_FLAG_MORE chunks (net_recv_large) */

/* "HELLO", "FORWARD", ...; "UNKNOWN" for anything else. */
const char *net_msg_type_name(int type);

/* ---- checksums and authentication primitives ---- */

/* CRC32C (Castagnoli), zlib-style chaining: start with crc = 0, feed the previous result back in.
 * Uses the SSE4.2 crc32 instruction when the CPU has it (checked at run time), else a table. */
uint32_t net_crc32c(uint32_t crc, const void *data, size_t n);
uint32_t net_crc32c_sw(uint32_t crc, const void *data, size_t n);  /* table version, always available */
uint32_t net_crc32c_hw(uint32_t crc, const void *data, size_t n);  /* only when net_crc32c_hw_available() */
bool net_crc32c_hw_available(void);

struct net_sha256 {
    uint32_t h[8];
    uint64_t n_bytes;
    uint8_t block[64];
    uint32_t n_block;
};
void net_sha256_init(struct net_sha256 *s);
void net_sha256_update(struct net_sha256 *s, const void *data, size_t n);
void net_sha256_final(struct net_sha256 *s, uint8_t out[32]);
void net_sha256(const void *data, size_t n, uint8_t out[32]);

struct net_hmac_sha256 {
    struct net_sha256 inner, outer;
};
void net_hmac_sha256_init(struct net_hmac_sha256 *h, const void *key, size_t key_bytes);
void net_hmac_sha256_update(struct net_hmac_sha256 *h, const void *data, size_t n);
void net_hmac_sha256_final(struct net_hmac_sha256 *h, uint8_t out[32]);
void net_hmac_sha256(const void *key, size_t key_bytes, const void *data, size_t n, uint8_t out[32]);

/* Compares n bytes in time independent of the contents. */
bool net_ct_equal(const void *a, const void *b, size_t n);
/* Fills out with n bytes from getrandom(). */
int net_random(void *out, size_t n, char *err);

/* ---- payload codec ---- */

struct net_buf {
    uint8_t *data;
    size_t len, cap;
    bool failed; /* a growth failed or the buffer would exceed NET_MAX_PAYLOAD; sticky */
};
void net_buf_init(struct net_buf *b);          /* empty, allocates nothing */
void net_buf_free(struct net_buf *b);
void net_buf_reset(struct net_buf *b);         /* len = 0, keeps the memory and clears failed */
/* Makes room for n more bytes and returns a pointer to them (len grows by n), or NULL (failed is set). Lets a
 * caller write a tensor straight into the buffer. */
uint8_t *net_buf_reserve(struct net_buf *b, size_t n);
void net_buf_put_u8(struct net_buf *b, uint8_t v);
void net_buf_put_u16(struct net_buf *b, uint16_t v);
void net_buf_put_u32(struct net_buf *b, uint32_t v);
void net_buf_put_u64(struct net_buf *b, uint64_t v);
void net_buf_put_i32(struct net_buf *b, int32_t v);
void net_buf_put_i64(struct net_buf *b, int64_t v);
void net_buf_put_f32(struct net_buf *b, float v);
void net_buf_put_f64(struct net_buf *b, double v);
void net_buf_put_bytes(struct net_buf *b, const void *p, size_t n);  /* raw, no length */
void net_buf_put_str(struct net_buf *b, const char *s);              /* u32 length + bytes, no NUL */
void net_buf_put_strn(struct net_buf *b, const char *s, size_t n);
/* ST_OK, or ST_ENOMEM naming what failed. */
int net_buf_check(const struct net_buf *b, char *err);

struct net_reader {
    const uint8_t *data;
    size_t len, off;
    bool failed;
    const char *field;   /* the field that failed (a string literal from the caller) */
    char why[96];        /* what was wrong with it */
};
void net_reader_init(struct net_reader *r, const void *data, size_t len);
uint8_t net_reader_get_u8(struct net_reader *r, const char *field);
uint16_t net_reader_get_u16(struct net_reader *r, const char *field);
uint32_t net_reader_get_u32(struct net_reader *r, const char *field);
uint64_t net_reader_get_u64(struct net_reader *r, const char *field);
int32_t net_reader_get_i32(struct net_reader *r, const char *field);
int64_t net_reader_get_i64(struct net_reader *r, const char *field);
float net_reader_get_f32(struct net_reader *r, const char *field);
double net_reader_get_f64(struct net_reader *r, const char *field);
/* n raw bytes: a pointer into the reader's data, or NULL on error. */
const uint8_t *net_reader_get_bytes(struct net_reader *r, size_t n, const char *field);
/* Copies n raw bytes into out (zero-filled on error). */
void net_reader_get_into(struct net_reader *r, void *out, size_t n, const char *field);
/* A u32 element count that must be <= max and whose count * elem_bytes must still be in the payload: check
 * before allocating count elements. Returns 0 on error. */
uint32_t net_reader_get_count(struct net_reader *r, uint32_t max, size_t elem_bytes, const char *field);
/* A length-prefixed string as a pointer into the data (not NUL-terminated) and its length; NULL on error or when
 * longer than max_len. */
const char *net_reader_get_strn(struct net_reader *r, size_t max_len, size_t *len, const char *field);
/* A length-prefixed string copied into out with a NUL; fails when it does not fit in cap or holds a NUL byte. */
void net_reader_get_str(struct net_reader *r, char *out, size_t cap, const char *field);
size_t net_reader_remaining(const struct net_reader *r);
/* ST_OK, or ST_EFORMAT "field 'x': why". */
int net_reader_check(const struct net_reader *r, char *err);
/* Like net_reader_check and also fails when bytes are left over. */
int net_reader_end(const struct net_reader *r, char *err);

/* ---- frames in memory (the decoder net_recv uses) ---- */

struct net_frame {
    uint16_t type, flags;
    uint64_t request_id;
    uint32_t payload_bytes;
    const uint8_t *payload; /* borrowed; NULL when payload_bytes is 0 */
};

/* Writes the 32-byte header of a frame whose payload is the concatenation of iov[0..n_iov), CRC included.
 * The caller guarantees the type and flags are valid and the total fits in u32. */
void net_frame_header_encode(uint8_t hdr[NET_HEADER_BYTES], uint16_t type, uint16_t flags, uint64_t request_id,
                             const struct iovec *iov, int n_iov);
/* Appends a whole frame (header + payload) to out. ST_EINVAL for an invalid type/flags or oversized payload. */
int net_frame_encode(struct net_buf *out, uint16_t type, uint16_t flags, uint64_t request_id, const void *payload,
                     size_t payload_bytes, char *err);
/* Decodes the frame at the start of buf[0..len) with payloads limited to max_payload bytes (capped at
 * NET_MAX_PAYLOAD).
 *   1: a whole valid frame; *f is filled (payload points into buf) and *frame_bytes is its size.
 *   0: incomplete; *frame_bytes is how many bytes the frame needs in total (32 until the header is in; once the
 *      header is in it has already been validated, so this is a checked size).
 *  <0: ST_EFORMAT (magic, reserved, CRC), ST_EUNSUPPORTED (format version), ST_EPROTO (type, flags),
 *      ST_ERANGE (payload length over the limit), with a message. */
int net_frame_decode(const void *buf, size_t len, uint32_t max_payload, struct net_frame *f, size_t *frame_bytes,
                     char *err);

/* ---- connections ---- */

struct net_conn;
struct net_listener;

struct net_conn_opts {
    const char *node_name;         /* sent in HELLO/HELLO_ACK; NULL: the host name (or "strata") */
    const void *secret;            /* shared cluster secret; NULL or 0 bytes: none */
    size_t secret_bytes;
    uint64_t capabilities;         /* offered capability bits (defined by the cluster); agreed = intersection */
    uint32_t max_payload;          /* largest payload accepted from the peer; 0: NET_MAX_PAYLOAD */
    uint32_t chunk_bytes;          /* net_send_large chunk size; 0: NET_CHUNK_BYTES */
    uint16_t version_min, version_max; /* protocol versions offered; 0: NET_PROTO_VERSION */
    int sndbuf_bytes, rcvbuf_bytes;    /* SO_SNDBUF / SO_RCVBUF when > 0 (tests use tiny ones) */
};

struct net_conn_stats {
    uint64_t bytes_sent, bytes_recv;
    uint64_t frames_sent, frames_recv;
    uint64_t pings_sent, pongs_recv;
    uint64_t last_rtt_ns;   /* from the latest PONG; 0 until one arrives */
    uint64_t last_recv_ns;  /* time_ns() when bytes last arrived (or when the connection was made) */
    uint64_t last_send_ns;  /* time_ns() of the last completed frame send */
};

/* Wraps a connected stream socket (TCP or socketpair); takes ownership of fd even on failure. The connection
 * must complete net_handshake_client or net_handshake_server before net_send/net_recv. */
int net_conn_init(struct net_conn **out, int fd, const struct net_conn_opts *opts, const char *peer_desc,
                  char *err);
/* Resolves host (getaddrinfo: names, IPv4, IPv6), connects and runs the client handshake, all within
 * timeout_ms. */
int net_conn_connect(struct net_conn **out, const char *host, int port, const struct net_conn_opts *opts,
                     int timeout_ms, char *err);
/* Closes the socket and frees everything; NULL is fine. Sends nothing. */
void net_conn_free(struct net_conn *c);
/* Sends BYE (best effort within timeout_ms) and shuts the connection down; it is unusable afterwards. */
int net_conn_close(struct net_conn *c, int timeout_ms, char *err);

int net_handshake_client(struct net_conn *c, int timeout_ms, char *err);
int net_handshake_server(struct net_conn *c, int timeout_ms, char *err);

/* Sends one frame. Payloads over the peer's announced limit give ST_ERANGE and leave the connection intact. */
int net_send(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id, const void *payload,
             size_t payload_bytes, int timeout_ms, char *err);
/* Same with the payload in up to NET_MAX_IOV pieces, written with the header in one sendmsg (no copy). */
int net_sendv(struct net_conn *c, uint16_t type, uint16_t flags, uint64_t request_id, const struct iovec *iov,
              int n_iov, int timeout_ms, char *err);
/* Receives the next frame other than PING/BYE (see the contract above). */
int net_recv(struct net_conn *c, struct net_frame *f, int timeout_ms, char *err);

/* Sends bytes of any size as chunks of at most min(chunk_bytes, peer's limit), all but the last flagged
 * NET_FLAG_MORE; an empty message is one empty frame. */
int net_send_large(struct net_conn *c, uint16_t type, uint64_t request_id, const void *data, size_t bytes,
                   int timeout_ms, char *err);
/* Receives one whole message (chunks reassembled; PONGs in between are absorbed). *out is malloc'd (NULL when
 * empty) and holds *out_bytes bytes; *f describes it (type, request id, flags 0, payload NULL). More than
 * max_bytes gives ST_ERANGE; a chunk of another type or id gives ST_EPROTO; both fail the connection. */
int net_recv_large(struct net_conn *c, struct net_frame *f, uint8_t **out, size_t *out_bytes, size_t max_bytes,
                   int timeout_ms, char *err);

/* ERROR frames: code is an ST_E* value, msg is truncated to NET_ERROR_MSG_MAX bytes. */
int net_send_error(struct net_conn *c, uint64_t request_id, int code, const char *msg, int timeout_ms, char *err);
/* Decodes an ERROR frame's payload; codes net does not know become ST_EPROTO. */
int net_error_decode(const struct net_frame *f, int *code, char *msg, size_t msg_cap, char *err);

/* Sends a PING carrying time_ns(); the PONG comes back through net_recv. */
int net_conn_ping(struct net_conn *c, int timeout_ms, char *err);
/* Heartbeat for an idle link, to call every so often: pings when nothing arrived for interval_ms (at most once
 * per interval), and returns ST_ETIMEDOUT (failing the connection) when nothing arrived for dead_ms. Arrival is
 * noted when bytes are read, so the owner must keep receiving (net_poll + net_recv) for PONGs to count. */
int net_conn_heartbeat(struct net_conn *c, int interval_ms, int dead_ms, char *err);
/* Nanoseconds since bytes last arrived. */
uint64_t net_conn_idle_ns(const struct net_conn *c);
void net_conn_get_stats(const struct net_conn *c, struct net_conn_stats *s);

/* Waits until at least one of conns[0..n) has something for net_recv (a buffered frame, readable bytes, EOF
 * or an error) or timeout_ms passes. NULL entries are skipped. Sets ready[i] and returns how many are ready
 * (0 on timeout). Bytes being readable does not mean a whole frame: net_recv with timeout 0 may then still
 * give ST_ETIMEDOUT, which is harmless. */
int net_poll(struct net_conn *const *conns, int n, int timeout_ms, bool *ready, char *err);

int net_conn_fd(const struct net_conn *c);
bool net_conn_ready(const struct net_conn *c);     /* handshake done and not failed */
bool net_conn_has_frame(const struct net_conn *c); /* a whole frame is already buffered (fd may not poll) */
bool net_conn_authenticated(const struct net_conn *c);
const char *net_conn_peer_name(const struct net_conn *c); /* the peer's node name ("" before the handshake) */
const char *net_conn_peer_desc(const struct net_conn *c); /* "host:port" or what net_conn_init was given */
uint16_t net_conn_version(const struct net_conn *c);      /* negotiated protocol version */
uint64_t net_conn_caps(const struct net_conn *c);         /* agreed capabilities (intersection) */
uint64_t net_conn_peer_caps(const struct net_conn *c);
uint32_t net_conn_peer_max_payload(const struct net_conn *c);

/* Listens on host:port (host NULL: 127.0.0.1; port 0: an ephemeral port) with SO_REUSEADDR. opts (copied)
 * apply to every accepted connection. */
int net_listener_init(struct net_listener **out, const char *host, int port, const struct net_conn_opts *opts,
                      char *err);
void net_listener_free(struct net_listener *l);
int net_listener_port(const struct net_listener *l);
int net_listener_fd(const struct net_listener *l);
/* Accepts one connection and runs the server handshake, all within timeout_ms. A client that fails the
 * handshake is sent an ERROR where possible, closed, and its error returned (the listener stays usable). */
int net_listener_accept(struct net_listener *l, struct net_conn **out, int timeout_ms, char *err);

#endif
