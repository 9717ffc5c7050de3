/* libFuzzer target: safetensors_parse on arbitrary bytes taken as a whole file.
 *
 * The bytes are copied into a buffer of exactly their size, so any read past the end is an ASan report. On success
 * every tensor must lie inside the file (or in an aligned copy) with nbytes = shape x dtype size, names must be
 * unique and found by safetensors_find, and every byte is read. On failure the message must name the file.
 *
 * Build with clang -fsanitize=fuzzer,address,undefined -Isrc, this file, the sources of src/core and src/model, and
 * $(pkg-config --cflags --libs jansson libxxhash) -lm -lpthread; then run
 *   ./fuzz_safetensors tests/fuzz/corpus/safetensors
 * Seeds: tools/shapes/make_shape_fixtures.py --fuzz-corpus tests/fuzz/corpus/safetensors */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "model/model.h"

#define FUZZ_PATH "fuzz.safetensors"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static volatile uint8_t sink;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    if (size) memcpy(buf, data, size);
    struct safetensors st;
    memset(&st, 0, sizeof(st));
    char err[ST_ERR_LEN];
    err[0] = 0;
    int rc = safetensors_parse(&st, buf, size, FUZZ_PATH, err);
    if (rc < 0) {
        ST_ASSERT(strstr(err, FUZZ_PATH) != NULL); /* a bad file is named in its error */
    } else {
        ST_ASSERT(rc == 0);
        uint8_t acc = 0;
        for (int i = 0; i < st.n_tensors; i++) {
            const struct st_tensor *t = &st.tensors[i];
            ST_ASSERT(t->name && (int)t->dtype >= 0 && (int)t->dtype < DT_COUNT);
            ST_ASSERT(t->n_dims >= 0 && t->n_dims <= ST_MAX_DIMS);
            uint64_t count = 1;
            for (int d = 0; d < t->n_dims; d++) {
                ST_ASSERT(t->shape[d] >= 0);
                count *= (uint64_t)t->shape[d];
            }
            ST_ASSERT(count * dtype_size(t->dtype) == t->nbytes);
            const uint8_t *p = t->data;
            bool in_file = p >= buf && p <= buf + size && t->nbytes <= (size_t)(buf + size - p);
            bool in_copy = false;
            for (int k = 0; k < st.n_copies; k++) in_copy |= p == st.copies[k];
            ST_ASSERT(in_file || in_copy);
            ST_ASSERT(t->nbytes == 0 || (uintptr_t)p % dtype_size(t->dtype) == 0);
            for (size_t k = 0; k < t->nbytes; k++) acc ^= p[k];
        }
        sink = acc;
        if (safetensors_index(&st, err) == 0) {
            for (int i = 0; i < st.n_tensors; i++) ST_ASSERT(safetensors_find(&st, st.tensors[i].name) == &st.tensors[i]);
        }
    }
    safetensors_free(&st);
    free(buf);
    return 0;
}
