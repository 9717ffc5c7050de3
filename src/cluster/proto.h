/* proto: the cluster's message payloads on the net codec (internal to src/cluster).
 * Every decoder bounds each count by the receiver's limits before using it and fails with ST_EFORMAT naming the
 * field. Hidden states travel as raw little-endian float32 rows (the compute dtype). */
#ifndef STRATA_CLUSTER_PROTO_H
#define STRATA_CLUSTER_PROTO_H

#include "cluster/cluster.h"
#include "net/net.h"

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "hidden states are sent as little-endian float32");

/* A decoded FORWARD (arrays owned by the struct, grown as needed; reuse one across messages). */
struct fwd_msg {
    uint64_t epoch;
    struct step_batch b;
    struct step_row *rows;
    int cap_rows;
    struct step_seq *starts;
    int cap_starts;
    int32_t *frees;
    int cap_frees;
    int32_t *prompts;
    size_t cap_prompts;
    double timings[CLUSTER_MAX_STAGES];
    int n_timings;
    int dim;
    int hidden_rows;
    float *hidden;          /* [hidden_rows][dim], aligned copy */
    size_t cap_hidden;
};
void fwd_msg_free(struct fwd_msg *m);

void proto_put_forward(struct net_buf *out, uint64_t epoch, const struct step_batch *b, const double *timings,
                       int n_timings, const float *hidden, int hidden_rows, int dim);
/* Limits: rows <= max_rows, starts/frees <= max_slots, prompt <= max_ctx, dim must equal dim (0: any). */
int proto_get_forward(const uint8_t *data, size_t len, struct fwd_msg *m, int max_rows, int max_slots, int max_ctx,
                      int dim, char *err);

struct result_msg {
    uint64_t epoch, tag;
    int status;
    char err[ST_ERR_LEN];
    int n_out;
    struct step_out *outs;
    int cap_outs;
    double timings[CLUSTER_MAX_STAGES];
    int n_timings;
};
void result_msg_free(struct result_msg *m);
void proto_put_result(struct net_buf *out, uint64_t epoch, uint64_t tag, int status, const char *err,
                      const struct step_out *outs, int n_out, const double *timings, int n_timings);
int proto_get_result(const uint8_t *data, size_t len, struct result_msg *m, int max_outs, char *err);

void proto_put_load(struct net_buf *out, const struct load_spec *s);
/* s->config_json is malloc'd (free it). */
int proto_get_load(const uint8_t *data, size_t len, struct load_spec *s, char *err);

void proto_put_info(struct net_buf *out, const struct node_info *ni);
int proto_get_info(const uint8_t *data, size_t len, struct node_info *ni, char *err);

/* LOAD_DONE: status, error text, and on success the manifest of what was loaded. */
void proto_put_load_done(struct net_buf *out, int status, const char *err_text, const struct manifest *mf);
int proto_get_load_done(const uint8_t *data, size_t len, int *status, char *err_text, size_t err_cap,
                        struct manifest *mf, char *err);

/* ---- weight slices (slice.c) ---- */
struct slice_rx {
    bool active;
    int fd;
    char partial[1100], final[1100];
    uint64_t expected, received;
};
void slice_rx_init(struct slice_rx *rx);
/* Closes and removes a partial copy; the struct is as after init. */
void slice_rx_reset(struct slice_rx *rx);
/* Handles one WEIGHTS_CHUNK payload. */
int slice_rx_handle(struct slice_rx *rx, const char *cache_dir, const uint8_t *data, size_t len, char *err);
/* Sends the tensors of a layer range from model_dir as a slice. */
int slice_send(struct net_conn *c, const char *model_dir, int layer_begin, int layer_end, bool first, bool last,
               const char *slice_id, int timeout_ms, char *err);

#endif
