/* model: config.json, safetensors (mmap, one file or shards), dtypes, MLX affine-quantized tensors, the weights
 * of a layer range, generated (random) weights, and the weight manifest.
 *
 * Contract:
 * - Everything read from disk is validated before use: header length, JSON, dtype, shape, offsets (overflow
 *   checked), overlap, file size. A bad file gives an error naming the file and the problem.
 * - Tensors point into read-only mmaps (weights are never copied unless misaligned); model_free unmaps.
 * - A model holds the weights of layers [layer_begin, layer_end) plus the embedding (first stage, or when the
 *   embedding is tied to the output) and the final norm / lm_head (last stage).
 * - The manifest hashes (XXH3-128) exactly the bytes of each tensor a node uses, plus config.json and
 *   tokenizer.json, so two nodes holding different bytes never agree.
 */
#ifndef STRATA_MODEL_H
#define STRATA_MODEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum dtype {
    DT_F32, DT_F16, DT_BF16, DT_F64, DT_I8, DT_U8, DT_I16, DT_U16, DT_I32, DT_U32, DT_I64, DT_U64, DT_BOOL,
    DT_COUNT
};
const char *dtype_name(enum dtype t);           /* "F32", ... (safetensors spelling) */
int dtype_parse(const char *s);                 /* -1 when unknown */
size_t dtype_size(enum dtype t);

