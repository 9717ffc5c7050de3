/* config.json: the model's shape, rope settings, dtype and quantization. */
#include "core/core.h"
#include "model/model.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

static const char *arch_names[ARCH_COUNT] = {"llama", "qwen2", "qwen3"};

const char *model_arch_name(enum model_arch a) { return (a >= 0 && a < ARCH_COUNT) ? arch_names[a] : "?"; }

/* Reads an integer field; absent -> def; present but not a non-negative integer -> error. */
static int get_int(const json_t *o, const char *key, int def, int *out, char *err)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return ST_OK;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1ll << 30))
        return err_set(err, ST_EFORMAT, "config.json: \"%s\" must be a non-negative integer", key);
    *out = (int)json_integer_value(v);
    return ST_OK;
}

static int get_num(const json_t *o, const char *key, double def, double *out, char *err)
{
    const json_t *v = json_object_get(o, key);
    if (!v || json_is_null(v)) {
        *out = def;
        return ST_OK;
    }
    if (!json_is_number(v)) return err_set(err, ST_EFORMAT, "config.json: \"%s\" must be a number", key);
    *out = json_number_value(v);
    return ST_OK;
}

/* Adds eos ids (an integer or a list of integers) inside the vocabulary, without duplicates. */
static void add_eos(struct model_config *c, const json_t *v)
{
    if (json_is_array(v)) {
        size_t i;
        const json_t *e;
        json_array_foreach(v, i, e) add_eos(c, e);
        return;
    }
    if (!json_is_integer(v)) return;
    json_int_t id = json_integer_value(v);
    if (id < 0 || (c->vocab_size > 0 && id >= c->vocab_size)) return;
    for (int i = 0; i < c->n_eos; i++)
        if (c->eos_ids[i] == id) return;
    if (c->n_eos < MODEL_MAX_EOS) c->eos_ids[c->n_eos++] = (int32_t)id;
}

static int parse_rope(struct model_config *c, const json_t *rs, char *err)
{
    if (!rs || json_is_null(rs)) return ST_OK;
    if (!json_is_object(rs)) return err_set(err, ST_EFORMAT, "config.json: rope_scaling must be an object or null");
    const json_t *t = json_object_get(rs, "rope_type");
    if (!t) t = json_object_get(rs, "type");
    const char *type = json_is_string(t) ? json_string_value(t) : "default";
    double theta;
    int rc;
    if ((rc = get_num(rs, "rope_theta", c->rope_theta, &theta, err)) < 0) return rc;
    c->rope_theta = theta;
    if (strcmp(type, "default") == 0) {
        c->rope_type = ROPE_DEFAULT;
    } else if (strcmp(type, "linear") == 0) {
        c->rope_type = ROPE_LINEAR;
        if ((rc = get_num(rs, "factor", 1.0, &c->rope_factor, err)) < 0) return rc;
    } else if (strcmp(type, "llama3") == 0) {
        c->rope_type = ROPE_LLAMA3;
        if ((rc = get_num(rs, "factor", 8.0, &c->rope_factor, err)) < 0) return rc;
        if ((rc = get_num(rs, "low_freq_factor", 1.0, &c->rope_low_freq_factor, err)) < 0) return rc;
        if ((rc = get_num(rs, "high_freq_factor", 4.0, &c->rope_high_freq_factor, err)) < 0) return rc;
        if ((rc = get_int(rs, "original_max_position_embeddings", 8192, &c->rope_orig_max_pos, err)) < 0) return rc;
        if (c->rope_low_freq_factor >= c->rope_high_freq_factor)
            return err_set(err, ST_EFORMAT, "config.json: llama3 rope needs low_freq_factor < high_freq_factor");
    } else {
        return err_set(err, ST_EUNSUPPORTED, "config.json: unsupported rope type \"%s\"", type);
    }
    if (!(c->rope_factor > 0) || !isfinite(c->rope_factor))
        return err_set(err, ST_EFORMAT, "config.json: rope factor must be positive");
    return ST_OK;
}

