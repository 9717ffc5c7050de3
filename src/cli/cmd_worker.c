/* strata worker: serve a pipeline stage for a coordinator. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cluster/cluster.h"
#include "core/core.h"

static volatile sig_atomic_t g_stop;
static void on_signal(int sig) { g_stop = sig; }

static void usage(FILE *f)
{
    fprintf(f,
            "usage: strata worker [--listen HOST:PORT] [-m MODEL_DIR] [options]\n"
            "\n"
            "Serves one pipeline stage: the coordinator (strata serve --worker HOST:PORT) tells it which layers to\n"
            "load, checks the hashes of what it loaded, and sends it batches.\n"
            "\n"
            "  --listen HOST:PORT     address to listen on (default 127.0.0.1:%d; use 0.0.0.0:PORT for other hosts)\n"
            "  -m, --model DIR        this machine's copy of the model (default: the path the coordinator sends)\n"
            "  --name NAME            node name shown in status (default: host name)\n"
            "  --secret-file FILE     shared cluster secret (or env STRATA_CLUSTER_SECRET); links are then\n"
            "                         authenticated and unauthenticated peers refused\n"
            "  --device D             cpu (default), cuda, cuda:N\n"
            "  --threads N            CPU threads (default: all cores)\n"
            "  --max-memory SIZE      memory this node offers for layers + KV cache (e.g. 8G, 512M; default: what\n"
            "                         the system reports free); the coordinator refuses a plan that does not fit\n"
            "  --cache-dir DIR        where weights sent by the coordinator are kept (default ~/.cache/strata)\n"
            "  --log-level L          debug, info, warn, error\n",
            CLUSTER_DEFAULT_PORT);
}

int cli_read_secret(const char *cmd, const char *file, char **secret, size_t *len)
{
    *secret = NULL;
    *len = 0;
    char err[ST_ERR_LEN];
    if (file) {
        char *s;
        size_t n;
        if (file_read_all(file, &s, &n, 1 << 16, err) < 0) {
            fprintf(stderr, "strata %s: --secret-file: %s\n", cmd, err);
            return -1;
        }
        while (n && (s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = 0;
        if (n == 0) {
            fprintf(stderr, "strata %s: --secret-file %s is empty\n", cmd, file);
            free(s);
            return -1;
        }
        *secret = s;
        *len = n;
        return 0;
    }
    const char *env = getenv("STRATA_CLUSTER_SECRET");
    if (env && *env) {
        *secret = st_strdup(env);
        *len = strlen(env);
    }
    return 0;
}

int cli_host_port(const char *cmd, const char *opt, const char *s, char *host, size_t host_cap, int *port)
{
    const char *colon = strrchr(s, ':');
    long p;
    if (!colon) {
        fprintf(stderr, "strata %s: %s: expected HOST:PORT, got \"%s\"\n", cmd, opt, s);
        return -1;
    }
    if (cli_int(cmd, opt, colon + 1, 0, 65535, &p) < 0) return -1;
    size_t hl = (size_t)(colon - s);
    if (hl >= host_cap) return -1;
    memcpy(host, s, hl);
    host[hl] = 0;
    if (!host[0]) snprintf(host, host_cap, "127.0.0.1");
    *port = (int)p;
    return 0;
}

int cmd_worker(int argc, char **argv)
{
    const char *cmd = "worker", *listen = NULL, *model = NULL, *name = NULL, *secret_file = NULL, *device = "cpu";
    const char *cache_dir = NULL;
    uint64_t max_memory = 0;
    long threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v;
#define VAL() do { if (!(v = cli_value(cmd, argc, argv, &i))) return 2; } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) { usage(stdout); return 0; }
        else if (!strcmp(a, "--listen")) { VAL(); listen = v; }
        else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { VAL(); model = v; }
        else if (!strcmp(a, "--name")) { VAL(); name = v; }
        else if (!strcmp(a, "--secret-file")) { VAL(); secret_file = v; }
        else if (!strcmp(a, "--device")) { VAL(); device = v; }
        else if (!strcmp(a, "--threads")) { VAL(); if (cli_int(cmd, a, v, 0, 4096, &threads)) return 2; }
        else if (!strcmp(a, "--cache-dir")) { VAL(); cache_dir = v; }
        else if (!strcmp(a, "--max-memory")) { VAL(); if (cli_size(cmd, a, v, &max_memory)) return 2; }
        else if (!strcmp(a, "--log-level")) {
            VAL();
            if (log_level_parse(v) < 0) { fprintf(stderr, "strata worker: unknown log level \"%s\"\n", v); return 2; }
            log_set_level((enum log_level)log_level_parse(v));
        }
        else { fprintf(stderr, "strata worker: unknown option \"%s\" (see --help)\n", a); return 2; }
#undef VAL
    }
    char host[256] = "127.0.0.1", err[ST_ERR_LEN];
    int port = CLUSTER_DEFAULT_PORT;
    if (listen && cli_host_port(cmd, "--listen", listen, host, sizeof(host), &port) < 0) return 2;
    char *secret = NULL;
    size_t secret_len = 0;
    if (cli_read_secret(cmd, secret_file, &secret, &secret_len) < 0) return 2;
    struct worker_opts wo = {.host = host, .port = port, .name = name, .model_dir = model, .secret = secret,
                             .secret_bytes = secret_len, .n_threads = (int)threads,
                             .cache_dir = cache_dir, .max_memory_bytes = max_memory};
    if (backend_parse_device(device, &wo.kind, &wo.device, err) < 0) {
        fprintf(stderr, "strata worker: %s\n", err);
        free(secret);
        return 2;
    }
    if (model) {
        char cfg[1200];
        snprintf(cfg, sizeof(cfg), "%s/config.json", model);
        if (!file_exists(cfg)) {
            fprintf(stderr, "strata worker: %s has no config.json\n", model);
            free(secret);
            return 1;
        }
    }
    struct worker *w = NULL;
    if (worker_start(&w, &wo, err) < 0) {
        fprintf(stderr, "strata worker: %s\n", err);
        free(secret);
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    /* a line on stdout for scripts: the actual port (useful with :0) */
    printf("listening %s:%d\n", host, worker_port(w));
    fflush(stdout);
    while (!g_stop) pause();
    LOGI("worker", "stopping (signal %d)", (int)g_stop);
    worker_stop(w);
    free(secret);
    return 0;
}
