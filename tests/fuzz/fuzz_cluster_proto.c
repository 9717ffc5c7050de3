/* Fuzz target: the cluster's message decoders (FORWARD, FORWARD_RESULT, LOAD, INFO, LOAD_DONE, a weights slice)
 * on arbitrary payloads, as a worker or coordinator receives them after authentication. The first byte picks
 * the decoder; limits are those of a small engine. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/proto.h"
#include "core/core.h"

static char dir[64];

static void remove_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    if (system(cmd) != 0) return;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) return 0;
    char err[ST_ERR_LEN];
    const uint8_t *p = data + 1;
    size_t n = size - 1;
    switch (data[0] % 6) {
    case 0: {
        struct fwd_msg m = {0};
        if (proto_get_forward(p, n, &m, 64, 8, 512, 16, err) == 0) {
            /* everything decoded must be inside the limits the caller gave */
            if (m.b.n_rows > 64 || m.b.n_start > 8 || m.b.n_free > 8) abort();
            for (int i = 0; i < m.b.n_start; i++)
                if (m.b.starts[i].n_prompt > 512) abort();
            if (m.hidden_rows && (size_t)m.hidden_rows * 16 * sizeof(float) > n) abort();
        }
        fwd_msg_free(&m);
        break;
    }
    case 1: {
        struct result_msg m = {0};
        if (proto_get_result(p, n, &m, 8, err) == 0 && m.n_out > 8) abort();
        result_msg_free(&m);
        break;
    }
    case 2: {
        struct load_spec s;
        if (proto_get_load(p, n, &s, err) == 0) free(s.config_json);
        break;
    }
    case 3: {
        struct node_info ni;
        (void)proto_get_info(p, n, &ni, err);
        break;
    }
    case 4: {
        int status;
        char text[ST_ERR_LEN];
        struct manifest mf;
        if (proto_get_load_done(p, n, &status, text, sizeof(text), &mf, err) == 0) manifest_free(&mf);
        break;
    }
    default: {
        /* a weights stream into a scratch cache: begin/data/end parts in any order */
        if (!dir[0]) {
            snprintf(dir, sizeof(dir), "/tmp/strata-fuzz-slice-%d", (int)getpid());
            atexit(remove_dir);
        }
        struct slice_rx rx;
        slice_rx_init(&rx);
        size_t off = 0;
        while (off + 2 <= n) {
            size_t len = p[off] % 64;
            off++;
            if (off + len > n) len = n - off;
            (void)slice_rx_handle(&rx, dir, p + off, len, err);
            off += len;
        }
        slice_rx_reset(&rx);
        break;
    }
    }
    return 0;
}