int model_config_parse(struct model_config *c, const char *text, size_t len, char *err)
{
    memset(c, 0, sizeof(*c));
    json_error_t je;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    int rc = ST_OK;
    if (!root) return err_set(err, ST_EFORMAT, "config.json: line %d: %s", je.line, je.text);
    if (!json_is_object(root)) {
        rc = err_set(err, ST_EFORMAT, "config.json: not a JSON object");
        goto fail;
    }
    const char *mt = json_string_value(json_object_get(root, "model_type"));
    const json_t *archs = json_object_get(root, "architectures");
    const char *a0 = json_string_value(json_array_get(archs, 0));
    if (!mt && a0) {
        if (strstr(a0, "Qwen3")) mt = "qwen3";
        else if (strstr(a0, "Qwen2")) mt = "qwen2";
        else if (strstr(a0, "Llama") || strstr(a0, "Mistral")) mt = "llama";
    }
    if (!mt) {
        rc = err_set(err, ST_EFORMAT, "config.json: no model_type or known architectures entry");
        goto fail;
    }
    snprintf(c->model_type, sizeof(c->model_type), "%s", mt);
    if (strcmp(mt, "qwen3") == 0) {
        c->arch = ARCH_QWEN3;
        c->qk_norm = true;
    } else if (strcmp(mt, "qwen2") == 0) {
        c->arch = ARCH_QWEN2;
        c->attn_bias = true;
    } else if (strcmp(mt, "llama") == 0 || strcmp(mt, "mistral") == 0) {
        c->arch = ARCH_LLAMA;
    } else {
        rc = err_set(err, ST_EUNSUPPORTED, "config.json: unsupported model_type \"%s\" (supported: llama, qwen2, qwen3)", mt);
        goto fail;
    }
    /* Qwen2 always has q/k/v biases (and none on o_proj) whatever the key says; for Llama and Qwen3,
     * attention_bias puts biases on q, k, v and o (transformers' LlamaAttention / Qwen3Attention). */
    if (c->arch != ARCH_QWEN2 && json_is_true(json_object_get(root, "attention_bias"))) {
        c->attn_bias = true;
        c->o_bias = true;
    }
    c->mlp_bias = json_is_true(json_object_get(root, "mlp_bias"));

    if ((rc = get_int(root, "hidden_size", 0, &c->dim, err)) < 0) goto fail;
    if ((rc = get_int(root, "intermediate_size", 0, &c->hidden_dim, err)) < 0) goto fail;
    if ((rc = get_int(root, "num_hidden_layers", 0, &c->n_layers, err)) < 0) goto fail;
    if ((rc = get_int(root, "num_attention_heads", 0, &c->n_heads, err)) < 0) goto fail;
    if ((rc = get_int(root, "num_key_value_heads", c->n_heads, &c->n_kv_heads, err)) < 0) goto fail;
    if ((rc = get_int(root, "head_dim", c->n_heads ? c->dim / c->n_heads : 0, &c->head_dim, err)) < 0) goto fail;
    if ((rc = get_int(root, "vocab_size", 0, &c->vocab_size, err)) < 0) goto fail;
    if ((rc = get_int(root, "max_position_embeddings", 4096, &c->max_seq_len, err)) < 0) goto fail;
    double eps;
    if ((rc = get_num(root, "rms_norm_eps", 1e-6, &eps, err)) < 0) goto fail;
    c->norm_eps = (float)eps;
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->head_dim <= 0 || c->vocab_size <= 0) {
        rc = err_set(err, ST_EFORMAT,
                     "config.json: hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, "
                     "num_key_value_heads, head_dim and vocab_size must be positive");
        goto fail;
    }
    if (c->n_heads % c->n_kv_heads != 0) {
        rc = err_set(err, ST_EFORMAT, "config.json: num_attention_heads (%d) is not a multiple of num_key_value_heads (%d)",
                     c->n_heads, c->n_kv_heads);
        goto fail;
    }
    if (c->head_dim % 2 != 0 || c->head_dim > 1024) {
        rc = err_set(err, ST_EFORMAT, "config.json: head_dim %d must be even and at most 1024", c->head_dim);
        goto fail;
    }
    if ((int64_t)c->dim * c->n_heads > (1ll << 40) || c->n_layers > 4096 || c->max_seq_len < 1) {
        rc = err_set(err, ST_EFORMAT, "config.json: implausible shape");
        goto fail;
    }
    const char *act = json_string_value(json_object_get(root, "hidden_act"));
    if (act && strcmp(act, "silu") != 0) {
        rc = err_set(err, ST_EUNSUPPORTED, "config.json: unsupported hidden_act \"%s\" (only silu)", act);
        goto fail;
    }
    const json_t *tie = json_object_get(root, "tie_word_embeddings");
    c->tie_embeddings = json_is_boolean(tie) ? json_is_true(tie) : false;

    c->rope_theta = 10000.0;
    c->rope_type = ROPE_DEFAULT;
    c->rope_factor = 1.0;
    const json_t *rp = json_object_get(root, "rope_parameters"); /* newer transformers */
    if ((rc = get_num(root, "rope_theta", c->rope_theta, &c->rope_theta, err)) < 0) goto fail;
    if (rp && !json_is_null(rp)) {
        if ((rc = parse_rope(c, rp, err)) < 0) goto fail;
    } else if ((rc = parse_rope(c, json_object_get(root, "rope_scaling"), err)) < 0) {
        goto fail;
    }
    if (!(c->rope_theta > 0)) {
        rc = err_set(err, ST_EFORMAT, "config.json: rope_theta must be positive");
        goto fail;
    }

    const char *dt = json_string_value(json_object_get(root, "torch_dtype"));
    if (!dt) dt = json_string_value(json_object_get(root, "dtype"));
    c->dtype = DT_BF16;
    if (dt) {
        if (strcmp(dt, "float32") == 0) c->dtype = DT_F32;
        else if (strcmp(dt, "float16") == 0) c->dtype = DT_F16;
        else if (strcmp(dt, "bfloat16") == 0) c->dtype = DT_BF16;
    }
    const json_t *q = json_object_get(root, "quantization");
    if (!q) q = json_object_get(root, "quantization_config");
    if (json_is_object(q)) {
        if ((rc = get_int(q, "bits", 0, &c->q_bits, err)) < 0) goto fail;
        if ((rc = get_int(q, "group_size", 64, &c->q_group_size, err)) < 0) goto fail;
        if (c->q_bits != 4 && c->q_bits != 8) {
            rc = err_set(err, ST_EUNSUPPORTED, "config.json: quantization bits %d unsupported (4 or 8)", c->q_bits);
            goto fail;
        }
        if (c->q_group_size != 32 && c->q_group_size != 64 && c->q_group_size != 128) {
            rc = err_set(err, ST_EUNSUPPORTED, "config.json: quantization group_size %d unsupported (32, 64, 128)",
                         c->q_group_size);
            goto fail;
        }
    }
    const json_t *bos = json_object_get(root, "bos_token_id");
    c->bos_id = json_is_integer(bos) ? (int32_t)json_integer_value(bos) : -1;
    {
        const json_t *eos = json_object_get(root, "eos_token_id");
        add_eos(c, eos);
        if (json_is_integer(eos) && c->n_eos == 0) {
            rc = err_set(err, ST_EFORMAT, "config.json: eos_token_id %lld outside the vocabulary",
                         (long long)json_integer_value(eos));
            goto fail;
        }
    }
fail:
    json_decref(root);
    return rc;
}

int model_config_load(struct model_config *c, const char *dir, char *err)
{
    char path[1200];
    char *text = NULL;
    size_t len = 0;
    int rc;
    if (path_join(path, sizeof(path), dir, "config.json") < 0) return err_set(err, ST_ERANGE, "path too long");
    if ((rc = file_read_all(path, &text, &len, 1 << 20, err)) < 0) return rc;
    rc = model_config_parse(c, text, len, err);
    free(text);
    if (rc < 0) return err_prefix(err, rc, "%s", dir);
    if (path_join(path, sizeof(path), dir, "generation_config.json") == 0 && file_exists(path)) {
        if (file_read_all(path, &text, &len, 1 << 20, NULL) == 0) {
            json_t *g = json_loadb(text, len, 0, NULL);
            if (json_is_object(g)) add_eos(c, json_object_get(g, "eos_token_id"));
            json_decref(g);
            free(text);
        }
    }
    return ST_OK;
}
