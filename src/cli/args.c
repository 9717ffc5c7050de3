/* cli argument helpers. */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "core/core.h"

int cli_int(const char *cmd, const char *opt, const char *s, long lo, long hi, long *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "strata %s: %s: expected an integer in [%ld, %ld], got \"%s\"\n", cmd, opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_float(const char *cmd, const char *opt, const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "strata %s: %s: expected a number in [%g, %g], got \"%s\"\n", cmd, opt, lo, hi, s);
        return -1;
    }
    *out = v;
    return 0;
}

int cli_size(const char *cmd, const char *opt, const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mul = 1;
    if (*end == 'K' || *end == 'k') mul = 1024.0;
    else if (*end == 'M' || *end == 'm') mul = 1048576.0;
    else if (*end == 'G' || *end == 'g') mul = 1073741824.0;
    else if (*end == 'T' || *end == 't') mul = 1099511627776.0;
    if (mul != 1) end++;
    if (*end == 'B' || *end == 'b') end++;
    if (errno || end == s || *end || !(v >= 0) || v * mul > 9.0e18) {
        fprintf(stderr, "strata %s: %s: expected a size like 512M or 8G, got \"%s\"\n", cmd, opt, s);
        return -1;
    }
    *out = (uint64_t)(v * mul);
    return 0;
}

int cli_ids(const char *cmd, const char *opt, const char *s, int32_t **ids, int *n)
{
    *ids = NULL;
    *n = 0;
    size_t cap = 16;
    int32_t *a = malloc(sizeof(int32_t) * cap);
    if (!a) return -1;
    const char *p = s;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '[' || *p == ']' || *p == '\n') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno || end == p || v < 0 || v > INT32_MAX) {
            fprintf(stderr, "strata %s: %s: bad token id list near \"%.20s\"\n", cmd, opt, p);
            free(a);
            return -1;
        }
        if ((size_t)*n == cap) {
            cap *= 2;
            int32_t *b = realloc(a, sizeof(int32_t) * cap);
            if (!b) {
                free(a);
                return -1;
            }
            a = b;
        }
        a[(*n)++] = (int32_t)v;
        p = end;
    }
    *ids = a;
    return 0;
}

const char *cli_value(const char *cmd, int argc, char **argv, int *i)
{
    if (*i + 1 >= argc) {
        fprintf(stderr, "strata %s: %s needs a value\n", cmd, argv[*i]);
        return NULL;
    }
    return argv[++*i];
}

const char *cli_default_model(void)
{
    static char found[1200];
    if (found[0]) return found;
    const char *rel = "models/kjv-qwen3-21m-8bit";
    char cand[1200], exe[1024];
    snprintf(cand, sizeof(cand), "%s/config.json", rel);
    if (file_exists(cand)) {
        snprintf(found, sizeof(found), "%s", rel);
        return found;
    }
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        exe[n] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) *slash = 0;
        const char *ups[] = {"..", "../share/strata"};
        for (size_t i = 0; i < ST_ARRAY_LEN(ups); i++) {
            snprintf(cand, sizeof(cand), "%s/%s/%s/config.json", exe, ups[i], rel);
            if (file_exists(cand)) {
                snprintf(found, sizeof(found), "%s/%s/%s", exe, ups[i], rel);
                return found;
            }
        }
    }
    snprintf(found, sizeof(found), "/usr/local/share/strata/%s", rel);
    return found;
}
