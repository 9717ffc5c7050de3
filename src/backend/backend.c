/* backend: construction by kind, device strings, CPU feature detection. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"
#include "core/core.h"

int backend_init(struct backend **out, const struct backend_opts *o, char *err)
{
    *out = NULL;
    switch (o->kind) {
    case BACKEND_CPU: return cpu_backend_init(out, o, err);
    case BACKEND_CUDA:
#ifdef STRATA_CUDA
        return cuda_backend_init(out, o, err);
#else
        return err_set(err, ST_EUNSUPPORTED, "this strata was built without CUDA (build where nvcc is installed)");
#endif
    default: return err_set(err, ST_EINVAL, "unknown backend kind %d", (int)o->kind);
    }
}

void backend_free(struct backend *b)
{
    if (b) b->ops->free(b);
}

int backend_parse_device(const char *s, enum backend_kind *kind, int *device, char *err)
{
    *device = 0;
    if (strcmp(s, "cpu") == 0) {
        *kind = BACKEND_CPU;
        return ST_OK;
    }
    if (strncmp(s, "cuda", 4) == 0) {
        *kind = BACKEND_CUDA;
        if (s[4] == 0) return ST_OK;
        if (s[4] == ':') {
            char *end;
            long d = strtol(s + 5, &end, 10);
            if (*end == 0 && end != s + 5 && d >= 0 && d < 64) {
                *device = (int)d;
                return ST_OK;
            }
        }
    }
    return err_set(err, ST_EINVAL, "unknown device \"%s\" (use cpu, cuda or cuda:N)", s);
}

const struct cpu_features *cpu_features_get(void)
{
    static struct cpu_features f;
    static int done;
    if (!done) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_cpu_init();
        f.avx2 = __builtin_cpu_supports("avx2");
        f.fma = __builtin_cpu_supports("fma");
        f.f16c = __builtin_cpu_supports("f16c");
        f.avx512f = __builtin_cpu_supports("avx512f");
        f.avx512bw = __builtin_cpu_supports("avx512bw");
        f.avx512vl = __builtin_cpu_supports("avx512vl");
        f.avx512vnni = __builtin_cpu_supports("avx512vnni");
        f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
        f.avxvnni = __builtin_cpu_supports("avxvnni");
#endif
        done = 1;
    }
    return &f;
}
