/* cuda_backend: what the CUDA backend offers beyond the ops interface, for tools and tests (C-callable).
 *
 * The backend itself is reached through backend_init(BACKEND_CUDA) (backend.h). These extras let a test or a
 * benchmark switch the execution features off one at a time (each must give bit-identical results), read
 * counters, and measure the device's copy bandwidth for the roofline.
 */
#ifndef STRATA_CUDA_BACKEND_H
#define STRATA_CUDA_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Execution features, all on by default; STRATA_CUDA_GRAPHS=0, STRATA_CUDA_FUSE=0 and STRATA_CUDA_PDL=0 in the
 * environment clear them at backend_init. None changes a result bit. */
enum cuda_flag {
    CUDA_FLAG_GRAPHS = 1, /* replay a forward's kernels as a CUDA graph once the same op sequence repeats */
    CUDA_FLAG_FUSE = 2,   /* fuse norm+matmul, q/k/v, gate/up+SiLU, matmul+residual, q/k norm+rope+KV store */
    CUDA_FLAG_PDL = 4,    /* programmatic dependent launch: a matmul loads its weights while the previous kernel runs */
};

struct cuda_stats {
    uint64_t flushes;        /* op queues executed */
    uint64_t graph_launches; /* of which replayed as a graph */
    uint64_t graph_captures;
    uint64_t kernels;        /* kernels launched eagerly or captured */
};

/* Number of CUDA devices (0 when there is none or no driver). */
int cuda_device_count(void);
/* b must be a CUDA backend. */
void cuda_backend_set_flags(struct backend *b, unsigned flags);
unsigned cuda_backend_get_flags(const struct backend *b);
void cuda_backend_get_stats(const struct backend *b, struct cuda_stats *s);
/* Free and total memory of `device` now. */
int cuda_device_mem(int device, size_t *free_bytes, size_t *total_bytes);
/* Device-to-device copy bandwidth of `device` in bytes/s (bytes read + bytes written), median of `reps` copies of
 * `bytes` timed with events after a warm-up. */
int cuda_copy_bandwidth(int device, size_t bytes, int reps, double *bytes_per_s, char *err);

#ifdef __cplusplus
}
#endif

#endif
