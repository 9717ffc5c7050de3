/* core: errors, logging, assertions, timers, aligned memory, arena, thread pool.
 *
 * Contract:
 * - Library functions report input/environment errors by returning a negative ST_E* code and writing a
 *   one-line message into a caller-owned buffer `char err[ST_ERR_LEN]` (which may be NULL). They never
 *   exit() and never print to stdout.
 * - ST_ASSERT checks invariants in every build and aborts with file and line.
 * - Logging goes to stderr, one line per event, with a level; the level is process-wide.
 * - The thread pool runs a parallel-for over a fixed set of persistent threads; the calling thread takes
 *   part as thread 0. threadpool_run does not allocate and takes no lock on its fast path.
 */
#ifndef STRATA_CORE_H
#define STRATA_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ST_ERR_LEN 512

enum st_status {
    ST_OK = 0,
    ST_EINVAL = -1,       /* bad argument or input */
    ST_EIO = -2,          /* file or socket I/O failed */
    ST_ENOMEM = -3,       /* allocation failed */
    ST_EFORMAT = -4,      /* malformed file or message */
    ST_ETIMEDOUT = -5,    /* a deadline passed */
    ST_ECLOSED = -6,      /* peer closed the connection */
    ST_EPROTO = -7,       /* protocol violation */
    ST_EAUTH = -8,        /* authentication failed */
    ST_ERANGE = -9,       /* value out of range (context overflow, too many tokens) */
    ST_EUNSUPPORTED = -10,/* feature not supported or not compiled in */
    ST_EBUSY = -11,       /* resource busy / queue full */
    ST_ECANCELED = -12,   /* operation canceled */
    ST_EMISMATCH = -13,   /* verification mismatch (weights, versions) */
    ST_ENOTFOUND = -14,   /* named thing does not exist */
};

/* Writes a formatted message into err (if not NULL) and returns code. */
int err_set(char *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Prefixes err (if not NULL) with "prefix: " keeping the existing message. Returns code. */
int err_prefix(char *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
const char *st_strerror(int code);

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR, LOG_OFF, LOG_LEVEL_COUNT };
void log_set_level(enum log_level level);
enum log_level log_get_level(void);
/* Parses "debug"/"info"/"warn"/"error"/"off"; returns -1 when unknown. */
int log_level_parse(const char *s);
void log_msg(enum log_level level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define LOGD(mod, ...) do { if (log_get_level() <= LOG_DEBUG) log_msg(LOG_DEBUG, mod, __VA_ARGS__); } while (0)
#define LOGI(mod, ...) log_msg(LOG_INFO, mod, __VA_ARGS__)
#define LOGW(mod, ...) log_msg(LOG_WARN, mod, __VA_ARGS__)
#define LOGE(mod, ...) log_msg(LOG_ERROR, mod, __VA_ARGS__)

void st_assert_fail(const char *expr, const char *file, int line) __attribute__((noreturn));
#define ST_ASSERT(x) do { if (!(x)) st_assert_fail(#x, __FILE__, __LINE__); } while (0)

#define ST_MIN(a, b) ((a) < (b) ? (a) : (b))
#define ST_MAX(a, b) ((a) > (b) ? (a) : (b))
#define ST_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Monotonic clock. */
uint64_t time_ns(void);
double time_s(void);

/* 64-byte aligned allocation, zeroed. Returns NULL on failure. Free with st_free. */
void *st_alloc(size_t bytes);
void st_free(void *p);
/* Duplicates a string; NULL on failure. */
char *st_strdup(const char *s);

/* Reads a whole file into a NUL-terminated malloc'd buffer (caller frees with free()). */
int file_read_all(const char *path, char **out, size_t *out_len, size_t max_bytes, char *err);
bool file_exists(const char *path);
/* Joins dir and name into out (size n). Returns ST_ERANGE when it does not fit. */
int path_join(char *out, size_t n, const char *dir, const char *name);

/* Seeded xorshift generator for tests and generated weights. */
struct rng { uint64_t s; };
void rng_seed(struct rng *r, uint64_t seed);
uint64_t rng_next(struct rng *r);
/* Uniform in [0, 1). */
double rng_uniform(struct rng *r);
/* Uniform in [lo, hi). */
float rng_range(struct rng *r, float lo, float hi);

/* Arena: bump allocator over one block; everything is freed together. */
struct arena {
    uint8_t *base;
    size_t cap_bytes, used_bytes;
};
int arena_init(struct arena *a, size_t cap_bytes);
void *arena_alloc(struct arena *a, size_t bytes); /* 64-byte aligned; NULL when full */
void arena_reset(struct arena *a);
void arena_free(struct arena *a);

/* Thread pool: parallel-for over n_threads (the caller is thread 0). */
typedef void (*threadpool_fn)(void *arg, int ith, int nth);
struct threadpool;
int threadpool_init(struct threadpool **tp, int n_threads, char *err);
void threadpool_free(struct threadpool *tp);
int threadpool_size(const struct threadpool *tp);
/* Runs fn(arg, i, n) for i in [0, n) on n threads and returns when all are done. Not reentrant:
 * one caller at a time. A NULL pool runs fn(arg, 0, 1) inline. */
void threadpool_run(struct threadpool *tp, threadpool_fn fn, void *arg);
/* Splits [0, n) into nth nearly equal ranges aligned to `align`; writes the ith range. */
void split_range(int64_t n, int ith, int nth, int64_t align, int64_t *begin, int64_t *end);
/* Number of online CPUs (at least 1). */
int cpu_count(void);

#endif
