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

/* Execution features. Default: CUDA_FLAG_DEFAULT (every one but MMV2: the streaming matmul measured slower than the
 * first one on H100, docs/cuda.md). STRATA_CUDA_<NAME>=0 or =1 in the environment clears or sets one at
 * backend_init (GRAPHS, FUSE, PDL, MMV2, ATTNV2, DLPIPE, MMTMA); cuda_backend_set_flags() at any time.
 * None changes a result bit (tests/test_cuda.c holds every combination to the plain run). */
enum cuda_flag {
    CUDA_FLAG_GRAPHS = 1, /* replay a forward's kernels as a CUDA graph once the same op sequence repeats */
    CUDA_FLAG_FUSE = 2,   /* fuse norm+matmul, q/k/v, gate/up+SiLU, matmul+residual, q/k norm+rope+KV store */
    CUDA_FLAG_PDL = 4,    /* programmatic dependent launch: a matmul loads its weights while the previous kernel runs */
    CUDA_FLAG_MMV2 = 8,   /* the streaming matmul: grid capped near the SM count, each warp prefetching its next item */
    CUDA_FLAG_ATTNV2 = 16, /* q/k post-processing in registers; attention staging K/V tiles with cp.async */
    CUDA_FLAG_DLPIPE = 32, /* large downloads to pageable memory through pinned buffers, copied out by several threads */
    CUDA_FLAG_MMTMA = 64,  /* streaming matmul: weights by bulk copy (TMA) into shared memory, not the register ring */
    CUDA_FLAG_ALL = 127,
    CUDA_FLAG_DEFAULT = CUDA_FLAG_ALL & ~CUDA_FLAG_MMV2,
};

struct cuda_stats {
    uint64_t flushes;        /* op queues executed */
    uint64_t graph_launches; /* of which replayed as a graph */
    uint64_t graph_captures;
    uint64_t kernels;        /* kernels launched eagerly or captured */
};

/* Per-kernel profile (cuda_backend_profile): one row per distinct kernel configuration. */
struct cuda_prof_row {
    char name[112];
    double ms;      /* total time */
    uint64_t count; /* launches */
};

/* Number of CUDA devices (0 when there is none or no driver). */
int cuda_device_count(void);
/* b must be a CUDA backend. */
void cuda_backend_set_flags(struct backend *b, unsigned flags);
unsigned cuda_backend_get_flags(const struct backend *b);
void cuda_backend_get_stats(const struct backend *b, struct cuda_stats *s);
/* The streaming matmul's schedule. blocks_per_sm: at most that many blocks per SM; 0: one block per tile group
 * (no cap); -1 (auto): 2 for matrices of at least 8 tile groups per SM (the head), else 1. grid_max > 0: at most
 * that many blocks (tests use it to force every block through several tile groups). tiles_per_group: tiles that
 * share x in one block (0: auto: 4 for batches of more than 8 rows on matrices of 8+ tiles per SM, else 1). Defaults: STRATA_CUDA_MM_BPS (auto),
 * no grid_max, STRATA_CUDA_MM_TB (auto). Changes no result bit. */
void cuda_backend_set_mm_schedule(struct backend *b, int blocks_per_sm, int grid_max, int tiles_per_group);
/* Profiling. mode 1: every kernel runs eagerly without PDL between two events and its time is added to the row
 * of its configuration (op, weight shape, batch); mode 2: kernels run as configured (graphs, PDL) and the device
 * time of each queue (first kernel start to last kernel end) is added to the row "queue (device span)". mode 0
 * stops. Starting clears the rows. */
int cuda_backend_profile(struct backend *b, int mode);
/* Rows sorted by time, most first; returns how many were written (at most max). */
int cuda_backend_profile_rows(const struct backend *b, struct cuda_prof_row *rows, int max);
/* Brackets for an external profiler (ncu --profile-from-start off). */
void cuda_profiler_range(int start);

/* Free and total memory of `device` now. */
int cuda_device_mem(int device, size_t *free_bytes, size_t *total_bytes);
/* Device-to-device copy bandwidth of `device` in bytes/s (bytes read + bytes written), median of `reps` copies of
 * `bytes` timed with events after a warm-up. */
int cuda_copy_bandwidth(int device, size_t bytes, int reps, double *bytes_per_s, char *err);

/* ---- decode/prefill benchmark of one model on one GPU (cuda_bench.c; tools/cuda_bench and `strata bench
 * --device cuda` print it). Compiled in every build; without CUDA, cuda_bench_run returns ST_EUNSUPPORTED. ---- */
#define CUDA_BENCH_MAX_B 8
#define CUDA_BENCH_MAX_VAR 20
#define CUDA_BENCH_PROF_ROWS 14

struct cuda_bench_opts {
    int device;
    int ctx;      /* positions per slot (default 1024) */
    int prompt;   /* tokens prefilled in every slot before decoding (default 128) */
    int gen;      /* timed decode steps per figure (default 64), after 4 warm-up steps (they capture the graphs) */
    int prefill;  /* prefill chunk to time, tokens (default 512; 0: none); 128-token chunks are timed too */
    int batches[CUDA_BENCH_MAX_B], n_batches; /* decode batch sizes (default 1, 8, 32) */
    int variants; /* also time batch 1 and the largest batch with features switched off one at a time */
    int profile;  /* per-kernel profile (eager, events) of batch 1 and the largest batch, current and v1 kernels */
};

struct cuda_bench_variant {
    char name[64];
    unsigned flags;
    int mm_bps, mm_tb; /* cuda_backend_set_mm_schedule */
    double step_s[2]; /* batch 1, largest batch */
};

struct cuda_bench_profile {
    char what[64];
    int batch, n_rows;
    double steps;                                 /* decode steps the rows add up */
    double total_ms;                              /* every kernel of those steps */
    struct cuda_prof_row rows[CUDA_BENCH_PROF_ROWS];
};

struct cuda_bench_result {
    char device[128];
    double copy_bw;          /* bytes/s, device to device, read + write (median of 21 copies of 1 GiB) */
    size_t weight_bytes;     /* weights read per decode step */
    double load_s;           /* engine_init: upload and repack of the weights */
    int n_batches, batches[CUDA_BENCH_MAX_B];
    double kv_bytes[CUDA_BENCH_MAX_B];  /* K and V one sequence reads per step (middle of the timed steps) */
    double step_s[CUDA_BENCH_MAX_B];    /* median host time of engine_forward, logits in host memory */
    double span_s[CUDA_BENCH_MAX_B];    /* median device time of the step's kernels (first start to last end) */
    double tok_s[CUDA_BENCH_MAX_B];
    double frac[CUDA_BENCH_MAX_B];      /* (weights + batch * kv) / step / copy_bw */
    int prefill_len[2];
    double prefill_tok_s[2];
    int n_variants;
    struct cuda_bench_variant var[CUDA_BENCH_MAX_VAR];
    int n_profiles;
    struct cuda_bench_profile prof[4];
};

void cuda_bench_opts_default(struct cuda_bench_opts *o);
/* Runs the benchmark on m (loaded or generated; borrowed). Creates and frees its own engine. */
int cuda_bench_run(struct model *m, const struct cuda_bench_opts *o, struct cuda_bench_result *r, char *err);
/* The result as markdown tables plus "SUMMARY key=value" lines, into buf (truncated to n bytes). */
void cuda_bench_format(const struct cuda_bench_result *r, char *buf, size_t n);

#ifdef __cplusplus
}
#endif

#endif
