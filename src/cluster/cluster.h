/* cluster: pipeline-parallel serving over workers.
 *
 * Topology: the coordinator holds one control connection to every stage (worker). A step batch goes to the first
 * stage (FORWARD: the batch description and, past the first stage, the hidden states as raw float32 rows); each
 * stage runs its layers and forwards the batch description plus its output hidden states to the next stage over
 * a data connection it opened itself; the last stage samples and sends FORWARD_RESULT (token ids and logprobs,
 * never logits) back to the coordinator over its control connection. Several batches may be in flight: each
 * stage handles them in arrival order, so all stages work at once.
 *
 * Weight identity: each worker hashes the tensors it loaded (manifest) and the coordinator compares them with
 * its own; a mismatch refuses the worker with a message naming node, tensor and both hashes.
 *
 * Weights: a worker loads its layers from its own model directory (-m), from the coordinator's path when that
 * exists on the worker (one machine, shared storage), or else from a copy of exactly its slice that the
 * coordinator sends once (WEIGHTS_CHUNK messages) and the worker keeps in its cache directory.
 *
 * Failure: a lost or silent stage (no bytes for dead_ms despite pings) fails the batches in flight with a clear
 * error; the executor reports itself degraded; it keeps trying to reconnect and re-forms the pipeline (reload +
 * re-verify) when every stage answers again.
 *
 * The coordinator can run a stage itself: it then starts an in-process worker on a loopback port and uses it like
 * any other (one code path for every stage).
 */
#ifndef STRATA_CLUSTER_H
#define STRATA_CLUSTER_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "engine/runner.h"
#include "model/model.h"
#include "net/net.h"

#define CLUSTER_MAX_STAGES 64
#define CLUSTER_DEFAULT_PORT 50051

/* What a worker reports about itself (device inventory). */
struct node_info {
    char name[64];
    char host[128];
    char cpu[128];
    int cores;
    uint64_t mem_total_bytes, mem_free_bytes;
    char device[128];          /* "cpu" or GPU name */
    uint64_t dev_total_bytes, dev_free_bytes;
    char version[32];
    bool has_model;            /* started with -m */
    char model_dir[512];
};
/* Fills info about this machine (memory from /proc/meminfo, CPU from /proc/cpuinfo). */
void node_info_local(struct node_info *ni, const char *name, enum backend_kind kind, int device);

/* How a stage gets its weights. */
enum load_source { LOAD_DIR, LOAD_RANDOM, LOAD_SOURCE_COUNT };

struct load_spec {
    enum load_source source;
    char model_dir[512];       /* LOAD_DIR: path on the worker (the worker's own -m wins) */
    char *config_json;         /* LOAD_RANDOM: config.json text (owned) */
    int bits;                  /* LOAD_RANDOM */
    uint64_t seed;             /* LOAD_RANDOM */
    int layer_begin, layer_end;
    bool first, last;
    int n_slots, n_ctx, max_batch, max_logits;
    char device[32];           /* "cpu", "cuda:0" */
    int n_threads;
    char next_host[256];       /* next stage's address (empty for the last stage) */
    int next_port;
    uint64_t epoch;            /* pipeline generation: batches of an older epoch are refused */
    char slice_id[40];         /* LOAD_DIR: id of this stage's weights, for a copy sent by the coordinator */
};

/* ---- placement ---- */
struct stage_plan {
    int layer_begin, layer_end;
};
/* Splits n_layers over n nodes proportionally to weights[] (e.g. free memory), each node at least one layer.
 * Returns ST_EINVAL when n > n_layers. */
int placement_auto(int n_layers, int n, const double *weights, struct stage_plan *out, char *err);
/* Parses "0-13,14-27" into n ranges that must tile [0, n_layers) in order. */
int placement_parse(const char *spec, int n_layers, int n_expected, struct stage_plan *out, char *err);
/* Bytes a stage needs: its weights + KV cache for the engine options (+ embedding / head when first / last). */
uint64_t placement_stage_bytes(const struct model_config *c, size_t bytes_per_layer, int layers, bool first,
                               bool last, int n_slots, int n_ctx);

/* ---- worker ---- */
struct worker_opts {
    const char *host;          /* bind address (default 127.0.0.1) */
    int port;                  /* 0: ephemeral */
    const char *name;
    const char *model_dir;     /* NULL: use the coordinator's path, else a copy of the slice in cache_dir */
    const char *cache_dir;     /* where slices sent by the coordinator are kept (NULL: ~/.cache/strata) */
    uint64_t max_memory_bytes; /* when > 0: report at most this much free memory (placement budget) */
    const void *secret;
    size_t secret_bytes;
    enum backend_kind kind;
    int device;
    int n_threads;
};
struct worker;
/* Binds and starts serving in background threads. */
int worker_start(struct worker **out, const struct worker_opts *o, char *err);
int worker_port(const struct worker *w);
/* Stops and frees (closes every connection). */
void worker_stop(struct worker *w);

/* The id of the weights of a layer range: XXH3-64 over the range's tensor names and hashes and the config hash,
 * as 16 hex digits. Fills *held_mf (when not NULL) with the range's manifest. */
int slice_id_compute(const struct manifest *full, const char *model_dir, int layer_begin, int layer_end, bool first,
                     bool last, char id[40], char *err);

/* ---- coordinator: the pipeline executor ---- */
struct pipeline_opts {
    const char *model_dir;       /* coordinator's copy (manifest, tokenizer); NULL with random weights */
    const struct model_config *cfg;
    const char *random_config_json; /* random weights: config text sent to workers */
    int random_bits;
    uint64_t random_seed;
    int n_workers;
    const char *worker_addr[CLUSTER_MAX_STAGES]; /* "host:port" */
    bool coordinator_stage;      /* run a stage in this process (first in the chain) */
    bool send_weights;           /* never offer our model path: workers without -m get their slice sent */
    const char *layers;          /* manual placement "a-b,c-d,..." or NULL for auto */
    int n_slots, n_ctx, max_batch;
    const char *device;          /* device for every stage (workers may override with their own flags) */
    int n_threads;               /* for the coordinator's own stage */
    const void *secret;
    size_t secret_bytes;
    int connect_timeout_ms;      /* default 5000 */
    int load_timeout_ms;         /* default 600000 */
    int dead_ms;                 /* silent stage declared lost after this (default 3000) */
    int heartbeat_ms;            /* ping idle links this often (default 500) */
};

struct stage_status {
    char addr[160];
    char name[64];
    struct node_info info;
    int layer_begin, layer_end;
    bool connected, verified;
    double last_heard_s;         /* seconds since bytes last came from it */
    double rtt_ms;
    uint64_t bytes_sent, bytes_recv;
    double compute_s;            /* total compute time reported by the stage */
    uint64_t batches;
    char error[256];
};

struct pipeline_status {
    int n_stages;
    struct stage_status st[CLUSTER_MAX_STAGES];
    bool healthy;
    char reason[512];
    uint64_t epoch, reforms, batches_failed;
};

/* Connects, plans, loads and verifies every stage; returns an executor (free with x->ops->free). On a manifest
 * mismatch returns ST_EMISMATCH with "node NAME (ADDR): tensor T: H1 (node) != H2 (coordinator)". */
int pipeline_init(struct executor **out, const struct pipeline_opts *o, const struct manifest *mf, char *err);
void pipeline_get_status(struct executor *x, struct pipeline_status *st);

#endif
