/* core: errors, logging, timers, memory, files, rng, arena. */
#include "core.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int err_set(char *err, int code, const char *fmt, ...)
{
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, ST_ERR_LEN, fmt, ap);
        va_end(ap);
    }
    return code;
}

int err_prefix(char *err, int code, const char *fmt, ...)
{
    if (err) {
        char old[ST_ERR_LEN];
        snprintf(old, sizeof(old), "%s", err);
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(err, ST_ERR_LEN, fmt, ap);
        va_end(ap);
        if (n >= 0 && n < ST_ERR_LEN - 2) {
            size_t used = (size_t)n;
            err[used++] = ':';
            err[used++] = ' ';
            size_t room = ST_ERR_LEN - used - 1, len = strlen(old);
            if (len > room) len = room;
            memcpy(err + used, old, len);
            err[used + len] = 0;
        }
    }
    return code;
}

const char *st_strerror(int code)
{
    switch (code) {
    case ST_OK: return "ok";
    case ST_EINVAL: return "invalid argument";
    case ST_EIO: return "I/O error";
    case ST_ENOMEM: return "out of memory";
    case ST_EFORMAT: return "malformed data";
    case ST_ETIMEDOUT: return "timed out";
    case ST_ECLOSED: return "connection closed";
    case ST_EPROTO: return "protocol error";
    case ST_EAUTH: return "authentication failed";
    case ST_ERANGE: return "out of range";
    case ST_EUNSUPPORTED: return "not supported";
    case ST_EBUSY: return "busy";
    case ST_ECANCELED: return "canceled";
    case ST_EMISMATCH: return "mismatch";
    case ST_ENOTFOUND: return "not found";
    default: return "unknown error";
    }
}

static _Atomic int g_log_level = LOG_INFO;
static pthread_mutex_t g_log_lock = PTHREAD_MUTEX_INITIALIZER;

void log_set_level(enum log_level level) { atomic_store(&g_log_level, (int)level); }
enum log_level log_get_level(void) { return (enum log_level)atomic_load(&g_log_level); }

int log_level_parse(const char *s)
{
    static const char *names[] = {"debug", "info", "warn", "error", "off"};
    for (int i = 0; i < (int)ST_ARRAY_LEN(names); i++)
        if (strcmp(s, names[i]) == 0) return i;
    return -1;
}

void log_msg(enum log_level level, const char *module, const char *fmt, ...)
{
    if ((int)level < atomic_load(&g_log_level)) return;
    static const char *tags[] = {"DEBUG", "INFO", "WARN", "ERROR", "OFF"};
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof(line), "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ %-5s [%s] ", tm.tm_year + 1900,
                     tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                     tags[level], module ? module : "-");
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && n < (int)sizeof(line)) vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&g_log_lock);
    fprintf(stderr, "%s\n", line);
    pthread_mutex_unlock(&g_log_lock);
}

void st_assert_fail(const char *expr, const char *file, int line)
{
    fprintf(stderr, "strata: assertion failed: %s (%s:%d)\n", expr, file, line);
    abort();
}

uint64_t time_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

double time_s(void) { return (double)time_ns() * 1e-9; }

void *st_alloc(size_t bytes)
{
    void *p = NULL;
    size_t n = (bytes + 63) & ~(size_t)63;
    if (n == 0) n = 64;
    if (posix_memalign(&p, 64, n) != 0) return NULL;
    memset(p, 0, n);
    return p;
}

void st_free(void *p) { free(p); }

char *st_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int file_read_all(const char *path, char **out, size_t *out_len, size_t max_bytes, char *err)
{
    *out = NULL;
    if (out_len) *out_len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return err_set(err, ST_EIO, "%s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return err_set(err, ST_EIO, "%s: not a regular file", path);
    }
    if ((uint64_t)sb.st_size > max_bytes) {
        close(fd);
        return err_set(err, ST_ERANGE, "%s: file is %lld bytes, over the %zu byte limit", path,
                       (long long)sb.st_size, max_bytes);
    }
    size_t n = (size_t)sb.st_size;
    char *buf = malloc(n + 1);
    if (!buf) {
        close(fd);
        return err_set(err, ST_ENOMEM, "%s: cannot allocate %zu bytes", path, n + 1);
    }
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            free(buf);
            close(fd);
            return err_set(err, ST_EIO, "%s: short read", path);
        }
        got += (size_t)r;
    }
    close(fd);
    buf[n] = 0;
    *out = buf;
    if (out_len) *out_len = n;
    return ST_OK;
}

bool file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

int path_join(char *out, size_t n, const char *dir, const char *name)
{
    int r = snprintf(out, n, "%s/%s", dir, name);
    return (r < 0 || (size_t)r >= n) ? ST_ERANGE : ST_OK;
}

void rng_seed(struct rng *r, uint64_t seed)
{
    /* splitmix64 so that small seeds give well-mixed states; never zero */
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    r->s = z ? z : 0x2545F4914F6CDD1Dull;
}

uint64_t rng_next(struct rng *r)
{
    uint64_t x = r->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

double rng_uniform(struct rng *r) { return (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0); }

float rng_range(struct rng *r, float lo, float hi) { return lo + (hi - lo) * (float)rng_uniform(r); }

int arena_init(struct arena *a, size_t cap_bytes)
{
    a->base = st_alloc(cap_bytes);
    a->cap_bytes = a->base ? cap_bytes : 0;
    a->used_bytes = 0;
    return a->base ? ST_OK : ST_ENOMEM;
}

void *arena_alloc(struct arena *a, size_t bytes)
{
    size_t n = (bytes + 63) & ~(size_t)63;
    if (a->used_bytes + n > a->cap_bytes) return NULL;
    void *p = a->base + a->used_bytes;
    a->used_bytes += n;
    return p;
}

void arena_reset(struct arena *a) { a->used_bytes = 0; }

void arena_free(struct arena *a)
{
    st_free(a->base);
    a->base = NULL;
    a->cap_bytes = a->used_bytes = 0;
}

void split_range(int64_t n, int ith, int nth, int64_t align, int64_t *begin, int64_t *end)
{
    if (align < 1) align = 1;
    int64_t blocks = (n + align - 1) / align;
    int64_t per = blocks / nth, rem = blocks % nth;
    int64_t b0 = ith * per + (ith < rem ? ith : rem);
    int64_t b1 = b0 + per + (ith < rem ? 1 : 0);
    *begin = ST_MIN(b0 * align, n);
    *end = ST_MIN(b1 * align, n);
}

int cpu_count(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}
