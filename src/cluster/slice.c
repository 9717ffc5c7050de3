/* slice: the coordinator sends a worker exactly the tensors of its layer range once; the worker keeps them as a
 * model directory in its cache (config.json + model.safetensors), named by the slice id, and loads from there.
 *
 * Stream (WEIGHTS_CHUNK messages, in order on the control connection):
 *   begin: u32 0, str slice_id, str config.json text, u64 file bytes
 *   data:  u32 1, raw bytes of model.safetensors (header first, then tensors in name order)
 *   end:   u32 2
 * The worker writes into <cache>/<id>.partial and renames it to <cache>/<id> when every byte arrived; the load
 * that follows verifies the hashes as for any other copy. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>
#include <xxhash.h>

#include "cluster/proto.h"
#include "core/core.h"

#define SLICE_CHUNK (4u << 20)

int slice_id_compute(const struct manifest *full, const char *model_dir, int layer_begin, int layer_end, bool first,
                     bool last, char id[40], char *err)
{
    struct model m;
    int rc = model_load(&m, model_dir, layer_begin, layer_end, first, last, err);
    if (rc < 0) return rc;
    XXH3_state_t *st = XXH3_createState();
    if (!st) {
        model_free(&m);
        return err_set(err, ST_ENOMEM, "out of memory");
    }
    XXH3_64bits_reset(st);
    XXH3_64bits_update(st, &full->config_hi, sizeof(full->config_hi));
    XXH3_64bits_update(st, &full->config_lo, sizeof(full->config_lo));
    for (int i = 0; i < m.n_held; i++) {
        const char *name = m.held[i].name;
        const struct manifest_entry *e = NULL;
        for (int k = 0; k < full->n && !e; k++)
            if (!strcmp(full->entries[k].name, name)) e = &full->entries[k];
        if (!e) {
            XXH3_freeState(st);
            model_free(&m);
            return err_set(err, ST_ENOTFOUND, "tensor %s is not in the manifest", name);
        }
        XXH3_64bits_update(st, name, strlen(name) + 1);
        XXH3_64bits_update(st, &e->hash_hi, sizeof(e->hash_hi));
        XXH3_64bits_update(st, &e->hash_lo, sizeof(e->hash_lo));
    }
    snprintf(id, 40, "%016" PRIx64, (uint64_t)XXH3_64bits_digest(st));
    XXH3_freeState(st);
    model_free(&m);
    return ST_OK;
}

static int send_part(struct net_conn *c, uint32_t kind, const void *p, size_t n, uint64_t id, int timeout_ms, char *err)
{
    uint8_t k[4] = {(uint8_t)kind, (uint8_t)(kind >> 8), (uint8_t)(kind >> 16), (uint8_t)(kind >> 24)};
    struct iovec iov[2] = {{k, 4}, {(void *)p, n}};
    return net_sendv(c, NET_MSG_WEIGHTS_CHUNK, 0, id, iov, n ? 2 : 1, timeout_ms, err);
}

int slice_send(struct net_conn *c, const char *model_dir, int layer_begin, int layer_end, bool first, bool last,
               const char *slice_id, int timeout_ms, char *err)
{
    struct model m;
    int rc = model_load(&m, model_dir, layer_begin, layer_end, first, last, err);
    if (rc < 0) return rc;
    struct st_writer_entry *e = calloc((size_t)(m.n_held + 1), sizeof(*e));
    const struct st_writer_entry **order = NULL;
    uint8_t *hdr = NULL;
    size_t hl = 0;
    char *config = NULL;
    size_t config_len = 0;
    struct net_buf b;
    net_buf_init(&b);
    if (!e) {
        rc = err_set(err, ST_ENOMEM, "out of memory");
        goto done;
    }
    uint64_t total = 0;
    for (int i = 0; i < m.n_held; i++) {
        const struct st_tensor *t = safetensors_find(&m.st, m.held[i].name);
        ST_ASSERT(t != NULL);
        e[i].name = t->name;
        e[i].dtype = t->dtype;
        e[i].n_dims = t->n_dims;
        memcpy(e[i].shape, t->shape, sizeof(t->shape));
        e[i].data = t->data;
        e[i].nbytes = t->nbytes;
        total += t->nbytes;
    }
    if ((rc = safetensors_header_encode(e, m.n_held, NULL, &order, &hdr, &hl, err)) < 0) goto done;
    char path[1200];
    snprintf(path, sizeof(path), "%s/config.json", model_dir);
    if ((rc = file_read_all(path, &config, &config_len, 1 << 20, err)) < 0) goto done;
    total += hl;
    net_buf_put_u32(&b, 0);
    net_buf_put_str(&b, slice_id);
    net_buf_put_strn(&b, config, config_len);
    net_buf_put_u64(&b, total);
    LOGI("cluster", "sending layers %d-%d (%.1f MiB) as slice %s", layer_begin, layer_end - 1, total / 1048576.0, slice_id);
    if ((rc = net_buf_check(&b, err)) < 0 ||
        (rc = net_send(c, NET_MSG_WEIGHTS_CHUNK, 0, 0, b.data, b.len, timeout_ms, err)) < 0)
        goto done;
    if ((rc = send_part(c, 1, hdr, hl, 0, timeout_ms, err)) < 0) goto done;
    for (int i = 0; i < m.n_held; i++)
        for (size_t off = 0; off < order[i]->nbytes; off += SLICE_CHUNK) {
            size_t n = ST_MIN((size_t)SLICE_CHUNK, order[i]->nbytes - off);
            if ((rc = send_part(c, 1, (const uint8_t *)order[i]->data + off, n, 0, timeout_ms, err)) < 0) goto done;
        }
    rc = send_part(c, 2, NULL, 0, 0, timeout_ms, err);
done:
    net_buf_free(&b);
    free(config);
    free(hdr);
    free(order);
    free(e);
    model_free(&m);
    return rc;
}

void slice_rx_init(struct slice_rx *rx)
{
    memset(rx, 0, sizeof(*rx));
    rx->fd = -1;
}

void slice_rx_reset(struct slice_rx *rx)
{
    if (rx->fd >= 0) close(rx->fd);
    if (rx->partial[0]) {
        char p[1300];
        snprintf(p, sizeof(p), "%s/model.safetensors", rx->partial);
        unlink(p);
        snprintf(p, sizeof(p), "%s/config.json", rx->partial);
        unlink(p);
        rmdir(rx->partial);
    }
    memset(rx, 0, sizeof(*rx));
    rx->fd = -1;
}

static int mkdir_p(const char *dir)
{
    char tmp[1024];
    snprintf(tmp, sizeof(tmp), "%s", dir);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) != 0 && errno != EEXIST) return -1;
            *p = '/';
        }
    return (mkdir(tmp, 0755) == 0 || errno == EEXIST) ? 0 : -1;
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

int slice_rx_handle(struct slice_rx *rx, const char *cache_dir, const uint8_t *data, size_t len, char *err)
{
    struct net_reader r;
    net_reader_init(&r, data, len);
    uint32_t kind = net_reader_get_u32(&r, "kind");
    int rc;
    if (kind == 0) {
        slice_rx_reset(rx);
        char id[40];
        size_t cl = 0;
        net_reader_get_str(&r, id, sizeof(id), "slice_id");
        const char *config = net_reader_get_strn(&r, 1 << 20, &cl, "config");
        uint64_t total = net_reader_get_u64(&r, "bytes");
        if ((rc = net_reader_end(&r, err)) < 0) return rc;
        if (!id[0] || strspn(id, "0123456789abcdef") != strlen(id))
            return err_set(err, ST_EFORMAT, "weights: bad slice id");
        if (total > (1ull << 42)) return err_set(err, ST_EFORMAT, "weights: implausible size");
        if (mkdir_p(cache_dir) < 0) return err_set(err, ST_EIO, "cache %s: %s", cache_dir, strerror(errno));
        snprintf(rx->partial, sizeof(rx->partial), "%s/%s.partial", cache_dir, id);
        snprintf(rx->final, sizeof(rx->final), "%s/%s", cache_dir, id);
        char p[1300];
        if (mkdir(rx->partial, 0755) != 0 && errno != EEXIST)
            return err_set(err, ST_EIO, "%s: %s", rx->partial, strerror(errno));
        snprintf(p, sizeof(p), "%s/config.json", rx->partial);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || write_all(fd, config, cl) < 0) {
            if (fd >= 0) close(fd);
            rc = err_set(err, ST_EIO, "%s: %s", p, strerror(errno));
            slice_rx_reset(rx);
            return rc;
        }
        close(fd);
        snprintf(p, sizeof(p), "%s/model.safetensors", rx->partial);
        rx->fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (rx->fd < 0) {
            rc = err_set(err, ST_EIO, "%s: %s", p, strerror(errno));
            slice_rx_reset(rx);
            return rc;
        }
        rx->expected = total;
        rx->active = true;
        return ST_OK;
    }
    if (!rx->active) return err_set(err, ST_EPROTO, "weights: data without a begin");
    if (kind == 1) {
        size_t n = net_reader_remaining(&r);
        if (rx->received + n > rx->expected) {
            slice_rx_reset(rx);
            return err_set(err, ST_EFORMAT, "weights: more bytes than announced");
        }
        if (write_all(rx->fd, net_reader_get_bytes(&r, n, "bytes"), n) < 0) {
            rc = err_set(err, ST_EIO, "weights: write: %s", strerror(errno));
            slice_rx_reset(rx);
            return rc;
        }
        rx->received += n;
        return ST_OK;
    }
    if (kind == 2) {
        if (rx->received != rx->expected || fsync(rx->fd) != 0) {
            rc = err_set(err, ST_EIO, "weights: %llu of %llu bytes arrived", (unsigned long long)rx->received,
                         (unsigned long long)rx->expected);
            slice_rx_reset(rx);
            return rc;
        }
        close(rx->fd);
        rx->fd = -1;
        if (rename(rx->partial, rx->final) != 0) {
            /* a complete copy is already there (an earlier transfer): keep it, drop this one */
            bool exists = errno == EEXIST || errno == ENOTEMPTY;
            rc = exists ? ST_OK : err_set(err, ST_EIO, "%s: %s", rx->final, strerror(errno));
            slice_rx_reset(rx);
            return rc;
        }
        LOGI("worker", "stored %.1f MiB of weights in %s", rx->received / 1048576.0, rx->final);
        rx->partial[0] = 0; /* renamed: nothing to clean */
        slice_rx_reset(rx);
        return ST_OK;
    }
    slice_rx_reset(rx);
    return err_set(err, ST_EFORMAT, "weights: unknown part %u", kind);
}
