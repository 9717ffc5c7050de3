/* placement: which layers each stage holds; node inventory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cluster/cluster.h"
#include "core/core.h"

int placement_auto(int n_layers, int n, const double *weights, struct stage_plan *out, char *err)
{
    if (n < 1 || n > CLUSTER_MAX_STAGES) return err_set(err, ST_EINVAL, "%d stages (1..%d)", n, CLUSTER_MAX_STAGES);
    if (n > n_layers) return err_set(err, ST_EINVAL, "%d stages for %d layers: every stage needs a layer", n, n_layers);
    double total = 0;
    for (int i = 0; i < n; i++) total += weights[i] > 0 ? weights[i] : 0;
    /* largest-remainder rounding of the proportional shares, each at least one layer */
    int given = 0;
    double rem[CLUSTER_MAX_STAGES];
    int cnt[CLUSTER_MAX_STAGES];
    for (int i = 0; i < n; i++) {
        double share = total > 0 ? (weights[i] > 0 ? weights[i] : 0) / total * n_layers : (double)n_layers / n;
        cnt[i] = (int)share;
        if (cnt[i] < 1) cnt[i] = 1;
        rem[i] = share - (int)share;
        given += cnt[i];
    }
    while (given > n_layers) { /* minimums pushed us over: take from the largest */
        int big = 0;
        for (int i = 1; i < n; i++)
            if (cnt[i] > cnt[big]) big = i;
        cnt[big]--;
        given--;
    }
    while (given < n_layers) {
        int best = 0;
        for (int i = 1; i < n; i++)
            if (rem[i] > rem[best]) best = i;
        cnt[best]++;
        rem[best] = -1;
        given++;
    }
    int at = 0;
    for (int i = 0; i < n; i++) {
        out[i].layer_begin = at;
        at += cnt[i];
        out[i].layer_end = at;
    }
    return ST_OK;
}

int placement_parse(const char *spec, int n_layers, int n_expected, struct stage_plan *out, char *err)
{
    int n = 0, at = 0;
    const char *p = spec;
    while (*p) {
        char *end;
        long a = strtol(p, &end, 10);
        if (end == p || *end != '-') return err_set(err, ST_EINVAL, "--layers: expected ranges like 0-13,14-27 at \"%s\"", p);
        p = end + 1;
        long b = strtol(p, &end, 10);
        if (end == p) return err_set(err, ST_EINVAL, "--layers: expected ranges like 0-13,14-27 at \"%s\"", p);
        p = end;
        if (*p == ',') p++;
        else if (*p) return err_set(err, ST_EINVAL, "--layers: unexpected \"%s\"", p);
        if (n == CLUSTER_MAX_STAGES) return err_set(err, ST_EINVAL, "--layers: too many ranges");
        /* inclusive ranges, as written: 0-13 is layers 0..13 */
        if (a != at || b < a || b >= n_layers)
            return err_set(err, ST_EINVAL, "--layers: range %ld-%ld must start at layer %d and end before %d", a, b, at, n_layers);
        out[n].layer_begin = (int)a;
        out[n].layer_end = (int)b + 1;
        at = (int)b + 1;
        n++;
    }
    if (at != n_layers) return err_set(err, ST_EINVAL, "--layers: ranges cover layers 0-%d of %d", at - 1, n_layers);
    if (n != n_expected) return err_set(err, ST_EINVAL, "--layers: %d ranges for %d stages", n, n_expected);
    return ST_OK;
}

uint64_t placement_stage_bytes(const struct model_config *c, size_t bytes_per_layer, int layers, bool first,
                               bool last, int n_slots, int n_ctx)
{
    uint64_t kv = 2ull * sizeof(float) * (uint64_t)layers * (uint64_t)n_slots * (uint64_t)n_ctx *
                  (uint64_t)c->n_kv_heads * (uint64_t)c->head_dim;
    uint64_t emb_bytes = (uint64_t)c->vocab_size * (uint64_t)c->dim * (c->q_bits ? (uint64_t)c->q_bits : 16) / 8;
    uint64_t b = (uint64_t)bytes_per_layer * (uint64_t)layers + kv;
    if (first || (last && c->tie_embeddings)) b += emb_bytes;
    if (last && !c->tie_embeddings) b += emb_bytes;
    return b;
}

static uint64_t meminfo(const char *key)
{
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return 0;
    char line[256];
    uint64_t v = 0;
    size_t kl = strlen(key);
    while (fgets(line, sizeof(line), f)) {
        if (strncmp(line, key, kl) == 0 && line[kl] == ':') {
            v = strtoull(line + kl + 1, NULL, 10) * 1024ull;
            break;
        }
    }
    fclose(f);
    return v;
}

void node_info_local(struct node_info *ni, const char *name, enum backend_kind kind, int device)
{
    memset(ni, 0, sizeof(*ni));
    snprintf(ni->name, sizeof(ni->name), "%s", name ? name : "");
    if (gethostname(ni->host, sizeof(ni->host) - 1) != 0) snprintf(ni->host, sizeof(ni->host), "?");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f) {
        char line[512];
        while (fgets(line, sizeof(line), f)) {
            if (strncmp(line, "model name", 10) == 0) {
                char *c = strchr(line, ':');
                if (c) {
                    c++;
                    while (*c == ' ') c++;
                    c[strcspn(c, "\n")] = 0;
                    snprintf(ni->cpu, sizeof(ni->cpu), "%s", c);
                }
                break;
            }
        }
        fclose(f);
    }
    ni->cores = cpu_count();
    ni->mem_total_bytes = meminfo("MemTotal");
    ni->mem_free_bytes = meminfo("MemAvailable");
    snprintf(ni->version, sizeof(ni->version), "0.1.0");
    snprintf(ni->device, sizeof(ni->device), "cpu");
    if (kind == BACKEND_CUDA) {
        struct backend *b = NULL;
        struct backend_opts bo = {.kind = BACKEND_CUDA, .device = device};
        if (backend_init(&b, &bo, NULL) == 0) {
            snprintf(ni->device, sizeof(ni->device), "%s", b->device_name);
            ni->dev_total_bytes = b->total_mem_bytes;
            ni->dev_free_bytes = b->free_mem_bytes;
            backend_free(b);
        } else {
            snprintf(ni->device, sizeof(ni->device), "cuda:%d (unavailable)", device);
        }
    }
}
