/* auth: SHA-256 (FIPS 180-4), HMAC-SHA256 (RFC 2104), a constant-time compare and getrandom() nonces. */
#include "net/net.h"

#include "core/core.h"

#include <errno.h>
#include <string.h>
#include <sys/random.h>

static const uint32_t sha_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t ror32(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(uint32_t h[8], const uint8_t *p)
{
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ror32(w[i - 15], 7) ^ ror32(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ror32(w[i - 2], 17) ^ ror32(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = k + (ror32(e, 6) ^ ror32(e, 11) ^ ror32(e, 25)) + ((e & f) ^ (~e & g)) + sha_k[i] + w[i];
        uint32_t t2 = (ror32(a, 2) ^ ror32(a, 13) ^ ror32(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        k = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
    h[4] += e;
    h[5] += f;
    h[6] += g;
    h[7] += k;
}

void net_sha256_init(struct net_sha256 *s)
{
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof(iv));
    s->n_bytes = 0;
    s->n_block = 0;
}

void net_sha256_update(struct net_sha256 *s, const void *data, size_t n)
{
    const uint8_t *p = data;
    s->n_bytes += n;
    if (s->n_block) {
        size_t take = ST_MIN(n, (size_t)64 - s->n_block);
        memcpy(s->block + s->n_block, p, take);
        s->n_block += (uint32_t)take;
        p += take;
        n -= take;
        if (s->n_block < 64) return;
        sha256_block(s->h, s->block);
        s->n_block = 0;
    }
    for (; n >= 64; p += 64, n -= 64) sha256_block(s->h, p);
    if (n) memcpy(s->block, p, n);
    s->n_block = (uint32_t)n;
}

void net_sha256_final(struct net_sha256 *s, uint8_t out[32])
{
    uint64_t bits = s->n_bytes * 8;
    s->block[s->n_block++] = 0x80;
    if (s->n_block > 56) {
        memset(s->block + s->n_block, 0, 64 - s->n_block);
        sha256_block(s->h, s->block);
        s->n_block = 0;
    }
    memset(s->block + s->n_block, 0, 56 - s->n_block);
    for (int i = 0; i < 8; i++) s->block[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_block(s->h, s->block);
    for (int i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
    memset(s, 0, sizeof(*s));
}

void net_sha256(const void *data, size_t n, uint8_t out[32])
{
    struct net_sha256 s;
    net_sha256_init(&s);
    net_sha256_update(&s, data, n);
    net_sha256_final(&s, out);
}

void net_hmac_sha256_init(struct net_hmac_sha256 *h, const void *key, size_t key_bytes)
{
    uint8_t k[64] = {0}, pad[64];
    if (key_bytes > 64) net_sha256(key, key_bytes, k);
    else if (key_bytes) memcpy(k, key, key_bytes);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x36;
    net_sha256_init(&h->inner);
    net_sha256_update(&h->inner, pad, 64);
    for (int i = 0; i < 64; i++) pad[i] = k[i] ^ 0x5c;
    net_sha256_init(&h->outer);
    net_sha256_update(&h->outer, pad, 64);
    memset(k, 0, sizeof(k));
    memset(pad, 0, sizeof(pad));
}

void net_hmac_sha256_update(struct net_hmac_sha256 *h, const void *data, size_t n)
{
    net_sha256_update(&h->inner, data, n);
}

void net_hmac_sha256_final(struct net_hmac_sha256 *h, uint8_t out[32])
{
    uint8_t inner[32];
    net_sha256_final(&h->inner, inner);
    net_sha256_update(&h->outer, inner, 32);
    net_sha256_final(&h->outer, out);
}

void net_hmac_sha256(const void *key, size_t key_bytes, const void *data, size_t n, uint8_t out[32])
{
    struct net_hmac_sha256 h;
    net_hmac_sha256_init(&h, key, key_bytes);
    net_hmac_sha256_update(&h, data, n);
    net_hmac_sha256_final(&h, out);
}

bool net_ct_equal(const void *a, const void *b, size_t n)
{
    const volatile uint8_t *x = a, *y = b;
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++) d |= (uint8_t)(x[i] ^ y[i]);
    return d == 0;
}

int net_random(void *out, size_t n, char *err)
{
    uint8_t *p = out;
    while (n > 0) {
        ssize_t got = getrandom(p, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            return err_set(err, ST_EIO, "net: getrandom failed: %s", strerror(errno));
        }
        p += got;
        n -= (size_t)got;
    }
    return ST_OK;
}