static inline float bf16_to_f32(uint16_t h)
{
    union { uint32_t u; float f; } v = {.u = (uint32_t)h << 16};
    return v.f;
}
/* Round to nearest even (NaN stays NaN). */
static inline uint16_t f32_to_bf16(float f)
{
    union { uint32_t u; float f; } v = {.f = f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}
float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

/* ---- config.json ---- */
enum model_arch { ARCH_LLAMA, ARCH_QWEN2, ARCH_QWEN3, ARCH_COUNT };
enum rope_type { ROPE_DEFAULT, ROPE_LINEAR, ROPE_LLAMA3, ROPE_COUNT };

#define MODEL_MAX_EOS 8

struct model_config {
    enum model_arch arch;
    char model_type[32];
    int dim;          /* hidden_size */
    int hidden_dim;   /* intermediate_size */
    int n_layers;
    int n_heads;
    int n_kv_heads;
    int head_dim;
    int vocab_size;
    int max_seq_len;  /* max_position_embeddings */
    float norm_eps;
    double rope_theta;
    enum rope_type rope_type;
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_orig_max_pos;
    bool tie_embeddings;
    bool qk_norm;     /* Qwen3 */
    bool attn_bias;   /* q/k/v biases (Qwen2 always; Llama/Qwen3 with attention_bias) */
    bool o_bias;      /* o_proj bias (Llama/Qwen3 attention_bias) */
    bool mlp_bias;    /* gate/up/down biases (mlp_bias) */
    enum dtype dtype; /* torch_dtype / dtype of unquantized tensors */
    int q_bits, q_group_size; /* 0 when not quantized */
    int32_t bos_id;   /* -1 when absent */
    int32_t eos_ids[MODEL_MAX_EOS];
    int n_eos;
};

/* Parses config.json text (both the classic rope_theta/rope_scaling/torch_dtype form and the newer
 * rope_parameters/dtype form). */
int model_config_parse(struct model_config *c, const char *json, size_t len, char *err);
/* Reads dir/config.json and, if present, adds dir/generation_config.json's eos ids. */
int model_config_load(struct model_config *c, const char *dir, char *err);
const char *model_arch_name(enum model_arch a);

/* ---- safetensors ---- */
#define ST_MAX_DIMS 4

struct st_tensor {
    char *name;
    enum dtype dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
    const void *data;  /* into the mmap (or an aligned copy when misaligned) */
    size_t nbytes;
    int file;          /* index into safetensors.files */
};

struct st_file {
    char *path;
    void *map;
    size_t size;
};

struct safetensors {
    struct st_file *files;
    int n_files;
    struct st_tensor *tensors;
    int n_tensors;
    int *hash;         /* open addressing over tensor indices, -1 empty */
    int hash_cap;
    void **copies;     /* aligned copies of misaligned tensors */
    int n_copies;
};

/* Opens dir/model.safetensors, or the shards listed by dir/model.safetensors.index.json. */
int safetensors_open(struct safetensors *st, const char *dir, char *err);
/* Opens one file. */
int safetensors_open_file(struct safetensors *st, const char *path, char *err);
/* Parses a header (8-byte length + JSON) from memory describing a file of file_size bytes (exposed for fuzzing). */
int safetensors_parse(struct safetensors *st, const uint8_t *buf, size_t file_size, const char *path, char *err);
const struct st_tensor *safetensors_find(const struct safetensors *st, const char *name);
/* (Re)builds the name lookup after tensors were added to st->tensors by hand (generated weights). */
int safetensors_index(struct safetensors *st, char *err);
void safetensors_free(struct safetensors *st);

/* A safetensors writer: tensors are added in memory order and written with a sorted JSON header. */
struct st_writer_entry {
    char *name;
    enum dtype dtype;
    int n_dims;
    int64_t shape[ST_MAX_DIMS];
    const void *data;
    size_t nbytes;
};
/* Encodes the file header (8-byte length + JSON, padded to 8 bytes) for entries laid out in name order; *order
 * (malloc'd, may be NULL) gets that order, which the data must follow. *out is malloc'd. */
int safetensors_header_encode(const struct st_writer_entry *entries, int n, const char *metadata_json,
                              const struct st_writer_entry ***order, uint8_t **out, size_t *out_len, char *err);
int safetensors_write(const char *path, const struct st_writer_entry *entries, int n, const char *metadata_json,
                      char *err);

/* ---- weights ---- */
enum wtype { WT_F32, WT_F16, WT_BF16, WT_Q8, WT_Q4, WT_COUNT };
const char *wtype_name(enum wtype t);

/* A weight matrix [rows][cols] (out x in, as stored by HF). Quantized (MLX affine): data holds rows x
 * cols*bits/32 uint32 words, codes low bits first; scales/biases [rows][cols/group_size] in sdtype (BF16, F16
 * or F32); w = scale * q + bias. */
struct weight {
    enum wtype type;
    int64_t rows, cols;
    const void *data;
    const void *scales, *biases;
    enum dtype sdtype;
    int group_size;
    const char *name;
};
size_t weight_bytes(const struct weight *w); /* bytes read when multiplying by it once */
/* Dequantizes/converts row r into out[cols] (float32). */
void weight_row_f32(const struct weight *w, int64_t r, float *out);

/* A tensor as stored (file bytes or generated bytes), for hashing. */
struct model_tensor {
    char *name;
    const void *data;
    size_t nbytes;
};

/* Vectors (norm weights, biases) are converted to float32 at load. */
struct layer_weights {
    float *attn_norm;         /* [dim] */
    float *ffn_norm;          /* [dim] */
    float *q_norm, *k_norm;   /* [head_dim] (Qwen3) or NULL */
    float *bq, *bk, *bv;      /* [n_heads*head_dim], [n_kv*head_dim] (attention bias) or NULL */
    float *bo;                /* [dim] or NULL */
    float *b_gate, *b_up;     /* [hidden] or NULL */
    float *b_down;            /* [dim] or NULL */
    struct weight wq;         /* [n_heads*head_dim][dim] */
    struct weight wk, wv;     /* [n_kv_heads*head_dim][dim] */
    struct weight wo;         /* [dim][n_heads*head_dim] */
    struct weight w_gate, w_up; /* [hidden][dim] */
    struct weight w_down;     /* [dim][hidden] */
};

struct model {
    struct model_config cfg;
    char dir[1024];           /* "" for generated weights */
    struct safetensors st;
    int layer_begin, layer_end;
    bool has_embed, has_head;
    struct weight embed;      /* [vocab][dim] */
    struct weight lm_head;    /* [vocab][dim]; same as embed when tied */
    float *final_norm;        /* [dim] */
    struct layer_weights *layers; /* [layer_end - layer_begin] */
    struct model_tensor *held;    /* every tensor this model uses, as stored (for the manifest) */
    int n_held, cap_held;
    void **allocs;                /* owned buffers: generated weights, converted vectors */
    int n_allocs, cap_allocs;
};

/* Loads the weights of layers [layer_begin, layer_end) (layer_end = -1: to the last layer). with_embed /
 * with_head select the first-stage and last-stage tensors. */
int model_load(struct model *m, const char *dir, int layer_begin, int layer_end, bool with_embed, bool with_head,
               char *err);
/* Generated weights for a config: bits 0 (bf16), 4 or 8 (MLX affine, group 64), values from a seeded
 * generator so that every node given the same (config, bits, seed) holds the same bytes. */
int model_init_random(struct model *m, const struct model_config *cfg, int bits, uint64_t seed, int layer_begin,
                      int layer_end, bool with_embed, bool with_head, char *err);
void model_free(struct model *m);
/* Bytes of weights read per decoded token (all matrices once, lm_head included, one embedding row). */
size_t model_bytes_per_token(const struct model *m);

/* ---- manifest ---- */
struct manifest_entry {
    char *name;
    uint64_t hash_hi, hash_lo; /* XXH3-128 of the tensor's bytes */
    size_t nbytes;
};
struct manifest {
    struct manifest_entry *entries; /* sorted by name */
    int n;
    uint64_t config_hi, config_lo;       /* XXH3-128 of config.json (0 when none) */
    uint64_t tokenizer_hi, tokenizer_lo; /* XXH3-128 of tokenizer.json (0 when none) */
};
/* Hashes every tensor the model holds (scales and biases are entries of their own). */
int manifest_build(struct manifest *mf, const struct model *m, char *err);
/* The manifest of the whole generated model (model_init_random with the same arguments), built one layer at a
 * time so that memory stays near one layer. */
int manifest_build_random(struct manifest *mf, const struct model_config *cfg, int bits, uint64_t seed, char *err);
/* Writes JSON text into a malloc'd string. */
char *manifest_to_json(const struct manifest *mf);
/* Compares `got` (a node's) against `want` (the coordinator's) for the tensors got has; on a mismatch writes
 * "tensor NAME: HASH (node) != HASH (coordinator)" into err and returns ST_EMISMATCH. */
int manifest_compare(const struct manifest *want, const struct manifest *got, char *err);
void manifest_free(struct manifest *mf);

#endif
