/* quantize: MLX affine quantization of weights, and `strata convert` (Hugging Face safetensors -> MLX 8/4-bit).
 *
 * Contract:
 * - mlx_quantize_rows gives exactly the codes, scales and biases of MLX's affine quantizer (its CPU path), bit for
 *   bit. Per group of group_size values along a row, in float32:
 *       w_min, w_max; scale = max((w_max - w_min) / (2^bits - 1), 1e-7)
 *       |w_min| > |w_max|: edge = w_min, else scale = -scale, edge = w_max
 *       q0 = rint(edge / scale); q0 != 0: scale = edge / q0, bias = edge; else bias = 0
 *       q = clamp(rint((w - bias) / scale), 0, 2^bits - 1)   (with the float32 scale/bias, before storage rounding)
 *   then scale and bias are stored in the scales dtype (bf16/f16 round to nearest even; f32 as is); w ~ scale*q + bias.
 *   Codes are packed into uint32 words, low bits first (8-bit: 4 codes a word, 4-bit: 8 codes a word).
 *   rint rounds half to even. A non-finite weight is rejected (MLX would store garbage).
 * - model_convert reads a model directory (config.json + model.safetensors, or shards listed by
 *   model.safetensors.index.json; weights bf16, f16 or f32) and writes an MLX quantized one:
 *   - quantized: every 2-D float tensor named "*.weight" whose last dim (the input dim) is a non-zero multiple of
 *     the group size: Linear and Embedding weights (embed_tokens, lm_head when untied), as mlx_lm's convert does.
 *     It becomes NAME.weight (U32 [rows, cols*bits/32]), NAME.scales and NAME.biases ([rows, cols/group_size], in
 *     the weight's own dtype, as MLX gives). Everything else (norms, biases, 2-D weights whose last dim is not a
 *     multiple of the group size: MLX's nn.quantize skips those) is copied byte for byte.
 *   - output: one model.safetensors with keys sorted and no metadata, like the project's fixtures; when the output
 *     is over max_shard_bytes (default 5 GB, mlx_lm's limit), shards model-0000i-of-0000n.safetensors (tensors in
 *     name order, a new shard when the next tensor would pass the limit) plus model.safetensors.index.json
 *     ({"metadata": {"total_size": N}, "weight_map": {...}}).
 *   - config.json: the input's text with "quantization" and "quantization_config" ({"group_size": G, "bits": B})
 *     appended (every other byte kept). Other top-level files (tokenizer.json, tokenizer_config.json,
 *     generation_config.json, ...) are copied; other weight formats (*.bin, *.pt, *.pth, *.gguf, ...), hidden files
 *     and folders are not.
 *   - an input that is already quantized (config "quantization"/"quantization_config", or tensors with .scales) is
 *     rejected, as is out_dir == in_dir, and an out_dir that already holds a model unless overwrite is set.
 *   - streaming: tensors are quantized in chunks of rows on the thread pool and written in place (pwrite at
 *     offsets known from the header), so memory stays at one chunk besides the input's mmap; every file is
 *     written to NAME.tmp, fsynced and renamed, config.json last.
 */
#ifndef STRATA_QUANTIZE_H
#define STRATA_QUANTIZE_H

#include <stdbool.h>
#include <stdint.h>

#include "model/model.h"

#define MLX_MAX_GROUP_SIZE 128

/* ST_OK when bits (4 or 8) and group_size (32, 64 or 128) are supported; else ST_EINVAL with a message. */
int mlx_quantize_check(int bits, int group_size, char *err);

/* Quantizes w [rows][cols] (float32). Writes q [rows][cols*bits/32], scales and biases [rows][cols/group_size]
 * of sdtype (DT_BF16, DT_F16 or DT_F32). Single-threaded. Errors: unsupported bits/group size/sdtype, cols not a
 * multiple of group_size, a non-finite value (ST_EINVAL). */
int mlx_quantize_rows(const float *w, int64_t rows, int64_t cols, int bits, int group_size, enum dtype sdtype,
                      uint32_t *q, void *scales, void *biases, char *err);

/* The scalar reference of mlx_quantize_rows (MLX's loop as written; the oracle for parity tests). */
int mlx_quantize_rows_ref(const float *w, int64_t rows, int64_t cols, int bits, int group_size, enum dtype sdtype,
                          uint32_t *q, void *scales, void *biases, char *err);

/* Called after each chunk of output: bytes written so far out of the total, and the tensor being written. */
typedef void (*convert_progress_fn)(void *ctx, const char *tensor, uint64_t done_bytes, uint64_t total_bytes);

struct convert_opts {
    int bits;                  /* 4 or 8 */
    int group_size;            /* 32, 64 or 128 */
    int n_threads;             /* <= 0: every core */
    uint64_t max_shard_bytes;  /* 0: 5 GB */
    bool overwrite;            /* replace a model already in out_dir */
    convert_progress_fn progress; /* may be NULL */
    void *progress_ctx;
};

struct convert_stats {
    int n_tensors_in;
    int n_quantized;           /* input tensors quantized */
    int n_copied;              /* input tensors copied as they are */
    int n_shards;              /* output safetensors files */
    int n_files_copied;        /* tokenizer.json and the like */
    uint64_t in_bytes, out_bytes; /* tensor data */
    double seconds;
};

/* Converts in_dir into out_dir (created when missing). stats may be NULL. */
int model_convert(const char *in_dir, const char *out_dir, const struct convert_opts *opts,
                  struct convert_stats *stats, char *err);

#endif
